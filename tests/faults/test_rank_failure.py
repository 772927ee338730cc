"""Case 3: one rank of a 2-process run dies or raises; the other must stop within seconds.

Under NCCL a peer of a failed rank waits in its next collective for --dist_timeout (30 min by default),
so "the job stops soon and says which rank failed" must not depend on the collective timing out. The runs
pass --dist_timeout 60 and keep the failed rank's gloo connections open (``h.hold``: as under NCCL, no
closed socket wakes the peer); the job must end within PEER_STOP_S (30 s). Failures a rank can agree on
with the others (a failed scan or save on rank 0) must also be stopped in order: every rank's log says
why. Each path of issue 9's defect 3 is one test; the decode-failure limit, a full disk and a NaN are in
test_bad_images.py, test_disk_full.py and test_nan.py.
"""

import os
import signal
import time

import pytest

from . import harness as h


def _start(data_dir, out, tmp_path, fault, *extra):
    args = h.train_args(data_dir, out, "r", *h.REF2, *h.ddp(), *extra)
    return h.start(args, tmp_path / "run", fault=fault)


@pytest.mark.soak
@pytest.mark.fault(case="3 rank failure", fault="SIGKILL of rank 1 of 2 during training")
def test_kill9_of_one_rank_stops_the_other_soon_and_names_the_dead_rank(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    run = _start(data_dir, out, tmp_path, {"slow_step": 0.05, **h.hold(1)})
    _, pid, _, _, _ = run.wait_event("step", rank=1, count=5)  # in epoch 2: epoch 1's checkpoint exists
    run.fault_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    res = run.finish(h.PEER_WAIT_S)
    assert h.unreadable_checkpoints(h.ckpt_dir(out, "r")) == []
    outcome(checkpoints_lost=0)
    h.assert_job_stopped_for(res, 1, res.stopped_s, outcome)


# where the exception is raised -> (rank, RECTRAIN_FAULT, agreed: every rank stops in order and logs why, soak)
RAISES = {
    "training step on rank 1": (1, {"raise": {"rank": 1, "where": "step", "call": 2}}, False, True),
    "data scan on rank 0 (before a barrier)": (0, {"raise": {"rank": 0, "where": "scan"}}, True, False),
    "checkpoint save on rank 0 (not an OSError)": (0, {"raise": {"rank": 0, "where": "save", "call": 1}}, True, True),
}
RAISE_DEFECTS: dict[str, str] = {}


def _raise_params():
    for k, (_, _, _, soak) in RAISES.items():
        marks = [pytest.mark.soak] if soak else []
        if k in RAISE_DEFECTS:
            marks.append(pytest.mark.xfail(strict=True, reason=RAISE_DEFECTS[k]))
        yield pytest.param(k, marks=marks, id=k.split(" (")[0].replace(" ", "-"))


@pytest.mark.fault(case="3 rank failure", fault="an exception on one rank only")
@pytest.mark.parametrize("where", list(_raise_params()))
def test_an_exception_on_one_rank_stops_the_other_soon_and_names_the_failed_rank(where, data_dir, tmp_path, outcome):
    rank, fault, agreed, _ = RAISES[where]
    out = tmp_path / "out"
    res, raised = _start(data_dir, out, tmp_path, {**fault, **h.hold(rank)}).finish_after("raise")
    assert raised, f"the injected failure never fired:\n{res.stderr[-3000:]}"
    assert h.unreadable_checkpoints(h.ckpt_dir(out, "r")) == []
    h.assert_job_stopped_for(res, rank, h.seconds_after(res, raised), outcome)
    if agreed:
        assert h.ranks_logging(out, "r", "error: ") == [0, 1], "a rank stopped without saying why (it was killed)"


@pytest.mark.soak
@pytest.mark.fault(case="3 rank failure", fault="torchrun --max-restarts 1: rank 1 raises once, the job restarts")
def test_torchrun_restart_after_a_rank_failure_resumes_from_the_last_checkpoint(data_dir, ref2, tmp_path, outcome):
    out = tmp_path / "out"
    args = h.train_args(data_dir, out, "r", *h.REF2, "--resume", "auto", "--dist_timeout", str(h.DIST_TIMEOUT_S))
    fault = {"raise": {"rank": 1, "where": "step", "call": 5}, "first_attempt_only": True}
    res = h.start(args, tmp_path / "run", fault=fault, launcher=[*h.TORCHRUN, "--max-restarts", "1"]).finish(150)
    outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=int(res.code == 0))
    assert res.code == 0, res.stderr[-3000:]
    log = h.log_text(out, "r")
    assert "resumed from" in log and "checkpoint_epoch_001.pth" in log
    assert h.same_weights(h.model_of(h.ckpt_dir(out, "r") / "last.pth"),
                          h.model_of(h.ckpt_dir(ref2, "ref2") / "last.pth"))
    outcome(samples_lost=0, samples_duplicated=0, checkpoints_lost=0)


@pytest.mark.soak
@pytest.mark.fault(case="3 rank failure", fault="rank 1 of 2 stopped (SIGSTOP) past --dist_timeout")
def test_a_stopped_rank_is_named_not_the_rank_that_timed_out_waiting_for_it(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    args = h.train_args(data_dir, out, "r", *h.REF2, "--nproc", "2", "--dist_port", h.free_port(),
                        "--dist_timeout", "10")
    run = h.start(args, tmp_path / "run", fault={"slow_step": 0.05})
    _, pid, _, _, _ = run.wait_event("step", rank=1, count=5)
    run.fault_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        res = run.finish(h.PEER_WAIT_S)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=0)
    assert res.code == 1 and not res.hung, res.stderr[-3000:]
    assert "rank 1 is stopped" in res.stderr, res.stderr[-3000:]
    assert "waited 10 s (--dist_timeout)" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert h.unreadable_checkpoints(h.ckpt_dir(out, "r")) == []
    assert "Traceback" in h.log_text(out, "r", 0), "the rank's log keeps the traceback"
