"""Seed entry point: the names of the seed's `data_with_aug.py`, as thin wrappers over the rectrain package.

    from data_with_aug import (AugmentationConfig, apply_augmentations, mixup_criterion, RectangularCropTfm,
                               AspectRatioBatchSampler, DistributedBatchSampler, sort_ar, map_idx2ar)

`python data_with_aug.py` runs a self-test: it writes a small synthetic dataset to a temporary folder,
loads a few rectangular batches, applies the batch augmentations, and prints shapes, the bucket table
and timings. It exits non-zero on any failure.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch

from rectrain.data.buckets import make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.samplers import AspectRatioBatchSampler, DistributedBatchSampler
from rectrain.data.source import scan_split
from rectrain.data.transforms import RectangularCropTfm
from rectrain.training.augment import AugmentationConfig, BatchAugment, apply_augmentations
from rectrain.training.losses import augmented_loss, mixup_criterion
from rectrain.training.step import DeviceNormalize

__all__ = ["AugmentationConfig", "apply_augmentations", "mixup_criterion", "RectangularCropTfm",
           "AspectRatioBatchSampler", "DistributedBatchSampler", "sort_ar", "map_idx2ar"]


def sort_ar(data_dir: str, split: str = "train") -> np.ndarray:
    """The seed's ``sort_ar``: (N, 2) float64 rows ``[sample_index, aspect_ratio W/H]`` sorted by ratio.

    Sizes come from the scan cache (``sorted_idxar_{split}.npz`` beside the data, rebuilt automatically
    when the folder changes; never a pickle).
    """
    scan = scan_split(data_dir, split)
    ratios = scan.sizes[:, 1] / scan.sizes[:, 0]
    order = np.argsort(ratios, kind="stable")
    return np.stack([order.astype(np.float64), ratios[order]], axis=1)


def map_idx2ar(sorted_idxar: np.ndarray, batch_size: int) -> np.ndarray:
    """The seed's ``map_idx2ar``: cut the sorted list into batches and give every image its batch's mean
    ratio. Returns an (N,) array indexed by sample index (``idx2ar[i]`` works as the seed's dict did)."""
    idx = sorted_idxar[:, 0].astype(np.int64)
    ratios = sorted_idxar[:, 1]
    out = np.empty(len(idx), dtype=np.float64)
    for start in range(0, len(idx), batch_size):
        out[idx[start:start + batch_size]] = ratios[start:start + batch_size].mean()
    return out


def self_test() -> int:
    from rectrain.data.synth import make_synthetic

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_synthetic(tmp, classes=4, train_per_class=24, val_per_class=4, kind="tiny", seed=0)
        print(f"synthetic dataset: 4 classes, 96 train / 16 val images in {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        scan = scan_split(tmp, "train")
        idxar = sort_ar(tmp, "train")
        idx2ar = map_idx2ar(idxar, batch_size=16)
        print(f"scan: {len(scan.index)} images in {time.perf_counter() - t:.2f} s; ratios "
              f"{idxar[0, 1]:.2f} .. {idxar[-1, 1]:.2f}; {len(np.unique(idx2ar))} seed-style batch ratios")
        buckets = make_buckets(64)
        ids = buckets.assign(scan.sizes)
        print("bucket table (H x W: images):")
        for k, (h, w) in enumerate(buckets.shapes):
            if (ids == k).any():
                print(f"  {h:4d} x {w:<4d} {int((ids == k).sum()):4d}")
        loaders = build_loaders(scan, None, buckets, LoaderSettings(batch_size=8, workers=0, seed=0))
        normalize = DeviceNormalize("cpu")
        augment = BatchAugment(AugmentationConfig(batch_aug_prob=1.0), seed=0)
        shapes = set()
        t = time.perf_counter()
        for i, (images, labels, failed) in enumerate(loaders.train):
            if images.dtype != torch.uint8 or images.shape[-1] != 3 or failed:
                print(f"FAIL: batch {i}: dtype {images.dtype}, shape {tuple(images.shape)}, failed {failed}")
                return 1
            x, y = normalize(images, labels)
            x, ya, yb, lam = augment(x, y)
            loss = augmented_loss(torch.randn(len(y), 4), ya, yb, lam, 0.1)
            shapes.add(tuple(x.shape[-2:]))
            print(f"  batch {i}: uint8 {tuple(images.shape)} -> {tuple(x.shape)} {x.dtype}, "
                  f"lam {'-' if lam is None else f'{lam:.3f}'}, loss {loss.item():.3f}")
            if not torch.isfinite(x).all() or not torch.isfinite(loss):
                print("FAIL: non-finite values after augmentation")
                return 1
            if i == 4:
                break
        print(f"{i + 1} batches of shapes {sorted(shapes)} in {time.perf_counter() - t:.2f} s")
    print(f"data_with_aug self-test passed in {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(self_test())
