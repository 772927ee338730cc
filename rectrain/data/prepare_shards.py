"""`rectrain prepare --format shards`: WebDataset tar shards, their index and class list, from an image folder or
from Hugging Face parquet files.

Output (``OUT``), all of which ``rectrain train --data_dir OUT`` reads (``rectrain.data.shards``):

- ``train-000000.tar``, ``train-000001.tar``, ..., ``val-000000.tar``, ...: about ``--shard_size`` bytes each. Per
  sample two members, WebDataset's way: ``KEY.jpg`` (or ``.png``, ... by the image's format) and ``KEY.cls`` (the
  label, a decimal integer). ``tar tf`` lists them, ``webdataset`` and ``wids`` read them. Keys are unique: for a
  folder the image's relative path without its extension, dots in the name made underscores (webdataset's key ends
  at the first dot); for parquet ``FILE/ROW`` (plus the image's own file name when the row has one).
- ``train.index.npz``, ``val.index.npz``: the shard index (``rectrain.data.shard_index``), shipped: a run reads it
  as is instead of indexing the shards.
- ``classes.json``: the class names, label i is the i-th (a folder's sorted class folders, empty ones included, so
  labels are those of the folder; parquet: the names in the file's Hugging Face metadata, else the label numbers).
- ``prepare.json`` (settings and progress), ``prepare_bad_files.txt`` (``source<TAB>reason`` of what was left out).

Samples are written in the source's order: a folder's sorted files (the order of its scan), parquet files sorted by
name, rows in order. Without ``--short_side`` every image's bytes are copied as they are (any format, EXIF kept):
a run on the shards then trains on the very images of a run on the folder, in the same order, with the same crops.
With ``--short_side``, images are downscaled and re-encoded exactly as ``rectrain prepare`` does for a folder
(``rectrain.data.prepare``). A file the scan would reject (empty, truncated, not an image, a bomb) is left out and
listed; the scan's checks are the only ones, so the shards hold exactly the folder scan's usable images.

Resumable: a shard is written to a temporary file and renamed when complete, then ``prepare.json`` records it and
where the source stands after it. A killed prepare, rerun with the same command, keeps the shards it finished and
goes on from the next; shards are byte-for-byte reproducible (fixed member times and owners), so one finished but
not recorded is simply written again.

Parquet (the ``ILSVRC/imagenet-1k`` layout: an ``image`` struct column with ``bytes`` and ``path``, a ``label``
column) needs ``pyarrow`` (``pip install pyarrow``); a file's split comes from its name (``train``, ``validation``),
``test`` files (no labels) are skipped.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import sys
import tarfile
import time
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

from rectrain.data.index import list_files
from rectrain.data.prepare import DEFAULT_QUALITY, MIN_SHORT_SIDE, REDUCING_GAP, output_size
from rectrain.data.scan import DEFAULT_MAX_PIXELS, BadImage, read_size_bytes
from rectrain.data.shards import CLASSES_FILE, split_of
from rectrain.errors import UserError
from rectrain.runtime.io import atomic_write, is_temporary, process_pool, usable_cores

__all__ = ["DEFAULT_SHARD_SIZE", "parse_size", "folder_keys", "encode_member", "prepare_shards"]

DEFAULT_SHARD_SIZE = "1GB"
SETTINGS = "prepare.json"
BAD_FILES = "prepare_bad_files.txt"
CHUNK = 32  # images per pool task
AHEAD = 4  # pool tasks in flight per worker: bounds the encoded images held in memory
MEMBER_MTIME = 946684800  # 2000-01-01: fixed member times make a shard's bytes a function of its content
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "kib": 2 ** 10,
          "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"P5", "pgm"), (b"P6", "ppm"))


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '500MiB' -> 500 * 2**20, '4096' -> 4096 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--shard_size {text!r}: give a size such as 1GB, 500MB or 256MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _ext_of(data: bytes) -> str:
    """The member extension for an image's bytes, by their signature (what webdataset decodes by)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "img")


