"""One training epoch and one evaluation pass.

The step is the same code for fp32, bf16 and fp16: autocast with an explicit dtype (disabled for fp32)
and a GradScaler that is always constructed and only *enabled* for fp16 (nanoGPT's habit). Scalars are
read from the device only every ``print_freq`` steps; the loss sum and the first non-finite step are
kept on the device in between.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rectrain.distributed import StopFlag, all_reduce_sum
from rectrain.errors import UserError
from rectrain.losses import augmented_loss
from rectrain.schedule import lr_at, set_lr
from rectrain.transforms import DecodeError

DATA_WAIT_WARN = 0.10  # warn once when more than 10% of step time is spent waiting for data


class NonFiniteLoss(UserError):
    pass


class DecodeFailures(UserError):
    pass


@dataclass
class TrainState:
    """Progress that a checkpoint must carry for an exact resume."""

    step: int = 0                # optimizer steps taken in the whole run
    epoch: int = 0               # current epoch, 0-based
    batch_in_epoch: int = 0      # batches of this epoch already trained (per rank)
    epoch_loss_sum: float = 0.0  # running sums of the current epoch (for its train_loss)
    epoch_images: int = 0
    best_acc1: float = -1.0
    decode_failures: list = field(default_factory=list)
    warned_data_wait: bool = False


@dataclass
class StepContext:
    """What every step needs; built once by the trainer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    normalize: object           # DeviceNormalize
    augment: object             # BatchAugment: (images, labels) -> (images, labels_a, labels_b, lam)
    autocast: object            # () -> context manager
    label_smoothing: float
    base_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    channels_last: bool
    print_freq: int
    max_decode_failures: int
    world_size: int
    log: object                 # callable(str), rank-aware
    is_primary: bool
    max_steps: int | None = None


def autocast_factory(device: str, amp_dtype: torch.dtype | None):
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if amp_dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device_type, dtype=amp_dtype)


def train_one_epoch(ctx: StepContext, loader, state: TrainState, stop: StopFlag, steps_per_epoch: int,
                    progress=None) -> tuple[dict, int]:
    """Train from ``state.batch_in_epoch`` to the end of the epoch, or until a stop is agreed.

    Returns (epoch statistics, stop signal number or 0).
    """
    model, opt, scaler = ctx.model, ctx.optimizer, ctx.scaler
    model.train()
    device = ctx.normalize.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)   # sum over images of this rank
    bad_step = torch.full((), -1, device=device, dtype=torch.int64)  # first step with a non-finite loss
    images_seen = 0
    wait = 0.0
    t_start = t_last = time.perf_counter()
    interval_wait, interval_start, interval_images = 0.0, t_start, 0
    signum = 0
    for images, labels, failed in _guarded(loader):
        now = time.perf_counter()
        wait += now - t_last
        interval_wait += now - t_last
        if failed:
            _record_failures(ctx, state, failed)
        images, labels = ctx.normalize(images, labels)
        if not ctx.channels_last:
            images = images.contiguous()
        set_lr(opt, lr_at(state.step, ctx.base_lr, ctx.total_steps, ctx.warmup_steps, ctx.min_lr))
        images, labels_a, labels_b, lam = ctx.augment(images, labels)
        with ctx.autocast():
            outputs = model(images)
        loss = augmented_loss(outputs.float(), labels_a, labels_b, lam, ctx.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)  # fp16: skips the update when gradients overflowed
        scaler.update()
        # The schedule advances only when the optimizer stepped. fp16's scaler has already synced inside
        # step(), so reading the scale costs nothing more; bf16/fp32 always step.
        if scale_before is None or scaler.get_scale() >= scale_before:
            state.step += 1
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), state.step, bad_step)  # no copy
        images_seen += n
        interval_images += n
        state.batch_in_epoch += 1
        t_last = time.perf_counter()

        if state.batch_in_epoch % ctx.print_freq == 0 or state.batch_in_epoch == steps_per_epoch:
            # The only device->host reads of the step: once per print interval.
            first_bad = int(bad_step.item())
            if first_bad >= 0:
                raise NonFiniteLoss(
                    f"the loss became non-finite at step {first_bad} (epoch {state.epoch + 1}); the last good "
                    "checkpoint is kept. Lower --lr (e.g. half) or --weight_decay (e.g. 5e-5), or try --amp_dtype bf16")
            elapsed = t_last - interval_start
            ips = interval_images * ctx.world_size / max(elapsed, 1e-9)
            frac = interval_wait / max(elapsed, 1e-9)
            lr = opt.param_groups[0]["lr"]
            mean_loss = (state.epoch_loss_sum + loss_sum.item()) / max(state.epoch_images + images_seen, 1)
            ctx.log(f"epoch {state.epoch + 1} batch {state.batch_in_epoch}/{steps_per_epoch} step {state.step} "
                    f"loss {mean_loss:.4f} lr {lr:.5f} images/s {ips:.1f} data_wait {100 * frac:.0f}%")
            if progress is not None:
                progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.4f}", ips=f"{ips:.0f}",
                                     wait=f"{100 * frac:.0f}%", refresh=False)
            if (frac > DATA_WAIT_WARN and not state.warned_data_wait and state.step > 2 * ctx.print_freq):
                state.warned_data_wait = True
                ctx.log(f"warning: {100 * frac:.0f}% of step time is spent waiting for data: raise --workers "
                        "(per GPU) or move the dataset to faster local storage (NVMe)")
            interval_wait, interval_start, interval_images = 0.0, t_last, 0
        if progress is not None:
            progress.update(1)
        signum = stop.should_stop()
        if signum or (ctx.max_steps is not None and state.step >= ctx.max_steps):
            break
    elapsed = time.perf_counter() - t_start
    stats = _epoch_stats(ctx, state, loss_sum, images_seen, elapsed, wait)
    return stats, signum


