"""Seed entry point: `python train_g4.dn_12xlarge.py --data_dir ... --epochs ... --batch_size ... --lr ...`.

Identical to `rectrain train`; `--help` lists every flag. On a machine with several GPUs it starts one
process per GPU by itself; under torchrun or SLURM srun it reads their environment instead.
"""

import sys

from rectrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
