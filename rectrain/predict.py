"""`rectrain predict`: class names and probabilities for image files or folders, from a checkpoint.

Images go through validation's own path: the upright size from the header (``rectrain.arscan``, EXIF
aware), the bucket of the checkpoint's table nearest to the image's ratio, the deterministic centre crop
of ``rectrain.transforms`` (CMYK, greyscale, palette, alpha and 16-bit images become RGB) and
normalisation on the device; batches hold one bucket shape each, so crops are rectangular as in
validation. A file that cannot be read is reported by path on stderr and skipped; the command fails
only when no image could be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from rectrain.arscan import BadImage, read_size
from rectrain.distributed import resolve_device
from rectrain.engine import autocast_factory
from rectrain.errors import UserError
from rectrain.evaluate import TTA_MODES, amp_dtype, inference_buckets, log_probs, restore
from rectrain.index import IMAGE_EXTENSIONS
from rectrain.loader import DeviceNormalize, cap_workers
from rectrain.transforms import DecodeError, RectangularCropTfm

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


# -- which files ------------------------------------------------------------------------------------
def find_images(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named, and image files under folders named (recursively, sorted, hidden entries skipped).

    -> (files in order without repeats, [(path, reason)] for paths that do not exist). A file named
    explicitly is taken whatever its extension: the decoder decides.
    """
    files, missing = [], []
    for p in paths:
        if os.path.isdir(p):
            files += _walk_images(p, missing)
        elif os.path.isfile(p):
            files.append(p)
        else:
            missing.append((p, "no such file or folder"))
    return list(dict.fromkeys(files)), missing


def _walk_images(folder: str, problems: list[tuple[str, str]]) -> list[str]:
    """Image files under ``folder``; symlinked folders are followed once each (a link back up is no loop)."""
    found, seen = [], set()

    def unseen(path: str) -> bool:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        new = key not in seen
        seen.add(key)
        return new

    def unreadable(e: OSError) -> None:
        problems.append((e.filename, f"cannot list the folder: {e.strerror}"))

    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        if not unseen(root):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return found


# -- decoding ---------------------------------------------------------------------------------------
class _Crops(torch.utils.data.Dataset):
    """Item i -> (i, (H, W, 3) uint8 centre crop in its bucket's shape, or None, reason or None)."""

    def __init__(self, files: list[str], sizes: np.ndarray, shapes: np.ndarray, transform: RectangularCropTfm):
        self.files, self.sizes, self.shapes, self.transform = files, sizes, shapes, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        (h, w), size_hw = self.shapes[i].tolist(), tuple(self.sizes[i].tolist())
        try:
            return i, self.transform(path, (h, w), size_hw=size_hw), None
        except DecodeError as e:
            return i, None, str(e).replace(f"cannot decode {path}: ", "")


def _collate(items):
    good = [it for it in items if it[1] is not None]
    images = torch.from_numpy(np.stack([it[1] for it in good])) if good else None  # (B, H, W, 3) uint8
    return [it[0] for it in good], images, [(it[0], it[2]) for it in items if it[1] is None]


def bucket_batches(bucket_ids: np.ndarray, batch_size: int) -> list[list[int]]:
    """Indices grouped by bucket (stable), cut into batches of at most ``batch_size``: one shape per batch."""
    order = np.argsort(bucket_ids, kind="stable")
    batches = []
    for b in np.unique(bucket_ids):
        members = order[bucket_ids[order] == b].tolist()
        batches += [members[s:s + batch_size] for s in range(0, len(members), batch_size)]
    return batches


# -- prediction -------------------------------------------------------------------------------------
@dataclass
class Prediction:
    path: str
    input_hw: tuple[int, int]  # the bucket shape the image was cropped to
    classes: list[str]  # most probable first
    indices: list[int]
    probs: list[float]


@torch.no_grad()
def predict_files(restored, files: list[str], *, topk: int = 5, batch_size: int = 64, workers: int = 0,
                  device: str = "cpu", target_size: int | None = None, tta: str | None = None,
                  no_amp: bool = False) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify ``files`` with a ``rectrain.evaluate.restore``d model.

    -> (predictions in the order of ``files``, [(path, reason)] for files that could not be read).
    """
    cfg = restored.config
    sizes, readable, bad = [], [], []
    for path in files:  # headers only: the upright size picks the bucket, as the scan does for validation
        try:
            sizes.append(read_size(path))
            readable.append(path)
        except BadImage as e:
            bad.append((path, str(e)))
    if not readable:
        return [], bad
    buckets = inference_buckets(cfg, target_size)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    ids = buckets.assign(sizes)
    dataset = _Crops(readable, sizes, buckets.shapes[ids],
                     RectangularCropTfm(train=False, val_crop=cfg.get("val_crop", 0.875), decoder=cfg.get("decoder", "auto")))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=bucket_batches(ids, batch_size), num_workers=workers,
                                         collate_fn=_collate)
    dev = torch.device(device)
    model = restored.model.to(dev).eval()
    normalize = DeviceNormalize(dev)
    autocast = autocast_factory(str(dev), amp_dtype(cfg, dev, no_amp))
    k = min(topk, len(restored.classes))
    found: dict[int, Prediction] = {}
    for idx, images, failed in loader:
        bad += [(readable[i], reason) for i, reason in failed]
        if images is None:
            continue
        images, _ = normalize(images, torch.empty(0, dtype=torch.int64))
        probs, top = log_probs(model, images.contiguous(), autocast, tta).exp().topk(k, dim=1)
        for i, p, t in zip(idx, probs.cpu().tolist(), top.cpu().tolist()):
            found[i] = Prediction(readable[i], tuple(int(v) for v in dataset.shapes[i]),
                                  [restored.classes[j] for j in t], t, p)
    order = {p: n for n, p in enumerate(files)}
    return [found[i] for i in sorted(found)], sorted(bad, key=lambda b: order.get(b[0], -1))


# -- `rectrain predict` -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
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


def _as_json(checkpoint: str, preds: list[Prediction], bad: list[tuple[str, str]]) -> dict:
    return {
        "checkpoint": checkpoint,
        "predictions": [{"path": p.path, "input_hw": list(p.input_hw),
                         "top": [{"class": c, "index": i, "prob": round(q, PROB_DECIMALS)}
                                 for c, i, q in zip(p.classes, p.indices, p.probs)]} for p in preds],
        "skipped": [{"path": path, "reason": reason} for path, reason in bad],
    }
