"""Simulate DDP step efficiency of the training sampler on an ImageNet-sized epoch (issues 8 and 18).

    python benchmarks/sim_ddp_efficiency.py                 # table: every policy, R = 8, 64 and 256, both modes
    python benchmarks/sim_ddp_efficiency.py --json          # the same as one JSON object

No images and no GPU: image sizes come from ``rectrain.data.synth.image_size(rng, "imagenet")`` (ImageNet's
ratio mix: mostly 4:3 and 3:4, some square, a tail spread over 1:2..2:1), are mapped to
``make_buckets(target, mode)`` and fed to the real samplers (``DistributedBatchSampler(leftovers=policy)``).

Policies (``--ddp_leftovers``):

- ``round-robin``: the sampler before issue 8 (batch i of the shuffled list -> rank i % R), reproduced here;
- ``mix``: same-shape rounds plus mixed rounds of the leftovers (issue 8's, the default);
- ``drop``: the same-shape rounds only, every bucket's leftover batches left out;
- ``split``: the same-shape rounds plus, per bucket, its leftover batches cut into R equal smaller batches.

Cost model of a step. DDP's all-reduce makes a step as slow as its slowest rank, and ResNet compute is proportional
to pixels, so rank i's batch costs ``H_i * W_i * B_i`` and a step costs ``overhead + max_i(H_i * W_i * B_i)``:
a mixed step costs its largest shape, a split step what its shape and (smaller) size cost. ``overhead`` =
``--step_overhead`` x a full batch at the square target shape (``target^2 * batch``) is what a step costs whatever
its size: the optimizer step, the all-reduce's latency, the kernel launches that a small batch no longer hides.
0 is the pure pixel model (issue 8's); 0.1 is an assumption, not a measurement: measure it on a GPU with
``rectrain bench model --batch_size 4`` against ``--batch_size 256`` (the step time at 4 images over the one at 256).
Communication beyond that fixed cost, and the loader, are not modelled.

Columns: ``same-shape``: the share of steps where every rank trains one shape; ``efficiency``: useful pixels /
(R x the summed step costs), the time-efficiency of a step (100% only with no overhead and every rank busy all
step); ``images``: training images per epoch (``used``: of the data set; the base sampler leaves out a partial batch
per bucket under every policy); ``unseen``: buckets no step trains in the epoch (``drop`` leaves out every bucket
with fewer than R batches, every epoch: those images are never trained); ``time``: the epoch's summed step costs
relative to ``mix``; ``shapes``: distinct (bucket, batch size) pairs, each a warm-up (cuDNN autotuning, or a
torch.compile graph) once per process start.

The warm-up decides between ``split`` and ``mix``: ``split``'s extra shapes cost once what its better steps win
back per epoch. ``break-even`` is the number of epochs after which they have (``-``: never, ``0``: at once), per
warm-up cost per shape in ``--warmup_per_shape`` (seconds; 6 s eager: 77.6 s for 13 ``short_side`` shapes with
their validation shapes, 65.4 s for 9 in ``area`` mode, measured on an H200 in docs/benchmarks.md; 35 s under
``--compile``: 30-40 s per shape measured there), with the epoch's time from the per-GPU speed ``--images_per_sec``
(3,411 ``short_side`` and 4,447 ``area``, the same H200 session, eager; scale both for your GPUs). Figures are means
over ``--epochs`` epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from rectrain.data import synth
from rectrain.data.buckets import make_buckets
from rectrain.data.samplers import AspectRatioBatchSampler, DistributedBatchSampler

IMAGENET_TRAIN = 1_281_167
POLICIES = ("round-robin", "mix", "drop", "split")
# Measured per H200 (eager, bf16, batch 256, 16 workers, end to end): docs/benchmarks.md, GPU session 2026-11-27.
IMAGES_PER_SEC = {"short_side": 3411.0, "area": 4447.0}


def image_sizes(n: int, seed: int) -> np.ndarray:
    """(n, 2) (H, W) of an ImageNet-like training set."""
    rng = np.random.default_rng(seed)
    return np.array([synth.image_size(rng, "imagenet") for _ in range(n)], dtype=np.int64)


def round_robin_steps(base: AspectRatioBatchSampler, r: int, epoch: int) -> list[list[np.ndarray]]:
    """The old dealing: the shuffled list cut to a multiple of R, step j = batches jR .. jR + R - 1."""
    batches = base.batches(epoch)
    batches = batches[:len(batches) - len(batches) % r]
    return [batches[i:i + r] for i in range(0, len(batches), r)]


def policy_steps(policy: str, base: AspectRatioBatchSampler, r: int, epoch: int) -> list[list[np.ndarray]]:
    if policy == "round-robin":
        return round_robin_steps(base, r, epoch)
    return DistributedBatchSampler(base, r, 0, leftovers=policy).rounds(epoch)


def measure(steps: list[list[np.ndarray]], bucket_ids: np.ndarray, pixels: np.ndarray, overhead: float) -> dict:
    """Cost and counts of one epoch's steps; ``pixels`` (K,) is H * W per bucket, ``overhead`` the fixed cost of a
    step in the same unit (pixels x images)."""
    first = np.array([[b[0] for b in step] for step in steps], dtype=np.int64)  # (steps, R)
    sizes = np.array([[len(b) for b in step] for step in steps], dtype=np.int64)
    buckets = bucket_ids[first]  # (steps, R)
    work = pixels[buckets] * sizes  # (steps, R) pixels per rank's batch
    cost = overhead + work.max(axis=1)  # (steps,)
    shapes = np.array([len(set(row)) for row in buckets.tolist()])
    return {"useful": float(work.sum()), "cost": float(cost.sum()),
            "efficiency": float(work.sum() / (work.shape[1] * cost.sum())),
            "steps": len(steps), "mixed_steps": int((shapes > 1).sum()), "images_trained": int(sizes.sum()),
            "unseen_buckets": len(pixels) - len(np.unique(buckets)),
            "batch_shapes": len(set(zip(buckets.ravel().tolist(), sizes.ravel().tolist())))}


def break_even(row: dict, mix: dict, epoch_s: float, per_shape_s: float) -> float:
    """Epochs after which ``row``'s better steps have paid for its extra warm-up against ``mix`` (inf: never)."""
    extra_s = (row["batch_shapes"] - mix["batch_shapes"]) * per_shape_s
    gain_s = epoch_s * (1 - mix["efficiency"] / row["efficiency"])  # per epoch, for the same useful work
    if extra_s <= 0:
        return 0.0 if gain_s >= 0 else math.inf
    return extra_s / gain_s if gain_s > 0 else math.inf


