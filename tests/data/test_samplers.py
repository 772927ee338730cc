"""Samplers: single-bucket batches, per-epoch order from (seed, epoch), equal batch counts per rank,
exact mid-epoch resume, validation that covers every image once."""

import functools

import numpy as np
import pytest

from rectrain.data import synth
from rectrain.data.buckets import make_buckets
from rectrain.data.loader import EpochStream
from rectrain.data.samplers import (LEFTOVER_POLICIES, SPLIT_MIN_BATCH, AspectRatioBatchSampler,
                                    DistributedBatchSampler, ValidationBatchSampler)

WORLD_SIZES = range(1, 9)


def bucket_ids(n, k, seed=0):
    """n images spread over k buckets at random."""
    return np.random.default_rng(seed).integers(0, k, n)


def tiny_datasets():
    """(ids, batch_size): 10-40 images, most buckets smaller than one batch; batch sizes 1, 4, 8."""
    for seed, (n, k) in enumerate([(10, 3), (13, 5), (25, 6), (40, 4), (40, 1)]):
        for batch_size in (1, 4, 8):
            yield bucket_ids(n, k, seed), batch_size


def as_tuples(batches):
    return [tuple(int(i) for i in b) for b in batches]


def epoch_of_all_ranks(ids, batch_size, world, epoch=0, seed=42):
    """Each rank's batches of one epoch, every rank with its own sampler objects (no shared state)."""
    out = []
    for rank in range(world):
        s = DistributedBatchSampler(AspectRatioBatchSampler(ids, batch_size, seed=seed), world, rank)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


# --- AspectRatioBatchSampler ---------------------------------------------------------------------------

def test_every_batch_holds_one_bucket():
    ids = bucket_ids(500, 7)
    for b in AspectRatioBatchSampler(ids, 16).batches(0):
        assert len(set(ids[b].tolist())) == 1


def test_no_image_appears_twice_in_an_epoch():
    ids = bucket_ids(500, 7)
    flat = np.concatenate(AspectRatioBatchSampler(ids, 16).batches(3))
    assert len(flat) == len(set(flat.tolist()))


def test_drop_last_gives_full_batches_and_drops_less_than_a_batch_per_bucket():
    ids = bucket_ids(500, 7)
    batches = AspectRatioBatchSampler(ids, 16, drop_last=True).batches(0)
    assert all(len(b) == 16 for b in batches)
    used = np.concatenate(batches)
    counts, used_counts = np.bincount(ids, minlength=7), np.bincount(ids[used], minlength=7)
    assert np.all(counts - used_counts < 16)


def test_dropped_leftovers_change_from_epoch_to_epoch():
    ids = bucket_ids(500, 7)
    s = AspectRatioBatchSampler(ids, 16)
    unused = [set(range(500)) - set(np.concatenate(s.batches(e)).tolist()) for e in (0, 1)]
    assert unused[0] != unused[1]


def test_bucket_smaller_than_a_batch_gives_one_smaller_batch():
    ids = np.array([0] * 5 + [1] * 20)
    sizes = sorted(len(b) for b in AspectRatioBatchSampler(ids, 8).batches(0))
    assert sizes == [5, 8, 8]


def test_single_image_bucket_is_not_a_batch_when_dropping_last():
    ids = np.array([0] + [1] * 8)
    batches = AspectRatioBatchSampler(ids, 4).batches(0)
    assert all(len(b) >= 2 for b in batches) and 0 not in np.concatenate(batches)


def test_keep_last_uses_every_image_exactly_once():
    ids = bucket_ids(101, 5)
    flat = np.concatenate(AspectRatioBatchSampler(ids, 8, drop_last=False).batches(2))
    assert sorted(flat.tolist()) == list(range(101))


def test_new_order_every_epoch():
    s = AspectRatioBatchSampler(bucket_ids(300, 4), 8)
    assert as_tuples(s.batches(0)) != as_tuples(s.batches(1))


