"""Run outputs: per-rank logs, per-epoch and per-interval metrics, the curves plot and the summary.

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

The plot uses matplotlib on its Agg canvas (files only, never a window; pyplot is not imported), and
matplotlib is imported only when a plot is drawn, so importing this module stays cheap. A failed plot
prints a warning and never stops training.

Epoch numbers: an epoch row's ``epoch`` is 1-based (row 3 describes the third epoch and is drawn at
x = 3); an interval row's ``epoch`` counts epochs completed as a fraction
(``epoch_index + batch_in_epoch / steps_per_epoch``: 2.25 is a quarter into the third epoch, 3.0 its
end), so both kinds of row share one x axis.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass


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


def setup_rank_logger(log_dir: str, rank: int, echo: bool) -> logging.Logger:
    """Every rank logs to ``logs/rank{R}.log``; the primary also echoes to stdout."""
    os.makedirs(log_dir, exist_ok=True)
    logger = logging.getLogger(f"rectrain.rank{rank}.{os.path.abspath(log_dir)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fh = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s rank" + str(rank) + " %(message)s"))
    logger.addHandler(fh)
    if echo:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    return logger


class _TqdmHandler(logging.Handler):
    """Print above a live progress bar instead of through it."""

    def emit(self, record):
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


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
        self._rewrite()
        self.tb = _tensorboard(os.path.join(run_dir, "tensorboard"))

    def _rewrite(self) -> None:
        _write_jsonl(self.jsonl, self.rows)
        _write_jsonl(self.steps_jsonl, self.steps)
        with open(self.csv, "w", newline="") as f:
            w = _csv_writer(f)
            w.writeheader()
            w.writerows(self.rows)

    def add(self, row: dict) -> None:
        """Append one epoch row and redraw curves.png."""
        self.rows.append(row)
        _append_jsonl(self.jsonl, row)
        with open(self.csv, "a", newline="") as f:
            _csv_writer(f).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and _finite(v):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        self.redraw()

    def add_interval(self, row: dict) -> None:
        """Append one print-interval row (``STEP_FIELDS``) to steps.jsonl; the plot waits for the epoch end."""
        self.steps.append(row)
        _append_jsonl(self.steps_jsonl, row)
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


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------
# curves.png: four panels against epochs, drawn by matplotlib on an Agg canvas.

FIG_SIZE_IN = (12.0, 8.0)  # inches; at FIG_DPI a 1200 x 800 px image
FIG_DPI = 100


def plot_curves(rows: list[dict], path: str, steps: list[dict] | None = None, title: str | None = None) -> None:
    """Draw ``rows`` (epoch rows) and ``steps`` (interval rows) to ``path`` (PNG), atomically."""
    fig = build_figure(rows, steps, title)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=FIG_DPI)
        os.replace(tmp, path)  # a viewer never sees a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_figure(rows: list[dict], steps: list[dict] | None = None, title: str | None = None):
    """The curves figure (a matplotlib Figure with an Agg canvas); axes are labelled
    "loss", "accuracy", "lr", "throughput" (``ax.get_label()``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: renders to files only, whatever the user's default backend
    (ax_loss, ax_acc), (ax_lr, ax_ips) = fig.subplots(2, 2)
    steps = steps or []
    _loss_panel(ax_loss, rows)
    _accuracy_panel(ax_acc, rows)
    _lr_panel(ax_lr, rows, steps)
    _throughput_panel(ax_ips, rows)
    xmax = max([1.0] + [float(r["epoch"]) for r in rows + steps if _finite(r.get("epoch"))])
    for ax in fig.axes:
        _epoch_axis(ax, xmax)
    fig.suptitle(_headline(rows, title), fontsize=13)
    return fig


def _series(rows: list[dict], key: str, positive: bool = False) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in rows
           if _finite(r.get("epoch")) and _finite(r.get(key)) and (r[key] > 0 or not positive)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(ax, rows, key, label, positive=False, **style) -> bool:
    x, y = _series(rows, key, positive)
    if x:
        ax.plot(x, y, label=label, marker="o" if len(x) <= 40 else None, markersize=4, **style)
    return bool(x)


def _loss_panel(ax, rows) -> None:
    ax.set_label("loss")
    ax.set_yscale("log")  # one early spike must not flatten the rest of the curve
    drawn = [_plot(ax, rows, "train_loss", "train", positive=True, color="C0"),
             _plot(ax, rows, "val_loss", "val", positive=True, color="C1"),
             _plot(ax, rows, "val_loss_ema", "val (EMA weights)", positive=True, color="C1", linestyle="--")]
    _finish(ax, "Loss", "cross-entropy (log scale)", any(drawn))
    ax.grid(True, which="minor", alpha=0.12)
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if values and max(values) / min(values) < 3:  # nearly flat (e.g. one epoch): show a factor 3, not 3 %
        mid = math.sqrt(max(values) * min(values))
        ax.set_ylim(mid / 1.8, mid * 1.8)
    _plain_log_labels(ax)


def _accuracy_panel(ax, rows) -> None:
    ax.set_label("accuracy")
    drawn = [_plot(ax, rows, "val_acc1", "val top-1", color="C2"),
             _plot(ax, rows, "val_acc5", "val top-5", color="C4"),
             _plot(ax, rows, "val_acc1_ema", "val top-1 (EMA weights)", color="C2", linestyle="--")]
    _finish(ax, "Validation accuracy", "accuracy (%)", any(drawn), empty="no validation yet",
            legend_loc="lower right")  # accuracy rises: the lower right is usually empty
    top = max([v for line in ax.get_lines() for v in line.get_ydata()], default=100.0)
    ax.set_ylim(0, min(102.0, max(1.0, top) * 1.1 + 1))  # from 0; a point at 100 % stays off the frame


def _lr_panel(ax, rows, steps) -> None:
    ax.set_label("lr")
    # Interval rows show warm-up and the decay within epochs; old runs without them fall back to epoch ends.
    if _series(steps, "lr")[0]:
        drawn = _plot(ax, steps, "lr", "per print interval", color="C3", linewidth=1.5)
    else:
        drawn = _plot(ax, rows, "lr", "end of epoch", color="C3")
    _finish(ax, "Learning rate", "learning rate", drawn)
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _throughput_panel(ax, rows) -> None:
    ax.set_label("throughput")
    drawn = _plot(ax, rows, "images_per_sec", "train images/s", color="C0")
    _finish(ax, "Training throughput", "images / s (all ranks)", drawn)
    ax.set_ylim(bottom=0)  # from zero: a 3 % wobble must not look like a collapse


def _finish(ax, title: str, ylabel: str, drawn: bool, empty: str = "no data yet", legend_loc: str = "best") -> None:
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if drawn:
        ax.legend(loc=legend_loc, fontsize=9, framealpha=0.8)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="gray")


