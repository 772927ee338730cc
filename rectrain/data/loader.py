"""From scanned files to uint8 batches on the host: the dataset, the training batch stream and the DataLoaders.

Workers decode and crop to uint8 (B, H, W, 3) batches, one bucket shape per batch (``rectrain.data.transforms``);
the main process moves them to the device through pinned memory (a quarter of float32's bytes), where
``rectrain.training.step.DeviceNormalize`` normalises them.

Randomness in workers is a pure function of (seed, epoch, sample index): a resumed run crops exactly as
an uninterrupted one did, whatever the worker count, and skipped batches are never decoded.
A file that fails to decode is replaced by another image of the same bucket (the batch keeps its shape);
its path comes back with the batch, for ``rectrain.data.failures.DecodeFailurePolicy`` in the main process.
The workers' processes (signals, shutdown) are ``rectrain.data.workers``' business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from rectrain.data.buckets import BucketTable
from rectrain.data.samplers import (AspectRatioBatchSampler, DistributedBatchSampler, ValidationBatchSampler,
                                    WindowedBatchSampler, shard_windows)
from rectrain.data.scan import SplitScan
from rectrain.data.transforms import DecodeError, FallbackNotes, RectangularCropTfm
from rectrain.data.workers import ignore_stop_signals, shut_down, start_workers, track
from rectrain.errors import UserError

__all__ = ["LoaderSettings", "BucketDataset", "EpochStream", "collate", "Loaders", "build_loaders",
           "build_val_loader"]

REPLACEMENT_TRIES = 8


class BucketDataset(torch.utils.data.Dataset):
    """Items are keyed by ``(sample_index, epoch)``; returns ((H, W, 3) uint8, label, failed paths)."""

    def __init__(self, scan: SplitScan, buckets: BucketTable, transform: RectangularCropTfm, seed: int = 0,
                 epoch_shapes: list[np.ndarray] | None = None):
        self.split_dir = scan.index.split_dir
        self.paths = scan.index.paths  # numpy str array: no per-item refcounts to copy-on-write in workers
        self.labels = scan.index.labels
        self.sizes = scan.sizes
        self.bucket_ids = buckets.assign(scan.sizes)
        self.shapes = buckets.shapes
        # Progressive resolution: epoch e crops to epoch_shapes[e] (the same buckets, scaled); later epochs
        # use the last table, and without a schedule every epoch uses ``shapes``.
        self.epoch_shapes = epoch_shapes
        self.transform = transform
        self.seed = seed
        # Shards: each sample's bytes are read from its shard by offset (one open file per shard per worker).
        self.reader = None if scan.index.members is None else scan.index.members.reader()

    def __len__(self) -> int:
        return len(self.paths)

    def shapes_at(self, epoch: int) -> np.ndarray:
        if not self.epoch_shapes:
            return self.shapes
        return self.epoch_shapes[min(epoch, len(self.epoch_shapes) - 1)]

    def _load(self, i: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
        h, w = self.shapes_at(epoch)[self.bucket_ids[i]]
        path = os.path.join(self.split_dir, str(self.paths[i]))  # a shard member's is shard.tar:key
        src = path if self.reader is None else self.reader.read(i, path)
        return self.transform(src, (int(h), int(w)), rng=rng, size_hw=tuple(int(s) for s in self.sizes[i]), name=path)

    def __getitem__(self, key):
        i, epoch = key
        rng = np.random.default_rng([self.seed, epoch, i])
        failed = []
        for _ in range(REPLACEMENT_TRIES):
            try:
                return self._load(i, epoch, rng), int(self.labels[i]), failed
            except DecodeError as e:
                failed.append(str(e))
                # Only on failure: an O(N) search would cost ~1 ms per image on ImageNet.
                i = int(rng.choice(np.flatnonzero(self.bucket_ids == self.bucket_ids[i])))
        raise DecodeError(f"{REPLACEMENT_TRIES} images of one bucket failed to decode in a row, e.g. {failed[0]}")


class EpochStream:
    """The training DataLoader's batch sampler: ``(index, epoch)`` keys of epochs ``first .. last - 1`` back to back,
    starting at batch ``start`` of the first. This is where a run's position in its data lives: a resumed run
    ``select``s the epoch and batch it stopped at (the checkpoint's ``epoch`` and ``batch_in_epoch``).

    One DataLoader iterator then spans epoch boundaries: the workers decode the next epoch's first batches
    while this epoch ends and validation runs, instead of every epoch starting with each worker decoding
    a whole batch alone (a ~1 s stall per epoch at batch 256). Skipped batches are index slicing: no image
    is read. ``select`` sets the range before ``iter(loader)``; by default one epoch, the sampler's current.
    """

    def __init__(self, sampler: DistributedBatchSampler):
        self.sampler = sampler
        self.range: tuple[int, int, int] | None = None  # (first, start, last)

    def select(self, first: int, start: int = 0, last: int | None = None) -> None:
        if not 0 <= start <= len(self.sampler):
            raise ValueError(f"start batch {start} is outside an epoch's {len(self.sampler)} batches per rank")
        self.range = (first, start, first + 1 if last is None else last)

    def _range(self) -> tuple[int, int, int]:
        if self.range is not None:
            return self.range
        return self.sampler.epoch, 0, self.sampler.epoch + 1

    def __iter__(self):
        first, start, last = self._range()
        for epoch in range(first, last):
            for batch in self.sampler.rank_batches(epoch)[start if epoch == first else 0:]:
                yield [(int(i), epoch) for i in batch]

    def __len__(self) -> int:
        first, start, last = self._range()
        return max(0, (last - first) * len(self.sampler) - start)


def collate(items):
    """((H, W, 3) uint8, label, failed paths) items -> (B, H, W, 3) uint8 images, (B,) int64 labels, failed paths."""
    shape = (len(items), *items[0][0].shape)
    if torch.utils.data.get_worker_info() is not None:
        # In a worker, build the batch in shared memory directly (as default_collate does): otherwise the
        # 40-80 MB batch would be copied once more into shared memory on its way to the main process.
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
        images = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        images = torch.empty(shape, dtype=torch.uint8)
    np.stack([it[0] for it in items], out=images.numpy())
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    failed = [f for it in items for f in it[2]]
    return images, labels, failed


@dataclass(frozen=True)
class LoaderSettings:
    """What the DataLoaders take from a run's settings: a typed slice of ``TrainConfig`` (``cfg.slice(LoaderSettings,
    pin_memory=..., rank=..., world_size=...)``) whose field names are the config's, plus where this process runs."""

    batch_size: int = 256                 # per process
    val_batch_size: int | None = None     # None: batch_size
    workers: int = 0                      # DataLoader worker processes (already capped to the cores)
    seed: int = 0                         # sampler order and per-sample crops
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    train_crop: str = "random"            # random | resize
    val_crop: float = 0.875
    decoder: str = "auto"                 # auto | turbo | opencv | pil (the CPU decoder)
    decode: str = "cpu"                   # cpu | gpu (resolved: workers decode, or only read the bytes)
    pin_memory: bool = False
    rank: int = 0
    world_size: int = 1
    ddp_leftovers: str = "mix"            # each bucket's batches too few for a round: mix | drop | split (samplers)

    @property
    def val_batch(self) -> int:
        return self.val_batch_size or self.batch_size


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader      # one epoch per iter() unless ``epochs`` chose a range
    val: torch.utils.data.DataLoader | None
    train_sampler: DistributedBatchSampler  # or WindowedBatchSampler (remote shards, bounded cache)
    train_set: BucketDataset
    val_set: BucketDataset | None
    stream: EpochStream

    def epochs(self, first: int, start: int, last: int):
        """One iterator over the training batches of epochs ``first .. last - 1``, from batch ``start`` of the first."""
        self.stream.select(first, start, last)
        return start_workers(self.train)

    def validation(self):
        """An iterator over this rank's validation batches (the persistent workers are started once)."""
        return start_workers(self.val)

    def close(self) -> None:
        """Stop the worker processes now; call it on every way out of a run (``rectrain.data.workers``)."""
        for loader in (self.train, self.val):
            shut_down(loader)


