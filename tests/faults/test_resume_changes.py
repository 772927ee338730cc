"""Case 4: resume across changes: another world size, batch size or --epochs; another run's checkpoint,
another data set, other settings.

The learning-rate curve is pinned from both places it is reported: the `lr` of every log line (one per
step at --print_freq 1; a resumed run appends to the same rank0.log) and the lr column of metrics.jsonl.
After the warm-up it must never rise, and it must end at its minimum (the cosine's last step is within
2% of --lr at these lengths; 0 is --min_lr).
"""

import shutil

import pytest

from rectrain.data.synth import make_synthetic

from . import harness as h

END_LR = 0.02 * h.LR


def assert_lr_anneals(out, name, total_steps):
    curve = h.logged_lr(out, name)
    steps = [s for s, _ in curve]
    assert steps == sorted(set(steps)), f"steps go back or repeat across the resume: {steps}"
    assert steps[-1] == total_steps, f"the run ended at step {steps[-1]}, not {total_steps}: {steps}"
    lrs = [lr for _, lr in curve]
    peak = lrs.index(max(lrs))
    after = lrs[peak:]
    rises = [(steps[peak + i + 1], a, b) for i, (a, b) in enumerate(zip(after, after[1:])) if b > a]
    assert not rises, f"the learning rate rises after the warm-up at (step, before, after) {rises}: {curve}"
    assert lrs[-1] <= END_LR, f"the schedule ends at lr {lrs[-1]}, not at its minimum: {curve}"
    rows = h.metric_rows(out, name)
    col = [r["lr"] for r in rows]
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert col == sorted(col, reverse=True) and col[-1] <= END_LR, f"metrics.jsonl lr column: {col}"


@pytest.mark.fault(case="4 resume across changes", fault="resume 2 processes -> 1 at an epoch boundary")
def test_resume_with_another_world_size_continues_the_lr_schedule_to_its_minimum(data_dir, ref2, tmp_path, outcome):
    out = tmp_path / "out"
    h.copy_run(ref2, "ref2", out)  # 2 of 4 epochs done by 2 processes (3 steps per epoch)
    res = h.run(h.train_args(data_dir, out, "ref2", "--epochs", "4", "--resume", "auto"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    assert h.steps_per_epoch(out, "ref2") == 6  # one process, 48 images, batch 8
    assert_lr_anneals(out, "ref2", total_steps=4 * 6)


@pytest.mark.fault(case="4 resume across changes", fault="resume with --batch_size 8 -> 4 at an epoch boundary")
def test_resume_with_another_batch_size_continues_the_lr_schedule_to_its_minimum(data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    h.copy_run(ref1, "ref1", out)  # 2 of 3 epochs at batch 8 (6 steps per epoch)
    res = h.run(h.train_args(data_dir, out, "ref1", "--epochs", "3", "--batch_size", "4", "--resume", "auto"),
                tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    spe = h.steps_per_epoch(out, "ref1")  # batch 4: about 12 (each bucket drops its remainder)
    assert spe > 6
    assert_lr_anneals(out, "ref1", total_steps=3 * spe)


@pytest.mark.fault(case="4 resume across changes", fault="resume with --epochs 3 -> 4")
def test_resume_with_more_epochs_continues_the_lr_schedule_to_its_minimum(data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    h.copy_run(ref1, "ref1", out)
    res = h.run(h.train_args(data_dir, out, "ref1", "--epochs", "4", "--resume", "auto"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    assert_lr_anneals(out, "ref1", total_steps=4 * 6)


@pytest.mark.fault(case="4 resume across changes", fault="--resume PATH of run A into run B that has its own history")
def test_resume_of_another_runs_checkpoint_never_damages_either_run(data_dir, ref1, ref2, tmp_path, outcome):
    out = tmp_path / "out"
    b = h.copy_run(ref2, "ref2", out)  # run B, with its own checkpoints, metrics and summary
    a_ckpt = h.ckpt_dir(ref1, "ref1") / "checkpoint_epoch_001.pth"
    a_before, b_before = h.snapshot(ref1 / "ref1"), h.snapshot(b)
    res = h.run(h.train_args(data_dir, out, "ref2", *h.REF1, "--resume", str(a_ckpt)), tmp_path / "run")
    changed = sorted(k for k in b_before if h.snapshot(b).get(k) != b_before[k])
    outcome(repetitions=1, exit_code=res.code, checkpoints_lost=sum(k.endswith(".pth") for k in changed),
            hangs=int(res.hung))
    assert h.snapshot(ref1 / "ref1") == a_before
    assert changed == [], f"run B's files were changed: {changed}"
    if res.code != 0:  # refusing is fine: with one line that says what to do
        assert res.code == 2 and len(res.error_lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.mark.fault(case="4 resume across changes", fault="resume on a data set with other classes")
def test_resume_on_a_data_set_with_other_classes_is_refused_with_path_and_reason(ref1, tmp_path, outcome):
    other = tmp_path / "other"
    make_synthetic(str(other), classes=4, train_per_class=4, val_per_class=1, kind="tiny", seed=1)
    ckpt = h.ckpt_dir(ref1, "ref1") / "last.pth"
    out = tmp_path / "out"
    res = h.run(h.train_args(other, out, "o", "--resume", str(ckpt)), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=0, hangs=int(res.hung))
    assert res.code == 2 and len(res.error_lines) == 1, res.stderr[-3000:]
    assert str(ckpt) in res.stderr and "class" in res.stderr


def _changed_settings(data_dir, tmp_path):
    other = tmp_path / "same_classes_other_copy"
    shutil.copytree(data_dir, other)
    return {"target_size": ["--target_size", "64"], "data_dir": ["--data_dir", str(other)]}


@pytest.mark.fault(case="4 resume across changes", fault="resume with other settings than the checkpoint's")
@pytest.mark.parametrize("setting", ["target_size", pytest.param("data_dir", marks=pytest.mark.soak)])
def test_resume_with_other_settings_is_never_silent(setting, data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    h.copy_run(ref1, "ref1", out)
    assert setting not in h.log_text(ref1, "ref1")  # a normal run's output does not name it
    change = _changed_settings(data_dir, tmp_path)[setting]
    args = h.train_args(data_dir, out, "ref1", *h.REF1, "--resume", "auto")
    res = h.run([*args, "--max_steps", str(h.REF1_STEPS + 1), *change], tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, hangs=int(res.hung))
    told = res.stdout + res.stderr + h.log_text(out, "ref1")
    assert res.code in (0, 2), res.stderr[-3000:]
    assert setting in told, f"the resume with {' '.join(change)} did not mention {setting}"


@pytest.mark.fault(case="4 resume across changes", fault="--resume auto of a run that already reached --max_steps")
def test_resuming_a_run_that_reached_max_steps_trains_nothing_more(data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    ck = h.copy_run(ref1, "ref1", out) / "checkpoints"  # stopped by --max_steps 12, as a requeued job finds it
    before = (ck / "last.pth").read_bytes()
    res = h.run(h.train_args(data_dir, out, "ref1", *h.REF1, "--resume", "auto"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung),
            samples_lost=0, samples_duplicated=8 * (h.load_ckpt(ck / "last.pth")["step"] - h.REF1_STEPS))
    assert res.code == 0, res.stderr[-3000:]
    assert h.load_ckpt(ck / "last.pth")["step"] == h.REF1_STEPS
    assert (ck / "last.pth").read_bytes() == before
