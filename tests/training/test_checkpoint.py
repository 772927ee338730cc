import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rectrain.training import checkpoint as ck
from rectrain.training.parts import unwrap
from tests.tiny import flip_bits


def _ckpt(v):
    return {"format_version": ck.FORMAT_VERSION, "model": {"w": torch.full((3,), float(v))}, "epoch": v}


def test_save_atomic_round_trips_with_weights_only(tmp_path):
    path = tmp_path / "c" / "last.pth"
    ck.save_atomic(_ckpt(1), str(path))
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert os.listdir(path.parent) == ["last.pth"]  # no temporary file left behind


def test_killed_writer_never_replaces_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    ck.save_atomic(_ckpt(1), str(path))
    # A child process starts writing a large checkpoint and is killed (SIGKILL) mid-write.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from rectrain.training import checkpoint as ck
        real_save = torch.save
        def save_then_die(obj, f):
            f.write(b"partial bytes")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        ck.save_atomic({{"model": {{"w": torch.zeros(3)}}, "epoch": 2}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    loaded = ck.load(str(path))
    assert loaded["epoch"] == 1


def test_failed_write_reports_path_and_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ck.save_atomic(_ckpt(1), str(path))

    def disk_full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ck.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        ck.save_atomic(_ckpt(2), str(path))
    monkeypatch.undo()
    assert ck.load(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_load_reports_corrupt_file_by_path(tmp_path):
    path = tmp_path / "last.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match=str(path)):
        ck.load(str(path))


def test_find_resumable_falls_back_to_previous_good_checkpoint(tmp_path):
    good = tmp_path / "checkpoint_epoch_001.pth"
    ck.save_atomic(_ckpt(1), str(good))
    last = tmp_path / "last.pth"
    last.write_bytes(b"\x00" * 100)
    os.utime(good, (1, 1))  # the corrupt last.pth is newer
    messages = []
    path, loaded = ck.find_resumable(str(tmp_path), log=messages.append)
    assert path == str(good) and loaded["epoch"] == 1
    assert any("last.pth" in m for m in messages)


def test_find_resumable_on_empty_dir_is_none(tmp_path):
    assert ck.find_resumable(str(tmp_path)) is None


def test_prune_keeps_newest_k_epoch_files(tmp_path):
    for e in range(1, 6):
        ck.save_atomic(_ckpt(e), ck.epoch_path(str(tmp_path), e))
    ck.save_atomic(_ckpt(5), str(tmp_path / "last.pth"))
    removed = ck.prune(str(tmp_path), keep=2)
    assert sorted(os.path.basename(p) for p in removed) == [f"checkpoint_epoch_00{e}.pth" for e in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch_004.pth", "checkpoint_epoch_005.pth", "last.pth"]
    assert ck.prune(str(tmp_path), keep=0) == []


def test_unwrap_strips_ddp_and_compile_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, m, attr):
            super().__init__()
            setattr(self, attr, m)

    wrapped = Wrapper(Wrapper(inner, "module"), "_orig_mod")
    assert unwrap(wrapped) is inner
    assert list(unwrap(wrapped).state_dict()) == ["weight", "bias"]


def _stepped(step: int) -> dict:
    return {"format_version": ck.FORMAT_VERSION, "model": {"w": torch.arange(4096.0) + step}, "epoch": step // 10,
            "step": step, "batch_in_epoch": 0}


def test_flipped_bits_load_with_torch_but_are_refused_naming_the_crc(tmp_path):
    path = tmp_path / "checkpoint_epoch_001.pth"
    ck.save_atomic(_stepped(10), str(path))
    flip_bits(path, 100)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], _stepped(10)["model"]["w"])
    with pytest.raises(ck.CheckpointError, match=r"checkpoint_epoch_001\.pth is damaged: .*CRC"):
        ck.load(str(path))
    with pytest.raises(ck.CheckpointError, match="CRC"):
        ck.load(str(path), mmap=True)  # the planner's peek checks too


def test_find_resumable_picks_by_recorded_progress_not_file_time(tmp_path):
    old, new = tmp_path / "checkpoint_epoch_001.pth", tmp_path / "checkpoint_epoch_002.pth"
    ck.save_atomic(_stepped(10), str(old))
    ck.save_atomic(_stepped(20), str(new))
    os.utime(new, (1, 1))  # the newer checkpoint has the older file time (a copy, a touch of the old one)
    path, loaded = ck.find_resumable(str(tmp_path))
    assert path == str(new) and loaded["step"] == 20


def test_find_resumable_skips_a_damaged_newest_checkpoint_saying_why(tmp_path):
    old, new = tmp_path / "checkpoint_epoch_001.pth", tmp_path / "checkpoint_epoch_002.pth"
    ck.save_atomic(_stepped(10), str(old))
    ck.save_atomic(_stepped(20), str(new))
    flip_bits(new, 3)
    messages = []
    path, loaded = ck.find_resumable(str(tmp_path), log=messages.append, mmap=True)
    assert path == str(old) and loaded["step"] == 10
    assert len(messages) == 1 and str(new) in messages[0] and "CRC" in messages[0]
