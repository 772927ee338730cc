"""Case 13: two runs on one run folder (a double launch, a requeued job racing the old one, `--resume auto` on a
live run), and a run killed while it held the folder.

Promise: the second run stops at once with one line naming the holder, before it reads or writes anything in the
folder (the first run's in-flight checkpoint temporary included), and the first run ends as if alone: every epoch
once in its records. A lock left by a killed run is taken over, with a note.
"""

import json
import signal

import pytest

from . import harness as h


def epochs_of(out, name) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.fault(case="13 two runs, one folder", fault="a second identical run started while the first trains")
@pytest.mark.parametrize("second", ["same flags", pytest.param("--resume auto", marks=pytest.mark.soak)])
def test_a_second_run_on_a_busy_folder_stops_at_once_and_the_first_ends_as_if_alone(data_dir, tmp_path, outcome,
                                                                                    second):
    out = tmp_path / "out"
    first = h.start(h.train_args(data_dir, out, "r", "--epochs", "2"), tmp_path / "first", fault={"slow_step": 0.3})
    first.wait_for("the first run's first step", lambda: h.log_text(out, "r").count(" step ") >= 1)
    extra = ["--resume", "auto"] if second == "--resume auto" else []
    res = h.run(h.train_args(data_dir, out, "r", "--epochs", "2", *extra), tmp_path / "second")
    done = first.finish()
    outcome(repetitions=1, runs_finished=int(done.code == 0), exit_code=res.code, hangs=int(res.hung),
            seconds_to_stop=round(res.seconds, 1))
    assert res.code == 2, res.stderr[-3000:]
    assert len(res.error_lines) == 1 and "in use by another run" in res.stderr and f"PID {first.pid}" in res.stderr
    assert "--run_name" in res.stderr and "Traceback" not in res.stderr
    assert done.code == 0, done.stderr[-3000:]
    assert epochs_of(out, "r") == [1, 2]
    log = h.log_text(out, "r")
    assert log.count("saved checkpoint") == 2 and "removed" not in log  # no temporary of the first run was deleted
    assert h.unreadable_checkpoints(h.ckpt_dir(out, "r")) == []


@pytest.mark.fault(case="13 two runs, one folder", fault="kill -9 of a run, then a new run on its folder")
def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    first = h.start(h.train_args(data_dir, out, "k", "--epochs", "2"), tmp_path / "first", fault={"slow_step": 0.3})
    first.wait_for("the first run's first step", lambda: h.log_text(out, "k").count(" step ") >= 1)
    first.kill_group(signal.SIGKILL)
    first.finish()
    res = h.run(h.train_args(data_dir, out, "k", "--epochs", "1", "--resume", "auto"), tmp_path / "second")
    outcome(repetitions=1, runs_finished=int(res.code == 0), exit_code=res.code, hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    assert f"locked by a run that ended without releasing it (PID {first.pid}" in res.stdout
    assert (out / "k" / ".rectrain.lock").read_text() == ""  # released at the end: nothing to take over next time
