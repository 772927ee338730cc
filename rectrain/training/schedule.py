"""Schedules as pure functions: the learning rate of the step, the image resolution of the epoch.

The learning rate is linear warm-up, then cosine decay (``--lr_schedule cosine``) or polynomial decay
(``poly``: MLPerf's LARS recipe), stepped per optimizer step, not per epoch (Goyal et al. 2017 warm-up;
Loshchilov & Hutter 2017 cosine); ``LRSchedule`` is that curve for a run, and how a resumed run with other
settings continues it without a jump. With ``--accum_steps N`` an optimizer step is N batches
(``optimizer_steps``, ``accumulation``). The resolution rises linearly between two epochs, in multiples of 32
(FFCV's progressive resizing). Pure, so resume needs no scheduler state: the step and epoch counts are enough
(and, after a changed resume, the point where the curve was rebased).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from rectrain.data.buckets import MULTIPLE
from rectrain.errors import UserError


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly from base_lr/warmup_steps at step 0 to base_lr at step warmup_steps - 1, so
    the first step already moves; then cosine from base_lr down to min_lr at the last step.
    """
    warm, progress = _warmup_or_progress(step, base_lr, total_steps, warmup_steps)
    if warm is not None:
        return warm
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _warmup_or_progress(step: int, base_lr: float, total_steps: int, warmup_steps: int) -> tuple[float | None, float]:
    """The warm-up every schedule shares: (its rate, 0) during the warm-up, else (None, the decay's progress from 0 at
    the first step after the warm-up to 1 at the last step). ``step`` is clamped to the run's steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    step = min(max(step, 0), total_steps - 1)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps, 0.0
    return None, (step - warmup_steps) / max(total_steps - warmup_steps - 1, 1)


def poly_lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
               power: float = 2.0) -> float:
    """``lr_at``'s warm-up, then polynomial decay from base_lr to min_lr at the last step:
    ``min_lr + (base_lr - min_lr) * (1 - progress) ** power``, progress 0 at the first step after the warm-up.

    MLPerf's ResNet-50 reference pairs it with LARS: power 2, end rate 1e-4 (mlcommons/training,
    image_classification/tensorflow2/lars_util.py, ``PolynomialDecayWithWarmup``; its warm-up starts at 0 where
    this one starts at base_lr/warmup_steps, as the cosine's does here)."""
    warm, progress = _warmup_or_progress(step, base_lr, total_steps, warmup_steps)
    if warm is not None:
        return warm
    return min_lr + (base_lr - min_lr) * (1.0 - progress) ** power


LR_SCHEDULES = ("cosine", "poly")


