"""Transforms: decode any common image to upright 8-bit RGB, crop to the bucket shape (uint8), reduced JPEG
decoding, truncated files as DecodeError, random train crops and deterministic validation crops."""

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from rectrain.data import transforms as transforms_module
from rectrain.data.transforms import ALPHA_BACKGROUND, DecodeError, RectangularCropTfm, open_rgb, to_rgb

JPEG_TOL = 8  # max per-channel error of a solid colour through JPEG


def gradient(w, h):
    """An (h, w, 3) uint8 image whose every pixel differs: makes crops and flips visible."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 13) % 256], -1).astype(np.uint8)


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    f = {}
    f["landscape"] = save(Image.fromarray(gradient(120, 90)), d / "landscape.jpg", quality=95)
    f["portrait"] = save(Image.fromarray(gradient(60, 100)), d / "portrait.jpg", quality=95)
    f["small"] = save(Image.fromarray(gradient(40, 50)), d / "small.png")
    f["large"] = save(Image.fromarray(gradient(1600, 1200)), d / "large.jpg", quality=90)
    # 120x40 (3:1, beyond max_ratio 2): red sides, blue middle third.
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :, 0], wide[:, 40:80] = 255, (0, 0, 255)
    f["wide"] = save(Image.fromarray(wide), d / "wide.png")
    f["cmyk"] = save(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), d / "cmyk.jpg", quality=95)  # red
    f["grey"] = save(Image.new("L", (64, 48), 100), d / "grey.jpg", quality=95)
    f["grey16"] = save(Image.fromarray(np.full((48, 64), 40000, np.uint16)), d / "grey16.png")
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, 1: blue (transparent below)
    pal.paste(1, (32, 0, 64, 48))
    f["palette"] = save(pal, d / "palette.png", transparency=1)
    rgba = Image.new("RGBA", (64, 48), (0, 200, 0, 255))
    rgba.paste((0, 200, 0, 0), (32, 0, 64, 48))
    f["rgba"] = save(rgba, d / "rgba.png")
    f["la"] = save(Image.new("LA", (64, 48), (200, 128)), d / "la.png")
    # Stored 80x40, left half red, right half blue; EXIF orientation 6 (rotate 90 degrees clockwise to view):
    # upright it is 40 wide, 80 tall, red on top.
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40], stored[:, 40:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    f["rotated"] = save(Image.fromarray(stored), d / "rotated.jpg", quality=95, exif=exif.tobytes())
    data = open(f["large"], "rb").read()
    f["truncated"] = str(d / "truncated.jpg")
    open(f["truncated"], "wb").write(data[: len(data) // 2])
    png = open(f["small"], "rb").read()
    f["truncated_png"] = str(d / "truncated.png")
    open(f["truncated_png"], "wb").write(png[: len(png) // 2])
    f["not_image"] = str(d / "notes.jpg")
    open(f["not_image"], "w").write("not a jpeg")
    return f


def assert_colour(pixel, rgb, tol=JPEG_TOL):
    assert np.all(np.abs(np.asarray(pixel, int) - np.asarray(rgb, int)) <= tol), (pixel, rgb)


# --- output shape and type --------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["landscape", "portrait", "small", "wide", "palette", "grey16", "rotated"])
def test_output_is_uint8_hw3_of_exactly_the_bucket_shape(files, name, train):
    tfm = RectangularCropTfm(train=train)
    for out_hw in [(64, 64), (64, 96), (96, 64), (32, 64)]:
        out = tfm(files[name], out_hw, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.shape == (*out_hw, 3)


def test_image_smaller_than_the_output_is_upsampled(files):
    out = RectangularCropTfm(train=False)(files["small"], (128, 96))
    assert out.shape == (128, 96, 3) and out.std() > 10  # real content, not padding


def test_output_is_writable(files):
    assert RectangularCropTfm(train=False)(files["landscape"], (64, 64)).flags.writeable


# --- colour modes -------------------------------------------------------------------------------------

def test_cmyk_jpeg_becomes_the_right_rgb(files):
    img = open_rgb(files["cmyk"])
    assert img.mode == "RGB"
    assert_colour(img.getpixel((32, 24)), (255, 0, 0))


def test_greyscale_becomes_grey_rgb(files):
    img = open_rgb(files["grey"])
    assert img.mode == "RGB"
    assert_colour(img.getpixel((32, 24)), (100, 100, 100))


def test_16_bit_greyscale_png_is_scaled_not_clipped(files):
    assert Image.open(files["grey16"]).mode.startswith("I")
    assert_colour(open_rgb(files["grey16"]).getpixel((5, 5)), (156, 156, 156), tol=1)  # 40000 / 65535 * 255


def test_32_bit_integer_greyscale_is_read_as_16_bit_range():
    img = to_rgb(Image.fromarray(np.full((4, 4), 65535, np.int32)))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_the_background(files):
    img = open_rgb(files["palette"])
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 0, 0) and img.getpixel((50, 5)) == ALPHA_BACKGROUND


def test_rgba_png_alpha_is_composited_on_the_background(files):
    img = open_rgb(files["rgba"])
    assert img.getpixel((5, 5)) == (0, 200, 0) and img.getpixel((50, 5)) == ALPHA_BACKGROUND


def test_greyscale_with_half_alpha_blends_with_the_background(files):
    expected = [round((200 * 128 + c * 127) / 255) for c in ALPHA_BACKGROUND]
    assert_colour(open_rgb(files["la"]).getpixel((5, 5)), expected, tol=1)


# --- orientation ------------------------------------------------------------------------------------

def test_exif_rotated_jpeg_is_decoded_upright(files):
    img = open_rgb(files["rotated"])
    assert img.size == (40, 80)
    assert_colour(img.getpixel((20, 10)), (255, 0, 0))
    assert_colour(img.getpixel((20, 70)), (0, 0, 255))


def test_exif_rotated_jpeg_is_cropped_upright(files):
    out = RectangularCropTfm(train=False)(files["rotated"], (64, 32))
    assert_colour(out[5, 16], (255, 0, 0))
    assert_colour(out[58, 16], (0, 0, 255))


def test_exif_rotated_jpeg_draft_keeps_the_upright_shape(files):
    # Upright 40x80, stored 80x40. Needing (W, H) = (10, 40) upright allows 1/2 (not 1/4: 80/4 = 20 < 40);
    # a request left in upright order would ask the stored 80x40 for 10x40 and get no reduction at all.
    assert open_rgb(files["rotated"], reduce_to=(10, 40)).size == (20, 40)


# --- reduced (DCT-scaled) JPEG decoding --------------------------------------------------------------

def test_open_rgb_reduce_to_decodes_a_large_jpeg_at_reduced_size(files):
    assert open_rgb(files["large"], reduce_to=(64, 64)).size == (200, 150)  # 1600x1200 at 1/8
    assert open_rgb(files["large"], reduce_to=(500, 300)).size == (800, 600)  # 1/4 would be 400 < 500
    assert open_rgb(files["large"]).size == (1600, 1200)


def test_crop_uses_draft_for_a_small_output(files, monkeypatch):
    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    RectangularCropTfm(train=False)(files["large"], (64, 64))
    assert decoded and set(decoded) == {(200, 150)}  # 1600x1200 decoded at 1/8


def test_reduced_decoding_gives_the_same_crop_as_a_full_decode(files):
    out = RectangularCropTfm(train=False)(files["large"], (64, 96)).astype(int)
    full = Image.open(files["large"]).convert("RGB")
    # val box: 0.875 x the largest 64:96 (H:W) box in the 1200x1600 image, which is 1066.7 x 1600
    bw, bh = 1600 * 0.875, 1600 / 1.5 * 0.875
    box = ((1600 - bw) / 2, (1200 - bh) / 2, (1600 + bw) / 2, (1200 + bh) / 2)
    ref = np.asarray(full.resize((96, 64), Image.Resampling.BILINEAR, box=box)).astype(int)
    assert np.abs(out - ref).mean() < 3


# --- bad files ----------------------------------------------------------------------------------------

def test_truncated_jpeg_raises_decode_error_naming_the_path(files):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DecodeError, match="truncated.jpg"):
        RectangularCropTfm(train=True)(files["truncated"], (64, 64), np.random.default_rng(0))


def test_truncated_jpeg_raises_with_reduced_decoding_too(files):
    with pytest.raises(DecodeError, match="truncated.jpg"):
        open_rgb(files["truncated"], reduce_to=(32, 32))


def test_truncated_png_raises_decode_error_naming_the_path(files):
    with pytest.raises(DecodeError, match="truncated.png"):
        RectangularCropTfm(train=False)(files["truncated_png"], (32, 32))


def test_non_image_raises_decode_error_naming_the_path(files):
    with pytest.raises(DecodeError, match="notes.jpg"):
        open_rgb(files["not_image"])


def test_missing_file_raises_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="gone.jpg"):
        RectangularCropTfm(train=False)(str(tmp_path / "gone.jpg"), (32, 32))


# --- crop geometry and randomness --------------------------------------------------------------------

def test_train_crops_vary_with_the_rng(files):
    tfm = RectangularCropTfm(train=True)
    outs = [tfm(files["landscape"], (64, 64), np.random.default_rng(s)) for s in range(4)]
    assert len({o.tobytes() for o in outs}) == 4


def test_train_crop_is_a_pure_function_of_the_rng(files):
    tfm = RectangularCropTfm(train=True)
    a, b = (tfm(files["landscape"], (64, 64), np.random.default_rng(3)) for _ in range(2))
    assert np.array_equal(a, b)


def test_val_crop_is_deterministic_and_ignores_the_rng(files):
    tfm = RectangularCropTfm(train=False)
    a = tfm(files["landscape"], (64, 96), np.random.default_rng(1))
    b = tfm(files["landscape"], (64, 96), np.random.default_rng(2))
    assert np.array_equal(a, b)


def test_flip_happens_about_half_the_time():
    tfm = RectangularCropTfm(train=True)
    flips = sum(tfm.box((375, 500), (224, 288), np.random.default_rng(s))[1] for s in range(1000))
    assert 430 <= flips <= 570


def test_no_flip_when_hflip_is_off():
    tfm = RectangularCropTfm(train=True, hflip=False)
    assert not any(tfm.box((375, 500), (224, 288), np.random.default_rng(s))[1] for s in range(200))


def test_flip_mirrors_the_same_crop(files):
    seed = next(s for s in range(100) if RectangularCropTfm(train=True).box((90, 120), (64, 64),
                                                                               np.random.default_rng(s))[1])
    flipped = RectangularCropTfm(train=True)(files["landscape"], (64, 64), np.random.default_rng(seed))
    plain = RectangularCropTfm(train=True, hflip=False)(files["landscape"], (64, 64), np.random.default_rng(seed))
    assert np.array_equal(flipped, plain[:, ::-1])


def test_train_box_keeps_the_bucket_ratio_inside_the_image_with_area_in_scale():
    tfm = RectangularCropTfm(train=True, scale=(0.25, 0.8))
    h, w, out_hw = 375, 500, (224, 320)  # largest 224:320 box in 375x500: 350 x 500
    for s in range(300):
        (x0, y0, x1, y1), _ = tfm.box((h, w), out_hw, np.random.default_rng(s))
        assert (x1 - x0) / (y1 - y0) == pytest.approx(320 / 224)
        assert 0 <= x0 and x1 <= w + 1e-9 and 0 <= y0 and y1 <= h + 1e-9
        assert 0.25 - 1e-9 <= (x1 - x0) * (y1 - y0) / (500 * 350) <= 0.8 + 1e-9


def test_val_box_equals_resize_short_side_to_target_over_0875_then_centre_crop():
    # A 300x400 (H, W) image in the 96x128 bucket (same ratio): resize the short side 300 -> 96/0.875,
    # centre-crop 96x128: the crop covers 0.875 of each side, centred.
    box, flip = RectangularCropTfm(train=False).box((300, 400), (96, 128))
    assert box == pytest.approx((25, 18.75, 375, 281.25)) and not flip


def test_ratio_beyond_the_bucket_is_clamped_by_cropping_the_sides(files):
    out = RectangularCropTfm(train=False)(files["wide"], (32, 64)).astype(int)  # 3:1 image, 2:1 bucket
    assert_colour(out[16, 32], (0, 0, 255), tol=2)
    # The val box is 70x35 of the 2:1 box 80x40 in the middle: red is 30/70 of it, where squashing the
    # whole 3:1 image would keep 80/120.
    assert (out[:, :, 0] > 128).mean() == pytest.approx(30 / 70, abs=0.05)


def test_size_from_the_scan_cache_gives_the_same_crop_as_the_header(files):
    tfm = RectangularCropTfm(train=True, decoder="pil")
    a = tfm(files["rotated"], (64, 32), np.random.default_rng(5))
    b = tfm(files["rotated"], (64, 32), np.random.default_rng(5), size_hw=(80, 40))
    assert np.array_equal(a, b)


def test_invalid_scale_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        RectangularCropTfm(train=True, scale=(0.5, 0.2))


def test_repr_names_the_settings():
    assert repr(RectangularCropTfm(train=True, scale=(0.35, 1.0))) == \
        "RectangularCropTfm(train=True, scale=(0.35, 1.0), hflip=0.5)"
    assert repr(RectangularCropTfm(train=True, crop="resize", hflip=0.25)) == \
        "RectangularCropTfm(train=True, crop='resize', hflip=0.25)"
    assert repr(RectangularCropTfm(train=False)) == "RectangularCropTfm(train=False, val_crop=0.875)"


# ---------------------------------------------------------------------------------------------
# The OpenCV fast path gives the same crops as the Pillow path (up to interpolation) and is as strict.

needs_cv2 = pytest.mark.skipif(transforms_module.cv2 is None, reason="OpenCV not installed")


@needs_cv2
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["landscape", "portrait", "rotated", "cmyk", "grey"])
def test_opencv_path_matches_pillow_path(files, name, train):
    from PIL import ImageOps
    with Image.open(files[name]) as im:
        w, h = ImageOps.exif_transpose(im).size
    outs = [RectangularCropTfm(train=train, decoder=d)(files[name], (32, 48), np.random.default_rng(7), size_hw=(h, w))
            for d in ("pil", "opencv")]
    assert outs[1].shape == (32, 48, 3) and outs[1].dtype == np.uint8 and outs[1].flags.c_contiguous
    # Red and green are smooth ramps; blue is a high-frequency pattern that any two resamplers alias
    # differently, so it is left out.
    assert np.abs(outs[0][..., :2].astype(int) - outs[1][..., :2].astype(int)).mean() < 4


@needs_cv2
def test_opencv_path_never_turns_a_truncated_jpeg_grey(files):
    with pytest.raises(DecodeError, match="truncated.jpg"):
        RectangularCropTfm(train=True, decoder="opencv")(files["truncated"], (64, 64), np.random.default_rng(0),
                                                          size_hw=(90, 120))


@needs_cv2
def test_opencv_path_uses_reduced_dct_decoding_for_small_crops(files, monkeypatch):
    flags = []
    real = transforms_module.cv2.imdecode
    monkeypatch.setattr(transforms_module.cv2, "imdecode", lambda buf, flag: flags.append(flag) or real(buf, flag))
    with Image.open(files["large"]) as im:
        w, h = im.size
    RectangularCropTfm(train=False, decoder="opencv")(files["large"], (64, 64), size_hw=(h, w))
    assert flags and flags[0] != transforms_module.cv2.IMREAD_COLOR


def test_unknown_decoder_is_rejected():
    with pytest.raises(ValueError, match="decoder"):
        RectangularCropTfm(train=True, decoder="nvjpeg")


def test_exif_rotated_tiff_is_rotated_once(tmp_path):
    from PIL import ImageOps, TiffImagePlugin
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = (255, 0, 0), (0, 0, 255)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x0112] = 6
    path = str(tmp_path / "r6.tif")
    Image.fromarray(stored).save(path, tiffinfo=tags)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert upright.shape == (40, 30, 3)
    assert np.array_equal(np.asarray(open_rgb(path)), upright)


# ---------------------------------------------------------------------------------------------
# Per-image augmentation switches: the flip probability and the crop mode, on pixels, for both decoders.

DECODER_NAMES = ["pil", pytest.param("opencv", marks=needs_cv2)]
LANDSCAPE_HW = (90, 120)  # files["landscape"]: red grows left to right, green top to bottom


def is_mirrored(out):
    """The gradient's red channel grows to the right in the source: falling means the output was flipped."""
    return out[:, -4:, 0].astype(int).mean() < out[:, :4, 0].astype(int).mean()