def test_batch_composition_changes_every_epoch():
    s = AspectRatioBatchSampler(bucket_ids(300, 4), 8)
    assert set(map(frozenset, as_tuples(s.batches(0)))) != set(map(frozenset, as_tuples(s.batches(1))))


def test_same_seed_and_epoch_give_the_same_batches():
    ids = bucket_ids(300, 4)
    a, b = AspectRatioBatchSampler(ids, 8, seed=7), AspectRatioBatchSampler(ids, 8, seed=7)
    b.batches(5)  # call history must not matter
    assert as_tuples(a.batches(3)) == as_tuples(b.batches(3))


def test_different_seed_gives_different_batches():
    ids = bucket_ids(300, 4)
    assert as_tuples(AspectRatioBatchSampler(ids, 8, seed=1).batches(0)) != \
        as_tuples(AspectRatioBatchSampler(ids, 8, seed=2).batches(0))


def test_global_numpy_rng_is_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    AspectRatioBatchSampler(bucket_ids(100, 3), 8).batches(0)
    assert np.array_equal(np.random.get_state()[1], before)


def test_iter_follows_set_epoch_and_len_matches():
    s = AspectRatioBatchSampler(bucket_ids(300, 4), 8)
    s.set_epoch(4)
    batches = list(s)
    assert batches == [b.tolist() for b in s.batches(4)] and len(batches) == len(s)
    assert all(isinstance(i, int) for i in batches[0])


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError):
        AspectRatioBatchSampler(np.array([0, -1]), 4)
    with pytest.raises(ValueError):
        AspectRatioBatchSampler(np.array([0, 1]), 0)
    with pytest.raises(ValueError):
        AspectRatioBatchSampler(np.array([0.5, 1.0]), 4)


# --- DistributedBatchSampler --------------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_rank_gets_the_same_number_of_batches(world):
    ids = bucket_ids(1000, 9)
    per_rank = epoch_of_all_ranks(ids, 16, world)
    expected = len(DistributedBatchSampler(AspectRatioBatchSampler(ids, 16), world, 0))
    assert [len(b) for b in per_rank] == [expected] * world and expected > 0


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_tiny_datasets_give_every_rank_the_same_positive_batch_count(world):
    for ids, batch_size in tiny_datasets():
        per_rank = epoch_of_all_ranks(ids, batch_size, world)
        counts = [len(b) for b in per_rank]
        assert counts[0] >= 1 and counts == [counts[0]] * world, (len(ids), batch_size, counts)
        assert counts[0] == len(DistributedBatchSampler(AspectRatioBatchSampler(ids, batch_size), world, 0))


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_no_image_appears_twice_across_ranks(world):
    for ids, batch_size in [(bucket_ids(1000, 9), 16), *tiny_datasets()]:
        flat = [i for rank in epoch_of_all_ranks(ids, batch_size, world) for b in rank for i in b]
        assert len(flat) == len(set(flat))


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_distributed_batches_hold_one_bucket(world):
    for ids, batch_size in [(bucket_ids(1000, 9), 16), *tiny_datasets()]:
        for rank in epoch_of_all_ranks(ids, batch_size, world):
            assert all(len(set(ids[b].tolist())) == 1 for b in rank)


def test_splitting_for_many_ranks_keeps_at_least_two_images_per_batch():
    ids = np.zeros(40, dtype=np.int64)  # one bucket: batches of 32 and 8 for 8 ranks
    sizes = [len(b) for rank in epoch_of_all_ranks(ids, 32, 8) for b in rank]
    assert len(sizes) == 8 and min(sizes) >= 2 and sum(sizes) == 40


def test_more_ranks_than_images_gives_no_batches_on_any_rank():
    per_rank = epoch_of_all_ranks(np.array([0, 0, 1]), 4, 4)
    assert per_rank == [[]] * 4
    assert len(DistributedBatchSampler(AspectRatioBatchSampler(np.array([0, 0, 1]), 4), 4, 0)) == 0


