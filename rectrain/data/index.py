"""The image-folder index: which files of ``DATA_DIR/<split>/<class>/...`` are samples, and their labels.

Layout is ImageNet's: ``DATA_DIR/{train,val}/<class>/<images>`` (images may sit in sub-folders of a
class). Classes are the sorted class-folder names of train; val reuses train's class map, so a label
means the same class in both (a val class unknown to train is an error naming it).

The sample list lives in numpy arrays (paths as a numpy str array, labels int64), not a list of
Python tuples: DataLoader workers forked from the main process then share it without touching
per-object refcounts, which would copy it page by page into every worker.

Hidden entries (name starting with ``.``) and files without an image extension are skipped, counted by reason
and named by a few examples (``describe_skipped``). Whether an image file is *usable* is decided later, by the header scan
(``rectrain.data.scan``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from rectrain.errors import DataMistake

__all__ = ["IMAGE_EXTENSIONS", "LAYOUT", "ImageIndex", "build_index", "class_names", "describe_skipped", "list_files",
           "missing_classes", "name_some"]

# Lowercase with the dot; a file's extension is compared lowercased, so .JPEG and .Png count too.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
LAYOUT = "DATA_DIR/{train,val}/<class>/<images>"


@dataclass
class ImageIndex:
    """The samples of one split. ``paths`` are relative to ``split_dir``, sorted; ``labels[i]`` indexes ``classes``."""

    split_dir: str  # absolute path of DATA_DIR/<split>
    classes: list[str]  # sorted class names: the class map shared by train and val
    paths: np.ndarray  # (N,) numpy str array
    labels: np.ndarray  # (N,) int64
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, e.g. {"hidden": 2}
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first few paths, relative
    # Shards (``rectrain.data.shards.ShardMembers``): where each sample's image bytes lie; ``paths`` are then the
    # members' names, ``shard.tar:key``. None: an image folder, ``paths`` are files.
    members: object = None

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> str:
        return os.path.join(self.split_dir, str(self.paths[i]))

    def subset(self, keep: np.ndarray) -> "ImageIndex":
        """The samples selected by ``keep`` (a boolean mask of length N, or indices); same class map."""
        keep = np.asarray(keep)
        members = None if self.members is None else self.members.subset(keep)
        return ImageIndex(self.split_dir, list(self.classes), self.paths[keep], self.labels[keep], dict(self.skipped),
                          dict(self.skipped_examples), members)


SKIP_REASONS = {"hidden": "hidden (name starts with '.')", "not_image": "not an image by extension",
                "not_file": "not a regular file (broken link, socket)", "symlink_loop": "a link back up the tree",
                "outside_class": "beside the class folders, in no class"}
EXAMPLES = 3  # paths kept per reason


def describe_skipped(index: ImageIndex) -> list[str]:
    """One line per reason a file was left out, with its count and first few paths (e.g. ``._photo.jpg``,
    ``Thumbs.db``, ``README.txt``); [] when nothing was."""
    lines = []
    for reason, count in sorted(index.skipped.items()):
        shown = sorted(index.skipped_examples.get(reason, []))
        more = f", ... ({count - len(shown):,} more)" if count > len(shown) else ""
        lines.append(f"{count:,} {SKIP_REASONS.get(reason, reason)}: {', '.join(shown)}{more}")
    return lines


def name_some(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more: for messages that name classes or files."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def missing_classes(train: ImageIndex, val: ImageIndex) -> list[str]:
    """Train's classes with no image in val: their accuracy is never measured."""
    present = np.bincount(val.labels, minlength=len(train.classes)) > 0
    return [c for c, p in zip(train.classes, present) if not p]