def _sanitize(stem: str) -> str:
    return stem.replace(".", "_").replace(":", "_")


def folder_keys(rels: list[str]) -> list[str]:
    """Unique WebDataset keys for a folder's relative paths (in order): the path without its extension, dots in the
    base name made underscores; a key met before gets ``_N`` (its position) appended. Pure in the list."""
    keys, used = [], set()
    for n, rel in enumerate(rels):
        folder, base = os.path.split(rel)
        stem = base.rsplit(".", 1)[0] if "." in base else base
        key = (folder + "/" if folder else "") + _sanitize(stem)
        if key in used:
            key = f"{key}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def encode_member(data: bytes, short_side: int | None, quality: int) -> tuple[str, bytes]:
    """An image's bytes -> (member extension, bytes to store). Raises ``BadImage`` with the reason.

    ``short_side`` None: the bytes as they are, after the scan's checks. Else as ``rectrain prepare``: resized so the
    shorter side is ``short_side`` (a JPEG decoded at a reduced DCT scale, LANCZOS), upright, RGB, JPEG at
    ``quality``; an upright RGB JPEG small enough already is kept as it is."""
    h, w = read_size_bytes(data)
    if short_side is None:
        return _ext_of(data), data
    import io

    from PIL import Image

    from rectrain.data import exif
    from rectrain.data.transforms import DecodeError, open_rgb
    out_w, out_h = output_size(w, h, short_side)
    try:
        if (out_w, out_h) == (w, h):
            with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
                warnings.simplefilter("ignore")
                keep = im.format in ("JPEG", "MPO") and im.mode == "RGB" and exif.orientation(im) == 1
            if keep:
                open_rgb(data, (1, 1))  # test decode at 1/8 scale
                return "jpg", data
            im = open_rgb(data)
        else:
            im = open_rgb(data, (REDUCING_GAP * out_w, REDUCING_GAP * out_h)).resize((out_w, out_h),
                                                                                  Image.Resampling.LANCZOS)
    except DecodeError as e:
        raise BadImage(str(e).split(": ", 1)[-1]) from None
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return "jpg", buf.getvalue()


# -- sources: (name for the bad list, key, label, bytes or a path to read) in order -------------------------------
@dataclass
class Split:
    name: str         # train | val
    count: int        # samples in the source
    rows: object      # a function(start) -> iterator of (source name, key, label, bytes | path)


def _folder_splits(data_dir: str) -> tuple[list[str], list[Split]]:
    if not os.path.isdir(os.path.join(data_dir, "train")):
        raise UserError(f"--data_dir {data_dir} has neither train/ (an image folder) nor parquet files")
    train = list_files(data_dir, "train").index
    splits = [train]
    if os.path.isdir(os.path.join(data_dir, "val")):
        splits.append(list_files(data_dir, "val", train.classes).index)
    out = []
    for name, ix in zip(("train", "val"), splits):
        rels = ix.paths.tolist()
        keys = folder_keys(rels)

        def rows(start, ix=ix, rels=rels, keys=keys, name=name):
            for i in range(start, len(rels)):
                yield f"{name}/{rels[i]}", keys[i], int(ix.labels[i]), os.path.join(ix.split_dir, rels[i])
        out.append(Split(name, len(rels), rows))
    return list(train.classes), out


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def parquet_files(data_dir: str) -> list[str]:
    """The ``*.parquet`` files in ``data_dir`` or its ``data/`` folder (the Hub's layout), sorted."""
    return sorted(glob.glob(os.path.join(data_dir, "*.parquet")) + glob.glob(os.path.join(data_dir, "data", "*.parquet")))


