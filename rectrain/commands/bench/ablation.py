"""`rectrain bench ablation`: the seed's "Speed Comparison" table, every row measured in one run on the same files.

The seed claims (RTX 3090): FP32 baseline 200 images/s, + FP16 360, + rectangular crops 480, + batch
augmentations 420. Here each row adds one thing to the row above it, and all rows train on the same
images (the same batches of dataset indices, drawn once from the bucketed sampler):

    fp32           the standard pipeline: square RandomResizedCrop per image in the workers (PIL or
                   torchvision), float32 normalised batches shipped from the workers, NCHW, no autocast
    amp            + autocast (--amp_dtype)
    rect           + rectangular buckets: our loader (crops of the bucket's shape chosen before decoding,
                   uint8 from the workers), normalised on the device
    batch_aug      + MixUp/CutMix/Random Erasing on the device (the seed's defaults)
    channels_last  + the channels_last memory format
    compile        + torch.compile (one graph per batch shape, compiled in the warm-up)
    gpu_decode     the channels_last row (eager) with JPEGs decoded on the GPU (nvJPEG, rectrain.data.gpu_decode);
                   skipped with a note where CUDA or torchvision is missing
    area           the channels_last row (eager) with --rect_mode area: H*W ~ target^2, the compute of square crops

Each row: a fresh model and optimizer (SGD with momentum, torch's default implementation, as training),
a warm-up of every batch shape it will see (cuDNN autotuning, compilation; reported apart), ``--warmup``
untimed steps (worker start-up, queues), then ``--steps`` timed steps from the files, bracketed by device
synchronisations. images/s, the ratio to the fp32 row, peak device memory, the share of time spent waiting
for data, and the warm-up seconds.

``--max_shapes N`` draws the batches from the N most common bucket shapes only, so that the autotuning and
compilation of every shape (done for each row before its timing) fit a short session; ``compile`` is run
last for the same reason. ``--partial FILE`` appends each row as one JSON line the moment it is measured,
so a run stopped by a time limit keeps its finished rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from rectrain.commands.bench import BENCHES
from rectrain.commands.bench.common import (Column, cpu_cores, describe_machine, device_of, emit, machine, parse_list,
                                             peak_memory_gb, reset_peak_memory, sync, table)
from rectrain.commands.bench.model import no_augment
from rectrain.commands.bench.standard import StandardDataset, standard_transform
from rectrain.data import gpu_decode as gd
from rectrain.data.buckets import make_buckets
from rectrain.data.loader import BucketDataset, collate
from rectrain.data.samplers import AspectRatioBatchSampler
from rectrain.data.scan import SplitScan
from rectrain.data.source import scan_split
from rectrain.data.transforms import RectangularCropTfm
from rectrain.errors import UserError
from rectrain.model import ARCHS
from rectrain.training.augment import AugmentationConfig, BatchAugment
from rectrain.training.parts import build_step_parts
from rectrain.training.schedule import LRSchedule
from rectrain.training.step import DeviceNormalize, TrainStep
from rectrain.training.warmup import batch_shapes, compiled_graphs, warm_up

HELP = BENCHES["ablation"]


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    pipeline: str            # "standard" (per-image, float32 from the workers), "buckets", "gpu_decode"
    amp: bool
    batch_aug: bool
    channels_last: bool
    compile: bool = False
    rect_mode: str = "short_side"


ROWS = (
    Row("fp32", "FP32 baseline (square RandomResizedCrop per image, float32 from the workers, NCHW)", "standard",
        amp=False, batch_aug=False, channels_last=False),
    Row("amp", "+ AMP", "standard", amp=True, batch_aug=False, channels_last=False),
    Row("rect", "+ rectangular buckets (uint8 crops, normalised on the device)", "buckets",
        amp=True, batch_aug=False, channels_last=False),
    Row("batch_aug", "+ batch augmentations (MixUp/CutMix/Random Erasing)", "buckets",
        amp=True, batch_aug=True, channels_last=False),
    Row("channels_last", "+ channels_last", "buckets", amp=True, batch_aug=True, channels_last=True),
    Row("compile", "+ torch.compile", "buckets", amp=True, batch_aug=True, channels_last=True, compile=True),
    Row("gpu_decode", "+ GPU JPEG decode (on + channels_last, eager)", "gpu_decode",
        amp=True, batch_aug=True, channels_last=True),
    Row("area", "area mode (on + channels_last: H*W ~ target^2)", "buckets",
        amp=True, batch_aug=True, channels_last=True, rect_mode="area"),
)
BY_NAME = {r.name: r for r in ROWS}
# Cheap rows first; compile (minutes of compilation on a GPU) last, so a time limit costs only it.
RUN_ORDER = ("fp32", "amp", "rect", "batch_aug", "channels_last", "area", "gpu_decode", "compile")

GPU_DEFAULTS = dict(arch="resnet50", width=64, batch_size=256, target_size=224, steps=20, warmup=3)
CPU_DEFAULTS = dict(arch="resnet18", width=16, batch_size=16, target_size=64, steps=4, warmup=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", required=True, help="dataset root holding train/<class>/<images>")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="model (default: resnet50 on a GPU, resnet18 "
                                                                       "on a CPU)")
    p.add_argument("--width", type=int, default=None, help="stem width (default: 64 on a GPU, 16 on a CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 256 on a GPU, 16 on a CPU")
    p.add_argument("--target_size", type=int, default=None, help="crop size: the square side of the fp32 rows, the "
                                                                  "short side (or sqrt of the area) of the buckets "
                                                                  "(default: 224 on a GPU, 64 on a CPU)")
    p.add_argument("--workers", type=int, default=cpu_cores(), help="DataLoader worker processes")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 20 on a GPU, 4 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row after the shape warm-up "
                                                            "(default: 3 on a GPU, 1 on a CPU)")
    p.add_argument("--max_shapes", type=int, default=None,
                   help="draw the batches from this many most common bucket shapes only (default: all)")
    p.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows among "
                                                                          + ", ".join(r.name for r in ROWS))
    p.add_argument("--amp_dtype", choices=["bf16", "fp16"], default="bf16", help="autocast dtype of the AMP rows")
    p.add_argument("--decoder", choices=["auto", "turbo", "opencv", "pil"], default="auto", help="our loader's JPEG decoder")
    p.add_argument("--seed", type=int, default=0, help="batch order, crops, augmentations, weights")
    p.add_argument("--partial", default=None, metavar="FILE", help="append each measured row to FILE as a JSON line")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


@dataclass(frozen=True)
class Settings:
    data_dir: str
    device: str
    arch: str
    width: int
    batch_size: int
    target_size: int
    workers: int
    steps: int
    warmup: int
    max_shapes: int | None
    rows: tuple[str, ...]
    amp_dtype: str = "bf16"
    decoder: str = "auto"
    seed: int = 0
    partial: str | None = None  # JSON-lines file that each measured row is appended to

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        device = device_of(args.device)
        d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS

        def pick(name):
            value = getattr(args, name)
            return d[name] if value is None else value

        s = cls(data_dir=args.data_dir, device=str(device), arch=pick("arch"), width=pick("width"),
                batch_size=pick("batch_size"), target_size=pick("target_size"), workers=args.workers,
                steps=pick("steps"), warmup=pick("warmup"), max_shapes=args.max_shapes,
                rows=tuple(parse_list("--rows", args.rows, list(BY_NAME))), amp_dtype=args.amp_dtype,
                decoder=args.decoder, seed=args.seed, partial=args.partial)
        for name in ("width", "batch_size", "steps", "max_shapes"):
            value = getattr(s, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be at least 1 (got {value})")
        for name in ("warmup", "workers", "seed"):
            if getattr(s, name) < 0:
                raise UserError(f"--{name} must be 0 or more (got {getattr(s, name)})")
        if s.target_size < 32 or s.target_size % 32:
            raise UserError(f"--target_size must be a multiple of 32, at least 32 (got {s.target_size})")
        return s


# -- the batches every row trains on ---------------------------------------------------------------------
def plan_batches(bucket_ids: np.ndarray, batch_size: int, seed: int, count: int,
                 max_shapes: int | None) -> list[tuple[int, np.ndarray]]:
    """The first ``count`` batches (epoch, dataset indices) of the sampler's epochs 0, 1, ..., keeping only batches
    of the ``max_shapes`` buckets that give the most full batches (all buckets when None)."""
    sampler = AspectRatioBatchSampler(bucket_ids, batch_size, seed=seed)
    full = np.bincount(bucket_ids) // batch_size  # full batches per bucket per epoch
    if full.sum() == 0:
        raise UserError(f"no bucket holds --batch_size {batch_size} images ({len(bucket_ids)} images in all): "
                        "lower --batch_size or add images")
    ranked = sorted(np.flatnonzero(full), key=lambda b: (-full[b], b))
    allowed = set(ranked[:max_shapes] if max_shapes else ranked)
    plan: list[tuple[int, np.ndarray]] = []
    epoch = 0
    while len(plan) < count:  # every epoch yields at least one allowed batch
        plan += [(epoch, b) for b in sampler.batches(epoch) if int(bucket_ids[b[0]]) in allowed][:count - len(plan)]
        epoch += 1
    return plan


class Data:
    """The scanned files, and per rect mode its bucket table and batch plan (the same for every row of the mode)."""

    def __init__(self, scan: SplitScan, s: Settings):
        self.scan, self.s = scan, s
        self.files = [os.path.join(scan.index.split_dir, str(p)) for p in scan.index.paths]
        self.labels = scan.index.labels
        self.num_classes = len(scan.index.classes)
        self._plans: dict[str, tuple] = {}

    def plan(self, rect_mode: str):
        """-> (BucketTable, bucket id per image, [(epoch, indices)]) for ``rect_mode``."""
        if rect_mode not in self._plans:
            buckets = make_buckets(self.s.target_size, rect_mode)
            ids = buckets.assign(self.scan.sizes)
            batches = plan_batches(ids, self.s.batch_size, self.s.seed, self.s.warmup + self.s.steps,
                                   self.s.max_shapes)
            self._plans[rect_mode] = (buckets, ids, batches)
        return self._plans[rect_mode]


# -- one row ---------------------------------------------------------------------------------------------
class ToDevice:
    """The fp32 rows' batches come from the workers already normalised, in float32: only the copy remains."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def gpu_decode_problem(device: torch.device) -> str | None:
    """Why the gpu_decode row cannot run here, or None."""
    return gd.gpu_decode_problem(device)


