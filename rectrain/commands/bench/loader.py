"""`rectrain bench loader`: decoded images/s of the training loader, end to end from the files.

Iterates the real training DataLoader (scan cache, buckets, sampler, workers decoding and cropping to
uint8) after a warm-up, and reports images/s; `--json` prints one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from rectrain.commands.bench import BENCHES
from rectrain.commands.bench.common import cpu_cores
from rectrain.data.buckets import RECT_MODES, make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.source import scan_split
from rectrain.errors import UserError

HELP = BENCHES["loader"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", required=True, help="dataset root holding train/<class>/<images>")
    p.add_argument("--workers", type=int, default=cpu_cores(), help="DataLoader worker processes")
    p.add_argument("--batch_size", type=int, default=256, help="images per batch")
    p.add_argument("--target_size", type=int, default=224, help="crop short side (short_side mode)")
    p.add_argument("--rect_mode", choices=list(RECT_MODES), default="short_side", help="bucket shapes")
    p.add_argument("--batches", type=int, default=None,
                   help="batches to time after the warm-up (default: 10 per worker + 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="batches to skip before timing (default: 4 per worker + 2, i.e. worker start-up and the "
                        "batches the workers prefetched, which would otherwise inflate the figure)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--decoder", choices=["auto", "turbo", "opencv", "pil"], default="auto", help="JPEG decoder in the workers")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def measure_loader(data_dir: str, workers: int, batch_size: int, target_size: int, batches: int, warmup: int,
                   rect_mode: str = "short_side", seed: int = 0, decoder: str = "auto") -> dict:
    if batches < 1 or warmup < 0 or workers < 0:
        raise UserError("--batches must be >= 1, --warmup and --workers >= 0")
    scan = scan_split(data_dir, "train")
    buckets = make_buckets(target_size, rect_mode)
    loaders = build_loaders(scan, None, buckets, LoaderSettings(batch_size=batch_size, workers=workers, seed=seed,
                                                                decoder=decoder))
    images = timed_batches = 0
    t0 = None
    epoch = 0
    while timed_batches < batches:
        loaders.train_sampler.set_epoch(epoch)
        for i, (x, _y, _failed) in enumerate(loaders.train):
            if t0 is None and i >= min(warmup, len(loaders.train) - 1):
                t0 = time.perf_counter()
                continue
            if t0 is not None:
                images += x.shape[0]
                timed_batches += 1
                if timed_batches >= batches:
                    break
        epoch += 1
    dt = time.perf_counter() - t0
    return {"images_per_sec": images / dt, "images": images, "seconds": dt, "workers": workers,
            "batch_size": batch_size, "target_size": target_size, "rect_mode": rect_mode, "decoder": decoder,
            "cpu": platform.processor() or platform.machine(), "cores": cpu_cores(),
            "torch": torch.__version__}


def run(args: argparse.Namespace) -> int:
    w = max(args.workers, 1)
    batches = args.batches if args.batches is not None else 10 * w + 20
    warmup = args.warmup if args.warmup is not None else 4 * w + 2  # DataLoader prefetch_factor is 4
    res = measure_loader(args.data_dir, args.workers, args.batch_size, args.target_size, batches,
                         warmup, args.rect_mode, args.seed, args.decoder)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"loader: {res['images_per_sec']:.1f} images/s ({res['images']} images in {res['seconds']:.2f} s, "
              f"{res['workers']} workers, batch {res['batch_size']}, target {res['target_size']}, {res['rect_mode']})")
    return 0
