"""Per-image work in the DataLoader workers: decode a file to RGB and crop it to its bucket's shape.

Output is uint8 (H, W, 3); normalisation (``IMAGENET_MEAN``/``IMAGENET_STD``), the cast to float and
channels_last happen on the device, so workers do no float work and ship a quarter of float32's bytes.

Speed: the crop box is chosen from the image's size *before* decoding, so a JPEG can be decoded at a
reduced DCT scale (1/2, 1/4, 1/8: Pillow's ``draft``) whenever the crop at output resolution still
fits in the reduced image, and the resize reads only the crop box (``resize(box=...)``, no crop copy).

Correctness: EXIF orientation is applied by the rule the size scan uses (``rectrain.data.exif``); CMYK, greyscale, palette,
alpha and 16-bit images become 8-bit RGB; a file that cannot be decoded (truncated, corrupt,
missing) raises ``DecodeError`` naming it -- never a silently grey image (``LOAD_TRUNCATED_IMAGES``
stays False).
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image

from rectrain.data import exif

__all__ = ["CROPS", "DECODERS", "IMAGENET_MEAN", "IMAGENET_STD", "ALPHA_BACKGROUND", "DecodeError", "open_rgb", "RectangularCropTfm"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on the 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)
# Transparent pixels are composited over the ImageNet mean colour: after normalisation they are ~0,
# i.e. "no signal", rather than a black or white that the model would learn as content.
ALPHA_BACKGROUND = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16/32-bit greyscale (16-bit PNG)
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


DECODERS = ("auto", "pil", "opencv")  # auto: OpenCV for JPEGs when it is installed, else Pillow
CROPS = ("random", "resize")  # train crop: random-resized crop, or the whole image resized (the seed's)

try:  # optional: OpenCV decodes JPEGs about 2x faster than Pillow here and resizes with SIMD
    import cv2

    cv2.setNumThreads(1)  # each DataLoader worker is one process on one core
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None


class DecodeError(Exception):
    """The file could not be decoded (truncated, corrupt, missing...); the message names path and reason."""


@contextmanager
def _reading(path):
    """Turn whatever a broken file makes Pillow raise into one DecodeError naming the file.

    Pillow's plugins raise many types on corrupt data (OSError, SyntaxError, ValueError, IndexError,
    struct.error...), so this catches Exception, but only around the calls that read the file.
    Pillow's per-file UserWarnings (corrupt EXIF, ...) are silenced: they would flood the logs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from e


def _open(path, name=None):
    """Read the header only -> (lazy image, EXIF orientation 1..8, upright full size (W, H)). ``path``: a file path,
    or the file's encoded bytes (a shard member; ``name`` then names it in errors)."""
    encoded = isinstance(path, (bytes, bytearray, memoryview))
    with _reading(name or ("an image given as bytes" if encoded else path)):
        im = Image.open(io.BytesIO(path) if encoded else path)
        orientation = exif.orientation(im)
        h, w = exif.upright_size(im, orientation)
        return im, orientation, (w, h)


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit greyscale (0..65535) -> 8-bit RGB; ``convert`` would clip everything above 255 to white."""
    a = np.asarray(im).astype(np.int64)
    a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha (and palette/greyscale transparency) is composited over
    ``ALPHA_BACKGROUND``; CMYK uses Pillow's conversion (Adobe-inverted CMYK JPEGs are handled by the
    JPEG plugin)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _WIDE_GREY:
        return _wide_grey_to_rgb(im)
    if im.mode in _WITH_ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _decode(im, orientation, path, reduce_to) -> tuple[Image.Image, float]:
    """Decode an opened image -> (upright RGB image, scale: full-resolution pixels per decoded pixel).

    ``reduce_to`` (W, H) upright: the smallest size needed. For JPEGs, ``draft`` then decodes at the
    largest DCT scale 1/s (s in 1, 2, 4, 8: one factor for both axes, so orientation cannot change it)
    that keeps the image at least that big; the request is swapped into the stored orientation first.
    """
    with _reading(path):
        full_w = im.size[0]
        scale = 1.0
        if reduce_to is not None and im.format == "JPEG":
            w, h = (max(1, int(v)) for v in reduce_to)
            drafted = im.draft("RGB", (h, w) if orientation in exif.SWAPS_AXES else (w, h))
            if drafted is not None:
                scale = full_w / drafted[1][2]  # drafted box: the full image in decoded pixels
        try:
            im.load()
        except Exception:
            im.close()
            raise
        return to_rgb(exif.make_upright(im, orientation)), scale


def open_rgb(path, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` to an upright 8-bit RGB image.

    ``reduce_to`` (W, H), upright: the size the caller needs at least; a JPEG is then decoded at a
    reduced DCT scale (up to 1/8) when that still leaves at least this size. Other formats decode fully.
    Raises ``DecodeError`` (naming the path) when the file cannot be read.
    """
    im, orientation, _ = _open(path)
    return _decode(im, orientation, path, reduce_to)[0]