def row_batches(row: Row, s: Settings, data: Data, log):
    """-> (iterator of (images, labels), the (B, H, W) batch shapes it will yield)."""
    device = torch.device(s.device)
    buckets, ids, plan = data.plan(row.rect_mode)
    kw = dict(num_workers=s.workers, pin_memory=device.type == "cuda", prefetch_factor=4 if s.workers else None)
    if row.pipeline == "standard":
        transform, _ = standard_transform(s.target_size)
        loader = torch.utils.data.DataLoader(StandardDataset(data.files, data.labels, transform),
                                             batch_sampler=[[int(i) for i in b] for _, b in plan], **kw)
        return ((x, y) for x, y in loader), [(s.batch_size, s.target_size, s.target_size)]
    tfm = RectangularCropTfm(train=True, decoder=s.decoder)
    collate_fn = collate
    if row.pipeline == "gpu_decode":
        tfm, collate_fn = gd.BytesCropTfm(tfm), gd.collate_encoded
    dataset = BucketDataset(data.scan, buckets, tfm, seed=s.seed)
    keys = [[(int(i), e) for i in b] for e, b in plan]
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=keys, collate_fn=collate_fn, **kw))
    if row.pipeline == "gpu_decode":
        batches = gd.decoded(batches, gd.GpuBatchDecoder(device, cpu_decoder=s.decoder, log=log))
    return ((x, y) for x, y, _failed in batches), batch_shapes([b for _, b in plan], ids, buckets.shapes)


