"""Run outputs: where a run writes, per-epoch and per-interval metrics, the curves plot and the summary.

What is written where, under ``{output}/{run_name}/`` (e.g. ``runs_rect_ddp/demo/``):

- ``logs/rank{R}.log``: every rank's log.
- rank 0 only:
  - ``config.json``: the resolved configuration (written by the trainer).
  - ``metrics.jsonl`` and ``metrics.csv``: one row per epoch (``EPOCH_FIELDS``; keys a row lacks are
    empty CSV cells, so the table stays rectangular when e.g. validation runs every k epochs).
  - ``steps.jsonl``: one row per print interval (``STEP_FIELDS``): the step, the fractional epoch, the
    learning rate, the running train loss, images/s and the data-wait share of that interval.
  - ``curves.png``: train/val loss (log axis), top-1/top-5, the learning rate per interval (so
    warm-up shows) and images/s per epoch; redrawn atomically at the end of every epoch.
  - ``tensorboard/``: the same scalars, only when the ``tensorboard`` package is installed
    (epoch rows under their own names against the epoch, interval rows under ``step/...`` against the
    step). View with ``tensorboard --logdir runs_rect_ddp`` (one curve per run).
  - ``summary.json``: best/final accuracy, time, mean images/s (written by the trainer).

Every file is rewritten whole and atomically (``rectrain.runtime.io``): a kill or a full disk never leaves half a
row, and a resumed run reads back exactly what was there. The epoch files (and ``config.json``, ``summary.json``)
are fsynced; ``steps.jsonl``, rewritten every print interval, is fsynced with each epoch's row (in between an fsync
per interval would cost more than it protects: a power loss loses at most those intervals, which the last
checkpoint does not hold either). The plot is ``rectrain.runtime.plot``'s; a failed plot prints a warning and
never stops training. The per-rank logs are ``rectrain.runtime.logs``'.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass

from rectrain.runtime.io import atomic_write, write_json_atomic
from rectrain.runtime.plot import plot_curves

__all__ = ["RunPaths", "EPOCH_FIELDS", "STEP_FIELDS", "MetricsWriter", "write_summary", "closing_lines"]


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: ``{output}/{run_name}/``, its ``checkpoints/`` and ``logs/``."""

    run_dir: str
    ckpt_dir: str
    log_dir: str

    @classmethod
    def of(cls, output: str, run_name: str) -> "RunPaths":
        run_dir = os.path.join(output, run_name)
        return cls(run_dir, os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "logs"))


EPOCH_FIELDS = ["epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "images_per_sec",
                "data_wait_frac", "epoch_time_s",
                # optional: written only by runs that have them (EMA weights, progressive resizing, ...)
                "val_acc1_ema", "val_acc5_ema", "val_loss_ema",
                "resolution",      # training image side in px (progressive resizing)
                "warmup_s"]        # seconds spent on one-off warm-up (compile, cudnn autotune) this epoch
STEP_FIELDS = ["step", "epoch", "lr", "train_loss", "images_per_sec", "data_wait_frac"]


