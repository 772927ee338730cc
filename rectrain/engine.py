"""The training step, the epoch loop around it, and one evaluation pass.

``TrainStep`` is one optimizer step on a batch: normalise on the device, augment, forward, loss,
backward, optimizer and scaler step, learning rate from the schedule. It is what tests drive directly
and what ``--compile`` speeds up; it never reads a value back from the device. It is the same code for
fp32, bf16 and fp16: autocast with an explicit dtype (disabled for fp32) and a GradScaler that is always
constructed and only *enabled* for fp16 (nanoGPT's habit).

``train_one_epoch`` is the thin loop around it: timing, the data-wait share, log lines, the progress bar
and the agreed stop flag. Scalars are read from the device only every ``print_freq`` steps; the loss
sum and the first non-finite step stay on the device in between.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from rectrain.distributed import StopFlag, all_reduce_min, all_reduce_sum
from rectrain.errors import UserError
from rectrain.loader import DecodeFailurePolicy, guarded
from rectrain.losses import augmented_loss
from rectrain.schedule import lr_at, set_lr

DATA_WAIT_WARN = 0.10  # warn once when more than 10% of step time is spent waiting for data
NO_STEP = 2 ** 62      # "no non-finite loss yet" (a MIN over ranks picks the first bad step of any rank)


class NonFiniteLoss(UserError):
    pass


@dataclass
class TrainState:
    """Progress that a checkpoint must carry for an exact resume."""

    step: int = 0                # optimizer steps taken in the whole run (fp16: skipped steps not counted)
    epoch: int = 0               # current epoch, 0-based
    batch_in_epoch: int = 0      # batches of this epoch already trained (per rank)
    epoch_loss_sum: float = 0.0  # running sums of the current epoch (for its train_loss), this rank
    epoch_images: int = 0
    best_acc1: float = -1.0
    lr_rebased: tuple[int, float] | None = None  # LRSchedule.rebased, when a resume changed the schedule
    resumed_lr: float | None = None              # the rate the resumed checkpoint applied last (not saved)
    warned_data_wait: bool = False


def autocast_factory(device: str, amp_dtype: torch.dtype | None):
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if amp_dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device_type, dtype=amp_dtype)


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up + cosine over the whole run, as a function of the optimizer step (rectrain.schedule.lr_at).

    ``rebased``: (step, lr) where a resumed run changed the schedule (another --epochs, --lr, ...): from that step
    on, a cosine from that lr down to ``min_lr`` at the last step, so the rate never jumps and still ends at its
    minimum. Saved in checkpoints, so a later resume continues the same curve exactly.
    """

    base_lr: float      # peak rate for the global batch
    total_steps: int
    warmup_steps: int
    min_lr: float = 0.0
    rebased: tuple[int, float] | None = None

    def __call__(self, step: int) -> float:
        if self.rebased is None or step < self.rebased[0]:
            return lr_at(step, self.base_lr, self.total_steps, self.warmup_steps, self.min_lr)
        start, lr = self.rebased
        return lr_at(step - start, lr, self.total_steps - start, 0, min(self.min_lr, lr))

    def continuing(self, step: int, last_lr: float) -> "LRSchedule":
        """This schedule, or one rebased so that it continues from ``last_lr``, the rate a checkpoint applied at
        ``step - 1`` (the same schedule when it agrees, so an unchanged resume stays bit-exact)."""
        if step <= max(self.warmup_steps, 1) or step >= self.total_steps:
            return self  # in the warm-up the ramp continues; at the end there is nothing left to plan
        # fp16: after a skipped last step the applied rate is the one for ``step`` itself
        if any(math.isclose(self(s), last_lr, rel_tol=1e-9, abs_tol=1e-12) for s in (step - 1, step)):
            return self
        return dataclasses.replace(self, rebased=(step - 1, last_lr))


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


@dataclass
class LoopSettings:
    """How the epoch loop reports and when it stops; built once by the trainer."""

    steps_per_epoch: int        # batches per epoch per rank
    print_freq: int             # log (and read scalars from the device) every N batches
    world_size: int
    log: Callable[[str], None]  # rank-aware logger
    max_steps: int | None = None
    on_interval: Callable[[dict], None] | None = None  # rank 0: one row per print interval (metrics)
    rank: int = 0