def test_ranks_agree_without_sharing_state():
    ids = bucket_ids(400, 5)
    world = 3
    ranks = epoch_of_all_ranks(ids, 8, world, epoch=2)
    dealt = DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), world, 0).global_batches(2)
    assert [as_tuples(r) for r in ranks] == [as_tuples(dealt[r::world]) for r in range(world)]


def test_distributed_order_changes_every_epoch():
    s = DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(400, 5), 8), 2, 1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


def steps_of_all_ranks(ids, batch_size, world, epoch=0, seed=42):
    """Step j: the bucket ids trained by every rank at step j (one sampler object per rank)."""
    return [[int(ids[b[0]]) for b in step] for step in zip(*epoch_of_all_ranks(ids, batch_size, world, epoch, seed))]


def batches_per_bucket(ids, batch_size, seed=42):
    return [len(g) for g in AspectRatioBatchSampler(ids, batch_size, seed=seed).bucket_batches(0)]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_step_trains_one_shape_except_the_leftover_rounds(world):
    ids = bucket_ids(2000, 9)
    per_bucket = batches_per_bucket(ids, 16)
    leftovers = sum(n % world for n in per_bucket)
    steps = steps_of_all_ranks(ids, 16, world)
    mixed = sum(len(set(step)) > 1 for step in steps)
    assert len(steps) - mixed == sum(n // world for n in per_bucket) > 0
    assert mixed == leftovers // world and mixed <= len(per_bucket) - 1


@pytest.mark.parametrize("world", range(2, 9))
def test_leftover_rounds_hold_neighbouring_buckets_in_order(world):
    ids = bucket_ids(2000, 9)
    mixed = [step for step in steps_of_all_ranks(ids, 16, world) if len(set(step)) > 1]
    assert mixed and all(step == sorted(step) for step in mixed)
    spans = sorted((step[0], step[-1]) for step in mixed)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # ranges of bucket ids never interleave


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_fewer_than_world_size_batches_are_dropped_per_epoch(world):
    ids = bucket_ids(2000, 9)
    base = AspectRatioBatchSampler(ids, 16)
    available = len(base)
    dealt = DistributedBatchSampler(base, world, 0).global_batches(0)
    assert len(dealt) == available - available % world
    assert {tuple(b) for b in as_tuples(dealt)} <= set(as_tuples(base.batches(0)))


def test_dropped_leftover_batches_change_from_epoch_to_epoch():
    ids = bucket_ids(2000, 9)
    s = DistributedBatchSampler(AspectRatioBatchSampler(ids, 16), 8, 0)
    used = [set(np.concatenate(s.global_batches(e)).tolist()) for e in (0, 1)]
    assert used[0] != used[1]


def test_world_size_one_gives_the_base_sampler_batches():
    for ids, batch_size in [(bucket_ids(1000, 9), 16), *tiny_datasets()]:
        base = AspectRatioBatchSampler(ids, batch_size)
        for epoch in (0, 1, 5):
            assert as_tuples(DistributedBatchSampler(base, 1, 0).global_batches(epoch)) == \
                as_tuples(base.batches(epoch))


@pytest.mark.parametrize("world", range(2, 9))
def test_rank_batches_change_every_epoch(world):
    s = DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(2000, 9), 16), world, world - 1)
    assert as_tuples(s.rank_batches(0)) != as_tuples(s.rank_batches(1))


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_rounds_are_a_pure_function_of_seed_and_epoch(world):
    ids = bucket_ids(1000, 9)
    a = DistributedBatchSampler(AspectRatioBatchSampler(ids, 16, seed=7), world, 0)
    b = DistributedBatchSampler(AspectRatioBatchSampler(ids, 16, seed=7), world, world - 1)
    b.rounds(5)
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    assert [as_tuples(r) for r in a.rounds(3)] == [as_tuples(r) for r in b.rounds(3)]
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_batch_count_per_rank_is_the_same_every_epoch(world):
    s = DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(1000, 9), 16), world, 0)
    assert {len(s.rank_batches(e)) for e in range(4)} == {len(s)}
    assert all(len(r) == world for r in s.rounds(2)) and len(s.rounds(2)) == len(s)


