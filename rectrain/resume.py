"""Resume: where a run restarts, with which settings, and how its learning rate continues, decided in one place.

``Resume.plan`` runs once, before any process starts (so every rank agrees), and chooses:
- the checkpoint: ``--resume PATH``, the newest one of this run that loads (``--resume auto``), or none; under
  torchrun's restarts (``--max-restarts``) a restarted job resumes by itself, as ``--resume auto``;
- the settings: on resume the checkpoint's are the defaults, so ``--resume auto`` alone continues the run as it
  was; every flag given now that changes one of them is listed in the log; the settings of the machine or of this
  invocation (``NOT_INHERITED``: --workers, --nproc, --device, ...) are never taken from the checkpoint;
- whether it may continue here at all: ``--resume PATH`` of another run's checkpoint continues into this run's
  folder only if that folder has no history of its own (its checkpoints and metrics would be overwritten).
The planner only peeks at the checkpoint (its tensors memory-mapped, not read).

``Resume.restore`` runs in every rank, which loads the checkpoint once, and returns where training starts (a
``TrainState``: epoch, batch, step) and the learning-rate schedule to follow:
- the same world size, batches per epoch and --accum_steps: exact, from the saved batch, with this rank's RNG and
  augmentation streams (the batches are a pure function of seed and epoch, so ``EpochStream`` simply starts at that
  batch; a checkpoint never stops inside an accumulation: ``rectrain.training.loop``);
- another world size, batch size or --accum_steps: the position is kept in epochs (the step rescaled to the new
  optimizer steps per epoch; a mid-epoch checkpoint restarts its epoch);
- the learning rate: the schedule planned for this run's settings, continued from the rate the checkpoint last
  applied when the settings (--epochs, --lr, the batch count) changed the curve, so the rate never jumps
  (``LRSchedule.continuing``).
What a checkpoint holds and how its parts are read and written is ``rectrain.training.checkpoint``'s business.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from rectrain.config import TrainConfig, check_resume_path
from rectrain.errors import UserError
from rectrain.runtime.metrics import RunPaths
from rectrain.training import checkpoint as ckpt_io
from rectrain.training.checkpoint import Checkpointer
from rectrain.training.loop import TrainState
from rectrain.training.schedule import LRSchedule, optimizer_steps

__all__ = ["NOT_INHERITED", "Resume", "Start"]


@dataclass
class Start:
    """Where a process's training starts: the position, the learning-rate schedule, and the epoch row the checkpoint
    holds (for the metrics files, which may have missed it)."""

    state: TrainState
    schedule: LRSchedule
    row: dict | None = None

# Settings of the machine or of this invocation, not of the run: never taken from a checkpoint on resume (those
# that differ from the checkpoint's are listed in a note, but for the ones that cannot matter: QUIET).
NOT_INHERITED = {"resume", "device", "nproc", "dist_port", "dist_timeout", "workers", "progress", "max_steps",
                 "compile_cache", "shard_cache", "shard_cache_gb"}  # the last two: where this machine keeps remote shards
QUIET = {"resume", "dist_port", "progress"}
LR_FLAGS = {"lr", "lr_per_256"}
FINISHED_LR = 1e-12  # a schedule's last rate at or below this (and the min_lr): the run cannot learn any more


@dataclass
class Resume:
    """A run's start: the checkpoint it continues from (``path``; None: from scratch), the settings it runs with
    (``config``) and the notes to log about both. Pickled to spawned ranks without the loaded checkpoint."""

    config: TrainConfig
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    given: frozenset[str] = frozenset()  # the settings chosen now (flags, config file), not from the checkpoint
    _checkpoint: dict | None = field(default=None, repr=False, compare=False)

    # -- before the processes start ---------------------------------------------------------------
    @classmethod
    def plan(cls, cfg: TrainConfig, given: set[str]) -> "Resume":
        """Decide the checkpoint and the settings (see the module docstring); ``given``: the settings the user chose
        now, on the command line or in a config file."""
        notes = []
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if not cfg.resume and restarts > 0:
            cfg = dataclasses.replace(cfg, resume="auto")
            notes.append(f"note: torchrun restart {restarts}: resuming from the newest checkpoint of this run")
        if not cfg.resume:
            return cls(cfg, None, notes, frozenset(given))
        paths = RunPaths.of(cfg.output, cfg.run_name)
        if cfg.resume == "auto":
            found = ckpt_io.find_resumable(paths.ckpt_dir, log=notes.append, mmap=True)
            if found is None:
                notes.append(f"note: --resume auto found no checkpoint in {paths.ckpt_dir}: starting from scratch")
                return cls(dataclasses.replace(cfg, resume=None), None, notes, frozenset(given))
            path, peek = found
        else:
            check_resume_path(cfg.resume)
            path, peek = cfg.resume, ckpt_io.load(cfg.resume, mmap=True)
            _refuse_foreign_resume(path, paths)
        merged, changed, machine = _merge_settings(peek.get("config", {}), cfg, given)
        merged = dataclasses.replace(merged, resume=path).validate()
        if changed:
            notes.append("note: resuming with the checkpoint's settings, except (flags given now): " + "; ".join(changed))
        if machine:
            notes.append("note: settings of this machine and invocation, not taken from the checkpoint: "
                         + "; ".join(machine))
        return cls(merged, path, notes, frozenset(given))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checkpoint": None}  # each spawned rank loads the file itself

    # -- in every rank ------------------------------------------------------------------------------
    def load(self) -> dict | None:
        """The checkpoint, read at most once in this process (None for a fresh start)."""
        if self.path is not None and self._checkpoint is None:
            self._checkpoint = ckpt_io.load(self.path, check=False)  # verified by plan
        return self._checkpoint

    def restore(self, checkpointer: Checkpointer, planned: LRSchedule, world_size: int, log=print) -> Start:
        """Load the checkpoint into ``checkpointer``'s parts; -> where training starts and the schedule to follow.

        ``planned``: this run's schedule from its settings. A fresh start returns ``TrainState()`` and it as is."""
        ckpt = self.load()
        if ckpt is None:
            return Start(TrainState(), planned)
        self._checkpoint = None  # the parts hold what they need: let the tensors go
        path, spe = self.path, checkpointer.steps_per_epoch
        checkpointer.load_parts(path, ckpt)
        state = TrainState(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                           best_acc1=ckpt.get("best_acc1", -1.0),
                           lr_rebased=tuple(ckpt["lr_rebased"]) if ckpt.get("lr_rebased") else None)
        old_spe = ckpt.get("steps_per_epoch") or spe
        old_accum, accum = (ckpt.get("config") or {}).get("accum_steps", 1), checkpointer.config.get("accum_steps", 1)
        if ckpt.get("world_size") == world_size and old_spe == spe and old_accum == accum:
            checkpointer.load_rank(ckpt, state)
            order = ckpt.get("sampler", {}).get("order_version", 1)
            if state.batch_in_epoch and world_size > 1 and order != ckpt_io.ORDER_VERSION:
                log(f"warning: {path} was written by a rectrain that dealt batches to ranks in another order; "
                    f"the rest of epoch {state.epoch + 1} may repeat some images and miss others (later epochs are "
                    "exact)")
            policy = (ckpt.get("config") or {}).get("ddp_leftovers", "mix")  # older checkpoints: mix, the only one
            if state.batch_in_epoch and world_size > 1 and policy != self.config.ddp_leftovers:
                log(f"warning: {path} was written under --ddp_leftovers {policy}, this run deals batches under "
                    f"{self.config.ddp_leftovers}: the rest of epoch {state.epoch + 1} may repeat some images and miss "
                    "others (later epochs are exact)")
        else:
            _rescale(state, (ckpt.get("world_size"), old_spe, old_accum), (world_size, spe, accum), log)
        schedule = self._continue_lr(ckpt, state, dataclasses.replace(planned, rebased=state.lr_rebased), log)
        log(f"resumed from {path}: epoch {state.epoch + 1}, batch {state.batch_in_epoch}, step {state.step}")
        row = ckpt.get("metrics") or None
        return Start(state, schedule, row if state.batch_in_epoch == 0 else None)

    def _continue_lr(self, ckpt: dict, state: TrainState, schedule: LRSchedule, log) -> LRSchedule:
        """The schedule, rebased where the settings changed it so that it continues from the checkpoint's last rate;
        an extension of a run whose schedule had ended (rate 0) needs the rate to restart from (--lr)."""
        groups = ckpt["optimizer"].get("param_groups") or [{}]
        last_lr = groups[0].get("lr")
        if last_lr is None or state.step >= schedule.total_steps:
            return schedule
        if last_lr <= max(schedule.min_lr, FINISHED_LR) and _schedule_ended(ckpt):
            if not (self.given & LR_FLAGS):
                raise UserError(f"{self.path} finished its learning-rate schedule (rate {last_lr:.3g} at step "
                                f"{state.step}): the {schedule.total_steps - state.step} new steps would train at that "
                                "rate. Give the rate to restart from, e.g. --lr 0.01 (a cosine from it down to "
                                "--min_lr over the new epochs)")
            log(f"note: extending a finished run: a cosine from --lr {schedule.base_lr:.5g} at step {state.step} "
                f"down to --min_lr {schedule.min_lr} by step {schedule.total_steps}")
            state.lr_rebased = (state.step, schedule.base_lr)
            return dataclasses.replace(schedule, rebased=state.lr_rebased)
        continued = schedule.continuing(state.step, last_lr)
        if continued is not schedule:
            log(f"note: the learning-rate schedule changed on resume (--epochs, --lr or the batch count): it "
                f"continues from {last_lr:.5g} at step {state.step} and decays to --min_lr {schedule.min_lr} by step "
                f"{schedule.total_steps}")
            state.lr_rebased = continued.rebased
        return continued


