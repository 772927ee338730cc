"""Training-step throughput of the model alone: a thin wrapper around `rectrain bench model` (same flags).

The ceiling the data pipeline has to feed: rectrain's TrainStep on a batch already on the device, for each
batch shape, precision, memory format, compile mode and SGD implementation asked for; images/s, peak memory
and model FLOP utilisation. `rectrain bench model --help` lists the flags.

    python benchmarks/bench_step.py                                  # GPU: ResNet-50, batch 256, bf16, channels_last
    python benchmarks/bench_step.py --dtypes fp32,bf16,fp16 --compile none,default
    python benchmarks/bench_step.py --device cpu --arch resnet18 --width 16 --batch_size 32 --shapes 64x64
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from rectrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "model", *sys.argv[1:]]))
