"""`rectrain train` / `python train_g4.dn_12xlarge.py`: the training flags (``rectrain.config``), resolved with a
config file, then the run (``rectrain.trainer.train``)."""

from __future__ import annotations

from rectrain.config import add_arguments as add_config_arguments
from rectrain.config import check_data_dir, check_resume_path, given_settings, resolve_config

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    cfg = resolve_config(args.command_argv, prog="rectrain train")
    check_data_dir(cfg.data_dir)  # the usual mistakes answer before torch is imported
    check_resume_path(cfg.resume)
    from rectrain.trainer import train
    return train(cfg, given=given_settings(args.command_argv))
