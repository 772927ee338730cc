"""GPU JPEG decoding (``--decode gpu``): workers read file bytes, the main process decodes whole batches with nvJPEG.

The CPU path decodes and crops in the DataLoader workers (``rectrain.data.transforms``). Here the work splits:

- **Worker** (``BytesCropTfm``, called like ``RectangularCropTfm``): draws the crop box and flip from the sample's
  rng with ``RectangularCropTfm.box`` -- the very draw of the CPU path, so both paths train on the same crops --
  reads the file's bytes and sniffs its JPEG header (``gpu_refusal``). A file the GPU decoder cannot decode as the
  CPU path would (not a JPEG, CMYK/YCCK, greyscale, RGB-coded, odd chroma sampling, progressive, 12-bit, EXIF
  rotation, a size that differs from the scan, no end marker) is decoded right there by the normal CPU transform
  with the same box and flip, so the main process never retries it.
- ``collate_encoded``: the batch's bytes back to back in one shared-memory tensor, its CPU crops stacked.
- **Main process** (``GpuBatchDecoder``): one batched ``torchvision.io.decode_jpeg(list, device="cuda")``, then
  crop + antialiased resize + flip of the whole batch as two batched matmuls (``resize_crops``): Pillow's bilinear
  filter weights for the exact, sub-pixel box, as the CPU path's ``Image.resize(box=...)``; a flip is the same
  weights in reverse, so it costs nothing. Output: (B, H, W, 3) uint8 on the device, the CPU path's layout;
  ``DeviceNormalize`` takes it as is. If the batched decode raises, images are retried one by one; one that still
  fails is decoded on the CPU (same box), and one the CPU cannot decode either becomes a mean-colour image whose
  path is returned as failed (the CPU path would have replaced it by another image of its bucket). Images decoded
  on the CPU are counted by reason and logged once.

Known pitfalls of torchvision's decoder, handled here:

- It decodes on a private CUDA stream into outputs allocated on the caller's current stream, without ordering
  the two: the caching allocator can hand it a block that kernels queued on the caller's stream still read, and
  nvJPEG's hardware engine overwrites it (pytorch/vision#9606; torchcodec#1634 saw corruption on H100). So the
  decode runs on a stream of its own, synchronised before each batch (it holds only our previous batch's work,
  so the wait is short and the training step keeps running); blocks freed by training kernels belong to the
  main stream's pool and are never handed to it. The main stream then waits for ours (``wait_stream``) and the
  output is marked as used there (``record_stream``).
- One decoder per process: torchvision keeps a single global nvJPEG decoder and rebuilds it whenever the
  ``device`` argument changes (``"cuda"`` vs ``"cuda:0"``), so the device is always passed with its index.
- nvJPEG leaks memory before CUDA 11.6: GPU decoding is unavailable there.
- Baseline JPEGs go to the hardware engine (A100, H100, H200); other JPEGs nvJPEG decodes with its Huffman stage
  on the host, i.e. on the main process's one thread: progressive files are therefore left to the workers.

torchvision is optional: ``resolve_decode`` turns ``auto`` into ``cpu`` without it (or without CUDA) and makes
``gpu`` a ``UserError`` with the fix.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from rectrain.data import exif
from rectrain.data.transforms import ALPHA_BACKGROUND, DecodeError, RectangularCropTfm
from rectrain.errors import UserError

__all__ = ["DECODES", "JpegHeader", "read_jpeg_header", "gpu_refusal", "gpu_decode_problem", "resolve_decode",
           "BytesCropTfm", "Encoded", "EncodedBatch", "collate_encoded", "resize_crops", "pil_decode",
           "GpuBatchDecoder", "decoded", "AUTO_GPU_BELOW_WORKERS"]

DECODES = ("auto", "cpu", "gpu")  # auto: gpu where torchvision can decode JPEGs here and workers are few, else cpu
# ``--decode auto`` picks the GPU only below this many workers per GPU. Measured on an H200 (docs/benchmarks.md,
# 2026-11-27): nvJPEG decodes a batch in the main process in series with the step, ~30 ms per 256 images, so a
# 55 ms ResNet-50 step trains at ~3,000 images/s with it, while each CPU worker decodes and crops ~500 images/s in
# parallel with the step (16 workers: 3,750 against 2,608 images/s in training). Six workers already match it.
AUTO_GPU_BELOW_WORKERS = 6
MIN_CUDA = (11, 6)  # nvJPEG leaks memory before CUDA 11.6 (pytorch/vision#4378, #5482)
# Pixels (N x H x W of the padded crop windows) resized in one batched matmul: a float32 buffer of 3 x 4 bytes
# each, ~400 MB. A batch of 256 ImageNet crops takes one or two chunks; a huge image takes a chunk of its own.
CHUNK_PIXELS = 1 << 25
FILL = torch.tensor(ALPHA_BACKGROUND, dtype=torch.uint8)  # an image no decoder could read: "no signal"

# -- the JPEG header ---------------------------------------------------------------------------------------
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (C4 DHT, C8 JPG, CC DAC)
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}  # markers without a length: RSTn, TEM, SOI
# Luma (h, v) sampling with 1x1 chroma that nvJPEG names (4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, 4:1:0); any other
# makes it fail with "Unknown chroma subsampling", and the whole batch with it.
_GPU_SAMPLING = frozenset({(1, 1), (2, 1), (2, 2), (1, 2), (4, 1), (4, 2)})


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers up to the first scan say about how it must be decoded."""

    sof: int                                       # frame marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive...
    precision: int                                 # bits per sample (8, or 12)
    height: int                                    # as stored, before EXIF orientation
    width: int
    components: tuple[tuple[int, int, int], ...]   # (id, h sampling, v sampling) per component
    jfif: bool                                     # an APP0 JFIF marker: 3 components are YCbCr
    adobe_transform: int | None                    # APP14 Adobe: 0 RGB (or CMYK), 1 YCbCr, 2 YCCK
    has_app1: bool                                 # EXIF or XMP present: the orientation needs a look
    mpo: bool                                      # APP2 "MPF": a multi-picture file


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk the markers of ``data`` up to the first scan (SOS); None when it is not a readable JPEG header."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    frame, jfif, adobe, app1, mpo = None, False, None, False, False
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF or marker in _STANDALONE:  # fill byte, or a marker without a segment
            i += 1 if marker == 0xFF else 2
            continue
        end = i + 2 + ((data[i + 2] << 8) | data[i + 3])  # the length counts itself, not the marker
        if end <= i + 3 or end > n:
            return None
        seg = data[i + 4:end]
        if marker == 0xDA:  # start of scan: the header is over
            return _header(frame, jfif, adobe, app1, mpo)
        if marker in _SOF and frame is None:
            frame = (marker, seg)
        elif marker == 0xE0 and seg[:5] == b"JFIF\0":
            jfif = True
        elif marker == 0xE1:
            app1 = True
        elif marker == 0xE2 and seg[:4] == b"MPF\0":
            mpo = True
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        i = end
    return None


