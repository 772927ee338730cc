"""`rectrain eval`: top-1, top-5 and loss of a checkpoint on a validation split.

Uses the checkpoint's own settings (architecture, target size, bucket mode) unless overridden, the same
rectangular validation as training, and the same launcher: `--nproc N` or torchrun give identical
numbers to one process, since every image is counted exactly once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch

from rectrain import checkpoint as ckpt_io
from rectrain.arscan import scan_split
from rectrain.buckets import make_buckets
from rectrain.distributed import DistInfo, launch
from rectrain.engine import autocast_factory, evaluate, reduce_eval
from rectrain.errors import UserError
from rectrain.loader import DeviceNormalize, build_val_loader, cap_workers
from rectrain.model import build_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by rectrain train")
    p.add_argument("--data_dir", help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", default="val", help="split folder to evaluate")
    p.add_argument("--batch_size", type=int, default=256, help="batch size per process")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--target_size", type=int, help="override the checkpoint's --target_size")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--nproc", type=int, help="processes (default: every visible GPU; 1 on CPU)")
    p.add_argument("--dist_port", default="12356", help="port of the built-in launcher")
    p.add_argument("--no_amp", action="store_true", help="evaluate in fp32 on CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    ckpt = ckpt_io.load(args.checkpoint)
    cfg = ckpt.get("config", {})
    data_dir = args.data_dir or cfg.get("data_dir")
    if not data_dir or not os.path.isdir(os.path.join(data_dir, args.split)):
        raise UserError(f"no {args.split}/ folder under {data_dir}; pass --data_dir DATASET_ROOT")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    del ckpt
    worker = functools.partial(_eval_worker, args, data_dir, cfg)
    return launch(worker, device=args.device, nproc=args.nproc, port=args.dist_port)


def _eval_worker(args, data_dir: str, cfg: dict, info: DistInfo) -> int:
    ckpt = ckpt_io.load(args.checkpoint)
    classes = list(ckpt["classes"])
    scan = scan_split(data_dir, args.split, classes=classes)
    buckets = make_buckets(args.target_size or cfg.get("target_size", 224), cfg.get("rect_mode", "short_side"),
                           cfg.get("max_ratio", 2.0))
    workers, _ = cap_workers(args.workers, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    device = torch.device(info.device)
    loader, _ = build_val_loader(scan, buckets, batch_size=args.batch_size, workers=workers, rank=info.rank,
                                 world_size=info.world_size, pin_memory=device.type == "cuda")
    model = build_model(cfg.get("arch", ckpt.get("arch", "resnet50")), num_classes=len(classes),
                        width=cfg.get("width", 64)).to(device)
    model.load_state_dict(ckpt["model"])
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp = torch.bfloat16 if cuda and not args.no_amp else None
    sums = evaluate(model, loader, DeviceNormalize(device), autocast_factory(str(device), amp), None, cuda)
    res = reduce_eval(sums)
    if info.is_primary:
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{args.checkpoint}: top-1 {res['val_acc1']:.2f}%  top-5 {res['val_acc5']:.2f}%  "
                  f"loss {res['val_loss']:.4f}  ({res['val_images']:,} images, {info.world_size} process(es))")
    return 0
