"""Aspect-ratio buckets: a small fixed set of (H, W) batch shapes, multiples of 32.

Every image is mapped to the bucket whose ratio W/H is nearest to its own (in log space), and
every batch is drawn from one bucket. A fixed, small set of shapes (at most ``2 * per_side + 1``,
15 by default) keeps cuDNN autotuning and ``torch.compile`` to a handful of shapes per epoch,
where the seed's sorted chunks produced a new shape for almost every batch.

Two modes:
- ``short_side`` (the seed's meaning, default): the shorter side equals ``target_size``, the
  longer one follows the bucket's ratio. A 2:1 image costs twice a square one.
- ``area``: H*W is close to ``target_size**2`` and the ratio is kept: the same compute per image
  as square crops, with the shape of the photo.

Images whose ratio lies beyond ``max_ratio`` (either way) go to the most extreme bucket and are
cropped to its ratio by the transform ("clamped by cropping").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BucketTable", "make_buckets", "RECT_MODES"]

RECT_MODES = ("short_side", "area")
MULTIPLE = 32  # ResNet's total stride: every feature map keeps an integer size


def _round_to(x: float, multiple: int = MULTIPLE) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


@dataclass(frozen=True)
class BucketTable:
    """Bucket shapes, sorted by ratio W/H (portrait first)."""

    shapes: np.ndarray  # (K, 2) int64, (H, W), multiples of 32
    target_size: int
    mode: str
    max_ratio: float

    def __post_init__(self):
        if self.shapes.ndim != 2 or self.shapes.shape[1] != 2 or len(self.shapes) == 0:
            raise ValueError(f"shapes must be a non-empty (K, 2) array, got {self.shapes.shape}")

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def ratios(self) -> np.ndarray:
        """(K,) float64, W/H of each bucket."""
        return self.shapes[:, 1] / self.shapes[:, 0]

    def shape(self, bucket: int) -> tuple[int, int]:
        h, w = self.shapes[bucket]
        return int(h), int(w)

    def assign(self, sizes: np.ndarray) -> np.ndarray:
        """Bucket id for each image. ``sizes`` is (N, 2) (H, W) after EXIF orientation -> (N,) int64."""
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        if len(sizes) == 0:
            return np.zeros(0, dtype=np.int64)
        log_r = np.log(sizes[:, 1] / np.maximum(sizes[:, 0], 1.0))
        lim = math.log(self.max_ratio)
        log_r = np.clip(log_r, -lim, lim)
        bucket_log = np.log(self.ratios)
        # Buckets are sorted by ratio: nearest neighbour in log space via searchsorted.
        hi = np.clip(np.searchsorted(bucket_log, log_r), 1, len(bucket_log) - 1) if len(self) > 1 else None
        if hi is None:
            return np.zeros(len(sizes), dtype=np.int64)
        lo = hi - 1
        pick_hi = np.abs(bucket_log[hi] - log_r) < np.abs(log_r - bucket_log[lo])
        return np.where(pick_hi, hi, lo).astype(np.int64)

    def describe(self) -> str:
        return ", ".join(f"{h}x{w}" for h, w in self.shapes)

    def scaled(self, size: int) -> np.ndarray:
        """(K, 2) shapes of the same buckets at resolution ``size`` instead of ``target_size`` (progressive
        resolution): each side scaled by size/target_size and rounded to a multiple of 32. Bucket ids stay
        those of this table, so the sampler's batches do not depend on the resolution."""
        if size == self.target_size:
            return self.shapes
        return np.array([[_round_to(h * size / self.target_size), _round_to(w * size / self.target_size)]
                         for h, w in self.shapes], dtype=np.int64)


def make_buckets(target_size: int = 224, mode: str = "short_side", max_ratio: float = 2.0,
                 per_side: int = 7) -> BucketTable:
    """Build the bucket table.

    Ratios are spaced evenly in log space from ``1/max_ratio`` to ``max_ratio`` with ``per_side``
    steps on each side of 1:1; each is turned into a shape rounded to multiples of 32, and
    duplicate shapes are merged. ``target_size`` itself is rounded to a multiple of 32.
    """
    if mode not in RECT_MODES:
        raise ValueError(f"rect mode must be one of {RECT_MODES}, got {mode!r}")
    if target_size < MULTIPLE:
        raise ValueError(f"target_size must be at least {MULTIPLE}, got {target_size}")
    if not max_ratio >= 1.0:
        raise ValueError(f"max_ratio must be >= 1 (e.g. 2.0 for 1:2 .. 2:1), got {max_ratio}")
    if per_side < 0:
        raise ValueError(f"per_side must be >= 0, got {per_side}")
    t = _round_to(target_size)
    steps = np.arange(-per_side, per_side + 1) / max(per_side, 1)
    ratios = np.exp(steps * math.log(max_ratio)) if per_side else np.ones(1)
    shapes = set()
    for r in ratios:  # r = W / H
        if mode == "short_side":
            h, w = (t, _round_to(t * r)) if r >= 1 else (_round_to(t / r), t)
        else:
            h, w = _round_to(t / math.sqrt(r)), _round_to(t * math.sqrt(r))
        shapes.add((h, w))
    ordered = sorted(shapes, key=lambda s: (s[1] / s[0], s[0]))
    return BucketTable(np.array(ordered, dtype=np.int64), target_size=t, mode=mode, max_ratio=float(max_ratio))
