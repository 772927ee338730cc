"""Batch samplers: which images form each batch, and which rank trains on it.

Every batch comes from one aspect-ratio bucket (one (H, W) shape). The order is a pure function of
``(seed, epoch)``: every rank computes the same global batch list without talking, and a resumed run
sees exactly the batches an uninterrupted one would have.

- ``AspectRatioBatchSampler``: the global batch list of an epoch (shuffle within buckets, cut into
  batches, shuffle the batch order). Replaces the seed's sorted chunks, which never changed.
- ``DistributedBatchSampler``: deals those batches to ranks in rounds of one bucket, so that at every
  step all ranks train the same (H, W) shape (DDP waits for the slowest rank); the same number of
  batches on every rank (DDP deadlocks otherwise). What happens to each bucket's last batches, too few
  for a round, is its ``leftovers`` policy (``LEFTOVER_POLICIES``: mix, drop or split).
- ``ValidationBatchSampler``: every image exactly once across ranks, batches grouped by bucket
  (fast.ai's rectangular validation); ranks may get different batch counts.
- ``WindowedBatchSampler``: remote shards behind a bounded cache: ``DistributedBatchSampler`` on one window of
  shards at a time.

Samplers yield lists of dataset indices (ints), as ``torch.utils.data.DataLoader(batch_sampler=...)``
expects; they do not import torch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["AspectRatioBatchSampler", "DistributedBatchSampler", "ValidationBatchSampler", "WindowedBatchSampler",
           "shard_windows", "ORDER_VERSION", "LEFTOVER_POLICIES", "SPLIT_MIN_BATCH"]

# The training order for a given (seed, epoch, world size, bucket counts) is part of a checkpoint's meaning:
# resuming mid-epoch under another order version gives that epoch a different tail. 1: round-robin
# dealing of the shuffled batch list; 2: same-shape rounds (issue 8). World size 1 is the same in both.
ORDER_VERSION = 2

# What DistributedBatchSampler does with the batches of a bucket that do not fill a round (issue 18). The order of
# ``mix`` is ORDER_VERSION's; the policy is a run setting (``--ddp_leftovers``), saved with the run's config.
LEFTOVER_POLICIES = ("mix", "drop", "split")
# ``split`` never makes a batch of fewer images per rank than this: a batch of one image gives BatchNorm no batch
# statistics where a feature map is 1x1 (the same rule as AspectRatioBatchSampler's single-image buckets).
SPLIT_MIN_BATCH = 2

# SeedSequence spawn keys: the batch-order stream and one stream per bucket, all derived from
# (seed, epoch). Spawn keys keep them independent of each other and of any other
# default_rng([seed, epoch, i]) stream (e.g. per-sample crops), which plain entropy lists would not:
# numpy treats [s, e] and [s, e, 0] as the same seed.
_ORDER_STREAM = 0
_BUCKET_STREAM = 1
_LEFTOVER_STREAM = 2  # which leftover batches DistributedBatchSampler drops


def _rng(seed: int, epoch: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=key))


def _check_bucket_ids(bucket_ids) -> np.ndarray:
    ids = np.asarray(bucket_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"bucket_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError("bucket_ids must be >= 0")
    return ids.astype(np.int64, copy=False)


def _check_positive(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_world(num_replicas: int, rank: int) -> tuple[int, int]:
    num_replicas = _check_positive("num_replicas", num_replicas)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, int(rank)


def _group_by_bucket(ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(K,) bucket keys and, per bucket, its dataset indices in increasing order."""
    order = np.argsort(ids, kind="stable")
    keys, starts = np.unique(ids[order], return_index=True)
    return keys, np.split(order, starts[1:]) if len(order) else []