def train_one_epoch(train_step: TrainStep, loader, state: TrainState, stop: StopFlag, loop: LoopSettings,
                    failures: DecodeFailurePolicy, progress=None) -> tuple[dict, int]:
    """Train from ``state.batch_in_epoch`` to the end of the epoch, or until a stop is agreed.

    Returns (epoch statistics, stop signal number or 0).
    """
    train_step.model.train()
    device = train_step.normalize.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)   # sum over images of this rank
    bad_step = torch.full((), NO_STEP, device=device, dtype=torch.int64)  # first step with a non-finite loss
    images_seen, wait = 0, 0.0
    t_start = t_last = time.perf_counter()
    interval_wait, interval_start, interval_images = 0.0, t_start, 0
    signum = 0
    for images, labels, failed in guarded(loader):
        now = time.perf_counter()
        wait += now - t_last
        interval_wait += now - t_last
        if failed:
            try:
                failures.record(failed)
            except UserError as e:  # past the limit: every rank stops at this step's should_stop(), together
                stop.fail(e)
        loss, stepped = train_step(images, labels, state.step)
        state.step += int(stepped)  # the schedule advances only when the optimizer stepped
        n = labels.shape[0]
        loss_sum += loss.double() * n
        bad_step = torch.where((bad_step == NO_STEP) & ~torch.isfinite(loss), state.step, bad_step)  # no copy
        images_seen += n
        interval_images += n
        state.batch_in_epoch += 1
        t_last = time.perf_counter()

        if state.batch_in_epoch % loop.print_freq == 0 or state.batch_in_epoch == loop.steps_per_epoch:
            # The only device->host reads of the loop: once per print interval. Every rank reaches this at the
            # same batch, and the MIN over ranks of step * world + rank makes them all stop naming the same step
            # and the rank it went bad on (whichever rank exits first, its message names the right one).
            world = loop.world_size
            first = int(all_reduce_min(torch.where(bad_step == NO_STEP, bad_step, bad_step * world + loop.rank)).item())
            if first != NO_STEP:
                where = f" on rank {first % world}" if world > 1 else ""
                raise NonFiniteLoss(
                    f"the loss became non-finite at step {first // world}{where} (epoch {state.epoch + 1}); the last "
                    "good checkpoint is kept. Lower --lr (e.g. half) or --weight_decay (e.g. 5e-5), or try --amp_dtype "
                    "bf16")
            elapsed = t_last - interval_start
            row = {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / loop.steps_per_epoch,
                   "lr": train_step.optimizer.param_groups[0]["lr"],
                   "train_loss": (state.epoch_loss_sum + loss_sum.item()) / max(state.epoch_images + images_seen, 1),
                   "images_per_sec": interval_images * loop.world_size / max(elapsed, 1e-9),
                   "data_wait_frac": interval_wait / max(elapsed, 1e-9)}
            _report_interval(row, state, loop, progress)
            interval_wait, interval_start, interval_images = 0.0, t_last, 0
        if progress is not None:
            progress.update(1)
        signum = stop.should_stop()
        if signum or (loop.max_steps is not None and state.step >= loop.max_steps):
            break
    elapsed = time.perf_counter() - t_start
    # Fold this run's part of the epoch into the state (a resumed epoch keeps its earlier part).
    state.epoch_loss_sum += loss_sum.item()
    state.epoch_images += images_seen
    stats = {"images_per_sec": images_seen * loop.world_size / max(elapsed, 1e-9),
             "data_wait_frac": wait / max(elapsed, 1e-9), "epoch_time_s": elapsed}
    return stats, signum


def _report_interval(row: dict, state: TrainState, loop: LoopSettings, progress) -> None:
    loop.log(f"epoch {state.epoch + 1} batch {state.batch_in_epoch}/{loop.steps_per_epoch} step {row['step']} "
             f"loss {row['train_loss']:.4f} lr {row['lr']:.5f} images/s {row['images_per_sec']:.1f} "
             f"data_wait {100 * row['data_wait_frac']:.0f}%")
    if progress is not None:
        progress.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{row['lr']:.4f}",
                             ips=f"{row['images_per_sec']:.0f}", wait=f"{100 * row['data_wait_frac']:.0f}%",
                             refresh=False)
    if loop.on_interval is not None:
        loop.on_interval(row)
    if row["data_wait_frac"] > DATA_WAIT_WARN and not state.warned_data_wait and state.step > 2 * loop.print_freq:
        state.warned_data_wait = True
        loop.log(f"warning: {100 * row['data_wait_frac']:.0f}% of step time is spent waiting for data: raise "
                 "--workers (per GPU) or move the dataset to faster local storage (NVMe)")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, autocast, stop: StopFlag | None = None,
             channels_last: bool = True, pad_to: int | None = None) -> torch.Tensor | None:
    """Loss, top-1 and top-5 sums over this rank's share of the validation set.

    Ranks may hold different numbers of batches, so no collective runs inside the loop: sums stay on
    the device and are all-reduced once at the end (``reduce_eval``). Returns None when a stop signal
    arrived (the caller agrees on it with the other ranks). ``pad_to``: a bucket's last, smaller batch is
    padded with blank images to this size and the padding is ignored, so that each bucket is one batch
    shape (one compiled graph, one cuDNN plan); in eval mode images do not interact, so results are equal.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=normalize.device)  # loss, correct1, correct5, count
    for images, labels, _failed in guarded(loader):
        if stop is not None and stop.signum:
            return None
        n = labels.shape[0]
        if pad_to is not None and n < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
        images, labels = normalize(images, labels)
        if not channels_last:
            images = images.contiguous()
        with autocast():
            logits = model(images)
        logits = logits[:n].float()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        sums += torch.stack([loss.double(), hit[:, :1].sum().double(), hit.sum().double(),
                             torch.tensor(float(labels.shape[0]), device=sums.device, dtype=torch.float64)])
    return sums


def reduce_eval(sums: torch.Tensor) -> dict:
    sums = all_reduce_sum(sums.clone())
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_acc1": 100.0 * c1 / n, "val_acc5": 100.0 * c5 / n, "val_images": int(n)}
