"""Batch augmentations on the device: MixUp, CutMix, Random Erasing and Cutout (the seed's API).

Owns ``apply_augmentations`` (the
seed's entry point) and ``BatchAugment`` (the same with generators of its own, seeded per DDP rank, whose
state goes into checkpoints). The matching losses live in ``rectrain.training.losses``.

``apply_augmentations(images, labels, config)`` takes a whole normalised batch (B, C, H, W), H != W
allowed, on its device and in its dtype (fp32/bf16/fp16; channels_last is kept) and returns
``(images, labels_a, labels_b, lam)``; ``lam`` is a Python float, or None when no mixing was applied.

Where the randomness lives, so that nothing waits on the device (no ``.item()``, no ``.cpu()``, no Python
``if`` on a device value):
- per-batch scalars (mix this batch or not, MixUp or CutMix, lam, the CutMix box) are drawn on the CPU
  from a CPU generator: a handful of numbers per batch, no device round trip, and lam comes back as a
  Python float that the loss uses directly;
- per-sample decisions and pixel fills (Random Erasing, Cutout) are drawn on the device, as tensors,
  and applied through (B, 1, H, W) masks built by broadcasting a coordinate grid against per-sample box
  tensors: no Python loop over images.

Pairs are formed by flipping the batch (image i mixes with image B-1-i, as timm does): no random gather,
and ``labels_b = labels.flip(0)``. Random Erasing fills with standard-normal noise (the data's spread on
the normalised scale, the paper's random-value mode); Cutout fills with 0 (the dataset mean on the
normalised scale), as the Cutout paper does (the seed does not say).
References: MixUp (Zhang et al. 2018, arXiv:1710.09412), CutMix (Yun et al. 2019, arXiv:1905.04899),
Random Erasing (Zhong et al. 2020, arXiv:1708.04896), Cutout (DeVries & Taylor 2017, arXiv:1708.04552).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rectrain.training.augment_config import AugmentationConfig, AugmentationConfigError

__all__ = ["AugmentationConfig", "AugmentationConfigError", "apply_augmentations", "BatchAugment",
           "choose_mixing", "mixup", "cutmix_box", "cutmix", "random_erasing", "cutout"]

ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))  # Random Erasing aspect (height/width) range: paper, timm
ERASE_ATTEMPTS = 10  # boxes tried per image until one fits inside it (timm: 10); none fits -> not erased


# ---------------------------------------------------------------------------------------------
# Per-batch choices, drawn on the CPU. ``gen`` is a CPU torch.Generator or None (torch's global CPU RNG).


def choose_mixing(config: AugmentationConfig, gen: torch.Generator | None = None) -> tuple[str | None, float]:
    """-> (op, lam): op is None, "mixup" or "cutmix"; lam ~ Beta(alpha, alpha) of that op (1.0 for None)."""
    if not config.mixing_enabled or _uniform(gen) >= config.batch_aug_prob:
        return None, 1.0
    if config.use_mixup and config.use_cutmix:
        op = "cutmix" if _uniform(gen) < 0.5 else "mixup"
    else:
        op = "cutmix" if config.use_cutmix else "mixup"
    return op, _beta(config.cutmix_alpha if op == "cutmix" else config.mixup_alpha, gen)


def cutmix_box(h: int, w: int, lam: float, gen: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): sides sqrt(1 - lam) * (H, W), so the unclipped area is (1 - lam) * H * W on
    rectangular images too; centre uniform over the pixels; clipped at the borders (as in the paper)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (), generator=gen))
    cx = int(torch.randint(0, w, (), generator=gen))
    y0, x0 = cy - ch // 2, cx - cw // 2
    return max(y0, 0), min(y0 + ch, h), max(x0, 0), min(x0 + cw, w)


def _uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))  # CPU tensor: a host read, no device sync


def _beta(alpha: float, gen: torch.Generator | None) -> float:
    """Beta(alpha, alpha) as G1 / (G1 + G2), Gi ~ Gamma(alpha): torch.distributions.Beta takes no generator.
    float64 so that small alphas (0.2) do not underflow both draws to 0."""
    g = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=gen)
    total = float(g.sum())
    return float(g[0]) / total if total > 0 else 0.5


# ---------------------------------------------------------------------------------------------
# Batch operations. ``x`` is (B, C, H, W); each returns a new tensor in x's dtype, device and memory
# format and never writes into x.


def mixup(x: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * x + (1 - lam) * x.flip(0): a flipped copy, then one lerp kernel into a new tensor (x is not written)."""
    return torch.lerp(x.flip(0), x, lam)