def build_loaders(train_scan: SplitScan, val_scan: SplitScan | None, buckets: BucketTable, settings: LoaderSettings,
                  epoch_shapes: list[np.ndarray] | None = None, val_buckets: BucketTable | None = None,
                  log=None) -> Loaders:
    """``buckets`` group the training images (and give their shapes unless ``epoch_shapes`` has a table per
    epoch); validation crops to ``val_buckets`` (default: ``buckets``). ``settings.decode == "gpu"``: workers read
    the file bytes and the crop geometry only (``rectrain.data.gpu_decode``); batches are then decoded on the device.
    ``log``: the rank's log, where both loaders' workers tell of images the region decoder hands on (default
    stderr)."""
    s = settings
    notes = FallbackNotes(log)  # one count for the rank: both loaders' workers
    train_tfm = _for_decode(RectangularCropTfm(train=True, scale=tuple(s.crop_scale), hflip=s.hflip, crop=s.train_crop,
                                               decoder=s.decoder, fallback_notes=notes), s.decode)
    train_set = BucketDataset(train_scan, buckets, train_tfm, s.seed, epoch_shapes=epoch_shapes)
    sampler = _windowed(train_scan, val_scan, train_set.bucket_ids, s)
    if sampler is None:
        base = AspectRatioBatchSampler(train_set.bucket_ids, s.batch_size, seed=s.seed)
        sampler = DistributedBatchSampler(base, num_replicas=s.world_size, rank=s.rank, leftovers=s.ddp_leftovers)
    if len(sampler) == 0:
        raise UserError(f"the training set ({len(train_set)} images) gives no batches of --batch_size {s.batch_size} "
                        f"for {s.world_size} process(es); lower --batch_size or add images")
    stream = EpochStream(sampler)
    train = track(torch.utils.data.DataLoader(train_set, batch_sampler=stream, **_loader_kw(s)))
    val = val_set = None
    if val_scan is not None and len(val_scan.index):
        val, val_set = build_val_loader(val_scan, val_buckets or buckets, s, notes)
    return Loaders(train, val, sampler, train_set, val_set, stream)