class _Skips:
    """Counts and first examples of skipped entries, by reason."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(path)


@dataclass
class FileList:
    """What one walk of a split finds: the index plus each sample's (size, mtime) for the scan's fingerprint."""

    index: ImageIndex
    nbytes: np.ndarray  # (N,) int64, file sizes in bytes
    mtime_ns: np.ndarray  # (N,) int64


def _is_image(name: str) -> bool:
    return name[name.rfind("."):].lower() in IMAGE_EXTENSIONS  # os.path.splitext costs 3x more per file


def _walk_class(class_dir: str, prefix: str, out: list, skipped: _Skips, seen: set | None = None) -> None:
    """Append (relative path, size, mtime_ns) of every image under ``class_dir`` (recursively) to ``out``.

    ``seen``: (device, inode) of the folders on the way down, so a symlink back up is skipped, not followed forever.
    """
    try:
        st = os.stat(class_dir)
        entries = list(os.scandir(class_dir))
    except OSError as e:
        raise DataMistake(f"cannot list {class_dir}: {e.strerror}; check its permissions") from e
    seen = (seen or set()) | {(st.st_dev, st.st_ino)}
    for entry in entries:
        if entry.name.startswith("."):
            skipped.add("hidden", prefix + entry.name)
        elif entry.is_dir():
            sub = entry.stat()
            if (sub.st_dev, sub.st_ino) in seen:
                skipped.add("symlink_loop", prefix + entry.name)
            else:
                _walk_class(entry.path, prefix + entry.name + "/", out, skipped, seen)
        elif not entry.is_file():  # broken symlink, socket, ...
            skipped.add("not_file", prefix + entry.name)
        elif not _is_image(entry.name):
            skipped.add("not_image", prefix + entry.name)
        else:
            st = entry.stat()  # follows symlinks; cached by scandir where the OS allows
            out.append((prefix + entry.name, st.st_size, st.st_mtime_ns))


def _class_dirs(split_dir: str, skipped: _Skips) -> list[str]:
    """Sorted names of the class folders of a split; counts what else sits at the split's top level."""
    names = []
    for entry in os.scandir(split_dir):
        if entry.name.startswith("."):
            skipped.add("hidden", entry.name)
        elif entry.is_dir():
            names.append(entry.name)
        else:  # a file beside the class folders belongs to no class (e.g. the scan cache)
            skipped.add("outside_class", entry.name)
    return sorted(names)


def _check_split_dir(data_dir: str, split: str) -> str:
    if not os.path.isdir(data_dir):
        raise DataMistake(f"data directory {data_dir} does not exist (or is not a directory); "
                        f"expected the layout {LAYOUT}")
    split_dir = os.path.abspath(os.path.join(data_dir, split))
    if not os.path.isdir(split_dir):
        raise DataMistake(f"{split_dir} does not exist; expected the layout {LAYOUT}")
    return split_dir


def list_files(data_dir: str, split: str, classes: list[str] | None = None) -> FileList:
    """Walk ``data_dir/split`` once: the index and each sample's size and mtime (see ``build_index``)."""
    split_dir = _check_split_dir(data_dir, split)
    skipped = _Skips()
    found = _class_dirs(split_dir, skipped)
    if not found:
        raise DataMistake(f"{split_dir} has no class folders; expected the layout {LAYOUT}")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataMistake(f"{split_dir} has class folder(s) unknown to the training set: {name_some(unknown)}; "
                            f"val classes must be a subset of train's ({len(classes)} classes)")
    class_id = {c: i for i, c in enumerate(classes)}
    rows, labels = [], []
    for name in found:  # one thread: with page-cached metadata, threads only fight over the GIL (2x slower)
        before = len(rows)
        _walk_class(os.path.join(split_dir, name), name + "/", rows, skipped)
        labels += [class_id[name]] * (len(rows) - before)
    if not rows:
        raise DataMistake(f"{split_dir} has {len(found)} class folder(s) but no image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}); expected the layout {LAYOUT}")
    paths = np.array([r[0] for r in rows], dtype=str)
    order = np.argsort(paths, kind="stable")
    index = ImageIndex(split_dir, classes, paths[order], np.asarray(labels, dtype=np.int64)[order], skipped.counts,
                       skipped.examples)
    nbytes = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))[order]
    mtime_ns = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))[order]
    return FileList(index, nbytes, mtime_ns)


def class_names(data_dir: str, split: str = "train") -> list[str]:
    """The sorted class-folder names of a split, without walking the classes (e.g. train's map for val)."""
    return _class_dirs(_check_split_dir(data_dir, split), _Skips())


def build_index(data_dir: str, split: str, classes: list[str] | None = None) -> ImageIndex:
    """Index ``data_dir/split``.

    ``classes=None``: the classes are the split's sorted sub-folders (use this for train).
    ``classes`` given (train's, for val): labels follow that map; a class folder it lacks is a ``UserError``.
    A missing directory, a split without class folders or without images is a ``UserError`` naming the
    path and the expected layout.
    """
    return list_files(data_dir, split, classes).index
