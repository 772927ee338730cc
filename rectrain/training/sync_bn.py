"""--sync_bn: BatchNorm statistics over the global batch of every process, not each process's share.

``convert(model, device)`` turns every BatchNorm into a synchronised one in place, before DDP wraps the model. The
new layers take over the same parameter and buffer tensors under the same names (the optimizer built before keeps
them; a checkpoint's state dict is a BatchNorm model's).

On GPUs that is torch's ``SyncBatchNorm`` (its fused CUDA kernels). torch refuses CPU tensors in it (torch 2.13:
"SyncBatchNorm expected input tensor to be on GPU"; DDP: "SyncBatchNorm layers only work with GPU modules"), so on
the CPU under gloo ``GlooSyncBatchNorm`` computes the same thing with autograd-aware all-reduces
(``torch.distributed.nn.functional.all_reduce``): each channel's sum and count, then its sum of squared deviations
from the global mean (two passes, as accurate as one process's BatchNorm). The backward all-reduces the gradients of
those statistics, which is what torch's CUDA backward does. Two all-reduces per layer and pass: slow, and meant for
CPU runs and the CPU tests of the --sync_bn path, not for speed.

Normalisation uses the biased variance of the global batch and the running variance its unbiased estimate, as
``torch.nn.BatchNorm2d`` on that batch would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlooSyncBatchNorm", "convert"]


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a gloo process group, for CPU tensors; see the module docstring. Outside
    training, or without a process group of two or more, it is plain BatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # all but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # (C,) -> (1, C, 1, ...)
        sums = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.size(1)])]), group=group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=group) / n  # biased, for the normalisation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), factor)  # unbiased
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert(module: torch.nn.Module, device: torch.device, process_group=None) -> torch.nn.Module:
    """Every BatchNorm under ``module`` (and ``module`` itself) synchronised, sharing its tensors; children are
    replaced in place. On CUDA torch's ``SyncBatchNorm.convert_sync_batchnorm``; elsewhere the same walk to
    ``GlooSyncBatchNorm``."""
    if torch.device(device).type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert(child, device, process_group))
    return out
