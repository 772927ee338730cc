"""Case 2: the stop signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1) to the main process and to the whole process group,
during training and during validation, with 1 and 2 processes.

Promise (README "Stopping and resuming"): a checkpoint at the next step boundary (or validation abandoned),
exit status 128 + signal (143, 130, 129, 138), and `--resume auto` ends with the weights of an uninterrupted run.
The whole-group variants are what SLURM's scancel/preemption, systemd and `kill -- -PGID` do: the
DataLoader workers get the signal too.
"""

import itertools
import signal

import pytest

from . import harness as h

TERM, INT, HUP, USR1 = signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1
# (target, signal, phase, processes) run by default; the rest of the matrix is the soak. SIGHUP to the group: a
# closed terminal or ssh session; SIGUSR1 to the main process: SLURM's --signal=USR1@N (forwarding by the launcher
# of --nproc 2: the soak, and test_train's SIGTERM-to-the-launcher test, the same code for every stop signal).
DEFAULT = {("group", TERM, "train", 1), ("main", INT, "val", 1), ("group", HUP, "train", 1),
           ("main", USR1, "train", 1)}
# Known defects: variant -> reason (strict xfail: a fix makes the test fail until its mark is dropped).
DEFECTS: dict[tuple, str] = {}


def _variants():
    for target, sig, phase, nproc in itertools.product(("main", "group"), (TERM, INT, HUP, USR1), ("train", "val"), (1, 2)):
        v = (target, sig, phase, nproc)
        marks = [] if v in DEFAULT else [pytest.mark.soak]
        if v in DEFECTS:
            marks.append(pytest.mark.xfail(strict=True, reason=DEFECTS[v]))
        yield pytest.param(*v, marks=marks, id=f"{target}-{signal.Signals(sig).name}-{phase}-{nproc}p")


@pytest.mark.fault(case="2 stop signals", fault="stop signal, then --resume auto")
@pytest.mark.parametrize("target,sig,phase,nproc", list(_variants()))
def test_stop_signal_saves_exits_128_plus_signal_and_resume_matches_uninterrupted_run(
        target, sig, phase, nproc, data_dir, request, tmp_path, outcome):
    ref = request.getfixturevalue("ref1" if nproc == 1 else "ref2")
    ref_name, flags, steps = ("ref1", h.REF1, h.REF1_STEPS) if nproc == 1 else ("ref2", h.REF2, h.REF2_STEPS)
    spe = steps // 2  # both references stop after 2 epochs
    out, name = tmp_path / "out", "s"

    def args(*extra):
        return h.train_args(data_dir, out, name, *flags, *(h.ddp() if nproc == 2 else []), *extra)

    if phase == "train":
        run = h.start(args(), tmp_path / "stopped", fault={"slow_step": 0.2})
        run.wait_event("step", rank=0, count=spe + 2)  # the second step of epoch 2
    else:
        run = h.start(args(), tmp_path / "stopped", fault={"slow_val": 0.3})
        # epoch 1's validation has started, and every validation worker is decoding (2 in all)
        run.wait_for("two validation workers at work",
                     lambda: len({e[1] for e in run.events() if e[3] == "val_image"}) >= 2)
    (run.signal_main if target == "main" else run.kill_group)(sig)
    stopped = run.finish(h.STOP_TIMEOUT_S)
    outcome(repetitions=1, exit_code=stopped.code, seconds_to_stop=stopped.stopped_s, hangs=int(stopped.hung))
    assert stopped.code == 128 + sig, stopped.stderr[-3000:]
    for rank in range(nproc):
        assert f"stopping on signal {int(sig)}" in h.log_text(out, name, rank), f"rank {rank} did not stop cleanly"
    ck = h.ckpt_dir(out, name)
    last = h.load_ckpt(ck / "last.pth")
    if phase == "train":  # mid-epoch 2, at the step boundary after the signal (a step takes >= 0.2 s here)
        assert (last["epoch"], 0 < last["batch_in_epoch"] < spe) == (1, True)
        assert spe + 2 <= last["step"] <= spe + 4, f"signalled in step {spe + 2}, saved at step {last['step']}"
    else:  # epoch 1 trained, its validation abandoned: it is validated again after the resume
        assert (last["epoch"], last["batch_in_epoch"]) == (0, spe)
        assert not (ck / "checkpoint_epoch_001.pth").exists()
    resumed = h.run(args("--resume", "auto"), tmp_path / "resumed")
    outcome(runs_finished=int(resumed.code == 0), hangs=int(stopped.hung or resumed.hung),
            checkpoints_lost=len(h.unreadable_checkpoints(ck)))
    assert resumed.code == 0, resumed.stderr[-3000:]
    final = h.load_ckpt(ck / "last.pth")
    assert final["step"] == steps
    assert h.same_weights(final["model"], h.model_of(h.ckpt_dir(ref, ref_name) / "last.pth"))
    outcome(samples_lost=0, samples_duplicated=0)
    assert [r["epoch"] for r in h.metric_rows(out, name)] == [1, 2]
    assert h.stray_temp_files(out / name) == []


@pytest.mark.fault(case="2 stop signals", fault="SIGTERM to the process group while DataLoader workers start")
def test_group_sigterm_while_dataloader_workers_start_still_saves_and_exits_143(data_dir, tmp_path, outcome):
    out = tmp_path / "out"
    run = h.start(h.train_args(data_dir, out, "w", *h.REF2, *h.ddp()), tmp_path / "stopped",
                  fault={"slow_worker_start": 3})
    run.wait_event("worker_start")
    run.kill_group(TERM)
    res = run.finish(h.STOP_TIMEOUT_S)
    outcome(repetitions=1, exit_code=res.code, seconds_to_stop=res.stopped_s, hangs=int(res.hung), runs_finished=0,
            checkpoints_lost=0)
    assert res.code == h.EXIT_SIGTERM, res.stderr[-3000:]
    assert h.load_ckpt(h.ckpt_dir(out, "w") / "last.pth")["step"] >= 0
