"""How a run ends and reports: a --max_steps stop inside an epoch, a run without validation, the first log line."""

import json
import shutil

import pytest

from rectrain.cli import main as cli_main
from rectrain.data.synth import make_synthetic
from tests.tiny import TINY


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root), classes=3, train_per_class=16, val_per_class=5, kind="tiny", seed=0)
    return str(root)


def train(data_dir, out, *extra):
    return cli_main(["train", "--data_dir", data_dir, "--output", str(out), "--run_name", "r", *TINY, *extra])


def test_a_max_steps_stop_inside_an_epoch_validates_and_writes_what_it_has(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path, "--epochs", "3", "--max_steps", "4") == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["epochs"] == 0 and summary["steps"] == 4
    assert 0 <= summary["final_acc1"] <= 100 and summary["final_epoch"] == pytest.approx(4 / 6)
    assert summary["mean_images_per_sec"] > 0
    assert (tmp_path / "r" / "curves.png").stat().st_size > 1000
    assert "val at step 4 top-1" in out and "at the stop" in out and "no validation" not in out
    # 3 classes: top-5 is always 100%, said once at the start and not printed as a result
    assert "with 3 classes top-5 accuracy is always 100%" in out and "top-5 - (3 classes)" in out


def test_a_run_without_val_says_why_it_has_no_validation(data_dir, tmp_path, capsys):
    train_only = tmp_path / "train_only"
    shutil.copytree(f"{data_dir}/train", train_only / "train")
    assert train(str(train_only), tmp_path, "--epochs", "1") == 0
    assert f"no validation (no val/ folder in {train_only})" in capsys.readouterr().out


def test_a_max_steps_stop_at_an_epoch_end_where_no_validation_was_due_validates_the_end(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path, "--epochs", "3", "--val_every", "2", "--max_steps", "6") == 0
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc1"] for r in rows] == [None]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final_acc1"] is not None and summary["final_epoch"] == 1.0
    assert "top-1" in capsys.readouterr().out.splitlines()[-6]


def test_a_short_epoch_at_the_default_print_freq_logs_a_quarter_epoch(data_dir, tmp_path, capsys):
    flags = [a for i, a in enumerate(TINY) if a != "--print_freq" and TINY[i - 1] != "--print_freq"]
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path), "--run_name", "q", *flags,
                     "--epochs", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "a log line every 1 batch (a quarter of the 6-batch epoch" in out
    assert sum(1 for ln in out.splitlines() if ln.startswith("epoch 1 batch ")) == 6


def test_a_set_up_mistake_is_said_once_and_leaves_no_run_folder(data_dir, tmp_path, capfd):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad, ignore=shutil.ignore_patterns("sorted_idxar_*"))
    shutil.copytree(bad / "val" / "class_000", bad / "val" / "class_999")  # a val class train does not have
    code = cli_main(["train", "--data_dir", str(bad), "--output", str(tmp_path / "out"), "--run_name", "r", *TINY])
    out, err = capfd.readouterr()
    assert code == 2 and "class_999" in err and len(err.strip().splitlines()) == 1
    assert "class_999" not in out  # not on both streams
    assert not (tmp_path / "out").exists()


def test_a_refused_resume_of_another_architecture_leaves_no_run_folder(data_dir, tmp_path, capsys):
    assert train(data_dir, tmp_path, "--epochs", "1") == 0
    ckpt = tmp_path / "r" / "checkpoints" / "last.pth"
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path / "new"), "--run_name", "b", *TINY,
                     "--resume", str(ckpt), "--arch", "resnet34"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit --arch resnet34" in err
    assert not (tmp_path / "new").exists()
