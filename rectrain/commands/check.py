"""`rectrain check`: the pre-training checklist (``rectrain.checklist``) for the training flags (or ``--config
FILE``): one line per item, each ``pass``, ``warn``, ``fail`` or ``skip``, with the fix on a warning or failure; exit
status 1 when something would make the run fail; ``--json`` prints the items as one JSON list."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from rectrain.config import add_arguments as add_config_arguments, resolve_config

if TYPE_CHECKING:
    from rectrain.checklist import Item

OWN_FLAGS = ("--json", "--no_loader_probe")
MARKS = {"pass": " ok ", "warn": "warn", "fail": "FAIL", "skip": "skip"}


def format_item(item: Item) -> str:
    line = f"[{MARKS[item.status]}] {item.name:<15} {item.message}"
    return line + (f"\n{'':>22}fix: {item.fix}" if item.fix and item.status != "pass" else "")


def verdict(items: list[Item]) -> int:
    """0 when nothing would make the run fail (warnings allowed), else 1."""
    return int(any(i.status == "fail" for i in items))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the items as one JSON list")
    parser.add_argument("--no_loader_probe", action="store_true", help="skip the loader speed probe (a few seconds)")


def _training_argv(argv: list[str]) -> list[str]:
    """The training flags of ``argv``: without this command's own flags (or an abbreviation argparse accepted)."""
    return [a for a in argv if not (a.startswith("--") and len(a) > 2 and any(f.startswith(a) for f in OWN_FLAGS))]


def run(args: argparse.Namespace) -> int:
    from rectrain.checklist import iter_checks
    cfg = resolve_config(_training_argv(args.command_argv), prog="rectrain check")
    items = []
    if not args.json:
        print(f"rectrain check: --data_dir {cfg.data_dir}, run folder {os.path.join(cfg.output, cfg.run_name)}, "
              f"--device {cfg.device}", flush=True)
    for item in iter_checks(cfg, loader_probe=not args.no_loader_probe):
        items.append(item)
        if not args.json:
            print(format_item(item), flush=True)
    if args.json:
        print(json.dumps([asdict(i) for i in items]))
        return verdict(items)
    fails, warns = (sum(i.status == s for i in items) for s in ("fail", "warn"))
    print(f"{fails} failure(s), {warns} warning(s): "
          + ("fix the failures before training" if fails else "ready to train"))
    return verdict(items)
