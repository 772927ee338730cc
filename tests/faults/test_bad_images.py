"""Case 6: the bad-image zoo, files that turn bad after the scan, and the decode-failure limit under DDP.

Policy (rectrain/arscan.py, rectrain/transforms.py, rectrain/index.py):
- unusable files (empty, truncated, not an image, over the pixel limit) are found by the header scan,
  excluded and reported by path with a reason; the run goes on;
- odd but valid images are decoded to upright 8-bit RGB: by content, not extension; CMYK, greyscale,
  16-bit and palette images converted; transparency composited over ``ALPHA_BACKGROUND``; EXIF
  orientation applied; any size and ratio cropped to its bucket (ratios beyond --max_ratio lose their sides);
- a val class that train lacks is an error naming it; an empty class folder is an error (issue 9);
- a file that fails to decode during the run is replaced by another image of its bucket, logged and
  counted; past --max_decode_failures the run stops, every rank together.
"""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rectrain.data.buckets import make_buckets
from rectrain.data.scan import read_size
from rectrain.data.synth import make_synthetic
from rectrain.data.transforms import ALPHA_BACKGROUND, RectangularCropTfm, cv2

from . import harness as h

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path, side=14_000):
    """A valid 1-bit PNG of side x side pixels (196 M, over the 179 M limit) in ~25 kB: a decompression bomb."""
    row = b"\0" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _halves(w, h, first, second, vertical_split=True):
    a = np.zeros((h, w, 3), np.uint8)
    if vertical_split:
        a[:, : w // 2], a[:, w // 2:] = first, second
    else:
        a[: h // 2], a[h // 2:] = first, second
    return a


def make_odd_images(folder):
    """Valid but unusual images -> name. Each has a pixel check in ``EXPECTED``."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), RED).save(folder / "png_named.JPEG", format="PNG")
    Image.new("CMYK", (40, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # pure red ink
    Image.new("L", (40, 32), 100).save(folder / "grey.jpg", quality=95)
    Image.fromarray(np.full((32, 40), 0x8080, np.uint16)).save(folder / "sixteen.png")  # 16-bit grey, mid
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([*RED, *BLUE] + [0] * 762)
    pal.paste(1, (0, 16, 32, 32))  # top half index 0 (transparent), bottom half index 1 (blue)
    pal.save(folder / "palette_alpha.png", transparency=0)
    Image.new("RGB", (1, 1), GREEN).save(folder / "one_pixel.png")
    pano = np.zeros((20, 400, 3), np.uint8)
    pano[:, :133], pano[:, 133:267], pano[:, 267:] = RED, GREEN, BLUE
    Image.fromarray(pano).save(folder / "panorama_20to1.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, shown rotated 90 degrees clockwise: the left half becomes the top
    Image.fromarray(_halves(48, 24, RED, BLUE)).save(folder / "exif_rotated.jpg", quality=95, exif=exif)


def make_bad_files(folder):
    """Files the scan must exclude -> the word its reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_bytes.jpg").write_bytes(b"")
    buf = folder / "whole.tmpjpg"
    _noise(64, 48).save(buf, format="JPEG", quality=90)
    raw = buf.read_bytes()
    buf.unlink()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) * 6 // 10])
    (folder / "text.jpg").write_text("this is a text file with an image extension\n")
    write_bomb(folder / "bomb.png")
    return {"zero_bytes.jpg": "empty", "truncated.jpg": "truncated", "text.jpg": "not an image",
            "bomb.png": "decompression bomb"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A small data set with the odd images in class_000 and the bad files in class_001 (train)."""
    root = tmp_path_factory.mktemp("zoo")
    make_synthetic(str(root), classes=3, train_per_class=8, val_per_class=2, kind="tiny", seed=3)
    make_odd_images(root / "train" / "class_000")
    bad = make_bad_files(root / "train" / "class_001")
    return root, {f"class_001/{k}": v for k, v in bad.items()}


def _val_crop(path, decoder):
    size = read_size(str(path))
    buckets = make_buckets(32, "short_side", 1.5)
    out_hw = tuple(int(v) for v in buckets.shapes[buckets.assign(np.array([size]))[0]])
    return RectangularCropTfm(train=False, decoder=decoder)(str(path), out_hw, size_hw=size), size


def _close(pixels, colour, tol):
    return np.abs(pixels.astype(int) - np.array(colour)).max() <= tol


# name -> check of the (H, W, 3) uint8 centre crop and the upright (H, W) size from the scan
EXPECTED = {
    "png_named.JPEG": lambda a, size: _close(a, RED, 0),
    "cmyk.jpg": lambda a, size: _close(a, (255, 0, 0), 12),
    "grey.jpg": lambda a, size: _close(a, (100, 100, 100), 3),
    "sixteen.png": lambda a, size: _close(a, (128, 128, 128), 1),
    "palette_alpha.png": lambda a, size: _close(a[:8], ALPHA_BACKGROUND, 1) and _close(a[-8:], BLUE, 1),
    "one_pixel.png": lambda a, size: _close(a, GREEN, 0),
    # the widest bucket, filled by the centre of the panorama (its sides are cropped away)
    "panorama_20to1.jpg": lambda a, size: a.shape[:2] == WIDEST and _close(a, GREEN, 12),
    "exif_rotated.jpg": lambda a, size: size == (48, 24) and _close(a[:8], RED, 16) and _close(a[-8:], BLUE, 16),
}
WIDEST = tuple(int(v) for v in make_buckets(32, "short_side", 1.5).shapes[-1])  # (H, W), sorted by ratio
DECODERS = ["pil"] + (["opencv"] if cv2 is not None else [])


@pytest.mark.fault(case="6 bad images", fault="valid but odd images: decoded pixels")
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_odd_but_valid_images_decode_to_the_right_upright_rgb_pixels(name, decoder, zoo, outcome):
    root, _ = zoo
    pixels, size = _val_crop(root / "train" / "class_000" / name, decoder)
    outcome(repetitions=1, runs_finished=1)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert EXPECTED[name](pixels, size), f"{name} via {decoder}: size {size}, pixels\n{pixels[::8, ::8].tolist()}"


@pytest.mark.fault(case="6 bad images", fault="bad-image zoo: `rectrain scan` report")
def test_scan_reports_every_unusable_file_by_path_with_its_reason(zoo, tmp_path, outcome):
    root, bad = zoo
    res = h.cli("scan", "--data_dir", str(root), "--split", "train", "--target_size", "32", workdir=tmp_path)
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0))
    assert res.code == 0, res.stderr
    listed = {ln.strip().split(": ", 1)[0]: ln for ln in res.stdout.splitlines() if ln.startswith("  class_")}
    assert set(listed) == set(bad), res.stdout
    for path, reason in bad.items():
        assert reason in listed[path], listed[path]
    assert f"images: {3 * 8 + len(EXPECTED)} usable" in res.stdout


@pytest.mark.fault(case="6 bad images", fault="bad-image zoo: a training run (2 workers)")
def test_training_on_the_zoo_completes_and_names_every_excluded_file(zoo, tmp_path, outcome):
    root, bad = zoo
    out = tmp_path / "out"
    res = h.run(h.train_args(root, out, "zoo", "--epochs", "1"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    log = h.log_text(out, "zoo")
    assert f"data: {3 * 8 + len(EXPECTED)} train" in log
    assert "could not decode" not in log, "an image the scan accepted failed to decode"
    missing = [p for p in bad if p not in log]
    assert not missing, f"excluded files not named in the run's log: {missing}"


@pytest.mark.fault(case="6 bad images", fault="a class folder only in val/")
def test_a_class_only_in_val_is_one_line_naming_it(data_dir, tmp_path, outcome):
    data = tmp_path / "data"
    make_synthetic(str(data), classes=2, train_per_class=8, val_per_class=2, kind="tiny", seed=4)
    (data / "val" / "only_in_val").mkdir()
    Image.new("RGB", (32, 32), RED).save(data / "val" / "only_in_val" / "a.jpg")
    res = h.run(h.train_args(data, tmp_path / "out", "v", "--epochs", "1"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=0, hangs=int(res.hung))
    assert res.code == 2 and len(res.error_lines) == 1, res.stderr[-3000:]
    assert "only_in_val" in res.stderr


@pytest.mark.fault(case="6 bad images", fault="a file replaced by garbage after the scan (train and val)")
def test_a_file_that_turns_bad_after_the_scan_is_replaced_in_its_batch_and_counted(own_data, tmp_path, outcome):
    scan = h.cli("scan", "--data_dir", str(own_data), "--target_size", "32", workdir=tmp_path / "scan")
    assert scan.code == 0, scan.stderr
    victim = own_data / "train" / "class_001" / "class_001_00003.jpg"
    val_victim = next((own_data / "val" / "class_000").iterdir())
    for path in (victim, val_victim):
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)  # same size and mtime: the cached scan still lists it as good
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = tmp_path / "out"
    res = h.run(h.train_args(own_data, out, "b", "--epochs", "1"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    log = h.log_text(out, "b")
    logged = [ln for ln in log.splitlines() if "could not decode" in ln and str(victim) in ln]
    assert len(logged) == 1, "the failure was not logged once, by path"
    failures = h.load_ckpt(h.ckpt_dir(out, "b") / "last.pth")["decode_failures"]
    assert len(failures) == 1 and str(victim) in failures[0]
    in_val = [ln for ln in log.splitlines() if "could not decode" in ln and str(val_victim) in ln]
    assert len(in_val) == 1 and "in validation; another image of its shape was scored in its place" in in_val[0]
    outcome(samples_lost=1, samples_duplicated=1)  # by design: the bad file's stand-in is seen twice that epoch


@pytest.mark.fault(case="6 bad images", fault="decode failures past --max_decode_failures on one rank of 2")
def test_decode_failures_past_the_limit_on_one_rank_stop_every_rank_together(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    args = h.train_args(data_dir, out, "d", *h.REF2, *h.ddp(), "--max_decode_failures", "2")
    run = h.start(args, tmp_path / "run", fault={"undecodable": {"rank": 1, "every": 3}, **h.hold(1)})
    res, first = run.finish_after("undecodable")
    assert first is not None, "the injected decode failures never fired"
    h.assert_job_stopped_for(res, 1, h.seconds_after(res, first), outcome)
    assert res.code == 2 and "--max_decode_failures" in res.stderr, res.stderr[-3000:]
    assert h.ranks_logging(out, "d", "--max_decode_failures") == [0, 1], "a rank stopped without saying why"
