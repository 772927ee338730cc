"""Synthetic image folders: layout, counts, ratios, sizes, determinism, safety, `rectrain synth`."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from rectrain.cli import main
from rectrain.data import synth
from rectrain.data.synth import image_size, make_synthetic
from rectrain.errors import UserError


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _digest(root):
    h = hashlib.sha256()
    for rel in _files(root):
        h.update(rel.encode())
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_writes_imagefolder_with_counts_per_class(tmp_path):
    make_synthetic(str(tmp_path / "d"), classes=3, train_per_class=4, val_per_class=2, workers=1)
    for split, n in (("train", 4), ("val", 2)):
        classes = sorted(os.listdir(tmp_path / "d" / split))
        assert classes == ["class_000", "class_001", "class_002"]
        for c in classes:
            names = os.listdir(tmp_path / "d" / split / c)
            assert len(names) == n and all(x.endswith(".jpg") for x in names)


def test_images_are_valid_jpegs_with_tiny_sizes(tmp_path):
    make_synthetic(str(tmp_path), classes=2, train_per_class=5, val_per_class=0, workers=1)
    assert not (tmp_path / "val").exists()
    for rel in _files(tmp_path):
        with Image.open(tmp_path / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and 40 <= min(im.size) <= 80


def test_ratios_are_imagenet_like():
    rng = np.random.default_rng(0)
    hw = np.array([image_size(rng, "imagenet") for _ in range(2000)])
    r = hw[:, 1] / hw[:, 0]
    assert r.min() >= 0.49 and r.max() <= 2.01
    near_4_3 = np.isclose(r, 4 / 3, atol=0.02).mean()
    near_3_4 = np.isclose(r, 3 / 4, atol=0.02).mean()
    square = np.isclose(r, 1.0, atol=0.02).mean()
    assert near_4_3 > 0.3 and near_3_4 > 0.1 and square > 0.05
    assert near_4_3 + near_3_4 > 0.5  # most near 4:3 and 3:4
    assert np.median(hw.max(axis=1)) == 500 and np.median(hw.min(axis=1)) == 375  # ~500x375


def test_same_seed_gives_same_files_whatever_the_worker_count(tmp_path, monkeypatch):
    make_synthetic(str(tmp_path / "a"), 2, 3, 1, seed=5, workers=1)
    monkeypatch.setattr(synth, "PARALLEL_FROM", 1)  # use the process pool even for 8 images
    monkeypatch.setattr(synth, "CHUNK", 2)
    make_synthetic(str(tmp_path / "b"), 2, 3, 1, seed=5, workers=2)
    make_synthetic(str(tmp_path / "c"), 2, 3, 1, seed=6, workers=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_classes_differ_in_colour(tmp_path):
    make_synthetic(str(tmp_path), classes=4, train_per_class=6, val_per_class=0, workers=1)
    means = []
    for c in range(4):
        d = tmp_path / "train" / f"class_{c:03d}"
        means.append(np.mean([np.asarray(Image.open(d / f).convert("RGB")).reshape(-1, 3).mean(0)
                              for f in os.listdir(d)], axis=0))
    means = np.array(means)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(4, dtype=bool)].min() > 15  # grey levels between class mean colours


def test_refuses_non_empty_split_without_force_and_never_deletes(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        make_synthetic(str(tmp_path), 1, 1, 0, workers=1)
    make_synthetic(str(tmp_path), 1, 1, 0, workers=1, force=True)
    assert (tmp_path / "train" / "mine.txt").read_text() == "keep me"
    assert len(os.listdir(tmp_path / "train" / "class_000")) == 1


def test_unwritable_output_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        make_synthetic(str(tmp_path / "file" / "out"), 1, 1, 0, workers=1)


def test_cli_synth_writes_folder_that_scan_reads(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--classes", "3", "--train_per_class", "2",
                 "--val_per_class", "1", "--workers", "1"]) == 0
    assert "wrote 6 train and 3 val images" in capsys.readouterr().out
    assert main(["scan", "--data_dir", str(out)]) == 0
    assert "images: 6 usable in 3 classes" in capsys.readouterr().out


def test_cli_synth_refusal_exits_2(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--classes", "1", "--train_per_class", "1", "--workers", "1"]) == 0
    assert main(["synth", "--out", str(tmp_path), "--classes", "1", "--train_per_class", "1", "--workers", "1"]) == 2
    assert "--force" in capsys.readouterr().err
