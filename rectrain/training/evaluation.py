"""Evaluation passes: loss, top-1 and top-5 over a rank's share of the validation batches, summed on the device
and all-reduced once at the end (ranks may hold different numbers of batches, so no collective runs per batch).

``evaluate`` is what training validates with; ``evaluate_per_class`` (`rectrain eval --per_class` and ``--tta``)
keeps the sums per true class, from ``log_probs`` (optionally averaging each image's softmax with its mirror's).
"""

from __future__ import annotations

import math

import torch

from rectrain.data.failures import guarded
from rectrain.runtime.distributed import StopFlag, all_reduce_sum

__all__ = ["evaluate", "reduce_eval", "log_probs", "evaluate_per_class", "per_class_report", "class_totals",
           "format_top5"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, autocast, stop: StopFlag | None = None,
             channels_last: bool = True, pad_to: int | None = None, on_failed=None) -> torch.Tensor | None:
    """Loss, top-1 and top-5 sums over this rank's share of the validation set.

    Ranks may hold different numbers of batches, so no collective runs inside the loop: sums stay on
    the device and are all-reduced once at the end (``reduce_eval``). Returns None when a stop signal
    arrived (the caller agrees on it with the other ranks). ``pad_to``: a bucket's last, smaller batch is
    padded with blank images to this size and the padding is ignored, so that each bucket is one batch
    shape (one compiled graph, one cuDNN plan); in eval mode images do not interact, so results are equal.
    ``on_failed(paths)``: told of images that failed to decode (the loader scored another of their bucket instead).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=normalize.device)  # loss, correct1, correct5, count
    for images, labels, failed in guarded(loader):
        if failed and on_failed is not None:
            on_failed(failed)
        if stop is not None and stop.signum:
            return None
        n = labels.shape[0]
        if pad_to is not None and n < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
        images, labels = normalize(images, labels)
        if not channels_last:
            images = images.contiguous()
        with autocast():
            logits = model(images)
        logits = logits[:n].float()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        sums += torch.stack([loss.double(), hit[:, :1].sum().double(), hit.sum().double(),
                             torch.tensor(float(labels.shape[0]), device=sums.device, dtype=torch.float64)])
    return sums


def reduce_eval(sums: torch.Tensor) -> dict:
    sums = all_reduce_sum(sums.clone())
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_acc1": 100.0 * c1 / n, "val_acc5": 100.0 * c5 / n, "val_images": int(n)}


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


@torch.no_grad()
def evaluate_per_class(model: torch.nn.Module, loader, normalize, autocast, num_classes: int,
                       tta: str | None = None, channels_last: bool = False, on_failed=None) -> torch.Tensor:
    """Sums per true class over this rank's batches: (classes, 4) float64 of loss, top-1 hits, top-5 hits, images.

    The per-sample twin of ``evaluate`` (same loader, normalisation and loss, so the column
    sums are its numbers); the caller all-reduces the result once after the loop.
    """
    model.eval()
    sums = torch.zeros(num_classes, 4, dtype=torch.float64, device=normalize.device)
    for images, labels, failed in guarded(loader):
        if failed and on_failed is not None:
            on_failed(failed)
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


def class_totals(sums: torch.Tensor) -> dict:
    loss, c1, c5, n = sums.sum(0).tolist()
    k = max(n, 1.0)
    return {"val_loss": loss / k, "val_acc1": 100.0 * c1 / k, "val_acc5": 100.0 * c5 / k, "val_images": int(n)}


def format_top5(acc5: float, classes: int) -> str:
    """Top-5 for a log line; with 5 classes or fewer it is always 100%, so it is not printed as a result."""
    return f"{acc5:.2f}%" if classes > 5 else f"- ({classes} classes)"
