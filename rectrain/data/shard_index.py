"""The shard index: per sample its shard, the byte offset and size of its image member, its upright size and label.

The aspect-ratio sampler needs every image's width and height up front and random access to any sample, which a
stream of tar shards does not give. So the shards are indexed once, in one pass over the tar headers and the image
headers (no pixel is decoded), one process per shard (``rectrain.runtime.io.process_pool``) with a progress bar:

- per tar member: ``tarfile``'s header gives its name and ``offset_data`` (where its bytes start in the shard);
  members are grouped into samples by WebDataset's key rule (``rectrain.data.shards.split_key``);
- per sample: the image member's bytes go through the scan's own checks (``rectrain.data.scan.read_size_bytes``:
  the upright size after EXIF rotation; empty, truncated, non-image, bomb), the ``.cls`` member gives the label;
- bad samples are listed as ``shard.tar:key`` with the reason and left out; a shard cut short (no end-of-archive
  blocks, or a member running past the end of the file) keeps the samples before the cut and is listed as bad too.

Samples keep the shards' order, and within a shard the members' order: shards that ``rectrain prepare`` wrote from
a folder hold that folder's sorted images in order, so sample i is image i of the folder's scan (same bucket, same
crops: the exactness test in tests/data/test_shards.py).

**The index file** (``.npz``, read with ``allow_pickle=False``) is keyed like the scan cache: by the shard list
(names relative to the shards' folder), each shard's size and modification time, ``max_pixels`` and the format
version. A changed shard list, a shard of another size or time is re-indexed by itself. It is written beside the
shards as ``{split}.index.npz`` when that folder is writable, else in the run folder (or the user cache folder).
An index *shipped* with the shards (written by ``rectrain prepare``) is read as is: its shards' names and sizes must
match, not their times (a copy of the shards keeps the index usable). Remote shards cannot be stat'ed cheaply:
their names must match, and each shard's size is checked when it is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np

from rectrain.data.index import ImageIndex
from rectrain.data.scan import DEFAULT_MAX_PIXELS, BadImage, SplitScan, read_size_bytes
from rectrain.data.shards import (IMAGE_EXTS, LABEL_EXT, ShardLayout, ShardMembers, is_remote, read_classes,
                                  shard_layout, split_key)
from rectrain.errors import DataMistake, UserError
from rectrain.runtime.io import atomic_file, pool_map, process_pool, usable_cores, user_cache_dir

__all__ = ["INDEX_VERSION", "ShardRows", "index_shard", "shipped_name", "build_index", "write_index", "read_index",
           "scan_shards", "index_fingerprint", "load_index_scan", "index_status"]

INDEX_VERSION = 1  # of the index file; bump when its contents or the indexing rules change
_TAR_BLOCK = 512


def shipped_name(split: str) -> str:
    return f"{split}.index.npz"


@dataclass
class ShardRows:
    """One shard's samples, in order, and its bad ones."""

    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # upright (H, W)
    labels: list[int] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, or "" for the shard itself; reason)
    total: int = 0  # the shard's size in bytes


def _sample(rows: ShardRows, fd: int, key: str, members: dict[str, tarfile.TarInfo], max_pixels: int) -> None:
    """Add one sample (its members by extension) to ``rows``, or its reason to ``rows.bad``."""
    image = next((members[e] for e in members if e.lower() in IMAGE_EXTS), None)
    if image is None:
        rows.bad.append((key, f"no image member ({', '.join('.' + e for e in members)}); expected .jpg, .png, ..."))
        return
    label = members.get(LABEL_EXT)
    if label is None:
        rows.bad.append((key, "no .cls member (the label)"))
        return
    try:
        text = os.pread(fd, label.size, label.offset_data).decode("ascii").strip()
        value = int(text)
        if value < 0:
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        rows.bad.append((key, "its .cls member is not a label (a non-negative decimal integer)"))
        return
    try:
        size = read_size_bytes(os.pread(fd, image.size, image.offset_data), max_pixels)
    except BadImage as e:
        rows.bad.append((key, str(e)))
        return
    rows.keys.append(key)
    rows.offsets.append(image.offset_data)
    rows.nbytes.append(image.size)
    rows.sizes.append(size)
    rows.labels.append(value)


