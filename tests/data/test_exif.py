"""The EXIF orientation rule (``rectrain.data.exif``), once, against every reader that must agree with it: the size
scan, both CPU decoders, GPU decoding's routing and `rectrain prepare`. If any of them turned an image differently
from the scan, crop boxes drawn on the scanned size would land in the wrong place."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from rectrain.data import exif
from rectrain.data import gpu_decode as gd
from rectrain.data.prepare import _is_upright_rgb_jpeg, prepare_dataset
from rectrain.data.scan import read_size
from rectrain.data.transforms import RectangularCropTfm, cv2, open_rgb

STORED_HW = (48, 80)  # as stored: 48 tall, 80 wide


def stored_pixels() -> np.ndarray:
    """An image whose every turn and mirror looks different: four quadrants of four colours."""
    h, w = STORED_HW
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (230, 30, 30)
    a[: h // 2, w // 2:] = (30, 230, 30)
    a[h // 2:, : w // 2] = (30, 30, 230)
    a[h // 2:, w // 2:] = (230, 230, 30)
    return a


def upright_reference(o: int) -> np.ndarray:
    """The stored pixels turned upright by the rule's transposes (what every reader must show)."""
    return np.asarray(exif.make_upright(Image.fromarray(stored_pixels()), o))


def jpeg(path, o: int | None, exif_bytes: bytes | None = None) -> str:
    extra = {}
    if exif_bytes is not None:
        extra["exif"] = exif_bytes
    elif o is not None:
        e = Image.Exif()
        e[exif.ORIENTATION_TAG] = o
        extra["exif"] = e.tobytes()
    Image.fromarray(stored_pixels()).save(path, "JPEG", quality=98, subsampling=0, **extra)
    return str(path)


def close(a: np.ndarray, b: np.ndarray, levels: float = 6.0) -> bool:
    return a.shape == b.shape and float(np.abs(a.astype(int) - b.astype(int)).mean()) < levels


ORIENTATIONS = list(range(1, 9))


@pytest.mark.parametrize("o", ORIENTATIONS)
def test_the_scan_reports_the_size_the_rule_turns_the_image_to(tmp_path, o):
    path = jpeg(tmp_path / "x.jpg", o)
    with Image.open(path) as im:
        assert exif.orientation(im) == o
        assert read_size(path) == exif.upright_size(im) == upright_reference(o).shape[:2]


@pytest.mark.parametrize("o", ORIENTATIONS)
def test_both_decoders_turn_the_image_as_the_rule_does(tmp_path, o):
    path = jpeg(tmp_path / "x.jpg", o)
    want = upright_reference(o)
    assert close(np.asarray(open_rgb(path)), want)
    size = read_size(path)
    for decoder in ("pil", "opencv") if cv2 is not None else ("pil",):
        # the whole box at its own size: no resampling, so only the turn can differ
        crop = RectangularCropTfm(train=False, val_crop=1.0, decoder=decoder)(path, size, size_hw=size)
        assert close(crop, want), decoder


@pytest.mark.parametrize("o", ORIENTATIONS)
def test_gpu_decoding_sends_exactly_the_turned_images_to_the_cpu(tmp_path, o):
    data = open(jpeg(tmp_path / "x.jpg", o), "rb").read()
    assert gd._orientation(data) == o
    reason = gd.gpu_refusal(data, read_size(str(tmp_path / "x.jpg")))
    assert reason == (None if o == 1 else "EXIF rotation")


@pytest.mark.parametrize("o", ORIENTATIONS)
def test_prepare_copies_only_upright_files_and_writes_the_rest_upright(tmp_path, o):
    src = tmp_path / "src" / "train" / "c"
    src.mkdir(parents=True)
    path = jpeg(src / "x.jpg", o)
    assert _is_upright_rgb_jpeg(path) == (o == 1)
    r = prepare_dataset(str(tmp_path / "src"), str(tmp_path / "out"), short_side=256, workers=1)
    assert (r["copied"], r["reencoded"]) == ((1, 0) if o == 1 else (0, 1))
    out = str(tmp_path / "out" / "train" / "c" / "x.jpg")
    with Image.open(out) as im:
        assert exif.orientation(im) == 1  # written upright, so every reader shows it as it is
    assert close(np.asarray(open_rgb(out)), upright_reference(o))


def _tiff_ifd_with_orientation(value: int) -> bytes:
    """A raw EXIF block (TIFF header, one IFD entry 0x0112) whose orientation may be out of range."""
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + \
        struct.pack("<HHII", exif.ORIENTATION_TAG, 3, 1, value) + struct.pack("<I", 0)


@pytest.mark.parametrize("case", ["out of range", "corrupt"])
def test_a_bad_orientation_tag_is_upright_for_every_reader(tmp_path, case):
    raw = _tiff_ifd_with_orientation(9) if case == "out of range" else b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"
    path = jpeg(tmp_path / "x.jpg", None, exif_bytes=raw)
    data = open(path, "rb").read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt block when it opens the file
        with Image.open(path) as im:
            assert exif.orientation(im) == 1
    assert read_size(path) == STORED_HW
    assert close(np.asarray(open_rgb(path)), stored_pixels())
    assert gd._orientation(data) == 1 and gd.gpu_refusal(data, STORED_HW) is None
    assert _is_upright_rgb_jpeg(path)


def _png_with_exif_after_the_pixels(path, o: int) -> str:
    Image.fromarray(stored_pixels()).save(path, "PNG")
    blob = open(path, "rb").read()
    e = Image.Exif()
    e[exif.ORIENTATION_TAG] = o
    payload = e.tobytes()[6:]  # the chunk holds the TIFF block without the "Exif\0\0" prefix
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = blob.rindex(b"\x00\x00\x00\x00IEND")
    open(path, "wb").write(blob[:end] + chunk + blob[end:])
    return str(path)


def test_a_png_with_its_exif_after_the_pixels_is_upright_for_every_reader(tmp_path):
    """A header scan cannot see such a chunk without decoding the image; so no reader honours it (the decoder
    used to, and then cropped boxes of the scanned shape out of a turned image)."""
    path = _png_with_exif_after_the_pixels(tmp_path / "late.png", 6)
    with Image.open(path) as im:
        im.load()
        assert im.getexif().get(exif.ORIENTATION_TAG) == 6  # the chunk is there, after the pixels
    with Image.open(path) as im:
        assert exif.orientation(im) == 1
    assert read_size(path) == STORED_HW
    assert np.array_equal(np.asarray(open_rgb(path)), stored_pixels())
    crop = RectangularCropTfm(train=False, val_crop=1.0)(path, STORED_HW, size_hw=STORED_HW)
    assert np.array_equal(crop, stored_pixels())


def test_a_png_with_its_exif_before_the_pixels_is_turned_by_every_reader(tmp_path):
    e = Image.Exif()
    e[exif.ORIENTATION_TAG] = 8
    path = str(tmp_path / "early.png")
    Image.fromarray(stored_pixels()).save(path, "PNG", exif=e.tobytes())
    want = upright_reference(8)
    assert read_size(path) == want.shape[:2]
    assert np.array_equal(np.asarray(open_rgb(path)), want)