def _header(frame, jfif, adobe, app1, mpo) -> JpegHeader | None:
    """The SOF segment: precision (1 byte), height, width (2 each), count, then (id, h << 4 | v, table) each."""
    if frame is None:
        return None
    marker, seg = frame
    if len(seg) < 6 or len(seg) < 6 + 3 * seg[5]:
        return None
    comps = tuple((seg[6 + 3 * c], seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15) for c in range(seg[5]))
    return JpegHeader(sof=marker, precision=seg[0], height=(seg[1] << 8) | seg[2], width=(seg[3] << 8) | seg[4],
                      components=comps, jfif=jfif, adobe_transform=adobe, has_app1=app1, mpo=mpo)


def _orientation(data: bytes) -> int | None:
    """EXIF orientation by the rule the CPU path follows (``rectrain.data.exif``); None when Pillow cannot open the
    header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return exif.orientation(Image.open(io.BytesIO(data)))
    except Exception:
        return None


def gpu_refusal(data: bytes, size_hw) -> str | None:
    """None when nvJPEG decodes ``data`` to the pixels the CPU path would, else the reason it goes to the CPU.

    ``size_hw``: the upright (H, W) from the scan. Reasons are short and fixed (they are counted).
    """
    if data[:3] != b"\xff\xd8\xff":
        return "not a JPEG"
    if data[-2:] != b"\xff\xd9":  # truncated (the CPU path raises) or data after the end marker
        return "no end-of-image marker at the end"
    h = read_jpeg_header(data)
    if h is None:
        return "unreadable JPEG header"
    problem = _frame_problem(h) or _colour_problem(h)
    if problem:
        return problem
    if h.has_app1:
        o = _orientation(data)
        if o is None:
            return "unreadable JPEG header"
        if o != 1:
            return "EXIF rotation"  # nvJPEG decodes as stored
    if (h.height, h.width) != (int(size_hw[0]), int(size_hw[1])):
        return "size differs from the scan"  # a stale cache; the CPU path maps the box by fractions
    return None


def _frame_problem(h: JpegHeader) -> str | None:
    if h.sof == 0xC2:
        return "progressive JPEG"  # nvJPEG's host Huffman stage would run on the main process's thread
    if h.sof != 0xC0:
        return f"SOF{h.sof - 0xC0} JPEG (not baseline)"  # extended, lossless, arithmetic, hierarchical
    if h.precision != 8:
        return f"{h.precision}-bit JPEG"
    if h.mpo:
        return "multi-picture (MPO) JPEG"
    return None


def _colour_problem(h: JpegHeader) -> str | None:
    """libjpeg's colour rules (jdapimin.c): 4 components are CMYK/YCCK; 3 are RGB with an Adobe transform 0, or
    ids 'R','G','B' without JFIF/Adobe markers; else YCbCr, the only case nvJPEG converts as libjpeg does."""
    if len(h.components) == 1:
        return "greyscale JPEG"
    if len(h.components) != 3:
        return "CMYK/YCCK JPEG" if len(h.components) == 4 else f"{len(h.components)}-component JPEG"
    if not h.jfif and (h.adobe_transform == 0 or (h.adobe_transform is None and
                                                  tuple(c[0] for c in h.components) == (82, 71, 66))):
        return "RGB-coded JPEG"
    luma, *chroma = ((c[1], c[2]) for c in h.components)
    if luma not in _GPU_SAMPLING or any(c != (1, 1) for c in chroma):
        return "unusual chroma subsampling"
    return None


# -- which decoder ------------------------------------------------------------------------------------------
def gpu_decode_problem(device) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` with torchvision, or None when they can (as far as can be told
    without decoding: ``GpuBatchDecoder`` tries one image at start-up)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    version = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if version < MIN_CUDA:
        return f"this torch uses CUDA {torch.version.cuda}, whose nvJPEG leaks memory (11.6 or newer is needed)"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built for another torch
        return f"torchvision cannot be imported ({type(e).__name__}: {str(e)[:200]})"
    return None


def resolve_decode(decode: str, device, workers: int | None = None) -> str:
    """``--decode`` -> "cpu" or "gpu". auto: gpu where it is available and ``workers`` (per GPU) are fewer than
    ``AUTO_GPU_BELOW_WORKERS``, else cpu; gpu where it is not available: UserError."""
    if decode not in DECODES:
        raise UserError(f"--decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode == "cpu" or (decode == "auto" and workers is not None and workers >= AUTO_GPU_BELOW_WORKERS):
        return "cpu"
    problem = gpu_decode_problem(device)
    if problem is None:
        return "gpu"
    if decode == "gpu":
        raise UserError(f"--decode gpu cannot be used: {problem}. Install torchvision with CUDA (the build matching "
                        "your torch) or use --decode cpu")
    return "cpu"


# -- worker side --------------------------------------------------------------------------------------------
class _GivenBox(RectangularCropTfm):
    """The CPU path's own decode, crop, resize and flip, for a box and flip chosen before (single-threaded use)."""

    def __init__(self, decoder: str):
        super().__init__(train=False, decoder=decoder)
        self._geometry = None

    def box(self, size_hw, out_hw, rng=None):
        return self._geometry

    def decode_box(self, src, out_hw, size_hw, box, flip: bool, name: str | None = None) -> np.ndarray:
        """-> (H, W, 3) uint8, pixel for pixel what ``RectangularCropTfm`` gives when its rng draws this box.
        ``src``: a path or the encoded bytes (``name`` names them in errors)."""
        self._geometry = (tuple(box), bool(flip))
        return self(src, out_hw, size_hw=size_hw, name=name)


