"""`rectrain prepare`: the downscaled copy keeps the layout, resizes, copies, rotates, converts, skips bad
files, never touches the source, resumes after a real kill, and the training pipeline reads what it writes."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rectrain.cli import main
from rectrain.data.prepare import BAD_FILES, LEGACY_TMP_SUFFIX, SETTINGS, output_size, prepare_dataset
from rectrain.data.source import scan_split
from rectrain.data.synth import make_synthetic
from rectrain.data.transforms import RectangularCropTfm, open_rgb
from rectrain.runtime.io import is_temporary, temporary_path

S = 64  # --short_side of the tests; the tiny synthetic images have short sides of 40-80 px
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save(path, im, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def _rgb(wh, colour=(200, 100, 50)):
    return Image.new("RGB", wh, colour)


@pytest.fixture
def src(tmp_path, monkeypatch):
    """Tiny synthetic JPEG folder plus big, small, PNG and empty-class cases."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never touch the real ~/.cache
    d = tmp_path / "src"
    make_synthetic(str(d), classes=2, train_per_class=4, val_per_class=1, kind="tiny", workers=1)
    _save(d / "train" / "class_000" / "big_wide.jpg", _rgb((300, 200)), quality=95)
    _save(d / "train" / "class_000" / "big_tall.jpg", _rgb((100, 250)), quality=95)
    _save(d / "train" / "class_001" / "small.jpg", _rgb((50, 40)), quality=95)
    _save(d / "train" / "class_001" / "sub" / "nested.png", _rgb((90, 120)))
    (d / "train" / "class_002_empty").mkdir()
    return d


def _files(root):
    """Relative paths of every file under root/{train,val}."""
    out = set()
    for split in ("train", "val"):
        for folder, _dirs, names in os.walk(root / split):
            out |= {os.path.relpath(os.path.join(folder, n), root) for n in names}
    return out


def _snapshot(root):
    """{relative path: (bytes, mtime_ns, sha1)} of every file under root."""
    snap = {}
    for folder, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                                  hashlib.sha1(f.read()).hexdigest())
    return snap


def _size(path):
    with Image.open(path) as im:
        return im.size


# -- geometry -------------------------------------------------------------------------------------
def test_output_size_sets_the_shorter_side_and_keeps_the_ratio():
    assert output_size(500, 375, 160) == (213, 160)
    assert output_size(375, 500, 160) == (160, 213)
    assert output_size(1000, 1000, 256) == (256, 256)
    assert output_size(129, 65, 64) == (127, 64)  # 127.02 rounded


def test_output_size_leaves_images_at_or_below_the_short_side_unchanged():
    assert output_size(64, 300, 64) == (64, 300)
    assert output_size(50, 40, 64) == (50, 40)