def flips_on_pixels(files, decoder, seeds=range(100), **kw):
    tfm = RectangularCropTfm(train=True, decoder=decoder, **kw)
    return [is_mirrored(tfm(files["landscape"], (48, 64), np.random.default_rng(s), size_hw=LANDSCAPE_HW))
            for s in seeds]


@pytest.mark.parametrize("decoder", DECODER_NAMES)
@pytest.mark.parametrize("crop", ["random", "resize"])
def test_hflip_0_never_flips_the_pixels(files, decoder, crop):
    assert not any(flips_on_pixels(files, decoder, hflip=0, crop=crop))


@pytest.mark.parametrize("decoder", DECODER_NAMES)
@pytest.mark.parametrize("crop", ["random", "resize"])
def test_hflip_1_always_flips_the_pixels(files, decoder, crop):
    assert all(flips_on_pixels(files, decoder, hflip=1, crop=crop))


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_hflip_half_flips_about_half_the_images(files, decoder):
    assert 35 <= sum(flips_on_pixels(files, decoder, hflip=0.5)) <= 65  # 100 seeds: mean 50, sd 5


@needs_cv2
@pytest.mark.parametrize("crop", ["random", "resize"])
def test_both_decoders_flip_the_same_samples(files, crop):
    assert flips_on_pixels(files, "pil", hflip=0.5, crop=crop) == flips_on_pixels(files, "opencv", hflip=0.5, crop=crop)


