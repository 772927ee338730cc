"""Run outputs: per-rank logs, per-epoch metrics (JSONL + CSV), the curves plot and the summary.

Layout under ``{output}/{run_name}/``: ``logs/rank{R}.log`` (every rank), and on rank 0 only
``config.json``, ``metrics.jsonl``, ``metrics.csv``, ``curves.png``, ``summary.json``.
The plot is drawn with Pillow (no matplotlib dependency). TensorBoard scalars are written too when
the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys

EPOCH_FIELDS = ["epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "images_per_sec",
                "data_wait_frac", "epoch_time_s"]


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
    """Rank 0's epoch table: appends to metrics.jsonl/csv and redraws curves.png each epoch.

    On resume the existing rows are read back (rows of epochs at or after the resume point are dropped),
    so the files always describe one consistent history.
    """

    def __init__(self, run_dir: str, resume_epoch: int | None = None):
        self.run_dir = run_dir
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")
        self.png = os.path.join(run_dir, "curves.png")
        self.rows: list[dict] = []
        if resume_epoch is not None and os.path.exists(self.jsonl):
            with open(self.jsonl) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self.rows = [r for r in rows if r.get("epoch", 0) < resume_epoch]
        self._rewrite()
        self.tb = _tensorboard(os.path.join(run_dir, "tensorboard"))

    def _rewrite(self) -> None:
        with open(self.jsonl, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=EPOCH_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=EPOCH_FIELDS, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        try:
            plot_curves(self.rows, self.png)
        except Exception as e:  # a plot must never stop a training run
            print(f"warning: could not draw {self.png}: {e}", file=sys.stderr)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: optional
        return None
    return SummaryWriter(path)


# ---------------------------------------------------------------------------------------------
# A small line-chart renderer on Pillow: three panels (loss, accuracy, lr) against epochs.

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def plot_curves(rows: list[dict], path: str, size: tuple[int, int] = (1200, 400)) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "val")]),
        ("accuracy (%)", [("val_acc1", "top-1"), ("val_acc5", "top-5")]),
        ("learning rate", [("lr", "lr")]),
    ]
    pw = size[0] // len(panels)
    for i, (title, series) in enumerate(panels):
        _panel(draw, (i * pw, 0, (i + 1) * pw, size[1]), title, rows, series)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


def _panel(draw, box, title, rows, series) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 15, y0 + 30, y1 - 40
    draw.text((x0 + 60, y0 + 8), title, fill="black")
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    pts = {key: [(r["epoch"], r[key]) for r in rows if _finite(r.get(key))] for key, _ in series}
    allv = [v for p in pts.values() for _, v in p]
    alle = [e for p in pts.values() for e, _ in p]
    if not allv:
        draw.text((left + 10, top + 10), "no data yet", fill="gray")
        return
    vmin, vmax = min(allv), max(allv)
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 0.5 * abs(vmin or 1), vmax + 0.5 * abs(vmax or 1)
    emin, emax = min(alle), max(max(alle), min(alle) + 1)

    def xy(e, v):
        return (left + (e - emin) / (emax - emin) * (right - left),
                bottom - (v - vmin) / (vmax - vmin) * (bottom - top))

    for k in range(5):  # y ticks
        v = vmin + (vmax - vmin) * k / 4
        y = bottom - (bottom - top) * k / 4
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((x0 + 4, y - 6), f"{v:.3g}", fill="black")
    for e in sorted(set(int(e) for e in alle))[:: max(1, len(set(alle)) // 8)]:
        x, _ = xy(e, vmin)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 4, bottom + 6), str(e), fill="black")
    draw.text(((left + right) // 2 - 15, bottom + 22), "epoch", fill="black")
    for j, (key, label) in enumerate(series):
        color = _COLORS[j % len(_COLORS)]
        p = [xy(e, v) for e, v in pts[key]]
        if len(p) > 1:
            draw.line(p, fill=color, width=2)
        for x, y in p:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        draw.text((right - 70, top + 6 + 14 * j), label, fill=color)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
