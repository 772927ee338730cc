"""`rectrain scan`: build or refresh the aspect-ratio cache of an image folder and report what it holds: counts,
skipped and bad files, the histogram of aspect ratios and the bucket table with the batches it gives."""

from __future__ import annotations

import os

import numpy as np

from rectrain.data.buckets import RECT_MODES, make_buckets
from rectrain.data.index import class_names, describe_skipped
from rectrain.data.samplers import AspectRatioBatchSampler
from rectrain.data.scan import DEFAULT_MAX_PIXELS, SplitScan, data_notes
from rectrain.data.source import scan_split
from rectrain.data.shards import is_shards, split_exists
from rectrain.errors import UserError

RATIO_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.97, 1.03, 1.25, 1.43, 1.67, 2.0, float("inf"))  # W/H


def add_arguments(p) -> None:
    p.add_argument("--data_dir", required=True, help="ImageNet-style folder: DATA_DIR/{train,val}/<class>/<images>; "
                   "or tar shards (a folder of *.tar, a brace pattern, a list file): indexes them")
    p.add_argument("--split", choices=("train", "val", "both"), default=None,
                   help="split to scan (default: both when DATA_DIR/val exists, else train)")
    p.add_argument("--target_size", type=int, default=224, help="bucket size in pixels (see --rect_mode)")
    p.add_argument("--batch_size", type=int, default=256,
                   help="images per batch per process, as in training: the bucket table shows the batches it gives")
    p.add_argument("--rect_mode", choices=RECT_MODES, default="short_side",
                   help="short_side: shorter side = target_size; area: H*W ~ target_size^2")
    p.add_argument("--max_ratio", type=float, default=2.0, help="ratios beyond this (either way) are cropped")
    p.add_argument("--workers", type=int, default=None, help="scan processes (default: one per core)")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are rejected as decompression bombs")


def ratio_histogram(sizes: np.ndarray, width: int = 40) -> list[str]:
    """Text histogram of W/H over ``RATIO_EDGES``, one line per non-empty bin."""
    ratios = sizes[:, 1] / np.maximum(sizes[:, 0], 1)
    counts, _ = np.histogram(ratios, bins=np.array(RATIO_EDGES))
    top = max(int(counts.max()), 1)
    lines = []
    for lo, hi, c in zip(RATIO_EDGES[:-1], RATIO_EDGES[1:], counts):
        if c:
            label = f"< {hi:.2f}" if lo == 0 else (f">= {lo:.2f}" if hi == float("inf") else f"{lo:.2f}-{hi:.2f}")
            lines.append(f"  {label:>11}  {int(c):>9,}  {'#' * max(1, round(width * c / top))}")
    return lines


def bucket_batches(n: int, batch_size: int, train: bool = True) -> list[int]:
    """Sizes of the batches a bucket of ``n`` images gives per epoch (one process).

    Training, the sampler's own rule (``AspectRatioBatchSampler``, drop_last): full batches, the leftover dropped
    (different images each epoch); a bucket without a full batch gives one smaller batch (none for a single image:
    a batch of one breaks BatchNorm's statistics). Validation (``train=False``) scores every image: the last batch
    of a bucket may be smaller, down to one image (the model is in eval mode there).
    """
    if not n:
        return []
    return AspectRatioBatchSampler(np.zeros(n, dtype=np.int64), batch_size).batch_sizes(drop_last=train)


def _bucket_note(n: int, sizes: list[int], batch_size: int, train: bool = True) -> str:
    if n == 0 or not train:
        return ""
    if n == 1:
        return "(a single image: unused, a batch of one breaks BatchNorm)"
    if n < batch_size:
        return f"(fewer images than --batch_size: one smaller batch of {n})"
    left = n - sum(sizes)
    return f"({left:,} left over per epoch, different ones each epoch)" if left else ""