def test_flip_probability_is_drawn_per_rng():
    tfm = RectangularCropTfm(train=True, hflip=0.2)
    flips = sum(tfm.box((375, 500), (224, 288), np.random.default_rng(s))[1] for s in range(1000))
    assert 160 <= flips <= 240  # mean 200, sd 12.6


def test_hflip_true_and_false_mean_half_and_never():
    assert RectangularCropTfm(train=True, hflip=True).hflip == 0.5
    assert RectangularCropTfm(train=True, hflip=False).hflip == 0.0
    assert RectangularCropTfm(train=True, hflip=1).hflip == 1.0  # an int is a probability, not a switch


def test_flip_probability_does_not_move_the_box():
    boxes = [RectangularCropTfm(train=True, hflip=p).box((375, 500), (224, 288), np.random.default_rng(4))[0]
             for p in (0, 0.3, 1)]
    assert boxes[0] == boxes[1] == boxes[2]


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_flip_probability_outside_0_1_is_rejected(p):
    with pytest.raises(ValueError, match="hflip"):
        RectangularCropTfm(train=True, hflip=p)


def test_unknown_crop_mode_is_rejected():
    with pytest.raises(ValueError, match="crop"):
        RectangularCropTfm(train=True, crop="centre")


def test_resize_box_is_the_whole_image():
    box, _ = RectangularCropTfm(train=True, crop="resize").box((375, 500), (224, 320), np.random.default_rng(0))
    assert box == (0, 0, 500, 375)


