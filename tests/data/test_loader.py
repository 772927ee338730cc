import os

import pytest
import torch

from rectrain.data.buckets import make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.source import scan_split
from rectrain.data.synth import make_synthetic
from rectrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rectrain.data.workers import cap_workers
from rectrain.training.step import DeviceNormalize


@pytest.fixture
def data_dir(tmp_path):
    make_synthetic(str(tmp_path), classes=2, train_per_class=12, val_per_class=3, kind="tiny", seed=1)
    return str(tmp_path)


def corrupt_in_place(path):
    """Overwrite a JPEG with zeros, keeping its size and mtime: it still passes the cached scan."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def epoch_batches(loader):
    return [(x.shape, y.shape, failed) for x, y, failed in loader]


def test_batches_are_uint8_nhwc_of_one_bucket_shape(data_dir):
    scan = scan_split(data_dir, "train")
    buckets = make_buckets(32)
    loaders = build_loaders(scan, scan_split(data_dir, "val", classes=scan.index.classes), buckets, LoaderSettings(batch_size=4, workers=0, seed=0))
    shapes = {tuple(s) for s in buckets.shapes}
    for x, y, failed in loaders.train:
        assert x.dtype == torch.uint8 and x.shape[-1] == 3 and (x.shape[1], x.shape[2]) in shapes
        assert y.dtype == torch.int64 and failed == []
    assert sum(y.numel() for _, y, _ in loaders.val) == 6


def test_worker_crops_do_not_depend_on_worker_count(data_dir):
    scan = scan_split(data_dir, "train")
    outs = []
    for workers in (0, 2):
        loaders = build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=4, workers=workers, seed=3))
        loaders.train_sampler.set_epoch(1)
        outs.append([x for x, _, _ in loaders.train])
    assert len(outs[0]) == len(outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_file_failing_to_decode_is_replaced_within_its_bucket_and_reported(data_dir):
    scan = scan_split(data_dir, "train")
    loaders = build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=4, workers=0, seed=0))
    first = next(iter(loaders.train_sampler))[0]  # an image this epoch certainly uses
    victim = os.path.join(scan.index.split_dir, str(scan.index.paths[first]))
    corrupt_in_place(victim)
    assert scan_split(data_dir, "train").from_cache  # the scan does not see it: only decoding does
    failed = [f for x, y, fs in loaders.train for f in fs]
    sizes = [x.shape[0] for x, _, _ in loaders.train]
    assert any(victim in f for f in failed)
    assert sum(sizes) == sum(len(b) for b in loaders.train_sampler)  # no batch lost an image


def test_device_normalize_gives_normalised_channels_last_floats():
    images = torch.randint(0, 256, (2, 8, 12, 3), dtype=torch.uint8)
    labels = torch.tensor([1, 0])
    x, y = DeviceNormalize("cpu")(images, labels)
    assert x.shape == (2, 3, 8, 12) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, labels)
    xb, _ = DeviceNormalize("cpu", torch.bfloat16)(images, labels)
    assert xb.dtype == torch.bfloat16


def test_workers_are_capped_to_available_cores():
    cores = len(os.sched_getaffinity(0))
    workers, note = cap_workers(cores * 4 + 3, world_local=1)
    assert workers == cores and "capped" in note
    assert cap_workers(1, 1) == (1, None)
    assert cap_workers(64, world_local=cores * 2)[0] == 1


def test_epoch_stream_spans_epochs_from_a_mid_epoch_start(data_dir):
    scan = scan_split(data_dir, "train")
    loaders = build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=4, workers=0, seed=5))
    sampler = loaders.train_sampler
    expected = [(e, b.tolist()) for e in range(3) for b in sampler.rank_batches(e)][2:]
    loaders.stream.select(0, 2, 3)
    keys = list(loaders.stream)
    assert [(k[0][1], [i for i, _ in k]) for k in keys] == expected
    assert len(loaders.stream) == len(expected)
    labels = torch.cat([y for _, y, _ in loaders.epochs(0, 2, 3)])
    assert labels.tolist() == [int(scan.index.labels[i]) for _, b in expected for i in b]


@pytest.mark.parametrize("policy", ["drop", "split"])
def test_a_rank_resumed_mid_epoch_under_each_leftover_policy_decodes_the_tail_of_its_epoch(data_dir, policy):
    """Rank 1 of 2 through real worker processes: a loader built afresh at the checkpoint's (epoch, batch), as a
    resumed run builds it, yields the images and labels the uninterrupted run trained from there on."""
    scan = scan_split(data_dir, "train")

    def loaders():
        return build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=4, workers=2, seed=0, rank=1,
                                                                           world_size=2, ddp_leftovers=policy))
    straight = loaders()
    try:
        mix = LoaderSettings(batch_size=4, workers=0, seed=0, rank=1, world_size=2)
        assert [b.tolist() for b in straight.train_sampler.rank_batches(1)] != \
            [b.tolist() for b in build_loaders(scan, None, make_buckets(32), mix).train_sampler.rank_batches(1)]
        uninterrupted = [(x, y) for x, y, _ in straight.epochs(1, 0, 2)]
    finally:
        straight.close()
    resumed = loaders()
    try:
        tail = [(x, y) for x, y, _ in resumed.epochs(1, 1, 2)]
    finally:
        resumed.close()
    assert len(uninterrupted) == len(tail) + 1 >= 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(uninterrupted[1:], tail))


def test_worker_batches_are_built_in_shared_memory(data_dir):
    from rectrain.data import loader as loader_mod

    def recording_collate(items):
        images, labels, failed = loader_mod.collate(items)
        return images, labels, [images.is_shared()]  # evaluated inside the worker

    scan = scan_split(data_dir, "train")
    loaders = build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=4, workers=1, seed=0))
    loaders.train.collate_fn = recording_collate
    flags = [f for _, _, fs in loaders.train for f in fs]
    assert flags and all(flags)


def test_loader_workers_survive_a_sigterm_to_the_process_group(data_dir):
    """SLURM/systemd signal every process; the main process decides when to stop, not the workers."""
    import signal
    scan = scan_split(data_dir, "train")
    loaders = build_loaders(scan, None, make_buckets(32), LoaderSettings(batch_size=2, workers=2, seed=0))
    it = iter(loaders.train)
    next(it), next(it)  # one batch from each worker: both have started (and run their init function)
    for w in it._workers:
        os.kill(w.pid, signal.SIGTERM)
    rest = list(it)  # raises "DataLoader worker ... killed by signal" if a worker died
    assert len(rest) == len(loaders.train) - 2
