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
from rectrain.data.source import scan_split
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


def test_webdataset_reads_the_shards_as_the_index_does(shards):
    """The webdataset package (its own tar reader and key rules) sees our samples, in our order, with our labels."""
    import webdataset as wds
    scan = scan_split(shards, "train")
    locations = sorted(shard_layout(shards).splits["train"])
    reader = scan.index.members.reader()
    got = list(wds.WebDataset(locations, shardshuffle=False, empty_check=False))
    assert len(got) == len(scan.index)
    for i, sample in enumerate(got):
        assert sample["__key__"] == scan.index.paths[i].split(":", 1)[1]
        assert int(sample["cls"]) == scan.index.labels[i] and sample["jpg"] == reader.read(i)


def test_keys_are_unique_and_dot_free_and_patterns_expand_like_the_shell():
    assert folder_keys(["a/x.jpg", "a/x.png", "a/y.z.jpg", "b/x.jpg"]) == ["a/x", "a/x_1", "a/y_z", "b/x"]
    assert expand_braces("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_braces("in-{train-{0..1},validation-{0..0}}.tar") == ["in-train-0.tar", "in-train-1.tar",
                                                                         "in-validation-0.tar"]
    assert parse_size("1GB") == 10 ** 9 and parse_size("2MiB") == 2 << 20


# -- training ---------------------------------------------------------------------------------------------------
def _batches(data_dir, epoch, workers=2):
    train = scan_split(data_dir, "train")
    buckets = make_buckets(64, max_ratio=1.5)
    progressive = [buckets.scaled(32), buckets.scaled(64)]  # --res_schedule 32:64:0:1
    loaders = build_loaders(train, None, buckets, LoaderSettings(batch_size=8, workers=workers, seed=7), progressive)
    try:
        return [(x.clone(), y.clone()) for x, y, _ in loaders.epochs(epoch, 0, epoch + 1)]
    finally:
        loaders.close()


def test_the_loader_gives_the_folders_batches_from_its_shards(folder, shards):
    """Same images in the same order, with the same crops: sample i of the shards is image i of the folder."""
    for epoch, side in ((0, 32), (3, 64)):  # progressive resolution: 32 px first, 64 px later
        a, b = _batches(folder, epoch), _batches(shards, epoch)
        assert len(a) == len(b) == 6 and min(a[0][0].shape[1:3]) == side
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def _train(data_dir, out, name, *extra):
    cfg = resolve_config(["--data_dir", data_dir, "--output", str(out), "--run_name", name, *TINY, "--epochs", "1",
                          *extra])
    return train_mod.train(cfg)


def _weights(out, name):
    return load_ckpt(str(out / name / "checkpoints" / "last.pth"))["model"]


