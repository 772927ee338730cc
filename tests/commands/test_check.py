"""`rectrain check`: the pre-training checklist on tiny synthetic data."""

import io
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch
from PIL import Image

from rectrain import checklist as check
from rectrain.cli import main
from rectrain.commands import check as check_cmd
from rectrain.config import resolve_config
from rectrain.data.source import scan_split
from rectrain.data.synth import make_synthetic

FAST = ["--arch", "resnet18", "--width", "8", "--batch_size", "4", "--epochs", "3", "--workers", "1"]
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never touch the real ~/.cache
    d = tmp_path / "data"
    make_synthetic(str(d), classes=3, train_per_class=8, val_per_class=2, kind="tiny", seed=0)
    return d


def _cfg(data, tmp_path, *extra):
    return resolve_config(["--data_dir", str(data), "--output", str(tmp_path / "runs"), *FAST, *extra])


def _items(data, tmp_path, *extra, **kw):
    kw.setdefault("loader_probe", False)
    return {i.name: i for i in check.run_checks(_cfg(data, tmp_path, *extra), **kw)}


def _cli(data, tmp_path, capsys, *extra):
    rc = main(["check", "--data_dir", str(data), "--output", str(tmp_path / "runs"), *FAST, "--no_loader_probe",
               *extra])
    return rc, capsys.readouterr().out


def _scan_both(data):
    train = scan_split(str(data), "train")
    scan_split(str(data), "val", classes=train.index.classes)


# -- the whole list ---------------------------------------------------------------------------------
def test_good_layout_passes_with_exit_0(data, tmp_path, capsys):
    rc, out = _cli(data, tmp_path, capsys)
    assert rc == 0, out
    assert "0 failure(s)" in out and "ready to train" in out
    for name in ("python", "pytorch", "opencv", "decoder", "cuda", "train data", "val data", "empty classes", "train cache",
                 "disk", "output", "gpu memory", "loader"):
        assert f"] {name} " in out
    assert "24 images in 3 classes (8 per class)" in out


def test_json_output_is_one_list_of_items(data, tmp_path, capsys):
    rc, out = _cli(data, tmp_path, capsys, "--json")
    items = json.loads(out)
    assert rc == 0 and isinstance(items, list) and len(items) == 15
    for item in items:
        assert set(item) == {"name", "status", "message", "fix", "details"}
        assert item["status"] in ("pass", "warn", "fail", "skip")
    assert {i["name"]: i for i in items}["train data"]["details"]["images"] == 24


def test_check_leaves_no_run_folder_and_no_cache_behind(data, tmp_path, capsys):
    before = sorted(os.listdir(data))
    _cli(data, tmp_path, capsys)
    assert not (tmp_path / "runs").exists()
    assert sorted(os.listdir(data)) == before  # no sorted_idxar_*.npz: scanning is `rectrain scan`'s job


def test_options_come_from_a_config_file_too(data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "run.json").write_text(json.dumps({"output": str(tmp_path / "file" / "runs")}))
    rc = main(["check", "--data_dir", str(data), *FAST, "--no_loader_probe", "--config", str(tmp_path / "run.json")])
    assert rc == 1 and "is a file, not a folder" in capsys.readouterr().out


def test_own_flags_are_not_passed_to_the_training_config():
    argv = ["--json", "--data_dir", "d", "--no_loader", "--batch_size", "8"]
    assert check_cmd._training_argv(argv) == ["--data_dir", "d", "--batch_size", "8"]


# -- dataset layout ---------------------------------------------------------------------------------
def test_missing_train_folder_fails(data, tmp_path, capsys):
    shutil.rmtree(data / "train")
    rc, out = _cli(data, tmp_path, capsys)
    assert rc == 1
    items = _items(data, tmp_path)
    assert items["train data"].status == "fail" and "train does not exist" in items["train data"].message
    assert items["val data"].status == items["loader"].status == "skip"


def test_val_class_unknown_to_train_fails_naming_it(data, tmp_path):
    (data / "val" / "zebra").mkdir()
    shutil.copy(next((data / "val" / "class_000").iterdir()), data / "val" / "zebra" / "z.jpg")
    item = _items(data, tmp_path)["val data"]
    assert item.status == "fail" and "zebra" in item.message and "subset" in item.message


def test_a_train_class_without_val_images_is_a_warning_naming_it(data, tmp_path):
    shutil.rmtree(data / "val" / "class_001")
    (data / "train" / "class_000" / "Thumbs.db").write_bytes(b"junk")
    items = _items(data, tmp_path)
    item = items["val data"]
    assert item.status == "warn" and "no val images for class_001" in item.message and item.fix
    assert "skipped 1 not an image by extension: class_000/Thumbs.db" in items["train data"].message


def test_missing_val_folder_is_a_warning(data, tmp_path):
    shutil.rmtree(data / "val")
    items = _items(data, tmp_path)
    assert items["val data"].status == "warn" and "without validation" in items["val data"].message
    assert items["val cache"].status == "skip"


