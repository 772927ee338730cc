"""Aspect-ratio scan: header sizes, EXIF orientation, bad files, the .npz cache, `rectrain scan`."""

import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from rectrain.cli import main
from rectrain.commands import scan as scan_cmd
from rectrain.data import scan as arscan
from rectrain.data.scan import BadImage, read_size
from rectrain.data.source import scan_split


def _img(path, wh=(40, 30), fmt=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", wh, (200, 100, 50)).save(path, fmt, **save)
    return path


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never touch the real ~/.cache
    d = tmp_path / "data"
    _img(d / "train" / "cat" / "wide.jpg", (40, 30))
    _img(d / "train" / "cat" / "tall.png", (30, 60))
    _img(d / "train" / "dog" / "square.jpg", (32, 32))
    _img(d / "val" / "dog" / "v.jpg", (50, 20))
    return d


def _size_of(scan, rel):
    return tuple(scan.sizes[scan.index.paths.tolist().index(rel)])


# -- sizes ----------------------------------------------------------------------------------------
def test_sizes_are_height_width_from_the_header(data):
    scan = scan_split(str(data), "train")
    assert scan.sizes.dtype == np.int32 and scan.sizes.shape == (3, 2)
    assert _size_of(scan, "cat/wide.jpg") == (30, 40)
    assert _size_of(scan, "cat/tall.png") == (60, 30)


def test_exif_orientation_6_swaps_height_and_width(data):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show upright
    path = _img(data / "train" / "dog" / "rotated.jpg", (40, 30), exif=exif.tobytes())
    assert read_size(str(path)) == (40, 30)
    assert _size_of(scan_split(str(data), "train"), "dog/rotated.jpg") == (40, 30)


def test_tiff_orientation_6_swaps_height_and_width_once(data):
    from PIL import TiffImagePlugin
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x0112] = 6
    path = _img(data / "r6.tif", (40, 30), tiffinfo=tags)
    assert read_size(str(path)) == (40, 30)
    with Image.open(path) as im:  # what a decoder shows, upright
        assert ImageOps.exif_transpose(im).size == (30, 40)


def test_png_exif_orientation_before_the_pixels_is_honoured(data):
    exif = Image.Exif()
    exif[0x0112] = 8
    assert read_size(str(_img(data / "r8.png", (40, 30), exif=exif.tobytes()))) == (40, 30)


def test_corrupt_exif_gives_no_warning_and_counts_as_upright(data, recwarn):
    ifd = b"MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01"  # IFD cut short
    path = _img(data / "badexif.jpg", (40, 30), exif=b"Exif\x00\x00" + ifd)
    assert read_size(str(path)) == (30, 40)
    assert len(recwarn) == 0  # Pillow warns "Corrupt EXIF data" once per file otherwise


def test_exif_orientation_3_keeps_height_and_width(data):
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down: same shape
    assert read_size(str(_img(data / "r3.jpg", (40, 30), exif=exif.tobytes()))) == (30, 40)


def test_val_scan_uses_train_class_map(data):
    train = scan_split(str(data), "train")
    val = scan_split(str(data), "val", classes=train.index.classes)
    assert val.index.classes == ["cat", "dog"] and val.index.labels.tolist() == [1]


# -- cache ----------------------------------------------------------------------------------------
def test_cache_is_written_beside_the_data_and_reused(data):
    first = scan_split(str(data), "train")
    assert not first.from_cache and first.cache_path == str(data / "sorted_idxar_train.npz")
    second = scan_split(str(data), "train")
    assert second.from_cache and second.cache_path == first.cache_path
    assert second.index.paths.tolist() == first.index.paths.tolist()
    assert np.array_equal(second.sizes, first.sizes) and second.index.labels.dtype == np.int64
    assert second.index.split_dir == first.index.split_dir


def test_cache_is_a_plain_npz_readable_without_pickle(data):
    scan_split(str(data), "train")
    with np.load(data / "sorted_idxar_train.npz", allow_pickle=False) as z:
        assert [p.decode() for p in z["paths"].tolist()] == ["cat/tall.png", "cat/wide.jpg", "dog/square.jpg"]
        assert z["classes"].tolist() == ["cat", "dog"]
        assert z["sizes"].shape == (3, 2) and int(z["version"]) == arscan.FORMAT_VERSION
        assert {"labels", "usable", "bad_paths", "bad_reasons", "fingerprint"} <= set(z.files)