def test_val_ignores_the_train_crop_mode_and_flip():
    a = RectangularCropTfm(train=False, crop="resize", hflip=1).box((375, 500), (224, 320))
    assert a == RectangularCropTfm(train=False).box((375, 500), (224, 320))


@pytest.mark.parametrize("decoder", DECODER_NAMES)
@pytest.mark.parametrize("name, out_hw", [("landscape", (64, 96)), ("large", (64, 96)), ("portrait", (96, 48))])
def test_resize_crop_is_the_whole_image_resized(files, decoder, name, out_hw):
    # 4:3 -> 3:2 and 3:5 -> 1:2: a little distortion; the large JPEG also takes the 1/8 reduced decode.
    with Image.open(files[name]) as im:
        full = im.convert("RGB")
    ref = np.asarray(full.resize(out_hw[::-1], Image.Resampling.BILINEAR)).astype(int)
    tfm = RectangularCropTfm(train=True, crop="resize", hflip=0, decoder=decoder)
    out = tfm(files[name], out_hw, np.random.default_rng(0), size_hw=full.size[::-1]).astype(int)
    assert out.shape == ref.shape
    # Red and green ramps only: blue is high-frequency and aliases differently in each resampler.
    assert np.abs(out[..., :2] - ref[..., :2]).mean() < 3
    assert np.abs(out[[0, -1]][:, [0, -1], :2] - ref[[0, -1]][:, [0, -1], :2]).max() < 16  # corners: nothing cut


def test_resize_crop_is_the_same_for_every_rng_without_flip(files):
    tfm = RectangularCropTfm(train=True, crop="resize", hflip=0)
    a, b = (tfm(files["landscape"], (64, 96), np.random.default_rng(s)) for s in (1, 2))
    assert np.array_equal(a, b)
