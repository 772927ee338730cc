"""GPU JPEG decoding (``--decode gpu``) against the CPU worker path: decode + crop throughput and pixel agreement.

Rows (all end with (B, H, W, 3) uint8 batches on the GPU, synchronised):
- cpu workers: the training loader's CPU path (``RectangularCropTfm`` in ``--workers`` workers), then the copy.
- gpu path: the same workers only read bytes and choose boxes (``BytesCropTfm``); the main process decodes each
  batch with nvJPEG and crops/resizes/flips on the GPU (``GpuBatchDecoder``).
- gpu decoder alone: ``GpuBatchDecoder`` on batches already read: the ceiling of the main process.
Correctness: for the same samples (same boxes and flips), the mean / 99th percentile / max absolute difference
(grey levels) between the GPU path's crops and the CPU path's, for each CPU decoder; and how many images the GPU
path left to the CPU, by reason.

    python benchmarks/bench_gpu_decode.py                     # generates 512 ImageNet-like JPEGs (~30 s in all)
    python benchmarks/bench_gpu_decode.py --data_dir /data/imagenet --workers 8 --json

Without CUDA or torchvision it prints one "skipped: ..." line and exits 0. ``--device cpu`` runs the whole script on
the CPU with a Pillow stand-in for nvJPEG: a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rectrain.data import gpu_decode as gd  # noqa: E402
from rectrain.data.transforms import RectangularCropTfm, cv2  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", help="ImageFolder root with train/ (default: generate ImageNet-like JPEGs)")
    p.add_argument("--images", type=int, default=512, help="images to generate when --data_dir is not given")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for both paths (default: all cores)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--target_size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row, after the warm-up batches")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per row")
    p.add_argument("--check", type=int, default=256, help="samples compared pixel by pixel")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", default="cuda", help="cuda, or cpu: a dry run with a Pillow stand-in for nvJPEG")
    return p.parse_args(argv)


def _loader(scan, buckets, tfm, collate_fn, args, workers):
    """The training loader's pieces over epochs back to back (small datasets would end mid-measurement)."""
    from rectrain.data.loader import BucketDataset, EpochStream
    from rectrain.data.samplers import AspectRatioBatchSampler, DistributedBatchSampler

    ds = BucketDataset(scan, buckets, tfm, seed=0)
    sampler = DistributedBatchSampler(AspectRatioBatchSampler(ds.bucket_ids, args.batch_size, seed=0),
                                      num_replicas=1, rank=0)
    stream = EpochStream(sampler)
    stream.select(0, 0, 100_000)
    return ds, sampler, torch.utils.data.DataLoader(
        ds, batch_sampler=stream, num_workers=workers, collate_fn=collate_fn, pin_memory=args.device != "cpu",
        prefetch_factor=4 if workers else None)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _decoder(args, cpu_decoder: str) -> gd.GpuBatchDecoder:
    stand_in = gd.pil_decode if args.device == "cpu" else None
    return gd.GpuBatchDecoder(args.device, decode_fn=stand_in, cpu_decoder=cpu_decoder, log=lambda m: None)


