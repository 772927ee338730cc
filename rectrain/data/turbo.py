"""libjpeg-turbo's TurboJPEG 3 API through ctypes: decode only a region of a JPEG, at a reduced DCT scale.

What it is for: a random-resized crop covers ~40% of an image on average, and the rows below it and the
columns beside it need not be decoded. ``tj3SetCroppingRegion`` + ``tj3SetScalingFactor`` + ``tj3Decompress8``
decode just the region (rows below it are skipped without entropy decoding, rows above are entropy-decoded
only), at 1/1, 1/2, 1/4 or 1/8 of the size. ``rectrain.data.transforms`` picks the region and the scale.

Where the library comes from: the ``turbojpeg`` wheel on PyPI (pybind11 bindings by Dobatymo, wheels for CPython
3.10-3.13 on manylinux x86_64) bundles ``turbojpeg.libs/libturbojpeg-<hash>.so.0.3.0``: libjpeg-turbo "2.1.92"
(between 3.0 beta2 and 3.0.0; git 3a53627, 2023-04-06), which exports the TurboJPEG 3 API. Its own Python binding
has no region decode, so this module loads that shared library directly, found through the installed package's
folder (nothing is built). Debian 12's system ``libturbojpeg0`` is 2.1.5, without the TurboJPEG 3 API, so it is
not a substitute. Where the wheel is missing, ``problem()`` says why and the loader decodes with OpenCV.

Facts from that version's turbojpeg.h / turbojpeg.c (checked in the source, not guessed):
- enums (unchanged in every 3.x release): TJINIT_DECOMPRESS 1; TJPARAM_STOPONWARNING 0, _SUBSAMP 4, _JPEGWIDTH 5,
  _JPEGHEIGHT 6, _PRECISION 7, _COLORSPACE 8, _PROGRESSIVE 12, _ARITHMETIC 14, _LOSSLESS 15; TJPF_RGB 0;
  TJCS_RGB 0, _YCbCr 1, _GRAY 2, _CMYK 3, _YCCK 4; TJSAMP_UNKNOWN -1.
- The cropping region is in *scaled* pixels; its x must be a multiple of the scaled MCU width
  (``TJSCALED(tjMCUWidth[subsamp], scale)``), else ``tj3SetCroppingRegion`` fails (it does not round). Lossless
  JPEGs cannot be cropped. The scaling factor must be set before the region (the check uses it).
- A warning (a truncated file: "Premature end of JPEG file", grey padding; corrupt data) is not an error unless
  TJPARAM_STOPONWARNING is set; this module sets it, so a warning is a failed decode (``TurboError``) and the
  caller takes its other path, which decides as it always did.
- One handle per process and thread: a TurboJPEG instance is not thread-safe, and DataLoader workers are forked
  processes (a handle copied by fork is left to the parent).

The speed flags (``decode_region(fast_upsample=, fast_dct=)``: TJPARAM_FASTUPSAMPLE 9 and TJPARAM_FASTDCT 10 in
turbojpeg.h) are off by default. Elsewhere: FFCV's ``imdecode`` (libffcv/libffcv.cpp) passes TJFLAG_FASTDCT and keeps
fancy upsampling; DALI's libjpeg-turbo CPU decoder (dali/imgcodec/decoders/libjpeg_turbo.cc) and nvImageCodec's plugin
keep both off unless asked (their ``fast_idct`` option); Pillow, and so torchvision on PIL images, turns both on only
in ``draft`` mode (src/libImaging/JpegDecode.c). Measured on real photos (``benchmarks/bench_region_decode.py``,
docs/benchmarks.md), neither buys speed here: 5% slower to 7% faster than the default from run to run (the rows'
entropy decoding, which no flag touches, is most of a region decode; turbojpeg.h itself says the two IDCTs perform
alike on AVX2 CPUs), while FASTDCT puts crops ~1.03 grey levels from the exact crop (over the 1-level goal; default
0.26-0.31) and FASTUPSAMPLE ~0.78. And in this library version fast upsampling (libjpeg's merged upsampler) meets a
use-after-free in ``jpeg_skip_scanlines`` when the handle decoded an image without it before (fixed in libjpeg-turbo
3.1.2, commit f158143e; on the benchmark's set it segfaulted 5 runs of 5, and gave "Corrupt JPEG data" warnings), so
a fast-upsampling decode gets a handle of its own.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["TurboError", "Header", "MCU_WIDTH", "available", "problem", "library_path", "read_header",
           "decode_region", "scaled"]

# TurboJPEG 3 constants (turbojpeg.h of libjpeg-turbo 2.1.92 / 3.0.x; the values never changed across 3.x).
_TJINIT_DECOMPRESS = 1
_TJPARAM_STOPONWARNING, _TJPARAM_SUBSAMP, _TJPARAM_JPEGWIDTH, _TJPARAM_JPEGHEIGHT = 0, 4, 5, 6
_TJPARAM_PRECISION, _TJPARAM_COLORSPACE, _TJPARAM_PROGRESSIVE, _TJPARAM_ARITHMETIC, _TJPARAM_LOSSLESS = 7, 8, 12, 14, 15
_TJPARAM_FASTUPSAMPLE, _TJPARAM_FASTDCT = 9, 10
_TJPF_RGB = 0
TJCS_RGB, TJCS_YCBCR, TJCS_GRAY, TJCS_CMYK, TJCS_YCCK = 0, 1, 2, 3, 4
TJSAMP_UNKNOWN = -1
# MCU width in pixels per TJSAMP (444, 422, 420, GRAY, 440, 411, 441): tjMCUWidth in turbojpeg.c.
MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)


class TurboError(Exception):
    """TurboJPEG refused or failed (its message); the caller decodes the file another way."""


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scale(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


@dataclass(frozen=True)
class Header:
    """What the JPEG's header says, as TurboJPEG reads it (sizes as stored, before EXIF orientation)."""

    width: int
    height: int
    subsamp: int        # TJSAMP_*: -1 when the sampling factors are unusual (no region decode then)
    colorspace: int     # TJCS_*
    precision: int      # bits per sample
    progressive: bool
    arithmetic: bool
    lossless: bool


