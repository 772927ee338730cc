"""Learning-rate schedule: linear warm-up, then cosine decay, as a pure function of the step.

Stepped per iteration, not per epoch (Goyal et al. 2017 warm-up; Loshchilov & Hutter 2017 cosine).
Pure, so resume needs no scheduler state: the step count is enough.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly from base_lr/warmup_steps at step 0 to base_lr at step warmup_steps - 1, so
    the first step already moves; then cosine from base_lr down to min_lr at the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    step = min(max(step, 0), total_steps - 1)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / max(decay_steps - 1, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
