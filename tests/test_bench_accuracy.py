"""benchmarks/bench_accuracy.py (issue 11, item 6) in CI-sized settings, and the ImageNet recipes of configs/
(item 7), which must load as they are."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rectrain.config import TrainConfig, resolve_config
from rectrain.training.schedule import ResolutionSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    path = os.path.join(ROOT, "benchmarks", "bench_accuracy.py")
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (synthetic data, 1 epoch, 1 seed, defaults + no batch aug + plain loop): its folder and JSON."""
    out = tmp_path_factory.mktemp("bench_accuracy")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    with open(out / "results.json") as fh:
        return out, json.load(fh)


# -- the --quick run ----------------------------------------------------------------------------------------
def test_quick_run_gives_one_row_per_recipe_with_a_final_top1(quick):
    _, result = quick
    assert [r["name"] for r in result["rows"]] == ["defaults", "no batch aug", "plain loop"]
    for row in result["rows"]:
        assert row["acc1"]["n"] == 1 and 0 <= row["acc1"]["mean"] <= 100
        assert row["train_s"]["mean"] > 0


def test_quick_rows_are_the_runs_own_final_validation(quick):
    out, result = quick
    row = result["rows"][0]
    with open(out / "runs" / "defaults_s0" / "metrics.jsonl") as fh:
        last = [json.loads(line) for line in fh][-1]
    assert row["acc1"]["mean"] == last["val_acc1"] and row["acc1_ema"]["mean"] == last["val_acc1_ema"]


def test_ema_is_reported_for_rectrain_runs_and_not_for_the_plain_loop(quick):
    _, result = quick
    by_name = {r["name"]: r for r in result["rows"]}
    assert by_name["defaults"]["acc1_ema"] is not None
    assert by_name["plain loop"]["acc1_ema"] is None


def test_every_row_is_also_validated_on_whole_images(quick):
    _, result = quick
    for row in result["rows"]:
        assert 0 <= row["acc1_whole"]["mean"] <= 100


def test_centre_crop_view_of_a_checkpoint_equals_the_trainers_validation(quick):
    out, result = quick
    val = bench.scan_split(str(out / "synth"), "val", cache_dir=str(out))
    checkpoint = bench.final_checkpoint(str(out / "runs" / "defaults_s0"))
    assert bench.eval_view(checkpoint, val, 0.875) == result["rows"][0]["acc1"]["mean"]


def test_markdown_table_has_a_line_per_recipe(quick):
    out, result = quick
    text = (out / "results.md").read_text()
    for row in result["rows"]:
        assert f"| {row['group']} | {row['name']} | " in text
    assert "| recipe | 32 px | 64 px |" in text  # the FixRes table


def test_results_record_command_machine_commit_and_date(quick):
    out, result = quick
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    head = git.stdout.strip()
    assert result["commit"].startswith(head or "unknown")
    assert "--quick" in result["command"] and result["machine"] and result["date"]
    text = (out / "results.md").read_text()
    for line in (f"- command: `{result['command']}`", f"- commit: {result['commit']}", f"- date: {result['date']}"):
        assert line in text


def test_fixres_at_the_training_size_reproduces_the_runs_validation(quick):
    _, result = quick
    (fixres,) = result["fixres"]
    assert fixres["name"] == "defaults" and list(fixres["acc1_at"]) == ["32", "64"]
    assert fixres["acc1_at"]["32"]["mean"] == result["rows"][0]["acc1"]["mean"]


def test_a_rerun_reuses_finished_runs(quick):
    out, result = quick
    record = out / "runs" / "defaults_s0" / "bench_run.json"
    before = record.stat().st_mtime_ns
    assert bench.main(["--quick", "--out", str(out), "--only", "defaults", "--no_fixres"]) == 0
    assert record.stat().st_mtime_ns == before
    with open(out / "results.json") as fh:
        assert json.load(fh)["rows"][0]["acc1"] == result["rows"][0]["acc1"]