# Mid-epoch resume: the position is the checkpoint's (epoch, batch); EpochStream starts there.
def resumed_stream(sampler, epoch: int, start: int, last: int | None = None) -> list[list[int]]:
    stream = EpochStream(sampler)
    stream.select(epoch, start, last)
    return [[i for i, _ in batch] for batch in stream]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_resume_of_a_tiny_dataset_yields_the_tail_of_the_uninterrupted_epoch(world):
    for ids, batch_size in tiny_datasets():
        for rank in range(world):
            full = DistributedBatchSampler(AspectRatioBatchSampler(ids, batch_size), world, rank)
            full.set_epoch(2)
            uninterrupted = list(full)
            resumed = DistributedBatchSampler(AspectRatioBatchSampler(ids, batch_size), world, rank)
            half = len(uninterrupted) // 2
            assert resumed_stream(resumed, 2, half) == uninterrupted[half:]


def test_set_epoch_reaches_the_base_sampler():
    base = AspectRatioBatchSampler(bucket_ids(50, 2), 4)
    DistributedBatchSampler(base, 2, 0).set_epoch(6)
    assert base.epoch == 6


@pytest.mark.parametrize("world", [1, 3, 8])
def test_resume_at_batch_k_yields_the_tail_of_the_uninterrupted_epoch(world):
    ids = bucket_ids(300, 5)
    for rank in range(world):
        full = DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), world, rank)
        full.set_epoch(3)
        uninterrupted = list(full)
        for k in range(len(full) + 1):
            resumed = DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), world, rank)
            assert resumed_stream(resumed, 3, k) == uninterrupted[k:]


def test_a_resume_start_applies_to_its_epoch_only():
    ids = bucket_ids(300, 5)
    s = DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), 2, 0)
    batches = resumed_stream(s, 1, 5, last=3)
    assert batches == [b.tolist() for b in s.rank_batches(1)[5:] + s.rank_batches(2)]


def test_the_stream_without_a_range_is_the_samplers_current_epoch():
    s = DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(300, 5), 8), 2, 1)
    s.set_epoch(4)
    assert [[i for i, _ in b] for b in EpochStream(s)] == list(s)
    assert {e for b in EpochStream(s) for _, e in b} == {4}


def test_resume_past_the_end_of_the_epoch_is_rejected():
    s = DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(100, 2), 8), 2, 0)
    with pytest.raises(ValueError, match="start batch"):
        EpochStream(s).select(0, len(s) + 1)


def test_rank_outside_world_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(100, 2), 8), 2, 2)


# --- Leftover policies (issue 18): ImageNet-like ratios at 2..64 ranks ------------------------------------------

LEFTOVER_WORLDS = range(2, 65)


@functools.lru_cache(maxsize=1)
def imagenet_like_ids(n: int = 20_000) -> np.ndarray:
    """Bucket ids of n images with ImageNet's ratio mix in the seed's 13 short_side buckets at 224 px (no images)."""
    rng = np.random.default_rng(0)
    sizes = np.array([synth.image_size(rng, "imagenet") for _ in range(n)], dtype=np.int64)
    return make_buckets(224, "short_side").assign(sizes)


def leftover_sampler(policy, world, rank=0, batch_size=16, seed=42):
    return DistributedBatchSampler(AspectRatioBatchSampler(imagenet_like_ids(), batch_size, seed=seed), world, rank,
                                   leftovers=policy)