def test_adding_a_file_invalidates_the_cache(data):
    scan_split(str(data), "train")
    _img(data / "train" / "dog" / "new.jpg", (64, 32))
    scan = scan_split(str(data), "train")
    assert not scan.from_cache and _size_of(scan, "dog/new.jpg") == (32, 64)


def test_changing_a_file_invalidates_the_cache(data):
    scan_split(str(data), "train")
    path = _img(data / "train" / "cat" / "wide.jpg", (90, 30))  # same name, new content
    os.utime(path, ns=(1, 1_000_000_000))  # a different mtime even on coarse-grained file systems
    scan = scan_split(str(data), "train")
    assert not scan.from_cache and _size_of(scan, "cat/wide.jpg") == (30, 90)


def test_changing_max_pixels_invalidates_the_cache(data):
    scan_split(str(data), "train")
    assert not scan_split(str(data), "train", max_pixels=10_000).from_cache


def test_read_only_data_dir_falls_back_to_cache_dir(data, tmp_path, monkeypatch):
    real = arscan._dir_writable
    monkeypatch.setattr(arscan, "_dir_writable", lambda p: p != str(data) and real(p))
    run_dir = tmp_path / "run"
    first = scan_split(str(data), "train", cache_dir=str(run_dir))
    assert os.path.dirname(first.cache_path) == str(run_dir)
    assert os.path.basename(first.cache_path).startswith("sorted_idxar_train_")
    assert not (data / "sorted_idxar_train.npz").exists()
    assert scan_split(str(data), "train", cache_dir=str(run_dir)).from_cache


def test_read_only_data_dir_without_cache_dir_uses_user_cache(data, tmp_path, monkeypatch):
    real = arscan._dir_writable
    monkeypatch.setattr(arscan, "_dir_writable", lambda p: p != str(data) and real(p))
    scan = scan_split(str(data), "train")
    assert scan.cache_path.startswith(str(tmp_path / "xdg" / "rectrain"))
    assert scan_split(str(data), "train").from_cache


def test_corrupt_cache_is_rebuilt(data):
    path = scan_split(str(data), "train").cache_path
    with open(path, "r+b") as f:
        f.truncate(100)
    scan = scan_split(str(data), "train")
    assert not scan.from_cache and scan.cache_path == path and len(scan.index) == 3
    assert scan_split(str(data), "train").from_cache


def test_no_temporary_files_are_left_behind(data):
    scan_split(str(data), "train")
    assert sorted(os.listdir(data)) == ["sorted_idxar_train.npz", "train", "val"]


def test_parallel_scan_matches_inline_scan(data, monkeypatch):
    for i in range(6):
        _img(data / "train" / "dog" / f"p{i}.jpg", (20 + i, 30))
    (data / "train" / "dog" / "bad.jpg").write_bytes(b"")
    inline = scan_split(str(data), "train", workers=1)
    monkeypatch.setattr(arscan, "INLINE_BELOW", 2)
    monkeypatch.setattr(arscan, "CHUNK", 3)
    (data / "sorted_idxar_train.npz").unlink()
    pooled = scan_split(str(data), "train", workers=2)
    assert not pooled.from_cache
    assert pooled.index.paths.tolist() == inline.index.paths.tolist()
    assert np.array_equal(pooled.sizes, inline.sizes) and pooled.bad == inline.bad


