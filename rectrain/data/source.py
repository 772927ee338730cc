"""What a ``--data_dir`` holds, scanned: an image folder (``rectrain.data.scan``) or tar shards
(``rectrain.data.shard_index``). Every caller asks here, so the two readers need not know each other.

Both give a ``SplitScan``: the split's samples (an ``ImageIndex``; for shards with each member's shard and offset),
their upright sizes, the unusable files, and the cache (or index) file it came from with its fingerprint, which
``load_scan`` lets the other ranks read without listing the data.
"""

from __future__ import annotations

from rectrain.data.scan import DEFAULT_MAX_PIXELS, SplitScan, load_folder_scan, scan_folder
from rectrain.data.shard_index import load_index_scan, scan_shards
from rectrain.data.shards import is_shards

__all__ = ["scan_split", "load_scan", "shared_scan"]


def scan_split(data_dir: str, split: str, classes: list[str] | None = None, *, cache_dir: str | None = None,
               workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               progress: bool = False, shard_cache=None) -> SplitScan:
    """Index ``data_dir``'s ``split``, read every image's upright size (or reuse the cache) and report bad files.

    An image folder: ``scan.scan_folder``. Tar shards (``rectrain.data.shards``): their index is read or built
    (``shard_index.scan_shards``; ``shard_cache``: where remote shards are kept).
    ``classes``: train's class map when scanning val (see ``rectrain.data.index.build_index``).
    ``cache_dir``: where to keep the cache when ``data_dir`` is not writable (e.g. the run's folder).
    ``workers``: processes for a fresh scan (None: one per usable core; small scans run inline).
    """
    if is_shards(data_dir):  # tar shards: their index plays the cache's part
        return scan_shards(data_dir, split, classes, cache_dir=cache_dir, workers=workers, max_pixels=max_pixels,
                           progress=progress, shard_cache=shard_cache)
    return scan_folder(data_dir, split, classes, cache_dir=cache_dir, workers=workers, max_pixels=max_pixels,
                       progress=progress)


def load_scan(path: str, fp: str, data_dir: str, split: str, classes: list[str] | None = None,
              shard_cache=None) -> SplitScan | None:
    """The scan that another process (rank 0) wrote to ``path`` (a scan cache or a shard index) with fingerprint
    ``fp``, read without listing or stat'ing the dataset; None when the file is not (or no longer) that one."""
    if is_shards(data_dir):
        return load_index_scan(path, fp, data_dir, split, shard_cache, classes)
    return load_folder_scan(path, fp, data_dir, split, classes)


def shared_scan(data_dir: str, split: str, classes: list[str] | None = None, *, is_primary: bool, log,
                cache_dir: str | None = None, shard_cache=None) -> SplitScan:
    """``scan_split`` for every rank of a run (one process or many; collectives only when distributed).

    Rank 0 scans (and writes the cache; for shards: reads or builds their index) first, telling the others if it
    failed. The others then load the file rank 0 names, by its path and fingerprint: they neither list nor stat the
    dataset (at 64 ranks and ImageNet's 1.28 million files, listing it everywhere was 82 million metadata calls on
    the shared filesystem: docs/benchmarks.md). Where that file is not readable (no writable place for it, or a
    node-local cache folder on another node), a rank scans for itself. ``log``: this rank's log (a failure's
    traceback, and where a rank's scan came from)."""
    from rectrain.runtime.distributed import broadcast_object, on_primary  # torch: only runs of processes need it
    kw = dict(classes=classes, cache_dir=cache_dir, workers=None, progress=is_primary, shard_cache=shard_cache)
    scan = on_primary(lambda: scan_split(data_dir, split, **kw), f"scanning {split}/", log)
    where = broadcast_object((scan.cache_path, scan.fingerprint) if scan is not None else None)
    if scan is not None:
        return scan
    if where[0]:
        loaded = load_scan(*where, data_dir, split, classes, shard_cache)
        if loaded is not None:
            log(f"{split}: read rank 0's {'index' if loaded.index.members is not None else 'scan'} {where[0]} "
                f"({loaded.seconds:.2f} s, without listing the data)")
            return loaded
    return scan_split(data_dir, split, **kw)