def _guarded(loader):
    """Iterate a loader, turning 'a whole run of images cannot be decoded' into one clear message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DecodeError as e:  # from a worker it carries the worker's traceback: keep our line only
            line = next((ln for ln in str(e).splitlines() if "failed to decode" in ln), str(e).splitlines()[0])
            raise DecodeFailures(f"{line[:500]}. The storage may be failing or the dataset changed since it was "
                                 "scanned: check the files, then run `rectrain scan --data_dir ...`") from None
        yield batch


def _record_failures(ctx: StepContext, state: TrainState, failed: list[str]) -> None:
    for f in failed:
        ctx.log(f"warning: could not decode {f}; replaced by another image of the same shape")
    state.decode_failures.extend(failed)
    if len(state.decode_failures) > ctx.max_decode_failures:
        raise DecodeFailures(
            f"{len(state.decode_failures)} images failed to decode (more than --max_decode_failures "
            f"{ctx.max_decode_failures}); first: {state.decode_failures[0]}. Check the dataset's storage or re-copy "
            "it; `rectrain scan --data_dir ...` lists unreadable files")


def _epoch_stats(ctx, state: TrainState, loss_sum, images_seen: int, elapsed: float, wait: float) -> dict:
    # Fold this run's part of the epoch into the state (a resumed epoch keeps its earlier part).
    state.epoch_loss_sum += loss_sum.item()
    state.epoch_images += images_seen
    return {
        "images_per_sec": images_seen * ctx.world_size / max(elapsed, 1e-9),
        "data_wait_frac": wait / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, autocast, stop: StopFlag | None = None,
             channels_last: bool = True) -> dict | None:
    """Top-1, top-5 and loss over the whole validation set, every image counted once across ranks.

    Ranks may hold different numbers of batches, so no collective runs inside the loop: sums stay on
    the device and are all-reduced once at the end. Returns None when a stop signal arrived (the caller
    agrees on it with the other ranks).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=normalize.device)  # loss, correct1, correct5, count
    for images, labels, _failed in _guarded(loader):
        if stop is not None and stop.signum:
            return None
        images, labels = normalize(images, labels)
        if not channels_last:
            images = images.contiguous()
        with autocast():
            logits = model(images)
        logits = logits.float()
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
