"""From scanned files to normalised device batches.

Workers decode and crop to uint8 (B, H, W, 3) batches, one bucket shape per batch; the main process
moves them to the device through pinned memory (a quarter of float32's bytes) and normalises there,
where the permute to (B, 3, H, W) is channels_last for free.

Randomness in workers is a pure function of (seed, epoch, sample index): a resumed run crops exactly as
an uninterrupted one did, whatever the worker count, and skipped batches are never decoded.
A file that fails to decode is replaced by another image of the same bucket (the batch keeps its shape);
its path comes back with the batch, and ``DecodeFailurePolicy`` in the main process logs and counts it
and stops the run past ``--max_decode_failures``.
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from rectrain.arscan import SplitScan
from rectrain.buckets import BucketTable
from rectrain.errors import UserError
from rectrain.samplers import AspectRatioBatchSampler, DistributedBatchSampler, ValidationBatchSampler
from rectrain.transforms import IMAGENET_MEAN, IMAGENET_STD, DecodeError, RectangularCropTfm

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

    def __len__(self) -> int:
        return len(self.paths)

    def shapes_at(self, epoch: int) -> np.ndarray:
        if not self.epoch_shapes:
            return self.shapes
        return self.epoch_shapes[min(epoch, len(self.epoch_shapes) - 1)]

    def _load(self, i: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
        h, w = self.shapes_at(epoch)[self.bucket_ids[i]]
        path = os.path.join(self.split_dir, str(self.paths[i]))
        return self.transform(path, (int(h), int(w)), rng=rng, size_hw=tuple(int(s) for s in self.sizes[i]))

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
    starting at batch ``start`` of the first.

    One DataLoader iterator then spans epoch boundaries: the workers decode the next epoch's first batches
    while this epoch ends and validation runs, instead of every epoch starting with each worker decoding
    a whole batch alone (a ~1 s stall per epoch at batch 256). Skipped batches are index slicing: no image
    is read. ``select`` sets the range before ``iter(loader)``; by default one epoch, the sampler's current.
    """

    def __init__(self, sampler: DistributedBatchSampler):
        self.sampler = sampler
        self.range: tuple[int, int, int] | None = None  # (first, start, last)

    def select(self, first: int, start: int = 0, last: int | None = None) -> None:
        self.range = (first, start, first + 1 if last is None else last)

    def _range(self) -> tuple[int, int, int]:
        if self.range is not None:
            return self.range
        return self.sampler.epoch, self.sampler.start_batch, self.sampler.epoch + 1

    def __iter__(self):
        first, start, last = self._range()
        self.sampler.start_batch = 0  # a resume start applies to one iteration only, as in the sampler
        for epoch in range(first, last):
            for batch in self.sampler.rank_batches(epoch)[start if epoch == first else 0:]:
                yield [(int(i), epoch) for i in batch]

    def __len__(self) -> int:
        first, start, last = self._range()
        return max(0, (last - first) * len(self.sampler) - start)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which stops the run cleanly and then ends them.

    A scheduler (SLURM's scancel and preemption, systemd, ``kill -- -PGID``) signals the whole process group:
    PyTorch's worker handler would die of a SIGTERM that did not come from its parent and the main process would
    crash with "DataLoader worker ... killed by signal" before saving. Workers still exit when the main
    process does (PyTorch's watchdog).
    """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def cap_workers(requested: int, world_local: int = 1) -> tuple[int, str | None]:
    """Cap workers per process to the cores this process may use; returns (workers, note or None)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    limit = max(1, cores // max(world_local, 1))
    if requested > limit:
        return limit, (f"--workers {requested} capped to {limit}: {cores} CPU core(s) shared by "
                       f"{world_local} process(es) on this node")
    return requested, None


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader      # one epoch per iter() unless ``epochs`` chose a range
    val: torch.utils.data.DataLoader | None
    train_sampler: DistributedBatchSampler
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
        """Stop the worker processes now. Called on every way out of a run: workers ignore SIGTERM (the main
        process decides when to stop), so multiprocessing's exit handler, which SIGTERMs and then joins them, would
        wait forever for workers whose iterator happened to be still alive (after an exception, or until the garbage
        collector got to it)."""
        for loader in (self.train, self.val):
            shut_down(loader)


def start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` with SIGTERM/SIGINT blocked while the workers are forked.

    A scheduler's SIGTERM to the whole process group (scancel, preemption, ``kill -- -PGID``) that lands while
    workers start would kill a worker that has not yet reached its init function (PyTorch's handler dies of a
    SIGTERM not sent by the parent) and crash the run. Blocked, not ignored: a signal for the main process stays
    pending and is delivered when the block ends, so it is never lost; the workers inherit the block, and so never
    die of a stop signal (they end when the main process stops them, or with it).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_LIVE_LOADERS: "weakref.WeakSet[torch.utils.data.DataLoader]" = weakref.WeakSet()


@atexit.register
def _shut_down_all() -> None:
    """At interpreter exit, before multiprocessing's own exit handler (atexit runs the later-registered first),
    which SIGTERMs daemonic children and joins them: our workers ignore SIGTERM, so they are stopped here."""
    for loader in list(_LIVE_LOADERS):
        shut_down(loader)


def _track(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    if loader.num_workers > 0:
        _LIVE_LOADERS.add(loader)
    return loader


def shut_down(loader: torch.utils.data.DataLoader | None) -> None:
    """Stop a DataLoader's persistent workers (PyTorch keeps them in ``_iterator`` between epochs)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        workers = list(getattr(it, "_workers", ()))
        it._shutdown_workers()
        for w in workers:  # PyTorch's last resort is SIGTERM, which our workers block: a stuck one is killed
            if w.is_alive():
                w.kill()
                w.join(timeout=1)
    if loader is not None:
        loader._iterator = None


def build_loaders(train_scan: SplitScan, val_scan: SplitScan | None, buckets: BucketTable, *, batch_size: int,
                  val_batch_size: int, workers: int, seed: int, rank: int, world_size: int,
                  crop_scale=(0.08, 1.0), pin_memory: bool = False, decoder: str = "auto", hflip: float = 0.5,
                  crop: str = "random", epoch_shapes: list[np.ndarray] | None = None,
                  val_buckets: BucketTable | None = None, decode: str = "cpu", val_crop: float = 0.875) -> Loaders:
    """``buckets`` group the training images (and give their shapes unless ``epoch_shapes`` has a table per
    epoch); validation crops to ``val_buckets`` (default: ``buckets``). ``decode="gpu"``: workers read the file
    bytes and the crop geometry only (``rectrain.gpu_decode``); batches are then decoded on the device."""
    train_tfm = _for_decode(RectangularCropTfm(train=True, scale=tuple(crop_scale), hflip=hflip, crop=crop,
                                               decoder=decoder), decode)
    train_set = BucketDataset(train_scan, buckets, train_tfm, seed, epoch_shapes=epoch_shapes)
    base = AspectRatioBatchSampler(train_set.bucket_ids, batch_size, seed=seed)
    sampler = DistributedBatchSampler(base, num_replicas=world_size, rank=rank)
    if len(sampler) == 0:
        raise UserError(f"the training set ({len(train_set)} images) gives no batches of --batch_size {batch_size} "
                        f"for {world_size} process(es); lower --batch_size or add images")
    stream = EpochStream(sampler)
    train = _track(torch.utils.data.DataLoader(train_set, batch_sampler=stream, **_loader_kw(workers, pin_memory, decode)))
    val = val_set = None
    if val_scan is not None and len(val_scan.index):
        val, val_set = build_val_loader(val_scan, val_buckets or buckets, batch_size=val_batch_size, workers=workers,
                                        rank=rank, world_size=world_size, pin_memory=pin_memory, decoder=decoder,
                                        decode=decode, val_crop=val_crop)
    return Loaders(train, val, sampler, train_set, val_set, stream)


def _for_decode(tfm: RectangularCropTfm, decode: str):
    if decode != "gpu":
        return tfm
    from rectrain.gpu_decode import BytesCropTfm
    return BytesCropTfm(tfm)


def _loader_kw(workers: int, pin_memory: bool, decode: str = "cpu") -> dict:
    # Workers persist (no re-fork per epoch; validation's too) and prefetch 4 batches each.
    if decode == "gpu":
        from rectrain.gpu_decode import collate_encoded as collate_fn
    else:
        collate_fn = collate
    return dict(num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory, persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                worker_init_fn=_ignore_stop_signals if workers > 0 else None)


def build_val_loader(val_scan: SplitScan, buckets: BucketTable, *, batch_size: int, workers: int, rank: int,
                     world_size: int, pin_memory: bool = False, decoder: str = "auto", decode: str = "cpu",
                     val_crop: float = 0.875):
    """Deterministic centre crops, batches grouped by bucket, every image once across ranks."""
    tfm = RectangularCropTfm(train=False, val_crop=val_crop, decoder=decoder)
    val_set = BucketDataset(val_scan, buckets, _for_decode(tfm, decode), seed=0)
    vs = ValidationBatchSampler(val_set.bucket_ids, batch_size, num_replicas=world_size, rank=rank)
    keyed = [[(int(i), 0) for i in b] for b in vs]
    loader = _track(torch.utils.data.DataLoader(val_set, batch_sampler=keyed, **_loader_kw(workers, pin_memory, decode)))
    return loader, val_set


class DecodeFailures(UserError):
    pass


class DecodeFailurePolicy:
    """Images that fail to decode during a run (after the scan accepted them: storage errors, files changed).

    Each was already replaced in its batch by another image of the same bucket; here it is logged and
    counted, and past ``max_failures`` the run stops with one message. The list goes into checkpoints.
    """

    def __init__(self, max_failures: int, log=print):
        self.max_failures = max_failures
        self.log = log
        self.failures: list[str] = []

    def record(self, failed: list[str]) -> None:
        for f in failed:
            self.log(f"warning: could not decode {f}; replaced by another image of the same shape")
        self.failures.extend(failed)
        if len(self.failures) > self.max_failures:
            raise DecodeFailures(
                f"{len(self.failures)} images failed to decode (more than --max_decode_failures "
                f"{self.max_failures}); first: {self.failures[0]}. Check the dataset's storage or re-copy "
                "it; `rectrain scan --data_dir ...` lists unreadable files")

    def state_dict(self) -> list[str]:
        return list(self.failures)

    def load_state_dict(self, failures: list[str]) -> None:
        self.failures = list(failures)


def guarded(loader):
    """Iterate a loader, turning 'a whole run of images cannot be decoded' into one clear message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DecodeError as e:  # from a worker it carries the worker's traceback: keep our line only
            line = next((ln for ln in str(e).splitlines() if "failed to decode" in ln), str(e).splitlines()[0])
            raise DecodeFailures(f"{line[:500]}. The storage may be failing or the dataset changed since it was "
                                 "scanned: check the files, then run `rectrain scan --data_dir ...`") from None
        yield batch


class DeviceNormalize:
    """uint8 (B, H, W, 3) on the host -> normalised (B, 3, H, W) on the device, channels_last strides.

    The copy is non-blocking from pinned memory; the cast and normalisation run on the device.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).mul(255).view(1, 3, 1, 1)
        self.inv_std = torch.tensor(IMAGENET_STD, device=self.device).mul(255).reciprocal().view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC memory
        images = images.float().sub_(self.mean).mul_(self.inv_std).to(self.dtype)
        return images, labels.to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return f"DeviceNormalize(device={self.device}, dtype={self.dtype})"
