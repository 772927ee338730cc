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
