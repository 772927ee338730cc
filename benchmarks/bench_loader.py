"""Loader throughput: rectrain's training loader against the standard per-image pipeline, side by side.

The standard pipeline is what torchvision's ImageNet reference does per image (``rectrain.commands.bench.standard``):
full JPEG decode with PIL, RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3, bilinear), random flip,
ToTensor (float32), Normalize. It uses torchvision when installed and an exact PIL/numpy re-implementation
otherwise.
rectrain's loader: header-cached sizes, bucketed rectangular crops chosen before decoding (DCT-scaled
JPEG decode when the crop allows), uint8 output; normalisation happens later on the device.

Both run through a DataLoader with the same number of workers over the same files. Per-core figures
use one worker. Usage:

    python benchmarks/bench_loader.py                       # generates 1,000 ImageNet-like JPEGs
    python benchmarks/bench_loader.py --data_dir /data/imagenet --workers 8 --batches 100
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rectrain.commands.bench.standard import StandardDataset, standard_transform  # noqa: E402
from rectrain.data.buckets import make_buckets  # noqa: E402
from rectrain.data.loader import LoaderSettings, build_loaders  # noqa: E402
from rectrain.data.source import scan_split  # noqa: E402


def time_loader(loader, batches: int, warmup: int) -> float:
    n, t0, it = 0, None, 0
    while True:
        for batch in loader:
            it += 1
            if it == warmup + 1:
                t0 = time.perf_counter()
            elif it > warmup + 1:
                n += batch[0].shape[0]
                if it > warmup + batches:
                    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="ImageFolder root with train/ (default: generate ImageNet-like JPEGs)")
    p.add_argument("--images", type=int, default=1000, help="images to generate when --data_dir is not given")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for both pipelines (1 = per core)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target_size", type=int, default=224)
    args = p.parse_args()

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        from rectrain.data.synth import make_synthetic
        tmp = tempfile.TemporaryDirectory()
        data_dir = tmp.name
        classes = 10
        make_synthetic(data_dir, classes=classes, train_per_class=max(1, args.images // classes), val_per_class=0,
                       kind="imagenet", seed=0)
    scan = scan_split(data_dir, "train")
    files = [os.path.join(scan.index.split_dir, str(p)) for p in scan.index.paths]
    transform, std_name = standard_transform(args.target_size)
    std_loader = torch.utils.data.DataLoader(StandardDataset(files, scan.index.labels, transform),
                                             batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                             persistent_workers=args.workers > 0, drop_last=True)
    def ours(decoder):
        return build_loaders(scan, None, make_buckets(args.target_size),
                             LoaderSettings(batch_size=args.batch_size, workers=args.workers, decoder=decoder)).train

    from rectrain.data import transforms
    decoders = ["pil"] + [d for d in ("opencv", "turbo") if transforms.decoder_problem(d) is None]
    torch.set_num_threads(1)
    std_ips = time_loader(std_loader, args.batches, args.warmup)
    our_ips = {d: time_loader(ours(d), args.batches, args.warmup) for d in decoders}
    mean_px = scan.sizes.astype(np.float64).prod(axis=1).mean()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"data: {len(files)} JPEGs from {'--data_dir ' + args.data_dir if args.data_dir else 'rectrain synth --kind imagenet'}"
          f", mean {mean_px / 1e3:.0f} kpixels; workers {args.workers}, batch {args.batch_size}, "
          f"{args.batches} timed batches")
    print(f"{'pipeline':<64} {'images/s':>10} {'per worker':>11} {'ratio':>6}")
    w = max(args.workers, 1)
    print(f"{'standard (' + std_name + f' RRC{args.target_size} + ToTensor + Normalize)':<64} {std_ips:>10.1f} {std_ips / w:>11.1f} "
          f"{1:>6.2f}")
    for d, ips in our_ips.items():
        label = f"rectrain, {d} decoder (bucketed rect crops, uint8, DCT-scaled decode)"
        print(f"{label:<64} {ips:>10.1f} {ips / w:>11.1f} {ips / std_ips:>6.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
