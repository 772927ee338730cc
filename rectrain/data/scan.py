"""Aspect-ratio scan: every image's upright size from its header, bad files found, and the result cached.

This is the seed's ``sort_ar`` / ``sorted_idxar_{split}``, made safe and fast:

- **Header only.** ``PIL.Image.open`` is lazy: it parses the header, not the pixels. The EXIF
  orientation is honoured by the rule every reader shares (``rectrain.data.exif``): orientations 5-8
  turn the image by 90 degrees, so their (H, W) is swapped, as the decoders will show them.
- **Bad files** (empty, truncated, not an image, unsupported format, over ``max_pixels``: a
  "decompression bomb") are recorded by path with a reason and excluded; the scan goes on.
  Truncation is checked cheaply from the file's tail: a JPEG must end with its EOI marker (FF D9,
  trailing zero padding allowed), a PNG with its IEND chunk; the rare file without one is decoded
  (JPEGs at 1/8 scale) to tell a cut file from one with data appended after the marker.
- **Parallel.** Large scans run in a process pool over chunks of files (header parsing is Python
  code, so threads would share one core: see ``benchmarks/bench_scan.py``); small ones run inline.
- **Cache, not a pickle** (loading a pickle runs code): an ``.npz`` read with ``allow_pickle=False``,
  keyed by a fingerprint of the file list (paths, sizes, mtimes), ``max_pixels``, the classes and the
  format version. A changed dataset is rescanned automatically; a corrupt cache is rebuilt. It is
  written beside the data as ``DATA_DIR/sorted_idxar_{split}.npz`` when that folder is writable,
  otherwise under ``cache_dir`` (the run's folder) or the user cache directory. Writes are atomic.

``cache_status`` tells whether a run would find a fresh cache, without scanning (``rectrain check``).
The ``rectrain scan`` report (counts, bad files, the ratio histogram, the bucket table) is
``rectrain.commands.scan``.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from rectrain.data import exif
from rectrain.data.index import FileList, ImageIndex, describe_skipped, list_files, missing_classes, name_some
from rectrain.errors import UserError
from rectrain.runtime.io import atomic_file, pool_map, process_pool, usable_cores, user_cache_dir

__all__ = ["DEFAULT_MAX_PIXELS", "FORMAT_VERSION", "TINY_SIDE", "BadImage", "SplitScan", "CacheStatus", "data_notes",
           "read_size", "read_size_bytes", "scan_folder", "load_folder_scan", "cache_status", "cache_name"]

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb warning limit (~ 13,377 x 13,377)
FORMAT_VERSION = 2  # of the cache file; bump when its contents or the scan's rules change
# Files: below this the scan runs inline. One core reads ~18k headers/s of page-cached ImageNet-sized
# JPEGs; a forked pool starts in milliseconds and already wins at 2,000 files (benchmarks/bench_scan.py).
INLINE_BELOW = 2000
CHUNK = 256  # files per pool task: per-task overhead (~0.1 ms) is then < 1% of the work
_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM"})  # what the decoder supports
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + CRC of the (empty) last chunk
_MAGIC = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}  # to tell a broken image from a non-image
_TAIL = 4096  # bytes read from the end of a file to check its end marker


class BadImage(Exception):
    """A file the training cannot use; the message is the reason (without the path)."""


@dataclass
class SplitScan:
    """The usable images of one split with their upright sizes, and every unusable file with its reason."""

    index: ImageIndex  # usable files only
    sizes: np.ndarray  # (N, 2) int32, (H, W) after EXIF orientation
    bad: list[tuple[str, str]]  # (path relative to split_dir, reason)
    cache_path: str | None  # where the cache was read from or written to; None when nowhere was writable
    from_cache: bool
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. a shard index that was rebuilt, and why
    fingerprint: str = ""  # of the cache it was read from or written to (other ranks load it by path: trainer)


TINY_SIDE = 16  # an image with a side shorter than this carries almost nothing at any crop size (a 1x1 pixel: one
               # colour); trained, but named


def data_notes(train: SplitScan | None, val: SplitScan | None, skipped: bool = True) -> list[str]:
    """What a user should know about the data that is not an error: files left out (named), images too small to
    carry a picture, train classes that val never measures, and top-5 that cannot tell anything (the last two need
    both splits). ``skipped=False``: without the files left out (for a report that lists them itself)."""
    notes = []
    for name, scan in (("train", train), ("val", val)):
        if scan is None:
            continue
        notes += scan.notes
        notes += [f"note: {name}/ skipped {line}" for line in describe_skipped(scan.index) if skipped]
        tiny = np.flatnonzero(scan.sizes.min(axis=1) < TINY_SIDE)
        if len(tiny):
            shown = ", ".join(f"{scan.index.paths[i]} ({scan.sizes[i, 1]}x{scan.sizes[i, 0]})" for i in tiny[:3])
            notes.append(f"warning: {len(tiny):,} {name} image(s) smaller than {TINY_SIDE} px on a side, trained as "
                         f"near-solid crops: {shown}{', ...' if len(tiny) > 3 else ''}; check or remove them")
    if train is None or val is None:
        return notes
    missing = missing_classes(train.index, val.index)
    if missing:
        notes.append(f"warning: {len(missing)} of train's {len(train.index.classes)} classes have no val images "
                     f"({name_some(missing)}): their accuracy is never measured; add val/<class>/ images for them")
    if len(train.index.classes) <= 5:
        notes.append(f"note: with {len(train.index.classes)} classes top-5 accuracy is always 100%: read top-1")
    return notes


# -- one file ---------------------------------------------------------------------------------------
def _check_end(im: Image.Image, f, fmt: str) -> None:
    """Raise BadImage when a JPEG/PNG is truncated.

    Cheap test first: the file's tail must hold the end marker (JPEG EOI, PNG IEND). A file without
    it is usually cut short, but some writers append data after the marker (camera trailers, motion
    photos), so those rare files are decoded to decide: JPEGs at 1/8 scale (~1.5 ms for 500x375), as
    the loader would fail on exactly the same files.
    """
    if fmt not in ("JPEG", "MPO", "PNG"):
        return
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL))
    tail = f.read().rstrip(b"\x00")  # some writers pad files with zeros after the end marker
    if tail.endswith(_PNG_IEND if fmt == "PNG" else _JPEG_EOI):
        return
    try:
        if fmt != "PNG":
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()  # seeks to the pixel data itself
    except Exception as e:  # OSError "image file is truncated", or a decoder error
        what = "PNG (no IEND chunk)" if fmt == "PNG" else "JPEG (no end-of-image marker)"
        raise BadImage(f"truncated {what}: {e}") from e


def _header(f, max_pixels: int) -> tuple[int, int]:
    try:
        im = Image.open(f)
    except Image.DecompressionBombError as e:
        # Pillow's own limit (2 x PIL.Image.MAX_IMAGE_PIXELS): the loader's decoder would refuse it too.
        raise BadImage(f"decompression bomb: {e} (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS)") from e
    except Exception as e:  # UnidentifiedImageError, or a plugin choking on a corrupt header
        f.seek(0)
        magic = f.read(8)
        for fmt, sig in _MAGIC.items():
            if magic.startswith(sig):
                raise BadImage(f"truncated or corrupt {fmt} header ({type(e).__name__}: {e})") from e
        raise BadImage(f"not an image, or a format Pillow cannot read ({type(e).__name__})") from e
    if im.format not in _FORMATS:
        raise BadImage(f"unsupported format {im.format}")
    w, h = im.size
    if w < 1 or h < 1:
        raise BadImage(f"empty image ({w}x{h})")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                       f"(raise --max_pixels to accept it)")
    upright = exif.upright_size(im)  # before _check_end, which may decode a reduced draft of the image
    _check_end(im, f, im.format)
    return upright


def read_size(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Upright (H, W) of an image from its header (no pixel decoding); raises ``BadImage(reason)``."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns per file on odd EXIF/bombs: no floods
            return _header(f, max_pixels)
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from e


def read_size_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``read_size`` of an image given as its encoded bytes (a shard member): the same checks, no file."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _header(io.BytesIO(data), max_pixels)


def _read_chunk(args) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Pool task: (split_dir, relative paths, max_pixels) -> ((n, 2) int32 sizes, [(position, reason)])."""
    split_dir, paths, max_pixels = args
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    bad = []
    for j, rel in enumerate(paths):
        try:
            sizes[j] = read_size(os.path.join(split_dir, rel), max_pixels)
        except BadImage as e:
            bad.append((j, str(e)))
    return sizes, bad


