"""`rectrain bench e2e`: the real training loop from an image folder, timed for K steps after the warm-up.

Runs ``rectrain.trainer.Trainer`` in this process (one process, one device) with every `rectrain train` flag
the user gives, stopped by ``--max_steps``: the warm-up over every batch shape (cuDNN autotuning,
compilation; ``warmup_s``, reported apart), then ``--skip`` steps that fill the pipeline (workers
starting, prefetch queues), then ``--steps`` timed steps. The figures come from the run's own
``steps.jsonl`` (one row per ``--interval`` steps: images/s and data-wait share, measured between the
loop's once-per-interval device reads): images/s and the data-wait share over the timed steps, peak
device memory over the whole run.

The run writes into a temporary folder that is removed afterwards. By default it sees only the
dataset's train/ split (through a symbolic link): validation is not part of what is timed, and its batch
shapes would only lengthen the warm-up; ``--with_val`` keeps val/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

from rectrain.commands.bench import BENCHES
from rectrain.commands.bench.common import describe_machine, device_of, emit, machine, peak_memory_gb, reset_peak_memory
from rectrain.config import TrainConfig, resolve_config
from rectrain.config import add_arguments as add_train_arguments
from rectrain.errors import UserError
from rectrain.resume import Resume
from rectrain.runtime.distributed import launch
from rectrain.runtime.logs import close_logger, setup_rank_logger
from rectrain.runtime.metrics import RunPaths
from rectrain.trainer import Trainer, preflight

HELP = BENCHES["e2e"]


def _bench_flags(p: argparse.ArgumentParser) -> None:
    """The flags of this benchmark (every other flag is a `rectrain train` flag)."""
    g = p.add_argument_group("benchmark")
    g.add_argument("--steps", type=int, default=30, help="timed training steps after --skip")
    g.add_argument("--skip", type=int, default=10, help="untimed steps after the warm-up (pipeline fill); rounded "
                                                        "up to a multiple of --interval")
    g.add_argument("--interval", type=int, default=5, help="steps per measured interval (the run's --print_freq)")
    g.add_argument("--with_val", action="store_true", help="keep the dataset's val/ split (its shapes are warmed "
                                                           "up too; validation itself never runs inside K steps)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    _bench_flags(p)
    p.usage = "%(prog)s --data_dir D [--steps K] [--skip S] [--json] [any rectrain train flag ...]"


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this benchmark's flags, the `rectrain train` flags)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _bench_flags(p)
    ns, rest = p.parse_known_args(argv)
    for name in ("steps", "interval"):
        if getattr(ns, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(ns, name)})")
    if ns.skip < 0:
        raise UserError(f"--skip must be 0 or more (got {ns.skip})")
    return ns, rest


def train_view(data_dir: str, root: str, with_val: bool) -> str:
    """A folder under ``root`` whose train/ (and val/) link to ``data_dir``'s: same files, no copy."""
    if not os.path.isdir(os.path.join(data_dir, "train")):
        raise UserError(f"--data_dir {data_dir} has no train/ folder; expected DATA_DIR/train/<class>/<images>")
    view = os.path.join(root, "data")
    os.makedirs(view)
    for split in ("train", "val") if with_val else ("train",):
        if os.path.isdir(os.path.join(data_dir, split)):
            os.symlink(os.path.abspath(os.path.join(data_dir, split)), os.path.join(view, split))
    return view


def bench_config(cfg: TrainConfig, view: str, root: str, skip: int, steps: int, interval: int) -> TrainConfig:
    """The user's run, confined to this benchmark: one process, a temporary output, stopped after skip + steps.

    Every epoch has at least one step, so ``skip + steps`` epochs always reach ``--max_steps``. Steps are optimizer
    steps; with --accum_steps N the log interval (counted in batches) is N x ``interval``, so that each row ends on
    an optimizer step (but at an epoch's end, after its shorter last accumulation)."""
    total = skip + steps
    return replace(cfg, data_dir=view, output=os.path.join(root, "runs"), run_name="bench_e2e", resume=None,
                   nproc=1, max_steps=total, epochs=max(cfg.epochs, total), print_freq=interval * cfg.accum_steps,
                   progress="off")


def run_trainer(cfg: TrainConfig):
    """Train in this process; returns the Trainer (its warm-up time and batch shapes are read afterwards)."""
    preflight(cfg)
    holder = {}

    def worker(info) -> int:
        paths = RunPaths.of(cfg.output, cfg.run_name)
        logger = setup_rank_logger(paths.log_dir, info.rank, echo=info.is_primary)
        try:
            trainer = holder["trainer"] = Trainer.build(cfg, info, paths, logger, Resume(cfg))
            try:
                return trainer.fit()
            finally:
                trainer.close()
        finally:
            close_logger(logger)

    code = launch(worker, device=cfg.device, nproc=1, port=cfg.dist_port, timeout_s=cfg.dist_timeout)
    if code != 0:
        raise UserError(f"the training run stopped with exit status {code}; see its messages above")
    return holder["trainer"]