def simulate(sizes: np.ndarray, args) -> list[dict]:
    rows = []
    for mode in args.modes:
        table = make_buckets(args.target_size, mode)
        ids = table.assign(sizes)
        pixels = table.shapes.prod(axis=1)
        base = AspectRatioBatchSampler(ids, args.batch_size, seed=args.seed)
        ips = args.images_per_sec or IMAGES_PER_SEC[mode]
        for r in args.world_sizes:
            steps = {p: [policy_steps(p, base, r, e) for e in range(args.epochs)] for p in POLICIES}
            for overhead in args.step_overhead:
                fixed = overhead * args.target_size ** 2 * args.batch_size
                means = {}
                for policy, epochs in steps.items():
                    measured = [measure(s, ids, pixels, fixed) for s in epochs]
                    means[policy] = {k: float(np.mean([m[k] for m in measured])) for k in measured[0]}
                    means[policy]["batch_shapes"] = max(m["batch_shapes"] for m in measured)
                mix = means["mix"]
                epoch_s = mix["images_trained"] / (r * ips)  # one epoch of mix on R GPUs at the measured speed
                for policy, m in means.items():
                    rows.append({
                        "mode": mode, "world_size": r, "step_overhead": overhead, "policy": policy,
                        "buckets": len(table), "same_shape_share": 1 - m["mixed_steps"] / m["steps"],
                        "efficiency": m["efficiency"], "steps_per_epoch": m["steps"],
                        "mixed_steps_per_epoch": m["mixed_steps"], "images_per_epoch": m["images_trained"],
                        "used_share": m["images_trained"] / len(ids), "unseen_buckets": m["unseen_buckets"],
                        "time_vs_mix": m["cost"] / mix["cost"], "batch_shapes": m["batch_shapes"],
                        "epoch_s_mix": epoch_s,
                        "break_even_epochs": [break_even(m, mix, epoch_s, w) for w in args.warmup_per_shape],
                    })
    return rows