# -- pieces -----------------------------------------------------------------------------------------------------
def test_summarize_gives_mean_sample_std_and_range():
    assert bench.summarize([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.summarize([5.0, None])["std"] == 0.0
    assert bench.summarize([None]) is None


def test_every_recipe_is_a_valid_training_command():
    for recipe in bench.RECIPES:
        cfg = resolve_config(bench.train_flags(recipe, bench.Settings(), 0, "/data", "/out"))
        assert cfg.epochs == (recipe.epochs or bench.Settings().epochs) and cfg.val_every == cfg.epochs


def test_the_defaults_recipe_keeps_the_seeds_augmentation_defaults():
    cfg = resolve_config(bench.train_flags(bench.RECIPES[0], bench.Settings(), 0, "/data", "/out"))
    default = TrainConfig()
    for name in ("hflip", "crop_scale", "train_crop", "rect_mode", "max_ratio", "use_mixup", "use_cutmix",
                 "use_random_erasing", "batch_aug_prob", "label_smoothing", "res_schedule"):
        assert getattr(cfg, name) == getattr(default, name), name


def test_progressive_recipe_ends_at_the_fixed_runs_size():
    (recipe,) = [r for r in bench.RECIPES if r.group == "d"]
    cfg = resolve_config(bench.train_flags(recipe, bench.Settings(), 0, "/data", "/out"))
    schedule = ResolutionSchedule.parse(cfg.res_schedule)
    assert schedule.at(cfg.epochs - 1) == bench.Settings().target_size and schedule.at(0) < schedule.end


def test_mean_pixels_of_square_crops_is_the_target_squared():
    sizes = np.array([[40, 72], [60, 40], [50, 50]])
    square = next(r for r in bench.RECIPES if r.name == "square")
    assert bench.mean_pixels(sizes, square, bench.Settings()) == 64 * 64
    assert bench.mean_pixels(sizes, bench.RECIPES[0], bench.Settings()) > 64 * 64  # short_side: wide images cost more


def test_plain_loop_squashes_the_whole_image_into_the_square(tmp_path):
    (tmp_path / "a").mkdir()
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40, 0] = 255  # left half red, right half blue
    img[:, 40:, 2] = 255
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    x, y = bench.load_square(str(tmp_path), 32, ["a"])
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [0]
    assert x[0, 0, :, :15].min() == 255 and x[0, 2, :, 17:].min() == 255  # both halves kept, no crop


# -- the ImageNet recipes (configs/) ------------------------------------------------------------------------
def _recipe(name):
    return resolve_config(["--config", os.path.join(ROOT, "configs", name)])


def test_fast_imagenet_recipe_loads_with_progressive_resolution_and_no_mixing():
    cfg = _recipe("fast_imagenet.toml")
    schedule = ResolutionSchedule.parse(cfg.res_schedule)
    assert cfg.arch == "resnet50" and 16 <= cfg.epochs <= 18
    assert (schedule.at(0), schedule.at(cfg.epochs - 1)) == (160, 192)
    assert cfg.val_target_size > schedule.end and cfg.label_smoothing > 0
    assert not (cfg.use_mixup or cfg.use_cutmix or cfg.use_random_erasing)
    assert cfg.lr_per_256 is not None and cfg.ema_decay == 0


def test_best_accuracy_recipe_loads_with_mixing_and_ema():
    cfg = _recipe("best_accuracy.toml")
    schedule = ResolutionSchedule.parse(cfg.res_schedule)
    assert cfg.arch == "resnet50" and 88 <= cfg.epochs <= 90
    assert cfg.use_mixup and cfg.use_cutmix and cfg.use_random_erasing and cfg.ema_decay > 0
    assert schedule.at(cfg.epochs - 1) == 224 and cfg.val_target_size > 224
    assert cfg.lr_per_256 is not None
