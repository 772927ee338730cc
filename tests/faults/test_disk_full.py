"""Case 7: the disk fills up while a checkpoint or the metrics are written (a write raising ENOSPC).

Promise: the previous checkpoint stays intact, the error is one clear line (exit 2: the user frees space
or picks another --output, then resumes), and every rank stops, soon.
"""

import pytest

from . import harness as h

DEFAULT = {("checkpoint", 1), ("metrics", 2)}
DEFECTS: dict[tuple, str] = {}


def _variants():
    for what in ("checkpoint", "metrics"):
        for nproc in (1, 2):
            marks = [] if (what, nproc) in DEFAULT else [pytest.mark.soak]
            if (what, nproc) in DEFECTS:
                marks.append(pytest.mark.xfail(strict=True, reason=DEFECTS[(what, nproc)]))
            yield pytest.param(what, nproc, marks=marks, id=f"{what}-{nproc}p")


@pytest.mark.fault(case="7 disk full", fault="ENOSPC while writing epoch 2's checkpoint or its metrics row")
@pytest.mark.parametrize("what,nproc", list(_variants()))
def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_every_rank_with_one_line(what, nproc, data_dir, tmp_path,
                                                                                     outcome):
    out = tmp_path / "out"
    flags = h.REF1 if nproc == 1 else [*h.REF2, *h.ddp()]
    # checkpoint: the first save (epoch 1) succeeds, the second fails half-written. metrics: the run writes
    # metrics.jsonl and metrics.csv when it starts and with epoch 1's row (before its checkpoint); the next write,
    # epoch 2's row, fails.
    fault = {"enospc": {"what": what, "after": 1 if what == "checkpoint" else 4, "rank": 0}}
    if nproc == 2:
        fault.update(h.hold(0))
    run = h.start(h.train_args(data_dir, out, "f", *flags), tmp_path / "run", fault=fault)
    res, hit = run.finish_after("enospc")
    assert hit is not None, f"the injected ENOSPC never fired:\n{res.stderr[-3000:]}"
    ck = h.ckpt_dir(out, "f")
    outcome(checkpoints_lost=len(h.unreadable_checkpoints(ck)))
    if nproc == 2:
        h.assert_job_stopped_for(res, 0, h.seconds_after(res, hit), outcome)
        assert h.ranks_logging(out, "f", "No space left") == [0, 1], "a rank stopped without saying why"
    else:
        outcome(repetitions=1, runs_finished=0, exit_code=res.code, hangs=int(res.hung),
                seconds_to_stop=round(h.seconds_after(res, hit), 1))
    assert res.code == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.error_lines if "error" in ln]
    assert 1 <= len(errors) <= nproc and all("No space left" in ln for ln in errors), res.stderr[-3000:]
    assert h.unreadable_checkpoints(ck) == []
    assert h.load_ckpt(ck / "checkpoint_epoch_001.pth")["epoch"] == 1
    assert h.load_ckpt(ck / "last.pth")["epoch"] == 1
    assert not (ck / "checkpoint_epoch_002.pth").exists()
    assert h.stray_temp_files(out / "f") == []
