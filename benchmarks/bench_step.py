"""Training-step throughput of the model alone (synthetic tensors already on the device).

This is the ceiling the data pipeline has to feed: forward + backward + SGD step of ResNet-50 with
rectrain's step (autocast with an explicit dtype, channels_last, no-decay groups), for square and
rectangular bucket shapes and for each precision. CUDA timings use events around many steps after a
warm-up (cudnn.benchmark on). End-to-end figures from JPEG files come from `rectrain train` itself.

    python benchmarks/bench_step.py                        # GPU: batch 256, 224x224 and 224x288, fp32/bf16/fp16
    python benchmarks/bench_step.py --device cpu --arch resnet18 --width 16 --batch_size 32 --shapes 64x64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rectrain.model import build_model, param_groups  # noqa: E402


def shape(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def bench(arch, width, batch, hw, precision, device, steps, warmup, compile_model=False) -> float:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000, width=width).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, *hw, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - t0
    return batch * steps / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--shapes", default="224x224,224x288", help="comma-separated HxW")
    p.add_argument("--precisions", default=None, help="comma-separated fp32,bf16,fp16 (default: all on GPU, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (bf16)")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precisions = (args.precisions or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32")).split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"machine: {name}, torch {torch.__version__}, {args.arch} width {args.width}, batch {args.batch_size}")
    print(f"{'shape':>9} {'precision':>10} {'images/s':>10}")
    rows = [(s, prec, False) for s in args.shapes.split(",") for prec in precisions]
    if args.compile:
        rows += [(s, "bf16", True) for s in args.shapes.split(",")[:1]]
    for s, prec, comp in rows:
        ips = bench(args.arch, args.width, args.batch_size, shape(s), prec, device, args.steps, args.warmup, comp)
        label = prec + ("+compile" if comp else "")
        print(f"{s:>9} {label:>10} {ips:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
