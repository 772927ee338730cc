"""Time-to-accuracy switches wired through the real trainer: flip/crop switches, progressive resolution,
test-time resolution, weight EMA, learning-rate scaling, fine-tuning."""

import json
import re

import pytest
import torch

from rectrain import trainer as train_mod
from rectrain.cli import main as cli_main
from rectrain.config import resolve_config
from rectrain.data.buckets import make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.source import scan_split
from rectrain.data.synth import make_synthetic
from rectrain.training.checkpoint import load as load_ckpt
from tests.tiny import TINY


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root), classes=3, train_per_class=16, val_per_class=5, kind="tiny", seed=0)
    return str(root)


def run(data_dir, out, *extra, name="run", tiny=TINY):
    cfg = resolve_config(["--data_dir", data_dir, "--output", str(out), "--run_name", name, *tiny, *extra])
    return train_mod.train(cfg)


def rows_of(out, name):
    return [json.loads(r) for r in (out / name / "metrics.jsonl").read_text().splitlines()]


def log_of(out, name):
    return (out / name / "logs" / "rank0.log").read_text()


def test_no_flip_and_whole_image_resize_leave_nothing_random_per_image(data_dir):
    scan = scan_split(data_dir, "train")
    batches = []
    for seed in (0, 1):  # another seed changes the batch order, never the pixels of an image
        loaders = build_loaders(scan, None, make_buckets(32),
                                LoaderSettings(batch_size=4, seed=seed, hflip=0.0, train_crop="resize"))
        by_label_order = {}
        for keys, (x, _, _) in zip(loaders.stream, loaders.train):
            for (i, _), img in zip(keys, x):
                by_label_order[i] = img
        batches.append(by_label_order)
    common = set(batches[0]) & set(batches[1])
    assert len(common) > 10
    assert all(torch.equal(batches[0][i], batches[1][i]) for i in common)


def test_progressive_resolution_trains_each_epoch_at_its_size_and_resumes_exactly(data_dir, tmp_path):
    sched = ["--res_schedule", "32:64:0:1", "--epochs", "2"]
    assert run(data_dir, tmp_path, *sched, name="straight") == 0
    assert [r["resolution"] for r in rows_of(tmp_path, "straight")] == [32, 64]
    log = log_of(tmp_path, "straight")
    assert "epoch 1: training at 32 px" in log and "epoch 2: training at 64 px" in log
    assert "on 15 images at 64 px" in log  # validation at the final training size
    steps = load_ckpt(tmp_path / "straight/checkpoints/checkpoint_epoch_001.pth")["step"]
    assert run(data_dir, tmp_path, *sched, "--max_steps", str(steps + 1), name="split") == 0
    assert run(data_dir, tmp_path, *sched, "--resume", "auto", name="split") == 0
    a = load_ckpt(tmp_path / "straight/checkpoints/last.pth")["model"]
    b = load_ckpt(tmp_path / "split/checkpoints/last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_schedule_that_never_reaches_its_end_is_refused(data_dir, tmp_path, capsys):
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path), *TINY, "--epochs", "2",
                     "--res_schedule", "32:64:0:5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "never trains at 64" in err


def test_val_target_size_changes_only_validation(data_dir, tmp_path):
    assert run(data_dir, tmp_path, "--epochs", "1", "--val_target_size", "64", name="fixres") == 0
    log = log_of(tmp_path, "fixres")
    assert "on 15 images at 64 px" in log
    assert re.search(r"bucket shapes \((\d+x\d+, )*32x32", log)  # training buckets still at 32


def test_ema_is_validated_saved_and_restored_exactly_on_resume(data_dir, tmp_path):
    ema = ["--ema_decay", "0.9", "--epochs", "2"]
    assert run(data_dir, tmp_path, *ema, name="ema") == 0
    rows = rows_of(tmp_path, "ema")
    assert all(0 <= r["val_acc1_ema"] <= 100 and r["val_loss_ema"] > 0 for r in rows)
    straight = load_ckpt(tmp_path / "ema/checkpoints/last.pth")
    assert straight["model_ema"].keys() == straight["model"].keys()
    assert not torch.equal(straight["model_ema"]["fc.weight"], straight["model"]["fc.weight"])
    steps = load_ckpt(tmp_path / "ema/checkpoints/checkpoint_epoch_001.pth")["step"]
    assert run(data_dir, tmp_path, *ema, "--max_steps", str(steps + 2), name="ema_split") == 0
    assert run(data_dir, tmp_path, *ema, "--resume", "auto", name="ema_split") == 0
    resumed = load_ckpt(tmp_path / "ema_split/checkpoints/last.pth")["model_ema"]
    assert all(torch.equal(straight["model_ema"][k], resumed[k]) for k in resumed)


