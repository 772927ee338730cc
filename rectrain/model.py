"""The ResNet family, written from scratch (no torchvision).

Module names follow torchvision's exactly (``conv1``, ``bn1``, ``layer1.0.downsample.1`` ...),
so a state_dict moves between the two with ``strict=True`` and no key mapping.
This is ResNet v1.5: in the bottleneck the stride sits on the 3x3 conv, as in torchvision
and NVIDIA's reference (about +0.5% top-1 over v1 for a little more compute).

Any input with H, W >= 32, square or rectangular, works: the head uses adaptive average
pooling, so aspect-ratio bucketed batches of different shapes share one model.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from rectrain.archs import ARCH_LAYERS, PUBLISHED_PARAMS

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ARCHS",
    "PUBLISHED_PARAMS",
    "build_model",
    "count_parameters",
    "param_groups",
]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with a 7x7 stem, four stages and an adaptive-pool linear head.

    ``width`` is the stem's channel count (64 in the paper); stage ``i`` uses ``width * 2**i``
    channels before expansion. Tests build tiny models with ``width=8``.
    ``zero_init_residual`` sets the last BatchNorm gamma of every residual branch to 0, so each
    block starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Iterable[int],
        num_classes: int = 1000,
        width: int = 64,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        layers = list(layers)
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {layers}")
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be positive, got {num_classes}, {width}")
        self.in_ch = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self.num_classes = num_classes
        self.reset_parameters(zero_init_residual)

    def _make_stage(self, block, width: int, blocks: int, stride: int) -> nn.Sequential:
        out_ch = width * block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(conv1x1(self.in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        stage = [block(self.in_ch, width, stride, downsample)]
        self.in_ch = out_ch
        stage += [block(out_ch, width) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def reset_parameters(self, zero_init_residual: bool = True) -> None:
        """Kaiming-normal convs (fan_out, relu), BatchNorm 1/0, and optional zero-init residuals.

        The linear head keeps PyTorch's default init, as torchvision does.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w*e, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)  # (B, num_classes)


ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    name: ({"basic": BasicBlock, "bottleneck": Bottleneck}[block], layers) for name, (block, layers) in ARCH_LAYERS.items()
}


def build_model(arch: str = "resnet50", num_classes: int = 1000, width: int = 64,
                zero_init_residual: bool = True) -> ResNet:
    """Build ``arch`` (one of :data:`ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, num_classes=num_classes, width=width,
                  zero_init_residual=zero_init_residual)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_NO_DECAY_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a no-decay group, by module type.

    Normalisation layers (any BatchNorm, GroupNorm, LayerNorm) and every bias get no weight
    decay (Goyal et al. 2017; NVIDIA's and timm's references). Deciding by module type, not
    by name, catches ``downsample.1``. Every trainable parameter lands in exactly one group.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NO_DECAY_MODULES) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