def _epochs(x: float) -> str:
    return "-" if math.isinf(x) else f"{x:,.0f}"


def print_table(rows: list[dict], config: dict) -> None:
    print(f"{config['images']:,} images, batch {config['batch_size']} per rank, target {config['target_size']}, "
          f"{config['epochs']} epoch(s), seed {config['seed']}; step cost = overhead x target^2 x batch + max over "
          f"ranks of H*W*B; break-even at {' / '.join(f'{w:g}' for w in config['warmup_per_shape'])} s of warm-up "
          "per shape")
    head = (f"{'mode':<10} {'R':>3} {'ovh':>4} {'policy':<11} {'same-shape':>10} {'efficiency':>10} {'steps':>5} "
            f"{'mixed':>5} {'images':>9} {'used':>6} {'unseen':>6} {'time':>5} {'shapes':>6} {'break-even':>11}")
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['mode']:<10} {row['world_size']:>3} {row['step_overhead']:>4.2f} {row['policy']:<11} "
              f"{row['same_shape_share']:>9.1%} {row['efficiency']:>9.2%} {row['steps_per_epoch']:>5.0f} "
              f"{row['mixed_steps_per_epoch']:>5.1f} {row['images_per_epoch']:>9,.0f} {row['used_share']:>5.1%} "
              f"{row['unseen_buckets']:>6.0f} {row['time_vs_mix']:>5.3f} {row['batch_shapes']:>6} "
              f"{' / '.join(_epochs(x) for x in row['break_even_epochs']):>11}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="training images (ImageNet-1k: 1,281,167)")
    p.add_argument("--batch_size", type=int, default=256, help="per rank")
    p.add_argument("--target_size", type=int, default=224)
    p.add_argument("--world_sizes", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--modes", nargs="+", default=["short_side", "area"], choices=["short_side", "area"])
    p.add_argument("--step_overhead", type=float, nargs="+", default=[0.0, 0.1],
                   help="fixed cost of a step, as a fraction of a full batch at the square target shape (0: the pixel "
                        "model; 0.1: an assumption, see the docstring)")
    p.add_argument("--warmup_per_shape", type=float, nargs="+", default=[6.0, 35.0],
                   help="seconds of warm-up per batch shape (eager cuDNN autotuning; torch.compile)")
    p.add_argument("--images_per_sec", type=float, default=None,
                   help="training images/s of one GPU (default: the H200's measured 3,411 short_side, 4,447 area)")
    p.add_argument("--epochs", type=int, default=3, help="epochs averaged (the order differs every epoch)")
    p.add_argument("--seed", type=int, default=0, help="image sizes and sampler seed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    sizes = image_sizes(args.images, args.seed)
    config = {k: getattr(args, k) for k in ("images", "batch_size", "target_size", "world_sizes", "modes",
                                           "step_overhead", "warmup_per_shape", "images_per_sec", "epochs", "seed")}
    rows = simulate(sizes, args)
    if args.json:
        clean = [{k: ([None if math.isinf(x) else x for x in v] if k == "break_even_epochs" else v)
                  for k, v in row.items()} for row in rows]
        print(json.dumps({"config": config, "results": clean, "seconds": round(time.perf_counter() - t0, 1)}))
    else:
        print_table(rows, config)


if __name__ == "__main__":
    main()