def _epoch_axis(ax, xmax: float) -> None:
    """x from 0 to the last epoch (at least 1); integer ticks, quarter/half epochs for 1-2 epoch runs."""
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    pad = 0.03 * xmax  # keeps end markers inside the frame
    ax.set_xlim(-pad, xmax + pad)
    if xmax <= 2:
        ax.xaxis.set_major_locator(MultipleLocator(0.25 if xmax <= 1 else 0.5))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True, min_n_ticks=3))
    ax.set_xlabel("epoch")


def _plain_log_labels(ax) -> None:
    """Log-axis tick labels as plain numbers (0.01, 0.5, 3) instead of 1e-02 or 5x10^-1. Minor ticks get
    labels too when the axis spans less than a decade: those at 2, 3 and 5 (x 10^k), or all of them when
    it spans less than a factor 3."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _pos):
        lo, hi = ax.get_ylim()
        first_digit = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:g}" if hi / lo < 3 or (hi / lo < 10 and first_digit in (2, 3, 5)) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _headline(rows: list[dict], title: str | None) -> str:
    parts = [title] if title else []
    if rows:
        parts.append(f"epoch {rows[-1].get('epoch')}")
    vals = [r for r in rows if _finite(r.get("val_acc1"))]
    if vals:
        best = max(vals, key=lambda r: r["val_acc1"])
        parts.append(f"val top-1 {vals[-1]['val_acc1']:.2f}% (best {best['val_acc1']:.2f}% at epoch {best['epoch']})")
    return "  |  ".join(parts) or "training curves"


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
