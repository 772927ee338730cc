"""Remote shards: fetched whole into a bounded local cache from a local HTTP server, retried, windowed."""

import http.server
import os
import re
import threading
import traceback
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rectrain.data.buckets import make_buckets
from rectrain.data.loader import LoaderSettings, build_loaders
from rectrain.data.prepare_shards import prepare_shards
from rectrain.data.samplers import WindowedBatchSampler
from rectrain.data.source import scan_split
from rectrain.data.shard_cache import ShardCache
from rectrain.errors import UserError
from rectrain.runtime.io import is_temporary
from tests.tiny import make_tiny_data


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``self.server.root`` with Range requests (206); ``server.cut_once``: file names whose first GET stops
    half-way (the connection closes), to be retried; ``server.missing``: file names answered 404."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        name = urllib.parse.unquote(self.path.lstrip("/"))
        self.server.requests.append((name, self.headers.get("Range")))
        path = os.path.join(self.server.root, name)
        if not os.path.isfile(path) or name in self.server.missing:
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name in self.server.cut_once:
            self.server.cut_once.discard(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    folder = make_tiny_data(root / "folder")
    prepare_shards(folder, str(root / "shards"), "20KB", workers=2)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.root, server.requests, server.cut_once, server.missing = str(root / "shards"), [], set(), set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"server": server, "url": f"http://127.0.0.1:{server.server_address[1]}", "local": str(root / "shards")}
    server.shutdown()


def _pattern(url):
    return f"{url}/{{train-{{000000..000010}},val-{{000000..000003}}}}.tar"


def _epoch(scan, epoch=0):
    loaders = build_loaders(scan, None, make_buckets(32, max_ratio=1.5), LoaderSettings(batch_size=8, workers=2, seed=5))
    try:
        return loaders, [(x.clone(), y.clone()) for x, y, _ in loaders.epochs(epoch, 0, epoch + 1)]
    finally:
        loaders.close()


def test_remote_shards_read_like_local_ones_and_a_broken_transfer_is_resumed(served, tmp_path):
    server = served["server"]
    server.requests.clear()
    server.cut_once.add("train-000003.tar")
    cache = ShardCache(str(tmp_path / "cache"), max_gb=1.0)
    remote = scan_split(_pattern(served["url"]), "train", cache_dir=str(tmp_path / "run"), shard_cache=cache)
    assert remote.from_cache and remote.cache_path.startswith(cache.folder)  # the index shipped beside the shards
    assert remote.index.classes == ["class_000", "class_001", "class_002"]
    local = scan_split(served["local"], "train")
    assert remote.index.paths.tolist() == local.index.paths.tolist()
    loaders, got = _epoch(remote)
    assert not isinstance(loaders.train_sampler, WindowedBatchSampler)  # they all fit: the local order
    _, ref = _epoch(local)
    assert len(got) == len(ref) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, ref))
    asked = [r for r in server.requests if r[0] == "train-000003.tar"]
    assert asked[0] == ("train-000003.tar", None) and asked[1][1].startswith("bytes=")  # the rest, by Range
    fetched = Counter(n for n, _ in server.requests if n.endswith(".tar"))  # on demand: those the epoch reads
    assert len(fetched) >= 9 and fetched.pop("train-000003.tar") == 2 and set(fetched.values()) == {1}  # not per worker
    assert not [n for n in os.listdir(cache.folder) if is_temporary(n)]


def test_a_small_cache_reads_one_window_of_shards_at_a_time_and_stays_bounded(served, tmp_path):
    total = sum(os.path.getsize(os.path.join(served["local"], f"train-{k:06d}.tar")) for k in range(11))
    cache = ShardCache(str(tmp_path / "cache"), max_gb=total / 3 / 1e9)  # a third of the shards
    remote = scan_split(_pattern(served["url"]), "train", shard_cache=cache)
    loaders, batches = _epoch(remote, epoch=2)
    sampler = loaders.train_sampler
    assert isinstance(sampler, WindowedBatchSampler) and len(sampler.windows) >= 5
    seen = np.concatenate(sampler.rank_batches(2))
    assert len(seen) == len(set(seen.tolist())) == sum(len(y) for _, y in batches)  # no image twice in an epoch
    shard = remote.index.members.shard
    window_of = {int(s): k for k, w in enumerate(sampler.windows) for s in np.unique(shard[w])}
    for b in sampler.rank_batches(2):
        assert len({window_of[int(s)] for s in shard[b]}) == 1  # a batch draws from one window
    size = sum(e.stat().st_size for e in os.scandir(cache.folder) if e.name.endswith(".tar"))
    assert size <= cache.max_bytes
    assert sampler.rank_batches(2)[0].tolist() != sampler.rank_batches(3)[0].tolist()  # a new order every epoch