def cutmix(x: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, float]:
    """Paste the partner's pixels (image B-1-i) inside ``box`` -> (images, lam), lam = 1 - box/(H*W) exactly."""
    y0, y1, x0, x1 = box
    out = x.clone(memory_format=torch.preserve_format)
    out[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].flip(0)  # reads x, writes the copy: in-place safe
    h, w = x.shape[-2:]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def random_erasing(x: torch.Tensor, prob: float, scale: tuple[float, float],
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Per image, with probability ``prob``, one box filled with N(0, 1) noise (Zhong et al., timm).

    Area uniform in ``scale`` x H*W, aspect (height/width) log-uniform in [0.3, 1/0.3], position uniform
    with the box inside the image. Up to ERASE_ATTEMPTS boxes are drawn per image, all at once, and the
    first that fits is used. ``gen`` must live on x's device. Cost: ~40 small kernels on (B, 10) tensors,
    one (B, H, W) mask, one noise tensor and one select over the batch.
    """
    b, _, h, w = x.shape
    (lo, hi), (log_lo, log_hi) = scale, ERASE_LOG_RATIO
    u = torch.rand(4, b, ERASE_ATTEMPTS, device=x.device, generator=gen)  # area, aspect, top, left
    root_area = torch.add(lo * h * w, u[0], alpha=(hi - lo) * h * w).sqrt_()  # pixels
    root_ratio = torch.add(log_lo / 2, u[1], alpha=(log_hi - log_lo) / 2).exp_()  # sqrt(height / width)
    bh, bw = (root_area * root_ratio).round_(), (root_area / root_ratio).round_()
    fits = (bh <= h) & (bw <= w) & (bh * bw > 0)  # (B, attempts)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none: not erased)
    bh, bw, ut, ul = torch.stack((bh, bw, u[2], u[3])).gather(2, first.expand(4, b, 1)).squeeze(2)
    top, left = (h + 1 - bh).mul_(ut).floor_(), (w + 1 - bw).mul_(ul).floor_()
    erase = fits.any(dim=1) & (torch.rand(b, device=x.device, generator=gen) < prob)
    mask = _box_mask(h, w, top, top + bh, left, left + bw, erase)
    noise = torch.empty_like(x).normal_(generator=gen)  # x's dtype and memory format
    return torch.where(mask, noise, x)


def cutout(x: torch.Tensor, prob: float, n_holes: int, length: int,
           gen: torch.Generator | None = None) -> torch.Tensor:
    """Per image, with probability ``prob``, ``n_holes`` squares of side ``length`` set to 0 (DeVries & Taylor):
    centre uniform over the pixels, clipped at the borders, holes may overlap. ``gen`` lives on x's device."""
    if n_holes < 1:
        return x
    b, _, h, w = x.shape
    apply = torch.rand(b, device=x.device, generator=gen) < prob
    mask = None
    for _ in range(n_holes):  # a loop over holes, not images
        centre = torch.rand(2, b, device=x.device, generator=gen)
        y0 = centre[0].mul_(h).floor_().sub_(length // 2)
        x0 = centre[1].mul_(w).floor_().sub_(length // 2)
        hole = _box_mask(h, w, y0, y0 + length, x0, x0 + length, apply)  # the grid clips at the borders
        mask = hole if mask is None else mask.logical_or_(hole)
    return torch.where(mask, 0.0, x)


def _box_mask(h: int, w: int, y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor,
              keep: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool, True where keep and y0 <= row < y1 and x0 <= col < x1; arguments are (B,) tensors
    (bounds float). Built from a (B, H, 1) row mask and a (B, 1, W) column mask: one full-size op."""
    rows = torch.arange(h, device=y0.device, dtype=y0.dtype).view(1, h, 1)
    cols = torch.arange(w, device=y0.device, dtype=y0.dtype).view(1, 1, w)
    in_rows = (rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1)) & keep.view(-1, 1, 1)
    in_cols = (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1))
    return (in_rows & in_cols).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# The seed's entry point


def apply_augmentations(images: torch.Tensor, labels: torch.Tensor, config: AugmentationConfig,
                        generator: torch.Generator | None = None, *,
                        device_generator: torch.Generator | None = None):
    """-> (images, labels_a, labels_b, lam): MixUp or CutMix on the batch with probability
    ``config.batch_aug_prob``, then per-image Random Erasing and Cutout. lam is None without mixing.

    ``generator`` (CPU) makes the result reproducible: it draws the per-batch choices and, unless
    ``device_generator`` (on images' device) is given, seeds a device generator for the per-image draws.
    Without either, torch's global CPU and device RNGs are used.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got {tuple(labels.shape)}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (it draws the per-batch choices); "
                         "pass a generator on the images' device as device_generator=")
    if device_generator is None:
        device_generator = _device_generator(generator, images.device)
    op, lam = choose_mixing(config, generator)
    if op == "cutmix":
        images, lam = cutmix(images, cutmix_box(images.shape[-2], images.shape[-1], lam, generator))
    elif op == "mixup":
        images = mixup(images, lam)
    labels_b = labels.flip(0) if op else labels
    if config.erasing_enabled:
        images = random_erasing(images, config.random_erasing_prob, config.random_erasing_scale, device_generator)
    if config.cutout_enabled:
        images = cutout(images, config.cutout_prob, config.cutout_n_holes, config.cutout_length, device_generator)
    return images, labels, labels_b, (lam if op else None)


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The CPU generator itself for CPU tensors; else a device generator seeded from it (None: global RNG).
    Meta tensors (shape-only, used to prove there is no host read) have no generators."""
    if generator is None or device.type == "cpu":
        return generator
    if device.type == "meta":
        return None
    seed = int(torch.randint(0, 1 << 62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


class BatchAugment:
    """``apply_augmentations`` with two generators of its own, seeded from (seed, rank).

    The CPU generator draws the per-batch choices, the device generator the per-image ones. Each DDP rank
    gets different streams (numpy's SeedSequence mixes seed and rank), reproducibly for a fixed seed and
    world size; ``state_dict`` goes into checkpoints so a resumed run draws what an uninterrupted one would.
    With ``device`` None the device generator is made on the first batch's device.
    """

    def __init__(self, config: AugmentationConfig, seed: int = 42, rank: int = 0, device=None):
        if int(seed) < 0 or int(rank) < 0:
            raise ValueError(f"seed and rank must be >= 0 (got seed={seed}, rank={rank})")
        self.config, self.seed, self.rank = config, int(seed), int(rank)
        cpu_seed, self._device_seed = (int(s) >> 1 for s in  # 63-bit seeds
                                       np.random.SeedSequence([self.seed, self.rank]).generate_state(2, np.uint64))
        self.cpu_generator = torch.Generator().manual_seed(cpu_seed)
        self.device_generator: torch.Generator | None = None
        self._pending_device_state = None
        if device is not None:
            self._make_device_generator(torch.device(device))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.device_generator is None:
            self._make_device_generator(images.device)
        elif not _same_device(self.device_generator.device, images.device):
            raise ValueError(f"BatchAugment's generator is on {self.device_generator.device} but the images are "
                             f"on {images.device}; build it with device={str(images.device)!r}")
        return apply_augmentations(images, labels, self.config, self.cpu_generator,
                                   device_generator=self.device_generator)

    def _make_device_generator(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device_generator = torch.Generator(device=device).manual_seed(self._device_seed)
        if self._pending_device_state is not None:
            self.device_generator.set_state(self._pending_device_state)
            self._pending_device_state = None

    def state_dict(self) -> dict:
        """Generator states (CPU uint8 tensors); "device" is None until the device generator exists."""
        dev = self.device_generator
        return {"cpu": self.cpu_generator.get_state(), "device_seed": self._device_seed,
                "device": dev.get_state() if dev is not None else self._pending_device_state}

    def load_state_dict(self, state: dict) -> None:
        self.cpu_generator.set_state(state["cpu"].cpu())
        self._device_seed = int(state["device_seed"])
        dev_state = state["device"].cpu() if state.get("device") is not None else None
        if self.device_generator is None:
            self._pending_device_state = dev_state  # applied when the device generator is made
        elif dev_state is not None:
            self.device_generator.set_state(dev_state)
        else:  # saved before the first batch: the device stream starts afresh from the saved seed
            self.device_generator.manual_seed(self._device_seed)

    def __repr__(self) -> str:
        dev = self.device_generator.device if self.device_generator is not None else "first batch's device"
        return f"BatchAugment({self.config!r}, seed={self.seed}, rank={self.rank}, device={dev})"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
