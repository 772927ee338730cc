"""Case 9: the loss becomes NaN on one rank of two.

Promise: every rank stops, naming the step (the message says what to change: --lr, --weight_decay),
and the last good checkpoint is untouched (nothing is saved after the loss went bad).
"""

import pytest

from . import harness as h


@pytest.mark.fault(case="9 NaN loss", fault="NaN loss on rank 1 of 2, the 2nd step after a resume")
def test_a_nan_on_one_rank_stops_every_rank_naming_the_step_and_keeps_the_last_good_checkpoint(
        data_dir, ref2, tmp_path, outcome):
    out = tmp_path / "out"
    run_dir = h.copy_run(ref2, "ref2", out)
    ck = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.glob("*.pth")}
    step = h.REF2_STEPS + 2  # steps count from 1, as in the log lines
    run = h.start(h.train_args(data_dir, out, "ref2", "--epochs", "4", "--resume", "auto", *h.ddp()),
                  tmp_path / "run", fault={"nan": {"rank": 1, "call": 2}, **h.hold(1)})
    res, nan = run.finish_after("nan")
    assert nan is not None, f"the injected NaN never fired:\n{res.stderr[-3000:]}"
    after = {p.name: p.read_bytes() for p in ck.glob("*.pth")}
    outcome(checkpoints_lost=sum(after.get(k) != v for k, v in before.items()))
    h.assert_job_stopped_for(res, 1, h.seconds_after(res, nan), outcome)
    assert res.code == 2 and f"non-finite at step {step}" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for rank in (0, 1):
        assert f"non-finite at step {step}" in h.log_text(out, "ref2", rank), f"rank {rank}'s log does not say why"
    assert after == before, "a checkpoint was written or changed after the loss went bad"


@pytest.mark.soak
@pytest.mark.fault(case="9 NaN loss", fault="NaN loss in a 1-process run, the 3rd step after a resume")
def test_a_nan_in_one_process_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_dir, ref1, tmp_path,
                                                                                      outcome):
    out = tmp_path / "out"
    ck = h.copy_run(ref1, "ref1", out) / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.glob("*.pth")}
    run = h.start(h.train_args(data_dir, out, "ref1", "--epochs", "3", "--resume", "auto"), tmp_path / "run",
                  fault={"nan": {"rank": 0, "call": 3}})
    res = run.finish()
    after = {p.name: p.read_bytes() for p in ck.glob("*.pth")}
    outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung), runs_finished=0,
            checkpoints_lost=sum(after.get(k) != v for k, v in before.items()))
    assert res.code == 2 and len(res.error_lines) == 1, res.stderr[-3000:]
    assert f"non-finite at step {h.REF1_STEPS + 3}" in res.stderr
    assert after == before