@dataclass
class Encoded:
    """One image as a worker hands it on: the file's bytes for the GPU, or its crop already decoded on the CPU."""

    path: str
    out_hw: tuple[int, int]
    size_hw: tuple[int, int] | None          # upright (H, W) from the scan
    box: tuple[float, float, float, float] | None  # (x0, y0, x1, y1) in scanned pixels
    flip: bool
    data: np.ndarray | None = None           # (n,) uint8 file bytes, for the GPU
    image: np.ndarray | None = None          # (H, W, 3) uint8, decoded on the CPU
    reason: str | None = None                # why it was decoded on the CPU


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from None


class BytesCropTfm:
    """Worker transform of ``--decode gpu``: same call as ``RectangularCropTfm``, returns an ``Encoded``.

    The crop box and flip come from ``cpu_tfm.box`` with the caller's rng (the CPU path's draw, so the rng also
    ends in the same state and ``BucketDataset``'s replacement draws stay the same). Files the GPU cannot take
    are decoded here by ``cpu_tfm``'s decoder with that box; ``DecodeError`` propagates as on the CPU path.
    """

    def __init__(self, cpu_tfm: RectangularCropTfm):
        self.cpu_tfm = cpu_tfm
        self._cpu = _GivenBox(cpu_tfm.decoder)

    def __call__(self, src, out_hw, rng: np.random.Generator | None = None, size_hw=None,
                 name: str | None = None) -> Encoded:
        """``src``: a file path, or the file's encoded bytes (a shard member) that ``name`` names."""
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        path = name or src
        if size_hw is None:  # no scanned size: the CPU path as is (the box needs the size)
            return Encoded(path, out_hw, None, None, False, image=self.cpu_tfm(src, out_hw, rng, name=name),
                           reason="no scanned size")
        size_hw = (int(size_hw[0]), int(size_hw[1]))
        box, flip = self.cpu_tfm.box(size_hw, out_hw, rng)
        data = _read_bytes(src) if isinstance(src, str) else bytes(src)
        reason = gpu_refusal(data, size_hw)
        if reason is None:
            return Encoded(path, out_hw, size_hw, tuple(box), flip, data=np.frombuffer(data, np.uint8))
        image = self._cpu.decode_box(data, out_hw, size_hw, box, flip, name=path)
        return Encoded(path, out_hw, size_hw, tuple(box), flip, image=image, reason=reason)

    def __repr__(self) -> str:
        return f"BytesCropTfm({self.cpu_tfm!r})"


