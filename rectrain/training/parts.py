"""The pieces one training step is made of, built one way for every caller: the model on its device and memory
format, the optimizer (SGD, or LARS/LAMB: ``rectrain.training.optim``), the loss scaler and autocast. The trainer,
`rectrain check`'s memory probe and the benchmarks all build them here, so what they measure is what trains.

Precision: ``fp32`` (no autocast), ``bf16`` or ``fp16`` autocast on CUDA; CPU runs are fp32 whatever was asked
(autocast on the CPU is slower than fp32 there). The GradScaler is always built and only *enabled* for fp16
(nanoGPT's habit), so the step has no ``if amp:`` branch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rectrain.model import build_model
from rectrain.training.optim import build_optimizer

__all__ = ["PRECISIONS", "precision_of", "autocast_dtype", "autocast_factory", "OptimSettings", "StepParts",
           "build_step_parts", "unwrap"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_of(no_amp: bool, amp_dtype: str) -> str:
    """A run's precision from its two flags (--no_amp, --amp_dtype): "fp32", "bf16" or "fp16"."""
    return "fp32" if no_amp else amp_dtype


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: None (fp32) on anything but CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision] if torch.device(device).type == "cuda" else None


def autocast_factory(device: torch.device | str, dtype: torch.dtype | None):
    """() -> a context manager: autocast to ``dtype`` on ``device``'s type, or nothing for fp32."""
    if dtype is None:
        return nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints save and the EMA reads)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer's settings, a typed slice of ``TrainConfig`` (the same field names)."""

    lr: float = 0.1
    momentum: float = 0.9        # SGD's and LARS's
    weight_decay: float = 1e-4   # not on BatchNorm parameters and biases (``param_groups``)
    nesterov: bool = False
    opt: str = "sgd"             # sgd, lars or lamb (``rectrain.training.optim``)
    lars_eta: float = 0.001      # LARS's trust coefficient
    lamb_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float | None = None  # None: the optimizer's default (LARS 0, LAMB 1e-6)


@dataclass
class StepParts:
    model: torch.nn.Module          # the plain module, on its device (channels_last where asked)
    optimizer: torch.optim.Optimizer  # SGD, Lars or Lamb
    scaler: torch.amp.GradScaler    # enabled for fp16 only
    autocast: object                # () -> context manager
    amp_dtype: torch.dtype | None   # None: fp32
    channels_last: bool             # the model and its inputs use the channels_last memory format


def build_step_parts(arch: str, num_classes: int, device: torch.device | str, *, width: int = 64,
                     precision: str = "fp32", channels_last: bool = True, optim: OptimSettings = OptimSettings(),
                     sgd: dict | None = None) -> StepParts:
    """The model (``torch.manual_seed`` first, if the caller needs the same weights everywhere), the optimizer
    (``optim.opt``: SGD with momentum by default), scaler and autocast. ``channels_last`` applies on CUDA only.
    ``sgd``: extra ``torch.optim.SGD`` arguments
    (``foreach``/``fused``, for the benchmark that compares them); by default torch's choice (foreach on CUDA):
    fused measured 1.004x on an H200, within noise (docs/benchmarks.md), not worth a second code path."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    channels_last = channels_last and device.type == "cuda"
    model = build_model(arch, num_classes=num_classes, width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, optim.opt, lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay, nesterov=optim.nesterov, lars_eta=optim.lars_eta,
                                lamb_betas=optim.lamb_betas, opt_eps=optim.opt_eps, sgd=sgd)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return StepParts(model, optimizer, scaler, autocast_factory(device, dtype), dtype, channels_last)
