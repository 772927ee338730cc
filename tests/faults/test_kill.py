"""Case 1: kill -9 of the trainer (during steps, during a checkpoint write), then `--resume auto`.

Promise: every run finishes, no checkpoint on disk is ever unreadable, the final weights equal an
uninterrupted run's, and no temporary file is left behind.
"""

import random
import signal

import pytest

from . import harness as h


def _resume_to_the_end(data_dir, out, tmp_path, tag, script=False):
    return h.run(h.train_args(data_dir, out, "k", *h.REF1, "--resume", "auto"), tmp_path / tag, script=script)


@pytest.mark.fault(case="1 kill -9", fault="SIGKILL of the trainer during a training step, then --resume auto")
def test_kill9_during_training_then_resume_auto_matches_uninterrupted_run(data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    # The seed's entry point, `python train_g4.dn_12xlarge.py`, for both runs.
    run = h.start(h.train_args(data_dir, out, "k", *h.REF1), tmp_path / "killed", fault={"slow_step": 0.02},
                  script=True)
    run.wait_event("step", count=9)  # the third step of epoch 2: epoch 1's checkpoint exists
    run.signal_main(signal.SIGKILL)
    killed = run.finish(h.STOP_TIMEOUT_S)
    assert killed.code == -signal.SIGKILL
    ck = h.ckpt_dir(out, "k")
    assert h.unreadable_checkpoints(ck) == []
    resumed = _resume_to_the_end(data_dir, out, tmp_path, "resumed", script=True)
    outcome(repetitions=1, runs_finished=int(resumed.code == 0), exit_code=killed.code, hangs=int(resumed.hung),
            checkpoints_lost=len(h.unreadable_checkpoints(ck)), seconds_to_stop=killed.stopped_s)
    assert resumed.code == 0, resumed.stderr[-3000:]
    final = h.load_ckpt(ck / "last.pth")
    assert final["step"] == h.REF1_STEPS
    assert h.same_weights(final["model"], h.model_of(h.ckpt_dir(ref1, "ref1") / "last.pth"))
    outcome(samples_lost=0, samples_duplicated=0)  # same steps, same weights: every batch once
    assert h.stray_temp_files(out / "k") == []


@pytest.mark.fault(case="1 kill -9", fault="SIGKILL while a checkpoint is being written (its .tmp file exists)")
def test_kill9_during_checkpoint_write_loses_no_checkpoint_and_the_next_run_removes_the_temp_file(
        data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    ck = h.ckpt_dir(out, "k")
    # The second torch.save (epoch 2's checkpoint) holds its temporary file open for 5 s.
    run = h.start(h.train_args(data_dir, out, "k", *h.REF1), tmp_path / "killed",
                  fault={"slow_save": 5, "slow_save_from": 2})
    run.wait_event("save_slow")
    tmp = run.wait_for("a temporary checkpoint file", lambda: list(ck.glob("*.tmp*")) or list(ck.glob(".*.tmp*")))
    before = {p.name for p in ck.glob("*.pth")}
    run.signal_main(signal.SIGKILL)
    killed = run.finish(h.STOP_TIMEOUT_S)
    assert killed.code == -signal.SIGKILL
    assert h.unreadable_checkpoints(ck) == []
    kept = {p.name for p in ck.glob("*.pth")}
    assert {"checkpoint_epoch_001.pth", "last.pth"} <= kept
    assert h.load_ckpt(ck / "last.pth")["epoch"] == 1  # the previous state, whole
    assert all(p.exists() for p in tmp), "the kill left no temporary file: the window was missed"
    resumed = _resume_to_the_end(data_dir, out, tmp_path, "resumed")
    lost = [n for n in before if n.endswith(".pth") and not (ck / n).exists()]
    outcome(repetitions=1, runs_finished=int(resumed.code == 0), exit_code=killed.code, hangs=int(resumed.hung),
            checkpoints_lost=len(lost) + len(h.unreadable_checkpoints(ck)), seconds_to_stop=killed.stopped_s)
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert h.same_weights(h.model_of(ck / "last.pth"), h.model_of(h.ckpt_dir(ref1, "ref1") / "last.pth"))
    outcome(samples_lost=0, samples_duplicated=0)
    assert h.stray_temp_files(out / "k") == [], "a temporary file of the killed save was never removed"


@pytest.mark.soak
@pytest.mark.fault(case="1 kill -9", fault="SIGKILL at random moments (steps, saves, validation), 6 times in a row")
def test_kill9_at_random_moments_repeatedly_still_ends_with_the_uninterrupted_weights(data_dir, ref1, tmp_path,
                                                                                     outcome):
    rng = random.Random(9)
    out = tmp_path / "out"
    ck = h.ckpt_dir(out, "k")
    kills, codes, lost, stops = 6, [], 0, []
    fault = {"slow_step": 0.02, "slow_val": 0.02, "slow_save": 0.5}
    for i in range(kills):
        args = h.train_args(data_dir, out, "k", *h.REF1, *(["--resume", "auto"] if i else []))
        run = h.start(args, tmp_path / f"try{i}", fault=fault)
        kind = rng.choice(["step", "save_slow", "val_image"])
        n = rng.randint(1, {"step": 8, "save_slow": 2, "val_image": 10}[kind])
        try:
            run.wait_event(kind, count=n, timeout=h.RUN_TIMEOUT_S)
        except AssertionError:
            pass  # this attempt ended or never reached that moment: kill it wherever it is
        run.signal_main(signal.SIGKILL)
        res = run.finish(h.STOP_TIMEOUT_S)
        codes.append(res.code)
        stops.append(res.stopped_s)
        lost += len(h.unreadable_checkpoints(ck))
        assert h.unreadable_checkpoints(ck) == [], f"kill {i} ({kind} {n}) left an unreadable checkpoint"
        assert res.code in (0, -signal.SIGKILL), res.stderr[-3000:]
        if res.code == 0:  # the chain finished before this kill
            break
    resumed = _resume_to_the_end(data_dir, out, tmp_path, "final") if codes[-1] != 0 else res
    outcome(repetitions=len(codes), runs_finished=int(resumed.code == 0), checkpoints_lost=lost,
            hangs=int(resumed.hung), exit_code=codes,
            seconds_to_stop=max((s for s in stops if s is not None), default=None))
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert h.same_weights(h.model_of(ck / "last.pth"), h.model_of(h.ckpt_dir(ref1, "ref1") / "last.pth"))
    outcome(samples_lost=0, samples_duplicated=0)
    assert h.stray_temp_files(out / "k") == []
