"""One optimizer step on a batch, and the on-device normalisation that feeds it.

``DeviceNormalize``: uint8 (B, H, W, 3) batches from the workers -> normalised (B, 3, H, W) float on the device;
the permute is a view, so the batch is channels_last for free.

``TrainStep``: normalise, augment, forward, loss, backward, optimizer and scaler step, learning rate from the
schedule; with gradient accumulation (``--accum_steps``) a batch is one micro-batch of an optimizer step. It is
what tests drive directly and what ``--compile`` speeds up; it never reads a value back from the device. It is the
same code for fp32, bf16 and fp16: autocast with an explicit dtype (disabled for fp32) and a GradScaler that is
always constructed and only *enabled* for fp16 (nanoGPT's habit).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from rectrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rectrain.training.losses import augmented_loss
from rectrain.training.schedule import set_lr

__all__ = ["DeviceNormalize", "TrainStep"]


class DeviceNormalize:
    """uint8 (B, H, W, 3) on the host -> normalised (B, 3, H, W) on the device, channels_last strides.

    The copy is non-blocking from pinned memory; the cast and normalisation run on the device.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).mul(255).view(1, 3, 1, 1)
        self.inv_std = torch.tensor(IMAGENET_STD, device=self.device).mul(255).reciprocal().view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC memory
        images = images.float().sub_(self.mean).mul_(self.inv_std).to(self.dtype)
        return images, labels.to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return f"DeviceNormalize(device={self.device}, dtype={self.dtype})"


def ddp_of(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper in ``model`` (under a torch.compile wrapper too), or None in a single process."""
    while model is not None:
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
    return None


class TrainStep:
    """One optimizer step: ``(images, labels, step) -> (loss, stepped)``; with gradient accumulation, one
    micro-batch of it: ``(images, labels, step, micro, micro_batches)``.

    images: (B, H, W, 3) uint8, on the host (pinned) or already on the device; labels: (B,) int64.
    loss: the batch's mean loss, a 0-dim fp32 tensor on the device (not read back here).
    stepped: whether the optimizer applied the update (False on all but the last micro-batch, and when fp16's
    scaler skipped it after an overflow); known on the host without a sync, from an optimizer hook, because the
    scaler has already read its overflow flag inside ``scaler.step``.

    Accumulation (``micro`` of ``micro_batches``, from ``schedule.accumulation``): the first micro-batch sets the
    rate and clears the gradients, each one adds the gradient of its loss / ``micro_batches`` (so the step's gradient
    is their mean, as one batch of all their images would give, BatchNorm aside: it normalises each micro-batch on
    its own), the last one steps. Under DDP all but the last run forward and backward in ``no_sync`` (the gradients
    stay local; the last backward all-reduces their sum). Each micro-batch draws its own MixUp/CutMix, as a batch does.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 normalize, augment, autocast, lr_schedule: Callable[[int], float], label_smoothing: float,
                 channels_last: bool, ema=None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.normalize = normalize          # DeviceNormalize: uint8 NHWC -> normalised NCHW on the device
        self.augment = augment              # BatchAugment: (images, labels) -> (images, labels_a, labels_b, lam)
        self.autocast = autocast            # () -> context manager
        self.lr_schedule = lr_schedule
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.ema = ema                      # ModelEma or None: averaged after each applied update
        self.ddp = ddp_of(model)            # for no_sync on all but an accumulation's last micro-batch
        self._stepped = False
        optimizer.register_step_post_hook(self._on_optimizer_step)

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int = 0,
                 micro_batches: int = 1) -> tuple[torch.Tensor, bool]:
        images, labels = self.normalize(images, labels)
        if not self.channels_last:
            images = images.contiguous()
        last = micro == micro_batches - 1
        if micro == 0:
            set_lr(self.optimizer, self.lr_schedule(step))
            self.optimizer.zero_grad(set_to_none=True)
        images, labels_a, labels_b, lam = self.augment(images, labels)
        # no_sync must hold the forward too: DDP decides in forward whether the coming backward all-reduces
        with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
            with self.autocast():
                outputs = self.model(images)
            loss = augmented_loss(outputs.float(), labels_a, labels_b, lam, self.label_smoothing)
            self.scaler.scale(loss / micro_batches if micro_batches > 1 else loss).backward()
        if not last:
            return loss.detach(), False
        self._stepped = False
        self.scaler.step(self.optimizer)  # fp16: skips the update when gradients overflowed
        self.scaler.update()
        if self.ema is not None and self._stepped:
            self.ema.update(self.model, step)  # foreach lerp on the device, no host sync
        return loss.detach(), self._stepped