class MetricsWriter:
    """Rank 0's metric files: epoch rows (metrics.jsonl/csv), interval rows (steps.jsonl), curves.png.

    ``resume_epoch`` is the 1-based epoch the run is about to (re)start. The files already in
    ``run_dir`` are read back and cut so they describe one consistent history: epoch rows with
    ``epoch >= resume_epoch`` are dropped, and so are interval rows with ``epoch > resume_epoch - 1``
    (their fractional epoch lies past the end of the last completed epoch). After a mid-epoch resume
    the dropped rows of the interrupted epoch are not all logged again (training continues from the
    saved batch), so steps.jsonl may show a gap there; nothing is ever duplicated. Without
    ``resume_epoch`` the files start empty.
    """

    def __init__(self, run_dir: str, resume_epoch: int | None = None):
        self.run_dir = run_dir
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")
        self.steps_jsonl = os.path.join(run_dir, "steps.jsonl")
        self.png = os.path.join(run_dir, "curves.png")
        self.rows: list[dict] = []   # epoch rows, oldest first
        self.steps: list[dict] = []  # interval rows, oldest first
        if resume_epoch is not None:
            self.rows = [r for r in _read_jsonl(self.jsonl) if r.get("epoch", 0) < resume_epoch]
            self.steps = [r for r in _read_jsonl(self.steps_jsonl) if r.get("epoch", 0) <= resume_epoch - 1]
        self._step_lines = [json.dumps(r) + "\n" for r in self.steps]  # encoded once: rewrites only join them
        self._write_epochs()
        self._write_steps(fsync=True)
        self.tb = _tensorboard(os.path.join(run_dir, "tensorboard"))

    def _write_epochs(self) -> None:
        atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        text = io.StringIO(newline="")
        w = _csv_writer(text)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.csv, text.getvalue())

    def _write_steps(self, fsync: bool) -> None:
        atomic_write(self.steps_jsonl, "".join(self._step_lines), fsync=fsync)

    def add(self, row: dict) -> None:
        """Append one epoch row (and make the interval rows durable with it), then redraw curves.png."""
        self.rows.append(row)
        self._write_epochs()
        self._write_steps(fsync=True)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and _finite(v):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        self.redraw()

    def add_interval(self, row: dict) -> None:
        """Append one print-interval row (``STEP_FIELDS``) to steps.jsonl; the plot waits for the epoch end."""
        self.steps.append(row)
        self._step_lines.append(json.dumps(row) + "\n")
        self._write_steps(fsync=False)
        if self.tb is not None:  # no flush: SummaryWriter flushes on its own timer and at close()
            for k, v in row.items():
                if k != "step" and _finite(v):
                    self.tb.add_scalar(f"step/{k}", v, row["step"])

    def redraw(self) -> None:
        try:
            plot_curves(self.rows, self.png, steps=self.steps, title=os.path.basename(os.path.normpath(self.run_dir)))
        except Exception as e:  # a plot must never stop a training run
            print(f"warning: could not draw {self.png} ({type(e).__name__}: {e}); training continues",
                  file=sys.stderr)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _csv_writer(f) -> csv.DictWriter:
    # restval="": a row without an optional key gets an empty cell, never a shifted column.
    return csv.DictWriter(f, fieldnames=EPOCH_FIELDS, restval="", extrasaction="ignore")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_summary(paths: RunPaths, rows: list[dict], total_s: float, run: dict) -> dict:
    """``summary.json``: best and final top-1/top-5, time, mean images/s, warm-up time, plus ``run``'s keys."""
    vals = [r for r in rows if r.get("val_acc1") is not None]
    best = max(vals, key=lambda r: r["val_acc1"]) if vals else {}
    ips = [r["images_per_sec"] for r in rows if r.get("images_per_sec")]
    summary = {
        "epochs": len(rows), "best_acc1": best.get("val_acc1"), "best_acc5": best.get("val_acc5"),
        "best_epoch": best.get("epoch"),
        "final_acc1": vals[-1]["val_acc1"] if vals else None, "final_acc5": vals[-1]["val_acc5"] if vals else None,
        "total_time_s": total_s, "mean_images_per_sec": sum(ips) / len(ips) if ips else None,
        "warmup_s": sum(r.get("warmup_s") or 0.0 for r in rows), **run,
    }
    write_json_atomic(os.path.join(paths.run_dir, "summary.json"), summary)
    return summary


def closing_lines(paths: RunPaths, summary: dict) -> str:
    """The end of a run: the best top-1, and where every output went."""
    best = (f"best top-1 {summary['best_acc1']:.2f}% (epoch {summary['best_epoch']})"
            if summary.get("best_acc1") is not None else "no validation (no val/ folder, or --val_every beyond the run)")
    return (f"done in {summary['total_time_s']:.0f} s: {best}\n"
            f"  checkpoints: {paths.ckpt_dir}\n  logs:        {paths.log_dir}\n"
            f"  metrics:     {os.path.join(paths.run_dir, 'metrics.csv')} (and metrics.jsonl, steps.jsonl)\n"
            f"  plot:        {os.path.join(paths.run_dir, 'curves.png')}\n"
            f"  summary:     {os.path.join(paths.run_dir, 'summary.json')}")