@pytest.mark.parametrize("policy", LEFTOVER_POLICIES)
def test_every_policy_gives_every_rank_the_same_batch_count_and_no_image_twice(policy):
    for world in LEFTOVER_WORLDS:
        rounds = leftover_sampler(policy, world).rounds(1)
        last_rank = leftover_sampler(policy, world, rank=world - 1)  # its own objects: agrees without talking
        assert len(rounds) == len(last_rank) > 0 and all(len(step) == world for step in rounds), world
        assert as_tuples(last_rank.rank_batches(1)) == as_tuples([step[-1] for step in rounds])
        flat = np.concatenate([b for step in rounds for b in step])
        assert len(flat) == len(np.unique(flat)), world


@pytest.mark.parametrize("policy", ["drop", "split"])
def test_drop_and_split_train_one_shape_and_one_batch_size_at_every_step(policy):
    ids = imagenet_like_ids()
    for world in LEFTOVER_WORLDS:
        for step in leftover_sampler(policy, world).rounds(0):
            assert len(set(ids[np.concatenate(step)].tolist())) == 1, world
            assert len({len(b) for b in step}) == 1, world


def test_mix_mixes_shapes_in_at_most_one_step_fewer_than_the_buckets():
    ids = imagenet_like_ids()
    shapes = len(np.unique(ids))
    mixed = [sum(len(set(ids[np.concatenate(step)].tolist())) > 1 for step in leftover_sampler("mix", w).rounds(0))
             for w in LEFTOVER_WORLDS]
    assert max(mixed) <= shapes - 1 and max(mixed) > 0


def per_bucket_images(rounds, ids):
    flat = np.concatenate([b for step in rounds for b in step])
    return np.bincount(ids[flat], minlength=ids.max() + 1)


def test_split_trains_every_leftover_image_but_fewer_than_world_size_per_bucket():
    ids = imagenet_like_ids()
    base = AspectRatioBatchSampler(ids, 16, seed=42)
    sizes = {int(k): s for k, s in zip(np.unique(ids), base.bucket_batch_sizes())}
    for world in LEFTOVER_WORLDS:
        trained = per_bucket_images(leftover_sampler("split", world).rounds(3), ids)
        for k, batches in sizes.items():
            full = len(batches) - len(batches) % world
            pool = sum(batches[full:])
            cut = pool - pool % world if pool // world >= SPLIT_MIN_BATCH else 0
            assert trained[k] == sum(batches[:full]) + cut, (world, k)


def test_drop_leaves_out_each_buckets_leftover_batches_and_different_images_every_epoch():
    ids = imagenet_like_ids()
    base = AspectRatioBatchSampler(ids, 16, seed=42)
    sizes = base.bucket_batch_sizes()
    for world in LEFTOVER_WORLDS:
        trained = per_bucket_images(leftover_sampler("drop", world).rounds(0), ids)
        assert trained[np.unique(ids)].tolist() == [16 * (len(b) - len(b) % world) for b in sizes], world
    s = leftover_sampler("drop", 8)
    used = [set(np.concatenate(s.global_batches(e)).tolist()) for e in (0, 1)]
    assert used[0] != used[1] and len(used[0]) == len(used[1])


def test_drop_names_the_buckets_it_never_trains_at_this_world_size():
    line = leftover_sampler("drop", 64).describe(0)
    rare = [len(b) for b in AspectRatioBatchSampler(imagenet_like_ids(), 16).bucket_batch_sizes() if len(b) < 64]
    assert rare and f"every image of the {len(rare)} bucket(s) with fewer than 64 batches" in line


@pytest.mark.parametrize("policy", ["drop", "split"])
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_drop_and_split_deal_tiny_datasets_as_mix_does_when_they_have_no_round(policy, world):
    for ids, batch_size in tiny_datasets():
        s = DistributedBatchSampler(AspectRatioBatchSampler(ids, batch_size), world, 0, leftovers=policy)
        rounds = s.rounds(0)
        assert len(rounds) == len(s) >= 1 and all(len(step) == world for step in rounds)
        flat = [int(i) for step in rounds for b in step for i in b]
        assert len(flat) == len(set(flat))


