"""`rectrain model` (and the seed's `python model.py`): a quick check of the architecture.

Builds the model, prints its parameter count, runs a forward and backward pass on square and
rectangular inputs, and reports any mismatch through a non-zero exit status.
"""

from __future__ import annotations

import argparse
import time

from rectrain.archs import ARCH_NAMES, PUBLISHED_PARAMS
from rectrain.errors import UserError


def parse_size(text: str) -> tuple[int, int]:
    """'224x320' -> (224, 320) as (H, W); '224' -> (224, 224)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 32:
        raise UserError(f"bad input size {text!r}: write HxW with both sides >= 32, e.g. 224x320")
    return parts[0], parts[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCH_NAMES), help="architecture (default: resnet50)")
    p.add_argument("--num_classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the test passes (default: 2)")
    p.add_argument("--sizes", default="224x224,224x320,320x224",
                   help="comma-separated HxW input sizes (default: 224x224,224x320,320x224)")
    p.add_argument("--device", default="cpu", help="device to run on (default: cpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rectrain.model import build_model, count_parameters
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.arch, num_classes=args.num_classes).to(device)
    n = count_parameters(model)
    failures = []
    print(f"{args.arch}: {n:,} parameters ({args.num_classes} classes)")
    expected = PUBLISHED_PARAMS.get(args.arch) if args.num_classes == 1000 else None
    if expected is not None and n != expected:
        failures.append(f"parameter count {n:,} != published {expected:,}")

    model.train()
    for h, w in sizes:
        x = torch.randn(args.batch, 3, h, w, device=device)
        y = torch.randint(0, args.num_classes, (args.batch,), device=device)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        dt = time.perf_counter() - t0
        grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        shape_ok = tuple(out.shape) == (args.batch, args.num_classes)
        status = "ok" if shape_ok and grads_ok and torch.isfinite(loss) else "FAIL"
        print(f"  input {tuple(x.shape)} -> output {tuple(out.shape)}  loss {loss.item():.4f}  "
              f"forward+backward {dt * 1000:.0f} ms  [{status}]")
        if not shape_ok:
            failures.append(f"input {h}x{w}: output shape {tuple(out.shape)}, "
                            f"expected {(args.batch, args.num_classes)}")
        if not grads_ok or not torch.isfinite(loss):
            failures.append(f"input {h}x{w}: non-finite loss or missing/non-finite gradients")

    if failures:
        for f in failures:
            print(f"FAIL: {f}")
        return 1
    print("model self-test passed")
    return 0