def bucket_lines(sizes: np.ndarray, buckets, batch_size: int, train: bool = True) -> list[str]:
    """The bucket table: images per bucket and the training (or, ``train=False``, validation) batches they give at
    ``batch_size``."""
    counts = np.bincount(buckets.assign(sizes), minlength=len(buckets))
    lines = [f"  {'shape HxW':>10}  {'W/H':>5}  {'images':>9}  {'batches':>8}"]
    n_batches = used = 0
    for k, c in enumerate(counts.tolist()):
        h, w = buckets.shape(k)
        plan = bucket_batches(c, batch_size, train)
        n_batches += len(plan)
        used += sum(plan)
        note = _bucket_note(c, plan, batch_size, train)
        lines.append(f"  {f'{h}x{w}':>10}  {w / h:5.2f}  {c:>9,}  {len(plan):>8,}  {note}".rstrip())
    total = int(counts.sum())
    if not train:
        lines.append(f"  {'total':>10}  {'':>5}  {total:>9,}  {n_batches:>8,}  (batches of up to {batch_size} for one "
                     "process; validation scores every image, as eval does)")
        return lines
    lines.append(f"  {'total':>10}  {'':>5}  {total:>9,}  {n_batches:>8,}  (batches of up to {batch_size} per epoch "
                 f"for one process; {used:,} images used, {total - used:,} left over)")
    small = [c for c in counts.tolist() if 0 < c < batch_size]
    if small and len(small) == np.count_nonzero(counts):
        lines.append(f"  note: every bucket holds fewer images than --batch_size {batch_size} (the largest {max(small):,}), "
                     f"so each gives one smaller batch; pass the --batch_size you will train with")
    return lines


def _report(name: str, scan: SplitScan, buckets, batch_size: int) -> None:
    ix = scan.index
    print(f"== {name}: {ix.split_dir}")
    print(f"images: {len(ix):,} usable in {len(ix.classes):,} classes "
          f"({len(np.unique(ix.labels)):,} with images)")
    skipped = describe_skipped(ix)
    print("skipped: " + ("none" if not skipped else f"{sum(ix.skipped.values()):,}"))
    for line in skipped:
        print(f"  {line}")
    print(f"bad files: {len(scan.bad):,}")
    for path, reason in scan.bad[:50]:
        print(f"  {path}: {reason}")
    if len(scan.bad) > 50:
        print(f"  ... and {len(scan.bad) - 50:,} more")
    print("aspect ratio W/H:")
    print("\n".join(ratio_histogram(scan.sizes)))
    print(f"buckets ({buckets.mode}, target {buckets.target_size}, max ratio {buckets.max_ratio:g}):")
    print("\n".join(bucket_lines(scan.sizes, buckets, batch_size, train=name == "train")))
    what = "index" if ix.members is not None else "cache"  # shards: their index plays the cache's part
    origin = f"read from {what}" if scan.from_cache else f"scanned; {what} written" if scan.cache_path else \
        f"scanned; no writable place for a{'n' if what == 'index' else ''} {what}"
    print(f"{what}: {scan.cache_path or '-'} ({origin})")
    print(f"time: {scan.seconds:.2f} s")


def run(args) -> int:
    if args.batch_size < 1 or args.target_size < 32 or args.max_ratio < 1:
        raise UserError("--batch_size must be >= 1, --target_size >= 32 and --max_ratio >= 1")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    shards = is_shards(args.data_dir)
    split = args.split or ("both" if split_exists(args.data_dir, "val") else "train")
    buckets = make_buckets(args.target_size, args.rect_mode, args.max_ratio)
    kw = dict(workers=args.workers, max_pixels=args.max_pixels, progress=True)
    classes = train = val = None
    if split in ("train", "both"):
        train = scan_split(args.data_dir, "train", **kw)
        classes = train.index.classes
        _report("train", train, buckets, args.batch_size)
    if split in ("val", "both"):
        if classes is None and not shards and os.path.isdir(os.path.join(args.data_dir, "train")):
            classes = class_names(args.data_dir, "train")  # val shares train's class map
        val = scan_split(args.data_dir, "val", classes, **kw)
        _report("val", val, buckets, args.batch_size)
    notes = data_notes(train, val, skipped=False)
    if notes:
        print("== notes")
        print("\n".join(notes))
    return 0