def _windowed(scan: SplitScan, val_scan: SplitScan | None, bucket_ids: np.ndarray,
              s: LoaderSettings) -> WindowedBatchSampler | None:
    """Remote shards whose copies do not all fit the cache: batches drawn one window of shards at a time
    (``WindowedBatchSampler``), a window being half of what the val shards leave of the cache (validation reads
    every val shard each time); None otherwise."""
    members = scan.index.members
    cache = getattr(members, "cache", None)
    if cache is None or members.shard_bytes is None:
        return None
    val = val_scan.index.members if val_scan is not None else None
    reserved = int(val.shard_bytes.sum()) if val is not None and val.cache is not None and val.shard_bytes is not None \
        else 0
    if int(members.shard_bytes.sum()) + reserved <= cache.max_bytes:
        return None
    budget = (cache.max_bytes - reserved) // 2
    largest = int(members.shard_bytes.max())
    if budget < largest:
        raise UserError(f"--shard_cache_gb {cache.max_bytes / 1e9:g} is too small for these remote shards: the val "
                        f"shards take {reserved / 1e9:.3g} GB of it and a window of train shards needs twice the "
                        f"largest one ({largest / 1e9:.3g} GB); raise it to at least "
                        f"{(reserved + 2 * largest) / 1e9:.3g} (ten times that keeps batches well mixed)")
    windows = shard_windows(members.shard, members.shard_bytes, budget, s.seed)
    return WindowedBatchSampler(bucket_ids, windows, s.batch_size, seed=s.seed, num_replicas=s.world_size,
                                rank=s.rank, leftovers=s.ddp_leftovers)


def _for_decode(tfm: RectangularCropTfm, decode: str):
    if decode != "gpu":
        return tfm
    from rectrain.data.gpu_decode import BytesCropTfm
    return BytesCropTfm(tfm)


def _loader_kw(s: LoaderSettings) -> dict:
    # Workers persist (no re-fork per epoch; validation's too) and prefetch 4 batches each.
    if s.decode == "gpu":
        from rectrain.data.gpu_decode import collate_encoded as collate_fn
    else:
        collate_fn = collate
    return dict(num_workers=s.workers, collate_fn=collate_fn, pin_memory=s.pin_memory,
                persistent_workers=s.workers > 0, prefetch_factor=4 if s.workers > 0 else None,
                worker_init_fn=ignore_stop_signals if s.workers > 0 else None)


def build_val_loader(val_scan: SplitScan, buckets: BucketTable, settings: LoaderSettings,
                     fallback_notes: FallbackNotes | None = None):
    """Deterministic centre crops, batches grouped by bucket, every image once across ranks -> (loader, dataset).
    ``fallback_notes``: where to tell of images the region decoder hands on (None: counted, not told)."""
    s = settings
    tfm = RectangularCropTfm(train=False, val_crop=s.val_crop, decoder=s.decoder, fallback_notes=fallback_notes)
    val_set = BucketDataset(val_scan, buckets, _for_decode(tfm, s.decode), seed=0)
    vs = ValidationBatchSampler(val_set.bucket_ids, s.val_batch, num_replicas=s.world_size, rank=s.rank)
    keyed = [[(int(i), 0) for i in b] for b in vs]
    loader = track(torch.utils.data.DataLoader(val_set, batch_sampler=keyed, **_loader_kw(s)))
    return loader, val_set
