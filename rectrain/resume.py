"""Resume: which checkpoint a run continues from, and with which settings.

Decided once, before any process starts (``rectrain.train.main``), so every rank agrees:
- under torchrun's restarts (``--max-restarts``) a restarted job resumes by itself, as ``--resume auto``;
- on resume the checkpoint's settings are the defaults: ``--resume auto`` alone continues the run as it was,
  and every flag given now that changes one of them is listed in the log; the settings of the machine or of
  this invocation (``NOT_INHERITED``: --workers, --nproc, --device, ...) are never taken from the checkpoint;
- ``--resume PATH`` of another run's checkpoint continues into this run's folder only if that folder has no
  history of its own (its checkpoints and metrics would be overwritten otherwise).
What a checkpoint holds and how it is restored is ``rectrain.checkpoint.Checkpointer``'s business.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import fields

from rectrain import checkpoint as ckpt_io
from rectrain.config import TrainConfig
from rectrain.errors import UserError
from rectrain.metrics import RunPaths

# Settings of the machine or of this invocation, not of the run: never taken from a checkpoint on resume.
NOT_INHERITED = {"resume", "device", "nproc", "dist_port", "dist_timeout", "workers", "progress", "print_freq",
                 "max_steps"}


def settle_resume(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, list[str]]:
    """Which checkpoint a run continues from, and with which settings; returns (config, notes to log).

    - Under torchrun's restarts (``--max-restarts``) a restarted job resumes by itself (``--resume auto``).
    - On resume the checkpoint's settings are the defaults: ``--resume auto`` alone continues the run as it was,
      and every flag given now that changes one of them is listed in the log (the machine's settings, such as
      --workers or --nproc, are never taken from the checkpoint).
    - ``--resume PATH`` of another run's checkpoint continues into this run's folder only if that folder has no
      history of its own (its checkpoints and metrics would be overwritten otherwise).
    """
    notes = []
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not cfg.resume and restarts > 0:
        cfg = dataclasses.replace(cfg, resume="auto")
        notes.append(f"note: torchrun restart {restarts}: resuming from the newest checkpoint of this run")
    if not cfg.resume:
        return cfg, notes
    paths = RunPaths.of(cfg.output, cfg.run_name)
    if cfg.resume == "auto":
        found = ckpt_io.find_resumable(paths.ckpt_dir, log=notes.append)
        if found is None:
            notes.append(f"note: --resume auto found no checkpoint in {paths.ckpt_dir}: starting from scratch")
            return dataclasses.replace(cfg, resume=None), notes
        path, ckpt = found
    else:
        if not os.path.isfile(cfg.resume):
            raise UserError(f"--resume {cfg.resume}: no such checkpoint file (use --resume auto for the newest of "
                            "this run)")
        path, ckpt = cfg.resume, ckpt_io.load(cfg.resume)
        _refuse_foreign_resume(path, paths)
    merged, changed = _merge_settings(ckpt.get("config", {}), cfg, given)
    merged = dataclasses.replace(merged, resume=path).validate()
    if changed:
        notes.append("note: resuming with the checkpoint's settings, except (flags given now): " + "; ".join(changed))
    return merged, notes


def _refuse_foreign_resume(path: str, paths: RunPaths) -> None:
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(paths.ckpt_dir):
        return
    history = [p for p in (paths.ckpt_dir, os.path.join(paths.run_dir, "metrics.jsonl")) if os.path.exists(p)
               and (not os.path.isdir(p) or any(f.endswith(".pth") for f in os.listdir(p)))]
    if history:
        raise UserError(f"--resume {path} is another run's checkpoint, and {paths.run_dir} has a history of its own "
                        "that continuing here would overwrite: pass a new --run_name for the continued run "
                        "(nothing was written)")


def _merge_settings(saved: dict, cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, list[str]]:
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known and k not in NOT_INHERITED})
    keep_now = given | NOT_INHERITED
    merged = dataclasses.replace(base, **{k: getattr(cfg, k) for k in keep_now})
    changed = [f"--{k} {getattr(base, k)} -> {getattr(merged, k)}" for k in sorted(given - NOT_INHERITED)
               if k in saved and getattr(base, k) != getattr(merged, k)]
    return merged, changed