def scaled(n: int, denom: int) -> int:
    """TJSCALED: a dimension of ``n`` pixels decoded at 1/``denom`` (rounded up, as libjpeg does)."""
    return (n + denom - 1) // denom


def library_path() -> str | None:
    """The libturbojpeg that the ``turbojpeg`` wheel installed, or None. Found without importing the package."""
    try:
        spec = importlib.util.find_spec("turbojpeg")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "turbojpeg.libs", "libturbojpeg*.so*")))
    return found[0] if found else None


_lib = None
_problem: str | None = None
_loaded = False


def _load():
    """Load the library once per process -> the ctypes library, or None (``_problem`` says why)."""
    global _lib, _problem, _loaded
    if _loaded:
        return _lib
    _loaded = True
    path = library_path()
    if path is None:
        _problem = "the turbojpeg package (which ships libjpeg-turbo 3) is not installed: pip install turbojpeg"
        return None
    try:
        lib = ctypes.CDLL(path)
        for name, res, args in (
                ("tj3Init", ctypes.c_void_p, [ctypes.c_int]),
                ("tj3Destroy", None, [ctypes.c_void_p]),
                ("tj3Set", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
                ("tj3Get", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
                ("tj3GetErrorStr", ctypes.c_char_p, [ctypes.c_void_p]),
                # The JPEG as ``bytes`` (c_char_p passes a pointer to the object's own buffer: no copy).
                ("tj3DecompressHeader", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
                ("tj3SetScalingFactor", ctypes.c_int, [ctypes.c_void_p, _Scale]),
                ("tj3SetCroppingRegion", ctypes.c_int, [ctypes.c_void_p, _Region]),
                ("tj3Decompress8", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                                  ctypes.c_int, ctypes.c_int])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except (OSError, AttributeError) as e:  # not loadable here, or an older library without the TurboJPEG 3 API
        _problem = f"{path} cannot be used ({type(e).__name__}: {e})"
        return None
    _lib = lib
    return lib


def available() -> bool:
    return _load() is not None


def problem() -> str | None:
    """Why region decoding is unavailable here, or None when it is."""
    _load()
    return _problem


# .handle: [pid, tjhandle, the speed flags set on it] of this thread; a forked worker makes its own
_local = threading.local()


def _new_handle(lib):
    h = lib.tj3Init(_TJINIT_DECOMPRESS)
    if not h:
        raise TurboError("tj3Init failed")
    # A warning (truncated or corrupt data) stops the decode and fails it: never a grey-padded image.
    lib.tj3Set(h, _TJPARAM_STOPONWARNING, 1)
    return [os.getpid(), h, (False, False)]


def _tj():
    lib = _load()
    if lib is None:
        raise TurboError(_problem)
    handle = getattr(_local, "handle", None)
    if handle is None or handle[0] != os.getpid():
        handle = _local.handle = _new_handle(lib)
    return lib, handle[1]


def _renew(lib, data: bytes):
    """Replace this thread's handle by a fresh one and read ``data``'s header on it (the decode needs it there)."""
    old, _local.handle = _local.handle, _new_handle(lib)
    lib.tj3Destroy(old[1])
    if lib.tj3DecompressHeader(_local.handle[1], data, len(data)) != 0:
        _fail(lib, _local.handle[1], "header")
    return _local.handle[1]


def _fail(lib, h, what: str):
    raise TurboError(f"{what}: {(lib.tj3GetErrorStr(h) or b'').decode(errors='replace').strip()}")


def read_header(data: bytes) -> Header:
    """``data``: the file's bytes. Raises ``TurboError`` when TurboJPEG cannot read them."""
    lib, h = _tj()
    if lib.tj3DecompressHeader(h, data, len(data)) != 0:
        _fail(lib, h, "header")
    get = lib.tj3Get
    return Header(width=get(h, _TJPARAM_JPEGWIDTH), height=get(h, _TJPARAM_JPEGHEIGHT), subsamp=get(h, _TJPARAM_SUBSAMP),
                  colorspace=get(h, _TJPARAM_COLORSPACE), precision=get(h, _TJPARAM_PRECISION),
                  progressive=bool(get(h, _TJPARAM_PROGRESSIVE)), arithmetic=bool(get(h, _TJPARAM_ARITHMETIC)),
                  lossless=bool(get(h, _TJPARAM_LOSSLESS)))


def decode_region(data: bytes, denom: int, x: int, y: int, w: int, h: int, fast_upsample: bool = False,
                  fast_dct: bool = False) -> np.ndarray:
    """Decode the region (x, y, w, h), in pixels of the image scaled by 1/``denom``, as stored (no EXIF rotation)
    -> (h, w, 3) uint8 RGB. ``x`` must be a multiple of the scaled MCU width. Call ``read_header`` on the same
    bytes first. ``fast_upsample``/``fast_dct``: libjpeg-turbo's speed flags (off: see the module's docstring).
    Raises ``TurboError`` on any refusal, error or warning."""
    lib, t = _tj()
    if fast_upsample:  # a handle of its own: the library's use-after-free (module docstring)
        t = _renew(lib, data)
    speed = (bool(fast_upsample), bool(fast_dct))
    if _local.handle[2] != speed:  # parameters stay set on a handle: two ctypes calls only when they change
        lib.tj3Set(t, _TJPARAM_FASTUPSAMPLE, int(speed[0]))
        lib.tj3Set(t, _TJPARAM_FASTDCT, int(speed[1]))
        _local.handle[2] = speed
    if lib.tj3SetScalingFactor(t, _Scale(1, denom)) != 0:
        _fail(lib, t, f"scaling factor 1/{denom}")
    if lib.tj3SetCroppingRegion(t, _Region(x, y, w, h)) != 0:
        _fail(lib, t, f"cropping region {(x, y, w, h)} at 1/{denom}")
    out = np.empty((h, w, 3), dtype=np.uint8)
    if lib.tj3Decompress8(t, data, len(data), out.ctypes.data, w * 3, _TJPF_RGB) != 0:
        _fail(lib, t, "decode")
    return out
