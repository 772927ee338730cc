"""TrainConfig: the seed's flags and defaults, config files (either key spelling), validation, round trips."""

import json

import pytest

from rectrain.cli import main as cli_main
from rectrain.config import TrainConfig, resolve_config
from rectrain.errors import UserError

SEED_DEFAULTS = {
    "data_dir": "/mnt/data/imagenet", "batch_size": 256, "target_size": 224, "workers": 8, "epochs": 90,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "no_amp": False, "seed": 42, "dist_port": "12355",
    "output": "./runs_rect_ddp", "run_name": "resnet50_rect", "resume": None, "print_freq": 50,
}

# Every switch set away from its default, plus a tuple and an Optional: what a round trip must keep.
NON_DEFAULT_SWITCHES = ["--no_mixup", "--no_cutmix", "--cutout", "--no_random_erasing", "--no_channels_last",
                        "--no_amp", "--nesterov", "--compile", "--deterministic"]


def write_config(path, values: dict) -> str:
    """A .json or .toml file of ``values`` (TOML has no null: None values are left out)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None))
    return str(path)


def test_seed_flags_parse_with_seed_defaults():
    cfg = resolve_config([])
    for name, value in SEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name


def test_seed_quick_start_flags_parse():
    cfg = resolve_config(["--data_dir", "/d", "--epochs", "60", "--batch_size", "512", "--lr", "0.2",
                          "--target_size", "224", "--workers", "16", "--no_amp",
                          "--resume", "./runs_rect_ddp/resnet50_rect/checkpoints/checkpoint_epoch_050.pth"])
    assert (cfg.data_dir, cfg.epochs, cfg.batch_size, cfg.lr, cfg.workers, cfg.no_amp) == ("/d", 60, 512, 0.2, 16, True)
    assert cfg.resume.endswith("checkpoint_epoch_050.pth")


def test_augmentation_flags_reach_the_augmentation_config():
    cfg = resolve_config(["--mixup_alpha", "0.1", "--no_cutmix", "--cutout", "--batch_aug_prob", "0.3",
                          "--random_erasing_scale", "0.05", "0.2"])
    aug = cfg.augmentation()
    assert aug.mixup_alpha == 0.1 and not aug.use_cutmix and aug.use_cutout and aug.batch_aug_prob == 0.3
    assert aug.random_erasing_scale == (0.05, 0.2)
    assert resolve_config([]).augmentation() == type(aug)()  # defaults are the seed's AugmentationConfig


def test_progress_defaults_to_auto_and_takes_on_or_off():
    assert resolve_config([]).progress == "auto"
    assert resolve_config(["--progress", "off"]).progress == "off"


# --- config files -------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["toml", "json"])
def test_config_file_sets_values_and_flags_override_it(tmp_path, ext):
    path = write_config(tmp_path / f"run.{ext}", {"epochs": 7, "lr": 0.05, "use_cutmix": False,
                                                  "random_erasing_scale": [0.1, 0.2]})
    cfg = resolve_config(["--config", path, "--lr", "0.2"])
    assert cfg.epochs == 7 and cfg.lr == 0.2 and cfg.use_cutmix is False
    assert cfg.random_erasing_scale == (0.1, 0.2)


@pytest.mark.parametrize("ext", ["toml", "json"])
def test_config_file_accepts_the_flag_spellings_of_switches(tmp_path, ext):
    path = write_config(tmp_path / f"run.{ext}", {"no_mixup": True, "cutout": True, "no_channels_last": True,
                                                  "no_amp": True, "no_random_erasing": False})
    cfg = resolve_config(["--config", path])
    assert (cfg.use_mixup, cfg.use_cutout, cfg.channels_last, cfg.no_amp) == (False, True, False, True)
    assert cfg.use_random_erasing is True  # no_random_erasing = false: left on


def test_config_file_key_given_both_ways_with_the_same_meaning_is_accepted(tmp_path):
    path = write_config(tmp_path / "run.toml", {"no_mixup": True, "use_mixup": False})
    assert resolve_config(["--config", path]).use_mixup is False


def test_config_file_key_given_both_ways_with_contradicting_values_is_an_error(tmp_path):
    path = write_config(tmp_path / "run.toml", {"no_mixup": True, "use_mixup": True})
    with pytest.raises(UserError, match="no_mixup and use_mixup contradict"):
        resolve_config(["--config", path])


def test_unknown_config_key_is_rejected_by_name(tmp_path):
    path = write_config(tmp_path / "run.json", {"epochs": 3, "learning_rate": 0.1})
    with pytest.raises(UserError, match="learning_rate"):
        resolve_config(["--config", path])


def test_unknown_config_key_suggests_the_closest_name(tmp_path):
    path = write_config(tmp_path / "run.toml", {"batchsize": 3})
    with pytest.raises(UserError, match=r"unknown key 'batchsize' \(did you mean batch_size\?\)"):
        resolve_config(["--config", path])


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", "abc", "a whole number"),
    ("epochs", 2.5, "a whole number"),
    ("use_cutmix", "false", "true or false"),
    ("lr", [0.1], "a number"),
    ("crop_scale", [0.5], "a list of two numbers"),
    ("val_batch_size", "many", "a whole number or null"),
])
def test_wrong_type_in_config_file_names_key_value_and_expected_type(tmp_path, key, value, expected):
    path = write_config(tmp_path / "run.json", {key: value})
    with pytest.raises(UserError) as e:
        resolve_config(["--config", path])
    assert f"{key} = {json.dumps(value)} must be {expected}" in str(e.value)


@pytest.mark.parametrize("key, value", [("batch_size", "32"), ("weight_decay", "1e-4")])
def test_numbers_written_as_strings_in_a_config_file_are_refused_as_flags_would_be(tmp_path, key, value):
    path = write_config(tmp_path / "run.toml", {key: value})
    with pytest.raises(UserError, match=f"{key} = \"{value}\" must be .* \\(write {value} without quotes\\)"):
        resolve_config(["--config", path])


def test_a_port_written_as_a_number_is_read_as_the_string_the_flag_is(tmp_path):
    path = write_config(tmp_path / "run.toml", {"dist_port": 12000})
    assert resolve_config(["--config", path]).dist_port == "12000"


def test_yaml_exponents_are_read_as_numbers(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("weight_decay: 1e-4\nlr: 5E-2\n")
    cfg = resolve_config(["--config", str(path)])
    assert (cfg.weight_decay, cfg.lr) == (1e-4, 5e-2)


def test_a_key_named_as_other_tools_name_it_suggests_ours(tmp_path):
    path = write_config(tmp_path / "run.toml", {"learning_rate": 0.1})
    with pytest.raises(UserError, match=r"unknown key 'learning_rate' \(did you mean lr\?\)"):
        resolve_config(["--config", path])


def test_config_file_value_outside_the_choices_is_refused_with_a_suggestion(tmp_path):
    path = write_config(tmp_path / "run.toml", {"arch": "resnet5"})
    with pytest.raises(UserError, match=r"--arch 'resnet5' is not one of .*\(did you mean resnet50\?\)"):
        resolve_config(["--config", path])


def test_config_file_cannot_name_another_config_file(tmp_path):
    path = write_config(tmp_path / "run.toml", {"config": "other.toml"})
    with pytest.raises(UserError, match="cannot name another config file"):
        resolve_config(["--config", path])


# --- round trips ----------------------------------------------------------------------------------


def test_config_round_trips_through_dict():
    cfg = resolve_config(["--epochs", "3", "--crop_scale", "0.35", "1", *NON_DEFAULT_SWITCHES])
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("ext", ["toml", "json"])
def test_to_dict_written_as_a_config_file_gives_the_same_config(tmp_path, ext):
    cfg = resolve_config(["--epochs", "3", "--val_batch_size", "16", "--crop_scale", "0.35", "1",
                          "--progress", "off", *NON_DEFAULT_SWITCHES])
    path = write_config(tmp_path / f"run.{ext}", cfg.to_dict())
    assert resolve_config(["--config", path]) == cfg


def test_from_dict_of_an_older_config_without_progress_uses_the_default():
    d = resolve_config([]).to_dict()
    del d["progress"]
    assert TrainConfig.from_dict(d).progress == "auto"


# The `config` a checkpoint of rectrain's first release (2026-11-27, 49 settings) holds: every later setting missing.
FIRST_RELEASE_CONFIG = {
    "data_dir": "/mnt/data/imagenet", "batch_size": 256, "target_size": 224, "workers": 8, "epochs": 90, "lr": 0.1,
    "momentum": 0.9, "weight_decay": 0.0001, "no_amp": False, "seed": 42, "dist_port": "12355",
    "output": "./runs_rect_ddp", "run_name": "resnet50_rect", "resume": None, "print_freq": 50, "arch": "resnet50",
    "width": 64, "amp_dtype": "bf16", "label_smoothing": 0.1, "warmup_epochs": None, "min_lr": 0.0, "nesterov": False,
    "rect_mode": "short_side", "max_ratio": 2.0, "crop_scale": [0.08, 1.0], "val_every": 1, "val_batch_size": None,
    "keep_checkpoints": 0, "device": "auto", "nproc": None, "dist_timeout": 1800.0, "channels_last": True,
    "compile": False, "max_decode_failures": 100, "max_steps": None, "deterministic": False, "use_mixup": True,
    "mixup_alpha": 0.2, "use_cutmix": True, "cutmix_alpha": 1.0, "use_cutout": False, "cutout_n_holes": 1,
    "cutout_length": 8, "cutout_prob": 0.5, "use_random_erasing": True, "random_erasing_prob": 0.25,
    "random_erasing_scale": [0.02, 0.33], "batch_aug_prob": 0.5}


def test_a_first_release_checkpoints_config_fills_the_later_settings_with_todays_defaults():
    saved = dict(FIRST_RELEASE_CONFIG, target_size=160, use_cutmix=False, crop_scale=[0.35, 1.0])
    cfg = TrainConfig.from_checkpoint(saved)
    assert (cfg.target_size, cfg.use_cutmix, cfg.crop_scale) == (160, False, (0.35, 1.0))
    later = {f for f in TrainConfig.__dataclass_fields__ if f not in FIRST_RELEASE_CONFIG}
    assert later >= {"val_crop", "hflip", "ema_decay", "res_schedule", "decode", "train_crop", "progress"}
    defaults = TrainConfig()
    assert all(getattr(cfg, f) == getattr(defaults, f) for f in later)


def test_a_checkpoint_config_with_settings_this_rectrain_no_longer_knows_still_loads():
    cfg = TrainConfig.from_checkpoint(dict(FIRST_RELEASE_CONFIG, retired_setting=3, epochs=7))
    assert cfg.epochs == 7 and not hasattr(cfg, "retired_setting")
    assert TrainConfig.from_checkpoint(None) == TrainConfig.from_checkpoint({}) == TrainConfig()


def test_a_typed_slice_takes_the_fields_of_its_name_and_the_overrides():
    from rectrain.data.loader import LoaderSettings
    cfg = resolve_config(["--batch_size", "12", "--hflip", "0", "--decoder", "pil"])
    s = cfg.slice(LoaderSettings, workers=3, rank=1, world_size=2, decode="cpu")
    assert (s.batch_size, s.hflip, s.decoder, s.workers, s.rank, s.world_size) == (12, 0.0, "pil", 3, 1, 2)
    assert s.val_batch == 12 and cfg.slice(LoaderSettings, val_batch_size=5).val_batch == 5


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--width", "0"], "--width must be at least 1"),
    (["--target_size", "16"], "--target_size must be at least 32"),
    (["--val_batch_size", "0"], "--val_batch_size must be at least 1"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints must be 0 or more"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--max_decode_failures", "-1"], "--max_decode_failures must be 0 or more"),
    (["--max_steps", "0"], "--max_steps must be at least 1"),
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--print_freq", "0"], "--print_freq must be at least 1"),
    (["--val_every", "0"], "--val_every must be at least 1"),
    (["--seed", "-1"], "--seed must be in [0, 2^63)"),
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2^63)"),
    (["--run_name", "../../x"], "--run_name must be one folder name"),
    (["--run_name", "/abs/x"], "--run_name must be one folder name"),
    (["--run_name", "a\nb"], "--run_name must be one folder name"),
    (["--lr", "-inf"], "--lr must be a finite number"),
    (["--momentum", "-.5"], "--momentum must be in [0, 1)"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--max_ratio", "inf"], "--max_ratio must be a finite number"),
    (["--max_ratio", "0.5"], "--max_ratio must be at least 1"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--weight_decay", "-0.1"], "--weight_decay must be 0 or more"),
    (["--label_smoothing", "1"], "--label_smoothing must be in [0, 1)"),
    (["--min_lr", "0.5", "--lr", "0.1"], "--min_lr 0.5 is above --lr 0.1"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs a momentum"),
    (["--dist_timeout", "0"], "--dist_timeout must be positive"),
    (["--dist_port", "70000"], "--dist_port must be a TCP port number"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--run_name", ""], "--run_name must be one folder name"),
    (["--crop_scale", "0.5", "0.1"], "--crop_scale must be two numbers"),
    (["--mixup_alpha", "-1"], "mixup_alpha"),
    (["--warmup_epochs", "10", "--epochs", "5"], "--warmup_epochs must be between 0 and --epochs=5"),
])
def test_each_bad_value_is_refused_naming_its_flag(argv, words):
    with pytest.raises(UserError) as e:
        resolve_config(argv)
    assert words in str(e.value)


def test_target_size_off_the_32_grid_is_refused_with_the_two_nearest_sizes():
    with pytest.raises(UserError, match="--target_size must be a multiple of 32.*use 96 or 128"):
        resolve_config(["--target_size", "100"])


def test_bad_value_from_a_config_file_is_refused_like_the_flag(tmp_path):
    path = write_config(tmp_path / "run.toml", {"progress": "sometimes"})
    with pytest.raises(UserError, match="--progress 'sometimes' is not one of auto, on, off"):
        resolve_config(["--config", path])


@pytest.mark.parametrize("argv, words", [
    (["--batch_size", "0"], "--batch_size"),
    (["--mixup_alpha", "-1"], "mixup_alpha"),
    (["--warmup_epochs", "10", "--epochs", "5"], "--warmup_epochs"),
    (["--dist_port", "abc"], "--dist_port"),
    (["--crop_scale", "0.5", "0.1"], "--crop_scale"),
    (["--data_dir", "/nonexistent/imagenet"], "does not exist"),
])
def test_bad_flags_give_one_clear_line_and_nonzero_exit(argv, words, capsys, tmp_path):
    code = cli_main(["train", "--output", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_help_lists_seed_flags(capsys):
    assert cli_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--data_dir", "--batch_size", "--no_amp", "--dist_port", "--resume", "--print_freq",
                 "--amp_dtype", "--no_cutmix", "--keep_checkpoints", "--progress"):
        assert flag in out


def test_lr_per_256_on_the_command_line_wins_over_a_files_lr(tmp_path):
    from rectrain.config import resolve_config
    f = tmp_path / "run.toml"
    f.write_text("lr = 0.4\n")
    cfg = resolve_config(["--config", str(f), "--lr_per_256", "0.1"])
    assert cfg.lr_per_256 == 0.1 and cfg.lr == 0.1  # the file's lr gave way to the default, unused
    cfg = resolve_config(["--config", str(f)])
    assert cfg.lr == 0.4 and cfg.lr_per_256 is None
    g = tmp_path / "per256.toml"
    g.write_text("lr_per_256 = 0.2\n")
    cfg = resolve_config(["--config", str(g), "--lr", "0.3"])
    assert cfg.lr == 0.3 and cfg.lr_per_256 is None
    both = tmp_path / "both.toml"
    both.write_text("lr = 0.4\nlr_per_256 = 0.2\n")
    with pytest.raises(UserError, match="exclusive"):
        resolve_config(["--config", str(both)])


# --compile: a three-way setting (auto, on, off) whose old spellings still work.
@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--compile"], "on"), (["--compile", "off"], "off"),
                                            (["--no_compile"], "off"), (["--compile", "auto"], "auto")])
def test_compile_is_auto_by_default_and_its_flags_force_it(argv, expected):
    assert resolve_config(argv).compile == expected


@pytest.mark.parametrize("values, expected", [({"compile": True}, "on"), ({"compile": False}, "off"),
                                              ({"compile": "auto"}, "auto"), ({"no_compile": True}, "off")])
def test_a_config_file_gives_compile_as_a_switch_or_a_choice(tmp_path, values, expected):
    assert resolve_config(["--config", write_config(tmp_path / "run.toml", values)]).compile == expected


def test_a_config_file_giving_compile_and_no_compile_that_disagree_is_an_error(tmp_path):
    path = write_config(tmp_path / "run.toml", {"compile": "on", "no_compile": True})
    with pytest.raises(UserError, match="contradict"):
        resolve_config(["--config", path])


def test_an_older_runs_config_with_compile_as_a_bool_still_loads():
    """config.json and checkpoints of rectrain before --compile auto hold ``compile: false`` (or true)."""
    assert TrainConfig.from_checkpoint(FIRST_RELEASE_CONFIG).compile == "off"
    assert TrainConfig.from_dict(dict(FIRST_RELEASE_CONFIG, compile=True)).validate().compile == "on"


def test_cuda_graphs_with_compile_off_is_refused():
    with pytest.raises(UserError, match="--cuda_graphs .* --no_compile"):
        resolve_config(["--cuda_graphs", "--no_compile"])
