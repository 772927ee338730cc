"""Case 8: bad configuration. Each mistake is one clear line on stderr, exit status 2, and nothing written:
no run folder (not even an empty one), no checkpoint, no log.
"""

import json

import pytest

from . import harness as h


def _config_file(tmp_path, mapping):
    p = tmp_path / "run.json"
    p.write_text(json.dumps(mapping))
    return ["--config", str(p)]


def _no_train(data_dir, tmp_path):
    d = tmp_path / "only_val"
    (d / "val" / "a").mkdir(parents=True)
    return ["--data_dir", str(d)]


def _empty_class(own_data, tmp_path):
    (own_data / "train" / "class_empty").mkdir()
    return []


def _file_as_output(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return ["--output", str(blocker / "runs")]


# name -> (extra arguments (a function of (data, tmp_path) or a list), a word the one line must contain, soak?)
MISTAKES = {
    "unknown-config-key": (lambda d, t: _config_file(t, {"batch_sise": 8}), "batch_sise", False),
    "wrong-type-in-config": (lambda d, t: _config_file(t, {"epochs": "three"}), "epochs", True),
    "wrong-type-flag": (["--batch_size", "eight"], "batch_size", True),
    "zero-batch-size": (["--batch_size", "0"], "batch_size", True),
    "negative-epochs": (["--epochs", "-1"], "epochs", True),
    "negative-lr": (["--lr", "-0.1"], "lr", True),
    "target-size-not-a-multiple-of-32": (["--target_size", "100"], "target_size", False),
    "batch-larger-than-the-data-set": (["--batch_size", "100"], "batch_size", False),
    "unwritable-output": (_file_as_output, "output", False),
    "no-train-folder": (_no_train, "train", False),
    "missing-data-dir": (lambda d, t: ["--data_dir", str(t / "nowhere")], "data_dir", True),
    "missing-resume-file": (lambda d, t: ["--resume", str(t / "nope.pth")], "resume", True),
    "empty-class-folder": (_empty_class, "class_empty", False),
}
DEFECTS: dict[str, str] = {}  # known defects: name -> reason (strict xfail)


def _params():
    for name, (_, _, soak) in MISTAKES.items():
        marks = [pytest.mark.soak] if soak else []
        if name in DEFECTS:
            marks.append(pytest.mark.xfail(strict=True, reason=DEFECTS[name]))
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.fault(case="8 bad configuration", fault="a configuration mistake")
@pytest.mark.parametrize("mistake", list(_params()))
def test_a_configuration_mistake_is_one_line_exit_2_and_writes_nothing(mistake, own_data, tmp_path, outcome):
    make, word, _ = MISTAKES[mistake]
    extra = make(own_data, tmp_path) if callable(make) else make
    out = tmp_path / "out"
    args = [*h.train_args(own_data, out, "bad", "--epochs", "1"), *extra]  # later flags win
    res = h.run(args, tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=0, hangs=int(res.hung))
    assert res.code == 2, res.stderr[-3000:]
    assert len(res.error_lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert word in res.error_lines[0]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert not (out / "bad").exists(), f"a run folder was left behind: {left}"
    assert not out.exists() or not any(out.iterdir())