# -- all files --------------------------------------------------------------------------------------
def _read_sizes(index: ImageIndex, max_pixels: int, workers: int | None, progress: bool):
    """-> ((N, 2) int32 sizes, (N,) bool ok, [(i, reason)]) for every file of the index."""
    n = len(index)
    workers = usable_cores() if workers is None else max(1, int(workers))
    chunks = [(index.split_dir, index.paths[s:s + CHUNK].tolist(), max_pixels) for s in range(0, n, CHUNK)]
    sizes = np.zeros((n, 2), dtype=np.int32)
    bad: list[tuple[int, str]] = []
    from tqdm import tqdm
    bar = tqdm(total=n, unit="img", desc=f"scanning {os.path.basename(index.split_dir)}", file=sys.stderr,
               disable=not progress or n < INLINE_BELOW, mininterval=0.5)
    try:
        with process_pool(workers if n >= INLINE_BELOW else 1, len(chunks)) as pool:
            for c, (chunk_sizes, chunk_bad) in enumerate(pool_map(pool, _read_chunk, chunks)):
                sizes[c * CHUNK:c * CHUNK + len(chunk_sizes)] = chunk_sizes
                bad.extend((c * CHUNK + j, reason) for j, reason in chunk_bad)
                bar.update(len(chunk_sizes))
    finally:
        bar.close()
    ok = np.ones(n, dtype=bool)
    ok[[i for i, _ in bad]] = False
    return sizes, ok, bad


