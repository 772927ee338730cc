"""`rectrain bench model`: training steps of the model alone, on batches already on the device.

The ceiling that the data pipeline has to feed. Each row is one configuration -- batch shape, precision,
memory format, compile mode, SGD implementation -- running rectrain's ``TrainStep`` (uint8 NHWC batch
normalised on the device, forward, loss, backward, SGD with momentum, scaler, schedule) on one fixed random
batch, after warm-up steps that absorb cuDNN autotuning and compilation (their time is reported apart).

Per row: the median step time (CUDA events on a GPU, so the queue stays full as in training), images/s,
peak memory (CUDA), achieved TFLOP/s and the model FLOP utilisation (MFU). FLOPs are those of one forward
and backward counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; the
optimizer, BatchNorm and activations are memory-bound and not counted), on the meta device so counting
costs nothing. The peak is ``--peak_tflops`` or a large matrix product in the row's precision measured here
(fp32 rows with TF32 when cuDNN's convolutions use it, torch's default).

The fused vs foreach SGD rows answer which implementation to use on CUDA: same step, only
``torch.optim.SGD(..., fused=True)`` against ``foreach=True``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from rectrain.commands.bench import BENCHES
from rectrain.commands.bench.common import (Column, describe_machine, device_of, emit, machine, parse_list,
                                             parse_shapes, peak_memory_gb, reset_peak_memory, step_times_ms, sync,
                                             table)
from rectrain.errors import UserError
from rectrain.model import ARCHS, build_model
from rectrain.training.parts import PRECISIONS, build_step_parts
from rectrain.training.schedule import LRSchedule
from rectrain.training.step import DeviceNormalize, TrainStep

HELP = BENCHES["model"]

DTYPES = PRECISIONS
FORMATS = ("channels_last", "contiguous")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
OPTIMIZERS = ("foreach", "fused", "forloop")

# Defaults per device: a GPU gets the real model at the real size, a CPU a quick check of the code path.
GPU_DEFAULTS = dict(arch="resnet50", width=64, batch_size=256, shapes="224x224,224x288", dtypes="bf16",
                    formats="channels_last", steps=30, warmup=10)
CPU_DEFAULTS = dict(arch="resnet18", width=16, batch_size=16, shapes="64x64", dtypes="fp32",
                    formats="contiguous", steps=5, warmup=2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="model (default: resnet50 on a GPU, resnet18 on a CPU)")
    p.add_argument("--width", type=int, default=None, help="stem width (default: 64 on a GPU, 16 on a CPU)")
    p.add_argument("--num_classes", type=int, default=1000, help="classes of the final layer")
    p.add_argument("--batch_size", type=int, default=None, help="images per step (default: 256 on a GPU, 16 on a CPU)")
    p.add_argument("--shapes", default=None, help="comma-separated HxW batch shapes (default: 224x224,224x288 on a "
                                                  "GPU, 64x64 on a CPU)")
    p.add_argument("--dtypes", default=None, help="comma-separated precisions among fp32, bf16, fp16 (autocast; fp16 "
                                                  "with a GradScaler) (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--formats", default=None, help="comma-separated memory formats among channels_last, contiguous "
                                                   "(default: channels_last on a GPU, contiguous on a CPU)")
    p.add_argument("--compile", default="none", help="comma-separated torch.compile modes among " + ", ".join(COMPILE_MODES))
    p.add_argument("--optimizers", default="foreach,fused", help="comma-separated SGD implementations among "
                                                                  + ", ".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 30 on a GPU, 5 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default: 10 on a GPU, "
                                                            "2 on a CPU)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s for the MFU column (default: measured with a large matrix product)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


@dataclass(frozen=True)
class ModelBenchConfig:
    device: str
    arch: str
    width: int
    num_classes: int
    batch_size: int
    shapes: tuple[tuple[int, int], ...]
    dtypes: tuple[str, ...]
    formats: tuple[str, ...]
    compile_modes: tuple[str, ...]
    optimizers: tuple[str, ...]
    steps: int
    warmup: int
    peak_tflops: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelBenchConfig":
        device = device_of(args.device)
        d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS

        def pick(name):
            value = getattr(args, name)
            return d[name] if value is None else value

        cfg = cls(device=str(device), arch=pick("arch"), width=pick("width"), num_classes=args.num_classes,
                  batch_size=pick("batch_size"), shapes=tuple(parse_shapes(pick("shapes"))),
                  dtypes=tuple(parse_list("--dtypes", pick("dtypes"), list(DTYPES))),
                  formats=tuple(parse_list("--formats", pick("formats"), FORMATS)),
                  compile_modes=tuple(parse_list("--compile", args.compile, COMPILE_MODES)),
                  optimizers=tuple(parse_list("--optimizers", args.optimizers, OPTIMIZERS)),
                  steps=pick("steps"), warmup=pick("warmup"), peak_tflops=args.peak_tflops)
        for name in ("width", "num_classes", "batch_size", "steps"):
            if getattr(cfg, name) < 1:
                raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
        if cfg.warmup < 0:
            raise UserError(f"--warmup must be 0 or more (got {cfg.warmup})")
        if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
            raise UserError(f"--peak_tflops must be positive (got {cfg.peak_tflops})")
        return cfg


# -- FLOPs and the peak ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def train_flops(arch: str, width: int, num_classes: int, batch: int, h: int, w: int) -> int:
    """FLOPs of one forward + backward of ``batch`` images of h x w (FlopCounterMode, on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(arch, num_classes=num_classes, width=width).to("meta")
    x = torch.empty(batch, 3, h, w, device="meta")
    labels = torch.zeros(batch, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x).float(), labels).backward()
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """Measured TFLOP/s of an n x n x n matrix product in ``dtype`` on random data (zeros run faster)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32  # as the convolutions run
    try:
        for _ in range(3):
            a @ b
        times = step_times_ms(device, lambda: a @ b, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / (statistics.median(times) / 1e3) / 1e12


# -- one row -----------------------------------------------------------------------------------------------
def no_augment(images: torch.Tensor, labels: torch.Tensor):
    """BatchAugment's signature with nothing applied: (images, labels_a, labels_b, lam=None)."""
    return images, labels, labels, None


