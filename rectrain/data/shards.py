"""WebDataset tar shards as a dataset: which shards ``--data_dir`` names, how samples are keyed, and how a worker
reads one member.

``--data_dir`` names shards (instead of an image folder) in one of four ways:

- a folder of ``*.tar`` shards: split by file name (a name containing ``train`` is train, one containing ``val``,
  as in ``validation``, is val), e.g. Hugging Face's ``timm/imagenet-1k-wds`` (``imagenet1k-train-0000.tar``,
  ``imagenet1k-validation-00.tar``) or what ``rectrain prepare --format shards`` writes; or a folder holding
  ``train/`` and ``val/`` sub-folders of ``*.tar`` shards (split by folder);
- a brace pattern: ``/data/in1k/imagenet1k-{train-{0000..1023},validation-{00..63}}.tar`` (split by name);
- a list file (``*.txt``): one shard path or URL a line, relative paths from the list's folder (split by name);
- any of the last two with URLs (``https://``, ``s3://``, ``gs://``, ...): remote shards, fetched whole into a
  bounded local cache (``rectrain.data.shard_cache``).

When no shard name says train or val, every shard is train (a run without validation). Class names come from
``classes.json`` beside the shards (a JSON list, index = label; ``prepare`` writes it); without one, the class
names are the label numbers.

Samples follow WebDataset's conventions: the members of one sample are consecutive and share a key, the member's
path up to the first dot of its base name (``n01440764/n01440764_10026.jpg`` -> key ``n01440764/n01440764_10026``,
extension ``jpg``). The image is the first member with an image extension, the label the ``.cls`` member (a
decimal integer); other members (``.json``, ...) are ignored. A sample is named ``shard.tar:key`` in messages.

Why ``tarfile`` and not the ``webdataset`` package: its ``WebDataset`` streams shards in order and shuffles in a
buffer, which gives the aspect-ratio sampler neither the image sizes up front nor random access; the release
installed here (1.0.2) ships no ``wids`` (indexed access), and what ``wids`` indexes (member offsets) is what
``tarfile``'s headers give directly, while the sizes, labels and the bad-member policy are ours either way. The
format is webdataset's, so its tools read what ``prepare`` writes (tested with the package itself).

Reading: ``ShardMembers`` holds where each sample's image bytes lie (shard, offset, size). A worker reads them with
``os.pread`` on a file it opened once per shard and keeps open (``open_file_budget``: every shard where the
open-file limit allows), never extracting anything.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from rectrain.data.shard_cache import (ShardFetchError, is_remote,  # is_remote: also this module's, for its callers
                                       read_text)
from rectrain.errors import DataMistake, UserError

__all__ = ["SPLIT_NAMES", "CLASSES_FILE", "IMAGE_EXTS", "ShardLayout", "ShardMembers", "MemberReader",
           "is_remote", "is_shards", "split_exists", "expand_braces", "split_key", "shard_layout", "split_of",
           "read_classes"]

CLASSES_FILE = "classes.json"
SPLIT_NAMES = ("train", "val")
# Image members by extension, in order of preference when a sample has several (lowercased).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
LABEL_EXT = "cls"
SPARE_FILES = 256  # descriptors left for everything else a process opens (sockets, shared memory, logs)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key = path to the first dot


def _local(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def split_key(member: str) -> tuple[str, str] | None:
    """WebDataset's rule: ``a/b/c.seg.png`` -> (``a/b/c``, ``seg.png``); None for a name without an extension."""
    m = _KEY.match(member)
    return (m.group(1), m.group(2)) if m else None


# -- brace patterns ---------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` -> a0b a1b a2b (zero padding kept: ``{00..10}``), ``{x,y}`` alternatives, nested; in order.
    The brace syntax of webdataset and of the shell (``braceexpand``)."""
    depth, start = 0, None
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
                return [head + alt + rest for alt in _alternatives(body) for rest in expand_braces(tail)]
    if depth:
        raise UserError(f"--data_dir {pattern}: unbalanced braces in the shard pattern")
    return [pattern]


def _alternatives(body: str) -> list[str]:
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        return [f"{n:0{width}d}" for n in range(int(lo), int(hi) + step, step)]
    parts, depth, cur = [], 0, ""
    for ch in body:  # split at top-level commas only
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "{") - (ch == "}")
        cur += ch
    parts.append(cur)
    if len(parts) == 1:  # "{x}" is no pattern: keep it as written
        return ["{" + body + "}"]
    return [e for p in parts for e in expand_braces(p)]


# -- which shards -----------------------------------------------------------------------------------------
def _has_tars(folder: str) -> bool:
    try:
        return any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(folder))
    except OSError:
        return False


def is_shards(data_dir: str) -> bool:
    """Whether ``--data_dir`` names shards rather than an image folder. Cheap: a few directory listings at most."""
    if is_remote(data_dir) or "{" in data_dir:
        return True
    path = _local(data_dir)
    if os.path.isfile(path):
        return path.endswith((".txt", ".tar"))
    if not os.path.isdir(path):
        return False
    return _has_tars(path) or any(_has_tars(os.path.join(path, s)) for s in SPLIT_NAMES)


def split_of(name: str) -> str | None:
    """train, val or None by a shard's file name: ``train`` in it is train; ``val`` (``validation``) is val."""
    base = os.path.basename(name.rstrip("/")).lower()
    train, val = "train" in base, "val" in base
    if train and val:
        raise UserError(f"shard {name}: its name says both train and val; rename it, or list the shards of each "
                        "split in a folder of its own (DATA_DIR/train/, DATA_DIR/val/)")
    return "train" if train else "val" if val else None