# -- bad files ------------------------------------------------------------------------------------
def _bad_files(d):
    """Write one file of each unusable kind; -> {relative path: expected words in the reason}."""
    cls = d / "train" / "cat"
    (cls / "empty.jpg").write_bytes(b"")
    noisy = np.random.default_rng(0).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(d / "noisy.jpg")
    whole = (d / "noisy.jpg").read_bytes()
    (cls / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # header intact, scan data cut
    (cls / "cut_header.jpg").write_bytes(whole[:100])
    (d / "noisy.jpg").unlink()
    (cls / "text.jpg").write_text("this is not a picture\n")
    _img(cls / "huge.png", (200, 100))
    Image.fromarray(noisy).save(d / "noisy.png")
    png = (d / "noisy.png").read_bytes()
    (cls / "truncated.png").write_bytes(png[: len(png) // 2])  # half of the pixel data missing
    (d / "noisy.png").unlink()
    return {"cat/empty.jpg": "empty", "cat/truncated.jpg": "truncated", "cat/cut_header.jpg": "truncated", "cat/text.jpg": "not an image",
            "cat/huge.png": "decompression bomb", "cat/truncated.png": "truncated"}


def test_bad_files_are_reported_by_path_with_a_reason_and_excluded(data):
    expected = _bad_files(data)
    scan = scan_split(str(data), "train", max_pixels=10_000)
    reasons = dict(scan.bad)
    assert set(reasons) == set(expected)
    for path, words in expected.items():
        assert words in reasons[path], (path, reasons[path])
    assert sorted(scan.index.paths.tolist()) == ["cat/tall.png", "cat/wide.jpg", "dog/square.jpg"]
    assert len(scan.sizes) == len(scan.index) == len(scan.index.labels)


def test_bad_files_survive_the_cache(data):
    _bad_files(data)
    first = scan_split(str(data), "train", max_pixels=10_000)
    second = scan_split(str(data), "train", max_pixels=10_000)
    assert second.from_cache and second.bad == first.bad


def test_jpeg_with_zero_padding_after_end_marker_is_fine(data):
    path = data / "train" / "cat" / "padded.jpg"
    path.write_bytes((data / "train" / "cat" / "wide.jpg").read_bytes() + b"\x00" * 100)
    assert read_size(str(path)) == (30, 40)


def test_jpeg_with_data_appended_after_end_marker_is_fine(data):
    path = data / "train" / "cat" / "trailer.jpg"  # camera trailers, motion photos: decodable files
    path.write_bytes((data / "train" / "cat" / "wide.jpg").read_bytes() + b"TRAILER" * 1000)
    assert read_size(str(path)) == (30, 40)


def test_jpeg_missing_only_its_end_marker_is_truncated(data):
    path = data / "train" / "cat" / "noeoi.jpg"
    path.write_bytes((data / "train" / "cat" / "wide.jpg").read_bytes()[:-2])
    with pytest.raises(BadImage, match="truncated"):
        read_size(str(path))


def test_read_size_raises_bad_image_with_reason(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="0 bytes"):
        read_size(str(tmp_path / "x.jpg"))


def test_only_bad_files_is_a_user_error(tmp_path):
    (tmp_path / "train" / "c").mkdir(parents=True)
    (tmp_path / "train" / "c" / "a.jpg").write_bytes(b"")
    with pytest.raises(arscan.UserError, match="none of the 1 image files"):
        scan_split(str(tmp_path), "train", cache_dir=str(tmp_path / "cache"))


# -- `rectrain scan` ------------------------------------------------------------------------------
def test_cli_scan_prints_counts_bad_files_and_bucket_table(data, capsys):
    _bad_files(data)
    assert main(["scan", "--data_dir", str(data), "--batch_size", "2", "--max_pixels", "10000"]) == 0
    out = capsys.readouterr().out
    assert "== train" in out and "== val" in out  # both splits by default when val/ exists
    assert "images: 3 usable in 2 classes" in out
    assert "bad files: 6" in out and "cat/truncated.jpg: truncated" in out
    assert "shape HxW" in out and "224x224" in out and "aspect ratio W/H" in out
    assert "sorted_idxar_train.npz" in out and "time:" in out


def test_cli_scan_second_run_reads_the_cache(data, capsys):
    main(["scan", "--data_dir", str(data), "--split", "train"])
    capsys.readouterr()
    assert main(["scan", "--data_dir", str(data), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "read from cache" in out and "== val" not in out


def test_cli_scan_missing_dir_exits_2_with_one_line(tmp_path, capsys):
    assert main(["scan", "--data_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "does not exist" in err


# -- cache_status ---------------------------------------------------------------------------------
def test_cache_status_is_missing_then_fresh_then_stale(data):
    st = arscan.cache_status(str(data), "train")
    assert (st.path, st.fresh, st.files, st.scan) == (None, False, 3, None)
    scan_split(str(data), "train")
    st = arscan.cache_status(str(data), "train")
    assert st.fresh and st.path == str(data / "sorted_idxar_train.npz") and len(st.scan.index) == 3
    _img(data / "train" / "dog" / "new.jpg", (64, 32))
    st = arscan.cache_status(str(data), "train")
    assert not st.fresh and st.path == str(data / "sorted_idxar_train.npz") and st.files == 4


def test_cache_status_writes_nothing(data):
    before = sorted(os.listdir(data))
    arscan.cache_status(str(data), "train")
    assert sorted(os.listdir(data)) == before and not os.path.exists(os.environ["XDG_CACHE_HOME"])


def test_cache_status_finds_the_cache_of_read_only_data_in_cache_dir(data, tmp_path, monkeypatch):
    real = arscan._dir_writable
    monkeypatch.setattr(arscan, "_dir_writable", lambda p: p != str(data) and real(p))
    path = scan_split(str(data), "train", cache_dir=str(tmp_path / "run")).cache_path
    st = arscan.cache_status(str(data), "train", cache_dir=str(tmp_path / "run"))
    assert st.fresh and st.path == path


def test_cache_status_carries_the_cached_bad_files(data):
    _bad_files(data)
    scan_split(str(data), "train", max_pixels=10_000)
    st = arscan.cache_status(str(data), "train", max_pixels=10_000)
    assert st.fresh and len(st.scan.bad) == 6
    assert not arscan.cache_status(str(data), "train").fresh  # another max_pixels: another scan


# -- bucket table ---------------------------------------------------------------------------------
def test_bucket_batches_follow_the_training_sampler():
    assert scan_cmd.bucket_batches(10, 4) == [4, 4]  # the leftover 2 are dropped
    assert scan_cmd.bucket_batches(3, 4) == [3]  # no full batch: one smaller batch
    assert scan_cmd.bucket_batches(1, 4) == []  # a single image gives no batch
    assert scan_cmd.bucket_batches(0, 4) == []


def test_bucket_table_says_when_a_bucket_holds_fewer_images_than_the_batch():
    from rectrain.data.buckets import make_buckets
    sizes = np.array([[224, 224]] * 5 + [[224, 448]] * 300 + [[448, 224]], dtype=np.int32)
    lines = scan_cmd.bucket_lines(sizes, make_buckets(224), batch_size=256)
    row = {line.split()[0]: line for line in lines[1:]}
    assert row["224x224"].split()[2:4] == ["5", "1"] and "fewer images than --batch_size: one smaller batch of 5" in row["224x224"]
    assert row["224x448"].split()[2:4] == ["300", "1"] and "44 left over" in row["224x448"]
    assert row["448x224"].split()[3] == "0" and "a single image: unused" in row["448x224"]
    assert row["total"].split()[1:3] == ["306", "2"] and "261 images used, 45 left over" in row["total"]
    assert not any("note:" in line for line in lines)  # one bucket has a full batch


def test_cli_scan_on_small_data_explains_the_batch_counts(data, capsys):
    _img(data / "train" / "dog" / "wide2.jpg", (44, 33))  # a second 4:3 image beside cat/wide.jpg
    assert main(["scan", "--data_dir", str(data), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "(fewer images than --batch_size: one smaller batch of 2)" in out
    assert "(a single image: unused" in out  # tall.png and square.jpg are alone in their buckets
    assert "note: every bucket holds fewer images than --batch_size 256 (the largest 2)" in out


# -- what the scan tells besides sizes (issue: warnings that were missing; scan and eval agree) ------------------
def test_val_buckets_score_every_image_as_eval_does(data, capsys):
    """The val table follows the evaluation rule (every image scored, a lone one too), not the training one."""
    from rectrain.data.buckets import make_buckets
    from rectrain.data.loader import LoaderSettings, build_val_loader
    _img(data / "val" / "cat" / "tall.png", (30, 60))  # alone in its bucket
    assert scan_cmd.bucket_batches(1, 4, train=False) == [1] and scan_cmd.bucket_batches(10, 4, train=False) == [4, 4, 2]
    assert main(["scan", "--data_dir", str(data), "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    val_table = out[out.index("== val"):]
    assert "unused" not in val_table and "every image" in val_table
    total = next(ln for ln in val_table.splitlines() if ln.split()[:1] == ["total"])
    val = scan_split(str(data), "val", classes=["cat", "dog"])
    loader, _ = build_val_loader(val, make_buckets(224), LoaderSettings(batch_size=4, workers=0, seed=0))
    batches = [len(y) for _x, y, _failed in loader]
    assert total.split()[1:3] == [str(sum(batches)), str(len(batches))] == ["2", "2"]


def test_junk_files_are_named_not_only_counted(data, capsys):
    for name in ("._wide.jpg", "Thumbs.db", "README.txt"):
        (data / "train" / "cat" / name).write_bytes(b"junk")
    assert main(["scan", "--data_dir", str(data), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "skipped: 3" in out
    assert "1 hidden (name starts with '.'): cat/._wide.jpg" in out
    assert "2 not an image by extension: cat/README.txt, cat/Thumbs.db" in out


def test_tiny_images_missing_val_classes_and_a_meaningless_top5_are_said(data, capsys):
    _img(data / "train" / "dog" / "dot.png", (1, 1))
    notes = arscan.data_notes(scan_split(str(data), "train"), scan_split(str(data), "val", classes=["cat", "dog"]))
    assert any("1 train image(s) smaller than 16 px" in n and "dog/dot.png (1x1)" in n for n in notes), notes
    assert any("1 of train's 2 classes have no val images (cat)" in n for n in notes), notes
    assert any("with 2 classes top-5 accuracy is always 100%" in n for n in notes), notes
    assert main(["scan", "--data_dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "== notes" in out and "dog/dot.png (1x1)" in out and "no val images (cat)" in out


def test_ordinary_data_gives_no_notes(tmp_path):
    from rectrain.data.synth import make_synthetic
    make_synthetic(str(tmp_path), classes=6, train_per_class=3, val_per_class=1, kind="tiny", seed=0)
    train = scan_split(str(tmp_path), "train")
    assert arscan.data_notes(train, scan_split(str(tmp_path), "val", classes=train.index.classes)) == []


# -- a dataset shared between users ----------------------------------------------------------------------------
def _as_user(uid: int, fn) -> int:
    """Run ``fn`` in a forked child under another user id (modules loaded already: nothing is read from the
    interpreter's own, possibly private, install); its exit status: 0 when ``fn`` returned True."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = 0 if fn() else 3
        except BaseException as e:
            print(f"child failed: {type(e).__name__}: {e}", flush=True)
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root, to act as a second user")
def test_a_shared_dataset_gets_a_readable_cache_and_another_users_private_one_never_fails_a_scan(tmp_path):
    from rectrain.data.synth import make_synthetic
    Image.init()  # every format plugin loaded before the fork
    shared = tempfile.mkdtemp(prefix="rectrain-shared-", dir="/tmp")
    try:
        os.chmod(shared, 0o755)
        old = os.umask(0o022)
        try:
            make_synthetic(shared, classes=2, train_per_class=4, val_per_class=1, kind="tiny", seed=0)
            first = scan_split(shared, "train")
        finally:
            os.umask(old)
        assert first.cache_path == os.path.join(shared, "sorted_idxar_train.npz")
        assert os.stat(first.cache_path).st_mode & 0o777 == 0o644  # readable by the dataset's other users
        os.chmod(first.cache_path, 0o600)  # another user's private cache, as an older rectrain wrote it
        home = tempfile.mkdtemp(prefix="rectrain-home-", dir="/tmp")
        os.chmod(home, 0o777)
        os.environ["XDG_CACHE_HOME"] = home

        def scan_as_nobody():
            scan = scan_split(shared, "train")
            return len(scan.index) == 8 and not scan.from_cache and scan.cache_path.startswith(home)

        try:
            assert _as_user(65534, scan_as_nobody) == 0
        finally:
            del os.environ["XDG_CACHE_HOME"]
            shutil.rmtree(home, ignore_errors=True)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
