"""The command line: every argument mistake is one line on stderr with exit status 2; --help is readable."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from rectrain.cli import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVAILABLE = [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]


def one_line_error(argv, capsys) -> str:
    """Run `rectrain ARGV`; assert exit 2, nothing on stdout and exactly one line on stderr; return it."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert "usage:" not in captured.err and "Traceback" not in captured.err
    return captured.err.strip()


def train_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag
    assert main(["train", "--help"]) == 0
    return capsys.readouterr().out


def help_entries(text: str) -> list[str]:
    """The help of each flag as one string (argparse wraps long ones over several lines)."""
    return [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text) if e.startswith("  -")]


# --- argument errors ------------------------------------------------------------------------------


def test_unknown_train_flag_is_one_line_with_the_closest_flag(capsys):
    err = one_line_error(["train", "--batchsize", "3"], capsys)
    assert err == ("rectrain train: error: unknown flag --batchsize (did you mean --batch_size?); "
                   "see rectrain train --help")


def test_unknown_flag_written_with_equals_is_named_without_its_value(capsys):
    err = one_line_error(["train", "--batchsize=3"], capsys)
    assert "unknown flag --batchsize (did you mean --batch_size?)" in err


def test_several_unknown_flags_are_all_named(capsys):
    err = one_line_error(["train", "--batchsize", "3", "--lrr", "0.1"], capsys)
    assert "--batchsize (did you mean --batch_size?), --lrr (did you mean --lr?)" in err


def test_flag_value_of_the_wrong_type_is_one_line(capsys):
    err = one_line_error(["train", "--batch_size", "abc"], capsys)
    assert err.startswith("rectrain train: error: argument --batch_size: invalid int value: 'abc'")


def test_flag_value_outside_its_choices_is_one_line(capsys):
    err = one_line_error(["train", "--progress", "sometimes"], capsys)
    assert "--progress" in err and "'auto', 'on', 'off'" in err


def test_stray_positional_argument_is_one_line(capsys):
    err = one_line_error(["train", "imagenet"], capsys)
    assert "unexpected argument(s): imagenet" in err


def test_unknown_command_is_one_line_with_the_closest_command(capsys):
    err = one_line_error(["trian", "--epochs", "3"], capsys)
    assert err.startswith("rectrain: error: unknown command 'trian' (did you mean train?)")


def test_unknown_top_level_flag_is_one_line(capsys):
    err = one_line_error(["--verison"], capsys)
    assert err.startswith("rectrain: error: unknown flag --verison (did you mean --version?)")


@pytest.mark.parametrize("command", [c for c in AVAILABLE if c != "train"])
def test_argument_error_of_every_other_command_is_one_line_naming_that_command(command, capsys):
    err = one_line_error([command, "--no_such_flag"], capsys)  # or a missing required flag, reported first
    assert err.startswith(f"rectrain {command}: error: ") and err.endswith(f"see rectrain {command} --help")


def test_unknown_flag_through_a_real_process_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "rectrain", "train", "--batchsize", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["rectrain train: error: unknown flag --batchsize (did you mean "
                                        "--batch_size?); see rectrain train --help"]


@pytest.mark.parametrize("values, words", [
    ({"epochs": "abc"}, 'epochs = "abc" must be a whole number'),
    ({"batchsize": 3}, "unknown key 'batchsize' (did you mean batch_size?)"),
    ({"no_mixup": True, "use_mixup": True}, "no_mixup and use_mixup contradict each other"),
    ({"arch": "resnet5"}, "(did you mean resnet50?)"),
])
def test_config_file_mistake_is_one_line(tmp_path, capsys, values, words):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    err = one_line_error(["train", "--config", str(path)], capsys)
    assert err.startswith("rectrain train: error: ") and words in err


def test_config_file_with_a_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("epochs = \n")
    assert "cannot parse config file" in one_line_error(["train", "--config", str(path)], capsys)


def test_target_size_off_the_grid_is_one_line(capsys):
    err = one_line_error(["train", "--target_size", "100"], capsys)
    assert err.endswith("use 96 or 128")


# --- help -----------------------------------------------------------------------------------------


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_train_help_groups_the_flags(capsys, monkeypatch):
    out = train_help(capsys, monkeypatch)
    titles = ["data:", "model:", "optimisation:", "augmentation:", "precision and speed:", "distributed:",
              "checkpoints and logging:"]
    positions = [out.find("\n" + t + "\n") for t in titles]
    assert -1 not in positions and positions == sorted(positions)
    # a few flags land in their section
    assert positions[0] < out.index("--batch_size") < positions[1]
    assert positions[3] < out.index("--no_mixup") < positions[4]
    assert positions[6] < out.index("--progress")


@pytest.mark.parametrize("command", AVAILABLE)
def test_help_prints_each_default_at_most_once(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main([command, "--help"]) == 0
    entries = help_entries(capsys.readouterr().out)
    assert entries and all(e.count("(default") <= 1 for e in entries), entries


def test_train_help_shows_each_default_once(capsys, monkeypatch):
    entries = {e.split()[0]: e for e in help_entries(train_help(capsys, monkeypatch))}
    assert entries["--batch_size"].endswith("(default: 256)")
    assert entries["--crop_scale"].endswith("(default: 0.08 1.0)")
    assert entries["--val_batch_size"].endswith("(default: --batch_size)")


def test_train_help_describes_no_switches_as_what_they_turn_off(capsys, monkeypatch):
    entries = {e.split()[0]: e for e in help_entries(train_help(capsys, monkeypatch))}
    assert entries["--no_mixup"] == "--no_mixup turn off MixUp (on by default)"
    assert entries["--no_cutmix"] == "--no_cutmix turn off CutMix (on by default)"
    assert entries["--no_amp"].startswith("--no_amp turn off mixed precision")
    assert entries["--cutout"] == "--cutout turn on Cutout (square holes) (off by default)"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_commands_flags_and_help_need_no_torch(command):
    """A typo or --help answers in a fraction of a second: torch (1.5-9 s to import) loads only when a command runs."""
    code = ("import sys; from rectrain.cli import build_parser; "
            f"build_parser({command!r}, [{command!r}]).format_help(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_a_flag_mistake_of_train_answers_before_anything_heavy_is_imported():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "rectrain", "train", "--bogus"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "unknown flag --bogus" in out.stderr
    assert not [ln for ln in out.stderr.splitlines() if ln.rstrip().endswith("| torch")]
