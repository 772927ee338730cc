"""Seed entry point: `python model.py` tests the model architecture.

Prints the ResNet-50 parameter count and runs forward and backward passes on square and
rectangular inputs. Same as `rectrain model`; pass `--help` for options.
"""

import sys

from rectrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["model", *sys.argv[1:]]))
