"""The ResNet family by name: each architecture's residual block and its number of blocks per stage, and the
parameter count published for it. Plain data without torch, so that the command line can offer and check the names
without importing torch (``rectrain.model`` builds them)."""

ARCH_LAYERS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
ARCH_NAMES = tuple(ARCH_LAYERS)

# Parameter counts with 1000 classes, width 64 (He et al. 2016; torchvision's model cards).
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}

# Forward GFLOPs (multiply-adds) of one 224x224 image at width 64 (torchvision's model cards): what the start-up
# estimate of a run's training time scales by (rectrain.training.compilation).
PUBLISHED_GFLOPS = {
    "resnet18": 1.81,
    "resnet34": 3.66,
    "resnet50": 4.09,
    "resnet101": 7.80,
    "resnet152": 11.51,
}


def depth(arch: str) -> int:
    """The layers with weights on the main path: 2 or 3 convolutions per block, the stem and fc (resnet50 -> 50)."""
    block, layers = ARCH_LAYERS[arch]
    return sum(layers) * (2 if block == "basic" else 3) + 2
