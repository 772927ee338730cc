"""The `rectrain` command line: one subcommand per job.

Each subcommand lives beside the concept it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``. A ``UserError`` from any of them is printed as one line (no traceback)
and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rectrain import __version__
from rectrain.errors import UserError

# name -> (module, one-line help). Modules are imported only for the command that runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("rectrain.selftest", "self-test of the model: parameter count, forward/backward on rectangular inputs"),
    "train": ("rectrain.train", "train a ResNet on an image folder (the seed's train_g4.dn_12xlarge.py)"),
    "eval": ("rectrain.evaluate", "top-1/top-5 of a checkpoint on a validation split"),
    "bench": ("rectrain.bench", "benchmarks: `rectrain bench loader` measures decoded images/s"),
    "scan": ("rectrain.arscan", "scan an image folder: counts, bad files, aspect ratios, buckets (builds the cache)"),
    "synth": ("rectrain.synth", "write a synthetic ImageNet-style folder of JPEGs (tests, demo, benchmarks)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rectrain",
        description="Fast ResNet training on image folders with aspect-ratio bucketed rectangular batches.",
    )
    parser.add_argument("--version", action="version", version=f"rectrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == command:  # only the chosen command pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.command_argv = argv[argv.index(args.command) + 1:]  # for commands that re-parse (config files)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except UserError as e:
        print(f"rectrain {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"rectrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
