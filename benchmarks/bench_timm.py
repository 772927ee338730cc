"""timm's own train.py on the same image folder: images/s over K training steps after S, for the side-by-side figure.

timm's pip package does not ship train.py, and timm's code is never committed here: ``--timm_dir`` (default
``.device/timm``, git-ignored) holds copies of it, one per timm release (``train-1.0.28.py``, ...; how to make
them: docs/benchmarks.md). The newest copy not newer than the installed timm is imported and its ``main()`` runs
in this process with the settings below. The one change: its training loader (made by timm's ``create_loader``,
with timm's prefetcher and fast collate) is wrapped so that the epoch ends after ``--skip + --steps`` batches,
and the last ``--steps`` are timed between two device synchronisations, as ``rectrain bench e2e`` times ours.
timm then validates and saves a checkpoint as usual, outside the timed window.

Settings, chosen so that timm does the same work per image as our run: resnet50, ``--amp --amp-dtype bfloat16
--channels-last``, the same batch size and workers, SGD (momentum 0.9, lr 0.1, weight decay 1e-4), label
smoothing 0.1, MixUp 0.2 or CutMix 1.0 on half the batches (``--mixup-prob 0.5``, switch 0.5), Random Erasing
0.25, RandomResizedCrop (0.08-1) with bilinear interpolation and a flip, no colour jitter (ours has none),
pinned memory on CUDA, no torch.compile (ours runs eager too).

    python benchmarks/bench_timm.py --data_dir D --batch_size 256 --workers 16 --steps 30 --skip 10 --json

Prints one ``skipped: ...`` line (or JSON with "skipped") and exits 0 when timm or the copies are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback

import torch

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".device", "timm")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--timm_dir", default=DEFAULT_DIR, help="folder holding train-<version>.py copies of timm's train.py")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--skip", type=int, default=10, help="untimed steps first (cuDNN autotuning, pipeline fill)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def version_key(text: str) -> tuple:
    """'1.0.29.dev0' -> (1, 0, 29, 0, 0); '1.0.28' -> (1, 0, 28, 1, 0): a pre-release sorts before its release."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)(?:\.?(dev|rc|a|b)(\d+))?", text)
    if not m:
        return (0, 0, 0, 0, 0)
    major, minor, patch = (int(v) for v in m.group(1, 2, 3))
    return (major, minor, patch, 0 if m.group(4) else 1, int(m.group(5) or 0))


def pick_train_py(timm_dir: str, installed: str) -> str | None:
    """The newest train-<version>.py not newer than the installed timm (the oldest when all are newer)."""
    copies = {os.path.basename(p)[len("train-"):-len(".py")]: p for p in glob.glob(os.path.join(timm_dir, "train-*.py"))}
    if not copies:
        return None
    ordered = sorted(copies, key=version_key)
    fitting = [v for v in ordered if version_key(v) <= version_key(installed)]
    return copies[fitting[-1] if fitting else ordered[0]]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepWindow:
    """timm's training loader cut to ``skip + steps`` batches per epoch; the last ``steps`` are timed.

    Timing runs from a device sync before batch ``skip`` is fetched to a device sync after the last batch's step
    (timm asks for the next batch only after finishing a step). ``wait``: seconds spent fetching batches inside
    the window (timm's loader and prefetcher). Attributes timm reads (``dataset``, ``sampler``, ...) are the
    wrapped loader's."""

    def __init__(self, loader, skip: int, steps: int, device: str):
        self.loader, self.skip, self.steps, self.device = loader, skip, steps, device
        self.t0 = self.t1 = None
        self.wait = 0.0

    def __len__(self) -> int:
        return self.skip + self.steps

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)

    def __iter__(self):
        it = iter(self.loader)
        for i in range(self.skip + self.steps):
            if i == self.skip:
                sync(self.device)
                self.t0 = time.perf_counter()
            tw = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:  # a dataset smaller than the window: carry on with another pass
                it = iter(self.loader)
                batch = next(it)
            if i >= self.skip:
                self.wait += time.perf_counter() - tw
            yield batch
        sync(self.device)
        self.t1 = time.perf_counter()


def timm_argv(args, out_dir: str, classes: int) -> list[str]:
    cuda = args.device.startswith("cuda")
    return ["--data-dir", args.data_dir, "--train-split", "train", "--val-split", "val", "--model", args.model,
            "--num-classes", str(classes), "--device", args.device,
            "--amp", "--amp-dtype", "bfloat16", *(["--channels-last", "--pin-mem"] if cuda else []),
            "-b", str(args.batch_size), "-j", str(args.workers), "--epochs", "1", "--warmup-epochs", "0",
            "--sched", "cosine", "--opt", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
            "--smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0", "--mixup-prob", "0.5", "--reprob", "0.25",
            "--color-jitter", "0", "--train-interpolation", "bilinear", "--log-interval", "10",
            "--checkpoint-hist", "1", "--output", out_dir, "--experiment", "bench", "--seed", "42"]


def run_timm(args) -> dict:
    try:
        import timm
    except ImportError as e:
        return {"skipped": f"timm is not installed ({e})"}
    path = pick_train_py(args.timm_dir, timm.__version__)
    if path is None:
        return {"skipped": f"no train-<version>.py in {args.timm_dir}: copy timm's train.py there (docs/benchmarks.md)"}
    classes = len([d for d in os.scandir(os.path.join(args.data_dir, "train")) if d.is_dir()])
    spec = importlib.util.spec_from_file_location("timm_train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    windows = []
    create_loader = module.create_loader

    def windowed_create_loader(*a, **kw):
        loader = create_loader(*a, **kw)
        if kw.get("is_training"):
            windows.append(StepWindow(loader, args.skip, args.steps, args.device))
            return windows[-1]
        return loader

    module.create_loader = windowed_create_loader  # train.py calls it by this global name
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="timm_bench_") as out_dir:
        argv = timm_argv(args, out_dir, classes)
        saved, sys.argv = sys.argv, ["train.py", *argv]
        t0 = time.perf_counter()
        try:
            module.main()
        finally:
            sys.argv = saved
        wall = time.perf_counter() - t0
    w = windows[0] if windows else None
    if w is None or w.t1 is None:
        return {"skipped": "timm's train.py finished without running the timed window"}
    seconds = w.t1 - w.t0
    return {"bench": "timm", "timm": timm.__version__, "train_py": os.path.basename(path),
            "images_per_sec": args.steps * args.batch_size / seconds, "data_wait_frac": w.wait / seconds,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
            "timed_steps": args.steps, "skip_steps": args.skip, "batch_size": args.batch_size, "workers": args.workers,
            "wall_s": wall, "argv": argv}


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # timm's log lines
        try:
            res = run_timm(args)
        except Exception as e:  # timm's script against another timm, a CUDA error: say so, keep the session going
            traceback.print_exc()
            res = {"skipped": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    if args.json:
        print(json.dumps(res))
    elif "skipped" in res:
        print(f"skipped: {res['skipped']}")
    else:
        print(f"timm {res['timm']} ({res['train_py']}): {res['images_per_sec']:,.1f} images/s over {res['timed_steps']} "
              f"steps after {res['skip_steps']} (data wait {100 * res['data_wait_frac']:.1f}%), batch {res['batch_size']}, "
              f"{res['workers']} workers" + (f", peak {res['peak_mem_gb']:.1f} GiB" if res["peak_mem_gb"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
