"""`rectrain predict`: class names and probabilities for image files or folders, from a checkpoint
(``rectrain.inference.predict_files``). A file that cannot be read is reported by path on stderr and skipped; the
command fails only when no image could be read."""

from __future__ import annotations

import argparse
import json
import sys

from rectrain.commands.eval import TTA_MODES
from rectrain.data.index import IMAGE_EXTENSIONS
from rectrain.errors import UserError

PROB_DECIMALS = 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, or folders searched recursively for " + " ".join(sorted(IMAGE_EXTENSIONS)))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by rectrain train")
    p.add_argument("--topk", type=int, default=5, help="classes per image, most probable first (at most all)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: decode in this process)")
    p.add_argument("--target_size", type=int, help="override the checkpoint's --target_size")
    p.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation: flip = mean softmax of image and mirror")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (model_ema)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--no_amp", action="store_true", help="fp32 on CUDA (default: the run's precision)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from rectrain.data.workers import cap_workers
    from rectrain.inference import find_images, predict_files, restore
    from rectrain.runtime.distributed import resolve_device
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    files, missing = find_images(args.paths)
    if not files and not missing:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {' '.join(args.paths)}")
    restored = restore(args.checkpoint, args.ema)
    device = resolve_device(args.device)
    preds, bad = predict_files(restored, files, topk=args.topk, batch_size=args.batch_size,
                               workers=cap_workers(args.workers)[0], device=device, target_size=args.target_size,
                               tta=args.tta, no_amp=args.no_amp)
    bad = missing + bad
    for path, reason in bad:  # one line each, on stderr: stdout stays the results (or the JSON object)
        print(f"rectrain predict: skipped {path}: {reason}", file=sys.stderr)
    if not preds:
        raise UserError(f"none of the {len(files) + len(missing)} image(s) could be read (reasons above)")
    if args.json:
        print(json.dumps(_as_json(args.checkpoint, preds, bad)))
    else:
        for p in preds:
            print(f"{p.path}  " + "  ".join(f"{c} {100 * q:.2f}%" for c, q in zip(p.classes, p.probs)))
    return 0


def _as_json(checkpoint: str, preds: list, bad: list[tuple[str, str]]) -> dict:
    return {
        "checkpoint": checkpoint,
        "predictions": [{"path": p.path, "input_hw": list(p.input_hw),
                         "top": [{"class": c, "index": i, "prob": round(q, PROB_DECIMALS)}
                                 for c, i, q in zip(p.classes, p.indices, p.probs)]} for p in preds],
        "skipped": [{"path": path, "reason": reason} for path, reason in bad],
    }