@dataclass(frozen=True)
class ShardLayout:
    """The shards of a dataset, per split, in order (local paths or URLs), and where its metadata lives."""

    source: str                        # --data_dir as given
    splits: dict[str, list[str]]       # "train"/"val" -> shard locations
    root: str                          # folder (or URL prefix) beside the shards: classes.json, shipped indexes
    notes: list[str] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        return any(is_remote(s) for shards in self.splits.values() for s in shards)

    def shards(self, split: str) -> list[str]:
        if split not in self.splits or not self.splits[split]:
            raise DataMistake(f"--data_dir {self.source} names no {split} shards (a {split} shard's file name "
                              f"contains '{split}'{', e.g. validation' if split == 'val' else ''}, or it lies in "
                              f"a {split}/ folder)")
        return self.splits[split]


def _list_file(path: str) -> list[str]:
    text = read_text(path)
    base = path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(_local(path)))
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line if is_remote(line) or os.path.isabs(_local(line)) else
                       (f"{base}/{line}" if is_remote(path) else os.path.join(base, line)))
    return out


def _by_name(source: str, locations: list[str]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "val": []}
    unnamed = []
    for loc in locations:
        s = split_of(loc)
        (splits[s] if s else unnamed).append(loc)
    if unnamed and not splits["train"] and not splits["val"]:
        return {"train": unnamed, "val": []}  # no names to go by: all train
    if unnamed:
        raise UserError(f"--data_dir {source}: shard {unnamed[0]} says neither train nor val in its name, but others "
                        "do; name every shard after its split (or keep only train shards)")
    return splits


def shard_layout(data_dir: str) -> ShardLayout:
    """Resolve ``--data_dir`` to its shards (see the module docstring). Lists folders and expands patterns; never
    reads a shard. A missing local shard named by a pattern or a list file is a ``DataMistake`` naming it."""
    if "{" in data_dir:
        locations = expand_braces(data_dir)
        kind = "pattern"
    elif data_dir.endswith(".txt"):
        locations = _list_file(data_dir)
        kind = "list"
    elif is_remote(data_dir):
        if data_dir.endswith(".tar"):
            locations, kind = [data_dir], "pattern"
        else:
            raise UserError(f"--data_dir {data_dir}: a remote folder cannot be listed; name its shards with a brace "
                            "pattern (https://host/path/train-{0000..0127}.tar) or a list file of URLs (shards.txt)")
    else:
        folder = os.path.abspath(_local(data_dir))
        if os.path.isfile(folder) and folder.endswith(".tar"):
            locations, kind = [folder], "pattern"
        elif any(_has_tars(os.path.join(folder, s)) for s in SPLIT_NAMES):
            splits = {s: sorted(glob.glob(os.path.join(folder, s, "*.tar"))) for s in SPLIT_NAMES}
            return ShardLayout(data_dir, splits, folder)
        else:
            locations, kind = sorted(glob.glob(os.path.join(folder, "*.tar"))), "folder"
    if not locations:
        raise DataMistake(f"--data_dir {data_dir} names no shards")
    # Named by a pattern or a list: each must exist (one stat per shard; a folder's listing found them already).
    missing = [] if kind == "folder" else [loc for loc in locations
                                           if not is_remote(loc) and not os.path.isfile(_local(loc))]
    if missing:
        raise DataMistake(f"shard {missing[0]} is listed by --data_dir {data_dir} but does not exist"
                          f"{f' ({len(missing) - 1} more missing)' if len(missing) > 1 else ''}; fix the "
                          f"{'pattern' if kind == 'pattern' else 'list'} or restore the file")
    locations = [loc if is_remote(loc) else os.path.abspath(_local(loc)) for loc in locations]
    first = locations[0]
    root = first.rsplit("/", 1)[0] if is_remote(first) else os.path.dirname(first)
    return ShardLayout(data_dir, _by_name(data_dir, locations), root)


