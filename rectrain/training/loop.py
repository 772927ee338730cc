"""The epoch loop around ``TrainStep``: timing, the data-wait share, the non-finite guard, log lines, the
progress bar and the agreed stop flag.

Scalars are read from the device only every ``print_freq`` batches (the guard's all-reduce and the loss sum); in
between, the loss sum and the first non-finite step stay on the device. ``TrainState`` is the run's position and
running sums, what a checkpoint must carry for an exact resume.

Units: ``--print_freq``, the progress bar and the position count batches; ``state.step``, the learning rate and
``--max_steps`` count optimizer steps. With ``--accum_steps N`` an optimizer step is an accumulation of N batches
(``schedule.accumulation``), and a stop (a signal, --max_steps) is agreed only when one ends: a checkpoint never
holds half an accumulation, so a resumed run starts at an accumulation's first batch and continues exactly. A
signal waits for at most N - 1 more batches. So partial gradients are never saved (under DDP they are each rank's
own, not yet all-reduced: a tensor the size of the weights per rank), and nothing needs rolling back, as restarting
an accumulation would (BatchNorm statistics, the random streams and the loss sums have moved on with its first
batches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from rectrain.data.failures import DecodeFailurePolicy, guarded
from rectrain.errors import UserError
from rectrain.runtime.distributed import StopFlag, all_reduce_min
from rectrain.training.schedule import accumulation
from rectrain.training.step import TrainStep

__all__ = ["TrainState", "NonFiniteLoss", "LoopSettings", "IntervalMeter", "NonFiniteGuard", "train_one_epoch",
           "DATA_WAIT_WARN"]

DATA_WAIT_WARN = 0.10  # warn once when more than 10% of step time is spent waiting for data
NO_STEP = 2 ** 62      # "no non-finite loss yet" (a MIN over ranks picks the first bad step of any rank)


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
    warned_data_wait: bool = False               # not saved: a resumed run may warn again

    def next_epoch(self) -> None:
        """The epoch is over (trained and validated): the position moves to the next one's first batch."""
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_images = 0.0, 0


class NonFiniteLoss(UserError):
    pass


@dataclass
class LoopSettings:
    """How the epoch loop reports and when it stops; built once by the trainer."""

    steps_per_epoch: int        # batches per epoch per rank
    print_freq: int             # log (and read scalars from the device) every N batches
    world_size: int
    log: Callable[[str], None]  # rank-aware logger
    max_steps: int | None = None  # optimizer steps
    accum_steps: int = 1        # batches per optimizer step
    on_interval: Callable[[dict], None] | None = None  # rank 0: one row per print interval (metrics)
    rank: int = 0


class IntervalMeter:
    """Wall time, time spent waiting for the next batch, and images: per print interval and for the whole call.

    ``arrived()`` when a batch comes out of the loader, ``trained(n)`` when its step was queued; the wait is the
    time between the two calls' neighbours (the step before handed over, the loader had not)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.start = self.last = self.interval_start = time.perf_counter()
        self.wait = self.interval_wait = 0.0
        self.images = self.interval_images = 0

    def arrived(self) -> None:
        waited = time.perf_counter() - self.last
        self.wait += waited
        self.interval_wait += waited

    def trained(self, n: int) -> None:
        self.images += n
        self.interval_images += n
        self.last = time.perf_counter()

    def end_interval(self) -> tuple[float, float]:
        """(images/s of all ranks, data-wait share) of the interval since the previous call."""
        elapsed = max(self.last - self.interval_start, 1e-9)
        out = self.interval_images * self.world_size / elapsed, self.interval_wait / elapsed
        self.interval_start, self.interval_wait, self.interval_images = self.last, 0.0, 0
        return out

    def totals(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_sec": self.images * self.world_size / elapsed, "data_wait_frac": self.wait / elapsed,
                "epoch_time_s": elapsed}


class NonFiniteGuard:
    """The first step whose loss was not finite, kept on the device (no sync per step) and agreed across ranks at
    each interval: the MIN over ranks of ``step * world + rank`` makes every rank stop naming the same step and
    the rank it went bad on (whichever rank exits first, its message names the right one)."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1):
        self.rank, self.world = rank, world_size
        self.bad = torch.full((), NO_STEP, device=device, dtype=torch.int64)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.bad = torch.where((self.bad == NO_STEP) & ~torch.isfinite(loss), step, self.bad)  # no host copy

    def check(self, epoch: int) -> None:
        """Raise ``NonFiniteLoss`` on every rank when any rank saw one; a collective: every rank calls it together."""
        tagged = torch.where(self.bad == NO_STEP, self.bad, self.bad * self.world + self.rank)
        first = int(all_reduce_min(tagged).item())
        if first == NO_STEP:
            return
        where = f" on rank {first % self.world}" if self.world > 1 else ""
        raise NonFiniteLoss(
            f"the loss became non-finite at step {first // self.world}{where} (epoch {epoch + 1}); the last good "
            "checkpoint is kept. Lower --lr (e.g. half) or --weight_decay (e.g. 5e-5), or try --amp_dtype bf16")


