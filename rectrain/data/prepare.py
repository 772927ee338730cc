"""`rectrain prepare`: a downscaled copy of an image folder, so that every epoch decodes fewer pixels.

``OUT/{train,val}/<class>/<same relative paths>``: the same layout, class folders (empty ones too, so
the class map and its labels are unchanged) and file names as ``DATA_DIR``, so ``rectrain train
--data_dir OUT`` just works. This is what fast.ai's DAWNBench runs (pre-resized copies) and FFCV
(images capped at ~500 px) do: decoding is most of a loader's cost and scales with the pixels stored.

Per image (the decisions of the training decoder, ``rectrain.data.transforms.open_rgb``):

- shorter side above ``short_side``: resized so the shorter side is ``short_side``, the ratio kept (the
  longer side rounded). A JPEG is decoded at a reduced DCT scale that still leaves at least twice the
  output size (Pillow's ``thumbnail`` rule, ``reducing_gap=2``), then resized with LANCZOS.
- EXIF orientation is applied (the rule every reader shares, ``rectrain.data.exif``): written upright, with no EXIF (so no orientation tag) or ICC profile;
  CMYK, greyscale, palette, alpha and 16-bit images become 8-bit RGB exactly as the training decoder
  makes them (``to_rgb``: alpha over the ImageNet mean colour).
- small enough already: a JPEG in RGB with no rotation is copied byte for byte (after a test decode);
  anything else is re-encoded.
- Every file written is a JPEG (quality ``--quality``), **under its original name**: ``x.png`` holds
  JPEG data. Decoders (Pillow, OpenCV, the scan) read the content, not the extension, and keeping names
  keeps relative paths, sorted order and class counts identical (renaming could collide: a.png, a.jpg).
- Bad files (empty, truncated, not an image, undecodable; the scan's own checks, ``rectrain.data.scan``) get
  no output; they are listed in ``OUT/prepare_bad_files.txt`` (``path<TAB>reason``, paths relative to
  ``DATA_DIR``) and printed by the command (``rectrain.commands.prepare``).
- Only the image files that the training index sees are copied: other files in class folders, hidden
  files, files beside the class folders and anything at the top of ``DATA_DIR`` (e.g. the scan cache
  ``sorted_idxar_*.npz``) are not. ``DATA_DIR`` is only read.

Resumable: each output is written to a hidden temporary file in its own folder and renamed into place
(``rectrain.runtime.io.atomic_file``), so an output that exists is complete; a rerun skips it (and redoes an
empty one, which only an OS crash can leave: see ``_write_output``) and removes the temporary files a killed
run left.
``OUT/prepare.json`` records ``--short_side`` and ``--quality``, and a rerun with other values is refused
(a half-done copy would otherwise mix two sizes).

Choosing ``short_side``: decoding gets cheaper with fewer stored pixels, but a random-resized crop whose
area fraction of the image is below ``(target_size / short_side) ** 2`` is then upsampled (it has fewer
than one stored pixel per output pixel). With the default crop scale (0.08, 1): short side 160 at target
128 upsamples crops below 0.64 of the area (61% of them), 256 at 128 below 0.25 (18%), 256 at 224 below
0.77 (75%), ImageNet's typical 375 at 224 below 0.36 (30%). fast.ai's DAWNBench scripts read 160 and 320 px
copies (``imagenet-sz/160``, ``imagenet-sz/320``) in their lower-resolution phases.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import time
import warnings
from dataclasses import dataclass

from PIL import Image

from rectrain.data import exif
from rectrain.data.index import list_files
from rectrain.data.scan import BadImage, read_size
from rectrain.data.transforms import DecodeError, open_rgb
from rectrain.errors import UserError
from rectrain.runtime.io import atomic_write, pool_map, process_pool, remove_temporaries, usable_cores

__all__ = ["DEFAULT_QUALITY", "MIN_SHORT_SIDE", "BAD_FILES", "SETTINGS", "Result", "WriteError",
           "output_size", "prepare_one", "prepare_dataset", "remove_stale_temps"]

SPLITS = ("train", "val")
# The quality ffcv-imagenet's README writes ImageNet with (`write_imagenet.sh 500 0.50 90`). ImageNet's own
# JPEGs are mostly quality ~90-96, so a second pass at 90 adds artefacts far below what crops and augmentations
# change, while file size (and with it read and entropy-decoding time) grows quickly above 90.
DEFAULT_QUALITY = 90
MIN_SHORT_SIDE = 32
REDUCING_GAP = 2  # decode JPEGs at a DCT scale that keeps >= 2x the output size, then LANCZOS (Pillow's thumbnail)
BAD_FILES = "prepare_bad_files.txt"
SETTINGS = "prepare.json"
LEGACY_TMP_SUFFIX = ".prepare-tmp"  # temporary outputs of rectrain before 0.2 (now ``rectrain.runtime.io``'s)
CHUNK = 32  # files per pool task, at most: ~5 ms each for ImageNet-sized JPEGs, so ~0.2 s per task
_BYTE_COPY_FORMATS = ("JPEG", "MPO")  # MPO: camera JPEGs with extra frames; the first frame is the JPEG


@dataclass
class Result:
    """What happened to one file: ``kind`` is resized, copied, reencoded or bad (then ``reason``)."""

    rel: str  # path relative to DATA_DIR, e.g. "train/n01440764/x.JPEG"
    kind: str
    reason: str = ""
    bytes_in: int = 0
    bytes_out: int = 0


class WriteError(Exception):
    """Writing an output failed (disk full, permissions): the run stops; a source file is not to blame."""


# -- one file ---------------------------------------------------------------------------------------
def output_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """(W, H) with the shorter side ``short_side`` and W/H kept (the longer side rounded); unchanged when
    the shorter side is ``short_side`` or less. Pure."""
    if min(w, h) <= short_side:
        return w, h
    k = short_side / min(w, h)
    return (short_side, max(1, round(h * k))) if w <= h else (max(1, round(w * k)), short_side)


def _is_upright_rgb_jpeg(path: str) -> bool:
    """True when the file's bytes can be used as they are: a JPEG (or MPO), RGB, upright (EXIF orientation 1 by
    the rule the training decoder follows, so the copy trains exactly as the original)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns per file on odd EXIF (when it opens one): no floods
        with Image.open(path) as im:
            if im.format not in _BYTE_COPY_FORMATS or im.mode != "RGB":
                return False
            return exif.orientation(im) == 1


