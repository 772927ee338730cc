"""Region JPEG decoding (``--decoder turbo``): only the crop's region is decoded, and the crop is what a full decode
and the same crop give -- bit for bit the OpenCV path's, within rounding of an exact float crop -- for every chroma
subsampling, odd sizes, EXIF orientations 1-8, boxes on every edge and tiny boxes; files it cannot take go on to
OpenCV/Pillow with today's errors. The images are re-encodings of a real photograph (matplotlib's grace_hopper.jpg,
shipped with matplotlib, a dependency), made at test time."""

import importlib.util
import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rectrain import checklist
from rectrain.config import TrainConfig
from rectrain.data import exif, transforms, turbo
from rectrain.data.buckets import make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.source import scan_split
from rectrain.data.transforms import DecodeError, FallbackNotes, RectangularCropTfm
from rectrain.errors import UserError

pytestmark = pytest.mark.skipif(not turbo.available() or transforms.cv2 is None,
                                reason=f"region decoder unavailable: {turbo.problem()}")

SUBSAMPLINGS = {"4:4:4": ("RGB", 0), "4:2:2": ("RGB", 1), "4:2:0": ("RGB", 2), "grey": ("L", 0)}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    spec = importlib.util.find_spec("matplotlib")
    path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "sample_data", "grace_hopper.jpg")
    with Image.open(path) as im:
        return im.convert("RGB")  # 512 x 600


def encode(img: Image.Image, subsampling="4:2:0", orientation=1, quality=90, **kw) -> bytes:
    mode, sub = SUBSAMPLINGS[subsampling]
    if orientation != 1:
        e = Image.Exif()
        e[exif.ORIENTATION_TAG] = orientation
        kw["exif"] = e.tobytes()
    out = io.BytesIO()
    img.convert(mode).save(out, "JPEG", quality=quality, subsampling=sub, **kw)
    return out.getvalue()


