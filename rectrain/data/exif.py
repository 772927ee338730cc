"""EXIF orientation: the one rule that the size scan, both decoders, GPU decoding and `rectrain prepare` follow.

A camera stores its pixels as the sensor saw them and writes how to turn them upright into the EXIF tag 0x0112
(orientation 1..8; 5-8 turn by 90 degrees and so swap height and width). The scan decides each image's bucket from
its upright size and the loader draws the crop box on that size, so everything that reads an image must agree on
the orientation, or boxes land in the wrong place. The rule:

- the tag's value 1..8; 1 (as stored) when the tag is absent, out of range or the EXIF block is unreadable (bad
  metadata is not a bad image);
- 1 for a PNG without an eXIf chunk before its pixels: Pillow's PNG ``getexif()`` would decode the whole image to
  look for one after them (~3.5 ms for 500x375 instead of ~0.05), which a header scan cannot afford;
- 1 for a TIFF that Pillow already reports upright (recent Pillow rotates oriented TIFFs on load; told apart from
  older Pillow by the stored width and length tags, 256 and 257).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

__all__ = ["ORIENTATION_TAG", "SWAPS_AXES", "TRANSPOSE", "orientation", "jpeg_orientation", "upright_size",
           "make_upright"]

ORIENTATION_TAG = 0x0112
SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations that turn the image by 90 degrees
TRANSPOSE = {  # orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(im: Image.Image) -> int:
    """How ``im`` (opened, not necessarily loaded) must be turned to be upright: 1..8 by the module's rule."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on every corrupt EXIF block: no floods
            o = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # corrupt EXIF is bad metadata, not a bad image
        return 1
    if not isinstance(o, int) or isinstance(o, bool) or not 1 <= o <= 8:
        return 1
    if im.format == "TIFF" and (im.tag_v2.get(256), im.tag_v2.get(257)) != im.size:
        return 1  # Pillow already shows (and loads) it upright
    return o


def jpeg_orientation(data: bytes) -> int:
    """The orientation of a JPEG given as bytes, by the same rule, cheaply: the markers before the first scan are
    walked (a few µs) and Pillow reads the EXIF (or the XMP, which Pillow also consults) only when an APP1 segment,
    where both live, is among them. Malformed markers go to Pillow too: it decides as for any file."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xE1:
            break
        if marker in (0xDA, 0xD9):  # start of scan (or end of image): no APP1 segment
            return 1
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return orientation(Image.open(io.BytesIO(data)))
    except Exception:  # unreadable header: the decoders decide what the file is
        return 1


def upright_size(im: Image.Image, o: int | None = None) -> tuple[int, int]:
    """(H, W) of ``im`` once turned upright (``o``: its orientation, when already known)."""
    w, h = im.size
    return (w, h) if (orientation(im) if o is None else o) in SWAPS_AXES else (h, w)


def make_upright(im: Image.Image, o: int) -> Image.Image:
    """The loaded image ``im`` of orientation ``o`` turned upright (itself when ``o`` is 1)."""
    return im if o == 1 else im.transpose(TRANSPOSE[o])
