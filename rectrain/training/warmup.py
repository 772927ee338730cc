"""Warm-up before the first epoch: every batch shape the run will use, run once before the clock starts.

Bucketed batches come in a handful of fixed shapes. Each new shape costs once: a cuDNN autotuning pass
(``cudnn.benchmark``, ~90 s for 13 ResNet-50 shapes on an H100) and, with ``--compile``, a graph to
compile (forward and backward). Running every training shape (forward + backward) and every validation
shape (forward, eval mode) here keeps that cost out of epoch 1's images/s, reports it apart
(``warmup_s``), and surfaces an out-of-memory at the largest shape before any data is read.

Nothing a run would notice changes: BatchNorm buffers are restored afterwards, gradients are dropped,
the optimizer is not stepped and no random generator is drawn from. Under DDP every rank warms the same
shapes in the same order (the backward passes all-reduce), so the collectives match.
"""

from __future__ import annotations

import time

import numpy as np
import torch

Shape = tuple[int, int, int]  # (batch, height, width)


def batch_shapes(batches, bucket_ids: np.ndarray, table: np.ndarray) -> list[Shape]:
    """The distinct (B, H, W) of ``batches`` (lists of dataset indices), largest pixel count first."""
    seen = {(len(b), *map(int, table[bucket_ids[b[0]]])) for b in batches if len(b)}
    return sorted(seen, key=lambda s: (-s[0] * s[1] * s[2], s))


def plan_shapes(train_batches, train_ids: np.ndarray, train_tables: list[np.ndarray], val, val_pad: int | None
                ) -> tuple[list[Shape], list[Shape]]:
    """(training shapes, validation shapes) a run will use.

    Training: ``train_batches`` are all ranks' batches of one epoch (every rank warms the same list, so DDP's
    collectives match; batch sizes depend only on bucket counts, so any epoch tells), in each of the epochs'
    shape ``train_tables`` (one per resolution with --res_schedule). Validation: ``val`` is None or (this rank's
    batches, bucket ids, shape table); with ``val_pad`` every batch counts as full (one shape per bucket).
    """
    train = {s for table in {t.tobytes(): t for t in train_tables}.values()
             for s in batch_shapes(train_batches, train_ids, table)}
    train = sorted(train, key=lambda s: (-s[0] * s[1] * s[2], s))
    if val is None:
        return train, []
    batches, ids, table = val
    if val_pad:
        batches = [[b[0]] * val_pad for b in batches if len(b)]
    return train, batch_shapes(batches, ids, table)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (0 without compile)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # a torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def warm_up(train_model: torch.nn.Module, eval_model: torch.nn.Module, train_shapes: list[Shape],
            val_shapes: list[Shape], *, autocast, channels_last: bool, device: torch.device, log=print) -> float:
    """Run every shape once; returns the seconds it took (device work included)."""
    t0 = time.perf_counter()
    buffers = [b for b in train_model.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        train_model.train()
        for shape in train_shapes:
            _forward(train_model, shape, autocast, channels_last, device).float().sum().backward()
            for p in train_model.parameters():
                p.grad = None
        eval_model.eval()
        with torch.no_grad():
            for shape in val_shapes:
                _forward(eval_model, shape, autocast, channels_last, device)
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        train_model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the cost of the warm-up, not queued work, belongs to warmup_s
    seconds = time.perf_counter() - t0
    log(f"warm-up: {len(train_shapes)} training and {len(val_shapes)} validation batch shapes in {seconds:.1f} s "
        "(autotuning/compilation, not counted in images/s)")
    return seconds


def _forward(model, shape: Shape, autocast, channels_last: bool, device: torch.device) -> torch.Tensor:
    b, h, w = shape
    x = torch.zeros(b, 3, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast():
        return model(x)
