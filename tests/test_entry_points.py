"""The seed's scripts at the repository root and the benchmark command work as documented."""

import json
import os
import subprocess
import sys

from rectrain.cli import main as cli_main
from rectrain.data.synth import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*argv, timeout=240):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_data_with_aug_self_test_passes():
    proc = run_script("data_with_aug.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bucket table" in proc.stdout and "self-test passed" in proc.stdout
    assert "uint8" in proc.stdout


def test_data_with_aug_exports_the_seed_names():
    sys.path.insert(0, ROOT)
    try:
        import data_with_aug as d
    finally:
        sys.path.remove(ROOT)
    for name in ("AugmentationConfig", "apply_augmentations", "mixup_criterion", "RectangularCropTfm",
                 "AspectRatioBatchSampler", "DistributedBatchSampler", "sort_ar", "map_idx2ar"):
        assert hasattr(d, name), name


def test_sort_ar_and_map_idx2ar_follow_the_seed(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from data_with_aug import map_idx2ar, sort_ar
    finally:
        sys.path.remove(ROOT)
    make_synthetic(str(tmp_path), classes=2, train_per_class=9, val_per_class=1, kind="tiny", seed=4)
    idxar = sort_ar(str(tmp_path), "train")
    assert idxar.shape == (18, 2) and (idxar[1:, 1] >= idxar[:-1, 1]).all()
    assert sorted(idxar[:, 0].astype(int).tolist()) == list(range(18))
    idx2ar = map_idx2ar(idxar, batch_size=4)
    first_batch = idxar[:4, 0].astype(int)
    assert len(set(idx2ar[first_batch].tolist())) == 1
    assert idx2ar[first_batch[0]] == idxar[:4, 1].mean()


def test_train_script_help_lists_the_seed_flags():
    proc = run_script("train_g4.dn_12xlarge.py", "--help", timeout=120)
    assert proc.returncode == 0
    for flag in ("--data_dir", "--epochs", "--batch_size", "--lr", "--workers", "--target_size", "--resume"):
        assert flag in proc.stdout


def test_bench_loader_prints_images_per_sec_as_json(tmp_path, capsys):
    make_synthetic(str(tmp_path), classes=2, train_per_class=12, val_per_class=1, kind="tiny", seed=5)
    assert cli_main(["bench", "loader", "--data_dir", str(tmp_path), "--workers", "0", "--batch_size", "4",
                     "--target_size", "32", "--batches", "4", "--warmup", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images_per_sec"] > 0 and res["images"] >= 4 * 2
