"""``curves.png``: four panels against epochs (loss, validation accuracy, learning rate, throughput), drawn by
matplotlib on an Agg canvas (files only, never a window; pyplot is not imported). matplotlib is imported only when
a plot is drawn, so importing this module stays cheap.

Epoch numbers: an epoch row's ``epoch`` is 1-based (row 3 describes the third epoch and is drawn at x = 3); an
interval row's ``epoch`` counts epochs completed as a fraction (``epoch_index + batch_in_epoch / steps_per_epoch``:
2.25 is a quarter into the third epoch, 3.0 its end), so both kinds of row share one x axis.
"""

from __future__ import annotations

import math

from rectrain.runtime.io import atomic_file

__all__ = ["plot_curves", "build_figure", "FIG_SIZE_IN", "FIG_DPI"]


FIG_SIZE_IN = (12.0, 8.0)  # inches; at FIG_DPI a 1200 x 800 px image
FIG_DPI = 100


def plot_curves(rows: list[dict], path: str, steps: list[dict] | None = None, title: str | None = None) -> None:
    """Draw ``rows`` (epoch rows) and ``steps`` (interval rows) to ``path`` (PNG), atomically: a viewer never sees
    a half-written file."""
    fig = build_figure(rows, steps, title)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=FIG_DPI)


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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