def _largest_box(h: float, w: float, ratio: float) -> tuple[float, float]:
    """(height, width) of the largest box of ratio W/H = ``ratio`` that fits in an (h, w) image."""
    return (h, h * ratio) if w / h >= ratio else (w / ratio, w)


def _flip_probability(hflip) -> float:
    """hflip as a probability; True/False (the old switch) mean 0.5/0."""
    if isinstance(hflip, (bool, np.bool_)):
        return 0.5 if hflip else 0.0
    p = float(hflip)
    if not 0 <= p <= 1:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
    return p


class RectangularCropTfm:
    """Crop an image file to an (H, W) bucket shape: uint8 (H, W, 3).

    "The largest box" is the largest box of the bucket's ratio W/H that fits in the (upright) image, so
    images wider or taller than the bucket lose their sides (this is how ratios beyond ``max_ratio`` are
    clamped).

    - ``train=True``, ``crop="random"`` (default): random-resized crop, no distortion. Area fraction
      uniform in ``scale`` of the largest box (for an image whose ratio matches its bucket, that is the
      fraction of the image, as torchvision's RandomResizedCrop), uniform position. The default
      ``scale=(0.08, 1.0)`` is the Inception/torchvision ImageNet recipe that ResNet-50's ~76-77% top-1
      is quoted with; raise the lower bound (fast.ai's DAWNBench runs used 0.35) for short schedules or
      small models, where the strong zoom under-fits.
    - ``train=True``, ``crop="resize"``: the seed's literal per-image transform: the whole image resized
      to the bucket shape, no crop, ``scale`` unused. The aspect distortion is only the gap between the
      image's ratio and its bucket's (small, as images go to the nearest bucket; beyond ``max_ratio``
      it grows); every other augmentation is left to the batch (``rectrain.training.augment``).
    - Both train crops flip horizontally with probability ``hflip`` (0 never, 1 always; True/False
      mean 0.5/0). The flip is drawn from ``rng`` like the box, so a sample's pixels are a pure
      function of its rng whichever decoder runs.
    - ``train=False``: centre crop whose sides are ``val_crop`` x the largest box, deterministic, never
      flipped (``crop`` and ``hflip`` are train settings). With ``val_crop=0.875`` this equals "resize
      the shorter side to target/0.875, centre-crop the target".

    The box is resized to the output with Pillow's antialiased bilinear filter (upsampling small images).
    """

    def __init__(self, train: bool, scale: tuple[float, float] = (0.08, 1.0), hflip: float | bool = 0.5,
                 val_crop: float = 0.875, decoder: str = "auto", crop: str = "random"):
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < val_crop <= 1:
            raise ValueError(f"val_crop must be in (0, 1], got {val_crop}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.train = bool(train)
        self.scale = (lo, hi)
        self.hflip = _flip_probability(hflip)
        self.val_crop = float(val_crop)
        self.decoder = decoder
        self.crop = crop

    def box(self, size_hw, out_hw, rng: np.random.Generator | None = None) -> tuple[tuple[float, ...], bool]:
        """Crop box (x0, y0, x1, y1) in the (H, W) image's pixels and whether to flip. Pure given ``rng``."""
        h, w = (float(v) for v in size_hw)
        if self.train and self.crop == "resize":
            rng = np.random.default_rng() if rng is None else rng
            return (0.0, 0.0, w, h), bool(rng.random() < self.hflip)
        bh, bw = _largest_box(h, w, out_hw[1] / out_hw[0])
        if not self.train:
            ch, cw = bh * self.val_crop, bw * self.val_crop
            x0, y0 = (w - cw) / 2, (h - ch) / 2
            return (x0, y0, x0 + cw, y0 + ch), False
        rng = np.random.default_rng() if rng is None else rng
        side = math.sqrt(rng.uniform(*self.scale))  # area fraction -> side fraction
        ch, cw = bh * side, bw * side
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        # Always drawn, last: the box does not depend on hflip, and p=0.5 keeps the old streams.
        # random() is in [0, 1): p=0 never flips, p=1 always does.
        flip = bool(rng.random() < self.hflip)
        return (x0, y0, x0 + cw, y0 + ch), flip

    def __call__(self, src, out_hw: tuple[int, int], rng: np.random.Generator | None = None,
                 size_hw: tuple[int, int] | None = None, name: str | None = None) -> np.ndarray:
        """-> (H, W, 3) uint8, exactly ``out_hw``. ``src``: an image file's path, or its encoded bytes (a shard
        member), which ``name`` then names in errors (e.g. ``shard.tar:key``). ``size_hw``: the image's upright
        (H, W) from the scan cache (None: read from the header). The box is chosen on that size and mapped onto
        the file's actual pixels as fractions, so a stale size can shift the crop but never break it."""
        oh, ow = int(out_hw[0]), int(out_hw[1])
        path = name or (src if isinstance(src, str) else "an image given as bytes")  # what errors call it
        geometry = None
        if size_hw is not None:  # choose the crop before touching the file
            geometry = self.box(size_hw, (oh, ow), rng)
            if _use_opencv(self.decoder):
                out = _opencv_crop(src, (oh, ow), size_hw, *geometry, name=path)
                if out is not None:
                    return out
        im, orientation, (full_w, full_h) = _open(src, path)
        gh, gw = size_hw if size_hw is not None else (full_h, full_w)
        (x0, y0, x1, y1), flip = geometry or self.box((gh, gw), (oh, ow), rng)
        fx, fy = full_w / gw, full_h / gh  # geometry pixels -> file pixels
        k = min((x1 - x0) * fx / ow, (y1 - y0) * fy / oh)  # file pixels per output pixel
        reduce_to = (math.ceil(full_w / k), math.ceil(full_h / k)) if k >= 2 else None
        img, s = _decode(im, orientation, path, reduce_to)
        box = (x0 * fx / s, y0 * fy / s, x1 * fx / s, y1 * fy / s)
        out = img.resize((ow, oh), Image.Resampling.BILINEAR, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(out, dtype=np.uint8)  # writable (np.asarray of a PIL image is read-only)

    def __repr__(self) -> str:
        if self.train and self.crop == "resize":
            return f"RectangularCropTfm(train=True, crop='resize', hflip={self.hflip})"
        if self.train:
            return f"RectangularCropTfm(train=True, scale={self.scale}, hflip={self.hflip})"
        return f"RectangularCropTfm(train=False, val_crop={self.val_crop})"


# ---------------------------------------------------------------------------------------------
# The OpenCV fast path (JPEG only). Same geometry as the Pillow path: the box is chosen on the scanned
# upright size, the file is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps at least one
# file pixel per output pixel, and only the box is resized (bilinear; area averaging when it shrinks by 2x
# or more, as FFCV does). OpenCV applies EXIF orientation itself and converts CMYK and greyscale.
# It does not fail on a truncated JPEG (it pads with grey), so a file that does not end with the JPEG
# end-of-image marker goes to the Pillow path, which raises.

_CV2_REDUCED = (((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
                if cv2 is not None else ())


def _use_opencv(decoder: str) -> bool:
    if decoder == "opencv" and cv2 is None:
        raise DecodeError("decoder 'opencv' was asked for but OpenCV is not installed: "
                          "pip install opencv-python-headless")
    return decoder != "pil" and cv2 is not None


def _opencv_crop(src, out_hw: tuple[int, int], size_hw, box, flip: bool, name: str | None = None) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of ``box`` (x0, y0, x1, y1 in the scanned upright size), or None when this file
    should take the Pillow path. ``src``: a path or the encoded bytes (``name`` names them in errors)."""
    path = name or src
    try:
        buf = (np.frombuffer(src, dtype=np.uint8) if isinstance(src, (bytes, bytearray, memoryview))
               else np.fromfile(src, dtype=np.uint8))
    except OSError as e:
        raise DecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from None
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8 or buf[-2] != 0xFF or buf[-1] != 0xD9:
        return None  # not a JPEG, or data after/instead of the end marker: Pillow decides
    oh, ow = out_hw
    gh, gw = int(size_hw[0]), int(size_hw[1])
    x0, y0, x1, y1 = box
    k = min((x1 - x0) / ow, (y1 - y0) / oh)  # image pixels per output pixel
    flag = next((f for r, f in _CV2_REDUCED if k >= r), cv2.IMREAD_COLOR)
    img = cv2.imdecode(buf, flag)  # (h, w, 3) BGR, upright
    if img is None:
        raise DecodeError(f"cannot decode {path}: OpenCV could not read it as a JPEG")
    sy, sx = img.shape[0] / gh, img.shape[1] / gw  # scanned pixels -> decoded pixels
    if abs(sy - sx) > 0.02 * max(sy, sx):  # the scan's upright size disagrees (stale cache)
        return None
    ys, ye = int(y0 * sy), max(int(math.ceil(y1 * sy)), int(y0 * sy) + 1)
    xs, xe = int(x0 * sx), max(int(math.ceil(x1 * sx)), int(x0 * sx) + 1)
    crop = img[ys:ye, xs:xe]
    shrink = min(crop.shape[0] / oh, crop.shape[1] / ow)
    out = cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR)
    out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)  # SIMD; a reversed-stride copy costs 10x more
    return cv2.flip(out, 1) if flip else out