def test_empty_class_folder_fails_with_the_fix(data, tmp_path, capsys):
    (data / "train" / "class_empty").mkdir()
    rc, out = _cli(data, tmp_path, capsys)
    assert rc == 1
    item = _items(data, tmp_path)["empty classes"]
    assert item.status == "fail" and "class_empty" in item.message and "head" in item.message
    assert "remove" in item.fix


def test_class_of_only_unusable_files_fails_once_scanned(data, tmp_path):
    (data / "train" / "class_bad").mkdir()
    (data / "train" / "class_bad" / "a.jpg").write_bytes(b"")
    _scan_both(data)
    item = _items(data, tmp_path)["empty classes"]
    assert item.status == "fail" and "without a usable image (class_bad)" in item.message


# -- cache and unusable files -----------------------------------------------------------------------
def test_missing_cache_warns_with_the_scan_command(data, tmp_path):
    item = _items(data, tmp_path)["train cache"]
    assert item.status == "warn" and "missing: the first run will scan 24 files" in item.message
    assert f"rectrain scan --data_dir {data}" in item.fix


def test_scanned_cache_is_fresh(data, tmp_path):
    _scan_both(data)
    items = _items(data, tmp_path)
    assert items["train cache"].status == items["val cache"].status == "pass"
    assert str(data / "sorted_idxar_train.npz") in items["train cache"].message


def test_adding_a_file_after_the_scan_makes_the_cache_stale(data, tmp_path):
    _scan_both(data)
    Image.new("RGB", (50, 40)).save(data / "train" / "class_001" / "new.jpg")
    item = _items(data, tmp_path)["train cache"]
    assert item.status == "warn" and "stale" in item.message and "scan 25 files" in item.message


def test_unusable_files_are_a_warning_with_their_paths(data, tmp_path, capsys):
    (data / "train" / "class_000" / "broken.jpg").write_bytes(b"")
    _scan_both(data)
    item = _items(data, tmp_path)["unusable files"]
    assert item.status == "warn" and item.message.startswith("1 file(s)")
    assert "train/class_000/broken.jpg (empty file" in item.message
    assert _cli(data, tmp_path, capsys)[0] == 0  # warnings do not fail


def test_unusable_files_are_unknown_before_a_scan(data, tmp_path):
    assert _items(data, tmp_path)["unusable files"].status == "skip"