def _hub_class_names(schema) -> list[str] | None:
    """The label names a Hugging Face dataset stores in its parquet metadata (``ClassLabel``), or None."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        names = json.loads(meta)["info"]["features"]["label"]["names"]
        return [str(n) for n in names] if names else None
    except (TypeError, KeyError, ValueError):
        return None


def _parquet_splits(files: list[str]) -> tuple[list[str], list[Split]]:
    pq = _pyarrow()
    by_split: dict[str, list[str]] = {"train": [], "val": []}
    for f in files:
        s = split_of(f)
        if s:
            by_split[s].append(f)
    if not by_split["train"]:
        raise UserError(f"none of the {len(files)} parquet files is a train file (its name contains 'train')")
    classes = None
    out = []
    for name, group in by_split.items():
        if not group:
            continue
        counts = []
        for f in group:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "image" not in names or "label" not in names:
                raise UserError(f"{f}: expected an 'image' column (bytes and path) and a 'label' column, found "
                                f"{', '.join(names)}")
            classes = classes or _hub_class_names(pf.schema_arrow)
            counts.append(pf.metadata.num_rows)

        def rows(start, group=group, counts=counts):
            skip = start
            for f, n in zip(group, counts):
                if skip >= n:
                    skip -= n
                    continue
                pf = pq.ParquetFile(f)
                stem = _sanitize(os.path.splitext(os.path.basename(f))[0])
                row = 0
                for g in range(pf.num_row_groups):
                    rows_g = pf.metadata.row_group(g).num_rows
                    if row + rows_g <= skip:
                        row += rows_g
                        continue
                    table = pf.read_row_group(g, columns=["image", "label"])
                    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
                    for j in range(max(0, skip - row), rows_g):
                        image, label = images[j] or {}, labels[j]
                        path = image.get("path")
                        key = f"{stem}/{row + j:07d}" + (f"_{_sanitize(os.path.basename(path))}" if path else "")
                        yield f"{os.path.basename(f)}:{row + j}", key, -1 if label is None else int(label), \
                            image.get("bytes") or b""
                    row += rows_g
                skip = 0
        out.append(Split(name, sum(counts), rows))
    if classes is None:
        top = 0
        for f in by_split["train"]:
            col = pq.read_table(f, columns=["label"]).column("label")
            top = max(top, (max((v for v in col.to_pylist() if v is not None), default=-1)) + 1)
        classes = [str(i) for i in range(top)]
    return classes, out


# -- writing --------------------------------------------------------------------------------------------------
def _encode_task(args) -> list:
    """Pool task: ([(name, key, label, bytes | path)], short_side, quality) -> [(name, key, label, ext, data, reason)]."""
    rows, short_side, quality = args
    out = []
    for name, key, label, src in rows:
        try:
            if label < 0:
                raise BadImage("no label (a test split?)")
            if isinstance(src, str):
                with open(src, "rb") as f:
                    src = f.read()
            ext, data = encode_member(src, short_side, quality)
            out.append((name, key, label, ext, data, ""))
        except BadImage as e:
            out.append((name, key, label, "", b"", str(e)))
        except OSError as e:
            out.append((name, key, label, "", b"", f"cannot read: {e.strerror or e}"))
    return out


def _ordered(pool, fn, items, ahead: int):
    """``pool.map`` in order with at most ``ahead`` tasks in flight (memory stays bounded whatever the source size)."""
    if pool is None:
        yield from map(fn, items)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        items = iter(items)
        pending = deque(pool.submit(fn, it) for it in itertools.islice(items, ahead))
        while pending:
            done = pending.popleft().result()
            for it in itertools.islice(items, 1):
                pending.append(pool.submit(fn, it))
            yield done


class _ShardWriter:
    """Appends samples to ``{split}-{k:06d}.tar`` files of about ``shard_size`` bytes, each renamed into place when
    complete; ``on_shard(name, size, position)`` after each."""

    def __init__(self, out: str, split: str, first: int, shard_size: int, on_shard):
        self.out, self.split, self.k, self.shard_size, self.on_shard = out, split, first, shard_size, on_shard
        self.f = self.tar = self.tmp = None

    def _open(self) -> None:
        from rectrain.runtime.io import temporary_path
        self.path = os.path.join(self.out, f"{self.split}-{self.k:06d}.tar")
        self.tmp = temporary_path(self.path)
        self.f = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.f, mode="w", format=tarfile.PAX_FORMAT)

    def _member(self, name: str, data: bytes) -> None:
        import io
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), MEMBER_MTIME, 0o444, "", ""
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, ext: str, data: bytes, label: int, position: int) -> None:
        """One sample; ``position``: where the source stands after it (recorded when its shard completes)."""
        if self.tar is None:
            self._open()
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.cls", str(label).encode())
        if self.f.tell() >= self.shard_size:
            self.close(position)

    def close(self, position: int) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        size = os.path.getsize(self.path)
        self.tar = self.f = self.tmp = None
        self.on_shard(os.path.basename(self.path), size, position)
        self.k += 1

    def abandon(self) -> None:
        if self.f is not None:
            self.f.close()
            os.remove(self.tmp)


def _settings(out: str, settings: dict) -> dict:
    """The progress of an earlier run with the same settings, {} for a new one; UserError for other settings."""
    path = os.path.join(out, SETTINGS)
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        old = {}
    if old.get("format") == "shards" and {k: old.get(k) for k in settings} != settings:
        shown = " ".join(f"--{k} {old.get(k)}" for k in settings if k != "format")
        raise UserError(f"{out} was prepared with {shown}; rerun with those to resume, or choose a new --out")
    if old and old.get("format") != "shards":
        raise UserError(f"{out} holds a folder prepared by `rectrain prepare` (not shards); choose a new --out")
    return old.get("progress", {})


def _save(out: str, settings: dict, progress: dict, source: str) -> None:
    atomic_write(os.path.join(out, SETTINGS), json.dumps({**settings, "data_dir": source, "progress": progress},
                                                         indent=1) + "\n")


def _kept(out: str, done: list[dict]) -> list[dict]:
    """The recorded shards that are still there, whole (same size), up to the first one that is not."""
    kept = []
    for d in done:
        try:
            if os.path.getsize(os.path.join(out, d["shard"])) != d["bytes"]:
                break
        except OSError:
            break
        kept.append(d)
    return kept


def prepare_shards(data_dir: str, out: str, shard_size: str | int = DEFAULT_SHARD_SIZE, short_side: int | None = None,
                   quality: int = DEFAULT_QUALITY, workers: int | None = None, progress: bool = False) -> dict:
    """Write the shards, their index and the class list (see the module docstring); resumes a killed run. Returns
    counts: {"written", "existing", "bad", "shards", "bytes", "seconds", "bad_files": [(source, reason)], "bad_list"}."""
    t0 = time.perf_counter()
    size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    if short_side is not None and short_side < MIN_SHORT_SIDE:
        raise UserError(f"--short_side must be >= {MIN_SHORT_SIDE}, got {short_side}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100 (90-95 is usual), got {quality}")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} does not exist (or is not a directory)")
    src, dst = os.path.realpath(data_dir), os.path.realpath(out)
    if dst == src or dst.startswith(src + os.sep):
        raise UserError(f"--out {out} is {'--data_dir' if dst == src else 'inside --data_dir'}; choose a folder "
                        f"outside {data_dir} (the source is never modified)")
    files = parquet_files(data_dir)
    classes, splits = _parquet_splits(files) if files else _folder_splits(data_dir)
    settings = {"format": "shards", "shard_size": size, "short_side": short_side, "quality": quality}
    try:
        os.makedirs(out, exist_ok=True)
        done_before = _settings(out, settings)
        for name in os.listdir(out):
            if is_temporary(name):
                os.remove(os.path.join(out, name))
        atomic_write(os.path.join(out, CLASSES_FILE), json.dumps(classes, indent=0) + "\n")
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e}); choose a writable folder") from e
    counts = dict(written=0, existing=0, bad=0, shards=0, bytes=0)
    bad_files: list[tuple[str, str]] = []
    state = {s.name: {"done": _kept(out, done_before.get(s.name, {}).get("done", [])),
                      "bad": done_before.get(s.name, {}).get("bad", [])} for s in splits}
    w = usable_cores() if workers is None else max(1, workers)
    try:
        for split in splits:
            _write_split(split, out, size, short_side, quality, w, progress, state, settings, data_dir, counts)
            bad_files += [tuple(b) for b in state[split.name]["bad"]]
            _index_split(out, split.name, state[split.name]["done"], w, progress)
    except OSError as e:
        raise UserError(f"writing under --out {out} failed ({e.strerror or e}); free some space or fix the "
                        "permissions, then rerun the same command: finished shards are kept") from e
    bad_list = os.path.join(out, BAD_FILES)
    atomic_write(bad_list, "".join(f"{n}\t{r}\n" for n, r in bad_files))
    counts.update(bad=len(bad_files), bad_files=bad_files, bad_list=bad_list, classes=len(classes),
                  shards=sum(len(state[s.name]["done"]) for s in splits), seconds=time.perf_counter() - t0)
    return counts


def _write_split(split: Split, out, size, short_side, quality, workers, progress, state, settings, source,
                 counts) -> None:
    mine = state[split.name]
    start = mine["done"][-1]["next"] if mine["done"] else 0
    counts["existing"] += sum(d["samples"] for d in mine["done"])
    pending_bad: list = []
    in_shard = [0]  # samples in the shard being written

    def on_shard(name: str, nbytes: int, position: int) -> None:
        mine["done"].append({"shard": name, "bytes": nbytes, "next": position, "samples": in_shard[0]})
        mine["bad"] += pending_bad
        pending_bad.clear()
        in_shard[0] = 0
        counts["bytes"] += nbytes
        _save(out, settings, state, source)

    writer = _ShardWriter(out, split.name, len(mine["done"]), size, on_shard)
    rows = split.rows(start)
    chunks = iter(lambda: list(itertools.islice(rows, CHUNK)), [])
    from tqdm import tqdm
    bar = tqdm(total=split.count, initial=start, unit="img", desc=f"{split.name} shards", file=sys.stderr,
               disable=not progress, mininterval=0.5)
    position = start
    try:
        with process_pool(workers, split.count // CHUNK) as pool:
            for results in _ordered(pool, _encode_task, ((c, short_side, quality) for c in chunks), AHEAD * workers):
                for name, key, label, ext, data, reason in results:
                    position += 1
                    if reason:
                        pending_bad.append([name, reason])
                    else:
                        in_shard[0] += 1
                        writer.add(key, ext, data, label, position)
                        counts["written"] += 1
                bar.update(len(results))
        writer.close(position)
        if pending_bad:  # bad files after the last shard closed
            mine["bad"] += pending_bad
            _save(out, settings, state, source)
    except BaseException:
        writer.abandon()
        raise
    finally:
        bar.close()
    # Shards of this split beyond the last one written (an earlier run's, with a smaller --shard_size refused above,
    # so only a stray copy) would be read as part of the split: remove them.
    keep = {d["shard"] for d in mine["done"]}
    for path in glob.glob(os.path.join(out, f"{split.name}-*.tar")):
        if os.path.basename(path) not in keep:
            os.remove(path)


def _index_split(out: str, split: str, done: list[dict], workers: int, progress: bool) -> None:
    """The shipped index of the split's shards (the reader's own indexing, so the two can never disagree)."""
    from rectrain.data.shard_index import build_index, shipped_name, write_index
    if not done:
        return
    names = [d["shard"] for d in done]
    locations = [os.path.join(out, n) for n in names]
    arrays = build_index(locations, names, workers=workers, progress=progress, desc=f"indexing {split} shards")
    stats = [os.stat(p) for p in locations]
    write_index(os.path.join(out, shipped_name(split)), arrays, names, np.array([s.st_size for s in stats], np.int64),
                np.array([s.st_mtime_ns for s in stats], np.int64), DEFAULT_MAX_PIXELS, shipped=True)
