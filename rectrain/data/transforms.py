"""Per-image work in the DataLoader workers: decode a file to RGB and crop it to its bucket's shape.

Output is uint8 (H, W, 3); normalisation (``IMAGENET_MEAN``/``IMAGENET_STD``), the cast to float and
channels_last happen on the device, so workers do no float work and ship a quarter of float32's bytes.

Speed: the crop box is chosen from the image's size *before* decoding, so a JPEG can be decoded at a
reduced DCT scale (1/2, 1/4, 1/8: Pillow's ``draft``) whenever the crop at output resolution still
fits in the reduced image, and the resize reads only the crop box (``resize(box=...)``, no crop copy).
Three decoders (``--decoder``): ``turbo`` decodes only the crop's region of a JPEG (libjpeg-turbo 3's TurboJPEG
API, ``rectrain.data.turbo``), ``opencv`` the whole JPEG, ``pil`` anything; each hands what it cannot decode
exactly to the next (turbo -> opencv -> pil), and all crop the same box from the same rng.

Correctness: EXIF orientation is applied by the rule the size scan uses (``rectrain.data.exif``); CMYK, greyscale, palette,
alpha and 16-bit images become 8-bit RGB; a file that cannot be decoded (truncated, corrupt,
missing) raises ``DecodeError`` naming it -- never a silently grey image (``LOAD_TRUNCATED_IMAGES``
stays False).
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
import warnings
from collections import Counter
from contextlib import contextmanager

import numpy as np
from PIL import Image

from rectrain.data import exif, turbo
from rectrain.errors import UserError

__all__ = ["CROPS", "DECODERS", "IMAGENET_MEAN", "IMAGENET_STD", "ALPHA_BACKGROUND", "DecodeError", "open_rgb",
           "FallbackNotes", "RectangularCropTfm", "resolve_decoder", "decoder_problem"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on the 0..1 scale
IMAGENET_STD = (0.229, 0.224, 0.225)
# Transparent pixels are composited over the ImageNet mean colour: after normalisation they are ~0,
# i.e. "no signal", rather than a black or white that the model would learn as content.
ALPHA_BACKGROUND = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16/32-bit greyscale (16-bit PNG)
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


DECODERS = ("auto", "turbo", "opencv", "pil")  # auto: the first of turbo, opencv, pil that works here
CROPS = ("random", "resize")  # train crop: random-resized crop, or the whole image resized (the seed's)
TURBO_FLAGS = ("fast_upsample", "fast_dct")  # libjpeg-turbo's TJPARAM_FASTUPSAMPLE, _FASTDCT (rectrain.data.turbo)

try:  # optional: OpenCV decodes JPEGs about 2x faster than Pillow here and resizes with SIMD
    import cv2

    cv2.setNumThreads(1)  # each DataLoader worker is one process on one core
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None


class DecodeError(Exception):
    """The file could not be decoded (truncated, corrupt, missing...); the message names path and reason."""


def _display_name(src, name: str | None) -> str:
    """What error messages call the image: ``name``, else the path, else "<encoded bytes>"."""
    if name is not None:
        return str(name)
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<encoded bytes>"


def _read_bytes(src, name: str) -> bytes:
    """The encoded file: read from a path, or taken as given (bytes, memoryview, a (n,) uint8 array)."""
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as f:
                return f.read()
        except OSError as e:
            raise DecodeError(f"cannot decode {name}: {type(e).__name__}: {e}") from None
    return src if isinstance(src, bytes) else memoryview(src).tobytes()


def _file(src):
    """What Pillow opens: the path, or the bytes as a file."""
    if isinstance(src, (str, os.PathLike)):
        return src
    return io.BytesIO(src if isinstance(src, bytes) else memoryview(src).tobytes())


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
    """Read the header only -> (lazy image, EXIF orientation 1..8, upright full size (W, H)). ``path``: a path or
    the encoded bytes (then ``name`` names them in errors)."""
    with _reading(_display_name(path, name)):
        im = Image.open(_file(path))
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


class FallbackNotes:
    """Says when the region decoder hands an image on to OpenCV/Pillow: at the 1st, 10th, 100th, ... of them, counted
    over every process of the loaders that share this object. The count lives in shared memory, with its lock, that
    forked DataLoader workers inherit (a fallback is rare: the lock costs nothing that shows); ``log`` is the rank's
    log, which a forked worker writes as its main process does (the logger and its open file are inherited; logging
    re-creates its locks after a fork). Without ``log``: stderr. A pickled copy (spawned workers) counts in its own
    process and writes to stderr."""

    def __init__(self, log=None):
        self.log = log
        self._count = multiprocessing.Value("q", 0)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.log, self._count = None, multiprocessing.Value("q", 0)

    def add(self, name: str, reason: str, detail: str | None) -> None:
        with self._count.get_lock():
            self._count.value += 1
            n = self._count.value
        if n == 1:
            note = (f"note: {name}: {reason}{' (' + detail[:200] + ')' if detail else ''}; the region decoder hands "
                    "such images to OpenCV/Pillow (told again at 10, 100, 1,000... of them)")
        elif n == 10 ** int(math.log10(n)):
            note = f"note: the region decoder has handed {n:,} images to OpenCV/Pillow; the latest: {name}: {reason}"
        else:
            return
        if self.log is not None:
            self.log(note)
        else:
            print(note, file=sys.stderr, flush=True)


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

    The box is resized to the output with Pillow's antialiased bilinear filter (upsampling small images), or with
    ``decoder`` turbo/opencv (``auto`` picks the first that works here, see ``resolve_decoder``) by OpenCV's
    bilinear filter at the exact box (area averaging when shrinking 2x or more). Images the chosen decoder cannot
    take exactly go to the next one (turbo -> opencv -> pil); ``fallbacks`` counts them per process, and
    ``fallback_notes`` (``FallbackNotes``) says so at the first and at 10, 100, 1,000... of them.
    """

    def __init__(self, train: bool, scale: tuple[float, float] = (0.08, 1.0), hflip: float | bool = 0.5,
                 val_crop: float = 0.875, decoder: str = "auto", crop: str = "random",
                 fallback_notes: FallbackNotes | None = None, turbo_flags: tuple[str, ...] = ()):
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < val_crop <= 1:
            raise ValueError(f"val_crop must be in (0, 1], got {val_crop}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self._region = resolve_decoder(decoder) == "turbo"  # UserError when turbo is asked for and missing
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.train = bool(train)
        self.scale = (lo, hi)
        self.hflip = _flip_probability(hflip)
        self.val_crop = float(val_crop)
        self.decoder = decoder
        self.crop = crop
        self.fallbacks: Counter[str] = Counter()  # images the region decoder handed on, by reason (this process)
        self.region_images = 0                   # images it decoded
        self.fallback_notes = fallback_notes     # where to say so (the training loaders do; predict stays quiet)
        # libjpeg-turbo's speed flags for the region decoder, off by default: measured on real photos they buy no
        # speed (-5% to +7% from run to run), and FASTDCT puts crops ~1.03 grey levels from the exact crop (over the
        # 1-level goal), FASTUPSAMPLE ~0.78 (docs/benchmarks.md, benchmarks/bench_region_decode.py, the only caller
        # that sets them).
        unknown = set(turbo_flags) - set(TURBO_FLAGS)
        if unknown:
            raise ValueError(f"turbo_flags are among {TURBO_FLAGS}, got {sorted(unknown)}")
        self.turbo_flags = tuple(turbo_flags)

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
        """-> (H, W, 3) uint8, exactly ``out_hw``. ``src``: a file path, or the file's encoded bytes (bytes,
        memoryview or a (n,) uint8 array, e.g. read from a tar shard), which ``name`` then names in errors.
        ``size_hw``: the image's upright (H, W) from the scan cache (None: read from the header). The box is chosen
        on that size and mapped onto the file's actual pixels as fractions, so a stale size can shift the crop
        but never break it."""
        oh, ow = int(out_hw[0]), int(out_hw[1])
        name = _display_name(src, name)
        geometry = None
        if size_hw is not None:  # choose the crop before touching the file
            geometry = self.box(size_hw, (oh, ow), rng)
            data = None
            if self._region:
                data = _read_bytes(src, name)
                out, reason, detail = _region_crop(data, (oh, ow), size_hw, *geometry,
                                                   **{f: True for f in self.turbo_flags})
                if out is not None:
                    self.region_images += 1
                    return out
                self._fell_back(name, reason, detail)
            if _use_opencv(self.decoder):
                data = _read_bytes(src, name) if data is None else data
                out = _opencv_crop(data, name, (oh, ow), size_hw, *geometry)
                if out is not None:
                    return out
            if data is not None:  # read once
                src = data
        im, orientation, (full_w, full_h) = _open(src, name)
        gh, gw = size_hw if size_hw is not None else (full_h, full_w)
        (x0, y0, x1, y1), flip = geometry or self.box((gh, gw), (oh, ow), rng)
        fx, fy = full_w / gw, full_h / gh  # geometry pixels -> file pixels
        k = min((x1 - x0) * fx / ow, (y1 - y0) * fy / oh)  # file pixels per output pixel
        reduce_to = (math.ceil(full_w / k), math.ceil(full_h / k)) if k >= 2 else None
        img, s = _decode(im, orientation, name, reduce_to)
        box = (x0 * fx / s, y0 * fy / s, x1 * fx / s, y1 * fy / s)
        out = img.resize((ow, oh), Image.Resampling.BILINEAR, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(out, dtype=np.uint8)  # writable (np.asarray of a PIL image is read-only)

    def _fell_back(self, name: str, reason: str, detail: str | None) -> None:
        """Count an image the region decoder handed on (this process), and tell ``fallback_notes``."""
        self.fallbacks[reason] += 1
        if self.fallback_notes is not None:
            self.fallback_notes.add(name, reason, detail)

    def fallback_summary(self) -> str:
        """e.g. 'region-decoded 12,345 images, 21 by OpenCV/Pillow (CMYK/YCCK JPEG 18, not a JPEG 3)'."""
        why = ", ".join(f"{r} {n:,}" for r, n in self.fallbacks.most_common())
        return (f"region-decoded {self.region_images:,} images, {sum(self.fallbacks.values()):,} by OpenCV/Pillow"
                + (f" ({why})" if why else ""))

    def __repr__(self) -> str:
        if self.train and self.crop == "resize":
            return f"RectangularCropTfm(train=True, crop='resize', hflip={self.hflip})"
        if self.train:
            return f"RectangularCropTfm(train=True, scale={self.scale}, hflip={self.hflip})"
        return f"RectangularCropTfm(train=False, val_crop={self.val_crop})"


# ---------------------------------------------------------------------------------------------
# The fast paths (JPEG only): turbo (region decoding) and OpenCV (whole-image decoding). Same geometry as
# the Pillow path: the box is chosen on the scanned upright size, the file is decoded at the largest DCT
# reduction 1/s (s in 2, 4, 8) that keeps at least one file pixel per output pixel, and the box -- mapped
# with the exact 1/s factor, sub-pixel -- is resampled to the output: bilinear at the exact positions
# (``cv2.warpAffine``), or area averaging on whole pixels when it shrinks by 2x or more (as FFCV does; after the
# DCT reduction that takes a 16x shrink). Both paths resample the same window of the same decoded pixels, so they
# give identical crops. Neither fails on a truncated JPEG (libjpeg pads with grey), so a file that does not end
# with the JPEG end-of-image marker goes on to the Pillow path, which raises.

_CV2_REDUCED = (((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
                if cv2 is not None else ())


def decoder_problem(decoder: str) -> str | None:
    """Why ``decoder`` cannot run here, or None."""
    if decoder in ("turbo", "opencv") and cv2 is None:
        return "OpenCV is not installed (it resizes for turbo): pip install opencv-python-headless"
    if decoder == "turbo" and not turbo.available():
        return turbo.problem()
    return None


def resolve_decoder(decoder: str) -> str:
    """``--decoder`` -> the decoder that runs: auto is turbo where libjpeg-turbo 3 loads (the ``turbojpeg``
    package) and OpenCV is installed, else opencv where OpenCV is, else pil. turbo where it cannot run: UserError."""
    if decoder == "auto":
        return next(d for d in ("turbo", "opencv", "pil") if decoder_problem(d) is None)
    if decoder == "turbo" and decoder_problem("turbo"):
        raise UserError(f"--decoder turbo cannot be used: {decoder_problem('turbo')}; or use --decoder auto")
    return decoder


def _use_opencv(decoder: str) -> bool:
    if decoder == "opencv" and cv2 is None:
        raise DecodeError("decoder 'opencv' was asked for but OpenCV is not installed: "
                          "pip install opencv-python-headless")
    return decoder != "pil" and cv2 is not None


def _jpeg_problem(data: bytes) -> str | None:
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return "not a JPEG"
    if data[-2:] != b"\xff\xd9":  # truncated (the Pillow path raises) or data after the end marker
        return "no end-of-image marker at the end"
    return None


def _dct_scale(k: float) -> int:
    """The largest DCT reduction 1/s that keeps at least one decoded pixel per output pixel; ``k``: file pixels
    per output pixel."""
    return next((s for s in (8, 4, 2) if k >= s), 1)


# Orientation o maps a point of the stored image (W x H) to the upright one, and back (``exif.TRANSPOSE``'s
# transposes, on continuous coordinates: pixel i spans [i, i + 1)).
_TO_UPRIGHT = {1: lambda x, y, w, h: (x, y), 2: lambda x, y, w, h: (w - x, y), 3: lambda x, y, w, h: (w - x, h - y),
               4: lambda x, y, w, h: (x, h - y), 5: lambda x, y, w, h: (y, x), 6: lambda x, y, w, h: (h - y, x),
               7: lambda x, y, w, h: (h - y, w - x), 8: lambda x, y, w, h: (y, w - x)}
_TO_STORED = {1: lambda x, y, w, h: (x, y), 2: lambda x, y, w, h: (w - x, y), 3: lambda x, y, w, h: (w - x, h - y),
              4: lambda x, y, w, h: (x, h - y), 5: lambda x, y, w, h: (y, x), 6: lambda x, y, w, h: (y, h - x),
              7: lambda x, y, w, h: (w - y, h - x), 8: lambda x, y, w, h: (w - y, x)}
# The same turn on an array (stored -> upright).
_TURN = {2: lambda a: cv2.flip(a, 1), 3: lambda a: cv2.rotate(a, cv2.ROTATE_180), 4: lambda a: cv2.flip(a, 0),
         5: lambda a: cv2.transpose(a), 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
         7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
         8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)}


def _map_box(box, fn, w, h) -> tuple[float, float, float, float]:
    (ax, ay), (bx, by) = fn(box[0], box[1], w, h), fn(box[2], box[3], w, h)
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _decoded_box(box, o: int, stored_wh: tuple[int, int], s: int) -> tuple[float, float, float, float]:
    """``box`` in the upright file's pixels -> in the upright image decoded at 1/``s``. Exact: through the stored
    orientation, where libjpeg's scaled pixel j covers file pixels [j s, (j + 1) s); the scaled image is
    ceil(W / s) wide, so a turned axis shifts by a fraction of a pixel when W is no multiple of s."""
    if s == 1:
        return tuple(box)
    w, h = stored_wh
    x0, y0, x1, y1 = _map_box(box, _TO_STORED[o], w, h)
    return _map_box((x0 / s, y0 / s, x1 / s, y1 / s), _TO_UPRIGHT[o], turbo.scaled(w, s), turbo.scaled(h, s))


def _finish(window: np.ndarray, origin: tuple[int, int], box, out_hw, flip: bool) -> np.ndarray:
    """Resample ``box`` (x0, y0, x1, y1 in decoded upright pixels) out of ``window``, the decoded pixels from
    ``origin`` (x, y) on -> (H, W, C) ``out_hw``, flipped if asked. The window is first cut to the box and one
    pixel around it (the bilinear taps), so every path resamples the same array with the same numbers."""
    ox, oy = origin
    x0, y0, x1, y1 = box
    wx0, wy0 = max(math.floor(x0) - 1, ox), max(math.floor(y0) - 1, oy)
    wx1, wy1 = min(math.ceil(x1) + 1, ox + window.shape[1]), min(math.ceil(y1) + 1, oy + window.shape[0])
    crop = window[wy0 - oy:wy1 - oy, wx0 - ox:wx1 - ox]
    x0, y0, x1, y1 = x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0
    oh, ow = out_hw
    kx, ky = (x1 - x0) / ow, (y1 - y0) / oh  # decoded pixels per output pixel
    if min(kx, ky) >= 2:  # area averaging over whole pixels (sub-pixel matters little at 2x or more)
        xs, ys = int(x0), int(y0)
        xe, ye = min(max(math.ceil(x1), xs + 1), crop.shape[1]), min(max(math.ceil(y1), ys + 1), crop.shape[0])
        out = cv2.resize(crop[ys:ye, xs:xe], (ow, oh), interpolation=cv2.INTER_AREA)
    else:  # bilinear at the exact sample positions (cv2.resize's pixel-centre rule, on a sub-pixel box)
        m = np.array([[kx, 0.0, x0 + 0.5 * kx - 0.5], [0.0, ky, y0 + 0.5 * ky - 0.5]])
        out = cv2.warpAffine(crop, m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
    return cv2.flip(out, 1) if flip else out


def _opencv_crop(data: bytes, name: str, out_hw: tuple[int, int], size_hw, box, flip: bool) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of ``box`` (x0, y0, x1, y1 in the scanned upright size), or None when this file
    should take the Pillow path. OpenCV applies EXIF orientation itself and converts CMYK and greyscale."""
    if _jpeg_problem(data):
        return None  # not a JPEG, or data after/instead of the end marker: Pillow decides
    oh, ow = out_hw
    gh, gw = int(size_hw[0]), int(size_hw[1])
    s = _dct_scale(min((box[2] - box[0]) / ow, (box[3] - box[1]) / oh))
    flag = dict(_CV2_REDUCED).get(s, cv2.IMREAD_COLOR)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)  # (h, w, 3) BGR, upright
    if img is None:
        raise DecodeError(f"cannot decode {name}: OpenCV could not read it as a JPEG")
    h, w = img.shape[:2]
    if (h, w) == (turbo.scaled(gh, s), turbo.scaled(gw, s)):  # the scan's size: map exactly
        o = exif.jpeg_orientation(data) if s > 1 else 1
        dbox = _decoded_box(box, o, (gh, gw) if o in exif.SWAPS_AXES else (gw, gh), s)
    else:  # the scan's upright size disagrees (stale cache): map by fractions
        sy, sx = h / gh, w / gw
        if abs(sy - sx) > 0.02 * max(sy, sx):
            return None
        dbox = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = _finish(img, (0, 0), dbox, out_hw, flip)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)  # SIMD; a reversed-stride copy costs 10x more


def _region_problem(head: turbo.Header) -> str | None:
    """Why TurboJPEG's region decode would not give exactly what OpenCV's full decode gives, or None."""
    if head.colorspace in (turbo.TJCS_CMYK, turbo.TJCS_YCCK):
        return "CMYK/YCCK JPEG"  # TurboJPEG does not convert them to RGB; OpenCV/Pillow do (Adobe inversion)
    if head.lossless:
        return "lossless JPEG"  # cannot be cropped
    if head.precision != 8:
        return f"{head.precision}-bit JPEG"
    if head.subsamp == turbo.TJSAMP_UNKNOWN:
        return "unusual chroma subsampling"  # no MCU width to align the region to
    return None


def _region_crop(data: bytes, out_hw, size_hw, box, flip: bool, fast_upsample: bool = False, fast_dct: bool = False):
    """The crop decoded from the box's region only -> (image, None, None), or (None, reason, detail) when the file
    takes the OpenCV/Pillow path instead (``reason`` from a short fixed list, counted; ``detail`` for the note).

    The region: the pixels ``_finish`` reads (the box at the chosen DCT scale, in the *stored* orientation, and the
    bilinear taps one pixel around it) widened by one more pixel on each side -- fancy chroma upsampling reads a
    neighbour, and with it the region's pixels equal the full decode's bit for bit (NVIDIA DALI's CPU crop decoder
    widens its integer box the same way) -- with its left edge moved down to the scaled MCU width. The decoded
    region is then turned upright and handed to ``_finish`` like OpenCV's full decode: the crops are identical.
    ``fast_upsample``/``fast_dct``: libjpeg-turbo's speed flags (``turbo.decode_region``); the crop then equals
    TurboJPEG's whole-image decode with the same flags, cropped by ``_finish``."""
    problem = _jpeg_problem(data)
    if problem:
        return None, problem, None
    try:
        head = turbo.read_header(data)
    except turbo.TurboError as e:
        return None, "TurboJPEG cannot read the header", str(e)
    problem = _region_problem(head)
    if problem:
        return None, problem, None
    o = exif.jpeg_orientation(data)
    sw, sh = head.width, head.height  # stored
    uw, uh = (sh, sw) if o in exif.SWAPS_AXES else (sw, sh)
    fx, fy = uw / int(size_hw[1]), uh / int(size_hw[0])  # scanned -> file pixels: 1 unless the cache is stale
    fbox = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    oh, ow = out_hw
    s = _dct_scale(min((fbox[2] - fbox[0]) / ow, (fbox[3] - fbox[1]) / oh))
    dbox = _decoded_box(fbox, o, (sw, sh), s)
    dw, dh = turbo.scaled(sw, s), turbo.scaled(sh, s)  # the stored image at 1/s
    x0, y0, x1, y1 = _map_box(dbox, _TO_STORED[o], dw, dh)
    mcu = turbo.scaled(turbo.MCU_WIDTH[head.subsamp], s)  # the region's left edge: a multiple of this
    rx0, ry0 = max(math.floor(x0) - 2, 0), max(math.floor(y0) - 2, 0)
    rx0 -= rx0 % mcu
    rx1, ry1 = min(math.ceil(x1) + 2, dw), min(math.ceil(y1) + 2, dh)
    # At least one MCU wide: libjpeg upsamples a region whose chroma is under 2 samples wide another way
    # (jpeg_crop_scanline reinitialises the upsampler), so its pixels would differ from the full decode's.
    rx1 = max(rx1, min(rx0 + mcu, dw))
    rx0 = min(rx0, max(rx1 - mcu, 0) // mcu * mcu)
    try:
        region = turbo.decode_region(data, s, rx0, ry0, rx1 - rx0, ry1 - ry0, fast_upsample, fast_dct)
    except turbo.TurboError as e:  # a warning (corrupt data) or a refusal: OpenCV decodes as it always did
        return None, "TurboJPEG error or warning", str(e)
    if o != 1:
        region = _TURN[o](region)
    ux0, uy0, _, _ = _map_box((rx0, ry0, rx1, ry1), _TO_UPRIGHT[o], dw, dh)
    return _finish(region, (int(ux0), int(uy0)), dbox, out_hw, flip), None, None