def timed_intervals(rows: list[dict], skip: int, batch: int) -> dict:
    """Images/s and data-wait share over the steps after ``skip``, from steps.jsonl's interval rows.

    Each row covers the steps since the previous row (``step`` counts optimizer steps over the whole run); its
    images are (step - previous step) x batch and its seconds those images over its images/s."""
    images = seconds = wait = 0.0
    prev = 0
    for r in rows:
        n = (r["step"] - prev) * batch
        if prev >= skip and n > 0 and r["images_per_sec"] > 0:
            dt = n / r["images_per_sec"]
            images, seconds, wait = images + n, seconds + dt, wait + dt * r["data_wait_frac"]
        prev = r["step"]
    if seconds <= 0:
        raise UserError("no interval after --skip was measured: raise --steps or lower --skip/--interval")
    return {"images_per_sec": images / seconds, "data_wait_frac": wait / seconds, "timed_images": int(images),
            "timed_seconds": seconds}


def measure_e2e(cfg: TrainConfig, steps: int, skip: int, interval: int, with_val: bool = False) -> dict:
    skip = math.ceil(skip / interval) * interval
    device = device_of(cfg.device)
    with tempfile.TemporaryDirectory(prefix="rectrain_e2e_") as root:
        run_cfg = bench_config(cfg, train_view(cfg.data_dir, root, with_val), root, skip, steps, interval)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        trainer = run_trainer(run_cfg)
        wall = time.perf_counter() - t0
        with open(os.path.join(root, "runs", "bench_e2e", "steps.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    res = timed_intervals(rows, skip, cfg.batch_size * cfg.accum_steps)  # images per optimizer step
    return {"bench": "e2e", "machine": machine(device), **res, "peak_mem_gb": peak_memory_gb(device),
            "warmup_s": trainer.warmup_s, "train_shapes": [f"{b}x{h}x{w}" for b, h, w in trainer.train_shapes],
            "compile_graphs": trainer.warmup_graphs, "compile_decision": trainer.compiling.line,
            "skip_steps": skip, "timed_steps": steps, "steps_per_epoch": trainer.steps_per_epoch,
            "wall_s": wall, "intervals": rows, "settings": settings_of(cfg, trainer)}


def settings_of(cfg: TrainConfig, trainer) -> dict:
    amp = cfg.precision if torch.device(trainer.device).type == "cuda" else "fp32"
    keys = ("arch", "width", "batch_size", "target_size", "rect_mode", "max_ratio", "decoder", "workers", "compile",
            "compile_shapes", "compile_cache", "cuda_graphs", "data_dir")
    out = {k: getattr(cfg, k) for k in keys}
    out.update(precision=amp, channels_last=trainer.channels_last, decode=getattr(cfg, "decode", "cpu"),
               augmentations=str(trainer.augment.config), compiled=trainer.compiled)
    return out


def render(res: dict) -> str:
    s = res["settings"]
    mem = f"{res['peak_mem_gb']:.1f} GiB" if res["peak_mem_gb"] is not None else "- (CPU)"
    return "\n".join([
        describe_machine(res["machine"]),
        f"e2e: {s['arch']} width {s['width']}, batch {s['batch_size']}, {s['rect_mode']} {s['target_size']}, "
        f"{s['workers']} workers, {s['precision']}, {'channels_last' if s['channels_last'] else 'NCHW'}, "
        f"{'compiled (' + s['compile_shapes'] + ')' if s['compiled'] else 'eager'}, decode {s['decode']}",
        f"  images/s:        {res['images_per_sec']:,.1f} over steps {res['skip_steps'] + 1}-"
        f"{res['skip_steps'] + res['timed_steps']}",
        f"  data wait:       {100 * res['data_wait_frac']:.1f}% of step time",
        f"  peak memory:     {mem}",
        f"  warm-up:         {res['warmup_s']:.1f} s for {len(res['train_shapes'])} training batch shapes, "
        f"{res['compile_graphs']} compiled graph(s) (not counted in images/s)",
    ])


def run(args: argparse.Namespace) -> int:
    ns, train_argv = split_argv(args.command_argv[1:])  # command_argv[0] is "e2e"
    cfg = resolve_config(train_argv, prog="rectrain bench e2e")
    # --json: stdout holds the one JSON object; the run's own log lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if ns.json else contextlib.nullcontext():
        res = measure_e2e(cfg, ns.steps, ns.skip, ns.interval, ns.with_val)
    emit(res, render(res), ns.json)
    return 0