def _decode(src: str, short_side: int) -> tuple[Image.Image | None, bool, str]:
    """-> (upright RGB image to write, or None to copy the bytes; resized?; the reason when the file is bad).

    The read phase: every failure here is the source file's fault (BadImage/DecodeError -> a reason)."""
    try:
        h, w = read_size(src)  # the scan's checks: empty, not an image, truncated, bomb
        out_w, out_h = output_size(w, h, short_side)
        if (out_w, out_h) == (w, h):
            if _is_upright_rgb_jpeg(src):
                open_rgb(src, (1, 1))  # test decode at 1/8 scale: all entropy-coded data is still read
                return None, False, ""
            return open_rgb(src), False, ""
        im = open_rgb(src, (REDUCING_GAP * out_w, REDUCING_GAP * out_h))
        return im.resize((out_w, out_h), Image.Resampling.LANCZOS), True, ""
    except BadImage as e:
        return None, False, str(e)
    except DecodeError as e:  # "cannot decode {src}: ...": the path is listed beside the reason anyway
        return None, False, str(e).replace(f"cannot decode {src}: ", "cannot decode: ")
    except OSError as e:  # e.g. the file vanished between two reads
        return None, False, f"cannot read: {e.strerror or e}"


def _write_output(dst: str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``dst`` atomically (``rectrain.runtime.io``); ``WriteError`` on failure.

    ``fsync``: also flush it to disk first. Not per image: it cost ~3 ms per file here (40% of the run,
    and fsyncs serialise on the journal), and a kill (Ctrl-C, SIGKILL, preemption) loses nothing that was
    renamed, since the page cache survives the process. A power loss can, on ext4/XFS, leave recent
    renamed files empty: ``_plan`` redoes zero-length outputs."""
    try:
        atomic_write(dst, data, fsync=fsync)
    except OSError as e:
        raise WriteError(f"cannot write {dst}: {e.strerror or e}") from e


def prepare_one(src: str, dst: str, rel: str, short_side: int, quality: int) -> Result:
    """Prepare one file ``src`` -> ``dst`` (whose folder exists). Raises ``WriteError`` only for the output."""
    im, resized, reason = _decode(src, short_side)
    if reason:
        return Result(rel, "bad", reason)
    try:
        bytes_in = os.path.getsize(src)
        if im is None:
            with open(src, "rb") as f:
                data = f.read()
    except OSError as e:  # the file went away after the decode
        return Result(rel, "bad", f"cannot read: {e.strerror or e}")
    if im is not None:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)  # baseline, 4:2:0; no EXIF or ICC profile is written
        data = buf.getvalue()
    _write_output(dst, data)
    kind = "copied" if im is None else "resized" if resized else "reencoded"
    return Result(rel, kind, bytes_in=bytes_in, bytes_out=len(data))


def _run_chunk(args) -> list[Result]:
    """Pool task: (jobs [(src, dst, rel)], short_side, quality) -> one Result per job, in order."""
    jobs, short_side, quality = args
    return [prepare_one(src, dst, rel, short_side, quality) for src, dst, rel in jobs]


# -- the whole folder -------------------------------------------------------------------------------
def _check_flags(short_side: int, quality: int, workers: int | None) -> None:
    if short_side < MIN_SHORT_SIDE:
        raise UserError(f"--short_side must be >= {MIN_SHORT_SIDE}, got {short_side}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100 (90-95 is usual), got {quality}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")


def _check_paths(data_dir: str, out: str) -> tuple[str, str]:
    """-> (real DATA_DIR, real OUT); UserError for a missing source or an output that overlaps it."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} does not exist (or is not a directory); "
                        f"pass the folder that holds train/ (and val/)")
    if not os.path.isdir(os.path.join(data_dir, "train")):
        raise UserError(f"{os.path.join(data_dir, 'train')} does not exist; --data_dir must hold "
                        f"train/<class>/<images> (and val/<class>/<images>)")
    src, dst = os.path.realpath(data_dir), os.path.realpath(out)
    if dst == src or dst.startswith(src + os.sep):
        raise UserError(f"--out {out} is {'--data_dir' if dst == src else 'inside --data_dir'}; "
                        f"choose a folder outside {data_dir} (the source is never modified)")
    if any(src == os.path.join(dst, s) or src.startswith(os.path.join(dst, s) + os.sep) for s in SPLITS):
        raise UserError(f"--data_dir {data_dir} lies inside --out {out}'s train/ or val/, which prepare "
                        f"writes to; choose another --out")
    return src, dst


