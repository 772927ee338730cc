"""`rectrain eval`: top-1, top-5 and loss of a checkpoint on a validation split.

Uses the checkpoint's own settings (architecture, target size, bucket mode, decoder, validation batch
size, precision) unless overridden, the same rectangular validation as training and the same launcher:
without options the numbers are the ones the training run logged for those weights, and `--nproc N` or
torchrun give identical numbers to one process, since every image is counted exactly once.

Options for comparisons: ``--square`` (one square bucket: the standard "resize to target/0.875, centre
crop target x target" protocol that published numbers use), ``--tta flip`` (mean of the softmax of the
image and its mirror), ``--per_class`` (top-1 of each class, worst first) and ``--ema`` (the checkpoint's
EMA weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from rectrain.errors import UserError

# The command's flags need none of torch: everything that does is imported when the command runs.
TTA_MODES = ("flip",)  # test-time augmentation: the mean softmax of each image and its mirror

JSON_DECIMALS = 6  # floats in --json output: percentages to 1e-6 points, losses to 1e-6 nats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by rectrain train")
    p.add_argument("--data_dir", help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", default="val", help="split folder to evaluate")
    p.add_argument("--batch_size", type=int, default=None,
                   help="batch size per process (default: the run's validation batch size)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--target_size", type=int, help="override the checkpoint's --target_size")
    p.add_argument("--square", action="store_true",
                   help="square target_size x target_size centre crops (resize to target/0.875, centre crop: the "
                        "protocol of published ImageNet numbers) instead of the run's rectangular buckets")
    p.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation: flip = mean softmax of image and mirror")
    p.add_argument("--per_class", action="store_true", help="also report top-1 of every class, worst first")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (model_ema)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--nproc", type=int, help="processes (default: every visible GPU; 1 on CPU)")
    p.add_argument("--dist_port", default="12356", help="port of the built-in launcher")
    p.add_argument("--no_amp", action="store_true", help="evaluate in fp32 on CUDA (default: the run's precision)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, JSON_DECIMALS)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    from rectrain.inference import inference_buckets, restore
    from rectrain.runtime.distributed import launch
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    restored = restore(args.checkpoint, args.ema)  # fail here, once, before any process starts
    data_dir = args.data_dir or restored.config.data_dir
    from rectrain.data.shards import split_exists
    if not data_dir or not split_exists(data_dir, args.split):
        raise UserError(f"no {args.split}/ folder (or {args.split} shards) under {data_dir}; pass --data_dir "
                        "DATASET_ROOT")
    inference_buckets(restored.config, args.target_size, args.square)
    del restored
    worker = functools.partial(_eval_worker, args, data_dir)
    return launch(worker, device=args.device, nproc=args.nproc, port=args.dist_port)


def _eval_worker(args, data_dir: str, info) -> int:
    import torch

    from rectrain.data.failures import stand_in_warning
    from rectrain.data.loader import LoaderSettings, build_val_loader
    from rectrain.data.source import shared_scan
    from rectrain.data.workers import cap_workers
    from rectrain.inference import inference_autocast, inference_buckets, restore
    from rectrain.runtime.distributed import all_reduce_sum
    from rectrain.training.evaluation import class_totals, evaluate, evaluate_per_class, per_class_report, reduce_eval
    from rectrain.training.step import DeviceNormalize
    r = restore(args.checkpoint, args.ema)
    cfg = r.config
    # Rank 0 scans, the others read its cache file. Rank 0's log is its stderr (a failed scan's traceback); the
    # others' "read rank 0's scan" would be noise here.
    log = (lambda m: print(m, file=sys.stderr)) if info.is_primary else (lambda m: None)
    scan = shared_scan(data_dir, args.split, r.classes, is_primary=info.is_primary, log=log)
    if len(scan.index) == 0:
        raise UserError(f"{os.path.join(data_dir, args.split)} holds no usable images")
    buckets = inference_buckets(cfg, args.target_size, args.square)
    workers, _ = cap_workers(args.workers, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    device = torch.device(info.device)
    cuda = device.type == "cuda"
    settings = cfg.slice(LoaderSettings, val_batch_size=args.batch_size or cfg.val_batch_size or cfg.batch_size,
                         workers=workers, decode="cpu", pin_memory=cuda, rank=info.rank,
                         world_size=info.world_size)
    loader, _ = build_val_loader(scan, buckets, settings)
    channels_last = cuda and cfg.channels_last
    model = r.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    normalize = DeviceNormalize(device)
    autocast = inference_autocast(cfg, device, args.no_amp)

    def failed(paths: list[str]) -> None:
        for f in paths:
            print(stand_in_warning(f), file=sys.stderr)
    if args.tta or args.per_class:
        sums = all_reduce_sum(evaluate_per_class(model, loader, normalize, autocast, len(r.classes), args.tta,
                                                 channels_last, on_failed=failed))  # the one collective
        res, per_class = class_totals(sums), per_class_report(sums, r.classes)
    else:  # the training run's own evaluation
        res, per_class = reduce_eval(evaluate(model, loader, normalize, autocast, None, channels_last,
                                              on_failed=failed)), None
    if info.is_primary:
        _print_result(args, res, per_class, info.world_size, buckets, len(r.classes))
    return 0


def _print_result(args, res: dict, per_class: list[dict] | None, world_size: int, buckets, classes: int) -> None:
    if args.json:
        out = {"checkpoint": args.checkpoint, **res, "square": args.square, "tta": args.tta, "ema": args.ema,
               "target_size": buckets.target_size}
        if per_class is not None:
            out["per_class"] = per_class
        print(json.dumps(_rounded(out)))
        return
    how = [s for s, on in (("EMA weights", args.ema), (f"square {buckets.describe()} crops", args.square),
                           (f"TTA {args.tta}", args.tta)) if on]
    from rectrain.training.evaluation import format_top5
    top5 = format_top5(res["val_acc5"], classes)
    print(f"{args.checkpoint}{' (' + ', '.join(how) + ')' if how else ''}: top-1 {res['val_acc1']:.2f}%  "
          f"top-5 {top5}  loss {res['val_loss']:.4f}  "
          f"({res['val_images']:,} images, {world_size} process(es))")
    if per_class is not None:
        print("\n".join(per_class_lines(per_class)))


def per_class_lines(per_class: list[dict]) -> list[str]:
    """The per-class table, worst top-1 first (ties: class order; classes without images last)."""
    order = sorted(range(len(per_class)), key=lambda i: (per_class[i]["acc1"] is None, per_class[i]["acc1"] or 0, i))
    width = max([len("class")] + [len(c["class"]) for c in per_class])
    lines = [f"per-class top-1, worst first ({len(per_class)} classes):",
             f"  {'class':<{width}}  {'top-1':>7}  {'top-5':>7}  {'images':>6}"]
    for i in order:
        c = per_class[i]
        acc = [f"{c[k]:6.2f}%" if c["images"] else f"{'-':>7}" for k in ("acc1", "acc5")]
        lines.append(f"  {c['class']:<{width}}  {acc[0]}  {acc[1]}  {c['images']:>6,}")
    return lines
