"""`rectrain bench loader|model|e2e|ablation`: the speed benchmarks, each a table or (``--json``) one JSON object.

- ``loader``: decoded images/s of the training loader alone (``rectrain.commands.bench.loader``).
- ``model``: training steps of the model alone on device tensors: images/s, peak memory, MFU, fused vs
  foreach SGD (``rectrain.commands.bench.model``).
- ``e2e``: the real training loop from an image folder for K steps after the warm-up (``rectrain.commands.bench.e2e``).
- ``ablation``: the seed's "Speed Comparison" table, every row on the same files in one run
  (``rectrain.commands.bench.ablation``).

Each module exposes ``HELP`` (from ``BENCHES``), ``add_arguments(parser)`` and ``run(args) -> int``, as the
commands of ``rectrain.cli`` do; only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib

from rectrain.cli import ArgParser, HelpFormatter

BENCHES = {  # name -> one-line help; each is rectrain.commands.bench.NAME
    "loader": "decoded images/s of the training loader (workers, crops, batches), end to end from the files",
    "model": "training steps of the model alone on device tensors: images/s, peak memory, MFU, fused vs foreach SGD",
    "e2e": "the real training loop from an image folder for K steps after the warm-up: images/s, data wait, memory",
    "ablation": "the seed's Speed Comparison table (fp32 baseline, + AMP, + buckets, + batch aug, + channels_last, "
                "+ compile, + GPU decode, area mode) measured side by side on the same files",
}


def add_arguments(p: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """The benchmarks as sub-commands; only the one named in ``argv`` is imported (its flags need torch)."""
    sub = p.add_subparsers(dest="what", metavar="WHAT", parser_class=ArgParser, required=True)
    words = [a for a in argv or [] if not a.startswith("-")]
    chosen = words[words.index("bench") + 1] if "bench" in words[:-1] else None
    for name, help_text in BENCHES.items():
        bench = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == chosen:
            importlib.import_module(f"rectrain.commands.bench.{name}").add_arguments(bench)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"rectrain.commands.bench.{args.what}").run(args)
