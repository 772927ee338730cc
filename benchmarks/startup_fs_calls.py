"""Filesystem calls per rank at a training run's start-up, for an ImageNet-sized dataset as a folder and as shards.

What is measured: the data part of a start-up whose scan cache (folder) or index (shards) is already fresh, i.e.
every start after the first: rank 0's ``scan_split`` and what each other rank does. Before issue 17 every other
rank called ``scan_split`` too, which lists every class folder and stats every image to check the cache's
fingerprint; now they load the file rank 0 names (``rectrain.data.source.load_scan``). Counts are real system calls,
traced with ``strace -f`` between two marker calls, in one process per role; a world of W ranks is rank 0 plus
W - 1 others.

The data is synthetic, as big as ImageNet's train split: a folder of 1,000 class folders with 1,281,167 empty files
(the cache of their "scan" written directly, with made-up sizes), and 1,024 sparse shard files (no disk space) with
an index of 1,281,167 entries. Needs ``strace``, about 1.3 million inodes and a few minutes (creating the files).

    python benchmarks/startup_fs_calls.py --images 1281167 --worlds 8,64
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BEGIN, END = "/.rectrain-startup-begin", "/.rectrain-startup-end"
METADATA = {"stat", "lstat", "fstat", "newfstatat", "statx", "fstatat64", "access", "faccessat", "faccessat2",
            "openat", "open", "getdents64", "getdents", "readlink", "readlinkat"}
READS = {"read", "pread64", "readv", "preadv"}
CLASSES, SHARDS = 1000, 1024


def make_folder(root: str, images: int) -> str:
    """DATA/train/cXXXX/N.JPEG, empty files, and a fresh scan cache for them in the run folder."""
    from rectrain.data.index import list_files
    from rectrain.data.scan import SplitScan, _cache_candidates, _save_cache, fingerprint
    data = os.path.join(root, "folder")
    per = -(-images // CLASSES)
    n = 0
    for c in range(CLASSES):
        d = os.path.join(data, "train", f"n{c:08d}")
        os.makedirs(d)
        for i in range(min(per, images - n)):
            os.close(os.open(os.path.join(d, f"n{c:08d}_{i}.JPEG"), os.O_CREAT | os.O_WRONLY, 0o644))
        n += min(per, images - n)
    files = list_files(data, "train")
    fp = fingerprint(files, 178_956_970)
    sizes = np.tile(np.array([[375, 500]], np.int32), (len(files.index), 1))
    scan = SplitScan(files.index, sizes, [], None, False, 0.0)
    run_dir = os.path.join(root, "run")
    os.makedirs(run_dir)
    _save_cache(_cache_candidates(data, "train", run_dir), fp, scan, np.ones(len(files.index), bool))
    return data


def make_shards(root: str, images: int) -> str:
    """SHARDS/imagenet1k-train-NNNN.tar (sparse, ~140 MB each) and a fresh index of ``images`` entries."""
    from rectrain.data.shard_index import write_index
    data = os.path.join(root, "shards")
    os.makedirs(data)
    names = [f"imagenet1k-train-{s:04d}.tar" for s in range(SHARDS)]
    for name in names:
        with open(os.path.join(data, name), "wb") as f:
            f.truncate(140_000_000)
    stats = [os.stat(os.path.join(data, n)) for n in names]
    shard = (np.arange(images) * SHARDS // images).astype(np.int32)
    keys = np.array([f"n{i % CLASSES:08d}_{i}".encode() for i in range(images)], dtype=bytes)
    arrays = dict(keys=keys, shard=shard, offset=np.arange(images, dtype=np.int64) * 1024,
                  nbytes=np.full(images, 110_000, np.int64), sizes=np.tile(np.array([[375, 500]], np.int32),
                                                                           (images, 1)),
                  labels=(np.arange(images) % CLASSES).astype(np.int64), bad_names=np.array([], dtype=str),
                  bad_reasons=np.array([], dtype=str), shard_total=np.array([s.st_size for s in stats], np.int64))
    write_index(os.path.join(data, "train.index.npz"), arrays, names, arrays["shard_total"],
                np.array([s.st_mtime_ns for s in stats], np.int64), 178_956_970)
    return data


ROLE = r"""
import os, sys
sys.path.insert(0, {root!r})
from rectrain.data.source import load_scan, scan_split
role, data, run_dir = {role!r}, {data!r}, {run_dir!r}
if role != "rank0":
    ref = scan_split(data, "train", cache_dir=run_dir)  # rank 0's answer, broadcast in a real run (not traced)