def _schedule_ended(ckpt: dict) -> bool:
    """Whether the run that wrote ``ckpt`` had trained all the steps its own settings planned."""
    cfg, spe = ckpt.get("config") or {}, ckpt.get("steps_per_epoch")
    if not (spe and cfg.get("epochs")):
        return False
    return ckpt["step"] >= cfg["epochs"] * optimizer_steps(spe, cfg.get("accum_steps", 1))


def _rescale(state: TrainState, old: tuple, new: tuple, log) -> None:
    """Another world size, batch size or --accum_steps (``old``, ``new``: (world size, batches per epoch,
    accum_steps)): keep the run's position in the schedule, in epochs.

    The step count is rescaled to the new optimizer steps per epoch, so the learning rate continues from where it
    was and still ends at its minimum. A mid-epoch checkpoint restarts its epoch from the first batch (the old
    dealing of batches to ranks, or into accumulations, cannot be continued)."""
    (old_world, old_spe, old_accum), (new_world, new_spe, new_accum) = old, new
    if state.batch_in_epoch:
        accum = f", --accum_steps {old_accum} -> {new_accum}" if (old_accum, new_accum) != (1, 1) else ""
        log(f"note: checkpoint was written with {old_world} process(es) and {old_spe} batches/epoch; now "
            f"{new_world} and {new_spe}{accum}: epoch {state.epoch + 1} restarts from its first batch")
    finished_epochs = state.step - optimizer_steps(state.batch_in_epoch, old_accum)
    state.step = round(finished_epochs * optimizer_steps(new_spe, new_accum) / optimizer_steps(old_spe, old_accum))
    state.batch_in_epoch = 0


