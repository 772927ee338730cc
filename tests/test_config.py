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


@pytest.mark.parametrize("ext", ["toml", "json"])
def test_config_file_sets_values_and_flags_override_it(tmp_path, ext):
    path = tmp_path / f"run.{ext}"
    if ext == "toml":
        path.write_text('epochs = 7\nlr = 0.05\nuse_cutmix = false\nrandom_erasing_scale = [0.1, 0.2]\n')
    else:
        path.write_text(json.dumps({"epochs": 7, "lr": 0.05, "use_cutmix": False, "random_erasing_scale": [0.1, 0.2]}))
    cfg = resolve_config(["--config", str(path), "--lr", "0.2"])
    assert cfg.epochs == 7 and cfg.lr == 0.2 and cfg.use_cutmix is False
    assert cfg.random_erasing_scale == (0.1, 0.2)


def test_unknown_config_key_is_rejected_by_name(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 3, "learning_rate": 0.1}))
    with pytest.raises(UserError, match="learning_rate"):
        resolve_config(["--config", str(path)])


def test_config_round_trips_through_dict():
    cfg = resolve_config(["--epochs", "3", "--crop_scale", "0.35", "1"])
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


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
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--data_dir", "--batch_size", "--no_amp", "--dist_port", "--resume", "--print_freq",
                 "--amp_dtype", "--no_cutmix", "--keep_checkpoints"):
        assert flag in out
