"""Case 12 (found by this suite): the trainer's process must exit when the run ends, whichever way it ends.

Python's multiprocessing, at interpreter exit, terminate()s (SIGTERM) and join()s the child processes still
alive. DataLoader workers that ignore SIGTERM (so that a scheduler's group-wide SIGTERM cannot kill them
before the main process saves) then wait forever for their loader to tell them to stop, and the main
process waits forever for them, unless the loader iterators were shut down before exit. The stacks of a
hung run (``Result.stacks``) show ``multiprocessing/util.py _exit_function -> join``.
"""

import time

import pytest

from . import harness as h


@pytest.mark.fault(case="12 process exit", fault="a finished run exits (no garbage collection before exit)")
def test_a_finished_run_exits_without_relying_on_the_garbage_collector(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    # gc.disable() in the trainer makes the lucky case (a collection frees the loaders first) impossible.
    run = h.start(h.train_args(data_dir, out, "e", *h.REF1), tmp_path / "run", fault={"no_gc": True})
    run.wait_for("the end of training", lambda: "final weights sha1" in h.log_text(out, "e"))
    run.fault_at = time.monotonic()
    res = run.finish(15)
    outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=int(res.code == 0),
            seconds_to_stop=round(res.stopped_s, 1))
    assert not res.hung, f"the finished run did not exit:\nstacks:\n{res.stacks[-6000:]}"
    assert res.code == 0


@pytest.mark.soak
@pytest.mark.fault(case="12 process exit", fault="an unexpected exception in a 1-process run")
def test_an_unexpected_exception_in_a_single_process_run_ends_it_with_exit_1(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    run = h.start(h.train_args(data_dir, out, "x", *h.REF1), tmp_path / "run",
                  fault={"raise": {"rank": 0, "where": "step", "call": 3}})
    res, raised = run.finish_after("raise", seconds=15)  # one process: nothing to wait for
    assert raised, f"the injected failure never fired:\n{res.stderr[-3000:]}"
    outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=0,
            seconds_to_stop=round(h.seconds_after(res, raised), 1))
    assert not res.hung, f"the process did not exit:\n{res.stderr[-3000:]}\nstacks:\n{res.stacks[-6000:]}"
    assert res.code == 1 and "injected failure in training step 3" in res.stderr