# -- cache ------------------------------------------------------------------------------------------
def fingerprint(files: FileList, max_pixels: int) -> str:
    """Hash of what the scan's result depends on: the file list with sizes and mtimes, the limit, the classes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"rectrain-arscan v{FORMAT_VERSION} max_pixels={max_pixels}\n".encode())
    h.update("\n".join(files.index.classes).encode("utf-8", "surrogateescape") + b"\0")
    h.update("\n".join(files.index.paths.tolist()).encode("utf-8", "surrogateescape") + b"\0")
    h.update(files.index.labels.tobytes())
    h.update(files.nbytes.tobytes())
    h.update(files.mtime_ns.tobytes())
    return h.hexdigest()


def cache_name(data_dir: str, split: str, beside_data: bool) -> str:
    """``sorted_idxar_{split}.npz`` beside the data (the seed's name); elsewhere tagged by the data path."""
    if beside_data:
        return f"sorted_idxar_{split}.npz"
    tag = hashlib.blake2b(os.path.abspath(data_dir).encode(), digest_size=6).hexdigest()
    return f"sorted_idxar_{split}_{tag}.npz"


def _dir_writable(path: str) -> bool:
    """Try an actual write: permission bits lie (root ignores them; read-only mounts ignore them)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".rectrain-write-test-", dir=path)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def _cache_candidates(data_dir: str, split: str, cache_dir: str | None) -> list[str]:
    """Cache paths in order of preference: beside the data, the run's folder, the user cache."""
    out = [os.path.join(data_dir, cache_name(data_dir, split, True))]
    for d in ([cache_dir] if cache_dir else []) + [user_cache_dir()]:
        out.append(os.path.join(d, cache_name(data_dir, split, False)))
    return out


def _load_cache(path: str, fp: str, files: FileList) -> tuple[ImageIndex, np.ndarray, list[tuple[str, str]]] | None:
    """The cached scan of ``files`` when ``path`` holds one with fingerprint ``fp``; None if absent, stale or corrupt.

    The fingerprint pins the file list, so the usable samples are the walk's own arrays under the cached
    ``usable`` mask: the cached ``paths`` (UTF-8 bytes, for people and other tools) need no decoding.
    """
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != FORMAT_VERSION or str(z["fingerprint"]) != fp:
                return None
            usable = z["usable"].astype(bool)
            labels = z["labels"].astype(np.int64)
            sizes = z["sizes"].astype(np.int32).reshape(-1, 2)
            bad = list(zip(z["bad_paths"].tolist(), z["bad_reasons"].tolist()))
    except Exception:  # truncated zip, missing key, wrong dtype...: rebuild it
        return None
    if usable.shape != (len(files.index),) or len(sizes) != usable.sum() or len(bad) != (~usable).sum():
        return None
    index = files.index.subset(usable)
    if not np.array_equal(index.labels, labels):
        return None
    return index, sizes, bad


def _write_atomic(path: str, arrays: dict) -> None:
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def _save_cache(candidates: list[str], fp: str, scan: SplitScan, usable: np.ndarray) -> str | None:
    """Write the cache to the first writable candidate folder; its path, or None when none is writable.

    ``usable``: (N_files,) bool over the walked file list. Paths are stored as UTF-8 bytes: a quarter of
    numpy's UTF-32 (ImageNet's train list: ~37 MB instead of ~150 MB).
    """
    paths = np.array([p.encode("utf-8", "surrogateescape") for p in scan.index.paths.tolist()], dtype=bytes)
    arrays = dict(version=np.int64(FORMAT_VERSION), fingerprint=np.str_(fp),
                  classes=np.array(scan.index.classes, dtype=str), usable=usable,
                  paths=paths.reshape(-1), labels=scan.index.labels, sizes=scan.sizes,
                  bad_paths=np.array([p for p, _ in scan.bad], dtype=str).reshape(-1),
                  bad_reasons=np.array([r for _, r in scan.bad], dtype=str).reshape(-1))
    for path in candidates:
        if _dir_writable(os.path.dirname(path)):
            try:
                _write_atomic(path, arrays)
                return path
            except OSError:
                continue  # disk full, a race with a read-only remount...: try the next place
    return None


# -- the scan ---------------------------------------------------------------------------------------
def _fresh_scan(files: FileList, max_pixels: int, workers: int | None, progress: bool):
    sizes, ok, bad = _read_sizes(files.index, max_pixels, workers, progress)
    index = files.index.subset(ok)
    if len(index) == 0:
        raise UserError(f"none of the {len(files.index)} image files in {files.index.split_dir} is usable "
                        f"(first: {files.index.paths[0]}: {bad[0][1]}); check the data")
    return index, sizes[ok], [(str(files.index.paths[i]), reason) for i, reason in bad], ok


def scan_folder(data_dir: str, split: str, classes: list[str] | None = None, *, cache_dir: str | None = None,
                workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False) -> SplitScan:
    """Index the image folder ``data_dir/split``, read every image's upright size (or reuse the cache) and report
    bad files. (``rectrain.data.source.scan_split`` takes tar shards too: callers ask there.)

    ``classes``: train's class map when scanning val (see ``rectrain.data.index.build_index``).
    ``cache_dir``: where to keep the cache when ``data_dir`` is not writable (e.g. the run's folder).
    ``workers``: processes for a fresh scan (None: one per usable core; small scans run inline).
    """
    t0 = time.perf_counter()
    if max_pixels < 1:
        raise UserError(f"--max_pixels must be positive, got {max_pixels}")
    files = list_files(data_dir, split, classes)
    fp = fingerprint(files, max_pixels)
    candidates = _cache_candidates(data_dir, split, cache_dir)
    for path in candidates:
        hit = _load_cache(path, fp, files)
        if hit is not None:
            return SplitScan(*hit, path, True, time.perf_counter() - t0, fingerprint=fp)
    index, sizes, bad, usable = _fresh_scan(files, max_pixels, workers, progress)
    scan = SplitScan(index, sizes, bad, None, False, 0.0, fingerprint=fp)
    scan.cache_path = _save_cache(candidates, fp, scan, usable)
    scan.seconds = time.perf_counter() - t0
    return scan


def load_folder_scan(path: str, fp: str, data_dir: str, split: str, classes: list[str] | None = None) -> SplitScan | None:
    """The scan of an image folder that another process (rank 0) wrote to the cache file ``path`` with fingerprint
    ``fp``, read without listing or stat'ing the dataset; None when the file is not (or no longer) that one. Its
    ``skipped`` counts are not stored: rank 0 reports them."""
    t0 = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != FORMAT_VERSION or str(z["fingerprint"]) != fp:
                return None
            paths = np.char.decode(z["paths"], "utf-8", "surrogateescape") if len(z["paths"]) else \
                np.array([], dtype=str)
            index = ImageIndex(os.path.abspath(os.path.join(data_dir, split)), z["classes"].tolist(), paths,
                               z["labels"].astype(np.int64))
            sizes = z["sizes"].astype(np.int32).reshape(-1, 2)
            bad = list(zip(z["bad_paths"].tolist(), z["bad_reasons"].tolist()))
    except Exception:  # gone, unreadable here (another node's cache folder), truncated: the caller scans
        return None
    return SplitScan(index, sizes, bad, path, True, time.perf_counter() - t0, fingerprint=fp)


@dataclass
class CacheStatus:
    """What a training run would find in the cache, without scanning or writing anything."""

    path: str | None  # the fresh cache; else the first stale one found; None when there is none at all
    fresh: bool  # True: the run reads the cache; False: the run scans every file first
    files: int  # image files of the split now (what a scan would read)
    scan: SplitScan | None  # the cached scan (usable images, sizes, bad files) when fresh


def cache_status(data_dir: str, split: str, classes: list[str] | None = None, *, cache_dir: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, files: FileList | None = None) -> CacheStatus:
    """Is there a cache that ``scan_folder`` (same arguments) would use? Walks the split, reads no image.

    ``files``: the split's ``list_files`` result when the caller has one (saves a second walk).
    A layout problem raises ``UserError`` as ``scan_folder`` would.
    """
    t0 = time.perf_counter()
    files = list_files(data_dir, split, classes) if files is None else files
    fp = fingerprint(files, max_pixels)
    stale = None
    for path in _cache_candidates(data_dir, split, cache_dir):
        hit = _load_cache(path, fp, files)
        if hit is not None:
            return CacheStatus(path, True, len(files.index), SplitScan(*hit, path, True, time.perf_counter() - t0))
        if stale is None and os.path.isfile(path):
            stale = path
    return CacheStatus(stale, False, len(files.index), None)