@dataclass
class EncodedBatch:
    """A batch of ``Encoded`` images: GPU images' bytes back to back, CPU-decoded crops stacked."""

    out_hw: tuple[int, int]
    size: int                        # B, images in the batch
    data: torch.Tensor               # (total,) uint8: the GPU images' file bytes
    ends: list[int]                  # end offset in ``data`` of each GPU image
    gpu_pos: list[int]               # batch positions of the GPU images
    boxes: list[tuple]               # per GPU image: (x0, y0, x1, y1) in scanned pixels
    flips: list[bool]
    sizes: list[tuple[int, int]]     # per GPU image: scanned upright (H, W)
    paths: list[str]
    cpu_pos: list[int]               # batch positions of the images decoded in the worker
    cpu_images: torch.Tensor         # (len(cpu_pos), H, W, 3) uint8
    cpu_reasons: list[tuple[str, str]]  # (path, reason) per CPU image

    def __len__(self) -> int:
        return self.size

    def encoded(self) -> list[torch.Tensor]:
        """Each GPU image's bytes: (n,) uint8 CPU views into ``data``, as ``decode_jpeg`` takes them."""
        starts = [0, *self.ends[:-1]]
        return [self.data[s:e] for s, e in zip(starts, self.ends)]

    def pin_memory(self, device=None) -> "EncodedBatch":
        """For the DataLoader's ``pin_memory``: the CPU crops are copied to the device; the bytes are read by
        nvJPEG on the host and need no pinning."""
        if not self.cpu_pos:
            return self
        return replace(self, cpu_images=self.cpu_images.pin_memory())


