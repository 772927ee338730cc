"""Atomic writes, CPU cores and process pools: what every part of rectrain shares with the operating system.

The full-disk tests use a real full file system (a tmpfs of a few MiB, mounted for the test; skipped where this
process may not mount one): an injected OSError once hid that a real full disk makes torch.save raise a
RuntimeError. Every kind of file rectrain writes is written there, and each must fail with the disk named as the
reason, leave the previous file as it was, and leave no temporary behind.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from rectrain.runtime.io import (atomic_file, atomic_write, is_temporary, pool_map, process_pool, remove_temporaries,
                                  temporary_path, usable_cores, write_json_atomic)


def temporaries(folder) -> list[str]:
    return [n for _root, _dirs, names in os.walk(folder) for n in names if is_temporary(n)]


# -- the writer, on an ordinary disk ----------------------------------------------------------------------------
def test_a_complete_write_replaces_the_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    write_json_atomic(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("error", [RuntimeError("a bug mid-write"), KeyboardInterrupt()])
def test_an_exception_mid_write_keeps_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_file(str(target)) as f:
            f.write(b"half of the new")
            raise error
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_the_temporary_is_hidden_beside_the_target_and_named_as_it(tmp_path):
    target = tmp_path / "sub" / "x.pth"
    target.parent.mkdir()
    with atomic_file(str(target)) as f:
        assert os.path.dirname(f.name) == str(target.parent)  # a rename never crosses file systems
        assert os.path.basename(f.name).startswith(".x.pth.") and is_temporary(f.name)
        assert not target.exists()  # readers never see it before it is complete
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_new_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "shared.jpg"), b"x")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "shared.jpg").st_mode & 0o777) == "0o644"


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    stale = temporary_path(str(tmp_path / "a" / "img.jpg"))
    os.makedirs(os.path.dirname(stale))
    open(stale, "wb").close()
    (tmp_path / "a" / ".hidden_but_mine.jpg").write_bytes(b"keep")
    (tmp_path / "a" / "img.jpg.tmp").write_bytes(b"keep")  # not our pattern: someone else's file
    assert remove_temporaries(str(tmp_path), recursive=True) == [stale]
    assert sorted(os.listdir(tmp_path / "a")) == [".hidden_but_mine.jpg", "img.jpg.tmp"]


def test_a_failed_open_names_the_target(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(str(tmp_path / "no" / "such" / "folder.json"), "x")


# -- cores and pools ---------------------------------------------------------------------------------------------
def test_usable_cores_follow_the_affinity_mask():
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_a_pool_runs_only_where_it_pays_and_keeps_the_order():
    with process_pool(1, 100) as pool:
        assert pool is None
    with process_pool(4, 1) as pool:
        assert pool is None
    with process_pool(2, 10, parallel_from=20) as pool:
        assert pool is None
    with process_pool(2, 10) as pool:
        assert pool is not None
        pids = list(pool_map(pool, _pid_of, range(10)))
    assert len(set(pids) - {os.getpid()}) >= 1 and os.getpid() not in pids
    assert list(pool_map(None, abs, [-1, -2])) == [1, 2]


def _pid_of(_x) -> int:
    return os.getpid()


# -- a real full disk, for every kind of file --------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 3 MiB tmpfs; ``fill(leave)`` then writes a filler file that leaves ``leave`` bytes free."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")

    def fill(leave: int = 0) -> None:
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        with open(mount / ".filler", "ab") as f:
            f.write(b"\0" * max(0, free - leave))

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_is_an_enospc_whatever_the_writer_raised(full_disk):
    mount, fill = full_disk
    target = mount / "big.pth"
    target.write_bytes(b"previous")
    fill(64 << 10)
    with pytest.raises(OSError) as e:  # torch.save itself raises RuntimeError("... unexpected pos ...")
        with atomic_file(str(target)) as f:
            torch.save({"w": torch.zeros(1 << 20)}, f)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_bytes() == b"previous" and temporaries(mount) == []


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(full_disk):
    from rectrain.training.checkpoint import CheckpointError, load, save_atomic
    mount, fill = full_disk
    path = mount / "last.pth"
    save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, str(path))
    fill(16 << 10)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        save_atomic({"model": {"w": torch.zeros(1 << 20)}, "epoch": 2}, str(path))
    assert load(str(path))["epoch"] == 1 and temporaries(mount) == []


def test_metrics_config_and_summary_on_a_full_disk_keep_their_last_complete_version(full_disk):
    from rectrain.runtime.metrics import MetricsWriter
    mount, fill = full_disk
    writer = MetricsWriter(str(mount))
    writer.add({"epoch": 1, "train_loss": 2.0, "lr": 0.1})
    write_json_atomic(str(mount / "config.json"), {"lr": 0.1})
    before = {n: (mount / n).read_bytes() for n in ("metrics.jsonl", "metrics.csv", "steps.jsonl", "config.json")}
    fill(0)
    with pytest.raises(OSError) as e:
        writer.add({"epoch": 2, "train_loss": 1.5, "lr": 0.05, "note": "x" * 10000})
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        write_json_atomic(str(mount / "config.json"), {"lr": 0.2, "pad": "x" * 10000})
    assert {n: (mount / n).read_bytes() for n in before} == before and temporaries(mount) == []


def test_the_curves_plot_on_a_full_disk_is_skipped_with_a_warning(full_disk, capsys):
    from rectrain.runtime.plot import plot_curves
    mount, fill = full_disk
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_acc1": 10.0 * e, "lr": 0.1, "images_per_sec": 100.0}
            for e in (1, 2)]
    plot_curves(rows[:1], str(mount / "curves.png"))
    before = (mount / "curves.png").read_bytes()
    fill(1024)
    with pytest.raises(OSError):
        plot_curves(rows, str(mount / "curves.png"))
    assert (mount / "curves.png").read_bytes() == before and temporaries(mount) == []


def test_the_scan_cache_on_a_full_disk_goes_to_the_next_place(full_disk, tmp_path):
    from rectrain.data.source import scan_split
    from rectrain.data.synth import make_synthetic
    mount, fill = full_disk
    make_synthetic(str(mount / "data"), classes=2, train_per_class=4, val_per_class=0, kind="tiny", seed=0)
    fill(512)
    scan = scan_split(str(mount / "data"), "train", cache_dir=str(tmp_path / "run"))
    assert len(scan.index) == 8 and scan.cache_path.startswith(str(tmp_path / "run"))
    assert temporaries(mount) == [] and not (mount / "data" / "sorted_idxar_train.npz").exists()
    assert scan_split(str(mount / "data"), "train", cache_dir=str(tmp_path / "run")).from_cache


def test_an_export_on_a_full_disk_is_one_line_and_keeps_the_previous_file(full_disk, tiny_run, capsys):
    from rectrain.cli import main
    mount, fill = full_disk
    target = mount / "model.pt"
    target.write_bytes(b"previous export")
    fill(8 << 10)
    code = main(["export", "--checkpoint", tiny_run.ckpt, "--format", "torchscript", "--out", str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err
    assert target.read_bytes() == b"previous export" and temporaries(mount) == []


def test_prepare_and_synth_on_a_full_disk_stop_with_one_line_and_leave_only_complete_images(full_disk, tmp_path,
                                                                                           capsys):
    from rectrain.cli import main
    from rectrain.data.synth import make_synthetic
    mount, fill = full_disk
    src = make_synthetic(str(tmp_path / "src"), classes=2, train_per_class=30, val_per_class=0, kind="imagenet",
                         seed=0)
    assert src["train"] == 60
    fill(200 << 10)  # room for a few prepared images, not for 60
    code = main(["prepare", "--data_dir", str(tmp_path / "src"), "--out", str(mount / "out"), "--short_side", "256",
                 "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "No space left on device" in err and err.startswith("rectrain prepare: error: cannot write")
    assert temporaries(mount) == []
    from PIL import Image
    written = [os.path.join(r, n) for r, _d, ns in os.walk(mount / "out" / "train") for n in ns]
    for path in written:  # whatever got a name is a whole image
        with Image.open(path) as im:
            im.load()
    code = main(["synth", "--out", str(mount / "synth"), "--classes", "2", "--train_per_class", "40",
                 "--kind", "imagenet", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "No space left on device" in err and temporaries(mount) == []


def test_npz_writes_are_atomic_too(tmp_path):
    target = tmp_path / "cache.npz"
    with atomic_file(str(target)) as f:
        np.savez(f, a=np.arange(3))
    with np.load(target) as z:
        assert z["a"].tolist() == [0, 1, 2]


POOL_SCRIPT = """
import os, sys, time
from rectrain.runtime.io import pool_map, process_pool
def pid_then_wait(i):
    os.write(1, f"{os.getpid()}\\n".encode())  # one write: lines of two processes never interleave
    time.sleep(120)
with process_pool(2, 4) as pool:
    list(pool_map(pool, pid_then_wait, range(4)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_processes_die_with_a_killed_parent(tmp_path):
    """``kill PID`` of the main process during a long scan: its pool processes go too (they used to block forever)."""
    proc = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], stdout=subprocess.PIPE, text=True)
    children = {int(proc.stdout.readline()) for _ in range(2)}
    proc.terminate()  # SIGTERM: no handler in a scan, the main process dies at once
    assert proc.wait(timeout=30) == -15
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        children = {pid for pid in children if _alive(pid)}
        time.sleep(0.05)
    assert not children, f"pool processes {children} outlived their killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie is dead (its parent, init, reaps it)
    except FileNotFoundError:
        return False