def test_training_on_shards_stopped_mid_epoch_and_resumed_equals_training_on_the_folder(folder, shards, tmp_path,
                                                                                       monkeypatch):
    """The exactness test and the resume test in one: a SIGTERM mid-epoch on shards, then --resume auto, ends with the
    very weights of an uninterrupted run on the folder the shards were written from (same seed)."""
    assert _train(folder, tmp_path, "folder") == 0
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
    a, b = _weights(tmp_path, "folder"), _weights(tmp_path, "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


# -- damage ------------------------------------------------------------------------------------------------------
def _copy(shards, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(shards, out)
    return out


def _member_offset(path, name):
    with tarfile.open(path) as t:
        m = t.getmember(name)
        return m.offset_data, m.size


def test_a_corrupt_member_is_named_shard_key_and_replaced_in_its_batch(shards, tmp_path):
    data = _copy(shards, tmp_path)
    shard = os.path.join(data, "train-000000.tar")
    offset, size = _member_offset(shard, "class_000/class_000_00001.jpg")
    with open(shard, "r+b") as f:  # garbage after the JPEG header: same size, so the shipped index still applies
        f.seek(offset + 200)
        f.write(b"\x00" * (size - 200))
    scan = scan_split(data, "train")
    assert scan.from_cache and len(scan.index) == 48
    loaders = build_loaders(scan, None, make_buckets(32, max_ratio=1.5), LoaderSettings(batch_size=8, workers=2))
    try:
        batches = list(loaders.epochs(0, 0, 1))
        planned = [len(b) for b in loaders.train_sampler.rank_batches(0)]
    finally:
        loaders.close()
    failed = [f for _, _, fs in batches for f in fs]
    assert len(failed) == 1 and f"{data}/train-000000.tar:class_000/class_000_00001" in failed[0]
    assert "cannot decode" in failed[0] and [x.shape[0] for x, _, _ in batches] == planned  # batches keep their size


def test_a_truncated_shard_is_indexed_again_keeping_the_samples_before_the_cut(shards, tmp_path):
    data = _copy(shards, tmp_path)
    shard = os.path.join(data, "train-000001.tar")
    offset, _ = _member_offset(shard, "class_000/class_000_00007.jpg")
    os.truncate(shard, offset + 100)  # cut inside the third sample of the shard
    scan = scan_split(data, "train")
    assert not scan.from_cache and any("no longer matches its shards (train-000001.tar has" in n for n in scan.notes)
    bad = dict(scan.bad)
    assert "truncated or damaged" in bad["train-000001.tar"] and "its 3 samples before that are used" in \
        bad["train-000001.tar"]
    names = scan.index.paths.tolist()
    assert "train-000001.tar:class_000/class_000_00006" in names
    assert "train-000001.tar:class_000/class_000_00007" not in names
    assert bad["train-000001.tar:class_000/class_000_00007"] == "cut short with its shard"
    again = scan_split(data, "train")  # the new index was written where the shipped one was
    assert again.from_cache and again.index.paths.tolist() == names


def test_a_changed_shard_is_indexed_again_by_itself(shards, tmp_path):
    data = _copy(shards, tmp_path)
    for split in ("train", "val"):
        os.remove(os.path.join(data, f"{split}.index.npz"))  # no shipped index: times count
    first = scan_split(data, "train")
    assert not first.from_cache and scan_split(data, "train").from_cache
    a, b = os.path.join(data, "train-000000.tar"), os.path.join(data, "train-000002.tar")
    shutil.copyfile(b, a)  # another shard's samples under this name, same size, a new time
    again = scan_split(data, "train")
    assert not again.from_cache and any("train-000000.tar was modified since it was indexed" in n
                                        for n in again.notes)
    moved = [p.split(":", 1)[1] for p in first.index.paths.tolist() if p.startswith("train-000002.tar:")]
    assert [p for p in again.index.paths.tolist() if p.startswith("train-000000.tar:")] == \
        [f"train-000000.tar:{k}" for k in moved]


def test_a_shard_listed_but_missing_is_one_clear_line(shards, tmp_path, capsys):
    from rectrain.cli import main
    pattern = os.path.join(shards, "{train-{000000..000019},val-{000000..000001}}.tar")  # train has 11
    code = main(["scan", "--data_dir", pattern, "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "train-000011.tar is listed by --data_dir" in err
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{shards}/train-000000.tar\n{shards}/train-000099.tar\n")
    assert main(["scan", "--data_dir", str(listing), "--workers", "0"]) == 2
    assert "train-000099.tar is listed by --data_dir" in capsys.readouterr().err


# -- commands and paths -------------------------------------------------------------------------------------------
def test_scan_check_and_eval_take_shards(shards, tmp_path, capsys):
    from rectrain.checklist import run_checks
    from rectrain.cli import main
    assert main(["scan", "--data_dir", shards, "--workers", "0", "--target_size", "32", "--batch_size", "8"]) == 0
    out = capsys.readouterr().out
    assert f"index: {shards}/train.index.npz (read from index)" in out and "images: 48 usable in 3 classes" in out
    cfg = resolve_config(["--data_dir", shards, "--output", str(tmp_path), *TINY])
    items = {i.name: i for i in run_checks(cfg, loader_probe=True)}
    assert items["train data"].status == "pass" and "11 shards" in items["train data"].message
    assert "48 images in 3 classes" in items["train data"].message
    assert items["val data"].status == "pass" and items["loader"].status == "pass"
    os.remove(os.path.join(shards, "val.index.npz"))
    try:
        items = {i.name: i for i in run_checks(cfg, loader_probe=False)}
        assert items["val data"].status == "warn" and "not indexed yet" in items["val data"].message
    finally:
        scan_split(shards, "val", ["class_000", "class_001", "class_002"])  # written again (not shipped now)


def test_the_gpu_path_reads_shard_bytes_and_matches_the_cpu_loader(folder, shards):
    from rectrain.data import gpu_decode as gd
    train = scan_split(shards, "train")
    settings = LoaderSettings(batch_size=8, workers=2, seed=3, decoder="pil")
    gpu = build_loaders(train, None, make_buckets(32, max_ratio=1.5), LoaderSettings(**{**settings.__dict__,
                                                                                         "decode": "gpu"}))
    cpu = build_loaders(scan_split(folder, "train"), None, make_buckets(32, max_ratio=1.5), settings)
    decoder = gd.GpuBatchDecoder("cpu", decode_fn=gd.pil_decode, cpu_decoder="pil")
    seen = 0
    try:
        for (x, y, failed), (ref, ref_y, _) in zip(gd.decoded(gpu.epochs(1, 0, 2), decoder), cpu.epochs(1, 0, 2)):
            assert torch.equal(y, ref_y) and failed == []
            assert (x.long() - ref.long()).abs().float().mean() <= 2.0
            seen += len(y)
    finally:
        gpu.close()
        cpu.close()
    assert seen > 40 and decoder.gpu_images == seen and not decoder.counts  # every one decoded from its bytes


def test_two_processes_under_gloo_train_identical_replicas_and_rank_1_reads_rank_0s_index(shards, tmp_path):
    from tests.test_train import free_port
    assert _train(shards, tmp_path, "ddp", "--nproc", "2", "--dist_port", free_port()) == 0
    logs = [(tmp_path / f"ddp/logs/rank{r}.log").read_text() for r in (0, 1)]
    digests = [re.findall(r"final weights sha1 (\w+)", log) for log in logs]
    assert digests[0] and digests[0] == digests[1]
    assert f"train: read rank 0's index {shards}/train.index.npz" in logs[1]
    assert f"val: read rank 0's index {shards}/val.index.npz" in logs[1]


def test_another_rank_loads_the_folder_scan_without_listing_it(folder, monkeypatch):
    from rectrain.data.source import load_scan
    ref = scan_split(folder, "train")
    touched, real_scandir, real_stat = [], os.scandir, os.stat

    def scandir(path="."):
        touched.append(os.path.relpath(path, folder))
        return real_scandir(path)

    def stat(path, *a, **k):
        touched.append(os.path.relpath(path, folder))
        return real_stat(path, *a, **k)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    got = load_scan(ref.cache_path, ref.fingerprint, folder, "train")
    monkeypatch.undo()
    # Only the top folders (are there *.tar shards?) and the cache file itself: no class folder, no image.
    assert set(touched) <= {".", "train", "val", os.path.relpath(ref.cache_path, folder)}, touched
    assert got.index.paths.tolist() == ref.index.paths.tolist() and got.index.classes == ref.index.classes
    np.testing.assert_array_equal(got.sizes, ref.sizes)
    np.testing.assert_array_equal(got.index.labels, ref.index.labels)
    assert load_scan(ref.cache_path, "0" * 32, folder, "train") is None  # not the file rank 0 validated


# -- parquet ------------------------------------------------------------------------------------------------------
def _hub_parquet(folder, path, split, rows, labels_too=True):
    """A parquet file of the ILSVRC/imagenet-1k layout: image {bytes, path}, label; class names in the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = pa.array([{"bytes": open(os.path.join(folder, split, r), "rb").read(), "path": os.path.basename(r)}
                      for r, _ in rows], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    label = pa.array([lab if labels_too else None for _, lab in rows], type=pa.int64())
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": ["cat", "dog", "fox"], "_type": "ClassLabel"}}}}
    table = pa.table({"image": image, "label": label}).replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, path, row_group_size=10)


def test_hub_parquet_files_become_shards_with_their_labels_and_class_names(folder, tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    src = {s: scan_split(folder, s, ["class_000", "class_001", "class_002"]).index for s in ("train", "val")}
    rows = {s: list(zip(ix.paths.tolist(), ix.labels.tolist())) for s, ix in src.items()}
    _hub_parquet(folder, hub / "train-00000-of-00002.parquet", "train", rows["train"][:25])
    _hub_parquet(folder, hub / "train-00001-of-00002.parquet", "train", rows["train"][25:])
    _hub_parquet(folder, hub / "validation-00000-of-00001.parquet", "val", rows["val"])
    _hub_parquet(folder, hub / "test-00000-of-00001.parquet", "val", rows["val"], labels_too=False)
    out = tmp_path / "out"
    real, closed = ps._ShardWriter.close, []

    def close_then_die(self, position):  # killed after the third shard: the rerun starts inside a row group
        real(self, position)
        closed.append(position)
        if len(closed) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(ps._ShardWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(str(tmp_path / "hub"), str(out), "30KB", workers=0)
    monkeypatch.setattr(ps._ShardWriter, "close", real)
    assert prepare_shards(str(tmp_path / "hub"), str(out), "30KB", workers=2)["existing"] > 0
    for split in ("train", "val"):
        got = scan_split(str(out), split, None if split == "train" else ["cat", "dog", "fox"])
        assert got.index.classes == ["cat", "dog", "fox"] and len(got.index) == len(rows[split])
        np.testing.assert_array_equal(got.index.labels, [lab for _, lab in rows[split]])
        reader = got.index.members.reader()
        for i, (rel, _) in enumerate(rows[split]):
            assert reader.read(i) == open(os.path.join(folder, split, rel), "rb").read()
            assert got.index.paths[i].endswith("_" + os.path.basename(rel).replace(".", "_"))
    assert not any(n.startswith("test") for n in os.listdir(out))  # the test split has no labels: not written
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    from rectrain.errors import UserError
    with pytest.raises(UserError, match="pip install pyarrow"):
        prepare_shards(str(tmp_path / "hub"), str(tmp_path / "again"), "30KB", workers=0)


def test_data_dir_names_shards_by_folder_name_pattern_or_list(tmp_path):
    from rectrain.errors import UserError
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in ("imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar", "imagenet1k-validation-00.tar"):
        (flat / n).write_bytes(b"")
    layout = shard_layout(str(flat))
    assert [os.path.basename(p) for p in layout.splits["train"]] == ["imagenet1k-train-0000.tar",
                                                                     "imagenet1k-train-0001.tar"]
    assert [os.path.basename(p) for p in layout.splits["val"]] == ["imagenet1k-validation-00.tar"]
    nested = tmp_path / "nested"
    for split in ("train", "val"):
        (nested / split).mkdir(parents=True)
        (nested / split / "part-0.tar").write_bytes(b"")
    assert shard_layout(str(nested)).splits["val"] == [str(nested / "val" / "part-0.tar")]
    (tmp_path / "list.txt").write_text("# shards\nflat/imagenet1k-train-0001.tar\n")
    assert shard_layout(str(tmp_path / "list.txt")).splits["train"] == [str(flat / "imagenet1k-train-0001.tar")]
    pattern = shard_layout(str(flat / "imagenet1k-train-{0000..0001}.tar"))
    assert len(pattern.splits["train"]) == 2 and pattern.splits["val"] == []
    (flat / "extra-0.tar").write_bytes(b"")
    with pytest.raises(UserError, match="says neither train nor val"):
        shard_layout(str(flat))
    with pytest.raises(UserError, match="a remote folder cannot be listed"):
        shard_layout("https://example.com/in1k/")
    os.remove(flat / "extra-0.tar")
    only = tmp_path / "only"
    only.mkdir()
    (only / "shard-0.tar").write_bytes(b"")
    assert shard_layout(str(only)).splits == {"train": [str(only / "shard-0.tar")], "val": []}  # no names: all train


def test_eval_on_shards_gives_the_folders_numbers_and_bench_loader_reads_them(tiny_run, shards, capsys):
    """tiny_run's data is the same tiny folder (same generator and seed) that the shards were written from."""
    from rectrain.cli import main
    results = []
    for data in (tiny_run.data, shards):
        assert main(["eval", "--checkpoint", tiny_run.ckpt, "--data_dir", data, "--device", "cpu", "--workers", "1",
                     "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["val_images"] == results[1]["val_images"] == 15
    assert {k: v for k, v in results[0].items() if k != "checkpoint"} == \
        {k: v for k, v in results[1].items() if k != "checkpoint"}
    assert main(["bench", "loader", "--data_dir", shards, "--workers", "1", "--batch_size", "4", "--target_size", "32",
                 "--batches", "2", "--warmup", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8


def test_prepare_leaves_out_exactly_what_the_scan_rejects_and_lists_it(folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    empty, cut = data / "train/class_001/class_001_00003.jpg", data / "train/class_002/class_002_00000.jpg"
    empty.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[:300])
    (data / "train/class_000/notes.txt").write_text("not an image")
    r = prepare_shards(str(data), str(tmp_path / "out"), "50KB", workers=0)
    assert sorted(n for n, _ in r["bad_files"]) == ["train/class_001/class_001_00003.jpg",
                                                     "train/class_002/class_002_00000.jpg"]
    listed = (tmp_path / "out" / "prepare_bad_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [n for n, _ in r["bad_files"]]
    src, got = scan_split(str(data), "train"), scan_split(str(tmp_path / "out"), "train")
    assert [p.split(":", 1)[1] for p in got.index.paths.tolist()] == [p.rsplit(".", 1)[0] for p in src.index.paths]
    np.testing.assert_array_equal(got.sizes, src.sizes)


def test_a_worker_keeps_its_shards_open_and_within_the_open_file_limit(shards):
    import subprocess
    import sys
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (300, 2000)); "
            "from rectrain.data.shards import open_file_budget; print(open_file_budget(1024), "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[0]); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)); print(open_file_budget(1024))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1024", "1280", "44"]  # raised to fit every shard; where the hard limit forbids, what it leaves
    scan = scan_split(shards, "train")
    reader = scan.index.members.reader()
    reader.read(0)
    reader._budget = 2  # as under a tight limit: least recently used shards are closed
    ref = [reader.read(i) for i in range(len(scan.index))]
    assert len(reader._files) == 2 and len(set(scan.index.members.shard.tolist())) > 2
    fresh = scan.index.members.reader()
    assert all(fresh.read(i) == ref[i] for i in range(len(scan.index)))