@pytest.mark.parametrize("policy", ["drop", "split"])
@pytest.mark.parametrize("world", [2, 3, 8])
def test_resume_under_each_new_policy_yields_the_tail_of_the_uninterrupted_epoch(policy, world):
    ids = bucket_ids(300, 5)
    for rank in range(world):
        full = DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), world, rank, leftovers=policy)
        uninterrupted = full.rank_batches(3)
        assert as_tuples(uninterrupted) != as_tuples(
            DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), world, rank).rank_batches(3))  # not mix's
        for k in range(len(full) + 1):
            resumed = DistributedBatchSampler(AspectRatioBatchSampler(ids, 8), world, rank, leftovers=policy)
            assert resumed_stream(resumed, 3, k) == [b.tolist() for b in uninterrupted[k:]]


def test_an_unknown_leftover_policy_is_rejected():
    with pytest.raises(ValueError, match="leftovers"):
        DistributedBatchSampler(AspectRatioBatchSampler(bucket_ids(100, 2), 8), 2, 0, leftovers="spread")


# --- ValidationBatchSampler ---------------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLD_SIZES)
def test_validation_covers_every_image_exactly_once(world):
    for n, k, batch_size in [(10, 3, 4), (37, 5, 8), (203, 6, 16), (5, 2, 1)]:
        ids = bucket_ids(n, k, seed=n)
        flat = [i for r in range(world) for b in ValidationBatchSampler(ids, batch_size, world, r) for i in b]
        assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_validation_batches_hold_one_bucket_and_respect_batch_size(world):
    ids = bucket_ids(203, 6)
    for r in range(world):
        s = ValidationBatchSampler(ids, 16, world, r)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(set(ids[b].tolist())) == 1 and 1 <= len(b) <= 16 for b in batches)


def test_validation_balances_images_across_ranks_within_one_batch():
    ids = bucket_ids(1003, 6)
    loads = [sum(len(b) for b in ValidationBatchSampler(ids, 16, 4, r)) for r in range(4)]
    assert max(loads) - min(loads) <= 16


def test_validation_groups_each_bucket_into_consecutive_batches():
    ids = bucket_ids(200, 4)
    batches = list(ValidationBatchSampler(ids, 16))
    buckets = [int(ids[b[0]]) for b in batches]
    assert buckets == sorted(buckets)
    assert sum(len(b) < 16 for b in batches) <= 4  # at most one partial batch per bucket


# -- windows of shards (remote shards behind a bounded cache) -------------------------------------------------------
def test_windowed_rounds_are_same_shape_per_window_equal_per_rank_and_constant_per_epoch():
    from rectrain.data.samplers import WindowedBatchSampler, shard_windows
    rng = np.random.default_rng(0)
    shard = np.repeat(np.arange(12), 50)                 # 12 shards of 50 images
    ids = rng.integers(0, 3, size=len(shard))            # 3 buckets
    windows = shard_windows(shard, np.full(12, 100), budget=300, seed=1)
    assert len(windows) == 4 and sorted(np.concatenate(windows).tolist()) == list(range(len(shard)))
    assert len(shard_windows(shard, np.full(12, 100), budget=10 ** 6, seed=1)) == 1
    samplers = [WindowedBatchSampler(ids, windows, 8, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    window_of = np.empty(len(shard), int)
    for k, w in enumerate(windows):
        window_of[w] = k
    lengths = set()
    for epoch in (0, 1, 2):
        per_rank = [s.rank_batches(epoch) for s in samplers]
        assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0])
        lengths.add(len(per_rank[0]))
        seen = np.concatenate([b for r in per_rank for b in r])
        assert len(seen) == len(set(seen.tolist()))
        for rnd in samplers[0].rounds(epoch):
            assert len({int(window_of[i]) for b in rnd for i in b}) == 1  # a step reads one window
    assert len(lengths) == 1
    assert [b.tolist() for b in samplers[0].rank_batches(1)] != [b.tolist() for b in samplers[0].rank_batches(2)]