def _check_settings(data_dir: str, out: str, short_side: int, quality: int) -> None:
    """Create OUT, prove it is writable, and record (or, when resuming, compare) the settings.
    The source path is recorded for people (where did this copy come from?), not compared: data moves."""
    path = os.path.join(out, SETTINGS)
    settings = {"short_side": short_side, "quality": quality}
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError):
        old = {}  # unreadable: rewrite it
    if old and {k: old.get(k) for k in settings} != settings:
        raise UserError(f"{out} was prepared with --short_side {old.get('short_side')} --quality "
                        f"{old.get('quality')}; rerun with those to resume, or choose a new --out")
    try:
        os.makedirs(out, exist_ok=True)
        text = json.dumps({**settings, "data_dir": data_dir}, indent=1) + "\n"
        _write_output(path, text.encode(), fsync=True)
    except (OSError, WriteError) as e:
        raise UserError(f"cannot write to --out {out} ({e}); choose a writable folder") from e


def remove_stale_temps(out: str) -> int:
    """Delete the temporary files a killed run left under OUT/{train,val}; returns how many."""
    n = 0
    for split in SPLITS:
        n += len(remove_temporaries(os.path.join(out, split), recursive=True))
        for folder, _dirs, names in os.walk(os.path.join(out, split)):
            for name in names:
                if name.startswith(".") and name.endswith(LEGACY_TMP_SUFFIX):
                    os.unlink(os.path.join(folder, name))
                    n += 1
    return n