def upright(data: bytes) -> np.ndarray:
    """Pillow's full decode, turned upright by the project's rule: (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        o = exif.orientation(im)
        return np.asarray(exif.make_upright(im.convert("RGB"), o))


class FixedBox(RectangularCropTfm):
    """The transform with a box and flip given by the test instead of drawn."""

    def __init__(self, box, flip=False, decoder="turbo"):
        super().__init__(train=False, decoder=decoder)
        self.fixed = (tuple(box), flip)

    def box(self, size_hw, out_hw, rng=None):
        return self.fixed


def crops(data, out_hw, size_hw, seed, train=True, decoders=("turbo", "opencv")):
    return [RectangularCropTfm(train=train, decoder=d)(data, out_hw, np.random.default_rng(seed), size_hw=size_hw)
            for d in decoders]


# -- an exact crop: float64 resampling of the full decode at the exact box -------------------------------------
def _taps(n_in, lo, hi, n_out):
    """(n_out, n_in) bilinear weights at the output pixels' centres (OpenCV's rule), indices clamped."""
    m = np.zeros((n_out, n_in))
    k = (hi - lo) / n_out
    for i in range(n_out):
        s = lo + (i + 0.5) * k - 0.5
        j = math.floor(s)
        for jj, w in ((j, 1 - (s - j)), (j + 1, s - j)):
            m[i, min(max(jj, 0), n_in - 1)] += w
    return m


def exact_bilinear(full, box, out_hw):
    x0, y0, x1, y1 = box
    wy, wx = _taps(full.shape[0], y0, y1, out_hw[0]), _taps(full.shape[1], x0, x1, out_hw[1])
    return np.einsum("ikc,lk->ilc", np.einsum("ij,jkc->ikc", wy, full.astype(np.float64)), wx)


# -- the library -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", list(SUBSAMPLINGS))
@pytest.mark.parametrize("progressive", [False, True])
def test_a_whole_image_decodes_as_pillow_decodes_it(photo, sub, progressive):
    data = encode(photo.resize((333, 251)), sub, progressive=progressive)
    head = turbo.read_header(data)
    assert (head.width, head.height, head.progressive) == (333, 251, progressive)
    assert np.array_equal(turbo.decode_region(data, 1, 0, 0, 333, 251), upright(data))


def test_a_region_off_the_mcu_grid_is_refused_not_rounded(photo):
    data = encode(photo.resize((333, 251)), "4:2:0")  # MCU 16 wide
    turbo.read_header(data)
    assert turbo.decode_region(data, 1, 32, 5, 40, 40).shape == (40, 40, 3)
    with pytest.raises(turbo.TurboError, match="divisible"):
        turbo.decode_region(data, 1, 8, 5, 40, 40)


def test_a_truncated_jpeg_fails_instead_of_coming_back_grey(photo):
    data = encode(photo.resize((333, 251)))
    cut = data[: len(data) // 2]
    turbo.read_header(cut)
    with pytest.raises(turbo.TurboError, match="Premature end"):
        turbo.decode_region(cut, 1, 0, 0, 333, 251)


# -- the crops: identical to a full decode's -------------------------------------------------------------------
@pytest.mark.parametrize("sub", list(SUBSAMPLINGS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_region_crops_equal_full_decode_crops_bit_for_bit(photo, sub, orientation):
    # Odd sizes (no multiple of the MCU), random train crops and centre crops, up- and downscaled outputs: the
    # region decoder's crop equals the OpenCV path's, which decodes the whole file (at the same DCT scale).
    for size in [(333, 251), (37, 29)]:
        data = encode(photo.resize(size), sub, orientation)
        h, w = upright(data).shape[:2]
        for out_hw in [(64, 96), (224, 160), (8, 8)]:
            for seed, train in [(0, True), (1, True), (2, True), (0, False)]:
                region, full = crops(data, out_hw, (h, w), seed, train)
                assert region.shape == (*out_hw, 3) and region.dtype == np.uint8
                assert np.array_equal(region, full), (size, out_hw, seed, train)


@pytest.mark.parametrize("sub", ["4:2:0", "4:4:4", "grey"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 7])
def test_region_crops_are_exact_crops_of_pillows_full_decode(photo, sub, orientation):
    # Independent of OpenCV: Pillow decodes the whole file, the project's EXIF rule turns it upright, and the box is
    # resampled in float64 at its exact sub-pixel position. Crops under a 2x shrink (no DCT reduction) differ only
    # by the final rounding to uint8 (0.25 on average).
    data = encode(photo.resize((333, 251)), sub, orientation)
    full = upright(data)
    h, w = full.shape[:2]
    tfm = RectangularCropTfm(train=True, decoder="turbo")
    for seed in range(6):
        out_hw = (96, 64) if h > w else (64, 96)
        box, flip = tfm.box((h, w), out_hw, np.random.default_rng(seed))
        if min((box[2] - box[0]) / out_hw[1], (box[3] - box[1]) / out_hw[0]) >= 2:
            continue  # DCT-reduced: tested below
        ref = exact_bilinear(full, box, out_hw)
        out = tfm(data, out_hw, np.random.default_rng(seed), size_hw=(h, w)).astype(np.float64)
        assert np.abs(out - (ref[:, ::-1] if flip else ref)).mean() < 0.3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_dct_reduced_crops_map_the_box_with_the_exact_scale(orientation):
    # Stored 83 x 61 pixels (no multiple of 8) of 8x8 blocks of distinct colours. A box covering exactly one
    # block, cropped to 1x1, is decoded at 1/8, where that block is one pixel: the crop is the block's colour only
    # if the box was mapped with the exact 1/8 factor through the stored orientation (where the partial block
    # sits at the far edge). Upright, the block's box is found by turning a map of block numbers with Pillow.
    ids = (np.arange(61)[:, None] // 8) * 11 + np.arange(83)[None, :] // 8  # block number per stored pixel
    colours = np.stack([ids * 37 % 200 + 20, ids * 53 % 200 + 20, ids * 29 % 200 + 20], -1).astype(np.uint8)
    data = encode(Image.fromarray(colours), "4:4:4", orientation, quality=100)
    ids_up = np.asarray(exif.make_upright(Image.fromarray(ids.astype(np.int32), "I"), orientation))
    h, w = ids_up.shape
    for block in (12, 23, 35, 56, 64):  # inside: whole 8x8 blocks
        ys, xs = np.nonzero(ids_up == block)
        box = (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
        assert (box[2] - box[0], box[3] - box[1]) == (8, 8)
        want = colours[ids == block][0].astype(int)
        for decoder in ("turbo", "opencv"):
            got = FixedBox(box, decoder=decoder)(data, (1, 1), size_hw=(h, w))[0, 0].astype(int)
            assert np.abs(got - want).max() <= 3, (decoder, block, got, want)


def test_boxes_on_every_edge_and_tiny_boxes_equal_full_decode_crops(photo):
    for sub in SUBSAMPLINGS:
        data = encode(photo.resize((203, 151)), sub)
        h, w = 151, 203
        boxes = [(0, 0, 50.5, 40), (152.5, 0, 203, 40), (0, 111, 60, 151), (140.2, 100.7, 203, 151),
                 (0, 0, 203, 151), (0, 30, 203, 60), (90, 0, 120, 151),  # corners, whole, full rows and columns
                 (101.3, 77.9, 102.1, 78.4), (0, 0, 1, 1), (202, 150, 203, 151), (202.5, 3, 203, 5)]  # tiny
        for box in boxes:
            for out_hw, flip in [((16, 16), False), ((5, 9), True), ((200, 120), False)]:
                region, full = (FixedBox(box, flip, d)(data, out_hw, size_hw=(h, w)) for d in ("turbo", "opencv"))
                assert np.array_equal(region, full), (sub, box, out_hw)


def test_progressive_jpegs_are_region_decoded_too(photo):
    data = encode(photo.resize((333, 251)), progressive=True)
    tfm = RectangularCropTfm(train=True, decoder="turbo")
    region = tfm(data, (64, 96), np.random.default_rng(0), size_hw=(251, 333))
    assert tfm.region_images == 1 and not tfm.fallbacks
    assert np.array_equal(region, crops(data, (64, 96), (251, 333), 0, decoders=["opencv"])[0])


# -- libjpeg-turbo's speed flags (off by default; the benchmark measures them) ----------------------------------
SPEED_FLAGS = [("fast_upsample",), ("fast_dct",), ("fast_upsample", "fast_dct")]


@pytest.mark.parametrize("flags", SPEED_FLAGS)
@pytest.mark.parametrize("sub", list(SUBSAMPLINGS))
def test_speed_flags_crop_as_a_whole_decode_with_the_same_flags(photo, flags, sub):
    # The same flags on both sides: the region decoder's crop equals TurboJPEG's whole-image decode at the same DCT
    # scale, with the same flags, cropped by the same resampling -- fast upsampling needs no neighbour pixel, and the
    # fast IDCT works block by block, so a region's pixels are the whole decode's.
    for size in [(333, 251), (37, 29)]:
        data = encode(photo.resize(size), sub)
        w, h = size
        for out_hw in [(64, 96), (8, 8)]:
            for seed in range(3):
                tfm = RectangularCropTfm(train=True, decoder="turbo", turbo_flags=flags)
                box, flip = tfm.box((h, w), out_hw, np.random.default_rng(seed))
                s = transforms._dct_scale(min((box[2] - box[0]) / out_hw[1], (box[3] - box[1]) / out_hw[0]))
                out = tfm(data, out_hw, np.random.default_rng(seed), size_hw=(h, w))
                turbo.read_header(data)
                whole = turbo.decode_region(data, s, 0, 0, turbo.scaled(w, s), turbo.scaled(h, s),
                                            **{f: True for f in flags})
                want = transforms._finish(whole, (0, 0), transforms._decoded_box(box, 1, (w, h), s), out_hw, flip)
                assert tfm.region_images == 1 and np.array_equal(out, want), (size, out_hw, seed)


def test_speed_flags_reach_the_decoder_and_are_off_by_default(photo):
    data = encode(photo.resize((333, 251)))  # 4:2:0; a crop enlarged to 160 x 224: decoded at full scale
    default, upsample, dct = (RectangularCropTfm(train=True, decoder="turbo", turbo_flags=f)(
        data, (160, 224), np.random.default_rng(0), size_hw=(251, 333)).astype(int)
        for f in [(), ("fast_upsample",), ("fast_dct",)])
    assert np.array_equal(default, crops(data, (160, 224), (251, 333), 0, decoders=["opencv"])[0])  # as OpenCV
    for fast in (upsample, dct):
        assert 0 < np.abs(fast - default).mean() < 3
    with pytest.raises(ValueError, match="turbo_flags"):
        RectangularCropTfm(train=True, decoder="turbo", turbo_flags=("fast_idct",))


# -- the same crops whichever decoder runs ---------------------------------------------------------------------
def test_every_decoder_crops_the_same_box_for_the_same_seed(photo):
    # The box and flip come from the sample's rng before any decoding, so they are the same for every decoder:
    # turbo and opencv agree bit for bit; Pillow resamples the same box with its own filter (antialiased bilinear,
    # whose support widens with the shrink, where OpenCV's bilinear takes 2 taps), which on this photo differs by
    # 1-3 grey levels on average: the tolerance is 4.
    data = encode(photo.resize((500, 375)))
    for seed in range(8):
        turbo_out, opencv_out, pil_out = (o.astype(int) for o in crops(data, (224, 288), (375, 500), seed,
                                                                         decoders=("turbo", "opencv", "pil")))
        assert np.array_equal(turbo_out, opencv_out)
        assert np.abs(turbo_out - pil_out).mean() < 4


def test_images_given_as_bytes_crop_as_their_file_does(photo, tmp_path):
    data = encode(photo.resize((333, 251)), orientation=6)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    tfm = RectangularCropTfm(train=True)
    want = tfm(str(path), (64, 64), np.random.default_rng(3), size_hw=(333, 251))
    for src in (data, memoryview(data), np.frombuffer(data, np.uint8)):
        assert np.array_equal(tfm(src, (64, 64), np.random.default_rng(3), size_hw=(333, 251), name="a.jpg"), want)
    with pytest.raises(DecodeError, match="shard.tar:b.jpg"):
        tfm(data[:1000], (64, 64), np.random.default_rng(3), size_hw=(333, 251), name="shard.tar:b.jpg")


# -- what it hands on ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_files(photo, tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    files = {}
    files["cmyk"] = d / "cmyk.jpg"
    photo.resize((120, 90)).convert("CMYK").save(files["cmyk"], quality=90)
    files["png"] = d / "png.jpg"  # a PNG under a JPEG name
    photo.resize((120, 90)).save(files["png"], "PNG")
    good = encode(photo.resize((120, 90)))
    files["truncated"] = d / "truncated.jpg"
    files["truncated"].write_bytes(good[: len(good) // 2])
    # Cut short, then an end marker: libjpeg warns ("Premature end of JPEG file") and pads with grey, as the
    # OpenCV path always accepted; the region decoder stops at the warning and hands the file on.
    files["corrupt"] = d / "cut_then_ended.jpg"
    files["corrupt"].write_bytes(good[: len(good) // 3] + b"\xff\xd9")
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("name, reason", [("cmyk", "CMYK/YCCK JPEG"), ("png", "not a JPEG"),
                                          ("corrupt", "TurboJPEG error or warning")])
def test_files_the_region_decoder_cannot_take_decode_as_before(odd_files, name, reason):
    tfm = RectangularCropTfm(train=False, decoder="turbo")
    out = tfm(odd_files[name], (32, 48), size_hw=(90, 120))
    assert dict(tfm.fallbacks) == {reason: 1} and tfm.region_images == 0
    before = "opencv" if name != "png" else "pil"  # what decoded it until now
    assert np.array_equal(out, RectangularCropTfm(train=False, decoder=before)(odd_files[name], (32, 48),
                                                                                size_hw=(90, 120)))


def test_a_truncated_jpeg_still_raises_naming_the_file(odd_files):
    tfm = RectangularCropTfm(train=True, decoder="turbo")
    with pytest.raises(DecodeError, match="truncated.jpg"):
        tfm(odd_files["truncated"], (64, 64), np.random.default_rng(0), size_hw=(90, 120))
    assert dict(tfm.fallbacks) == {"no end-of-image marker at the end": 1}


def test_fallbacks_are_told_once_then_at_powers_of_ten_by_the_loaders_only(odd_files, capsys):
    quiet = RectangularCropTfm(train=False, decoder="turbo")  # predict, eval: counted, not told
    quiet(odd_files["cmyk"], (32, 48), size_hw=(90, 120))
    assert quiet.fallbacks["CMYK/YCCK JPEG"] == 1 and capsys.readouterr().err == ""
    tfm = RectangularCropTfm(train=False, decoder="turbo", fallback_notes=FallbackNotes())  # no log: stderr
    for _ in range(12):
        tfm(odd_files["cmyk"], (32, 48), size_hw=(90, 120))
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and tfm.fallbacks["CMYK/YCCK JPEG"] == 12
    assert "cmyk.jpg: CMYK/YCCK JPEG" in notes[0]
    assert "the region decoder has handed 10 images to OpenCV/Pillow; the latest: " in notes[1]


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, tfm):
        self.paths, self.tfm = paths, tfm

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tfm(self.paths[i], (32, 48), size_hw=(90, 120))


def test_a_loaders_workers_tell_the_rank_log_once_between_them(odd_files, tmp_path):
    """2 real workers, 12 CMYK files between them: 2 notes in the rank's log (the 1st and the 10th of the rank), where
    each worker counting alone would write 2 first notes and no 10th."""
    from rectrain.runtime.logs import close_logger, setup_rank_logger
    logger = setup_rank_logger(str(tmp_path / "logs"), 0, echo=False)
    try:
        tfm = RectangularCropTfm(train=False, decoder="turbo", fallback_notes=FallbackNotes(logger.info))
        loader = torch.utils.data.DataLoader(_Files([odd_files["cmyk"]] * 12, tfm), batch_size=1, num_workers=2)
        assert len(list(loader)) == 12
    finally:
        close_logger(logger)
    notes = [ln for ln in (tmp_path / "logs/rank0.log").read_text().splitlines() if "note:" in ln]
    assert len(notes) == 2, notes
    assert "cmyk.jpg: CMYK/YCCK JPEG" in notes[0] and "has handed 10 images" in notes[1]


# -- choosing the decoder --------------------------------------------------------------------------------------
def test_auto_picks_turbo_where_it_loads_else_opencv(monkeypatch):
    assert transforms.resolve_decoder("auto") == "turbo"
    assert transforms.resolve_decoder("pil") == "pil"
    monkeypatch.setattr(turbo, "_lib", None)
    monkeypatch.setattr(turbo, "_problem", "the turbojpeg package is not installed: pip install turbojpeg")
    assert transforms.resolve_decoder("auto") == "opencv"
    assert RectangularCropTfm(train=True)._region is False
    with pytest.raises(UserError, match="--decoder turbo cannot be used: the turbojpeg package is not installed"):
        RectangularCropTfm(train=True, decoder="turbo")


def test_check_names_the_decoder_the_run_will_use(monkeypatch):
    item = checklist.check_decoder(TrainConfig(decoder="auto"))
    assert item.status == "pass" and item.message.startswith("turbo:")
    assert checklist.check_decoder(TrainConfig(decoder="opencv")).message.startswith("opencv")
    monkeypatch.setattr(turbo, "_lib", None)
    monkeypatch.setattr(turbo, "_problem", "not installed")
    assert checklist.check_decoder(TrainConfig(decoder="turbo")).status == "fail"
    assert checklist.check_decoder(TrainConfig(decoder="auto")).message.startswith("opencv")


def test_loader_workers_give_the_same_batches_with_either_decoder(photo, odd_files, tmp_path):
    # Real DataLoader workers (forked, each with its own TurboJPEG handle), with a CMYK file and a PNG among them.
    for c in range(2):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(5):
            size = [(120, 90), (90, 120), (101, 77), (64, 64), (150, 70)][i]
            (d / f"{i}.jpg").write_bytes(encode(photo.rotate(40 * i + 90 * c).resize(size), ["4:2:0", "4:4:4"][c]))
    os.link(odd_files["cmyk"], tmp_path / "train" / "c0" / "cmyk.jpg")
    os.link(odd_files["png"], tmp_path / "train" / "c1" / "png.jpg")
    scan = scan_split(str(tmp_path), "train")
    batches = {}
    for decoder in ("turbo", "opencv"):
        loaders = build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=3, workers=2, seed=1,
                                                                             decoder=decoder))
        try:
            batches[decoder] = [x for x, _, failed in loaders.train if not failed]
        finally:
            loaders.close()
    assert len(batches["turbo"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(batches["turbo"], batches["opencv"]))
