"""Weight EMA: an fp32 exponential moving average of the model's weights, for evaluation.

After each averaging step ``ema = decay * ema + (1 - decay) * model`` over every parameter and
floating-point buffer; the averaged model usually evaluates better than the live one late in a short
or noisy run (Polyak averaging; timm's ``ModelEmaV3``, which this follows).

Choices:
- Float buffers (BatchNorm ``running_mean``/``running_var``) are averaged like the weights, as timm's
  V3 does by default: they then match the averaged weights better than the live statistics would.
  Integer buffers (``num_batches_tracked``) cannot be averaged and are copied.
- Every tensor is kept in fp32 whatever the model's dtype: with decay 0.9998 one update moves a
  weight by 2e-4 of the gap, below bf16's resolution (2^-8), so a low-precision average would stall.
- ``every=N`` averages on every N-th optimizer step with ``decay**N``: the time constant stays
  ``1 / (1 - decay)`` optimizer steps, at 1/N of the cost.
- No host sync: one ``torch._foreach_lerp_`` and one ``_foreach_copy_`` over lists of tensors with
  a Python-float weight; no ``.item()``, no branch on a device value. Whether to average is decided
  from the step number, a Python int, so resuming needs only the weights and the step.
"""

from __future__ import annotations

import copy

import torch

from rectrain.training.parts import unwrap

__all__ = ["ModelEma"]


class ModelEma:
    """An fp32 moving average of ``model``'s parameters and buffers, held in ``self.module``.

    ``module`` is a plain ``nn.Module`` (never DDP- or compile-wrapped), in eval mode, without
    gradients, on the model's device and in its memory format (channels_last stays channels_last).
    It starts as a copy of ``model`` as it is now: create the EMA after loading any weights.

    ``decay``: per optimizer step; the average's time constant is ``1 / (1 - decay)`` steps (0.9998:
    5000 steps, about 1 epoch of ImageNet at batch 256, 4 at 1024). ``every``: average every N steps
    (see the module docstring). ``warmup``: use ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's
    and timm's ``ModelEma`` warm-up), so the first averages follow the fast-moving early weights
    instead of remembering the random initialisation for thousands of steps; off by default.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998, every: int = 1, warmup: bool = False):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        self.decay = float(decay)
        self.every = int(every)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(unwrap(model)).float().eval().requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None  # deepcopy copies gradients too
        ema = self._tensors(self.module)
        self._lerp_index = [i for i, t in enumerate(ema) if t.is_floating_point()]
        self._copy_index = [i for i, t in enumerate(ema) if not t.is_floating_point()]
        self._ema_lerp = [ema[i] for i in self._lerp_index]
        self._ema_copy = [ema[i] for i in self._copy_index]

    @staticmethod
    def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        """Parameters then buffers, in registration order (the same for two copies of one architecture)."""
        return [*module.parameters(), *module.buffers()]

    def decay_at(self, step: int) -> float:
        """The per-step decay at optimizer step ``step`` (0-based), with the warm-up if it is on."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> bool:
        """Call after every optimizer step; ``step`` is that step's 0-based index (as ``lr_at``'s).

        Averages when ``(step + 1) % every == 0``, with ``decay_at(step) ** every``; returns whether it
        did. ``model`` may be wrapped (DDP, torch.compile): its plain module is read. No host sync.
        """
        if (step + 1) % self.every:
            return False
        src = self._tensors(unwrap(model))
        if len(src) != len(self._lerp_index) + len(self._copy_index):
            raise ValueError(f"model has {len(src)} parameters and buffers, the EMA "
                             f"{len(self._lerp_index) + len(self._copy_index)}: not the same architecture")
        # A model in bf16/fp16 is read in fp32 (lerp needs one dtype); an fp32 model is read as is.
        src_lerp = [src[i] if src[i].dtype == e.dtype else src[i].to(e.dtype)
                    for i, e in zip(self._lerp_index, self._ema_lerp)]
        weight = 1.0 - self.decay_at(step) ** self.every  # a Python float: no device scalar to sync on
        torch._foreach_lerp_(self._ema_lerp, src_lerp, weight)
        if self._ema_copy:
            torch._foreach_copy_(self._ema_copy, [src[i] for i in self._copy_index])
        return True

    def state_dict(self) -> dict:
        """The averaged weights (the module's state dict) and, for the record, the settings."""
        return {"module": self.module.state_dict(), "decay": self.decay, "every": self.every,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        """Restore the averaged weights exactly (a bitwise copy). The settings stay the constructor's
        (the run's config): a resumed run may change the decay."""
        self.module.load_state_dict(state["module"])

    def __repr__(self) -> str:
        return f"ModelEma(decay={self.decay}, every={self.every}, warmup={self.warmup})"