def _plan(data_dir: str, out: str) -> tuple[list[tuple[str, str, str]], int]:
    """Make OUT's class folders; -> (jobs [(src, dst, rel)] still to do, outputs already there).

    Every class folder is created, also empty ones: the class map (and so every label) depends on them."""
    jobs, done = [], 0
    for split in SPLITS:
        if split == "val" and not os.path.isdir(os.path.join(data_dir, "val")):
            continue
        index = list_files(data_dir, split).index
        for c in index.classes:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
        for rel in index.paths.tolist():
            dst = os.path.join(out, split, rel)
            if _size(dst) > 0:  # complete: outputs appear only by rename (0 bytes: see _write_output)
                done += 1
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)  # images in sub-folders of a class
            jobs.append((os.path.join(index.split_dir, rel), dst, f"{split}/{rel}"))
    return jobs, done


def _size(path: str) -> int:
    """Bytes of the regular file ``path``; -1 when there is none (absent, or a folder in its place)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def _results(jobs, short_side: int, quality: int, workers: int, progress: bool):
    """Yield one Result per job, from a process pool when it pays (more than one chunk)."""
    size = max(1, min(CHUNK, len(jobs) // (4 * workers)))  # >= 4 tasks per worker: balance and a live bar
    chunks = [(jobs[s:s + size], short_side, quality) for s in range(0, len(jobs), size)]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), unit="img", desc="prepare", file=sys.stderr, disable=not progress or not jobs,
               mininterval=0.5)
    try:
        with process_pool(workers, len(chunks)) as pool:
            for results in pool_map(pool, _run_chunk, chunks):
                bar.update(len(results))
                yield from results
    finally:
        bar.close()


def _write_bad_list(out: str, bad: list[Result]) -> str:
    path = os.path.join(out, BAD_FILES)
    _write_output(path, "".join(f"{r.rel}\t{r.reason}\n" for r in bad).encode(), fsync=True)
    return path


def prepare_dataset(data_dir: str, out: str, short_side: int, quality: int = DEFAULT_QUALITY,
                    workers: int | None = None, progress: bool = False) -> dict:
    """Write the downscaled copy (see the module docstring); resumes a killed run. Returns counts:
    {"resized", "copied", "reencoded", "bad", "existing", "stale_temps", "bytes_in", "bytes_out", "seconds",
    "bad_files": [(rel, reason)], "bad_list": path}."""
    t0 = time.perf_counter()
    _check_flags(short_side, quality, workers)
    data_dir, out = _check_paths(data_dir, out)
    _check_settings(data_dir, out, short_side, quality)
    counts = dict(resized=0, copied=0, reencoded=0, bad=0, bytes_in=0, bytes_out=0)
    counts["stale_temps"] = remove_stale_temps(out)
    try:
        jobs, counts["existing"] = _plan(data_dir, out)
    except OSError as e:
        raise UserError(f"cannot create the class folders under --out {out} ({e}); choose a writable folder") from e
    bad: list[Result] = []
    try:
        w = usable_cores() if workers is None else max(1, workers)  # 0 or 1: in this process
        for r in _results(jobs, short_side, quality, w, progress):
            counts[r.kind] += 1
            counts["bytes_in"] += r.bytes_in
            counts["bytes_out"] += r.bytes_out
            bad += [r] if r.kind == "bad" else []
    except WriteError as e:
        raise UserError(f"{e}; free some space or fix the permissions, then rerun: finished files are kept") from e
    counts["bad_files"] = [(r.rel, r.reason) for r in bad]
    counts["bad_list"] = _write_bad_list(out, bad)
    counts["seconds"] = time.perf_counter() - t0
    return counts