def test_a_shard_that_stays_missing_is_one_clear_error_and_leaves_nothing(served, tmp_path):
    url = f"{served['url']}/train-{{000000..000001}}.tar"  # not the shipped index's list: indexed afresh
    cache = ShardCache(str(tmp_path / "cache"), max_gb=1.0)
    with pytest.raises(UserError, match=r"cannot fetch shard http://127\.0\.0\.1:\d+/train-000099\.tar \(HTTP 404"):
        scan_split(f"{served['url']}/train-{{000000,000099}}.tar", "train", shard_cache=cache)
    assert not [n for n in os.listdir(cache.folder) if n.endswith("train-000099.tar") or is_temporary(n)]
    assert len(scan_split(url, "train", shard_cache=cache).index) > 0  # the list it can fetch is indexed


def test_a_run_trains_from_urls_through_its_shard_cache_and_says_how_it_windows(served, tmp_path):
    from rectrain import trainer as train_mod
    from rectrain.config import resolve_config
    from tests.tiny import TINY
    total = sum(os.path.getsize(os.path.join(served["local"], f"train-{k:06d}.tar")) for k in range(11))
    cfg = resolve_config(["--data_dir", _pattern(served["url"]), "--output", str(tmp_path), "--run_name", "r", *TINY,
                          "--max_steps", "2", "--shard_cache", str(tmp_path / "cache"),
                          "--shard_cache_gb", str(total * 0.8 / 1e9)])  # the val shards take a third of it
    assert train_mod.train(cfg) == 0
    log = (tmp_path / "r/logs/rank0.log").read_text()
    assert "do not fit the" in log and "windows of shards" in log and "top-1" in log
    assert any(n.endswith("train-000000.tar") or n.endswith(".tar") for n in os.listdir(tmp_path / "cache"))


def test_a_cache_too_small_for_a_window_is_one_clear_line(served, tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), max_gb=40e3 / 1e9)  # 40 kB: the val shards alone take more
    train = scan_split(_pattern(served["url"]), "train", shard_cache=cache)
    val = scan_split(_pattern(served["url"]), "val", train.index.classes, shard_cache=cache)
    with pytest.raises(UserError, match=r"--shard_cache_gb 4e-05 is too small .* raise it to at least"):
        build_loaders(train, val, make_buckets(32), LoaderSettings(batch_size=8))


def _read_shards_at_random(url, folder, max_bytes, seed, rounds, out):
    """In a child process: open and read shards in a random order through a small cache shared with its siblings;
    ``out`` gets how many reads matched the server's bytes, or the traceback."""
    rng = np.random.default_rng(seed)
    cache = ShardCache(folder, max_gb=max_bytes / 1e9)
    try:
        good = 0
        for k in rng.integers(0, 11, rounds):
            name = f"train-{int(k):06d}.tar"
            fd = cache.open(f"{url}/{name}")
            try:
                good += os.pread(fd, 1 << 20, 0) == Path(out["local"], name).read_bytes()
            finally:
                os.close(fd)
        out["queue"].put(good)
    except Exception:  # noqa: BLE001 (reported to the parent, which fails the test with it)
        out["queue"].put(traceback.format_exc())


def test_processes_that_evict_each_others_shards_still_read_whole_ones_and_the_cache_stays_bounded(served, tmp_path):
    import multiprocessing as mp
    sizes = [os.path.getsize(os.path.join(served["local"], f"train-{k:06d}.tar")) for k in range(11)]
    max_bytes = 2 * max(sizes) + 1  # two shards: every fetch evicts another process's entry
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    out = {"local": served["local"], "queue": queue}
    procs = [ctx.Process(target=_read_shards_at_random, args=(served["url"], str(tmp_path / "cache"), max_bytes, seed,
                                                              40, out)) for seed in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [40, 40, 40]  # every open found a whole shard, none an error
    left = [e for e in os.scandir(tmp_path / "cache") if e.name.endswith(".tar") and not is_temporary(e.name)]
    assert sum(e.stat().st_size for e in left) <= max_bytes


def test_a_shard_that_cannot_be_fetched_mid_run_stops_it_with_one_line_and_resume_continues(served, tmp_path, capsys):
    """A shard answered 404 after the start (the shipped index lists it): the run stops with one line naming its URL
    and how to continue, instead of replacing every image of it; once it is back, --resume auto finishes the run."""
    from rectrain.cli import main as cli_main
    from tests.tiny import TINY
    args = ["train", "--data_dir", _pattern(served["url"]), "--output", str(tmp_path), "--run_name", "r", *TINY,
            "--epochs", "1", "--shard_cache", str(tmp_path / "cache"), "--workers", "2"]
    served["server"].missing.add("train-000004.tar")
    try:
        capsys.readouterr()
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip()
    finally:
        served["server"].missing.clear()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"cannot fetch shard http://127\.0\.0\.1:\d+/train-000004\.tar \(HTTP 404 .*; the run stopped "
                     r"here: once the shard can be fetched, continue it with --resume auto", err), err
    assert "could not decode" not in (tmp_path / "r/logs/rank0.log").read_text()  # no image was replaced
    assert cli_main([*args, "--resume", "auto"]) == 0
