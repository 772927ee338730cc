"""`rectrain synth`: a learnable synthetic ImageNet-style folder of JPEGs (``rectrain.data.synth``), for tests,
the demo and benchmarks."""

from __future__ import annotations

import os

from rectrain.data.synth import KINDS, make_synthetic


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder; gets train/ and val/")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--train_per_class", type=int, default=100, help="training images per class")
    p.add_argument("--val_per_class", type=int, default=20, help="validation images per class (0: no val/)")
    p.add_argument("--kind", choices=KINDS, default="tiny",
                   help="imagenet: ~500x375 JPEGs (benchmarks); tiny: short side 40-80 px (tests, CPU demo)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--force", action="store_true", help="write into non-empty split folders (deletes nothing)")


def run(args) -> int:
    r = make_synthetic(args.out, args.classes, args.train_per_class, args.val_per_class, kind=args.kind,
                       seed=args.seed, workers=args.workers, force=args.force, progress=True)
    print(f"wrote {r['train']:,} train and {r['val']:,} val images ({args.kind}, {args.classes} classes) "
          f"to {os.path.abspath(args.out)} in {r['seconds']:.1f} s")
    return 0