def _host_empty(shape) -> torch.Tensor:
    """uint8 tensor; in a worker, in shared memory directly (as ``rectrain.data.loader.collate``): no second copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(max(1, int(np.prod(shape))))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, tuple(shape))


def collate_encoded(items):
    """(Encoded, label, failed paths) items -> (EncodedBatch, (B,) int64 labels, failed paths): ``collate``'s shape."""
    encs = [it[0] for it in items]
    out_hw = encs[0].out_hw
    gpu = [i for i, e in enumerate(encs) if e.image is None]
    cpu = [i for i, e in enumerate(encs) if e.image is not None]
    ends = np.cumsum([len(encs[i].data) for i in gpu]).tolist()
    data = _host_empty((ends[-1] if ends else 0,))
    if gpu:
        np.concatenate([encs[i].data for i in gpu], out=data.numpy())
    cpu_images = _host_empty((len(cpu), *out_hw, 3))
    if cpu:
        np.stack([encs[i].image for i in cpu], out=cpu_images.numpy())
    batch = EncodedBatch(out_hw=out_hw, size=len(encs), data=data, ends=ends, gpu_pos=gpu,
                         boxes=[encs[i].box for i in gpu], flips=[encs[i].flip for i in gpu],
                         sizes=[encs[i].size_hw for i in gpu], paths=[encs[i].path for i in gpu],
                         cpu_pos=cpu, cpu_images=cpu_images, cpu_reasons=[(encs[i].path, encs[i].reason) for i in cpu])
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return batch, labels, [f for it in items for f in it[2]]


# -- crop + resize + flip on the device ---------------------------------------------------------------------
def _window(lo: float, hi: float, size: int, out: int) -> tuple[int, int]:
    """[start, end) of the input pixels that the bilinear filter of box edges [lo, hi) reads (support: 1 output
    pixel's width, at least 1 input pixel, as Pillow's), clipped to the image."""
    support = max((hi - lo) / out, 1.0)
    start = max(0, int(math.floor(lo - support)))
    return start, max(start + 1, min(size, int(math.ceil(hi + support))))