def test_lr_per_256_scales_with_the_global_batch_and_excludes_lr(data_dir, tmp_path, capsys):
    tiny = [a for a in TINY if a not in ("--lr", "0.05")]
    assert run(data_dir, tmp_path, "--epochs", "1", "--lr_per_256", "0.4", "--max_steps", "1", name="lr",
               tiny=tiny) == 0
    assert "peak lr 0.0125 (--lr_per_256 0.4 x 8/256)" in log_of(tmp_path, "lr")
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path), *TINY, "--lr_per_256", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "exclusive" in err and err.count("\n") == 1


def test_lr_far_from_the_linear_scaling_rule_is_said_plainly_once(data_dir, tmp_path):
    assert run(data_dir, tmp_path, "--epochs", "1", "--max_steps", "1", name="rule") == 0
    log = log_of(tmp_path, "rule")
    assert log.count("linear-scaling rule would give 0.003125 (--lr_per_256 0.1)") == 1


def test_fine_tuning_from_another_class_count_reinitialises_only_fc(data_dir, tmp_path):
    assert run(data_dir, tmp_path, "--epochs", "1", name="source") == 0
    source = load_ckpt(tmp_path / "source/checkpoints/last.pth")["model"]
    other = tmp_path / "other"
    make_synthetic(str(other), classes=2, train_per_class=16, val_per_class=4, kind="tiny", seed=1)
    torch.save(source, tmp_path / "torchvision_layout.pth")  # a plain state dict, as torchvision's
    from rectrain.model import build_model
    from rectrain.training.checkpoint import load_initial_weights
    model = build_model("resnet18", num_classes=2, width=8)
    notes = []
    load_initial_weights(model, str(tmp_path / "torchvision_layout.pth"), log=notes.append)
    assert any("fc is re-initialised" in n for n in notes)
    mine = model.state_dict()
    assert all(torch.equal(mine[k], source[k]) for k in source if not k.startswith("fc."))
    assert mine["fc.weight"].shape == (2, source["fc.weight"].shape[1])
    assert run(str(other), tmp_path, "--epochs", "1", "--initial_checkpoint",
               str(tmp_path / "source/checkpoints/last.pth"), name="tuned") == 0
    assert "fc is re-initialised" in log_of(tmp_path, "tuned")


def test_eval_of_a_checkpoint_validates_at_the_size_the_run_did(data_dir, tmp_path, capsys):
    assert run(data_dir, tmp_path, "--epochs", "1", "--val_target_size", "64", name="val64") == 0
    row = rows_of(tmp_path, "val64")[0]
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "val64/checkpoints/last.pth"), "--device", "cpu",
                     "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["val_acc1"] == pytest.approx(row["val_acc1"]) and res["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)


def test_val_crop_one_validates_on_the_whole_box_and_eval_follows_the_run(data_dir, tmp_path, capsys):
    assert run(data_dir, tmp_path, "--epochs", "1", "--val_crop", "1.0", "--train_crop", "resize", name="whole") == 0
    row = rows_of(tmp_path, "whole")[0]
    ckpt = str(tmp_path / "whole/checkpoints/last.pth")
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", ckpt, "--device", "cpu", "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    from rectrain.data.loader import build_val_loader
    scan = scan_split(data_dir, "val", classes=load_ckpt(ckpt)["classes"])
    crops = [build_val_loader(scan, make_buckets(32, "short_side", 1.5), LoaderSettings(batch_size=15, val_crop=v))[0]
             for v in (1.0, 0.875)]
    whole, centre = (next(iter(c))[0].float() for c in crops)
    assert not torch.equal(whole, centre)  # the setting reaches the crop