def split_exists(data_dir: str, split: str) -> bool:
    """Whether ``--data_dir`` has the split: a ``split/`` folder of images, or shards of that split."""
    if is_shards(data_dir):
        try:
            return bool(shard_layout(data_dir).splits.get(split))
        except UserError:
            return False
    return os.path.isdir(os.path.join(data_dir, split))


def read_classes(layout: ShardLayout) -> list[str] | None:
    """The class names of ``classes.json`` beside the shards (a JSON list of strings), or None when there is none."""
    path = f"{layout.root}/{CLASSES_FILE}" if is_remote(layout.root) else os.path.join(layout.root, CLASSES_FILE)
    try:
        text = read_text(path, missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError as e:
        raise DataMistake(f"{path} is not valid JSON ({e}); it should be a list of class names") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise DataMistake(f"{path} should be a JSON list of class names (label i is the i-th name)")
    return names


# -- reading members --------------------------------------------------------------------------------------
@dataclass
class ShardMembers:
    """Where each sample's image bytes lie: ``shards[shard[i]]`` at byte ``offset[i]``, ``nbytes[i]`` long.

    ``shards`` are local paths or URLs (``locate`` turns a URL into its cached local copy). Arrays, not lists of
    tuples: DataLoader workers share them without copy-on-write (as ``ImageIndex``)."""

    shards: list[str]
    shard: np.ndarray    # (N,) int32
    offset: np.ndarray   # (N,) int64
    nbytes: np.ndarray   # (N,) int64
    cache: object = None  # a ``ShardCache`` for remote shards
    shard_bytes: np.ndarray | None = None  # (S,) int64 each shard's size when indexed (a download must match it)

    def subset(self, keep) -> "ShardMembers":
        keep = np.asarray(keep)
        return ShardMembers(self.shards, self.shard[keep], self.offset[keep], self.nbytes[keep], self.cache,
                            self.shard_bytes)

    def reader(self) -> "MemberReader":
        return MemberReader(self)


def open_file_budget(shards: int) -> int:
    """How many shard files one process may keep open: all of them where the open-file limit allows, raising the
    soft limit towards the hard one if needed (a process's own limit: a DataLoader worker raises its own); else
    what the limit leaves. Every open on a network filesystem is a metadata call: an image's shard must not be
    opened again per image (with 1,024 shards and random access, an LRU of 64 would reopen for 94% of images)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = shards + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    limit = want if soft == resource.RLIM_INFINITY else soft
    return max(16, min(shards, limit - SPARE_FILES))


class MemberReader:
    """``read(i)`` -> the encoded image bytes of sample ``i``: one ``pread`` on a shard file this process keeps
    open (per process: the files of a forked worker are its own; ``open_file_budget`` of them, least recently used
    closed first). Failures are ``DecodeError`` naming the member, so the run's replacement policy handles them as
    it does a bad image file; a remote shard that cannot be fetched (``ShardFetchError``, after its retries) is not
    the image's fault and stops the run instead."""

    def __init__(self, members: ShardMembers):
        self.members = members
        self._files: OrderedDict[int, int] = OrderedDict()  # shard id -> fd, least recently used first
        self._pid = os.getpid()
        self._budget = None  # open_file_budget, set in the process that reads

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are shared, start our own
            self._files, self._pid, self._budget = OrderedDict(), os.getpid(), None
        if self._budget is None:
            self._budget = open_file_budget(len(self.members.shards))
        fd = self._files.get(s)
        if fd is not None:
            self._files.move_to_end(s)
            return fd
        location = self.members.shards[s]
        if is_remote(location):
            expected = self.members.shard_bytes
            fd = self.members.cache.open(location, int(expected[s]) if expected is not None else None)
        else:
            fd = os.open(_local(location), os.O_RDONLY)
        self._files[s] = fd
        while len(self._files) > self._budget:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def read(self, i: int, name: str = "") -> bytes:
        from rectrain.data.transforms import DecodeError
        m = self.members
        s, offset, n = int(m.shard[i]), int(m.offset[i]), int(m.nbytes[i])
        try:
            data = os.pread(self._fd(s), n, offset)
        except ShardFetchError:
            raise  # the network, not this image: the run stops (failures.guarded), it does not replace images
        except OSError as e:
            raise DecodeError(f"cannot read {name or m.shards[s]}: {e.strerror or e}") from None
        if len(data) != n:
            raise DecodeError(f"cannot read {name or m.shards[s]}: the shard ends at byte {offset + len(data):,}, "
                              f"inside this member ({n:,} bytes from {offset:,}): truncated since it was indexed")
        return data

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self):  # pickled into a spawned worker: without the open files
        return {"members": self.members}

    def __setstate__(self, state):
        self.__init__(state["members"])
