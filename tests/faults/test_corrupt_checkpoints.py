"""Case 5: corrupt checkpoints. Each is refused with its path and the reason (one line, exit 2), never
executed (checkpoints load with ``weights_only=True``), and `--resume auto` falls back to the newest good one.
"""

import os
import random

import pytest
import torch

from rectrain.model import build_model
from tests.tiny import flip_bits

from . import harness as h


class _MakesAFile:
    """A pickled object whose unpickling would create ``path``: it must never be unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _truncated(good: dict, raw: bytes, path, tmp_path):
    path.write_bytes(raw[: len(raw) // 2])


def _random_bytes(good, raw, path, tmp_path):
    path.write_bytes(random.Random(5).randbytes(len(raw)))


def _future_format(good, raw, path, tmp_path):
    torch.save({**good, "format_version": 99}, path)


def _other_arch(good, raw, path, tmp_path):
    torch.save({**good, "model": build_model("resnet34", num_classes=3, width=8).state_dict(),
                "arch": "resnet34"}, path)


def _other_classes(good, raw, path, tmp_path):
    model = build_model("resnet18", num_classes=5, width=8).state_dict()
    torch.save({**good, "model": model, "classes": [f"c{i}" for i in range(5)]}, path)


def _flipped_bits(good, raw, path, tmp_path):
    path.write_bytes(raw)
    flip_bits(path, 1000)  # torch.load reads it (wrong weights); the zip CRCs do not match


def _arbitrary_object(good, raw, path, tmp_path):
    torch.save({**good, "extra": _MakesAFile(str(tmp_path / "EXECUTED"))}, path)


# name -> (how to make it, a word the refusal must contain)
CORRUPTIONS = {
    "truncated": (_truncated, ""), "random-bytes": (_random_bytes, ""), "future-format": (_future_format, "version"),
    "other-arch": (_other_arch, "arch"), "other-class-count": (_other_classes, "class"),
    "arbitrary-pickled-object": (_arbitrary_object, ""), "flipped-bits": (_flipped_bits, "CRC"),
}
SOAK = {"random-bytes"}  # refused for the same reason as a truncated file


@pytest.mark.fault(case="5 corrupt checkpoint", fault="--resume PATH of a corrupt checkpoint")
@pytest.mark.parametrize("kind", [pytest.param(k, marks=[pytest.mark.soak] if k in SOAK else []) for k in CORRUPTIONS])
def test_a_corrupt_checkpoint_is_refused_with_its_path_and_reason(kind, data_dir, ref1, tmp_path, outcome):
    src = h.ckpt_dir(ref1, "ref1") / "checkpoint_epoch_001.pth"
    bad = tmp_path / f"{kind}.pth"
    make, word = CORRUPTIONS[kind]
    make(h.load_ckpt(src), src.read_bytes(), bad, tmp_path)
    out = tmp_path / "out"
    res = h.run(h.train_args(data_dir, out, "c", *h.REF1, "--resume", str(bad)), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=0, hangs=int(res.hung), checkpoints_lost=0)
    assert not (tmp_path / "EXECUTED").exists(), "loading the checkpoint ran code from its pickle"
    assert res.code == 2 and len(res.error_lines) == 1, res.stderr[-3000:]
    line = res.error_lines[0]
    assert str(bad) in line and word in line and "Traceback" not in res.stderr
    assert not any(h.ckpt_dir(out, "c").glob("*.pth")), "a refused resume wrote a checkpoint"


@pytest.mark.fault(case="5 corrupt checkpoint",
                   fault="--resume auto with the two newest checkpoints corrupt (one truncated, one with flipped bits)")
def test_resume_auto_skips_corrupt_checkpoints_and_ends_like_an_uninterrupted_run(data_dir, ref1, tmp_path, outcome):
    out = tmp_path / "out"
    run_dir = h.copy_run(ref1, "ref1", out)
    ck = run_dir / "checkpoints"
    last, second = ck / "last.pth", ck / "checkpoint_epoch_002.pth"
    raw = second.read_bytes()
    for p, data in ((second, raw), (last, raw[: len(raw) // 3])):
        os.remove(p)  # replace, never write through: last.pth may be a hard link of an epoch file
        p.write_bytes(data)
    flip_bits(second, 1000)
    res = h.run(h.train_args(data_dir, out, "ref1", *h.REF1, "--resume", "auto"), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung),
            checkpoints_lost=0)
    assert res.code == 0, res.stderr[-3000:]
    log = h.log_text(out, "ref1")
    assert f"{last} cannot be loaded" in log, "the truncated last.pth was not reported with its reason"
    assert f"{second} is damaged" in log and "CRC" in log, "the flipped bits were not reported"
    assert f"resumed from {ck / 'checkpoint_epoch_001.pth'}" in log
    final = h.load_ckpt(last)
    assert final["step"] == h.REF1_STEPS
    assert h.same_weights(final["model"], h.model_of(h.ckpt_dir(ref1, "ref1") / "last.pth"))
    outcome(samples_lost=0, samples_duplicated=0)