def build_step(row: Row, s: Settings, num_classes: int, shapes: int) -> TrainStep:
    """The trainer's step parts (``build_step_parts``: SGD with the run's defaults, torch's implementation) in the
    row's precision and memory format."""
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    p = build_step_parts(s.arch, num_classes, device, width=s.width, precision=s.amp_dtype if row.amp else "fp32",
                         channels_last=row.channels_last)
    net = p.model
    if row.compile:
        from torch import _dynamo
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, shapes + 8)
        net = torch.compile(p.model, dynamic=False)
    normalize = ToDevice(device) if row.pipeline == "standard" else DeviceNormalize(device)
    augment = BatchAugment(AugmentationConfig(), seed=s.seed, device=device) if row.batch_aug else no_augment
    return TrainStep(net, p.optimizer, p.scaler, normalize, augment, p.autocast,
                     LRSchedule(0.1, total_steps=10**9, warmup_steps=0), label_smoothing=0.1,
                     channels_last=p.channels_last)


def measure_row(row: Row, s: Settings, data: Data, log) -> dict:
    device = torch.device(s.device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    batches, shapes = row_batches(row, s, data, log)
    step = build_step(row, s, data.num_classes, len(shapes))
    warm_up(step.model, step.model, shapes, [], autocast=step.autocast, channels_last=step.channels_last,
            device=device, log=lambda _msg: None)
    for k in range(s.warmup):
        step(*next(batches), k)
    sync(device)
    warmup_s = time.perf_counter() - t0
    graphs, wait = compiled_graphs(), 0.0
    t0 = time.perf_counter()
    for k in range(s.steps):
        tw = time.perf_counter()
        images, labels = next(batches)
        wait += time.perf_counter() - tw
        step(images, labels, s.warmup + k)
    sync(device)
    seconds = time.perf_counter() - t0
    batches.close()  # ends the DataLoader's workers
    return {"images_per_sec": s.steps * s.batch_size / seconds, "step_ms": 1e3 * seconds / s.steps,
            "data_wait_frac": wait / seconds, "peak_mem_gb": peak_memory_gb(device), "warmup_s": warmup_s,
            "shapes": [f"{h}x{w}" for _, h, w in shapes], "recompiles": compiled_graphs() - graphs}


def _release(device: torch.device, compiled_row: bool) -> None:
    gc.collect()
    if compiled_row:
        from torch import _dynamo
        _dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the table -------------------------------------------------------------------------------------------
def run_ablation(s: Settings, log=print) -> dict:
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training: each batch shape autotuned once, in the warm-up
    data = Data(scan_split(s.data_dir, "train"), s)
    results: dict[str, dict] = {}
    for name in (n for n in RUN_ORDER if n in s.rows):
        row = BY_NAME[name]
        out = {"name": name, "label": label_of(row, s), "skipped": None}
        problem = gpu_decode_problem(device) if row.pipeline == "gpu_decode" else None
        if problem:
            out["skipped"] = f"GPU decode unavailable: {problem}"
        else:
            try:
                out.update(measure_row(row, s, data, log))
            except UserError:
                raise
            except Exception as e:  # one row's failure (out of memory, a compiler error) must not cost the table
                log(traceback.format_exc())
                out["skipped"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            finally:
                _release(device, row.compile)
        results[name] = out
        out["ratio"] = ratio_to_baseline(out, results.get("fp32"))
        log(f"  {name}: " + (f"{out['images_per_sec']:,.1f} images/s" if out["skipped"] is None else out["skipped"]))
        if s.partial:
            with open(s.partial, "a") as f:
                f.write(json.dumps(out) + "\n")
    rows = [results[r.name] for r in ROWS if r.name in results]  # the seed's order
    return {"bench": "ablation", "machine": machine(device), "settings": asdict(s), "rows": rows,
            "images": len(data.files), "timed_images_per_row": s.steps * s.batch_size,
            "standard_pipeline": standard_transform(s.target_size)[1]}


def ratio_to_baseline(row: dict, baseline: dict | None) -> float | None:
    """images/s over the fp32 row's; None when either was not measured."""
    base = baseline.get("images_per_sec") if baseline else None
    return row["images_per_sec"] / base if base and row.get("images_per_sec") else None


def label_of(row: Row, s: Settings) -> str:
    return row.label.replace("+ AMP", f"+ AMP ({s.amp_dtype} autocast)")


COLUMNS = [Column("label", "row", width=0, left=True), Column("images_per_sec", "images/s", ",.1f", 10),
           Column("ratio", "vs fp32", ".2f", 7), Column("peak_mem_gb", "peak GiB", ".2f", 8),
           Column("wait_pct", "data wait %", ".0f", 11), Column("warmup_s", "warm-up s", ".1f", 9)]


def render(res: dict) -> str:
    s = res["settings"]
    measured = [r for r in res["rows"] if r["skipped"] is None]
    shapes = sorted({sh for r in measured for sh in r["shapes"]}, key=lambda t: tuple(map(int, t.split("x"))))
    lines = [describe_machine(res["machine"]),
             f"ablation: {s['arch']} (width {s['width']}), batch {s['batch_size']}, target {s['target_size']}, "
             f"{s['workers']} workers; per row {s['steps']} timed steps after {s['warmup']} and a warm-up of its "
             f"shapes; the same {res['images']:,}-image folder, batches from "
             f"{'all' if s['max_shapes'] is None else 'the ' + str(s['max_shapes']) + ' most common'} bucket shapes "
             f"({', '.join(shapes)}); fp32 rows: {res['standard_pipeline']} transforms", ""]
    lines.append(rows_table(res["rows"]))
    return "\n".join(lines)


def rows_table(rows: list[dict]) -> str:
    """The table of measured rows, in the seed's order, and a note per row that was not measured."""
    order = {r.name: i for i, r in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get(r["name"], len(order)))
    columns = [replace(COLUMNS[0], width=max(len(r["label"]) for r in rows)), *COLUMNS[1:]]
    lines = [table([{**r, "wait_pct": 100 * r["data_wait_frac"] if r.get("data_wait_frac") is not None else None}
                    for r in rows], columns)]
    lines += [f"not measured: {r['label']}: {r['skipped']}" for r in rows if r["skipped"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    s = Settings.from_args(args)
    res = run_ablation(s, log=lambda m: print(m, file=sys.stderr))
    emit(res, render(res), args.json)
    return 0
