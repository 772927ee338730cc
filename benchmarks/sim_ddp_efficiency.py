"""Simulate DDP step efficiency of the training sampler on an ImageNet-sized epoch (issue 8).

    python benchmarks/sim_ddp_efficiency.py                 # table: old vs new, R = 8 and 64, both modes
    python benchmarks/sim_ddp_efficiency.py --json          # the same as one JSON object

No images and no GPU: image sizes come from ``rectrain.data.synth.image_size(rng, "imagenet")`` (ImageNet's
ratio mix: mostly 4:3 and 3:4, some square, a tail spread over 1:2..2:1), are mapped to
``make_buckets(target, mode)`` and fed to the real samplers. DDP's all-reduce makes a step as slow as
its slowest rank, so a step costs the max over ranks of its batch's pixels (H * W * B, ResNet compute
being proportional to pixels); efficiency = useful pixels / (R * sum of step maxima). The model ignores
communication and fixed per-step costs, which only dilute the differences. Policies:

- ``round-robin``: the sampler before issue 8 (batch i of the shuffled list -> rank i % R), reproduced here;
- ``rounds``: today's ``DistributedBatchSampler``, same-shape rounds plus mixed rounds of the leftovers;
- ``rounds-drop``: the alternative leftover policy, the same rounds without the mixed ones.

``dropped`` counts training images in no dealt batch per epoch (the base sampler's partial batches
included); ``time`` is the sum of step maxima relative to round-robin. Figures are means over epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from rectrain.data import synth
from rectrain.data.buckets import make_buckets
from rectrain.data.samplers import AspectRatioBatchSampler, DistributedBatchSampler

IMAGENET_TRAIN = 1_281_167
POLICIES = ("round-robin", "rounds", "rounds-drop")


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
    rounds = DistributedBatchSampler(base, r, 0).rounds(epoch)
    if policy == "rounds-drop":
        rounds = [step for step in rounds if len({int(base.bucket_ids[b[0]]) for b in step}) == 1]
    return rounds


def measure(steps: list[list[np.ndarray]], bucket_ids: np.ndarray, pixels: np.ndarray) -> dict:
    """Efficiency and counts of one epoch's steps; ``pixels`` (K,) is H * W per bucket."""
    first = np.array([[b[0] for b in step] for step in steps], dtype=np.int64)  # (steps, R)
    sizes = np.array([[len(b) for b in step] for step in steps], dtype=np.int64)
    cost = pixels[bucket_ids[first]] * sizes  # (steps, R) pixels per rank's batch
    shapes = np.array([len(set(row)) for row in bucket_ids[first].tolist()])
    return {"useful": int(cost.sum()), "step_max_sum": int(cost.max(axis=1).sum()),
            "efficiency": float(cost.sum() / (cost.shape[1] * cost.max(axis=1).sum())),
            "steps": len(steps), "mixed_steps": int((shapes > 1).sum()), "images_trained": int(sizes.sum())}


def simulate(sizes: np.ndarray, args) -> list[dict]:
    rows = []
    for mode in args.modes:
        table = make_buckets(args.target_size, mode)
        ids = table.assign(sizes)
        pixels = table.shapes.prod(axis=1)
        base = AspectRatioBatchSampler(ids, args.batch_size, seed=args.seed)
        for r in args.world_sizes:
            per_policy = {p: [measure(policy_steps(p, base, r, e), ids, pixels) for e in range(args.epochs)]
                          for p in POLICIES}
            old_time = np.mean([m["step_max_sum"] for m in per_policy["round-robin"]])
            for policy, epochs in per_policy.items():
                rows.append({
                    "mode": mode, "world_size": r, "policy": policy, "buckets": len(table),
                    "efficiency": float(np.mean([m["efficiency"] for m in epochs])),
                    "time_vs_round_robin": float(np.mean([m["step_max_sum"] for m in epochs]) / old_time),
                    "steps_per_epoch": epochs[0]["steps"],
                    "mixed_steps_per_epoch": float(np.mean([m["mixed_steps"] for m in epochs])),
                    "images_dropped_per_epoch": float(np.mean([len(ids) - m["images_trained"] for m in epochs])),
                })
    return rows


def print_table(rows: list[dict], config: dict) -> None:
    print(f"{config['images']:,} images, batch {config['batch_size']} per rank, target {config['target_size']}, "
          f"{config['epochs']} epoch(s), seed {config['seed']}; step cost = max over ranks of H*W*B")
    head = f"{'mode':<11} {'R':>3} {'buckets':>7} {'policy':<12} {'efficiency':>10} {'time':>6} " \
           f"{'steps':>6} {'mixed':>6} {'dropped':>9} {'dropped %':>9}"
    print(head)
    print("-" * len(head))
    for row in rows:
        dropped = row["images_dropped_per_epoch"]
        print(f"{row['mode']:<11} {row['world_size']:>3} {row['buckets']:>7} {row['policy']:<12} "
              f"{row['efficiency']:>9.1%} {row['time_vs_round_robin']:>6.3f} {row['steps_per_epoch']:>6} "
              f"{row['mixed_steps_per_epoch']:>6.1f} {dropped:>9,.0f} {dropped / config['images']:>9.2%}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="training images (ImageNet-1k: 1,281,167)")
    p.add_argument("--batch_size", type=int, default=256, help="per rank")
    p.add_argument("--target_size", type=int, default=224)
    p.add_argument("--world_sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--modes", nargs="+", default=["short_side", "area"], choices=["short_side", "area"])
    p.add_argument("--epochs", type=int, default=3, help="epochs averaged (the order differs every epoch)")
    p.add_argument("--seed", type=int, default=0, help="image sizes and sampler seed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    sizes = image_sizes(args.images, args.seed)
    config = {k: getattr(args, k) for k in ("images", "batch_size", "target_size", "world_sizes", "modes",
                                           "epochs", "seed")}
    rows = simulate(sizes, args)
    if args.json:
        print(json.dumps({"config": config, "results": rows, "seconds": round(time.perf_counter() - t0, 1)}))
    else:
        print_table(rows, config)


if __name__ == "__main__":
    main()
