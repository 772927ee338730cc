"""rectrain: fast ResNet training on image folders with aspect-ratio bucketed rectangular batches."""

__version__ = "0.1.0"
