"""Inference from a checkpoint: the model it holds and how to feed it, for `rectrain eval`, `predict` and `export`.

``restore`` loads a checkpoint's model (CPU, eval mode), classes and settings (a ``TrainConfig``: today's defaults
fill what an older checkpoint lacks); ``inference_buckets`` is the bucket table the run validated with (or one
square bucket); ``inference_autocast`` its precision. ``predict_files`` classifies image files through validation's
own path: the upright size from the header (``rectrain.data.scan``, EXIF aware), the bucket of the checkpoint's
table nearest to the image's ratio, the deterministic centre crop of ``rectrain.data.transforms`` and normalisation
on the device; batches hold one bucket shape each, so crops are rectangular as in validation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from rectrain.config import TrainConfig
from rectrain.data.buckets import BucketTable, make_buckets
from rectrain.data.index import IMAGE_EXTENSIONS
from rectrain.data.scan import BadImage, read_size
from rectrain.data.transforms import DecodeError, RectangularCropTfm
from rectrain.errors import UserError
from rectrain.model import ResNet, build_model
from rectrain.training import checkpoint as ckpt_io
from rectrain.training.evaluation import log_probs
from rectrain.training.parts import autocast_dtype, autocast_factory
from rectrain.training.schedule import validation_size
from rectrain.training.step import DeviceNormalize

__all__ = ["Restored", "restore", "inference_buckets", "inference_autocast", "find_images", "Prediction",
           "predict_files", "bucket_batches"]


@dataclass
class Restored:
    """A checkpoint's model (CPU, eval mode) and what is needed to feed it."""

    model: ResNet
    classes: list[str]
    config: TrainConfig  # the run's settings
    ema: bool            # the weights are the EMA ones

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def width(self) -> int:
        return self.config.width


def restore(path: str, ema: bool = False) -> Restored:
    """Load ``path`` and build its model; every problem is a one-line UserError."""
    ckpt = ckpt_io.load(path)
    classes = ckpt.get("classes")
    if not classes:
        raise ckpt_io.CheckpointError(f"checkpoint {path} has no class list ('classes'); it was not written by "
                                      "rectrain train")
    saved = dict(ckpt.get("config") or {})
    if ckpt.get("arch") and "arch" not in saved:
        saved["arch"] = ckpt["arch"]
    cfg = TrainConfig.from_checkpoint(saved, source=f"checkpoint {path}")
    weights = _ema_weights(ckpt, path) if ema else ckpt["model"]
    try:
        model = build_model(cfg.arch, num_classes=len(classes), width=cfg.width)
        model.load_state_dict(weights)
    except (ValueError, RuntimeError) as e:  # unknown arch, or weights of another shape or architecture
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines[0].startswith("Error(s) in loading") else lines[0]  # the first problem
        raise ckpt_io.CheckpointError(f"the weights in {path} do not fit a {cfg.arch} of width {cfg.width} with "
                                      f"{len(classes)} classes ({reason[:200]})") from None
    return Restored(model.eval(), list(classes), cfg, ema)


def _ema_weights(ckpt: dict, path: str) -> dict:
    """``model_ema``: a plain state dict, or ``rectrain.training.ema.ModelEma.state_dict()`` (weights under "module")."""
    ema = ckpt.get("model_ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        ema = ema["module"]
    if not isinstance(ema, dict) or not ema:
        raise UserError(f"checkpoint {path} holds no EMA weights ('model_ema'): the run kept no EMA; drop --ema")
    return ema


def inference_buckets(cfg: TrainConfig, target_size: int | None = None, square: bool = False) -> BucketTable:
    """The run's validation buckets (or one square bucket); ``target_size`` overrides the size the run validated at
    (its --val_target_size, else its last training resolution)."""
    size = target_size or validation_size(cfg.target_size, cfg.res_schedule, cfg.val_target_size)
    try:
        if square:  # one 1:1 bucket: every image's largest centred square, then val_crop of it
            return make_buckets(size, "short_side", 1.0, per_side=0)
        return make_buckets(size, cfg.rect_mode, cfg.max_ratio)
    except ValueError as e:
        raise UserError(f"{e}; pass a --target_size of 32 or more") from None


def inference_autocast(cfg: TrainConfig, device: torch.device, no_amp: bool = False):
    """The run's precision on ``device`` (fp32 where the run or this command said --no_amp, and on the CPU)."""
    return autocast_factory(device, autocast_dtype("fp32" if no_amp else cfg.precision, device))


# -- prediction: which files ------------------------------------------------------------------------
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
    """Classify ``files`` with a ``restore``d model.

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
                     RectangularCropTfm(train=False, val_crop=cfg.val_crop, decoder=cfg.decoder))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=bucket_batches(ids, batch_size), num_workers=workers,
                                         collate_fn=_collate)
    dev = torch.device(device)
    model = restored.model.to(dev).eval()
    normalize = DeviceNormalize(dev)
    autocast = inference_autocast(cfg, dev, no_amp)
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
