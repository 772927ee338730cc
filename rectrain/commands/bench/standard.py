"""The standard per-image pipeline, the baseline that benchmarks compare our loader against.

What torchvision's ImageNet reference does per image in the DataLoader workers: full JPEG decode with
PIL, RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3, bilinear), random horizontal flip, ToTensor
(float32) and Normalize; batches of float32 (B, 3, size, size) tensors, NCHW. torchvision's transforms
when it is installed, else an exact PIL/numpy re-implementation (same parameter draw and filter).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from rectrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def standard_transform(size: int = 224):
    """-> (PIL image -> float32 (3, size, size) normalised tensor, the implementation's name)."""
    try:
        import torchvision.transforms as T
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]), "torchvision"
    except Exception:  # not installed, or built for another torch
        return PilStandard(size), "PIL re-implementation of torchvision's"


def rrc_params(w: int, h: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width), from Python's ``random``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        ar = math.exp(random.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return random.randint(0, h - ch), random.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class PilStandard:
    """RandomResizedCrop(size) + flip + ToTensor + Normalize with PIL and numpy (torchvision's steps)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, ch, cw = rrc_params(*img.size)
        img = img.crop((left, top, left + cw, top + ch)).resize((self.size, self.size), Image.BILINEAR)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (x - MEAN) / STD


class StandardDataset(torch.utils.data.Dataset):
    """(path, label) items -> (float32 (3, S, S) tensor, label); the image is decoded in full, as PIL does."""

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), int(self.labels[i])
