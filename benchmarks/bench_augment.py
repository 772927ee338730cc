"""Batch augmentation cost against a full training step on the same batch (issue 4, item 5).

    python benchmarks/bench_augment.py                 # GPU if present: ResNet-50, batch 256, 224x224, bf16
    python benchmarks/bench_augment.py --device cpu    # ResNet-18 at width 16, batch 32, 64x64, fp32
    python benchmarks/bench_augment.py --shape 192 256 --batch_size 128

A training step is forward + backward + SGD step (momentum, as in training) with ``augmented_loss``; on
CUDA under bf16 autocast with model and batch in channels_last, cudnn.benchmark on. The augmentation is
timed alone (``BatchAugment`` on a normalised batch, per-batch draws on the CPU, per-image ones on the
device) for several settings, and also inside the step ("step + aug": the seed's defaults), where its
kernel launches overlap the GPU's queue as in real training. CUDA times come from CUDA events; each row
is the median over --iters iterations after --warmup. Goal (issue 4): under 2% of step time on the GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from rectrain.model import build_model  # noqa: E402
from rectrain.training.augment import AugmentationConfig, BatchAugment  # noqa: E402
from rectrain.training.losses import augmented_loss  # noqa: E402

SETTINGS = {  # name -> AugmentationConfig overrides
    "seed defaults (mix p=0.5, erasing p=0.25)": {},
    "MixUp on every batch": dict(use_cutmix=False, batch_aug_prob=1.0, use_random_erasing=False),
    "CutMix on every batch": dict(use_mixup=False, batch_aug_prob=1.0, use_random_erasing=False),
    "Random Erasing on every image": dict(batch_aug_prob=0.0, random_erasing_prob=1.0),
    "Cutout on every image (1 hole, 16 px)": dict(batch_aug_prob=0.0, use_random_erasing=False, use_cutout=True,
                                                  cutout_prob=1.0, cutout_length=16),
    "all on (mix every batch, erasing, cutout)": dict(batch_aug_prob=1.0, use_cutout=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--arch", default=None, help="model (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--width", type=int, default=None, help="base width (default: 64 on GPU, 16 on CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="batch image shape (default: 224 224 on GPU, 64 64 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per row (default: 30 GPU, 10 CPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations before each row")
    return p.parse_args()


def timer(device: torch.device, fn, iters: int, warmup: int) -> float:
    """Median milliseconds of one call of ``fn``: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_step(model, opt, augment, images, labels, amp_dtype):
    """One training step on the same batch; ``augment`` None skips the augmentation."""
    def step():
        x, a, b, lam = augment(images, labels) if augment is not None else (images, labels, labels, None)
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        loss = augmented_loss(out, a, b, lam, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    args = parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    arch = args.arch or ("resnet50" if use_cuda else "resnet18")
    width = args.width or (64 if use_cuda else 16)
    batch = args.batch_size or (256 if use_cuda else 32)
    h, w = args.shape or ((224, 224) if use_cuda else (64, 64))
    iters = args.iters or (30 if use_cuda else 10)
    amp_dtype = torch.bfloat16 if use_cuda else None
    fmt = torch.channels_last if use_cuda else torch.contiguous_format
    torch.backends.cudnn.benchmark = True

    machine = torch.cuda.get_device_name(device) if use_cuda else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; python {platform.python_version()}, torch {torch.__version__}")
    print(f"model {arch} (width {width}), batch {batch} x 3 x {h} x {w}, "
          f"{'bf16 autocast, channels_last' if use_cuda else 'fp32'}, median of {iters} after {args.warmup} warm-up")

    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000, width=width).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=fmt)  # normalised, fp32
    labels = torch.randint(0, 1000, (batch,), device=device)

    step_ms = timer(device, make_step(model, opt, None, images, labels, amp_dtype), iters, args.warmup)
    default_aug = BatchAugment(AugmentationConfig(), seed=0, device=device)
    step_aug_ms = timer(device, make_step(model, opt, default_aug, images, labels, amp_dtype), iters, args.warmup)

    print(f"\n{'':<54} {'ms':>9} {'% of step':>10}")
    print(f"{'training step, no augmentation':<54} {step_ms:>9.3f} {100.0:>9.1f}%")
    print(f"{'training step + aug (seed defaults)':<54} {step_aug_ms:>9.3f} {100 * step_aug_ms / step_ms:>9.1f}%")
    aug_iters = iters * 4  # the augmentation is cheap: more iterations for a stable median
    for name, overrides in SETTINGS.items():
        aug = BatchAugment(AugmentationConfig(**overrides), seed=0, device=device)
        ms = timer(device, lambda: aug(images, labels), aug_iters, args.warmup)
        print(f"{'aug alone: ' + name:<54} {ms:>9.3f} {100 * ms / step_ms:>9.2f}%")


if __name__ == "__main__":
    main()
