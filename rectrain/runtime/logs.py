"""Per-rank logs: every rank writes ``logs/rank{R}.log``; the primary also echoes to stdout, printed above a live
progress bar instead of through it (rank-0 discipline: an explicit ``echo``, never an overridden ``print``)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_rank_logger", "close_logger"]


def setup_rank_logger(log_dir: str, rank: int, echo: bool) -> logging.Logger:
    """Every rank logs to ``logs/rank{R}.log``; the primary also echoes to stdout."""
    os.makedirs(log_dir, exist_ok=True)
    logger = logging.getLogger(f"rectrain.rank{rank}.{os.path.abspath(log_dir)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fh = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s rank" + str(rank) + " %(message)s"))
    logger.addHandler(fh)
    if echo:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    return logger


class _TqdmHandler(logging.Handler):
    """Print above a live progress bar instead of through it."""

    def emit(self, record):
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