# -- disk and output --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_checkpoint_bytes_match_a_saved_checkpoint(tmp_path, name):
    from rectrain.model import build_model
    from rectrain.training.optim import build_optimizer
    model = build_model("resnet18", num_classes=5, width=8)
    opt = build_optimizer(model, name, lr=0.1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # creates the momentum buffers (LAMB: both moments)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    predicted = check.checkpoint_bytes("resnet18", 5, 8, opt=name) - check.CKPT_EXTRA
    assert abs(predicted - len(buf.getvalue())) < 0.05 * len(buf.getvalue())


def test_full_disk_fails_with_the_numbers_and_keep_checkpoints_fix(data, tmp_path):
    per = check.checkpoint_bytes("resnet18", 3, 8)
    free = 5 * per + check.RUN_EXTRA  # room for 3 kept + 2 being replaced, not 10 + 2
    item = _items(data, tmp_path, "--epochs", "10", disk_usage=lambda p: Usage(10 * free, 9 * free, free))["disk"]
    assert item.status == "fail" and "not enough room" in item.message and "10 checkpoint(s) kept" in item.message
    assert item.details["needed_bytes"] == 12 * per + check.RUN_EXTRA and item.details["free_bytes"] == free
    assert item.fix.startswith("--keep_checkpoints 3 ")


def test_keep_checkpoints_lowers_what_the_disk_must_hold(data, tmp_path):
    per = check.checkpoint_bytes("resnet18", 3, 8)
    free = 5 * per + check.RUN_EXTRA
    usage = lambda p: Usage(10 * free, 9 * free, free)  # noqa: E731
    item = _items(data, tmp_path, "--epochs", "10", "--keep_checkpoints", "3", disk_usage=usage)["disk"]
    assert item.status == "pass" and item.details["checkpoints_kept"] == 3


def test_no_room_for_even_one_checkpoint_asks_for_another_output(data, tmp_path):
    item = _items(data, tmp_path, disk_usage=lambda p: Usage(100, 100, 0))["disk"]
    assert item.status == "fail" and item.fix.startswith("choose an --output")


def test_output_under_a_regular_file_fails(data, tmp_path):
    (tmp_path / "file").write_text("x")
    item = _items(data, tmp_path, "--output", str(tmp_path / "file" / "runs"))["output"]
    assert item.status == "fail" and "is a file, not a folder" in item.message


def test_output_write_error_fails_with_the_reason(data, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(check.tempfile, "mkstemp", refuse)  # what a read-only mount does, even to root
    item = _items(data, tmp_path)["output"]
    assert item.status == "fail" and "cannot write in" in item.message and "Permission denied" in item.message


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_unwritable_output_fails(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        item = _items(data, tmp_path, "--output", str(locked / "runs"))["output"]
    finally:
        locked.chmod(0o700)
    assert item.status == "fail" and "cannot write" in item.message


def test_existing_checkpoints_without_resume_fail(data, tmp_path):
    ckpt_dir = tmp_path / "runs" / "resnet50_rect" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.pth").write_bytes(b"x")
    item = _items(data, tmp_path)["output"]
    assert item.status == "fail" and "already holds checkpoints" in item.message and "--resume auto" in item.fix
    assert _items(data, tmp_path, "--resume", "auto")["output"].status == "pass"


# -- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails(data, tmp_path, capsys):
    rc, out = _cli(data, tmp_path, capsys, "--device", "cuda")
    assert rc == 1 and "[FAIL] cuda" in out and "no CUDA GPU is visible" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cpu_machine_skips_the_gpu_items(data, tmp_path):
    items = _items(data, tmp_path)
    assert items["cuda"].status == items["gpu memory"].status == "skip"


def test_fit_batch_halves_until_the_step_fits():
    def step(b):
        if b > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return f"ran {b}"
    assert check.fit_batch(step, 256) == (64, "ran 64", [256, 128])


def test_fit_batch_gives_zero_when_nothing_fits():
    def step(b):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert check.fit_batch(step, 4) == (0, None, [4, 2, 1])


def test_step_probe_trains_one_step_and_times_it(data, tmp_path):
    probe = check.StepProbe(_cfg(data, tmp_path), num_classes=3, device="cpu")
    before = probe.model.conv1.weight.detach().clone()
    res = probe.measure(2, (64, 96), timed=1)
    assert not torch.equal(before, probe.model.conv1.weight) and res["images_per_s"] > 0
    assert all("momentum_buffer" in s for s in probe.train_step.optimizer.state.values())


# -- loader -----------------------------------------------------------------------------------------
def test_loader_probe_reports_images_per_s_for_1_and_configured_workers(data, tmp_path):
    item = _items(data, tmp_path, "--workers", "2", loader_probe=True)["loader"]
    assert item.status == "pass" and "1 worker:" in item.message and "suggest --workers" in item.message
    assert set(item.details["images_per_s"]) == {"1", "2"}
    assert all(r > 0 for r in item.details["images_per_s"].values())


def test_loader_verdict_suggests_workers_when_the_gpu_outruns_the_loader():
    item = check._loader_verdict({1: 100.0, 4: 380.0}, workers=4, limit=16, capped=None, gpu_rate=1000.0)
    assert item.status == "warn" and item.fix == "--workers 12"  # 1.2 x 1000 / 100 per worker


def test_loader_verdict_blames_the_cpu_when_no_worker_count_keeps_up():
    item = check._loader_verdict({1: 100.0, 4: 380.0}, workers=4, limit=4, capped=None, gpu_rate=1000.0)
    assert item.status == "warn" and "rectrain prepare" in item.fix


def test_loader_verdict_passes_when_the_loader_keeps_up():
    item = check._loader_verdict({1: 300.0, 8: 2300.0}, workers=8, limit=16, capped=None, gpu_rate=2000.0)
    assert item.status == "pass" and item.details["suggested_workers"] == 8


def test_loader_probe_is_skipped_by_flag(data, tmp_path):
    assert _items(data, tmp_path, loader_probe=False)["loader"].status == "skip"


def test_gpu_rate_is_scaled_from_the_largest_bucket_to_the_data_mix(data, tmp_path):
    state = check._State(_cfg(data, tmp_path))
    state.gpu_images_per_s, state.gpu_shape = 1000.0, (224, 448)  # as the memory probe leaves them
    scan = scan_split(str(data), "train")
    scan.sizes[:] = (300, 400)  # every image 4:3 -> bucket 224x288
    assert check._typical_gpu_rate(state, scan) == pytest.approx(1000.0 * 448 / 288)


def test_largest_bucket_is_the_one_with_most_pixels(data, tmp_path):
    assert check.largest_bucket(_cfg(data, tmp_path, "--target_size", "224")) == (448, 224)  # 2:1 portrait
    assert check.largest_bucket(_cfg(data, tmp_path, "--target_size", "128", "--max_ratio", "1")) == (128, 128)


def test_memory_verdict_out_of_memory_asks_for_the_batch_that_fit(data, tmp_path):
    cfg = _cfg(data, tmp_path, "--batch_size", "256", "--lr", "0.1")
    res = {"peak_bytes": 30 * check.GiB, "images_per_s": 900.0}
    item = check.memory_verdict(cfg, (448, 224), 64, res, [256, 128], total=40 * check.GiB)
    assert item.status == "fail" and "batch 256 runs out of GPU memory" in item.message
    assert item.fix.startswith("lower --batch_size to 64 (and --lr to 0.025")
    assert "peak 30.0 GiB of 40.0 GiB" in item.message


def test_memory_verdict_warns_with_little_headroom(data, tmp_path):
    res = {"peak_bytes": 39 * check.GiB, "images_per_s": 900.0}
    item = check.memory_verdict(_cfg(data, tmp_path), (448, 224), 4, res, [], total=40 * check.GiB)
    assert item.status == "warn" and "little headroom" in item.message
    res["peak_bytes"] = 20 * check.GiB
    assert check.memory_verdict(_cfg(data, tmp_path), (448, 224), 4, res, [], total=40 * check.GiB).status == "pass"