def _refuse_foreign_resume(path: str, paths: RunPaths) -> None:
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(paths.ckpt_dir):
        return
    history = [p for p in (paths.ckpt_dir, os.path.join(paths.run_dir, "metrics.jsonl")) if os.path.exists(p)
               and (not os.path.isdir(p) or any(f.endswith(".pth") for f in os.listdir(p)))]
    if history:
        raise UserError(f"--resume {path} is another run's checkpoint, and {paths.run_dir} has a history of its own "
                        "that continuing here would overwrite: pass a new --run_name for the continued run "
                        "(nothing was written)")


def _merge_settings(saved: dict, cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, list[str], list[str]]:
    """(the merged settings, the run settings given now that differ from the checkpoint's, the machine settings of
    this invocation that differ from the checkpoint's)."""
    base = TrainConfig.from_checkpoint({k: v for k, v in saved.items() if k not in NOT_INHERITED})
    keep_now = given | NOT_INHERITED
    merged = dataclasses.replace(base, **{k: getattr(cfg, k) for k in keep_now})
    changed = [f"--{k} {getattr(base, k)} -> {getattr(merged, k)}" for k in sorted(given - NOT_INHERITED)
               if k in saved and getattr(base, k) != getattr(merged, k)]
    machine = [f"--{k} {getattr(merged, k)} (the checkpoint's run: {saved[k]})" for k in sorted(NOT_INHERITED - QUIET)
               if k in saved and _plain(saved[k]) != _plain(getattr(merged, k))]
    return merged, changed, machine


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