def _filter_weights(lo: torch.Tensor, hi: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int,
                    flip: torch.Tensor | None = None) -> torch.Tensor:
    """(N, size_out, size_in) float32: Pillow's antialiased bilinear resampling of box [lo, hi) (N,) along one
    axis (libImaging/Resample.c, precompute_coeffs), as weights over window pixels 0..size_in-1 (padding beyond
    ``length`` weighs 0). ``flip`` (N,) bool reverses the output order: a mirrored image at no cost."""
    scale = (hi - lo) / size_out                                        # input pixels per output pixel
    filterscale = scale.clamp(min=1.0)                                  # > 1: the filter widens (antialias)
    j = torch.arange(size_out, device=lo.device, dtype=torch.float32).expand(len(lo), size_out)
    if flip is not None:
        j = torch.where(flip[:, None], size_out - 1 - j, j)
    center = lo[:, None] + (j + 0.5) * scale[:, None]                  # (N, out) in input pixels
    x = torch.arange(size_in, device=lo.device, dtype=torch.float32)  # window pixel x covers [x, x + 1)
    w = (1 - ((x + 0.5) - center[:, :, None]).abs() / filterscale[:, None, None]).clamp_(min=0)
    w = w * (x < length[:, None, None])                                 # outside the image: nothing
    return w / w.sum(-1, keepdim=True).clamp_(min=1e-12)


def _resize_chunk(images, windows, rel_boxes, flips, out_hw, device) -> torch.Tensor:
    """One padded batch: (N, H, W, 3) uint8. ``windows``: (y0, y1, x0, x1) per image; ``rel_boxes``: boxes
    relative to their window."""
    oh, ow = out_hw
    hmax = max(y1 - y0 for y0, y1, _, _ in windows)
    wmax = max(x1 - x0 for _, _, x0, x1 in windows)
    buf = torch.zeros((len(images), 3, hmax, wmax), dtype=torch.float32, device=device)  # zeros: 0 * NaN is NaN
    for k, (img, (y0, y1, x0, x1)) in enumerate(zip(images, windows)):
        buf[k, :, :y1 - y0, :x1 - x0] = img[:, y0:y1, x0:x1]           # one kernel: crop, cast
    geo = torch.tensor([[bx0, bx1, by0, by1, x1 - x0, y1 - y0] for (bx0, by0, bx1, by1), (y0, y1, x0, x1)
                        in zip(rel_boxes, windows)], dtype=torch.float32).to(device, non_blocking=True)
    flip = torch.tensor(flips, dtype=torch.bool).to(device, non_blocking=True)
    wx = _filter_weights(geo[:, 0], geo[:, 1], geo[:, 4], wmax, ow, flip)    # (N, ow, wmax)
    wy = _filter_weights(geo[:, 2], geo[:, 3], geo[:, 5], hmax, oh)          # (N, oh, hmax)
    n = len(images)
    t = torch.bmm(buf.view(n, 3 * hmax, wmax), wx.transpose(1, 2))            # (N, 3 * hmax, ow): horizontal
    t = t.view(n, 3, hmax, ow).transpose(1, 2).reshape(n, hmax, 3 * ow)
    out = torch.bmm(wy, t).view(n, oh, 3, ow).transpose(2, 3)                # (N, oh, ow, 3): vertical
    return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)           # round half up, as Pillow


def _chunks(areas: list[int], heights: list[int], widths: list[int], max_pixels: int) -> list[list[int]]:
    """Group images (largest first) so that each group's padded size n x max(h) x max(w) stays <= max_pixels."""
    order = sorted(range(len(areas)), key=lambda k: -areas[k])
    groups, cur, hm, wm = [], [], 0, 0
    for k in order:
        h2, w2 = max(hm, heights[k]), max(wm, widths[k])
        if cur and (len(cur) + 1) * h2 * w2 > max_pixels:
            groups.append(cur)
            cur, h2, w2 = [], heights[k], widths[k]
        cur.append(k)
        hm, wm = h2, w2
    return groups + [cur] if cur else groups


