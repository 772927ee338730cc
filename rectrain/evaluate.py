"""`rectrain eval`: top-1, top-5 and loss of a checkpoint on a validation split; and the inference set-up
that `rectrain predict` and `rectrain export` share (``restore``, ``inference_buckets``, ``log_probs``).

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
import math
import os
from dataclasses import dataclass

import torch

from rectrain import checkpoint as ckpt_io
from rectrain.arscan import scan_split
from rectrain.buckets import BucketTable, make_buckets
from rectrain.distributed import DistInfo, all_reduce_sum, launch
from rectrain.engine import autocast_factory, evaluate, reduce_eval
from rectrain.errors import UserError
from rectrain.loader import DeviceNormalize, build_val_loader, cap_workers
from rectrain.model import ResNet, build_model
from rectrain.schedule import validation_size

TTA_MODES = ("flip",)
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


# -- shared with `rectrain predict` and `rectrain export` ------------------------------------------------
@dataclass
class Restored:
    """A checkpoint's model (CPU, eval mode) and what is needed to feed it."""

    model: ResNet
    classes: list[str]
    config: dict  # the run's TrainConfig.to_dict() ({} for a checkpoint without one)
    arch: str
    width: int
    ema: bool  # the weights are the EMA ones


def restore(path: str, ema: bool = False) -> Restored:
    """Load ``path`` and build its model; every problem is a one-line UserError."""
    ckpt = ckpt_io.load(path)
    classes = ckpt.get("classes")
    if not classes:
        raise ckpt_io.CheckpointError(f"checkpoint {path} has no class list ('classes'); it was not written by "
                                      "rectrain train")
    cfg = ckpt.get("config") or {}
    arch, width = cfg.get("arch", ckpt.get("arch", "resnet50")), int(cfg.get("width", 64))
    weights = _ema_weights(ckpt, path) if ema else ckpt["model"]
    try:
        model = build_model(arch, num_classes=len(classes), width=width)
        model.load_state_dict(weights)
    except (ValueError, RuntimeError) as e:  # unknown arch, or weights of another shape or architecture
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines[0].startswith("Error(s) in loading") else lines[0]  # the first problem
        raise ckpt_io.CheckpointError(f"the weights in {path} do not fit a {arch} of width {width} with "
                                      f"{len(classes)} classes ({reason[:200]})") from None
    return Restored(model.eval(), list(classes), cfg, arch, width, ema)


def _ema_weights(ckpt: dict, path: str) -> dict:
    """``model_ema``: a plain state dict, or ``rectrain.ema.ModelEma.state_dict()`` (weights under "module")."""
    ema = ckpt.get("model_ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        ema = ema["module"]
    if not isinstance(ema, dict) or not ema:
        raise UserError(f"checkpoint {path} holds no EMA weights ('model_ema'): the run kept no EMA; drop --ema")
    return ema


def inference_buckets(cfg: dict, target_size: int | None = None, square: bool = False) -> BucketTable:
    """The run's validation buckets (or one square bucket); ``target_size`` overrides the size the run validated at
    (its --val_target_size, else its last training resolution)."""
    size = target_size or validation_size(cfg.get("target_size", 224), cfg.get("res_schedule"),
                                          cfg.get("val_target_size"))
    try:
        if square:  # one 1:1 bucket: every image's largest centred square, then val_crop of it
            return make_buckets(size, "short_side", 1.0, per_side=0)
        return make_buckets(size, cfg.get("rect_mode", "short_side"), cfg.get("max_ratio", 2.0))
    except ValueError as e:
        raise UserError(f"{e}; pass a --target_size of 32 or more") from None


def amp_dtype(cfg: dict, device: torch.device, no_amp: bool = False) -> torch.dtype | None:
    """The run's precision: its autocast dtype on CUDA unless it (or this command) said --no_amp; fp32 on CPU."""
    if device.type != "cuda" or no_amp or cfg.get("no_amp", False):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.get("amp_dtype", "bf16")]


