import csv
import json
import math
import os
import subprocess
import sys

from PIL import Image

from rectrain.runtime import metrics, plot
from rectrain.runtime.logs import close_logger, setup_rank_logger
from rectrain.runtime.metrics import EPOCH_FIELDS, MetricsWriter
from rectrain.runtime.plot import build_figure, plot_curves


def _row(e):
    return {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_acc1": 10.0 * e, "val_acc5": 30.0 + e,
            "lr": 0.1 / e, "images_per_sec": 100.0, "data_wait_frac": 0.05, "epoch_time_s": 3.0}


def _interval(step, steps_per_epoch=4, warmup=4):
    lr = 0.1 * min(1.0, step / warmup)  # linear warm-up over the first epoch, then flat
    return {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "train_loss": 2.0, "images_per_sec": 50.0,
            "data_wait_frac": 0.1}


def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_writer_appends_jsonl_and_csv_rows(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for e in (1, 2, 3):
        w.add(_row(e))
    w.close()
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["val_acc1"] == 30.0
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == EPOCH_FIELDS and float(table[1]["train_loss"]) == 1.0


def test_curves_png_is_a_valid_image_of_the_figure_size(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for e in (1, 2, 3):
        w.add(_row(e))
    with Image.open(tmp_path / "curves.png") as img:
        img.verify()  # raises on a truncated or corrupt PNG
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.size == (1200, 800)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # lines and text, not a blank canvas


def test_plot_leaves_no_temporary_files(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.add_interval(_interval(2))
    w.add(_row(1))
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.csv", "metrics.jsonl", "steps.jsonl"]


def test_loss_axis_is_log_scale():
    fig = build_figure([_row(e) for e in (1, 2, 3)])
    assert _axes(fig)["loss"].get_yscale() == "log"


def test_lr_panel_has_one_point_per_interval_row_so_warmup_shows():
    steps = [_interval(s) for s in range(1, 9)]
    fig = build_figure([_row(1), _row(2)], steps)
    (line,) = _axes(fig)["lr"].get_lines()
    assert list(line.get_xdata()) == [r["epoch"] for r in steps]
    lrs = list(line.get_ydata())
    assert lrs == [r["lr"] for r in steps] and lrs[0] < lrs[3]  # the warm-up ramp is drawn


def test_lr_panel_falls_back_to_epoch_rows_without_interval_rows():
    fig = build_figure([_row(1), _row(2)])
    (line,) = _axes(fig)["lr"].get_lines()
    assert list(line.get_ydata()) == [0.1, 0.05]


def test_accuracy_panel_adds_ema_top1_only_when_rows_have_it():
    plain = [_row(1), _row(2)]
    ema = [dict(r, val_acc1_ema=r["val_acc1"] + 1) for r in plain]
    labels = lambda rows: [ln.get_label() for ln in _axes(build_figure(rows))["accuracy"].get_lines()]  # noqa: E731
    assert labels(plain) == ["val top-1", "val top-5"]
    assert labels(ema) == ["val top-1", "val top-5", "val top-1 (EMA weights)"]


def test_one_epoch_run_has_a_finite_nondegenerate_epoch_axis():
    fig = build_figure([_row(1)], [_interval(s) for s in (2, 4)])
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= 0 and hi >= 1
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 3 and min(ticks) == 0 and max(ticks) == 1


def test_interval_rows_append_to_steps_jsonl(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for s in (1, 2, 3):
        w.add_interval(_interval(s))
    assert _read_jsonl(tmp_path / "steps.jsonl") == [_interval(s) for s in (1, 2, 3)]
    assert [r["step"] for r in w.steps] == [1, 2, 3]


def test_interval_rows_go_to_tensorboard_under_step(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metrics, "_tensorboard", lambda path: FakeWriter())
    MetricsWriter(str(tmp_path)).add_interval(_interval(3))
    assert ("step/lr", 0.1 * 3 / 4, 3) in scalars and ("step/epoch", 0.75, 3) in scalars
    assert all(tag.startswith("step/") and step == 3 for tag, _, step in scalars)


def test_resume_keeps_the_rows_of_the_completed_epochs_only(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for e in (1, 2, 3):
        w.add(_row(e))
    w = MetricsWriter(str(tmp_path), completed=2)  # a checkpoint of epoch 2: epoch 3's row is written again
    assert [r["epoch"] for r in w.rows] == [1, 2]
    w.add(_row(3))
    lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 4  # header + epochs 1..3, no duplicate of epoch 3


def test_resume_keeps_the_interval_rows_up_to_the_checkpoint_mid_epoch(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for s in range(1, 11):  # 4 steps per epoch: epochs 0.25 .. 2.5
        w.add_interval(_interval(s))
    w = MetricsWriter(str(tmp_path), completed=1, position=1.5)  # stopped at batch 2 of epoch 2
    kept = [r["epoch"] for r in w.steps]
    assert kept == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]  # the interrupted epoch's rows before the stop stay
    assert [r["epoch"] for r in _read_jsonl(tmp_path / "steps.jsonl")] == kept


def test_a_missing_epoch_row_is_restored_from_the_checkpoint(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.add(_row(1))
    w = MetricsWriter(str(tmp_path), completed=2, checkpoint_row={**_row(2), "is_best": True})
    assert [r["epoch"] for r in w.rows] == [1, 2] and "is_best" not in w.rows[1]
    assert any("restored from the checkpoint" in n for n in w.notes)
    assert [r["epoch"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_torn_line_is_dropped_and_the_file_rewritten_whole(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for s in (1, 2):
        w.add_interval(_interval(s))
    with open(tmp_path / "steps.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0.7')  # an older rectrain's append, cut by a full disk
    w = MetricsWriter(str(tmp_path), completed=0, position=1.0)
    assert [r["step"] for r in w.steps] == [1, 2] and any("unreadable line" in n for n in w.notes)
    assert [r["step"] for r in _read_jsonl(tmp_path / "steps.jsonl")] == [1, 2]


def test_a_removed_run_folder_is_recreated_with_a_warning(tmp_path):
    import shutil
    said = []
    w = MetricsWriter(str(tmp_path / "run"), log=said.append)
    shutil.rmtree(tmp_path / "run")
    w.add_interval(_interval(1))
    w.add(_row(1))
    assert [r["step"] for r in _read_jsonl(tmp_path / "run" / "steps.jsonl")] == [1]
    assert len(said) == 1 and "was removed while the run wrote to it" in said[0]


def test_fresh_writer_starts_empty_files(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.add_interval(_interval(1))
    w.add(_row(1))
    w = MetricsWriter(str(tmp_path))
    assert w.rows == [] and w.steps == []
    assert (tmp_path / "steps.jsonl").read_text() == "" and (tmp_path / "metrics.jsonl").read_text() == ""


def test_csv_stays_rectangular_when_rows_lack_optional_keys(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.add(_row(1))
    w.add(dict(_row(2), val_acc1_ema=25.0, val_acc5_ema=40.0, val_loss_ema=0.9, resolution=160, warmup_s=12.5,
               not_a_field=1))
    with open(tmp_path / "metrics.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == EPOCH_FIELDS and all(len(line) == len(EPOCH_FIELDS) for line in lines)
    first, second = (dict(zip(EPOCH_FIELDS, line)) for line in lines[1:])
    assert first["val_acc1_ema"] == "" and first["resolution"] == ""
    assert second["val_acc1_ema"] == "25.0" and second["resolution"] == "160" and second["warmup_s"] == "12.5"


def test_rows_with_missing_validation_still_plot(tmp_path):
    row = dict(_row(1), val_loss=None, val_acc1=None, val_acc5=None)
    plot_curves([row], str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as img:
        assert img.size == (1200, 800)


def test_plot_failure_is_reported_and_does_not_raise(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plot, "build_figure", broken)
    w = MetricsWriter(str(tmp_path))
    w.add(_row(1))  # must not raise
    err = capsys.readouterr().err
    assert "could not draw" in err and "no fonts" in err
    assert [r["epoch"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert not (tmp_path / "curves.png").exists()


def test_importing_metrics_does_not_import_matplotlib():
    code = "import sys, rectrain.runtime.metrics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.strip() == "False"


def test_every_rank_logs_to_its_own_file(tmp_path):
    for rank in (0, 1):
        logger = setup_rank_logger(str(tmp_path), rank, echo=False)
        logger.info(f"hello from {rank}")
        close_logger(logger)
    assert "hello from 1" in (tmp_path / "rank1.log").read_text()
    assert "hello from 1" not in (tmp_path / "rank0.log").read_text()
