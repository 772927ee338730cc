"""Resume: which settings a resumed run keeps, says it changed, and how a finished run is extended."""

import json

import pytest

from rectrain.cli import main as cli_main
from rectrain.data.synth import make_synthetic
from rectrain.training.checkpoint import load as load_ckpt
from tests.tiny import TINY


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root), classes=3, train_per_class=16, val_per_class=5, kind="tiny", seed=0)
    return str(root)


def args(data_dir, out, *extra, drop=()):
    """The tiny run's flags without those in ``drop`` (each with its value), plus ``extra``."""
    base = []
    skip = False
    for a in TINY:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        else:
            base.append(a)
    return ["train", "--data_dir", data_dir, "--output", str(out), "--run_name", "run", *base, *extra]


def test_a_resumed_run_keeps_its_print_freq_and_says_which_machine_settings_are_this_invocations(data_dir, tmp_path,
                                                                                                capsys):
    assert cli_main(args(data_dir, tmp_path, "--print_freq", "3", "--epochs", "2", "--max_steps", "3",
                         drop=("--print_freq",))) == 0
    capsys.readouterr()
    assert cli_main(args(data_dir, tmp_path, "--resume", "auto", drop=("--print_freq",))) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["print_freq"] == 3
    batches = [int(ln.split(" batch ")[1].split("/")[0]) for ln in out.splitlines() if ln.startswith("epoch ") and "/" in ln]
    assert batches and all(b % 3 == 0 for b in batches)
    assert "not taken from the checkpoint: --max_steps None (the checkpoint's run: 3)" in out


def test_extending_a_finished_run_asks_for_the_rate_to_restart_from(data_dir, tmp_path, capsys):
    assert cli_main(args(data_dir, tmp_path, "--epochs", "1")) == 0
    ck = load_ckpt(str(tmp_path / "run" / "checkpoints" / "last.pth"))
    assert ck["optimizer"]["param_groups"][0]["lr"] == 0.0  # the cosine ended
    capsys.readouterr()
    assert cli_main(args(data_dir, tmp_path, "--resume", "auto", "--epochs", "2", drop=("--lr",))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finished its learning-rate schedule" in err and "--lr" in err
    assert cli_main(args(data_dir, tmp_path, "--resume", "auto", "--epochs", "2", "--lr", "0.02", drop=("--lr",))) == 0
    assert "extending a finished run: a cosine from --lr 0.02" in capsys.readouterr().out
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    new = [r for r in steps if r["epoch"] > 1]
    assert new and 0 < new[0]["lr"] <= 0.02 and new[-1]["lr"] == pytest.approx(0.0)


def test_a_checkpoint_from_before_compile_auto_resumes_with_its_bool_as_off_or_on(tiny_run, tmp_path):
    """Checkpoints of rectrain before --compile auto hold ``compile: false`` (or true): the plan reads it as off
    (on), so the resumed run compiles as the original did."""
    import torch

    from rectrain.config import resolve_config
    from rectrain.resume import Resume
    for old, expected in ((False, "off"), (True, "on")):
        ckpt = load_ckpt(tiny_run.ckpt)
        ckpt["config"]["compile"] = old
        path = tmp_path / f"old_{old}.pth"
        torch.save(ckpt, path)
        cfg = resolve_config(["--data_dir", tiny_run.data, "--output", str(tmp_path), "--run_name", f"r{old}",
                              "--resume", str(path)])
        assert Resume.plan(cfg, {"data_dir", "output", "run_name", "resume"}).config.compile == expected