# -- layout ---------------------------------------------------------------------------------------
def test_same_layout_and_file_list_as_the_source(src, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    assert _files(out) == _files(src)
    assert sorted(os.listdir(out / "train")) == sorted(os.listdir(src / "train"))


def test_empty_class_folders_are_kept_so_labels_do_not_shift(src, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    assert (out / "train" / "class_002_empty").is_dir()
    assert scan_split(str(out), "train").index.classes == scan_split(str(src), "train").index.classes


def test_files_at_the_top_of_the_source_are_not_copied(src, tmp_path):
    scan_split(str(src), "train")  # writes src/sorted_idxar_train.npz
    (src / "README.txt").write_text("notes")
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    assert (src / "sorted_idxar_train.npz").exists()
    assert sorted(os.listdir(out)) == sorted([BAD_FILES, SETTINGS, "train", "val"])


def test_the_source_is_never_modified(src, tmp_path):
    (src / "train" / "class_000" / "empty.jpg").write_bytes(b"")
    before = _snapshot(src)
    prepare_dataset(str(src), str(tmp_path / "out"), S, workers=1)
    assert _snapshot(src) == before


# -- per image ------------------------------------------------------------------------------------
def test_big_images_get_the_short_side_and_keep_their_ratio(src, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    for rel in _files(src):
        w, h = _size(src / rel)
        if min(w, h) > S:
            ow, oh = _size(out / rel)
            assert min(ow, oh) == S, rel
            assert abs(ow / oh - w / h) <= 0.5 * (w / h) / S + 1e-9, rel  # within rounding of the longer side
    assert _size(out / "train" / "class_000" / "big_wide.jpg") == (96, 64)
    assert _size(out / "train" / "class_000" / "big_tall.jpg") == (64, 160)


def test_small_upright_rgb_jpegs_are_copied_byte_for_byte(src, tmp_path):
    out = tmp_path / "out"
    r = prepare_dataset(str(src), str(out), S, workers=1)
    rel = os.path.join("train", "class_001", "small.jpg")
    assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert r["copied"] >= 1


def test_png_is_written_as_jpeg_data_under_its_own_name(src, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    path = out / "train" / "class_001" / "sub" / "nested.png"
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 85))


def test_small_non_jpeg_is_reencoded_not_resized(tmp_path):
    d = tmp_path / "src"
    _save(d / "train" / "a" / "x.png", _rgb((40, 50)))
    r = prepare_dataset(str(d), str(tmp_path / "out"), S, workers=1)
    with Image.open(tmp_path / "out" / "train" / "a" / "x.png") as im:
        assert (im.format, im.size) == ("JPEG", (40, 50))
    assert r["reencoded"] == 1


def _quadrant_image(wh):
    """Upright test image: red top-left quadrant, blue elsewhere."""
    a = np.zeros((wh[1], wh[0], 3), np.uint8)
    a[...] = (0, 0, 255)
    a[: wh[1] // 2, : wh[0] // 2] = (255, 0, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("wh", [(160, 120), (48, 40)], ids=["resized", "small"])
def test_exif_rotated_jpeg_is_written_upright_without_orientation(tmp_path, wh):
    upright = _quadrant_image(wh)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate by 90 degrees clockwise to show it upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways stores
    d = tmp_path / "src"
    _save(d / "train" / "a" / "r.jpg", stored, quality=95, exif=exif.tobytes())
    prepare_dataset(str(d), str(tmp_path / "out"), S, workers=1)
    with Image.open(tmp_path / "out" / "train" / "a" / "r.jpg") as im:
        assert 0x0112 not in im.getexif()
        assert im.size == output_size(*wh, S)
        a = np.asarray(im.convert("RGB")).astype(int)
    h, w = a.shape[:2]
    assert a[h // 4, w // 4, 0] > 200 and a[h // 4, w // 4, 2] < 60  # top-left is red: upright
    assert a[3 * h // 4, 3 * w // 4, 2] > 200  # bottom-right is blue


def _modes():
    grey16 = Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30))
    rgba = Image.new("RGBA", (48, 40), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 24, 40))
    return {
        "cmyk_jpeg": (Image.new("CMYK", (48, 40), (0, 200, 200, 0)), "JPEG", "x.jpg"),
        "grey_png": (Image.new("L", (48, 40), 90), "PNG", "x.png"),
        "palette_gif": (_rgb((48, 40)).convert("P", dither=Image.Dither.NONE), "GIF", "x.gif"),
        "rgba_png": (rgba, "PNG", "x.png"),
        "grey16_png": (grey16, "PNG", "x.png"),
    }


@pytest.mark.parametrize("case", sorted(_modes()))
def test_colour_modes_become_rgb_as_the_training_decoder_makes_them(tmp_path, case):
    im, fmt, name = _modes()[case]
    d = tmp_path / "src"
    path = _save(d / "train" / "a" / name, im, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    prepare_dataset(str(d), str(tmp_path / "out"), S, workers=1)
    out = tmp_path / "out" / "train" / "a" / name
    with Image.open(out) as o:
        assert (o.format, o.mode) == ("JPEG", "RGB")
    expected = np.asarray(open_rgb(str(path))).astype(int)
    got = np.asarray(open_rgb(str(out))).astype(int)
    assert np.abs(got - expected).mean() < 4  # JPEG re-encoding noise only


# -- bad files ------------------------------------------------------------------------------------
def _add_bad_files(d):
    good = (d / "train" / "class_000" / "big_wide.jpg").read_bytes()
    (d / "train" / "class_000" / "zero.jpg").write_bytes(b"")
    (d / "train" / "class_000" / "text.jpg").write_text("this is not an image\n")
    (d / "train" / "class_001" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return {"train/class_000/zero.jpg", "train/class_000/text.jpg", "train/class_001/cut.jpg"}


def test_bad_files_are_skipped_and_listed_with_reasons(src, tmp_path, capsys):
    bad = _add_bad_files(src)
    out = tmp_path / "out"
    assert main(["prepare", "--data_dir", str(src), "--out", str(out), "--short_side", str(S), "--workers", "1"]) == 0
    rows = dict(line.split("\t") for line in (out / BAD_FILES).read_text().splitlines())
    assert set(rows) == bad
    assert "empty" in rows["train/class_000/zero.jpg"] and "truncated" in rows["train/class_001/cut.jpg"]
    assert "not an image" in rows["train/class_000/text.jpg"]
    printed = capsys.readouterr().out
    assert all(f"{p}: " in printed for p in bad)
    assert not any((out / p).exists() for p in bad)


def test_nothing_usable_is_an_error(tmp_path, capsys):
    d = tmp_path / "src"
    (d / "train" / "a").mkdir(parents=True)
    (d / "train" / "a" / "zero.jpg").write_bytes(b"")
    assert main(["prepare", "--data_dir", str(d), "--out", str(tmp_path / "out"), "--short_side", "64"]) == 2
    assert "none of the 1 image files could be prepared" in capsys.readouterr().err


# -- the training pipeline reads the output ---------------------------------------------------------
def test_the_scan_finds_every_image_of_the_output(src, tmp_path):
    _add_bad_files(src)
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    scan = scan_split(str(out), "train")
    assert scan.bad == []
    assert sorted(scan.index.paths.tolist()) == sorted(p for p in scan_split(str(src), "train").index.paths.tolist())
    assert len(scan_split(str(out), "val", scan.index.classes).index) == 2


@pytest.mark.parametrize("decoder", ["pil", "auto"])
def test_the_training_decoder_crops_every_output_image(src, tmp_path, decoder):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    scan = scan_split(str(out), "train")
    tfm = RectangularCropTfm(train=True, decoder=decoder)
    rng = np.random.default_rng(0)
    for i in range(len(scan.index)):
        crop = tfm(scan.index.abspath(i), (32, 48), rng, size_hw=tuple(scan.sizes[i]))
        assert crop.shape == (32, 48, 3) and crop.dtype == np.uint8


# -- resume ---------------------------------------------------------------------------------------
def _gradient_png(path, wh=(1600, 1200)):
    """A large PNG: ~60 ms to decode and resize (PNGs have no reduced-scale decoding), ~60 kB on disk."""
    y, x = np.mgrid[0:wh[1], 0:wh[0]]
    a = np.stack([x * 255 // wh[0], y * 255 // wh[1], (x + y) % 256], -1).astype(np.uint8)
    _save(path, Image.fromarray(a), compress_level=1)


def _outputs(out):
    return {p: os.stat(out / p).st_mtime_ns for p in _files(out)}


def test_resume_after_sigkill_finishes_without_rewriting_done_files(tmp_path):
    d, out, n = tmp_path / "src", tmp_path / "out", 16
    _gradient_png(d / "train" / "a" / "img_000.png")
    for i in range(1, n):
        os.link(d / "train" / "a" / "img_000.png", d / "train" / "a" / f"img_{i:03d}.png")
    cmd = [sys.executable, "-m", "rectrain", "prepare", "--data_dir", str(d), "--out", str(out),
           "--short_side", str(S), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(out / "train" / "a") if (out / "train" / "a").is_dir() else []) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as a scheduler or the OOM killer would
    finally:
        proc.wait()
    done = {p: t for p, t in _outputs(out).items() if not os.path.basename(p).startswith(".")}
    assert 0 < len(done) < n
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"prepared {n - len(done)} images" in rerun.stdout and f"{len(done)} already done" in rerun.stdout
    after = _outputs(out)
    assert sorted(after) == [f"train/a/img_{i:03d}.png" for i in range(n)]  # no temp file left
    assert all(after[p] == t for p, t in done.items())  # finished files were not written again
    for p in after:
        with Image.open(out / p) as im:
            im.load()
            assert im.size == (85, 64)


def test_rerun_removes_stale_temp_files_and_redoes_empty_outputs(src, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    stale = Path(temporary_path(str(out / "train" / "class_000" / "big_wide.jpg")))
    legacy = out / "train" / "class_000" / f".small.jpg.123-abcd{LEGACY_TMP_SUFFIX}"  # an older rectrain's
    stale.write_bytes(b"half an image")
    legacy.write_bytes(b"half an image")
    (out / "train" / "class_000" / "big_wide.jpg").write_bytes(b"")  # what a power loss can leave
    r = prepare_dataset(str(src), str(out), S, workers=1)
    assert (r["stale_temps"], r["resized"] + r["copied"] + r["reencoded"]) == (2, 1)
    assert not stale.exists() and not legacy.exists()
    assert _size(out / "train" / "class_000" / "big_wide.jpg") == (96, 64)


def test_rerun_with_another_short_side_is_refused(src, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), S, workers=1)
    assert main(["prepare", "--data_dir", str(src), "--out", str(out), "--short_side", "48"]) == 2
    assert "was prepared with --short_side 64" in capsys.readouterr().err


def test_a_process_pool_writes_the_same_files_as_one_process(src, tmp_path):
    prepare_dataset(str(src), str(tmp_path / "one"), S, workers=1)
    prepare_dataset(str(src), str(tmp_path / "pool"), S, workers=2)
    one, pool = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "pool")
    assert {p: v[2] for p, v in one.items()} == {p: v[2] for p, v in pool.items()}


def test_a_write_failure_stops_with_one_line_naming_the_file(src, tmp_path, capsys):
    out = tmp_path / "out"
    blocker = out / "train" / "class_000" / "big_wide.jpg" / "x"  # a folder where an output must go
    blocker.mkdir(parents=True)
    assert main(["prepare", "--data_dir", str(src), "--out", str(out), "--short_side", str(S), "--workers", "1"]) == 2
    line = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert line.startswith("rectrain prepare: error: cannot write") and "big_wide.jpg: Is a directory" in line
    assert not [n for n in os.listdir(blocker.parent.parent) if is_temporary(n)]


# -- errors for people ------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_train", "train does not exist"),
    ("out_is_src", "is --data_dir"),
    ("out_inside_src", "is inside --data_dir"),
    ("short_side", "--short_side must be >= 32"),
    ("unwritable", "cannot write to --out"),
])
def test_user_mistakes_are_one_line_errors(src, tmp_path, capsys, case, message):
    (tmp_path / "no_train").mkdir()
    (tmp_path / "a_file").write_text("")
    data, out, side = str(src), str(tmp_path / "out"), str(S)
    if case == "missing":
        data = str(tmp_path / "nowhere")
    elif case == "no_train":
        data = str(tmp_path / "no_train")
    elif case == "out_is_src":
        out = str(src)
    elif case == "out_inside_src":
        out = str(src / "small")
    elif case == "short_side":
        side = "31"
    else:
        out = str(tmp_path / "a_file" / "out")  # below a regular file: unwritable even for root
    assert main(["prepare", "--data_dir", data, "--out", out, "--short_side", side]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
