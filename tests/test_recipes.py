"""Every recipe in configs/ loads and validates, and the seed's recipes say what the seed's commands say."""

import glob
import os

import pytest

from rectrain.config import TrainConfig, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_EXTENSIONS = (".toml", ".yaml", ".yml", ".json")  # what `--config` reads
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*")) if p.endswith(CONFIG_EXTENSIONS))

# The seed's commands (/work/shared/seed: "Quick Start Commands" and "Recommended Configurations") as flags;
# each seed_*.toml must resolve to exactly these settings, everything else at its default.
SEED_COMMANDS = {
    "seed_single_gpu.toml": "--data_dir /mnt/data/imagenet --epochs 90 --batch_size 256 --lr 0.1 --nproc 1",
    "seed_4gpu.toml": "--data_dir /mnt/data/imagenet --epochs 90 --batch_size 256 --lr 0.1 --workers 8 --nproc 4",
    "seed_max_speed.toml": "--epochs 60 --batch_size 512 --lr 0.4 --target_size 192 --workers 16",
    "seed_best_accuracy.toml": "--epochs 120 --batch_size 256 --lr 0.1 --target_size 224 --workers 8",
    "seed_testing.toml": "--epochs 5 --batch_size 128 --lr 0.05 --target_size 192",
    "seed_low_memory.toml": "--batch_size 64 --target_size 160 --no_amp --workers 4",
}


def test_configs_folder_holds_the_seeds_recipes():
    names = {os.path.basename(p) for p in RECIPES}
    assert set(SEED_COMMANDS) <= names, set(SEED_COMMANDS) - names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_loads_and_validates(path):
    cfg = resolve_config(["--config", path])
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("path", [p for p in RECIPES if not p.endswith(".json")], ids=os.path.basename)
def test_recipe_opens_with_a_comment_saying_what_it_is_for_and_what_was_measured(path):
    with open(path) as fh:
        text = fh.read()
    first = next(line for line in text.splitlines() if line.strip())
    assert first.startswith("#"), "open the recipe with a comment block: what it is for, what it gave"
    assert "measured" in text.lower(), "say what the recipe gave when measured, or that it was not measured yet"


@pytest.mark.parametrize("name", sorted(SEED_COMMANDS))
def test_seed_recipe_equals_the_seeds_command(name):
    from_file = resolve_config(["--config", os.path.join(ROOT, "configs", name)])
    from_flags = resolve_config(SEED_COMMANDS[name].split())
    assert from_file == from_flags


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_command_line_flags_win_over_a_recipe(path):
    cfg = resolve_config(["--config", path, "--seed", "7", "--data_dir", "/elsewhere"])
    assert (cfg.seed, cfg.data_dir) == (7, "/elsewhere")