def resize_crops(images: list[torch.Tensor], boxes, flips, out_hw, max_pixels: int = CHUNK_PIXELS) -> torch.Tensor:
    """(3, h, w) uint8 images (one device) -> (N, H, W, 3) uint8: box (x0, y0, x1, y1) of each, in its pixels,
    resized to ``out_hw`` with Pillow's antialiased bilinear filter, mirrored where ``flips``.

    Matches ``PIL.Image.resize(out, BILINEAR, box=box)`` to within 1 grey level (Pillow rounds to 8 bits between
    its two passes; here the passes stay in float32: TF32 matmuls, if enabled, add < 0.5 level).
    """
    oh, ow = int(out_hw[0]), int(out_hw[1])
    device = images[0].device
    out = torch.empty((len(images), oh, ow, 3), dtype=torch.uint8, device=device)
    windows, rel = [], []
    for img, (x0, y0, x1, y1) in zip(images, boxes):
        wy0, wy1 = _window(y0, y1, img.shape[1], oh)
        wx0, wx1 = _window(x0, x1, img.shape[2], ow)
        windows.append((wy0, wy1, wx0, wx1))
        rel.append((x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0))
    heights = [w[1] - w[0] for w in windows]
    widths = [w[3] - w[2] for w in windows]
    for group in _chunks([h * w for h, w in zip(heights, widths)], heights, widths, max_pixels):
        res = _resize_chunk([images[k] for k in group], [windows[k] for k in group], [rel[k] for k in group],
                            [bool(flips[k]) for k in group], (oh, ow), device)
        out[torch.tensor(group, device=device)] = res
    return out


# -- main process -------------------------------------------------------------------------------------------
def pil_decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """A CPU stand-in for nvJPEG with its contract (bytes -> (3, H, W) uint8 as stored, no EXIF rotation; raises
    when a file cannot be decoded): tests and benchmarks run the whole batch pipeline with it."""
    out = []
    for d in datas:
        with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1))
    return out


