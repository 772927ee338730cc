"""Benchmark the aspect-ratio scan: headers/s per core (cold) and the warm start on 100k files.

    python benchmarks/bench_scan.py                       # 2,000 synthetic ImageNet-sized JPEGs
    python benchmarks/bench_scan.py --data_dir /data/imagenet --warm_files 0

Cold: every header is read (the page cache is warm for generated files, as on a second epoch of a
machine with enough RAM; a truly cold disk is slower and disk-bound). Compared: inline, a thread
pool and the process pool that ``scan_split`` uses. Warm: ``scan_split`` on an unchanged dataset,
i.e. walk + stat + fingerprint + loading the .npz cache. The 100k-file dataset is made cheaply from
hard links to a few JPEGs (headers identical, so only the warm start is timed on it).
Issue 3 targets: >= 3,000 headers/s per core cold; warm start on 100k images < 2 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from rectrain.data import scan as arscan
from rectrain.data import synth
from rectrain.data.index import list_files
from rectrain.data.scan import _read_chunk, _read_sizes
from rectrain.data.source import scan_split
from rectrain.runtime.io import usable_cores


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    import PIL
    return (f"{cpu}; {usable_cores()} usable cores; Python {platform.python_version()}; torch {tv}; "
            f"Pillow {PIL.__version__}; numpy {np.__version__}")


def _threads(index, max_pixels, workers):
    chunks = [(index.split_dir, index.paths[s:s + arscan.CHUNK].tolist(), max_pixels)
              for s in range(0, len(index), arscan.CHUNK)]
    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(_read_chunk, chunks))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cold_rows(data_dir: str, workers: int, repeats: int) -> list[tuple[str, int, float, int]]:
    """(method, workers, seconds, files) for header reading alone, then for a full cold scan_split."""
    index = list_files(data_dir, "train").index
    n, mp_ = len(index), arscan.DEFAULT_MAX_PIXELS
    rows = [("inline", 1, best_of(lambda: _read_sizes(index, mp_, 1, False), repeats), n)]
    if workers > 1:
        rows.append(("threads", workers, best_of(lambda: _threads(index, mp_, workers), repeats), n))
        old = arscan.INLINE_BELOW
        arscan.INLINE_BELOW = 0  # force the pool even for small benchmark sets
        try:
            rows.append(("processes", workers, best_of(lambda: _read_sizes(index, mp_, workers, False), repeats), n))
        finally:
            arscan.INLINE_BELOW = old

    def full_cold():
        with tempfile.TemporaryDirectory() as cache:
            real = arscan._dir_writable
            arscan._dir_writable = lambda p: p != data_dir and real(p)  # leave the user's data dir alone
            try:
                s = scan_split(data_dir, "train", cache_dir=cache, workers=workers)
            finally:
                arscan._dir_writable = real
            assert not s.from_cache
    rows.append(("scan_split cold (walk+headers+cache write)", workers, best_of(full_cold, repeats), n))
    return rows


def make_hardlink_set(src_dir: str, dst: str, files: int, classes: int = 100) -> None:
    """``files`` images in ``classes`` folders, all hard links to a few JPEGs of ``src_dir``."""
    srcs = [os.path.join(src_dir, "train", p) for p in list_files(src_dir, "train").index.paths[:16].tolist()]
    per = -(-files // classes)
    made = 0
    for c in range(classes):
        d = os.path.join(dst, "train", f"c{c:04d}")
        os.makedirs(d, exist_ok=True)
        for i in range(min(per, files - made)):
            os.link(srcs[(c + i) % len(srcs)], os.path.join(d, f"img_{i:06d}.jpg"))
        made += min(per, files - made)


def warm_row(data_dir: str, workers: int, repeats: int) -> tuple[float, float, int, int]:
    """(cold seconds, best warm-start seconds, files, cache bytes) of scan_split on ``data_dir`` (cache beside it)."""
    t0 = time.perf_counter()
    first = scan_split(data_dir, "train", workers=workers, progress=True)
    cold = time.perf_counter() - t0
    assert not first.from_cache  # a fresh folder: the first call must scan
    warm = best_of(lambda: scan_split(data_dir, "train", workers=workers), repeats)
    assert scan_split(data_dir, "train").from_cache
    return cold, warm, len(first.index), os.path.getsize(first.cache_path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="an existing DATA_DIR with train/ (default: generate synthetic JPEGs)")
    p.add_argument("--images", type=int, default=2000, help="synthetic ImageNet-sized JPEGs to generate")
    p.add_argument("--warm_files", type=int, default=100_000, help="files in the hard-link warm-start set (0: skip)")
    p.add_argument("--workers", type=int, default=None, help="scan processes (default: all usable cores)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    a = p.parse_args()
    workers = a.workers or arscan._default_workers()
    tmp = tempfile.mkdtemp(prefix="bench_scan_")
    try:
        data_dir = a.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "synth")
            classes = 20
            r = synth.make_synthetic(data_dir, classes, -(-a.images // classes), 0, kind="imagenet",
                                     workers=workers, progress=True)
            print(f"generated {r['train']:,} ImageNet-sized JPEGs (~500x375, q{synth.QUALITY}) "
                  f"in {r['seconds']:.1f} s", file=sys.stderr)
        print(f"machine: {machine()}")
        print(f"\ncold scan of {data_dir}/train (page cache warm), best of {a.repeats}:")
        print(f"  {'method':<44} {'workers':>7} {'files':>8} {'seconds':>8} {'headers/s':>10} {'per core':>9}")
        for method, w, sec, n in cold_rows(data_dir, workers, a.repeats):
            print(f"  {method:<44} {w:>7} {n:>8,} {sec:>8.3f} {n / sec:>10,.0f} {n / sec / w:>9,.0f}")
        if a.warm_files:
            big = os.path.join(tmp, "hardlinks")
            t0 = time.perf_counter()
            make_hardlink_set(data_dir, big, a.warm_files)
            print(f"\nwarm start ({a.warm_files:,} hard-linked JPEGs, made in {time.perf_counter() - t0:.1f} s), "
                  f"best of {a.repeats}:")
            cold, warm, n, nbytes = warm_row(big, workers, a.repeats)
            print(f"  {'files':>8} {'cold scan s':>11} {'cold hdr/s':>10} {'warm start s':>12} {'cache MB':>8}")
            print(f"  {n:>8,} {cold:>11.2f} {n / cold:>10,.0f} {warm:>12.3f} {nbytes / 1e6:>8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