def optimizer_steps(batches: int, accum_steps: int = 1) -> int:
    """Optimizer steps in ``batches`` batches of one epoch with ``--accum_steps``: an epoch's last accumulation
    may be shorter (``accumulation``), so every batch trains and an epoch ends on an optimizer step."""
    return -(-batches // accum_steps)


def accumulation(batch: int, batches: int, accum_steps: int = 1) -> tuple[int, int]:
    """(index of ``batch`` in its accumulation, that accumulation's length): batch ``batch`` (0-based) of an epoch of
    ``batches`` batches. Accumulations start at multiples of ``accum_steps`` and never cross an epoch's end: the last
    one holds the ``batches % accum_steps`` batches left over, when there are some (its gradient is their mean: a
    smaller batch for that one step, rather than batches dropped or carried into the next epoch)."""
    first = batch - batch % accum_steps
    return batch - first, min(accum_steps, batches - first)


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up + cosine (or ``kind="poly"``: polynomial decay of ``power``) over the whole run, as a function of
    the optimizer step (``lr_at``, ``poly_lr_at``).

    ``rebased``: (step, lr) where a resumed run changed the schedule (another --epochs, --lr, ...): from that step
    on, the same kind of curve (cosine or poly) from that lr down to ``min_lr`` at the last step, so the rate never
    jumps and still ends at its minimum. Saved in checkpoints, so a later resume continues the same curve exactly.
    """

    base_lr: float      # peak rate for the global batch
    total_steps: int
    warmup_steps: int
    min_lr: float = 0.0
    rebased: tuple[int, float] | None = None
    kind: str = "cosine"   # LR_SCHEDULES
    power: float = 2.0     # of the polynomial decay

    def _curve(self, step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> float:
        if self.kind == "poly":
            return poly_lr_at(step, base_lr, total_steps, warmup_steps, min_lr, self.power)
        return lr_at(step, base_lr, total_steps, warmup_steps, min_lr)

    def __call__(self, step: int) -> float:
        if self.rebased is None or step < self.rebased[0]:
            return self._curve(step, self.base_lr, self.total_steps, self.warmup_steps, self.min_lr)
        start, lr = self.rebased
        return self._curve(step - start, lr, self.total_steps - start, 0, min(self.min_lr, lr))

    def continuing(self, step: int, last_lr: float) -> "LRSchedule":
        """This schedule, or one rebased so that it continues from ``last_lr``, the rate a checkpoint applied at
        ``step - 1`` (the same schedule when it agrees, so an unchanged resume stays bit-exact)."""
        if step <= max(self.warmup_steps, 1) or step >= self.total_steps:
            return self  # in the warm-up the ramp continues; at the end there is nothing left to plan
        # fp16: after a skipped last step the applied rate is the one for ``step`` itself
        if any(math.isclose(self(s), last_lr, rel_tol=1e-9, abs_tol=1e-12) for s in (step - 1, step)):
            return self
        return dataclasses.replace(self, rebased=(step - 1, last_lr))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# Progressive resolution (FFCV's ResNet-50 recipe: low resolution early, where the model learns coarse
# features cheaply, rising to the final size for the last epochs). A pure function of the epoch, so
# resume needs nothing saved but the epoch.

def resolution_at(epoch: int, start: int, end: int, start_epoch: int, end_epoch: int,
                  multiple: int = MULTIPLE) -> int:
    """Image size for ``epoch`` (0-based, as the trainer counts): ``start`` up to and including
    ``start_epoch``, then linear to ``end`` at ``end_epoch``, then ``end``; rounded to a multiple of
    ``multiple`` (32: ResNet's total stride, as the buckets and FFCV round).

    Rounding is to the nearest multiple, ties to even, computed exactly (FFCV's ``np.round`` of the
    interpolated value: the same sizes epoch for epoch). ``start`` and ``end`` should themselves be
    multiples (``ResolutionSchedule`` checks it); otherwise they are rounded too.
    """
    if start > end or start_epoch > end_epoch or multiple < 1:
        raise ValueError(f"need start <= end, start_epoch <= end_epoch and multiple >= 1, got "
                         f"{start}, {end}, {start_epoch}, {end_epoch}, {multiple}")
    if epoch <= start_epoch:
        size = Fraction(start)
    elif epoch >= end_epoch:
        size = Fraction(end)
    else:
        size = start + Fraction((end - start) * (epoch - start_epoch), end_epoch - start_epoch)
    return round(size / multiple) * multiple  # round() of a Fraction is exact, ties to even


@dataclass(frozen=True)
class ResolutionSchedule:
    """A progressive-resolution schedule, written ``START:END:E1:E2`` on the command line.

    ``START`` through epoch E1, a linear ramp to ``END`` at epoch E2 rounded to multiples of 32, then
    ``END``. Epochs count from 0, as the trainer's. ``160:192:2:13`` (FFCV's ResNet-50 sizes) is 160
    for epochs 0-7 and 192 from epoch 8, where the ramp passes 176; ``128:224:0:6`` gives
    128, 128, 160, 192, 192, 192, 224 (the ramp's exact ties 144 and 208 round to even multiples,
    as FFCV's ``np.round``). E1 == E2 is a single jump after E1. The size is what the
    buckets are built from (``target_size``: the shorter side, or the square root of the area in
    ``area`` mode).
    """

    start: int
    end: int
    start_epoch: int
    end_epoch: int

    def __post_init__(self):
        for name in ("start", "end", "start_epoch", "end_epoch"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise UserError(f"resolution schedule {self}: {name} must be an integer, "
                                f"got {getattr(self, name)!r}")
        if self.start < MULTIPLE or self.start % MULTIPLE or self.end % MULTIPLE:
            raise UserError(f"resolution schedule {self}: START and END must be multiples of {MULTIPLE}, "
                            f"at least {MULTIPLE} (e.g. 160:192:2:13)")
        if self.start > self.end:
            raise UserError(f"resolution schedule {self}: START must not exceed END (it only rises)")
        if not 0 <= self.start_epoch <= self.end_epoch:
            raise UserError(f"resolution schedule {self}: need 0 <= E1 <= E2 (epochs count from 0)")

    @classmethod
    def parse(cls, spec: str) -> "ResolutionSchedule":
        """``"160:192:2:13"`` -> ResolutionSchedule(160, 192, 2, 13); UserError naming the spec if malformed."""
        parts = str(spec).split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(parts) != 4 or len(values) != 4:
            raise UserError(f"resolution schedule {spec!r} must be START:END:E1:E2 in integers, "
                            "e.g. 160:192:2:13 (160 px through epoch 2, ramping to 192 at epoch 13)")
        return cls(*values)

    def at(self, epoch: int) -> int:
        """The size for ``epoch`` (0-based)."""
        return resolution_at(epoch, self.start, self.end, self.start_epoch, self.end_epoch)

    def sizes(self, epochs: int, first_epoch: int = 0) -> list[int]:
        """The distinct sizes epochs ``first_epoch`` .. ``epochs - 1`` use, in order of first use (so the
        trainer can build and warm up each bucket table before its first epoch; on resume, pass the
        resume epoch as ``first_epoch``)."""
        changing = range(first_epoch, min(epochs, self.end_epoch + 1))  # after E2 the size stays END
        tail = [self.end] if epochs > max(first_epoch, self.end_epoch + 1) else []
        return list(dict.fromkeys([*(self.at(e) for e in changing), *tail]))

    def check_epochs(self, epochs: int) -> None:
        """UserError when a run of ``epochs`` epochs (0 .. epochs-1) would end before reaching END."""
        if self.end_epoch > epochs - 1 and self.at(epochs - 1) != self.end:
            raise UserError(f"resolution schedule {self}: E2={self.end_epoch} is past the last epoch "
                            f"({epochs - 1} of --epochs {epochs}), so the run never trains at {self.end}; "
                            f"lower E2 or raise --epochs")

    def __str__(self) -> str:
        return f"{self.start}:{self.end}:{self.start_epoch}:{self.end_epoch}"


def peak_lr(lr: float, lr_per_256: float | None, global_batch: int) -> float:
    """The peak rate: ``--lr`` is for the global batch (the seed's meaning); ``--lr_per_256`` scales with it."""
    return lr if lr_per_256 is None else lr_per_256 * global_batch / 256


def describe_lr(lr: float, lr_per_256: float | None, batch_size: int, world_size: int, accum_steps: int = 1,
                opt: str = "sgd", lr_schedule: str = "cosine") -> str:
    """The start-up line on the learning rate, saying plainly when --lr is far from the linear-scaling rule
    (Goyal et al. 2017: 0.1 per 256 images), e.g. the seed's 4-GPU command trains a 1024 batch at 0.1. The global
    batch is what one optimizer step sees: batch x processes x --accum_steps. The rule is SGD's: LARS and LAMB
    rates are on another scale (their update is rescaled per layer), so for them the line only states the rate."""
    global_batch = batch_size * world_size * accum_steps
    accumulated = f" x {accum_steps} accumulated batches" if accum_steps > 1 else ""
    head = f"global batch {global_batch} ({world_size} process(es) x {batch_size}{accumulated}); "
    how = "" if (opt, lr_schedule) == ("sgd", "cosine") else f"; {opt} with {lr_schedule} decay"
    if lr_per_256 is not None:
        return head + (f"peak lr {peak_lr(lr, lr_per_256, global_batch):.4g} (--lr_per_256 {lr_per_256} x "
                       f"{global_batch}/256){how}")
    rule = 0.1 * global_batch / 256
    note = "" if opt != "sgd" or math.isclose(lr, rule, rel_tol=0.01) else (
        f"; the linear-scaling rule would give {rule:.4g} (--lr_per_256 0.1): --lr {lr} is {lr / rule:.2g}x that")
    return head + f"peak lr {lr:.4g} (--lr, for the global batch){note}{how}"


def final_size(target_size: int, res_schedule: str | None) -> int:
    """The last training resolution: the schedule's END, else --target_size."""
    return ResolutionSchedule.parse(res_schedule).end if res_schedule else target_size


def validation_size(target_size: int, res_schedule: str | None, val_target_size: int | None) -> int:
    """The resolution a run validates at: --val_target_size, else the last training resolution."""
    return val_target_size or final_size(target_size, res_schedule)