def _nvjpeg(device: torch.device):
    """torchvision's batched nvJPEG decode on ``device`` (with its index: one decoder per process)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return decode


def _probe(decode_fn, device: torch.device) -> None:
    """Decode one small JPEG at start-up: a torchvision built without nvJPEG fails here, with the fix, not mid-run."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
    try:
        decode_fn([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:
        raise UserError(f"--decode gpu: torchvision cannot decode JPEGs on {device} ({type(e).__name__}: "
                        f"{str(e)[:200]}). Install torchvision built with CUDA (nvJPEG) or use --decode cpu") from None


class GpuBatchDecoder:
    """``EncodedBatch`` -> ((B, H, W, 3) uint8 on ``device``, paths that could not be decoded at all).

    ``decode_fn``: list of (n,) uint8 CPU tensors -> list of (3, h, w) uint8 tensors on ``device``; default
    torchvision's nvJPEG (checked on one image here). ``cpu_decoder``: the CPU path's ``--decoder``, for images
    the GPU decoder fails on. ``log``: called once, at the first image decoded on the CPU; ``counts`` and
    ``summary()`` tell how many went where.
    """

    def __init__(self, device, decode_fn=None, cpu_decoder: str = "auto", log=print,
                 max_pixels: int = CHUNK_PIXELS):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if decode_fn is None:
            problem = gpu_decode_problem(device)
            if problem:
                raise UserError(f"--decode gpu cannot be used: {problem}. Install torchvision with CUDA (the build "
                                "matching your torch) or use --decode cpu")
            decode_fn = _nvjpeg(device)
            _probe(decode_fn, device)
        self.decode_fn = decode_fn
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.cpu = _GivenBox(cpu_decoder)
        self.log = log
        self.max_pixels = max_pixels
        self.gpu_images = 0
        self.counts: Counter[str] = Counter()  # images decoded on the CPU, by reason
        self._logged = False

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[str]]:
        if self.stream is None:
            return self._decode(batch)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # Only our previous batch's kernels are queued here: nvJPEG may then take any block of this
            # stream's pool (pytorch/vision#9606). torchvision returns after its own stream finished and makes
            # ours wait for it.
            self.stream.synchronize()
            images, failed = self._decode(batch)
        main.wait_stream(self.stream)  # the step's kernels run after the crops, without a host wait
        images.record_stream(main)     # allocated on our stream, used on the main one
        return images, failed

    def _decode(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[str]]:
        oh, ow = batch.out_hw
        out = torch.empty((batch.size, oh, ow, 3), dtype=torch.uint8, device=self.device)
        for path, reason in batch.cpu_reasons:
            self._count(reason, path)
        if batch.cpu_pos:
            out[torch.tensor(batch.cpu_pos, device=self.device)] = batch.cpu_images.to(self.device, non_blocking=True)
        failed: list[str] = []
        if batch.gpu_pos:
            self._decode_gpu(batch, out, failed)
        return out, failed

    def _decode_gpu(self, batch: EncodedBatch, out: torch.Tensor, failed: list[str]) -> None:
        decoded = self._decode_each(batch.encoded())
        ok = []
        for k, img in enumerate(decoded):
            if isinstance(img, torch.Tensor) and tuple(img.shape) == (3, *batch.sizes[k]):
                ok.append(k)
            else:  # raised alone, or an unexpected shape: the CPU path's decode of the same box
                why = f"{type(img).__name__}: {img}" if isinstance(img, Exception) else f"shape {tuple(img.shape)}"
                self._count("GPU decode failed", batch.paths[k], why)
                out[batch.gpu_pos[k]] = self._cpu_crop(batch, k, failed)
        if ok:
            crops = resize_crops([decoded[k] for k in ok], [batch.boxes[k] for k in ok],
                                 [batch.flips[k] for k in ok], batch.out_hw, self.max_pixels)
            out[torch.tensor([batch.gpu_pos[k] for k in ok], device=self.device)] = crops
        self.gpu_images += len(ok)

    def _decode_each(self, datas: list[torch.Tensor]) -> list:
        """The batched decode; when it raises (nvJPEG fails a whole batch for one bad image), one by one:
        a tensor per image, or the exception that image raised."""
        try:
            return list(self.decode_fn(datas))
        except torch.cuda.OutOfMemoryError:  # not a decoding problem
            raise
        except Exception:
            pass
        results = []
        for d in datas:
            try:
                results.append(self.decode_fn([d])[0])
            except torch.cuda.OutOfMemoryError:  # not a decoding problem
                raise
            except Exception as e:
                results.append(e)
        return results

    def _cpu_crop(self, batch: EncodedBatch, k: int, failed: list[str]) -> torch.Tensor:
        """(H, W, 3) uint8 on the device: GPU image ``k`` decoded on the CPU; the mean colour if that fails too."""
        try:  # the bytes the worker read: a shard member has no path of its own to read again
            data = batch.encoded()[k].numpy().tobytes()
            img = self.cpu.decode_box(data, batch.out_hw, batch.sizes[k], batch.boxes[k], batch.flips[k],
                                      name=batch.paths[k])
            return torch.from_numpy(img).to(self.device)
        except DecodeError as e:
            failed.append(str(e))
            return FILL.to(self.device).expand(*batch.out_hw, 3)

    def _count(self, reason: str, path: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if not self._logged:
            self._logged = True
            self.log(f"note: {path}: {reason}{' (' + detail[:200] + ')' if detail else ''}; images the GPU decoder "
                     "cannot take are decoded on the CPU with the same crop (counted; this note is shown once)")

    def summary(self) -> str:
        """e.g. 'decoded 12,345 images on the GPU, 21 on the CPU (progressive JPEG 18, CMYK/YCCK JPEG 3)'."""
        cpu = sum(self.counts.values())
        why = ", ".join(f"{r} {n:,}" for r, n in self.counts.most_common())
        return f"decoded {self.gpu_images:,} images on the GPU, {cpu:,} on the CPU" + (f" ({why})" if why else "")

    def __repr__(self) -> str:
        return f"GpuBatchDecoder(device={self.device})"


def decoded(batches, decoder: GpuBatchDecoder):
    """(EncodedBatch, labels, failed) batches -> (images on the device, labels, failed): the CPU path's batches."""
    for batch, labels, failed in batches:
        images, lost = decoder(batch)
        yield images, labels, failed + lost
