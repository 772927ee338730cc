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
  - ``trackers.json``: the ids of the W&B / MLflow runs that ``--log_to`` sends the same rows to
    (``rectrain.runtime.trackers``), so that a resumed run continues them.

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

    A resumed run passes where it continues from: ``completed`` epochs (its checkpoint's ``epoch``) and
    ``position``, the same in fractional epochs (``epoch + batch_in_epoch / steps_per_epoch``). The files already in
    ``run_dir`` are read back and cut to the history that led to that checkpoint: epoch rows of later epochs and
    interval rows past ``position`` (written after the checkpoint by a run that was then killed) are dropped and will
    be written again; every row up to the checkpoint is kept, so a stopped-and-resumed run ends with the records
    of an uninterrupted one. ``checkpoint_row``: the epoch row the checkpoint itself holds, restored when the file
    lacks it (a kill between a save and its row). A line that cannot be read (a torn write of an older rectrain) is
    dropped, and the files are rewritten whole. Without ``completed`` the files start empty.
    """

    def __init__(self, run_dir: str, completed: int | None = None, position: float | None = None,
                 checkpoint_row: dict | None = None, log=None, trackers=None):
        self.run_dir = run_dir
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")
        self.steps_jsonl = os.path.join(run_dir, "steps.jsonl")
        self.png = os.path.join(run_dir, "curves.png")
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.rows: list[dict] = []   # epoch rows, oldest first
        self.steps: list[dict] = []  # interval rows, oldest first
        self.notes: list[str] = []   # what was repaired on reading the files back
        if completed is not None:
            self.rows = [r for r in self._read(self.jsonl) if r.get("epoch", 0) <= completed]
            end = completed if position is None else position
            self.steps = [r for r in self._read(self.steps_jsonl) if r.get("epoch", 0) <= end + 1e-9]
            row = {k: v for k, v in (checkpoint_row or {}).items() if k != "is_best"}
            if row.get("epoch") == completed and completed not in {r.get("epoch") for r in self.rows}:
                self.rows.append(row)
                self.notes.append(f"note: the metrics row of epoch {completed} was missing from {self.jsonl} (the run "
                                  "was stopped between its checkpoint and the row): restored from the checkpoint")
        self._step_lines = [json.dumps(r) + "\n" for r in self.steps]  # encoded once: rewrites only join them
        self._warned_folder = False
        os.makedirs(run_dir, exist_ok=True)
        self._write_epochs()
        self._write_steps(fsync=True)
        self.tb = _tensorboard(os.path.join(run_dir, "tensorboard"))
        # rectrain.runtime.trackers.Trackers (--log_to) or None: sent the same rows from when it is set (the trainer
        # sets it once the DataLoader workers have forked: a fork while a tracker's thread imports could hang a worker).
        self.trackers = trackers

    def _read(self, path: str) -> list[dict]:
        rows, bad = _read_jsonl(path)
        if bad:
            self.notes.append(f"note: {bad} unreadable line(s) of {path} dropped (a torn write): the file is rewritten")
        return rows

    def _folder(self) -> None:
        """The run folder, recreated (with a warning, once) if it disappeared while the run was writing to it."""
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir, exist_ok=True)
            if not self._warned_folder:
                self._warned_folder = True
                self.log(f"warning: the run folder {self.run_dir} was removed while the run wrote to it: recreated "
                         "(the records before now are lost; checkpoints are written again from the next one on)")

    def _write_epochs(self) -> None:
        self._folder()
        atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        text = io.StringIO(newline="")
        w = _csv_writer(text)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.csv, text.getvalue())

    def _write_steps(self, fsync: bool) -> None:
        self._folder()
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
        if self.trackers is not None:
            self.trackers.epoch(row)
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
        if self.trackers is not None:
            self.trackers.interval(row)

    def redraw(self) -> None:
        try:
            plot_curves(self.rows, self.png, steps=self.steps, title=os.path.basename(os.path.normpath(self.run_dir)))
        except Exception as e:  # a plot must never stop a training run
            print(f"warning: could not draw {self.png} ({type(e).__name__}: {e}); training continues",
                  file=sys.stderr)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close()


def _csv_writer(f) -> csv.DictWriter:
    # restval="": a row without an optional key gets an empty cell, never a shifted column.
    return csv.DictWriter(f, fieldnames=EPOCH_FIELDS, restval="", extrasaction="ignore")


def _read_jsonl(path: str) -> tuple[list[dict], int]:
    """The rows of a JSON-lines file, and how many lines could not be read."""
    if not os.path.exists(path):
        return [], 0
    rows, bad = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_summary(paths: RunPaths, rows: list[dict], total_s: float, run: dict, steps: list[dict] | None = None,
                  stopped: dict | None = None) -> dict:
    """``summary.json``: best and final top-1/top-5, time, mean images/s, warm-up time, plus ``run``'s keys.

    ``stopped``: the validation of a run that ended inside an epoch (``--max_steps``), at its ``step`` and fractional
    ``epoch``: the final accuracy (the best stays the best epoch row's). ``steps``: interval rows, for the mean
    images/s of a run without a whole epoch."""
    vals = [r for r in rows if r.get("val_acc1") is not None]
    best = max(vals, key=lambda r: r["val_acc1"]) if vals else {}
    final = stopped or (vals[-1] if vals else {})
    ips = [r["images_per_sec"] for r in rows if r.get("images_per_sec")] or \
        [r["images_per_sec"] for r in steps or [] if r.get("images_per_sec")]
    summary = {
        "epochs": len(rows), "best_acc1": best.get("val_acc1"), "best_acc5": best.get("val_acc5"),
        "best_epoch": best.get("epoch"), "final_acc1": final.get("val_acc1"), "final_acc5": final.get("val_acc5"),
        "final_epoch": final.get("epoch"),
        "total_time_s": total_s, "mean_images_per_sec": sum(ips) / len(ips) if ips else None,
        "warmup_s": sum(r.get("warmup_s") or 0.0 for r in rows), **run,
    }
    write_json_atomic(os.path.join(paths.run_dir, "summary.json"), summary)
    return summary


def closing_lines(paths: RunPaths, summary: dict, no_validation: str = "no val/ folder") -> str:
    """The end of a run: the best top-1 (or the last validation, or why there was none), and where every output
    went."""
    if summary.get("best_acc1") is not None:
        result = f"best top-1 {summary['best_acc1']:.2f}% (epoch {summary['best_epoch']})"
        if summary.get("final_epoch") not in (None, summary["best_epoch"]):
            result += f", last {summary['final_acc1']:.2f}% (epoch {summary['final_epoch']:.4g})"
    elif summary.get("final_acc1") is not None:
        result = f"top-1 {summary['final_acc1']:.2f}% at the stop (epoch {summary['final_epoch']:.3g})"
    else:
        result = f"no validation ({no_validation})"
    return (f"done in {summary['total_time_s']:.0f} s: {result}\n"
            f"  checkpoints: {paths.ckpt_dir}\n  logs:        {paths.log_dir}\n"
            f"  metrics:     {os.path.join(paths.run_dir, 'metrics.csv')} (and metrics.jsonl, steps.jsonl)\n"
            f"  plot:        {os.path.join(paths.run_dir, 'curves.png')}\n"
            f"  summary:     {os.path.join(paths.run_dir, 'summary.json')}")
