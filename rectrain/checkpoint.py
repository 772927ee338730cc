"""Checkpoints: atomic writes, loading with reasons, `--resume auto`, and pruning.

A checkpoint is a dict of plain types and tensors (loadable with ``torch.load(weights_only=True)``):
``format_version``, ``model`` (the unwrapped module's state_dict: no ``module.``/``_orig_mod.``
prefixes), ``optimizer``, ``scaler``, ``step``, ``epoch``, ``batch_in_epoch``, ``sampler``,
``rng`` (one entry per rank), ``config``, ``metrics``. Files are written by rank 0 only, to a temporary
file in the same folder, fsynced and moved into place with ``os.replace``: a kill or a full disk during
the write leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from rectrain.errors import UserError

FORMAT_VERSION = 1
EPOCH_PATTERN = re.compile(r"checkpoint_epoch_(\d+)\.pth$")


def epoch_path(ckpt_dir: str, epoch: int) -> str:
    """The seed's name: checkpoint_epoch_{NNN}.pth, epochs counted from 1."""
    return os.path.join(ckpt_dir, f"checkpoint_epoch_{epoch:03d}.pth")


class CheckpointError(UserError):
    pass


def save_atomic(obj: dict, path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is always either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; free disk space or choose "
                              "another --output (the previous checkpoint is intact)") from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint; any failure is a CheckpointError naming the path and the reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({reason}); it may be truncated or not a "
                              "rectrain checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a rectrain checkpoint (no 'model' entry)")
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this rectrain "
                              f"understands ({FORMAT_VERSION}); upgrade rectrain")
    return ckpt


def candidates(ckpt_dir: str) -> list[str]:
    """Checkpoints of a run, newest first by training progress recorded in the name/mtime."""
    files = [p for p in glob.glob(os.path.join(ckpt_dir, "*.pth")) if os.path.basename(p) != "best.pth"]
    return sorted(files, key=lambda p: os.path.getmtime(p), reverse=True)


def find_resumable(ckpt_dir: str, log=print) -> tuple[str, dict] | None:
    """The newest checkpoint of ``ckpt_dir`` that loads; broken ones are reported and skipped."""
    for path in candidates(ckpt_dir):
        try:
            return path, load(path)
        except CheckpointError as e:
            log(f"warning: {e}; trying the previous checkpoint")
    return None


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Keep the newest ``keep`` checkpoint_epoch_*.pth files (keep <= 0: keep all). Returns removed paths."""
    if keep <= 0:
        return []
    epochs = sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(ckpt_dir, "checkpoint_epoch_*.pth"))
                    if (m := EPOCH_PATTERN.search(p)))
    removed = [p for _, p in epochs[:-keep]]
    for p in removed:
        _remove_quietly(p)
    return removed


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def link_or_copy(src: str, dst: str) -> None:
    """Atomically make ``dst`` the same file as ``src``: a hard link (no second write), else a copy."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    _remove_quietly(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        try:
            shutil.copyfile(src, tmp)
        except OSError as e:
            _remove_quietly(tmp)
            raise CheckpointError(f"could not write {dst}: {e.strerror or e}; free disk space") from None
    os.replace(tmp, dst)
