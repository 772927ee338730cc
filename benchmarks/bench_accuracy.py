"""Accuracy of training recipes on a small folder of real photos, on the CPU (issue 11, item 6).

    python /work/shared/data/fashion_folder.py /tmp/fashion --train_per_class 500 --val_per_class 300
    nice -n 10 python benchmarks/bench_accuracy.py --data_dir /tmp/fashion --out bench_accuracy  # ~1 h, 2 cores
    python benchmarks/bench_accuracy.py --quick --out /tmp/acc_quick   # CI-sized: synthetic data, ~15 s

Each recipe is a `rectrain train` run (a subprocess, its exact command recorded) of a small ResNet-18 at a
small target size, repeated over seeds; the table gives the mean, the sample standard deviation and the range
of the final top-1 (no best-epoch picking) two ways: rectrain's own validation (centre 87.5% crop) and the
whole image (``eval_view``, the plain loop's view), the EMA weights' top-1, wall and CPU seconds and the mean
pixels per training image. Rows:

(a) our defaults; (b) each per-image/batch switch flipped alone; (c) square vs rectangular crops (pixels per
image in the table: at 64 px the multiple-of-32 shapes make "equal pixels" approximate), also with the plain
recipe; (d) progressive resolution given the epochs that take the fixed run's time (compare CPU seconds);
(e) EMA: the EMA column of every row; (f) the plain reference loop (``plain_loop``: the whole image squashed
to a square, no crop, no flip, no batch augmentation, same model, optimizer, learning-rate schedule and label
smoothing) and rectrain set up as that loop, also validated the plain loop's way, which separates the
pipeline from the recipe; "best": the switches that won, together. A second table is test-time resolution
(FixRes): final checkpoints evaluated by `rectrain eval --target_size S`. Writes OUT/results.json and
OUT/results.md (also printed) with the command, machine, commit and date; finished runs are reused on a rerun
with the same settings (``--fresh`` retrains). Results and their reading: docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
from rectrain.data.buckets import make_buckets  # noqa: E402
from rectrain.data.scan import SplitScan  # noqa: E402
from rectrain.data.source import scan_split
from rectrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RectangularCropTfm  # noqa: E402
from rectrain.inference import inference_buckets, restore  # noqa: E402
from rectrain.model import build_model, param_groups  # noqa: E402
from rectrain.training.schedule import ResolutionSchedule, lr_at  # noqa: E402

PLAIN = "plain loop"  # the reference row's name


@dataclass(frozen=True)
class Settings:
    """What every recipe shares: model, size, batch, schedule (the plain loop uses the same)."""

    arch: str = "resnet18"
    width: int = 16
    target_size: int = 64          # px: shorter side (short_side) or sqrt(area)
    batch_size: int = 64
    lr: float = 0.1                # peak, for the batch (the seed's default --lr)
    epochs: int = 10
    label_smoothing: float = 0.1   # the trainer's default, used by the plain loop too
    weight_decay: float = 1e-4
    ema_decay: float = 0.99        # per step: a time constant of 100 steps (~1.3 epochs of 5,000 images)
    workers: int = 1               # decode processes per run
    # torch threads per run (OMP_NUM_THREADS): on 2 cores shared with other people, 2 threads spin-wait for each
    # other whenever one is descheduled; measured 4-20x slower than 1 thread under load.
    threads: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    fixres_sizes: tuple[int, ...] = (32, 64, 96, 128)

    @property
    def warmup_epochs(self) -> float:
        return min(5.0, self.epochs / 10)  # the trainer's default warm-up


QUICK = Settings(width=8, target_size=32, batch_size=16, epochs=1, ema_decay=0.9, workers=0, seeds=(0,),
                 fixres_sizes=(32, 64))


@dataclass(frozen=True)
class Recipe:
    name: str
    group: str                     # (a)..(f) of the issue, or "best"
    what: str                      # what the row shows
    flags: tuple[str, ...] = ()    # rectrain train flags on top of the shared settings
    epochs: int | None = None      # None: Settings.epochs


NO_BATCH_AUG = ("--no_mixup", "--no_cutmix", "--no_random_erasing")
PLAIN_FLAGS = ("--train_crop", "resize", "--hflip", "0", "--max_ratio", "1.0", *NO_BATCH_AUG)

RECIPES = (
    Recipe("defaults", "a", "the seed's defaults: short_side buckets, random-resized crop 0.08-1, hflip 0.5, "
                            "MixUp/CutMix on half the batches, Random Erasing p=0.25"),
    Recipe("hflip 0", "b", "no horizontal flip", ("--hflip", "0")),
    Recipe("train_crop resize", "b", "whole image resized to its bucket, no random crop", ("--train_crop", "resize")),
    Recipe("crop_scale 0.35", "b", "random-resized crop area 0.35-1 instead of 0.08-1", ("--crop_scale", "0.35", "1")),
    Recipe("no batch aug", "b", "MixUp, CutMix and Random Erasing off", NO_BATCH_AUG),
    Recipe("square", "c", "square crops (--max_ratio 1.0)", ("--max_ratio", "1.0")),
    Recipe("rect area", "c", "rectangular crops with about the square's pixels (--rect_mode area)",
           ("--rect_mode", "area")),
    # 7 epochs at 32 px then 7 at 64: at 32 px an epoch takes ~0.4 of a 64 px one (measured on an idle machine:
    # 3,000 against 1,300 images/s), so 14 epochs cost about the fixed run's 10; the CPU s column checks it.
    Recipe("progressive 32->64", "d", "defaults with 32 px for epochs 1-7, 64 px for 8-14 (about the fixed "
                                      "run's time)", ("--res_schedule", "32:64:6:7"), epochs=14),
    Recipe("rectrain as plain", "f", "rectrain set up as the plain loop: whole image resized to a square, no flip, "
                                     "no batch augmentation", PLAIN_FLAGS),
    Recipe("plain recipe, buckets", "c", "the plain loop's recipe on rectangular buckets: whole image resized to its "
                                         "bucket, no flip, no batch augmentation",
           ("--train_crop", "resize", "--hflip", "0", *NO_BATCH_AUG)),
    # Chosen after the rows above, on the same validation images (so slightly flattered): every switch that
    # beat the defaults by more than its spread in rectrain's own validation (val 87.5%).
    Recipe("best", "best", "the switches that won, together: no flip, crop_scale 0.35-1, no batch augmentation",
           ("--hflip", "0", "--crop_scale", "0.35", "1", *NO_BATCH_AUG)),
)
QUICK_RECIPES = (RECIPES[0], RECIPES[4])
FIXRES_RECIPES = ("defaults", "best")  # test-time resolution table


# -- one rectrain run --------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def rectrain_argv(s: Settings, command: str) -> list[str]:
    """``env OMP_NUM_THREADS=N python -m rectrain COMMAND``."""
    return ["env", f"OMP_NUM_THREADS={s.threads}", sys.executable, "-m", "rectrain", command]


def train_flags(recipe: Recipe, s: Settings, seed: int, data_dir: str, out: str) -> list[str]:
    """The `rectrain train` flags of one run (validation at the end only: final top-1, no picking)."""
    epochs = recipe.epochs or s.epochs
    return ["--data_dir", data_dir, "--output", os.path.join(out, "runs"),
            "--run_name", f"{slug(recipe.name)}_s{seed}", "--device", "cpu", "--arch", s.arch,
            "--width", str(s.width), "--target_size", str(s.target_size), "--batch_size", str(s.batch_size),
            "--lr", str(s.lr), "--epochs", str(epochs), "--workers", str(s.workers), "--seed", str(seed),
            "--ema_decay", str(s.ema_decay), "--val_every", str(epochs), "--keep_checkpoints", "1",
            "--print_freq", "1000", "--progress", "off", *recipe.flags]


def train_argv(recipe: Recipe, s: Settings, seed: int, data_dir: str, out: str) -> list[str]:
    return rectrain_argv(s, "train") + train_flags(recipe, s, seed, data_dir, out)


RECORD = "bench_run.json"  # a finished run's result, beside its outputs


def recorded(record: str, field: str, value) -> dict | None:
    """The result saved in ``record`` when its ``field`` equals ``value`` (the same run), else None."""
    if not os.path.isfile(record):
        return None
    with open(record) as fh:
        done = json.load(fh)
    return done if done.get(field) == value else None


def run_train(argv: list[str], run_dir: str, fresh: bool) -> dict:
    """Train (or reuse a finished run of the same command) -> final top-1 raw and EMA, seconds."""
    record = os.path.join(run_dir, RECORD)
    done = None if fresh else recorded(record, "argv", argv)
    if done is not None:
        return done
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a stale or different run of this name
    t0, cpu0 = time.perf_counter(), children_cpu_s()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {shlex.join(argv)}\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    last = rows[-1]
    done = {"argv": argv, "acc1": last["val_acc1"], "acc1_ema": last.get("val_acc1_ema"),
            "train_s": sum(r["epoch_time_s"] or 0.0 for r in rows), "wall_s": time.perf_counter() - t0,
            "cpu_s": children_cpu_s() - cpu0}
    with open(record, "w") as fh:
        json.dump(done, fh)
    return done


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far, their DataLoader workers included.
    Unlike wall time, a run's CPU time barely changes when other people share the cores."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def final_checkpoint(run_dir: str) -> str:
    last = os.path.join(run_dir, "checkpoints", "last.pth")
    return last if os.path.isfile(last) else sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.pth")))[-1]


def eval_at(checkpoint: str, size: int, data_dir: str, s: Settings) -> float:
    """Top-1 of a checkpoint validated at ``size`` px (`rectrain eval --target_size`)."""
    argv = rectrain_argv(s, "eval") + ["--checkpoint", checkpoint, "--data_dir", data_dir, "--target_size", str(size),
                                       "--device", "cpu", "--workers", str(s.workers), "--json"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eval failed: {shlex.join(argv)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["val_acc1"]


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the in-process work (plain loop, evaluations) on ``n`` threads, as the rectrain runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float, ImageNet mean/std (as rectrain's DeviceNormalize)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


@torch.no_grad()
def eval_view(checkpoint: str, val: SplitScan, val_crop: float) -> float:
    """Top-1 of a checkpoint's raw weights with rectrain's rectangular validation, but keeping ``val_crop`` of
    each side of the image's largest box of its bucket's ratio: 0.875 is the trainer's own validation (the
    same pixels), 1.0 keeps the whole image, as the plain loop's validation does."""
    r = restore(checkpoint)
    buckets = inference_buckets(r.config)  # the run's own validation table
    tfm = RectangularCropTfm(train=False, val_crop=val_crop, decoder=r.config.decoder)
    ids, correct = buckets.assign(val.sizes), 0
    for b in np.unique(ids):
        members = np.flatnonzero(ids == b)
        for chunk in np.array_split(members, -(-len(members) // 256)):
            x = np.stack([tfm(val.index.abspath(i), buckets.shape(b), size_hw=tuple(val.sizes[i])) for i in chunk])
            pred = r.model(normalise(torch.from_numpy(x).permute(0, 3, 1, 2))).argmax(1)
            correct += int((pred == torch.from_numpy(val.index.labels[chunk])).sum())
    return 100.0 * correct / len(ids)


# -- the plain reference loop (f) ---------------------------------------------------------------------------
def load_square(split_dir: str, size: int, classes: list[str], crop: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``split_dir`` (centre ``crop`` of each side, then) squashed to size x size:
    (N, 3, size, size) uint8 and (N,) int64 labels in ``classes`` order."""
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        for f in sorted(os.listdir(folder)):
            im = Image.open(os.path.join(folder, f)).convert("RGB")
            w, h = im.size
            box = ((1 - crop) * w / 2, (1 - crop) * h / 2, (1 + crop) * w / 2, (1 + crop) * h / 2)
            images.append(np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box)))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def plain_loop(data_dir: str, s: Settings, seed: int) -> dict:
    """The floor to beat: a standard loop over in-memory squares, same model/optimizer/schedule/loss."""
    classes = sorted(d for d in os.listdir(os.path.join(data_dir, "train"))
                     if os.path.isdir(os.path.join(data_dir, "train", d)))
    x, y = load_square(os.path.join(data_dir, "train"), s.target_size, classes)
    torch.manual_seed(seed)
    model = build_model(s.arch, num_classes=len(classes), width=s.width)
    opt = torch.optim.SGD(param_groups(model, s.weight_decay), lr=s.lr, momentum=0.9)
    steps = len(x) // s.batch_size  # per epoch; the last partial batch is dropped
    total, warmup = s.epochs * steps, round(s.warmup_epochs * steps)
    t0, cpu0, step = time.perf_counter(), time.process_time(), 0
    for _ in range(s.epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(steps):
            idx = order[i * s.batch_size:(i + 1) * s.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s.lr, total, warmup)
            loss = F.cross_entropy(model(normalise(x[idx])), y[idx], label_smoothing=s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    model.eval()
    accs = {}
    for key, crop in (("acc1", 0.875), ("acc1_whole", 1.0)):  # rectrain's centre 87.5% of each side; whole image
        vx, vy = load_square(os.path.join(data_dir, "val"), s.target_size, classes, crop)
        with torch.no_grad():
            pred = torch.cat([model(normalise(b)).argmax(1) for b in vx.split(256)])
        accs[key] = 100.0 * (pred == vy).float().mean().item()
    return {**accs, "acc1_ema": None, "train_s": train_s, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0, "train_cpu_s": train_cpu_s}


def run_plain(data_dir: str, s: Settings, seed: int, run_dir: str, fresh: bool) -> dict:
    """``plain_loop``, or its recorded result for the same settings and data."""
    key = {"data_dir": data_dir, "seed": seed, **dataclasses.asdict(s)}
    del key["seeds"], key["fixres_sizes"]  # not part of one run
    record = os.path.join(run_dir, RECORD)
    done = None if fresh else recorded(record, "key", key)
    if done is not None:
        return done
    with torch_threads(s.threads):
        done = {"key": key, "argv": None, **plain_loop(data_dir, s, seed)}
    os.makedirs(run_dir, exist_ok=True)
    with open(record, "w") as fh:
        json.dump(done, fh)
    return done


# -- bookkeeping ----------------------------------------------------------------------------------------------
def mean_pixels(sizes: np.ndarray, recipe: Recipe, s: Settings) -> float:
    """Mean H*W of a training crop over images and epochs, from the recipe's bucket table(s)."""
    flags = list(recipe.flags)
    opt = lambda name, default: flags[flags.index(name) + 1] if name in flags else default  # noqa: E731
    if recipe.name == PLAIN:
        return float(s.target_size ** 2)
    table = make_buckets(s.target_size, opt("--rect_mode", "short_side"), float(opt("--max_ratio", 2.0)))
    epochs = recipe.epochs or s.epochs
    if "--res_schedule" in flags:
        schedule = ResolutionSchedule.parse(opt("--res_schedule", None))
        table = make_buckets(schedule.end, table.mode, table.max_ratio)
        shapes = [table.scaled(schedule.at(e)) for e in range(epochs)]
    else:
        shapes = [table.shapes] * epochs
    ids = table.assign(sizes)
    return float(np.mean([np.mean(sh[ids, 0] * sh[ids, 1]) for sh in shapes]))


def summarize(values: list[float | None]) -> dict | None:
    """mean, sample std (0 for one seed), min, max, n; None when no value."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v)}


def fmt(stat: dict | None, spread: bool = True) -> str:
    if stat is None:
        return "-"
    if not spread or stat["n"] == 1:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} ({stat['min']:.1f}-{stat['max']:.1f})"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores usable (load average {os.getloadavg()[0]:.1f} at the "
            f"end), torch {torch.__version__}, Python {platform.python_version()}")


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


# -- the benchmark ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", help="an ImageFolder with train/ and val/ (e.g. from fashion_folder.py)")
    p.add_argument("--out", default="bench_accuracy", help="folder for runs/, results.json and results.md")
    p.add_argument("--quick", action="store_true", help="CI-sized: synthetic data, 1 epoch, 1 seed, 2 recipes + plain")
    p.add_argument("--only", help="comma-separated recipe names to run (default: all; 'plain loop' is one)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: 3; quick: 1)")
    p.add_argument("--epochs", type=int, help="epochs of the fixed-resolution runs (default: 10)")
    p.add_argument("--width", type=int, help="ResNet stem width (default: 16)")
    p.add_argument("--no_fixres", action="store_true", help="skip the test-time resolution table")
    p.add_argument("--fresh", action="store_true", help="retrain runs that finished before")
    return p.parse_args(argv)


def setup(args) -> tuple[Settings, tuple[Recipe, ...], str]:
    s = QUICK if args.quick else Settings()
    changes = {k: v for k, v in (("epochs", args.epochs), ("width", args.width)) if v is not None}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    s = dataclasses.replace(s, **changes)
    recipes = (QUICK_RECIPES if args.quick else RECIPES) + (Recipe(PLAIN, "f", "the plain reference loop: whole "
               "image squashed to a square, no crop, no flip, no batch augmentation, same model/optimizer/"
               "schedule/label smoothing; validated on whole images (val crop 87.5% in the note)"),)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = set(names) - {r.name for r in recipes}
        if unknown:
            raise SystemExit(f"--only: unknown recipe(s) {sorted(unknown)}; known: {[r.name for r in recipes]}")
        recipes = tuple(r for r in recipes if r.name in names)
    data_dir = args.data_dir
    if args.quick and not data_dir:
        from rectrain.data.synth import make_synthetic
        data_dir = os.path.join(args.out, "synth")
        if not os.path.isdir(os.path.join(data_dir, "train")):
            make_synthetic(data_dir, classes=4, train_per_class=32, val_per_class=8, kind="tiny", seed=0)
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "train")):
        raise SystemExit("--data_dir must hold train/ and val/ (python /work/shared/data/fashion_folder.py DIR), "
                         "or use --quick")
    return s, recipes, os.path.abspath(data_dir)


@torch.no_grad()
def eval_squashed(checkpoint: str, data_dir: str) -> float:
    """Top-1 of a checkpoint's raw weights validated as the plain loop validates: each whole image squashed to
    target x target."""
    r = restore(checkpoint)
    x, y = load_square(os.path.join(data_dir, "val"), r.config.target_size, r.classes)
    pred = torch.cat([r.model(normalise(b)).argmax(1) for b in x.split(256)])
    return 100.0 * (pred == y).float().mean().item()


def with_extra_views(r: dict, recipe: Recipe, run_dir: str, val: SplitScan, s: Settings) -> dict:
    """Add ``acc1_whole`` (``eval_view`` with val_crop 1.0) to a rectrain run's record, and for rectrain set up as
    the plain loop ``acc1_squashed`` (``eval_squashed``); computed once, then kept in the record."""
    todo = {"acc1_whole": lambda: eval_view(final_checkpoint(run_dir), val, 1.0)}
    if recipe.flags == PLAIN_FLAGS:
        todo["acc1_squashed"] = lambda: eval_squashed(final_checkpoint(run_dir), os.path.dirname(val.index.split_dir))
    missing = {k: f for k, f in todo.items() if k not in r}
    if missing:
        with torch_threads(s.threads):
            r.update({k: f() for k, f in missing.items()})
        with open(os.path.join(run_dir, RECORD), "w") as fh:
            json.dump(r, fh)
    return r


def run_recipe(recipe: Recipe, s: Settings, data_dir: str, out: str, val: SplitScan, fresh: bool) -> list[dict]:
    runs = []
    for seed in s.seeds:
        t = time.perf_counter()
        run_dir = os.path.join(out, "runs", f"{slug(recipe.name)}_s{seed}")
        if recipe.name == PLAIN:
            r = run_plain(data_dir, s, seed, run_dir, fresh)
        else:
            r = run_train(train_argv(recipe, s, seed, data_dir, out), run_dir, fresh)
            r = with_extra_views(r, recipe, run_dir, val, s)
        runs.append({"seed": seed, **r})
        ema = f", EMA {r['acc1_ema']:.2f}" if r.get("acc1_ema") is not None else ""
        print(f"  {recipe.name} seed {seed}: top-1 {r['acc1']:.2f} (whole image {r['acc1_whole']:.2f}{ema}), "
              f"train {r['train_s']:.0f} s ({time.perf_counter() - t:.0f} s)", flush=True)
    return runs


def fixres_table(rows: list[dict], s: Settings, data_dir: str, out: str) -> list[dict]:
    table = []
    for row in rows:
        if row["name"] not in FIXRES_RECIPES:
            continue
        per_size = {}
        for size in s.fixres_sizes:
            accs = [eval_at(final_checkpoint(os.path.join(out, "runs", f"{slug(row['name'])}_s{seed}")), size, data_dir,
                            s) for seed in s.seeds]
            per_size[str(size)] = summarize(accs)
        table.append({"name": row["name"], "train_size": s.target_size, "acc1_at": per_size})
        print(f"  FixRes {row['name']}: " + ", ".join(f"{k} px {fmt(v, False)}" for k, v in per_size.items()),
              flush=True)
    return table


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Accuracy benchmark ({'quick' if result['quick'] else 'full'})", "",
             f"- command: `{result['command']}`", f"- machine: {result['machine']}",
             f"- commit: {result['commit']}", f"- date: {result['date']}",
             f"- data: {result['data']['dir']} ({result['data']['train']:,} train / {result['data']['val']:,} val "
             f"images, {result['data']['classes']} classes)",
             f"- model: {s['arch']} width {s['width']}, target {s['target_size']} px, batch {s['batch_size']}, "
             f"lr {s['lr']}, {s['epochs']} epochs (warm-up {s['warmup_epochs']:g}), label smoothing "
             f"{s['label_smoothing']}, EMA decay {s['ema_decay']}, seeds {s['seeds']}, {s['workers']} loader "
             f"worker(s) and {s['threads']} torch thread(s) per run", "",
             "Final top-1 (%) of the last epoch's weights, mean ± sample std (min-max) over seeds, two ways: "
             "**val 87.5%**: rectrain's validation (the centre 87.5% of each side of the image's largest box of "
             "its bucket's ratio; for the plain loop, the centre 87.5% squashed to a square); **whole**: the whole "
             "image (rectrain's buckets with nothing cropped; the plain loop's own validation). EMA: the EMA "
             "weights, val 87.5%. Δ: against the defaults. train s: wall seconds of the training epochs; CPU s: "
             "CPU seconds of the whole run (start-up, decoding, training, validation), which other users of the "
             "cores disturb far less than wall time; px/image: mean pixels of a training crop.", "",
             "| | recipe | top-1 val 87.5% | Δ | top-1 whole | Δ | EMA, val 87.5% | train s | CPU s | px/image "
             "| flags |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    by_name = {r["name"]: r for r in result["rows"]}

    def delta(r, key):
        base = by_name.get("defaults", {}).get(key)
        return f"{r[key]['mean'] - base['mean']:+.2f}" if base and r[key] else "-"

    for r in result["rows"]:
        flags = " ".join(r["flags"]) if r["name"] != PLAIN else "(benchmark's own loop)"
        cpu = f"{r['cpu_s']['mean']:.0f}" if r["cpu_s"] else "-"
        lines.append(f"| {r['group']} | {r['name']} | {fmt(r['acc1'])} | {delta(r, 'acc1')} | {fmt(r['acc1_whole'])} "
                     f"| {delta(r, 'acc1_whole')} | {fmt(r['acc1_ema'])} | {r['train_s']['mean']:.0f} | {cpu} | "
                     f"{r['pixels']:,.0f} | `{flags}` |")
    for r in result["rows"]:
        if r.get("acc1_squashed"):
            lines += ["", f"{r['name']}, validated as the plain loop validates (each whole image squashed to a "
                          f"square): {fmt(r['acc1_squashed'])}."]
    if result.get("fixres"):
        sizes = list(result["fixres"][0]["acc1_at"])
        lines += ["", "Test-time resolution (FixRes): final checkpoints (raw weights) trained at "
                      f"{s['target_size']} px, evaluated with `rectrain eval --target_size S`:", "",
                  "| recipe | " + " | ".join(f"{x} px" for x in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for f in result["fixres"]:
            lines.append(f"| {f['name']} | " + " | ".join(fmt(f["acc1_at"][x], False) for x in sizes) + " |")
    lines += ["", "One command per row (seed 0):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    s, recipes, data_dir = setup(args)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    train_scan = scan_split(data_dir, "train", cache_dir=out)
    val_scan = scan_split(data_dir, "val", classes=train_scan.index.classes, cache_dir=out)
    print(f"{len(recipes)} recipe(s) x {len(s.seeds)} seed(s) on {data_dir}; machine: {machine()}", flush=True)
    rows = []
    for recipe in recipes:
        runs = run_recipe(recipe, s, data_dir, out, val_scan, args.fresh)
        cmd = train_argv(recipe, s, s.seeds[0], data_dir, out) if recipe.name != PLAIN else None
        rows.append({"name": recipe.name, "group": recipe.group, "what": recipe.what, "flags": list(recipe.flags),
                     "epochs": recipe.epochs or s.epochs, "runs": runs,
                     "acc1": summarize([r["acc1"] for r in runs]), "acc1_ema": summarize([r["acc1_ema"] for r in runs]),
                     "acc1_whole": summarize([r["acc1_whole"] for r in runs]),
                     "acc1_squashed": summarize([r.get("acc1_squashed") for r in runs]),
                     "train_s": summarize([r["train_s"] for r in runs]),
                     "cpu_s": summarize([r.get("cpu_s") for r in runs]),
                     "pixels": mean_pixels(train_scan.sizes, recipe, s),
                     "command": shlex.join([*cmd[:2], "python", *cmd[3:]]) if cmd else
                     f"python benchmarks/bench_accuracy.py --data_dir {data_dir} --only '{PLAIN}'"})
    fixres = [] if args.no_fixres else fixres_table(rows, s, data_dir, out)
    result = {"quick": args.quick, "command": shlex.join(["python", "benchmarks/bench_accuracy.py",
                                                          *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine(), "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "data": {"dir": data_dir, "train": len(train_scan.index), "val": len(val_scan.index),
                       "classes": len(train_scan.index.classes)},
              "settings": {**dataclasses.asdict(s), "warmup_epochs": s.warmup_epochs}, "rows": rows, "fixres": fixres}
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    text = markdown(result)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
