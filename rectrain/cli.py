"""The `rectrain` command line: one subcommand per job.

Each subcommand is one module of ``rectrain.commands``, a thin layer over the library, exposing
``add_arguments(parser)`` and ``run(args) -> int``. Every user mistake ends in ONE line on stderr and exit status 2: a bad flag
or value (``ArgParser.error``, with a did-you-mean for unknown flags and commands) and a
``UserError`` raised by a command (printed without a traceback).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys

from rectrain import __version__
from rectrain.errors import UserError

# name -> (module, one-line help). Modules are imported only for the command that runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("rectrain.commands.model", "self-test of the model: parameter count, forward/backward on rectangular inputs"),
    "train": ("rectrain.commands.train", "train a ResNet on an image folder (the seed's train_g4.dn_12xlarge.py)"),
    "eval": ("rectrain.commands.eval", "top-1/top-5 of a checkpoint on a validation split"),
    "bench": ("rectrain.commands.bench", "speed benchmarks: loader, model (the step alone), e2e (the training loop), ablation (the seed's speed table)"),
    "scan": ("rectrain.commands.scan", "scan an image folder: counts, bad files, aspect ratios, buckets (builds the cache)"),
    "synth": ("rectrain.commands.synth", "write a synthetic ImageNet-style folder of JPEGs (tests, demo, benchmarks)"),
    "prepare": ("rectrain.commands.prepare", "write a downscaled copy of an image folder (faster decoding), resumable"),
    "check": ("rectrain.commands.check", "pre-flight checklist: software, GPUs, dataset, cache, disk, memory, loader speed"),
    "predict": ("rectrain.commands.predict", "classify images or folders with a checkpoint: top-k class names and probabilities"),
    "export": ("rectrain.commands.export", "export a checkpoint's weights: torchvision state dict, TorchScript or ONNX"),
}


def did_you_mean(word: str, candidates) -> str:
    """' (did you mean X?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` once: not when the help already states its default, not for switches
    (their help says "on/off by default") and not for ``None`` (the help says what happens instead)."""

    _STATES_DEFAULT = re.compile(r"\(default\b|by default\)")

    def __init__(self, prog: str, **kw):
        super().__init__(prog, max_help_position=32, **kw)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or self._STATES_DEFAULT.search(text)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # help strings are %-formatted by argparse


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that names the fix, with exit status 2.

    ``parse_known_args`` rejects leftovers too: argparse hands a subcommand's unknown flags up to
    the top-level parser, which could only suggest its own flags and would name the wrong command.
    """

    # Values such as -inf, -1e-4 or -.5 are values, not flags (argparse only knows plain negative numbers), so that
    # `--lr -inf` reaches the flag's own check ("must be a finite number") instead of "expected one argument".
    NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|infinity|nan)$", re.I)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown(extras))
        return namespace, extras

    def _unknown(self, extras: list[str]) -> str:
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        if not flags:
            return f"unexpected argument(s): {' '.join(extras)}"
        known = [s for s in self._option_string_actions if s.startswith("--")]
        named = ", ".join(f + did_you_mean(f, known) for f in flags)
        return f"unknown flag{'s' if len(flags) > 1 else ''} {named}"

    def error(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever argparse composed
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser(command: str | None = None, argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = ArgParser(
        prog="rectrain", formatter_class=HelpFormatter,
        description="Fast ResNet training on image folders with aspect-ratio bucketed rectangular batches.",
    )
    parser.add_argument("--version", action="version", version=f"rectrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:  # only the chosen command pays for its imports
            add = importlib.import_module(module).add_arguments
            add(p, argv) if "argv" in inspect.signature(add).parameters else add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (also for --help and argument errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None, argv)
    try:
        if command is not None and command not in COMMANDS:
            parser.error(f"unknown command {command!r}{did_you_mean(command, COMMANDS)}; "
                         f"the commands are {', '.join(COMMANDS)}")
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or an argument error, already printed as one line
        return e.code if isinstance(e.code, int) else 2
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
