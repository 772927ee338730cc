"""One optimizer step on a batch, and the on-device normalisation that feeds it.

``DeviceNormalize``: uint8 (B, H, W, 3) batches from the workers -> normalised (B, 3, H, W) float on the device;
the permute is a view, so the batch is channels_last for free.

``TrainStep``: normalise, augment, forward, loss, backward, optimizer and scaler step, learning rate from the
schedule. It is what tests drive directly and what ``--compile`` speeds up; it never reads a value back from the
device. It is the same code for fp32, bf16 and fp16: autocast with an explicit dtype (disabled for fp32) and a
GradScaler that is always constructed and only *enabled* for fp16 (nanoGPT's habit).
"""

from __future__ import annotations

from typing import Callable

import torch

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


class TrainStep:
    """One optimizer step: ``(images, labels, step) -> (loss, stepped)``.

    images: (B, H, W, 3) uint8, on the host (pinned) or already on the device; labels: (B,) int64.
    loss: the batch's mean loss, a 0-dim fp32 tensor on the device (not read back here).
    stepped: whether the optimizer applied the update (False only when fp16's scaler skipped it after
    an overflow); known on the host without a sync, from an optimizer hook, because the scaler has
    already read its overflow flag inside ``scaler.step``.
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
        self._stepped = False
        optimizer.register_step_post_hook(self._on_optimizer_step)

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        images, labels = self.normalize(images, labels)
        if not self.channels_last:
            images = images.contiguous()
        set_lr(self.optimizer, self.lr_schedule(step))
        images, labels_a, labels_b, lam = self.augment(images, labels)
        with self.autocast():
            outputs = self.model(images)
        loss = augmented_loss(outputs.float(), labels_a, labels_b, lam, self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._stepped = False
        self.scaler.step(self.optimizer)  # fp16: skips the update when gradients overflowed
        self.scaler.update()
        if self.ema is not None and self._stepped:
            self.ema.update(self.model, step)  # foreach lerp on the device, no host sync
        return loss.detach(), self._stepped
