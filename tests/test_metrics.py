import csv
import json

from PIL import Image

from rectrain.metrics import EPOCH_FIELDS, MetricsWriter, setup_rank_logger, close_logger


def _row(e):
    return {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_acc1": 10.0 * e, "val_acc5": 30.0 + e,
            "lr": 0.1 / e, "images_per_sec": 100.0, "data_wait_frac": 0.05, "epoch_time_s": 3.0}


def test_metrics_writer_appends_jsonl_csv_and_draws_png(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for e in (1, 2, 3):
        w.add(_row(e))
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["val_acc1"] == 30.0
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == EPOCH_FIELDS and float(table[1]["train_loss"]) == 1.0
    img = Image.open(tmp_path / "curves.png")
    assert img.size == (1200, 400)
    # The plot has coloured lines on it, not just a blank canvas.
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours


def test_resume_drops_rows_from_the_resumed_epoch_on(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for e in (1, 2, 3):
        w.add(_row(e))
    w = MetricsWriter(str(tmp_path), resume_epoch=3)
    assert [r["epoch"] for r in w.rows] == [1, 2]
    w.add(_row(3))
    lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 4  # header + epochs 1..3, no duplicate of epoch 3


def test_rows_with_missing_validation_still_plot(tmp_path):
    w = MetricsWriter(str(tmp_path))
    row = _row(1)
    row.update(val_loss=None, val_acc1=None, val_acc5=None)
    w.add(row)
    assert (tmp_path / "curves.png").exists()


def test_every_rank_logs_to_its_own_file(tmp_path):
    for rank in (0, 1):
        logger = setup_rank_logger(str(tmp_path), rank, echo=False)
        logger.info(f"hello from {rank}")
        close_logger(logger)
    assert "hello from 1" in (tmp_path / "rank1.log").read_text()
    assert "hello from 1" not in (tmp_path / "rank0.log").read_text()