def train_one_epoch(train_step: TrainStep, loader, state: TrainState, stop: StopFlag, loop: LoopSettings,
                    failures: DecodeFailurePolicy, progress=None) -> tuple[dict, int]:
    """Train from ``state.batch_in_epoch`` to the end of the epoch, or until a stop is agreed.

    Returns (epoch statistics, stop signal number or 0).
    """
    train_step.model.train()
    device = train_step.normalize.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)   # sum over images of this rank
    guard, meter, signum = NonFiniteGuard(device, loop.rank, loop.world_size), IntervalMeter(loop.world_size), 0
    for images, labels, failed in guarded(loader):
        meter.arrived()
        if failed:
            _record_failures(failures, failed, stop)
        micro, micro_batches = accumulation(state.batch_in_epoch, loop.steps_per_epoch, loop.accum_steps)
        loss, stepped = train_step(images, labels, state.step, micro, micro_batches)
        state.step += int(stepped)  # the schedule advances only when the optimizer stepped
        loss_sum += loss.double() * labels.shape[0]
        guard.observe(loss, state.step)
        meter.trained(labels.shape[0])
        state.batch_in_epoch += 1
        if state.batch_in_epoch % loop.print_freq == 0 or state.batch_in_epoch == loop.steps_per_epoch:
            guard.check(state.epoch)  # with the loss sum below, the loop's only device->host reads
            _report_interval(_interval_row(train_step, state, loop, meter, loss_sum.item()), state, loop, progress)
        if progress is not None:
            progress.update(1)
        if micro < micro_batches - 1:
            continue  # inside an accumulation: no stop here (module docstring), every rank alike
        signum = stop.should_stop()
        if signum or (loop.max_steps is not None and state.step >= loop.max_steps):
            break
    # Fold this run's part of the epoch into the state (a resumed epoch keeps its earlier part).
    state.epoch_loss_sum += loss_sum.item()
    state.epoch_images += meter.images
    return meter.totals(), signum


def _record_failures(failures: DecodeFailurePolicy, failed: list[str], stop: StopFlag) -> None:
    try:
        failures.record(failed)
    except UserError as e:  # past the limit: every rank stops at this step's should_stop(), together
        stop.fail(e)


def _interval_row(train_step: TrainStep, state: TrainState, loop: LoopSettings, meter: IntervalMeter,
                  loss_sum: float) -> dict:
    images_per_sec, wait = meter.end_interval()
    return {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / loop.steps_per_epoch,
            "lr": train_step.optimizer.param_groups[0]["lr"],
            "train_loss": (state.epoch_loss_sum + loss_sum) / max(state.epoch_images + meter.images, 1),
            "images_per_sec": images_per_sec, "data_wait_frac": wait}


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