os.path.exists({begin!r})  # the marker: one stat the trace shows
if role in ("rank0", "other_before"):
    scan = scan_split(data, "train", cache_dir=run_dir)
else:
    scan = load_scan(ref.cache_path, ref.fingerprint, data, "train")
assert scan is not None and scan.from_cache and len(scan.index) > 0
os.path.exists({end!r})
print(len(scan.index))
"""


def count(role: str, data: str, run_dir: str) -> tuple[Counter, float]:
    """System calls between the markers of one process playing ``role``; and its seconds (traced: slower)."""
    code = ROLE.format(root=ROOT, role=role, data=data, run_dir=run_dir, begin=BEGIN, end=END)
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        t0 = time.perf_counter()
        subprocess.run(["strace", "-f", "-qq", "-o", log.name, sys.executable, "-c", code], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        calls, inside = Counter(), False
        for line in log:
            if BEGIN in line:
                inside = True
            elif END in line:
                break
            elif inside:
                m = re.match(r"(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\(", line)
                if m:
                    calls[m.group(1)] += 1
    return calls, seconds


def summarise(calls: Counter) -> tuple[int, int, int]:
    meta = sum(n for c, n in calls.items() if c in METADATA)
    reads = sum(n for c, n in calls.items() if c in READS)
    return meta, reads, sum(calls.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1_281_167)
    p.add_argument("--worlds", default="8,64")
    p.add_argument("--keep", help="build the data in this folder and keep it (default: a temporary folder)")
    args = p.parse_args()
    if shutil.which("strace") is None:
        sys.exit("needs strace (apt-get install strace)")
    worlds = [int(w) for w in args.worlds.split(",")]
    root = args.keep or tempfile.mkdtemp(prefix="rectrain-fs-")
    try:
        t0 = time.perf_counter()
        folder, shards = make_folder(root, args.images), make_shards(root, args.images)
        print(f"built {args.images:,} files and {SHARDS} shards in {time.perf_counter() - t0:.0f} s", flush=True)
        run_dir = os.path.join(root, "run")
        rows = []
        for data_name, data in (("folder", folder), ("shards", shards)):
            for role in ("rank0", "other_before", "other_now"):
                calls, seconds = count(role, data, run_dir)
                rows.append((data_name, role, *summarise(calls), seconds, calls))
        print(f"\nsystem calls per rank at start-up, {args.images:,} images (fresh cache/index), strace -f")
        print(f"{'data':<7} {'rank':<22} {'metadata':>10} {'reads':>8} {'all':>10}  top calls")
        label = {"rank0": "rank 0", "other_before": "each other, scanning", "other_now": "each other, loading"}
        for data_name, role, meta, reads, total, _s, calls in rows:
            top = ", ".join(f"{c} {n:,}" for c, n in calls.most_common(3))
            print(f"{data_name:<7} {label[role]:<22} {meta:>10,} {reads:>8,} {total:>10,}  {top}")
        print("\n(scanning: what every rank did before issue 17; loading: the file rank 0 names, now)")
        print("\nmetadata calls (stat, open, getdents) of the whole job at start-up:")
        print(f"{'data':<7} {'':<10}" + "".join(f"{'world ' + str(w):>16}" for w in worlds))
        for data_name in ("folder", "shards"):
            r0 = next(r for r in rows if r[:2] == (data_name, "rank0"))[2]
            for role, what in (("other_before", "scanning"), ("other_now", "loading")):
                other = next(r for r in rows if r[:2] == (data_name, role))[2]
                print(f"{data_name:<7} {what:<10}" + "".join(f"{r0 + (w - 1) * other:>16,}" for w in worlds))
        import platform
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
