"""`rectrain bench loader|model|e2e|ablation`: the speed benchmarks, each a table or (``--json``) one JSON object.

- ``loader``: decoded images/s of the training loader alone (``rectrain.commands.bench.loader``).
- ``model``: training steps of the model alone on device tensors: images/s, peak memory, MFU, fused vs
  foreach SGD (``rectrain.commands.bench.model``).
- ``e2e``: the real training loop from an image folder for K steps after the warm-up (``rectrain.commands.bench.e2e``).
- ``ablation``: the seed's "Speed Comparison" table, every row on the same files in one run
  (``rectrain.commands.bench.ablation``).

Each module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``, as the commands of
``rectrain.cli`` do.
"""

from __future__ import annotations

import argparse
import importlib

from rectrain.cli import ArgParser, HelpFormatter

BENCHES = {name: f"rectrain.commands.bench.{name}" for name in ("loader", "model", "e2e", "ablation")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", parser_class=ArgParser, required=True)
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        bench = sub.add_parser(name, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter)
        mod.add_arguments(bench)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.what]).run(args)