def _rate(batches, to_device, args) -> float:
    """Images/s of ``to_device(batch)`` over ``batches`` for ``args.seconds`` after ``args.warmup`` batches."""
    it = iter(batches)
    for _ in range(args.warmup):
        to_device(next(it))
    _sync(args.device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        n += to_device(next(it)).shape[0]
    _sync(args.device)
    return n / (time.perf_counter() - t0)


def measure(scan, buckets, args, workers) -> dict:
    cpu_tfm = RectangularCropTfm(train=True)
    from rectrain.data.loader import collate

    _, _, cpu_loader = _loader(scan, buckets, cpu_tfm, collate, args, workers)
    cpu_ips = _rate(cpu_loader, lambda b: b[0].to(args.device, non_blocking=True), args)
    del cpu_loader
    decoder = _decoder(args, cpu_tfm.decoder)
    _, _, gpu_loader = _loader(scan, buckets, gd.BytesCropTfm(cpu_tfm), gd.collate_encoded, args, workers)
    gpu_ips = _rate(gpu_loader, lambda b: decoder(b[0])[0], args)
    it = iter(gpu_loader)
    held = [next(it)[0] for _ in range(8)]
    del it, gpu_loader
    alone_ips = _rate((held[k % len(held)] for k in range(10 ** 9)), lambda b: decoder(b)[0], args)
    return {"cpu_workers_ips": cpu_ips, "gpu_path_ips": gpu_ips, "gpu_decoder_alone_ips": alone_ips}


def compare(scan, buckets, args) -> dict:
    """Per CPU decoder: abs difference of the GPU path's crops from the CPU path's, same samples; CPU fallbacks."""
    from rectrain.data.loader import BucketDataset

    out = {}
    for name in ["pil"] + (["opencv"] if cv2 is not None else []):
        cpu_tfm = RectangularCropTfm(train=True, decoder=name)
        ds_cpu = BucketDataset(scan, buckets, cpu_tfm, seed=1)
        ds_gpu = BucketDataset(scan, buckets, gd.BytesCropTfm(cpu_tfm), seed=1)
        decoder = _decoder(args, name)
        diffs, count = [], 0
        for b in np.unique(ds_cpu.bucket_ids):  # one batch per bucket (one shape), up to --check samples
            if count >= args.check:
                break
            keys = [(int(i), 0) for i in np.flatnonzero(ds_cpu.bucket_ids == b)[: args.check - count]]
            count += len(keys)
            ref = np.stack([ds_cpu[k][0] for k in keys]).astype(np.int16)
            batch, _, _ = gd.collate_encoded([ds_gpu[k] for k in keys])
            got = decoder(batch)[0].cpu().numpy().astype(np.int16)
            diffs.append(np.abs(got - ref).ravel())
        d = np.concatenate(diffs)  # every channel of every pixel of every sample
        out[name] = {"samples": count, "mean": float(d.mean()), "p99": float(np.percentile(d, 99)),
                     "max": int(d.max()), "cpu_fallbacks": dict(decoder.counts)}
    return out


def _machine(device: str) -> dict:
    m = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "gpu": "none: --device cpu, Pillow stand-in for nvJPEG", "torchvision": "unused"}
    if device != "cpu":
        import torchvision
        m.update(gpu=torch.cuda.get_device_name(), torchvision=torchvision.__version__)
    return m


def _print_table(res: dict) -> None:
    m = res["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['gpu']}; torch {m['torch']} (CUDA {m['cuda']}), "
          f"torchvision {m['torchvision']}")
    print(f"data: {res['images']} JPEGs ({res['data']}), mean {res['mean_kpixels']:.0f} kpixels; batch "
          f"{res['batch_size']}, target {res['target_size']}, {res['workers']} workers, {res['seconds']} s per row")
    print(f"{'path (decode + crop to uint8 batches on the GPU)':<58} {'images/s':>10}")
    rows = [("cpu workers (RectangularCropTfm, default decoder)", "cpu_workers_ips"),
            ("gpu path (workers read bytes, nvJPEG + crop in main)", "gpu_path_ips"),
            ("gpu decoder alone (bytes already read)", "gpu_decoder_alone_ips")]
    for label, key in rows:
        print(f"{label:<58} {res[key]:>10.0f}")
    print(f"{'gpu vs cpu crops, same boxes (grey levels)':<58} {'samples':>8} {'mean':>6} {'p99':>6} {'max':>5}")
    for name, c in res["diff"].items():
        print(f"{'  cpu decoder ' + name:<58} {c['samples']:>8} {c['mean']:>6.2f} {c['p99']:>6.1f} {c['max']:>5}")
    fallbacks = next(iter(res["diff"].values()))["cpu_fallbacks"]
    print(f"left to the CPU by the gpu path: {fallbacks or 'none'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = gd.gpu_decode_problem(args.device) if args.device != "cpu" else None
    if problem is not None:
        line = f"skipped: no CUDA/torchvision ({problem})"
        print(json.dumps({"skipped": line}) if args.json else line)
        return 0
    from rectrain.data.buckets import make_buckets
    from rectrain.data.source import scan_split
    from rectrain.data.workers import cap_workers
    from rectrain.runtime.io import usable_cores

    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        from rectrain.data.synth import make_synthetic
        tmp = tempfile.TemporaryDirectory()
        data_dir = tmp.name
        make_synthetic(data_dir, classes=8, train_per_class=max(1, args.images // 8), val_per_class=0,
                       kind="imagenet", seed=0)
    try:
        scan = scan_split(data_dir, "train")
        buckets = make_buckets(args.target_size)
        workers = cap_workers(args.workers if args.workers is not None else usable_cores())[0]
        res = {"machine": _machine(args.device), "images": len(scan.index), "workers": workers, "batch_size": args.batch_size,
               "target_size": args.target_size, "seconds": args.seconds,
               "data": f"--data_dir {args.data_dir}" if args.data_dir else "rectrain synth --kind imagenet",
               "mean_kpixels": float(scan.sizes.astype(np.float64).prod(axis=1).mean() / 1e3)}
        res.update(measure(scan, buckets, args, workers))
        res["diff"] = compare(scan, buckets, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