class AspectRatioBatchSampler:
    """Every batch from one bucket; a new composition every epoch, a pure function of (seed, epoch).

    Per epoch: each bucket's indices are shuffled (a generator per bucket, seeded from
    ``(seed, epoch, bucket)``), cut into batches, and the batch order is shuffled (seeded from
    ``(seed, epoch)``). No global RNG is touched.

    Batch cutting, ``drop_last=True`` (training default):
      1. a bucket gives ``n // batch_size`` full batches; its leftover (fewer than ``batch_size`` images,
         different ones each epoch since the bucket was shuffled) is dropped: on real data every batch
         then has exactly ``batch_size`` images, one batch shape per bucket;
      2. a bucket with no full batch gives all its images as one smaller batch, so tiny datasets train;
         a bucket holding a single image gives none (a batch of one image gives BatchNorm no batch
         statistics, and breaks it where a feature map is 1x1).
    ``drop_last=False``: every image exactly once per epoch; each bucket's leftover is a smaller batch
    (possibly of one image). ``DistributedBatchSampler`` falls back to this when an epoch has fewer
    batches than ranks.

    The batch sizes depend only on the bucket counts, so ``len(self)`` is the same every epoch.
    """

    def __init__(self, bucket_ids: np.ndarray, batch_size: int, seed: int = 42, drop_last: bool = True):
        self.bucket_ids = _check_bucket_ids(bucket_ids)
        self.batch_size = _check_positive("batch_size", batch_size)
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._keys, self._members = _group_by_bucket(self.bucket_ids)
        # Per bucket, the sizes of its batches: the same every epoch.
        self._plans = {d: [self._cut(len(m), d) for m in self._members] for d in (True, False)}

    def _cut(self, n: int, drop_last: bool) -> list[int]:
        full, rest = divmod(n, self.batch_size)
        keep_rest = not drop_last or (full == 0 and rest >= 2)
        return [self.batch_size] * full + ([rest] if rest and keep_rest else [])

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def _plan(self, drop_last: bool | None) -> list[list[int]]:
        return self._plans[self.drop_last if drop_last is None else bool(drop_last)]

    def batch_sizes(self, drop_last: bool | None = None) -> list[int]:
        """Sizes of an epoch's batches, unshuffled (the same multiset every epoch)."""
        return [s for sizes in self._plan(drop_last) for s in sizes]

    def bucket_batch_sizes(self, drop_last: bool | None = None) -> list[list[int]]:
        """Per bucket that has batches, the sizes of its batches, in ``bucket_batches``' order (the same every epoch)."""
        return [list(sizes) for sizes in self._plan(drop_last) if sizes]

    def bucket_batches(self, epoch: int, drop_last: bool | None = None) -> list[list[np.ndarray]]:
        """The epoch's batches grouped by bucket, before the order shuffle: one list per bucket that has
        batches, buckets in increasing id (= ratio order for a ``BucketTable``). Pure in (seed, epoch)."""
        out = []
        for key, members, sizes in zip(self._keys, self._members, self._plan(drop_last)):
            if not sizes:
                continue
            perm = _rng(self.seed, epoch, _BUCKET_STREAM, int(key)).permutation(members)
            out.append(np.split(perm[:sum(sizes)], np.cumsum(sizes)[:-1]))
        return out

    def batches(self, epoch: int, drop_last: bool | None = None) -> list[np.ndarray]:
        """The epoch's batches, (B_i,) int64 dataset indices each. Pure: same (seed, epoch) -> same list.

        ``drop_last`` overrides the constructor's policy (DistributedBatchSampler's tiny-dataset fallback).
        """
        out = [b for group in self.bucket_batches(epoch, drop_last) for b in group]
        order = _rng(self.seed, epoch, _ORDER_STREAM).permutation(len(out))
        return [out[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batch_sizes())

    def __repr__(self) -> str:
        return (f"AspectRatioBatchSampler(images={len(self.bucket_ids)}, buckets={len(self._keys)}, "
                f"batch_size={self.batch_size}, batches={len(self)}, seed={self.seed}, drop_last={self.drop_last})")


def _split_until(batches: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Halve the largest batch (first of equals) until there are ``count`` batches; [] if impossible.

    Only used when an epoch has fewer batches than ranks (tiny datasets): halving the largest keeps
    batch sizes as even as possible (batches of two or more whenever the largest batch has four).
    """
    batches = list(batches)
    while len(batches) < count:
        i = int(np.argmax([len(b) for b in batches])) if batches else 0
        if not batches or len(batches[i]) < 2:
            return []  # fewer images than ranks
        half = (len(batches[i]) + 1) // 2
        batches[i:i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def _count(groups: list[list[np.ndarray]]) -> int:
    return sum(len(g) for g in groups)


def _full_rounds(groups: list[list[np.ndarray]], r: int) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """(each bucket's batches ``r`` at a time: the same-shape rounds, per bucket its leftover batches: fewer than r)."""
    rounds, leftovers = [], []
    for group in groups:
        full = len(group) - len(group) % r
        rounds.extend(group[i:i + r] for i in range(0, full, r))
        leftovers.append(group[full:])
    return rounds, leftovers


def _split_size(leftover_sizes: list[int], r: int) -> int:
    """Images per rank of the round that ``split`` cuts from a bucket's leftover batches; 0: too few to cut."""
    size = sum(leftover_sizes) // r
    return size if size >= SPLIT_MIN_BATCH else 0


def _drop_rounds(groups: list[list[np.ndarray]], r: int) -> list[list[np.ndarray]]:
    """``drop``: the same-shape rounds only; each bucket's leftover batches (fewer than r) sit the epoch out."""
    return _full_rounds(groups, r)[0]


def _split_rounds(groups: list[list[np.ndarray]], r: int) -> list[list[np.ndarray]]:
    """``split``: the same-shape rounds, then per bucket one more round of the same shape: its leftover batches
    pooled and cut into ``r`` equal smaller batches (``_split_size`` images each; the last ``pool % r`` images of the
    pool, fewer than r, and pools too small to give every rank ``SPLIT_MIN_BATCH`` images sit the epoch out)."""
    rounds, leftovers = _full_rounds(groups, r)
    for rest in leftovers:
        size = _split_size([len(b) for b in rest], r) if rest else 0
        if size:
            rounds.append(np.split(np.concatenate(rest)[:size * r], r))
    return rounds


def _cut_rounds(groups: list[list[np.ndarray]], r: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Rounds of ``r`` batches: each bucket's batches ``r`` at a time, then the leftovers (< r per bucket)
    pooled in bucket order, ``len % r`` of them dropped at random, the rest cut into mixed rounds."""
    rounds, leftovers = [], []
    for group in groups:
        full = len(group) - len(group) % r
        rounds.extend(group[i:i + r] for i in range(0, full, r))
        leftovers.extend(group[full:])
    dropped = set(rng.choice(len(leftovers), len(leftovers) % r, replace=False).tolist())
    kept = [b for i, b in enumerate(leftovers) if i not in dropped]
    rounds.extend(kept[i:i + r] for i in range(0, len(kept), r))
    return rounds


class _DealsRounds:
    """Rounds of one batch per rank (``rounds(epoch)``, from the subclass) dealt to the ranks: what every
    distributed training sampler shares. The epoch lives in ``self.batch_sampler``."""

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that ``__iter__`` yields."""
        self.batch_sampler.set_epoch(epoch)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches of the epoch, ``len(self) * num_replicas`` of them: the rounds one after another,
        so batch i goes to rank ``i % num_replicas``."""
        return [b for batches in self.rounds(epoch) for b in batches]

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's full list of batches for the epoch (from batch 0)."""
        return self.global_batches(epoch)[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self.rank_batches(self.epoch))


class DistributedBatchSampler(_DealsRounds):
    """Deals the batches of an AspectRatioBatchSampler to ranks in rounds of one shape, equal counts per rank.

    Why rounds: DDP's all-reduce makes every step as slow as its slowest rank. Dealing the shuffled batch
    list round-robin gave ranks different bucket shapes at the same step, so each step cost its largest
    shape: about 82% efficiency at 8 ranks and 70% at 64 on ImageNet-like ratios in ``short_side`` mode
    (93% and 91% in ``area`` mode), against 99.9% and 98.9% with rounds (99.97% and 99.7% in ``area``);
    figures from ``benchmarks/sim_ddp_efficiency.py`` (1.28M images, batch 256 per rank).

    Per epoch, every rank builds the same rounds from ``(seed, epoch)`` alone (R = ``num_replicas``):
      1. each bucket's batches (``AspectRatioBatchSampler.bucket_batches``: the bucket shuffled, then cut)
         are taken R at a time: a *round*, one step of all ranks; batch i of a round goes to rank i;
      2. leftovers, the last ``n_k % R`` batches of each bucket (fewer than R per bucket; different images
         every epoch, as the bucket is reshuffled), are pooled in bucket-id order (ratio order for a
         ``BucketTable``, so neighbours have similar shapes); ``L % R`` of the L pooled batches, picked at
         random from ``(seed, epoch)``, are dropped, and the rest are cut into *mixed rounds* of R, where
         ranks may train different (but neighbouring) shapes. With K buckets there are at most K - 1 mixed
         rounds per epoch (L <= K * (R - 1)), none at R = 1;
      3. all rounds, same-shape and mixed, are shuffled together; the global list is the rounds one after
         another, so rank r trains batches ``r, r + R, r + 2R, ...`` of it.

    Images dropped per epoch: the base sampler's (fewer than ``batch_size`` per bucket) plus ``L % R``
    batches, fewer than R: the same count as round-robin dealing dropped (``L % R == G % R`` for G
    batches), i.e. at most ``(R - 1) * batch_size`` images beyond the base sampler's. Dropping every
    leftover instead would keep every step single-shape but lose up to ``K * (R - 1)`` batches: on
    ImageNet (13 ``short_side`` buckets, batch 256) about 147,000 more images per epoch (11.5%) at
    R = 64 and 10,000 (0.8%) at R = 8, to gain 1.1% and 0.1% efficiency; so leftovers go into mixed
    rounds (there: 9 of 78 steps at R = 64, 5 of 624 at R = 8).

    ``leftovers``, the policy for step 2 (``--ddp_leftovers``; step 3 and everything else are the same):
      - ``mix``: as above (mixed rounds of neighbouring shapes);
      - ``drop``: every bucket's leftover batches sit the epoch out (fewer than R batches per bucket; other images
        every epoch, as the bucket is reshuffled): every step trains one shape, up to ``K * (R - 1)`` batches fewer
        per epoch. A bucket with fewer than R batches in all never trains (at R = 64, 8 of ImageNet's 13
        ``short_side`` buckets; ``describe`` names them);
      - ``split``: every bucket's leftover batches are pooled and cut into R equal smaller batches of the bucket's
        shape, one more round (so every step trains one shape and one batch size on all ranks); at most
        ``R - 1`` images per bucket sit the epoch out (none where R divides the pool, e.g. batch 256 at R = 8, 64 or
        256), and a pool with fewer than ``SPLIT_MIN_BATCH`` images per rank is dropped whole. A split batch is a
        smaller batch: each rank's loss is the mean over its images and DDP averages equal-sized batches, so the
        gradient is the mean over the round's images, but BatchNorm's statistics come from fewer images and the
        learning rate is the full batch's. Each split size is one more batch shape (one more graph under
        ``--compile``): at most one per bucket, the same every epoch.
    ``drop`` and ``split`` promise single-shape steps whenever their rounds exist; an epoch where they would give
    none (every bucket smaller than R batches: tiny datasets) is dealt as ``mix`` deals it (below).

    ``num_replicas == 1``: one batch per round, no leftovers, and the round shuffle is the base sampler's
    batch shuffle, so the batches are exactly ``batch_sampler.batches(epoch)``.

    Tiny datasets (G < R global batches): the epoch is rebuilt keeping every image (``drop_last=False``,
    so leftovers and single-image buckets count) and dealt in rounds as above or, if still fewer than R
    batches, the largest batches of that shuffled list are halved until there are exactly R (a single
    round, whose shapes may differ). So every rank gets a batch whenever there are at least as many images as ranks
    (batches of one image can appear in this tiny-dataset case only); with fewer images than ranks, no
    rank gets a batch (``len(self) == 0``; the loader reports it).

    No image appears twice in an epoch. Every rank gets exactly ``len(self)`` batches (a rank with one
    batch more would wait forever in DDP's all-reduce); that depends only on bucket counts, so it is the
    same every epoch.

    Mid-epoch resume needs no state here: an epoch's rounds are a pure function of (seed, epoch), so a resumed run
    continues with ``rank_batches(epoch)[k:]`` (``rectrain.data.loader.EpochStream`` slices it; no image of the
    skipped batches is read). The position itself (epoch, batch) is the checkpoint's.
    """

    def __init__(self, batch_sampler: AspectRatioBatchSampler, num_replicas: int = 1, rank: int = 0,
                 leftovers: str = "mix"):
        self.batch_sampler = batch_sampler
        self.num_replicas, self.rank = _check_world(num_replicas, rank)
        if leftovers not in LEFTOVER_POLICIES:
            raise ValueError(f"leftovers must be one of {', '.join(LEFTOVER_POLICIES)}, got {leftovers!r}")
        self.leftovers = leftovers

    def rounds(self, epoch: int) -> list[list[np.ndarray]]:
        """The epoch's steps in order, ``len(self)`` of them: each a list of ``num_replicas`` batches, rank i's
        batch at position i. Pure in (seed, epoch)."""
        r, base = self.num_replicas, self.batch_sampler
        groups = base.bucket_batches(epoch)
        if self.leftovers != "mix" and self._policy_steps():
            rounds = (_drop_rounds if self.leftovers == "drop" else _split_rounds)(groups, r)
            order = _rng(base.seed, epoch, _ORDER_STREAM).permutation(len(rounds))
            return [rounds[i] for i in order]
        if _count(groups) < r:
            groups = base.bucket_batches(epoch, drop_last=False)
        if _count(groups) < r:
            split = _split_until(base.batches(epoch, drop_last=False), r)
            return [split] if split else []
        rounds = _cut_rounds(groups, r, _rng(base.seed, epoch, _LEFTOVER_STREAM))
        order = _rng(base.seed, epoch, _ORDER_STREAM).permutation(len(rounds))
        return [rounds[i] for i in order]

    def _policy_steps(self) -> int:
        """Steps per epoch under ``drop`` or ``split`` (bucket counts alone decide them); 0: the policy gives no round
        (every bucket smaller than a round), so the epoch is dealt as ``mix`` deals it."""
        r = self.num_replicas
        per_bucket = self.batch_sampler.bucket_batch_sizes()
        steps = sum(len(sizes) // r for sizes in per_bucket)
        if self.leftovers == "split":
            steps += sum(1 for sizes in per_bucket if _split_size(sizes[len(sizes) - len(sizes) % r:], r))
        return steps

    def __len__(self) -> int:
        if self.leftovers != "mix" and self._policy_steps():
            return self._policy_steps()
        r, sizes = self.num_replicas, self.batch_sampler.batch_sizes()
        if len(sizes) < r:
            sizes = self.batch_sampler.batch_sizes(drop_last=False)
        if len(sizes) < r:
            return 1 if sum(sizes) >= r else 0
        return len(sizes) // r

    def __repr__(self) -> str:
        return (f"DistributedBatchSampler(rank={self.rank}/{self.num_replicas}, batches_per_rank={len(self)}, "
                f"leftovers={self.leftovers}, epoch={self.epoch}, base={self.batch_sampler!r})")

    def epoch_summary(self, epoch: int) -> dict:
        """What an epoch's rounds hold, for the start-up log and the efficiency simulation: ``steps``, ``mixed_steps``
        (ranks train different shapes), ``small_steps`` (one shape, every batch smaller than ``batch_size``: split
        rounds), ``images`` trained by all ranks, ``left_out`` (images of the base sampler's batches that no rank
        trains: the cost of dealing in rounds; the base sampler's own partial batches are not counted)."""
        rounds = self.rounds(epoch)
        ids, full = self.batch_sampler.bucket_ids, self.batch_sampler.batch_size
        shapes = [len({int(ids[b[0]]) for b in step}) for step in rounds]
        images = sum(len(b) for step in rounds for b in step)
        return {"steps": len(rounds), "mixed_steps": sum(n > 1 for n in shapes),
                "small_steps": sum(n == 1 and max(len(b) for b in step) < full for n, step in zip(shapes, rounds)),
                "images": images, "left_out": max(0, sum(self.batch_sampler.batch_sizes()) - images)}

    def describe(self, epoch: int) -> str:
        """One line for the start-up log: the policy and what it costs per epoch (bucket counts decide it)."""
        s, total, r = self.epoch_summary(epoch), sum(self.batch_sampler.batch_sizes()), self.num_replicas
        dealt = self.leftovers if self.leftovers == "mix" or self._policy_steps() else "mix"
        if dealt == "mix":
            what = (f"{s['mixed_steps']} of {s['steps']} steps per epoch train different (neighbouring) shapes on "
                    "different ranks, each as slow as its largest")
        else:
            what = f"all {s['steps']} steps per epoch train one shape on every rank"
        if dealt == "split":
            what += f", {s['small_steps']} of them smaller batches cut from the leftovers"
        if dealt != self.leftovers:
            what = f"too few batches per bucket for {self.leftovers} at {r} processes, dealt as mix: {what}"
        line = (f"leftover batches (--ddp_leftovers {self.leftovers}): {what}; {s['left_out']:,} of {total:,} images "
                f"({s['left_out'] / max(total, 1):.1%}) left out per epoch")
        small = [sum(sizes) for sizes in self.batch_sampler.bucket_batch_sizes() if len(sizes) < r]
        if dealt == "drop" and small:
            line += (f", among them every image of the {len(small)} bucket(s) with fewer than {r} batches "
                     f"({sum(small):,} images, never trained at this world size: --ddp_leftovers split or mix train "
                     "them)")
        return line


class ValidationBatchSampler:
    """Every image exactly once across ranks (no padding duplicates), batches grouped by bucket.

    Indices are sorted by bucket (stable, so by index within a bucket) and cut into batches of
    ``batch_size`` within each bucket (the last batch of a bucket may be smaller); the batches are dealt
    in that order, each to the rank with the fewest images so far (ties: lowest rank), which balances
    image counts to within one batch. Deterministic, epoch-independent.

    Ranks may get different batch counts, some none at all (fewer batches than ranks): evaluation must
    not run collectives per batch (use the unwrapped model, not the DDP wrapper) and should all-reduce
    its sums once after the loop.
    """

    def __init__(self, bucket_ids: np.ndarray, batch_size: int, num_replicas: int = 1, rank: int = 0):
        ids = _check_bucket_ids(bucket_ids)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.num_replicas, self.rank = _check_world(num_replicas, rank)
        _, members = _group_by_bucket(ids)
        batches = [m[i:i + self.batch_size] for m in members for i in range(0, len(m), self.batch_size)]
        self._batches = self._deal(batches)

    def _deal(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        load = np.zeros(self.num_replicas, dtype=np.int64)  # images per rank so far
        mine = []
        for b in batches:
            r = int(np.argmin(load))
            load[r] += len(b)
            if r == self.rank:
                mine.append(b)
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def __repr__(self) -> str:
        return (f"ValidationBatchSampler(rank={self.rank}/{self.num_replicas}, batch_size={self.batch_size}, "
                f"batches={len(self)})")


_WINDOWS_STREAM = 3  # which shards share a window (drawn once per run, from the seed)
_WINDOW_ORDER_STREAM = 4  # the windows' order in an epoch


def shard_windows(shard_of_sample: np.ndarray, shard_bytes: np.ndarray, budget: int, seed: int) -> list[np.ndarray]:
    """Windows of shards for ``WindowedBatchSampler``: the shards shuffled once (from ``seed``) and grouped in order
    so that each group's bytes stay within ``budget`` (a shard larger than it is a window of its own) -> per window,
    the (increasing) indices of its samples. One window holds every sample when all shards fit."""
    shard_bytes = np.asarray(shard_bytes, np.int64)
    order = _rng(seed, 0, _WINDOWS_STREAM).permutation(len(shard_bytes))
    groups, cur, size = [], [], 0
    for s in order.tolist():
        if cur and size + shard_bytes[s] > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += int(shard_bytes[s])
    groups.append(cur)
    window_of_shard = np.empty(len(shard_bytes), np.int64)
    for k, g in enumerate(groups):
        window_of_shard[g] = k
    window = window_of_shard[np.asarray(shard_of_sample)]
    return [np.flatnonzero(window == k) for k in range(len(groups))]


class WindowedBatchSampler(_DealsRounds):
    """``DistributedBatchSampler`` window by window, for remote shards kept in a bounded local cache.

    A window is a group of shards whose bytes fit half the cache (``shard_windows``: fixed for the run, drawn from
    the seed). Each epoch takes the windows in a new order (from ``(seed, epoch)``) and, within each, deals that
    window's images exactly as ``DistributedBatchSampler`` deals a whole data set (buckets shuffled per epoch,
    same-shape rounds, the same batch count on every rank). So at any time the run reads one window's shards (and
    the next one's first, while the loader prefetches): the cache holds two windows at most.

    What it costs: an image only ever shares a batch with images of its own window (a fixed part of the data,
    ``1 / len(windows)`` of it), and each window drops its own leftovers (fewer than ``batch_size`` per bucket and
    window), so an epoch has a few batches fewer than unwindowed; the count is the same every epoch (the windows
    are fixed). With one window (every shard fits) it is ``DistributedBatchSampler`` itself. Pure in (seed, epoch):
    exact resume works as for local data.
    """

    def __init__(self, bucket_ids: np.ndarray, windows: list[np.ndarray], batch_size: int, seed: int = 42,
                 num_replicas: int = 1, rank: int = 0, leftovers: str = "mix"):
        ids = _check_bucket_ids(bucket_ids)
        self.windows = [np.asarray(w, np.int64) for w in windows]
        self.seed, self.num_replicas, self.rank = int(seed), *_check_world(num_replicas, rank)
        self.batch_sampler = AspectRatioBatchSampler(ids, batch_size, seed=seed)  # the epoch lives here
        self.parts = [DistributedBatchSampler(
            AspectRatioBatchSampler(ids[w], batch_size, seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0])),
            num_replicas, rank, leftovers) for k, w in enumerate(self.windows)]

    def rounds(self, epoch: int) -> list[list[np.ndarray]]:
        order = _rng(self.seed, epoch, _WINDOW_ORDER_STREAM).permutation(len(self.windows))
        return [[self.windows[k][b] for b in batches] for k in order.tolist() for batches in self.parts[k].rounds(epoch)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def describe(self, epoch: int) -> str:
        """The start-up line of ``DistributedBatchSampler.describe``, for the first window (every window deals its own
        leftovers by the same policy)."""
        return f"{len(self.windows)} shard windows, each dealt on its own; the first: {self.parts[0].describe(epoch)}"

    def __repr__(self) -> str:
        return (f"WindowedBatchSampler(rank={self.rank}/{self.num_replicas}, windows={len(self.windows)}, "
                f"batches_per_rank={len(self)}, epoch={self.epoch})")
