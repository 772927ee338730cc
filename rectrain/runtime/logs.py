"""Per-rank logs: every rank writes ``logs/rank{R}.log``; the primary also echoes to stdout, printed above a live
progress bar instead of through it (rank-0 discipline: an explicit ``echo``, never an overridden ``print``)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_rank_logger", "log_to_file", "close_logger"]


def setup_rank_logger(log_dir: str, rank: int, echo: bool) -> logging.Logger:
    """Every rank logs to ``logs/rank{R}.log``; the primary also echoes to stdout."""
    os.makedirs(log_dir, exist_ok=True)
    logger = logging.getLogger(f"rectrain.rank{rank}.{os.path.abspath(log_dir)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fh = _FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s rank" + str(rank) + " %(message)s"))
    logger.addHandler(fh)
    if echo:
        sh = _TqdmHandler()
        sh.addFilter(lambda record: not getattr(record, "file_only", False))
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    return logger


class _FileHandler(logging.FileHandler):
    """A rank's log file. A line that cannot be written (a full disk, the run folder removed) is dropped without the
    traceback logging would print: the run itself reports the disk in one line when its records fail."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


class _TqdmHandler(logging.Handler):
    """Print above a live progress bar instead of through it."""

    def emit(self, record):
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def log_to_file(logger: logging.Logger, message: str) -> None:
    """Into the rank's log file only, not the console: for an error the command line prints itself (once)."""
    logger.error(message, extra={"file_only": True})


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