def index_shard(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ShardRows:
    """Index one local shard file (see the module docstring). Never raises for a damaged shard: it says so in
    ``bad``."""
    rows = ShardRows()
    with open(path, "rb") as f:
        total = rows.total = os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            rows.bad.append(("", f"not a tar file ({e})"))
            return rows
        key, members, cut = None, {}, None
        for m in tar:
            if not m.isfile():
                continue
            parts = split_key(m.name)  # None: a name without an extension belongs to no sample
            if parts is not None and parts[0] != key:
                if key is not None:
                    _sample(rows, f.fileno(), key, members, max_pixels)
                key, members = parts[0], {}
            if m.offset_data + m.size > total:
                cut = f"member {m.name} runs past the end of the file ({total:,} bytes)"
                break
            if parts is not None:
                members.setdefault(parts[1], m)
        if key is not None and cut is None:
            _sample(rows, f.fileno(), key, members, max_pixels)
        elif key is not None:
            rows.bad.append((key, "cut short with its shard"))
        end = os.pread(f.fileno(), _TAR_BLOCK, tar.offset) if cut is None else b""
        if cut is None and (len(end) < _TAR_BLOCK or any(end)):
            cut = f"no end-of-archive block at byte {tar.offset:,} of {total:,}"
        if cut:
            rows.bad.append(("", f"truncated or damaged: {cut}; its {len(rows.keys):,} samples before that are used"))
    return rows


def _index_task(args) -> ShardRows:
    """Pool task: (location, max_pixels, cache) -> ShardRows; a remote shard is fetched into the cache first."""
    location, max_pixels, cache = args
    return index_shard(cache.local_path(location) if is_remote(location) else location, max_pixels)


# -- building, writing and reading the index file ---------------------------------------------------------
def _stats(locations: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, mtime_ns) of local shards; -1 for remote ones (not stat'ed: see the module docstring)."""
    sizes, mtimes = np.full(len(locations), -1, np.int64), np.full(len(locations), -1, np.int64)
    for k, loc in enumerate(locations):
        if not is_remote(loc):
            try:
                st = os.stat(loc)
            except FileNotFoundError:
                raise DataMistake(f"shard {loc} is listed but missing; restore it or drop it from --data_dir") from None
            sizes[k], mtimes[k] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def build_index(locations: list[str], names: list[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                workers: int | None = None, progress: bool = False, cache=None, desc: str = "indexing") -> dict:
    """Index every shard -> the index file's arrays (without the shard stats); one process per shard."""
    workers = usable_cores() if workers is None else max(1, int(workers))
    from tqdm import tqdm
    bar = tqdm(total=len(locations), unit="shard", desc=desc, file=sys.stderr, disable=not progress,
               mininterval=0.5)
    keys, shard, offsets, nbytes, sizes, labels, bad = [], [], [], [], [], [], []
    totals = np.zeros(len(locations), np.int64)
    from rectrain.data.shard_cache import ShardFetchError
    try:
        with process_pool(workers, len(locations)) as pool:
            tasks = [(loc, max_pixels, cache) for loc in locations]
            for s, rows in enumerate(pool_map(pool, _index_task, tasks)):
                keys += rows.keys
                shard += [s] * len(rows.keys)
                offsets += rows.offsets
                nbytes += rows.nbytes
                sizes += rows.sizes
                labels += rows.labels
                bad += [(f"{names[s]}:{k}" if k else names[s], reason) for k, reason in rows.bad]
                totals[s] = rows.total
                bar.update(1)
                bar.set_postfix(samples=len(keys), refresh=False)
    except ShardFetchError as e:  # a remote shard that stays unreachable: one line naming its URL
        raise UserError(str(e)) from None
    finally:
        bar.close()
    return dict(keys=np.array([k.encode("utf-8", "surrogateescape") for k in keys], dtype=bytes).reshape(-1),
                shard=np.asarray(shard, np.int32), offset=np.asarray(offsets, np.int64),
                nbytes=np.asarray(nbytes, np.int64), sizes=np.asarray(sizes, np.int32).reshape(-1, 2),
                labels=np.asarray(labels, np.int64), bad_names=np.array([b for b, _ in bad], dtype=str).reshape(-1),
                bad_reasons=np.array([r for _, r in bad], dtype=str).reshape(-1), shard_total=totals)


def write_index(path: str, arrays: dict, names: list[str], sizes: np.ndarray, mtimes: np.ndarray, max_pixels: int,
                shipped: bool = False) -> None:
    with atomic_file(path) as f:
        np.savez(f, version=np.int64(INDEX_VERSION), shard_names=np.array(names, dtype=str),
                 shard_bytes=sizes, shard_mtime_ns=mtimes, max_pixels=np.int64(max_pixels), shipped=np.bool_(shipped),
                 **arrays)


def read_index(path: str) -> dict | None:
    """The arrays of an index file; None when it is absent, unreadable or of another version."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != INDEX_VERSION:
                return None
            return {k: z[k] for k in z.files}
    except Exception:  # absent, truncated zip, missing key...: index afresh
        return None


def _mismatch(z: dict, names: list[str], sizes: np.ndarray, mtimes: np.ndarray, max_pixels: int) -> str | None:
    """Why the index ``z`` does not describe these shards (None when it does)."""
    if int(z["max_pixels"]) != max_pixels:
        return f"it was built with --max_pixels {int(z['max_pixels'])}"
    old = z["shard_names"].tolist()
    if old != names:
        gone = sorted(set(old) - set(names))
        new = sorted(set(names) - set(old))
        what = f"{gone[0]} is no longer listed" if gone else f"{new[0]} is new" if new else "the shard order changed"
        return f"the shard list changed ({what})"
    shipped = bool(z["shipped"])
    for k, name in enumerate(names):
        if sizes[k] < 0:  # remote: checked when downloaded
            continue
        if int(z["shard_bytes"][k]) != sizes[k]:
            return f"{name} has {int(sizes[k]):,} bytes, {int(z['shard_bytes'][k]):,} when indexed"
        if not shipped and int(z["shard_mtime_ns"][k]) != mtimes[k]:
            return f"{name} was modified since it was indexed"
    return None


def index_fingerprint(z: dict) -> str:
    """What identifies an index file's contents for another rank: the shards it describes, as it describes them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"rectrain-shards v{INDEX_VERSION} {int(z['max_pixels'])}\n".encode())
    h.update("\n".join(z["shard_names"].tolist()).encode("utf-8", "surrogateescape"))
    h.update(np.asarray(z["shard_bytes"], np.int64).tobytes() + np.asarray(z["shard_mtime_ns"], np.int64).tobytes())
    h.update(np.asarray(z["nbytes"], np.int64).tobytes())
    return h.hexdigest()


def load_index_scan(path: str, fp: str, data_dir: str, split: str, shard_cache=None,
                    classes: list[str] | None = None) -> SplitScan | None:
    """The split's scan from the index file rank 0 validated (``path``, ``index_fingerprint`` ``fp``): lists the
    shard folder (or expands the pattern) but stats no shard; None when the file is not that one."""
    t0 = time.perf_counter()
    z = read_index(path)
    if z is None or index_fingerprint(z) != fp:
        return None
    layout = shard_layout(data_dir)
    locations = layout.shards(split)
    if z["shard_names"].tolist() != _names(layout, locations):
        return None
    if layout.remote and shard_cache is None:
        from rectrain.data.shard_cache import ShardCache
        shard_cache = ShardCache()
    scan = _to_scan(z, layout, locations, _names(layout, locations), split, classes, shard_cache)
    scan.cache_path, scan.from_cache, scan.seconds, scan.fingerprint = path, True, time.perf_counter() - t0, fp
    return scan


# -- the split ------------------------------------------------------------------------------------------------
def _names(layout: ShardLayout, locations: list[str]) -> list[str]:
    """Shard names relative to the layout's root, for messages and the index (``train-0000.tar``)."""
    root = layout.root.rstrip("/") + "/"
    return [loc[len(root):] if loc.startswith(root) else loc for loc in locations]


def _candidates(layout: ShardLayout, split: str, cache_dir: str | None, cache) -> list[tuple[str, bool]]:
    """(index path, beside the shards?) in order of preference."""
    tag = hashlib.blake2b("\n".join(layout.shards(split)).encode(), digest_size=6).hexdigest()
    out = []
    if is_remote(layout.root):
        if cache is not None:  # a shipped index beside remote shards, fetched into the shard cache
            out.append((_fetch_shipped(f"{layout.root}/{shipped_name(split)}", cache), True))
    else:
        out.append((os.path.join(layout.root, shipped_name(split)), True))
    for d in ([cache_dir] if cache_dir else []) + [user_cache_dir()]:
        out.append((os.path.join(d, f"shard_index_{split}_{tag}.npz"), False))
    return [(p, beside) for p, beside in out if p]


def _fetch_shipped(url: str, cache) -> str | None:
    from rectrain.data.shard_cache import ShardFetchError
    try:
        return cache.local_path(url)
    except ShardFetchError:
        return None  # none shipped (404): index the shards


def _writable_place(candidates: list[tuple[str, bool]], remote: bool) -> list[str]:
    from rectrain.data.scan import _dir_writable
    return [p for p, beside in candidates if not (remote and beside) and _dir_writable(os.path.dirname(p))]


def scan_shards(data_dir: str, split: str, classes: list[str] | None = None, *, cache_dir: str | None = None,
                workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False,
                shard_cache=None) -> SplitScan:
    """``rectrain.data.source.scan_split`` for shards: the split's samples with their upright sizes, from the index
    (built or refreshed when needed) -> a ``SplitScan`` whose index reads members (``ImageIndex.members``).

    ``classes``: train's class names when indexing val (labels are positions in it); None for train: the
    ``classes.json`` beside the shards, else the label numbers ``0 .. max label``.
    """
    t0 = time.perf_counter()
    if max_pixels < 1:
        raise UserError(f"--max_pixels must be positive, got {max_pixels}")
    layout = shard_layout(data_dir)
    locations = layout.shards(split)
    names = _names(layout, locations)
    if layout.remote and shard_cache is None:
        from rectrain.data.shard_cache import ShardCache
        shard_cache = ShardCache()
    sizes, mtimes = _stats(locations)
    candidates = _candidates(layout, split, cache_dir, shard_cache)
    notes, z, path = [], None, None
    for p, _ in candidates:
        found = read_index(p)
        if found is None:
            continue
        why = _mismatch(found, names, sizes, mtimes, max_pixels)
        if why is None:
            z, path = found, p
            break
        notes.append(f"note: {split} index {p} no longer matches its shards ({why}): indexing them again")
    from_cache = z is not None
    if z is None:
        z = build_index(locations, names, max_pixels, workers, progress, shard_cache, f"indexing {split} shards")
        sizes = np.where(sizes < 0, z["shard_total"], sizes)  # remote shards: the sizes downloaded
        z.update(shard_bytes=sizes, shard_mtime_ns=mtimes, shard_names=np.array(names, dtype=str),
                 max_pixels=np.int64(max_pixels))
        for p in _writable_place(candidates, layout.remote):
            try:
                arrays = {k: v for k, v in z.items() if not k.startswith("shard_") and k != "max_pixels"}
                write_index(p, arrays | {"shard_total": sizes}, names, sizes, mtimes, max_pixels)
                path = p
                break
            except OSError:
                continue
    scan = _to_scan(z, layout, locations, names, split, classes, shard_cache)
    scan.cache_path, scan.from_cache, scan.notes = path, from_cache, notes + scan.notes
    scan.fingerprint = index_fingerprint(z)
    scan.seconds = time.perf_counter() - t0
    return scan


def _to_scan(z: dict, layout: ShardLayout, locations: list[str], names: list[str], split: str,
             classes: list[str] | None, cache) -> SplitScan:
    labels = z["labels"].astype(np.int64)
    notes = []
    if classes is None:
        classes = read_classes(layout)
        if classes is None:
            top = int(labels.max()) + 1 if len(labels) else 0
            classes = [str(i) for i in range(top)]
            notes.append(f"note: no classes.json beside the {split} shards: the class names are the labels "
                         f"0..{top - 1}")
    ok = labels < len(classes)
    bad = list(zip(z["bad_names"].tolist(), z["bad_reasons"].tolist()))
    keys = np.char.decode(z["keys"], "utf-8", "surrogateescape") if len(z["keys"]) else np.array([], dtype=str)
    shard = z["shard"].astype(np.int32)
    names_arr = np.array(names, dtype=str)
    full = np.char.add(np.char.add(names_arr[shard], ":"), keys) if len(keys) else np.array([], dtype=str)
    if not ok.all():
        for i in np.flatnonzero(~ok)[:1000].tolist():
            bad.append((str(full[i]), f"label {int(labels[i])} is beyond the {len(classes)} classes"))
    members = ShardMembers(list(locations), shard[ok], z["offset"].astype(np.int64)[ok],
                           z["nbytes"].astype(np.int64)[ok], cache, z["shard_bytes"].astype(np.int64))
    index = ImageIndex(layout.root, list(classes), full[ok], labels[ok], members=members)
    if len(index) == 0:
        first = f" (first: {bad[0][0]}: {bad[0][1]})" if bad else ""
        raise DataMistake(f"the {split} shards of {layout.source} hold no usable sample{first}; check the shards")
    return SplitScan(index, z["sizes"].astype(np.int32).reshape(-1, 2)[ok], bad, None, True, 0.0, notes=notes)


def index_status(data_dir: str, split: str, classes: list[str] | None = None, *, cache_dir: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
    """``rectrain.data.scan.cache_status`` for shards: would a run find a fresh index? Reads no shard (stats local
    ones) and writes nothing; a remote dataset's shipped index is not fetched (only the local copies count).
    ``files`` is the number of shards."""
    from rectrain.data.scan import CacheStatus
    layout = shard_layout(data_dir)
    locations = layout.shards(split)
    names = _names(layout, locations)
    sizes, mtimes = _stats(locations)
    stale = None
    for p, _ in _candidates(layout, split, cache_dir, None):
        found = read_index(p)
        if found is None:
            continue
        if _mismatch(found, names, sizes, mtimes, max_pixels) is None:
            return CacheStatus(p, True, len(locations), _to_scan(found, layout, locations, names, split, classes, None))
        stale = stale or p
    return CacheStatus(stale, False, len(locations), None)
