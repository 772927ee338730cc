"""shared_scan: with several processes only rank 0 lists the data; the others read the cache file it names."""

import datetime
import multiprocessing as mp
import traceback

import torch

from tests.tiny import make_tiny_data


def _rank(rank, init, data_dir, queue):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))  # a failed peer: no long wait
    try:
        from rectrain.data import source
        if rank == 1:
            def listed(*a, **k):
                raise AssertionError("rank 1 listed the data")
            source.scan_folder = listed  # rank 0's scan must be all this rank reads
        notes = []
        train = source.shared_scan(data_dir, "train", is_primary=rank == 0, log=notes.append)
        val = source.shared_scan(data_dir, "val", train.index.classes, is_primary=rank == 0, log=notes.append)
        queue.put((rank, [str(p) for p in train.index.paths], train.sizes.tolist(), len(val.index), notes))
    except Exception:  # noqa: BLE001 (the parent fails the test with it)
        queue.put((rank, traceback.format_exc(), None, None, None))
    finally:
        torch.distributed.destroy_process_group()


def test_only_rank_0_lists_the_data_and_every_rank_gets_its_scan(tmp_path):
    data_dir = make_tiny_data(tmp_path / "data")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, f"file://{tmp_path / 'rdzv'}", str(data_dir), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {r: rest for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert not [r for r in got if isinstance(got[r][0], str)], "\n".join(str(got[r][0]) for r in got)  # tracebacks
    assert got[0][:3] == got[1][:3] and len(got[0][0]) > 0 and got[0][2] > 0
    assert got[0][3] == []  # rank 0 scanned: nothing to say
    assert [n.split(":")[0] for n in got[1][3]] == ["train", "val"]
    assert all("without listing the data" in n for n in got[1][3])
