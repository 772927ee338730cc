"""``AugmentationConfig``: the seed's batch-augmentation settings (fields and defaults), validated at construction.

Plain Python (no torch), so the command line can build and check it without importing torch; the augmentations
themselves are ``rectrain.training.augment``'s.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

from rectrain.errors import UserError

__all__ = ["AugmentationConfig", "AugmentationConfigError"]


class AugmentationConfigError(UserError, ValueError):
    """A bad augmentation setting: a ``UserError`` for the CLI, a ``ValueError`` for library callers."""


@dataclass
class AugmentationConfig:
    """The seed's ``AugmentationConfig``: same fields and defaults, validated at construction.

    Every field has a training-CLI flag of the same name (``--mixup_alpha 0.1``; the switches are
    ``--no_mixup``, ``--no_cutmix``, ``--cutout``, ``--no_random_erasing``).
    """

    use_mixup: bool = True
    mixup_alpha: float = 0.2             # lam ~ Beta(alpha, alpha)
    use_cutmix: bool = True
    cutmix_alpha: float = 1.0            # box area fraction 1 - lam, lam ~ Beta(alpha, alpha)
    use_cutout: bool = False
    cutout_n_holes: int = 1              # square holes per image
    cutout_length: int = 8               # hole side, pixels
    cutout_prob: float = 0.5             # per image
    use_random_erasing: bool = True
    random_erasing_prob: float = 0.25    # per image
    random_erasing_scale: tuple[float, float] = (0.02, 0.33)  # erased area, fraction of the image
    batch_aug_prob: float = 0.5          # per batch: apply MixUp or CutMix (50/50 when both are on)

    def __post_init__(self):
        for name in ("use_mixup", "use_cutmix", "use_cutout", "use_random_erasing"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                _bad(name, getattr(self, name), "must be true or false")
            setattr(self, name, bool(getattr(self, name)))
        for name, switch, example in (("mixup_alpha", "use_mixup", 0.2), ("cutmix_alpha", "use_cutmix", 1.0)):
            value = _number(name, getattr(self, name))
            if getattr(self, switch) and not value > 0:
                off = "--no_" + switch[4:]
                _bad(name, value, f"must be > 0 while {switch} is on; use e.g. --{name} {example}, or {off}")
        for name in ("cutout_prob", "random_erasing_prob", "batch_aug_prob"):
            if not 0.0 <= _number(name, getattr(self, name)) <= 1.0:
                _bad(name, getattr(self, name), f"is a probability: use a value in [0, 1], e.g. --{name} 0.5")
        self.random_erasing_scale = _scale(self.random_erasing_scale)
        for name, low in (("cutout_n_holes", 0), ("cutout_length", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                _bad(name, value, f"must be a whole number >= {low}")
            setattr(self, name, int(value))

    @property
    def mixing_enabled(self) -> bool:
        """True when some batches get MixUp or CutMix."""
        return (self.use_mixup or self.use_cutmix) and self.batch_aug_prob > 0

    @property
    def erasing_enabled(self) -> bool:
        return self.use_random_erasing and self.random_erasing_prob > 0

    @property
    def cutout_enabled(self) -> bool:
        return self.use_cutout and self.cutout_prob > 0 and self.cutout_n_holes > 0

    def to_dict(self) -> dict:
        """Plain types only (the scale tuple becomes a list), for JSON/YAML run records."""
        d = asdict(self)
        d["random_erasing_scale"] = list(self.random_erasing_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentationConfig":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise AugmentationConfigError(f"unknown augmentation setting(s) {', '.join(unknown)}; "
                                          f"the settings are: {', '.join(names)}")
        return cls(**d)

    def __repr__(self) -> str:
        parts = []
        if self.mixing_enabled:
            ops = ([f"MixUp(alpha={self.mixup_alpha})"] if self.use_mixup else []) + \
                  ([f"CutMix(alpha={self.cutmix_alpha})"] if self.use_cutmix else [])
            parts.append(f"batch_aug_prob={self.batch_aug_prob}: " + " or ".join(ops))
        if self.erasing_enabled:
            parts.append(f"RandomErasing(p={self.random_erasing_prob}, scale={self.random_erasing_scale})")
        if self.cutout_enabled:
            parts.append(f"Cutout(p={self.cutout_prob}, n_holes={self.cutout_n_holes}, "
                         f"length={self.cutout_length})")
        return "AugmentationConfig(" + (", ".join(parts) or "no augmentation") + ")"


def _bad(name: str, value, what: str):
    raise AugmentationConfigError(f"augmentation setting {name} {what} (got {value!r})")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _bad(name, value, "must be a finite number")
    return float(value)


def _scale(value) -> tuple[float, float]:
    hint = "must be two numbers (min, max) with 0 < min <= max <= 1, e.g. --random_erasing_scale 0.02 0.33"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        _bad("random_erasing_scale", value, hint)
    lo, hi = (_number("random_erasing_scale", v) for v in value)
    if not 0 < lo <= hi <= 1:
        _bad("random_erasing_scale", value, hint)
    return lo, hi