SGD_IMPLEMENTATIONS = {"foreach": dict(foreach=True), "fused": dict(fused=True), "forloop": dict(foreach=False)}


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "none":
        return model
    return torch.compile(model, dynamic=False, mode=None if mode == "default" else mode)


def measure_row(cfg: ModelBenchConfig, hw: tuple[int, int], dtype: str, fmt: str, mode: str, opt: str) -> dict:
    device = torch.device(cfg.device)
    reset_peak_memory(device)
    torch.manual_seed(0)
    # The trainer's parts: rectrain's SGD (momentum 0.9, no decay on BatchNorm/bias) with the implementation ``opt``.
    p = build_step_parts(cfg.arch, cfg.num_classes, device, width=cfg.width, precision=dtype,
                         channels_last=fmt == "channels_last", sgd=SGD_IMPLEMENTATIONS[opt])
    step = TrainStep(compiled(p.model, mode), p.optimizer, p.scaler, DeviceNormalize(device), no_augment,
                     p.autocast, LRSchedule(0.1, total_steps=10**9, warmup_steps=0),
                     label_smoothing=0.1, channels_last=p.channels_last)
    images = torch.randint(0, 256, (cfg.batch_size, *hw, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    counter = itertools.count()

    def one_step():
        step(images, labels, next(counter))

    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        one_step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    ms = statistics.median(step_times_ms(device, one_step, cfg.steps))
    flops = train_flops(cfg.arch, cfg.width, cfg.num_classes, cfg.batch_size, *hw)
    return {"shape": f"{hw[0]}x{hw[1]}", "dtype": dtype, "format": fmt, "compile": mode, "optimizer": opt,
            "step_ms": ms, "images_per_sec": cfg.batch_size / (ms / 1e3), "peak_mem_gb": peak_memory_gb(device),
            "gflop_per_image": flops / cfg.batch_size / 1e9, "tflops": flops / (ms / 1e3) / 1e12,
            "warmup_s": warmup_s}


# -- the run -----------------------------------------------------------------------------------------------
def peaks(cfg: ModelBenchConfig) -> dict[str, float]:
    """Peak TFLOP/s per precision: the given one for all, else measured (once per precision)."""
    if cfg.peak_tflops is not None:
        return {d: cfg.peak_tflops for d in cfg.dtypes}
    device = torch.device(cfg.device)
    return {d: matmul_tflops(device, DTYPES[d] or torch.float32) for d in cfg.dtypes}


def optimizer_comparison(rows: list[dict]) -> list[dict]:
    """For each configuration timed with both: fused SGD's images/s over foreach's."""
    key = lambda r: (r["shape"], r["dtype"], r["format"], r["compile"])  # noqa: E731
    by = {(key(r), r["optimizer"]): r for r in rows}
    out = []
    for k in dict.fromkeys(key(r) for r in rows):
        if (k, "fused") in by and (k, "foreach") in by:
            ratio = by[(k, "fused")]["images_per_sec"] / by[(k, "foreach")]["images_per_sec"]
            out.append(dict(zip(("shape", "dtype", "format", "compile"), k), fused_over_foreach=ratio))
    return out


def run_model_bench(cfg: ModelBenchConfig, log=print) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in training: a handful of shapes, each autotuned once
    peak = peaks(cfg)
    rows = []
    for hw, dtype, fmt, mode, opt in itertools.product(cfg.shapes, cfg.dtypes, cfg.formats, cfg.compile_modes,
                                                       cfg.optimizers):
        row = measure_row(cfg, hw, dtype, fmt, mode, opt)
        if mode != "none":
            torch._dynamo.reset()  # each row compiles its own model: no stale graphs, no cache limit reached
        row["mfu"] = row["tflops"] / peak[dtype]
        rows.append(row)
        log(f"  {row['shape']} {dtype} {fmt} compile={mode} {opt}: {row['images_per_sec']:,.0f} images/s")
    return {"bench": "model", "machine": machine(device), "config": asdict(cfg),
            "peak_tflops": peak, "peak_source": "given" if cfg.peak_tflops else "measured matmul",
            "rows": rows, "optimizer_comparison": optimizer_comparison(rows)}


COLUMNS = [Column("shape", "shape", width=9, left=True), Column("dtype", "dtype", width=5, left=True),
           Column("format", "format", width=13, left=True), Column("compile", "compile", width=10, left=True),
           Column("optimizer", "optimizer", width=9, left=True), Column("step_ms", "ms/step", ".2f", 9),
           Column("images_per_sec", "images/s", ",.0f", 9), Column("peak_mem_gb", "peak GiB", ".2f", 8),
           Column("tflops", "TFLOP/s", ".3g", 8), Column("mfu_pct", "MFU %", ".3g", 6)]


def render(res: dict) -> str:
    cfg = res["config"]
    lines = [describe_machine(res["machine"]),
             f"model {cfg['arch']} (width {cfg['width']}), batch {cfg['batch_size']}, median of {cfg['steps']} steps "
             f"after {cfg['warmup']}; {res['rows'][0]['gflop_per_image']:.3g} GFLOP per image (fwd+bwd) at "
             f"{res['rows'][0]['shape']}; peak TFLOP/s ({res['peak_source']}): "
             + ", ".join(f"{d} {v:,.4g}" for d, v in res["peak_tflops"].items()), ""]
    lines.append(table([{**r, "mfu_pct": 100 * r["mfu"]} for r in res["rows"]], COLUMNS))
    for c in res["optimizer_comparison"]:
        lines.append(f"fused SGD vs foreach at {c['shape']} {c['dtype']} {c['format']} compile={c['compile']}: "
                     f"{c['fused_over_foreach']:.3f}x images/s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = ModelBenchConfig.from_args(args)
    res = run_model_bench(cfg, log=lambda s: print(s, file=sys.stderr))
    emit(res, render(res), args.json)
    return 0
