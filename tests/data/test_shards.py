"""Tar shards: prepare writes them from a folder, a run reads them by offset, and trains exactly as on the folder."""

import json
import os
import re
import shutil
import signal
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from rectrain import trainer as train_mod
from rectrain.config import resolve_config
from rectrain.data import prepare_shards as ps
from rectrain.data.buckets import make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.prepare_shards import folder_keys, parse_size, prepare_shards
from rectrain.data.scan import scan_split
from rectrain.data.shards import expand_braces, shard_layout, split_key
from rectrain.training.checkpoint import load as load_ckpt
from tests.tiny import TINY, make_tiny_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The tiny folder as shards of about 20 kB (several per split), written by prepare."""
    out = str(tmp_path_factory.mktemp("shards") / "out")
    prepare_shards(folder, out, "20KB", workers=2)
    return out


# -- the format -----------------------------------------------------------------------------------------------
def test_prepared_shards_round_trip_every_image_label_and_class(folder, shards):
    for split in ("train", "val"):
        src = scan_split(folder, split, None if split == "train" else scan_split(folder, "train").index.classes)
        got = scan_split(shards, split, src.index.classes)
        assert got.from_cache and got.cache_path == os.path.join(shards, f"{split}.index.npz")  # the shipped index
        assert len(got.index) == len(src.index) and got.index.classes == src.index.classes
        np.testing.assert_array_equal(got.index.labels, src.index.labels)
        np.testing.assert_array_equal(got.sizes, src.sizes)
        reader = got.index.members.reader()
        for i, rel in enumerate(src.index.paths.tolist()):
            with open(os.path.join(src.index.split_dir, rel), "rb") as f:
                assert reader.read(i) == f.read(), rel  # the very bytes of the file
    assert json.load(open(os.path.join(shards, "classes.json"))) == ["class_000", "class_001", "class_002"]
    assert len(shard_layout(shards).splits["train"]) > 1


def test_a_shard_is_a_plain_tar_with_webdatasets_keys(shards):
    listing = subprocess.run(["tar", "tf", os.path.join(shards, "train-000000.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing[:2] == ["class_000/class_000_00000.jpg", "class_000/class_000_00000.cls"]
    for name in listing:  # webdataset's base_plus_ext: the key ends at the first dot of the base name
        key, ext = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name).groups()
        assert ext in ("jpg", "cls") and split_key(name) == (key, ext)
    with tarfile.open(os.path.join(shards, "train-000000.tar")) as t:
        assert t.extractfile(listing[1]).read() == b"0"


def test_keys_are_unique_and_dot_free_and_patterns_expand_like_the_shell():
    assert folder_keys(["a/x.jpg", "a/x.png", "a/y.z.jpg", "b/x.jpg"]) == ["a/x", "a/x_1", "a/y_z", "b/x"]
    assert expand_braces("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_braces("in-{train-{0..1},validation-{0..0}}.tar") == ["in-train-0.tar", "in-train-1.tar",
                                                                         "in-validation-0.tar"]
    assert parse_size("1GB") == 10 ** 9 and parse_size("2MiB") == 2 << 20


# -- training ---------------------------------------------------------------------------------------------------
def _batches(data_dir, epoch, workers=2):
    train = scan_split(data_dir, "train")
    loaders = build_loaders(train, None, make_buckets(32, max_ratio=1.5),
                            LoaderSettings(batch_size=8, workers=workers, seed=7))
    try:
        return [(x.clone(), y.clone()) for x, y, _ in loaders.epochs(epoch, 0, epoch + 1)]
    finally:
        loaders.close()


def test_the_loader_gives_the_folders_batches_from_its_shards(folder, shards):
    """Same images in the same order, with the same crops: sample i of the shards is image i of the folder."""
    for epoch in (0, 3):
        a, b = _batches(folder, epoch), _batches(shards, epoch)
        assert len(a) == len(b) == 6
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def _train(data_dir, out, name, *extra):
    cfg = resolve_config(["--data_dir", data_dir, "--output", str(out), "--run_name", name, *TINY, "--epochs", "1",
                          *extra])
    return train_mod.train(cfg)


def _weights(out, name):
    return load_ckpt(str(out / name / "checkpoints" / "last.pth"))["model"]


def test_training_on_shards_equals_training_on_the_folder_and_resumes_mid_epoch_exactly(folder, shards, tmp_path,
                                                                                        monkeypatch):
    assert _train(folder, tmp_path, "folder") == 0
    assert _train(shards, tmp_path, "shards") == 0
    a, b = _weights(tmp_path, "folder"), _weights(tmp_path, "shards")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A SIGTERM mid-epoch, then --resume auto: the same weights as the uninterrupted run on the shards.
    from rectrain.training import schedule
    real = schedule.lr_at

    def lr_at_then_signal(step, *args, **kw):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args, **kw)
    monkeypatch.setattr(schedule, "lr_at", lr_at_then_signal)
    assert _train(shards, tmp_path, "stopped") == 128 + signal.SIGTERM
    monkeypatch.setattr(schedule, "lr_at", real)
    assert load_ckpt(str(tmp_path / "stopped/checkpoints/last.pth"))["batch_in_epoch"] == 4
    assert _train(shards, tmp_path, "stopped", "--resume", "auto") == 0
    c = _weights(tmp_path, "stopped")
    assert all(torch.equal(b[k], c[k]) for k in b)


# -- prepare ------------------------------------------------------------------------------------------------------
def test_a_killed_prepare_continues_to_the_same_shards(folder, shards, tmp_path, monkeypatch):
    """Stopped after its second shard (its third half-written), the rerun keeps both and ends byte for byte where an
    uninterrupted prepare did."""
    out = tmp_path / "out"
    real = ps._ShardWriter.close
    closed = []

    def close_then_die(self, position):
        real(self, position)
        closed.append(position)
        if len(closed) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C would, between two images
    monkeypatch.setattr(ps._ShardWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(folder, str(out), "20KB", workers=0)
    monkeypatch.setattr(ps._ShardWriter, "close", real)
    assert sorted(os.listdir(out)) == ["classes.json", "prepare.json", "train-000000.tar", "train-000001.tar"]
    first = (out / "train-000000.tar").stat().st_mtime_ns
    r = prepare_shards(folder, str(out), "20KB", workers=0)
    assert r["existing"] > 0 and r["existing"] + r["written"] == 63
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # kept, not written again
    assert sorted(os.listdir(out)) == sorted(os.listdir(shards))
    for name in os.listdir(shards):
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == open(os.path.join(shards, name), "rb").read(), name


def test_prepare_refuses_to_resume_with_other_settings(folder, shards, tmp_path):
    from rectrain.errors import UserError
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    with pytest.raises(UserError, match="--shard_size 20000"):
        prepare_shards(folder, str(out), "1MB", workers=0)