def log_probs(model: torch.nn.Module, images: torch.Tensor, autocast, tta: str | None = None) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, classes) float32 log-probabilities.

    ``tta="flip"``: the log of the mean of the softmax of the images and their mirrors (one batch of 2B).
    """
    x = torch.cat([images, images.flip(3)]) if tta == "flip" else images
    with autocast():
        logits = model(x)
    logp = logits.float().log_softmax(1)
    if tta == "flip":
        b = images.shape[0]
        logp = torch.logaddexp(logp[:b], logp[b:]) - math.log(2.0)
    return logp


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_per_class(model: torch.nn.Module, loader, normalize, autocast, num_classes: int,
                       tta: str | None = None, channels_last: bool = False) -> torch.Tensor:
    """Sums per true class over this rank's batches: (classes, 4) float64 of loss, top-1 hits, top-5 hits, images.

    The per-sample twin of ``rectrain.engine.evaluate`` (same loader, normalisation and loss, so the column
    sums are its numbers); the caller all-reduces the result once after the loop.
    """
    model.eval()
    sums = torch.zeros(num_classes, 4, dtype=torch.float64, device=normalize.device)
    for images, labels, _failed in loader:
        images, labels = normalize(images, labels)
        if not channels_last:
            images = images.contiguous()
        logp = log_probs(model, images, autocast, tta)
        loss = -logp.gather(1, labels[:, None])[:, 0]  # cross-entropy of each image
        hit = logp.topk(min(5, num_classes), dim=1).indices == labels[:, None]  # (B, k)
        rows = torch.stack([loss.double(), hit[:, 0].double(), hit.any(1).double(), torch.ones_like(loss).double()], 1)
        sums.index_add_(0, labels, rows)
    return sums


def per_class_report(sums: torch.Tensor, classes: list[str]) -> list[dict]:
    """All-reduced (classes, 4) sums -> one dict per class, in class order (None: no image of that class)."""
    out = []
    for name, (loss, c1, c5, n) in zip(classes, sums.tolist()):
        out.append({"class": name, "images": int(n), "acc1": 100.0 * c1 / n if n else None,
                    "acc5": 100.0 * c5 / n if n else None, "loss": loss / n if n else None})
    return out


def _totals(sums: torch.Tensor) -> dict:
    loss, c1, c5, n = sums.sum(0).tolist()
    k = max(n, 1.0)
    return {"val_loss": loss / k, "val_acc1": 100.0 * c1 / k, "val_acc5": 100.0 * c5 / k, "val_images": int(n)}


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, JSON_DECIMALS)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


# -- `rectrain eval` ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    restored = restore(args.checkpoint, args.ema)  # fail here, once, before any process starts
    data_dir = args.data_dir or restored.config.get("data_dir")
    if not data_dir or not os.path.isdir(os.path.join(data_dir, args.split)):
        raise UserError(f"no {args.split}/ folder under {data_dir}; pass --data_dir DATASET_ROOT")
    inference_buckets(restored.config, args.target_size, args.square)
    del restored
    worker = functools.partial(_eval_worker, args, data_dir)
    return launch(worker, device=args.device, nproc=args.nproc, port=args.dist_port)


def _eval_worker(args, data_dir: str, info: DistInfo) -> int:
    r = restore(args.checkpoint, args.ema)
    cfg = r.config
    scan = scan_split(data_dir, args.split, classes=r.classes)
    if len(scan.index) == 0:
        raise UserError(f"{os.path.join(data_dir, args.split)} holds no usable images")
    buckets = inference_buckets(cfg, args.target_size, args.square)
    batch_size = args.batch_size or cfg.get("val_batch_size") or cfg.get("batch_size") or 256
    workers, _ = cap_workers(args.workers, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    device = torch.device(info.device)
    cuda = device.type == "cuda"
    loader, _ = build_val_loader(scan, buckets, batch_size=batch_size, workers=workers, rank=info.rank,
                                 world_size=info.world_size, pin_memory=cuda, decoder=cfg.get("decoder", "auto"),
                                 val_crop=cfg.get("val_crop", 0.875))
    channels_last = cuda and cfg.get("channels_last", True)
    model = r.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    normalize = DeviceNormalize(device)
    autocast = autocast_factory(str(device), amp_dtype(cfg, device, args.no_amp))
    if args.tta or args.per_class:
        sums = all_reduce_sum(evaluate_per_class(model, loader, normalize, autocast, len(r.classes), args.tta,
                                                 channels_last))  # the one collective
        res, per_class = _totals(sums), per_class_report(sums, r.classes)
    else:  # the training run's own evaluation
        res, per_class = reduce_eval(evaluate(model, loader, normalize, autocast, None, channels_last)), None
    if info.is_primary:
        _print_result(args, res, per_class, info.world_size, buckets)
    return 0


def _print_result(args, res: dict, per_class: list[dict] | None, world_size: int, buckets: BucketTable) -> None:
    if args.json:
        out = {"checkpoint": args.checkpoint, **res, "square": args.square, "tta": args.tta, "ema": args.ema,
               "target_size": buckets.target_size}
        if per_class is not None:
            out["per_class"] = per_class
        print(json.dumps(_rounded(out)))
        return
    how = [s for s, on in (("EMA weights", args.ema), (f"square {buckets.describe()} crops", args.square),
                           (f"TTA {args.tta}", args.tta)) if on]
    print(f"{args.checkpoint}{' (' + ', '.join(how) + ')' if how else ''}: top-1 {res['val_acc1']:.2f}%  "
          f"top-5 {res['val_acc5']:.2f}%  loss {res['val_loss']:.4f}  "
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
