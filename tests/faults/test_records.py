"""Case 14: a run's records (metrics.jsonl, steps.jsonl, summary.json) across stops, kills and a full disk.

Promise: a run that is stopped (SIGTERM), killed (kill -9, also inside a checkpoint's save) or runs out of disk,
and is then resumed, ends with the records of an uninterrupted run: every epoch row and every interval row once,
with the same values (times aside). A full disk anywhere during training ends in one line naming the file (exit
2); once space is freed, --resume auto finishes the run. The full disk is a real one (a small tmpfs).
"""

import json
import os
import signal
import subprocess
import uuid
from contextlib import contextmanager

import pytest

from . import harness as h

SAME = ("step", "epoch", "lr", "train_loss")                          # interval rows: all but the timings
SAME_EPOCH = ("epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr")


def records(out, name):
    def rows(path, keys):
        lines = (out / name / path).read_text().splitlines()
        return [tuple(round(r[k], 6) if isinstance(r.get(k), float) else r.get(k) for k in keys)
                for r in map(json.loads, lines)]
    return rows("steps.jsonl", SAME), rows("metrics.jsonl", SAME_EPOCH)


def assert_records_of(out, name, ref1):
    got, want = records(out, name), records(ref1, "ref1")
    assert got[0] == want[0], "steps.jsonl differs from the uninterrupted run's"
    assert got[1] == want[1], "metrics.jsonl differs from the uninterrupted run's"
    summary = json.loads((out / name / "summary.json").read_text())
    assert summary["epochs"] == len(want[1]) and summary["best_acc1"] is not None


def resume(data_dir, out, tmp_path, tag="resumed"):
    return h.run(h.train_args(data_dir, out, "k", *h.REF1, "--resume", "auto"), tmp_path / tag)


@pytest.mark.fault(case="14 records", fault="SIGTERM or kill -9 mid-epoch, then --resume auto; records compared")
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.soak)],
                         ids=["sigterm", "kill-9"])
def test_a_stopped_or_killed_run_resumes_to_the_records_of_an_uninterrupted_one(data_dir, ref1, tmp_path, outcome,
                                                                                sig):
    out = tmp_path / "out"
    run = h.start(h.train_args(data_dir, out, "k", *h.REF1), tmp_path / "stopped", fault={"slow_step": 0.05})
    run.wait_event("step", count=9)  # inside epoch 2: epoch 1's checkpoint and row exist
    run.signal_main(sig)
    stopped = run.finish(h.STOP_TIMEOUT_S)
    resumed = resume(data_dir, out, tmp_path)
    outcome(repetitions=1, runs_finished=int(resumed.code == 0), exit_code=stopped.code, hangs=int(resumed.hung))
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert_records_of(out, "k", ref1)


@pytest.mark.fault(case="14 records", fault="kill -9 while epoch 2's checkpoint is written (after its metrics row)")
def test_a_kill_during_a_checkpoint_save_loses_no_row_and_duplicates_none(data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    run = h.start(h.train_args(data_dir, out, "k", *h.REF1), tmp_path / "killed",
                  fault={"slow_save": 5, "slow_save_from": 2})
    run.wait_event("save_slow")
    run.signal_main(signal.SIGKILL)
    killed = run.finish(h.STOP_TIMEOUT_S)
    resumed = resume(data_dir, out, tmp_path)
    outcome(repetitions=1, runs_finished=int(resumed.code == 0), exit_code=killed.code, hangs=int(resumed.hung))
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert_records_of(out, "k", ref1)


@contextmanager
def small_disk(tmp_path, size: str):
    """A real file system of ``size`` (tmpfs), for a run's --output; skipped where it cannot be mounted."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(mount, leave: int = 0) -> None:
    st = os.statvfs(mount)
    with open(mount / "filler", "ab") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


@pytest.mark.fault(case="7 disk full", fault="a real full disk (tmpfs) mid-epoch, then space freed and --resume auto")
def test_a_real_full_disk_mid_epoch_is_one_line_and_the_run_resumes_once_space_is_freed(data_dir, ref1, tmp_path,
                                                                                       outcome):
    with small_disk(tmp_path, "64m") as disk:
        out = disk / "out"
        run = h.start(h.train_args(data_dir, out, "k", *h.REF1), tmp_path / "full", fault={"slow_step": 0.3})
        run.wait_event("step", count=8)  # inside epoch 2
        fill(disk)
        res = run.finish()
        outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=0,
                checkpoints_lost=len(h.unreadable_checkpoints(h.ckpt_dir(out, "k"))))
        assert res.code == 2, res.stderr[-3000:]
        assert len(res.error_lines) == 1 and "No space left on device" in res.stderr
        assert "Traceback" not in res.stderr and "steps.jsonl" in res.stderr
        assert h.unreadable_checkpoints(h.ckpt_dir(out, "k")) == [] and h.stray_temp_files(out / "k") == []
        (disk / "filler").unlink()
        resumed = resume(data_dir, out, tmp_path)
        assert resumed.code == 0, resumed.stderr[-3000:]
        assert_records_of(out, "k", ref1)
        assert h.same_weights(h.model_of(h.ckpt_dir(out, "k") / "last.pth"),
                              h.model_of(h.ckpt_dir(ref1, "ref1") / "last.pth"))


@pytest.mark.fault(case="7 disk full", fault="a real full disk (tmpfs) while a checkpoint is written")
def test_a_real_full_disk_during_a_checkpoint_names_the_disk_not_torch(data_dir, tmp_path, outcome):
    with small_disk(tmp_path, "64m") as disk:
        out = disk / "out"
        run = h.start(h.train_args(data_dir, out, "k", *h.REF1), tmp_path / "full", fault={"slow_step": 0.3})
        run.wait_event("step", count=3)  # epoch 1, before its checkpoint: leave room for the records, not for it
        fill(disk, leave=300 << 10)
        res = run.finish()
        outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=0)
        assert res.code == 2, res.stderr[-3000:]
        assert len(res.error_lines) == 1 and "No space left on device" in res.stderr
        assert "enforce fail" not in res.stderr and "Traceback" not in res.stderr
        assert h.stray_temp_files(out / "k") == []
