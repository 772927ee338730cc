"""The run: ``train`` starts every process of a training run, and ``Trainer`` is one process's share of it.

train(cfg) -> ``Resume.plan`` (the checkpoint and the settings, decided once) -> ``preflight`` (user mistakes, before
any process starts) -> launch (one process per GPU, torchrun or SLURM) -> in each process ``Trainer.build``:
``build_data`` (scan, buckets, loaders), ``build_parts`` (model, optimizer, scaler, augmentation, EMA),
``Resume.restore`` (the position and the learning-rate schedule) -> ``Trainer.fit``: the warm-up over every batch
shape, then epochs of ``train_one_epoch`` and validation, a checkpoint and a metrics row after each, and a
mid-epoch checkpoint on SIGTERM/SIGINT.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from rectrain.config import TrainConfig
from rectrain.data.buckets import BucketTable, make_buckets
from rectrain.data.failures import DecodeFailurePolicy
from rectrain.data.gpu_decode import GpuBatchDecoder, decoded, resolve_decode
from rectrain.data.loader import Loaders, LoaderSettings, build_loaders
from rectrain.data.scan import SplitScan, scan_split
from rectrain.data.workers import cap_workers
from rectrain.errors import DataMistake, UserError
from rectrain.model import count_parameters
from rectrain.resume import Resume
from rectrain.runtime.distributed import (
    DistInfo,
    StopFlag,
    all_reduce_sum,
    average_buffers,
    launch,
    on_primary,
    preempted_exit_code,
    resolve_device,
)
from rectrain.runtime.io import write_json_atomic
from rectrain.runtime.logs import close_logger, setup_rank_logger
from rectrain.runtime.metrics import MetricsWriter, RunPaths, closing_lines, write_summary
from rectrain.training.augment import BatchAugment
from rectrain.training.checkpoint import Checkpointer, Stateful, load_initial_weights
from rectrain.training.ema import ModelEma
from rectrain.training.evaluation import evaluate, reduce_eval
from rectrain.training.loop import LoopSettings, TrainState, train_one_epoch
from rectrain.training.parts import OptimSettings, StepParts, build_step_parts, unwrap
from rectrain.training.schedule import LRSchedule, ResolutionSchedule, describe_lr, final_size, peak_lr, validation_size
from rectrain.training.step import DeviceNormalize, TrainStep
from rectrain.training.warmup import compiled_graphs, plan_shapes, warm_up

__all__ = ["train", "preflight", "train_worker", "Trainer", "BucketPlan", "RunData", "RunParts", "plan_buckets",
           "build_data", "build_parts", "weights_digest"]


# -- the whole run --------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, given: set[str] | None = None) -> int:
    """Run a training job; the exit status. ``given``: the settings the user chose (default: those that differ
    from the defaults), which override a resumed checkpoint's."""
    if given is None:
        given = {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != f.default}
    resume = Resume.plan(cfg, given)
    fresh = preflight(resume.config)
    worker = functools.partial(train_worker, resume, fresh)
    cfg = resume.config
    return launch(worker, device=cfg.device, nproc=cfg.nproc, port=cfg.dist_port, timeout_s=cfg.dist_timeout)


def preflight(cfg: TrainConfig) -> bool:
    """Everything a user can get wrong that we can see before starting processes; creates the run folder and
    returns whether it is new (a run that fails in its set-up then removes it again: nothing left behind)."""
    train_dir = os.path.join(cfg.data_dir, "train")
    if not os.path.isdir(cfg.data_dir):
        raise UserError(f"--data_dir {cfg.data_dir} does not exist; point it at a folder holding "
                        "train/<class>/<images> and val/<class>/<images> (try `rectrain synth --out DIR` for a demo set)")
    if not os.path.isdir(train_dir):
        raise UserError(f"--data_dir {cfg.data_dir} has no train/ folder; expected DATA_DIR/train/<class>/<images> "
                        "and DATA_DIR/val/<class>/<images>")
    if cfg.decode == "gpu":  # say so before anything is written
        resolve_decode(cfg.decode, torch.device(resolve_device(cfg.device)))
    if cfg.initial_checkpoint and not os.path.isfile(cfg.initial_checkpoint):
        raise UserError(f"--initial_checkpoint {cfg.initial_checkpoint}: no such file")
    paths = RunPaths.of(cfg.output, cfg.run_name)
    if not cfg.resume and os.path.isdir(paths.ckpt_dir) and any(f.endswith(".pth") for f in os.listdir(paths.ckpt_dir)):
        raise UserError(f"{paths.run_dir} already holds checkpoints: pass --resume auto to continue that run, or "
                        "choose a new --run_name (nothing was overwritten)")
    fresh = not os.path.exists(paths.run_dir)
    try:
        os.makedirs(paths.ckpt_dir, exist_ok=True)
        probe = os.path.join(paths.run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output {cfg.output} ({e.strerror}); choose a writable folder") from None
    return fresh


def train_worker(resume: Resume, fresh: bool, info: DistInfo) -> int:
    """One process of the run: its logger, its ``Trainer``, and the one-line errors for user mistakes."""
    cfg = resume.config
    paths = RunPaths.of(cfg.output, cfg.run_name)
    logger = setup_rank_logger(paths.log_dir, info.rank, echo=info.is_primary)
    for note in resume.notes:
        logger.info(note)
    trainer = None
    try:
        trainer = Trainer.build(cfg, info, paths, logger, resume)
        return trainer.fit()
    except torch.cuda.OutOfMemoryError:
        error = UserError(f"out of GPU memory at --batch_size {cfg.batch_size} (rank {info.rank}): lower --batch_size "
                          f"(e.g. {max(1, cfg.batch_size // 2)}, with --lr halved by the linear-scaling rule) or use "
                          "--rect_mode area; `rectrain check` finds a batch size that fits. Resume with --resume auto")
        logger.error(f"error: {error}")
        raise error from None
    except UserError as e:
        logger.error(f"error: {e}")
        if fresh and isinstance(e, DataMistake) and info.is_primary:
            close_logger(logger)
            shutil.rmtree(paths.run_dir, ignore_errors=True)  # a set-up mistake leaves no empty run folder behind
        raise
    finally:
        if trainer is not None:
            trainer.close()
        close_logger(logger)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- the data -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketPlan:
    """The run's bucket tables: ``buckets`` group the training images (at the final training size); with
    --res_schedule epoch e crops to those buckets scaled to its size (``epoch_shapes[e]``); validation has its own
    table at --val_target_size (default: the final training size)."""

    buckets: BucketTable
    val_buckets: BucketTable
    res_schedule: ResolutionSchedule | None
    epoch_shapes: list[np.ndarray] | None

    def resolution(self, epoch: int) -> int:
        return self.res_schedule.at(epoch) if self.res_schedule else self.buckets.target_size


def plan_buckets(cfg: TrainConfig) -> BucketPlan:
    schedule = ResolutionSchedule.parse(cfg.res_schedule) if cfg.res_schedule else None
    buckets = make_buckets(final_size(cfg.target_size, cfg.res_schedule), cfg.rect_mode, cfg.max_ratio)
    val_buckets = make_buckets(validation_size(cfg.target_size, cfg.res_schedule, cfg.val_target_size),
                               cfg.rect_mode, cfg.max_ratio)
    shapes = [buckets.scaled(schedule.at(e)) for e in range(cfg.epochs)] if schedule else None
    return BucketPlan(buckets, val_buckets, schedule, shapes)


@dataclass
class RunData:
    """What the run reads: its classes, bucket tables and loaders (and the GPU decoder with --decode gpu)."""

    classes: list[str]
    plan: BucketPlan
    loaders: Loaders
    gpu_decoder: GpuBatchDecoder | None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders.train_sampler)

    def on_device(self, batches):
        """--decode gpu: the workers' encoded batches decoded and cropped on the device; else as they are."""
        return decoded(batches, self.gpu_decoder) if self.gpu_decoder is not None else batches

    def close(self) -> None:
        """Stop the DataLoader workers: they ignore SIGTERM, so after an error nothing else would."""
        self.loaders.close()


def build_data(cfg: TrainConfig, info: DistInfo, paths: RunPaths, log) -> RunData:
    """Scan train/ (and val/), check them, plan the buckets, build the loaders."""
    device = torch.device(info.device)
    train = _scan(cfg, info, paths, "train", log)
    val = None
    if os.path.isdir(os.path.join(cfg.data_dir, "val")):
        val = _scan(cfg, info, paths, "val", log, classes=train.index.classes)
    else:
        log(f"note: {cfg.data_dir} has no val/ folder: training without validation")
    for name, s in (("train", train), ("val", val)):
        if s is not None and s.bad:
            _log_unusable(cfg, name, s.bad, log)
    check_training_set(train, cfg.batch_size)
    plan = plan_buckets(cfg)
    if plan.res_schedule is not None:
        log(f"progressive resolution {plan.res_schedule}: " + ", ".join(
            f"{size} px from epoch {next(e for e in range(cfg.epochs) if plan.resolution(e) == size) + 1}"
            for size in plan.res_schedule.sizes(cfg.epochs)) + f"; batch size {cfg.batch_size} throughout")
    workers, note = cap_workers(cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    if note and info.is_primary:
        log(f"note: {note}")
    decode = resolve_decode(cfg.decode, device, workers)
    settings = cfg.slice(LoaderSettings, workers=workers, decode=decode, pin_memory=device.type == "cuda",
                         rank=info.rank, world_size=info.world_size)
    loaders = build_loaders(train, val, plan.buckets, settings, plan.epoch_shapes, plan.val_buckets)
    gpu_decoder = GpuBatchDecoder(device, cpu_decoder=cfg.decoder, log=log) if decode == "gpu" else None
    data = RunData(train.index.classes, plan, loaders, gpu_decoder)
    log(f"data: {len(train.index):,} train / {len(val.index) if val else 0:,} val images, "
        f"{len(data.classes)} classes, {len(plan.buckets)} bucket shapes ({plan.buckets.describe()}), "
        f"{data.steps_per_epoch} batches per epoch per process, {workers} worker{'s' if workers != 1 else ''} per process")
    return data


def _scan(cfg: TrainConfig, info: DistInfo, paths: RunPaths, split: str, log, classes=None) -> SplitScan:
    """Rank 0 scans (and writes the cache) first, telling the others if it failed; they then read the cache."""
    kw = dict(classes=classes, cache_dir=paths.run_dir, workers=None, progress=info.is_primary)
    scan = on_primary(lambda: scan_split(cfg.data_dir, split, **kw), f"scanning {split}/", log)
    return scan if scan is not None else scan_split(cfg.data_dir, split, **kw)


def _log_unusable(cfg: TrainConfig, split: str, bad: list[tuple[str, str]], log, shown: int = 20) -> None:
    log(f"note: {len(bad)} unusable {split} file(s) excluded:")
    for path, reason in bad[:shown]:
        log(f"  {path}: {reason}")
    if len(bad) > shown:
        log(f"  ... and {len(bad) - shown} more: `rectrain scan --data_dir {cfg.data_dir}` lists them all")


def check_training_set(train: SplitScan, batch_size: int) -> None:
    """Data mistakes the scan reveals: an empty class (it would still get an output of the model's head, silently
    never trained) and a batch larger than the whole training set."""
    counts = np.bincount(train.index.labels, minlength=len(train.index.classes))
    empty = [c for c, n in zip(train.index.classes, counts) if n == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataMistake(f"class folder(s) with no usable image in {train.index.split_dir}: {shown}; each would be a "
                          "class of the model that never trains: remove the folder(s) or add images")
    if batch_size > len(train.index):
        raise DataMistake(f"--batch_size {batch_size} is larger than the whole training set ({len(train.index)} usable "
                          f"images): lower --batch_size to at most {len(train.index)}")


# -- the parts ------------------------------------------------------------------------------------------------
@dataclass
class RunParts:
    """What the run trains and what a checkpoint captures besides the position."""

    step: StepParts                  # model, optimizer, scaler, autocast, channels_last
    augment: BatchAugment            # per-rank generators
    failures: DecodeFailurePolicy
    ema: ModelEma | None

    @property
    def model(self) -> torch.nn.Module:
        return self.step.model

    def stateful(self) -> Stateful:
        s = self.step
        return Stateful(s.model, s.optimizer, s.scaler, self.augment, self.failures, self.ema)


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """The seed (the same initial weights on every rank) and cuDNN's algorithm choice."""
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a handful of bucket shapes: autotune each once


def build_parts(cfg: TrainConfig, num_classes: int, info: DistInfo, log) -> RunParts:
    device = torch.device(info.device)
    configure_backends(cfg, device)
    if not cfg.no_amp and device.type != "cuda":
        log("note: mixed precision is used on CUDA only; training in fp32 on the CPU")
    step = build_step_parts(cfg.arch, num_classes, device, width=cfg.width, precision=cfg.precision,
                            channels_last=cfg.channels_last, optim=cfg.slice(OptimSettings))
    augment = BatchAugment(cfg.augmentation(), seed=cfg.seed, rank=info.rank, device=device)
    if cfg.initial_checkpoint:
        load_initial_weights(step.model, cfg.initial_checkpoint, log=log)
    # The EMA starts from the initial weights (or the resumed ones: Resume.restore).
    ema = ModelEma(step.model, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay else None
    log(f"model: {cfg.arch} ({count_parameters(step.model):,} parameters), device {device}, precision "
        f"{'fp32' if step.amp_dtype is None else cfg.amp_dtype}, augmentations {augment.config}")
    return RunParts(step, augment, DecodeFailurePolicy(cfg.max_decode_failures, log=log), ema)


def planned_schedule(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> LRSchedule:
    """The learning rate this run's settings plan (a resume may rebase it: ``Resume.restore``)."""
    peak = peak_lr(cfg.lr, cfg.lr_per_256, cfg.batch_size * world_size)
    return LRSchedule(peak, total_steps=cfg.epochs * steps_per_epoch, warmup_steps=round(cfg.warmup * steps_per_epoch),
                      min_lr=cfg.min_lr)


@dataclass
class Models:
    """``train``: DDP (several processes) and compiled (--compile); ``eval``: compiled, never DDP (ranks validate
    different batch counts). Both share the weights of the plain model, which checkpoints save."""

    train: torch.nn.Module
    eval: torch.nn.Module


def wrap_models(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo, shapes: int) -> Models:
    """``shapes``: the batch shapes of the run, one compiled graph each."""
    train_model = eval_model = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device = torch.device(info.device)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    if cfg.compile or cfg.cuda_graphs:
        from torch import _dynamo
        # One graph per batch shape (training and validation): keep them all instead of recompiling.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, shapes + 8)
        mode = "reduce-overhead" if cfg.cuda_graphs else None  # CUDA graphs: one per batch shape
        train_model = torch.compile(train_model, dynamic=False, mode=mode)
        eval_model = torch.compile(model, dynamic=False, mode=mode)
    return Models(train_model, eval_model)


class RecompileWatch:
    """Graphs torch.compile builds after the warm-up: a batch shape or input layout the warm-up did not foresee
    (each costs a compilation); warned about once."""

    def __init__(self, enabled: bool, log):
        self.enabled, self.log = enabled, log
        self.baseline, self.warned = 0, False

    def start(self) -> None:
        self.baseline = compiled_graphs()

    def check(self) -> None:
        new = compiled_graphs() - self.baseline
        if self.enabled and new > 0 and not self.warned:
            self.warned = True
            self.log(f"warning: torch.compile built {new} new graph(s) after the warm-up: a batch shape or input "
                     "layout that the warm-up did not foresee (each costs a compilation). Please report it with "
                     "the log.")


# -- one process's run ----------------------------------------------------------------------------------------
class Trainer:
    """One process's share of a run: built from its data, parts and start (``build``), then ``fit``."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, paths: RunPaths, logger, data: RunData, parts: RunParts,
                 checkpointer: Checkpointer, state: TrainState, schedule: LRSchedule):
        self.cfg, self.info, self.paths, self.logger = cfg, info, paths, logger
        self.data, self.parts, self.checkpointer, self.state = data, parts, checkpointer, state
        self.device = torch.device(info.device)
        self.is_cuda = self.device.type == "cuda"
        self.log = logger.info  # every rank to its file; the primary also to the console
        self.stop = StopFlag()
        self.normalize = DeviceNormalize(self.device)
        # With a fixed number of batch shapes, a bucket's last smaller validation batch is padded to full size.
        self.val_pad = (cfg.val_batch_size or cfg.batch_size) if (self.is_cuda or cfg.compile or cfg.cuda_graphs) else None
        self.train_shapes, self.val_shapes = self._plan_shapes()
        self.models = wrap_models(parts.model, cfg, info, len(self.train_shapes) + len(self.val_shapes))
        s = parts.step
        self.train_step = TrainStep(self.models.train, s.optimizer, s.scaler, self.normalize, parts.augment,
                                    s.autocast, schedule, cfg.label_smoothing, s.channels_last, ema=parts.ema)
        self.recompiles = RecompileWatch(cfg.compile, self.log)
        self.warmup_s: float | None = None  # measured by fit
        self.logged_resolution: int | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, info: DistInfo, paths: RunPaths, logger, resume: Resume) -> "Trainer":
        log = logger.info
        data = build_data(cfg, info, paths, log)
        try:
            parts = build_parts(cfg, len(data.classes), info, log)
            checkpointer = Checkpointer(paths.ckpt_dir, parts.stateful(), info=info, config=cfg.to_dict(),
                                        classes=data.classes, steps_per_epoch=data.steps_per_epoch,
                                        keep=cfg.keep_checkpoints, log=log)
            planned = planned_schedule(cfg, data.steps_per_epoch, info.world_size)
            state, schedule = resume.restore(checkpointer, planned, info.world_size, log)
            return cls(cfg, info, paths, logger, data, parts, checkpointer, state, schedule)
        except BaseException:
            data.close()
            raise

    # Read by `rectrain bench e2e`.
    steps_per_epoch = property(lambda self: self.data.steps_per_epoch)
    channels_last = property(lambda self: self.parts.step.channels_last)
    augment = property(lambda self: self.parts.augment)

    def _plan_shapes(self):
        """Every batch shape of the run from its start on, for the warm-up (``rectrain.training.warmup``)."""
        loaders, start = self.data.loaders, self.state.epoch
        tables = [loaders.train_set.shapes_at(e) for e in range(start, self.cfg.epochs)]
        val = None if loaders.val is None else ([[i for i, _ in b] for b in loaders.val.batch_sampler],
                                                loaders.val_set.bucket_ids, self.data.plan.val_buckets.shapes)
        return plan_shapes(loaders.train_sampler.global_batches(start), loaders.train_set.bucket_ids, tables, val,
                           self.val_pad)

    def close(self) -> None:
        """Stop the DataLoader workers; call it on every way out of ``fit``. Stopping them can take seconds: an error
        is logged first."""
        self.data.close()

    def fit(self) -> int:
        cfg, state = self.cfg, self.state
        t0 = time.time()
        self.log(describe_lr(cfg.lr, cfg.lr_per_256, cfg.batch_size, self.info.world_size))
        metrics = on_primary(self._open_metrics, "writing config.json and the metrics files", self.log)
        loop = LoopSettings(steps_per_epoch=self.data.steps_per_epoch, print_freq=cfg.print_freq,
                            world_size=self.info.world_size, log=self.log, max_steps=cfg.max_steps,
                            on_interval=metrics.add_interval if metrics is not None else None, rank=self.info.rank)
        self.stop.install()
        try:
            if cfg.max_steps is not None and state.step >= cfg.max_steps:  # e.g. a requeued job that got there
                self.log(f"--max_steps {cfg.max_steps} was already reached (step {state.step}): nothing to train")
                code = 0
            else:
                # One loader iterator for the rest of the run: workers prefetch across epochs, and start decoding
                # the first batches while the warm-up autotunes and compiles.
                batches = self.data.on_device(self.data.loaders.epochs(state.epoch, state.batch_in_epoch, cfg.epochs))
                self.warmup_s = self.warm_up()
                code = self._epochs(batches, loop, metrics)
        finally:
            self.stop.uninstall()
            if metrics is not None:
                metrics.close()
        if code == 0:
            # Every rank logs a digest of its weights: DDP replicas must be bit-identical.
            self.logger.info(f"final weights sha1 {weights_digest(self.parts.model)}")
            if self.info.is_primary:
                self._summary(metrics, time.time() - t0)
        return code

    def warm_up(self) -> float:
        """Run every shape once before the first epoch (cudnn autotuning, compilation); 0 when there is nothing
        to gain (CPU without --compile)."""
        if not (self.is_cuda or self.cfg.compile or self.cfg.cuda_graphs):
            return 0.0
        s = self.parts.step
        seconds = warm_up(self.models.train, self.models.eval, self.train_shapes, self.val_shapes,
                          autocast=s.autocast, channels_last=s.channels_last, device=self.device, log=self.log)
        self.recompiles.start()
        return seconds

    def _epochs(self, batches, loop: LoopSettings, metrics: MetricsWriter | None) -> int:
        """Epochs from the state's position to the end; the exit status (128 + signal when stopped by one)."""
        cfg, state, save, spe = self.cfg, self.state, self.checkpointer.save, self.data.steps_per_epoch
        warmup_s = self.warmup_s  # reported in the first metrics row of this process
        while state.epoch < cfg.epochs:
            epoch, stats = state.epoch, {}
            if state.batch_in_epoch < spe:
                stats, signum = self._train_epoch(epoch, batches, loop)
                if signum:
                    self.log(f"stopping on signal {signum}: saving a checkpoint at epoch {epoch + 1}, batch "
                             f"{state.batch_in_epoch}")
                    save("last", state)
                    return preempted_exit_code(signum)
                if state.batch_in_epoch < spe:  # --max_steps reached mid-epoch
                    self.log(f"--max_steps {cfg.max_steps} reached at step {state.step}")
                    save("last", state)
                    return 0
            self._end_of_epoch()
            row = self._validate_and_row(epoch, stats, warmup_s)
            if row is None:  # a stop signal during validation: resume will validate this epoch again
                self.log(f"stopping on signal {self.stop.signum} during validation of epoch {epoch + 1}: saving a "
                         "checkpoint")
                save("last", state)
                return preempted_exit_code(self.stop.signum)
            warmup_s = None
            state.next_epoch()
            save("epoch", state, row)
            on_primary(lambda: metrics.add({k: v for k, v in row.items() if k != "is_best"}),
                       f"writing the metrics of epoch {epoch + 1}", self.log)
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                break
        return 0

    def _train_epoch(self, epoch: int, batches, loop: LoopSettings) -> tuple[dict, int]:
        plan = self.data.plan
        if plan.res_schedule is not None and plan.resolution(epoch) != self.logged_resolution:
            self.logged_resolution = plan.resolution(epoch)
            self.log(f"epoch {epoch + 1}: training at {self.logged_resolution} px "
                     f"({', '.join(f'{h}x{w}' for h, w in self.data.loaders.train_set.shapes_at(epoch))})")
        this_epoch = itertools.islice(batches, self.data.steps_per_epoch - self.state.batch_in_epoch)
        progress = self._progress(epoch)
        try:
            return train_one_epoch(self.train_step, this_epoch, self.state, self.stop, loop, self.parts.failures,
                                   progress)
        finally:
            if progress is not None:
                progress.close()

    def _end_of_epoch(self) -> None:
        self.recompiles.check()
        if self.data.gpu_decoder is not None:
            self.log(self.data.gpu_decoder.summary())
        average_buffers(self.parts.model)  # identical BatchNorm statistics on every rank

    def _validate_and_row(self, epoch: int, stats: dict, warmup_s: float | None) -> dict | None:
        """The epoch's metrics row, validated when due; None when a stop signal arrived during validation."""
        cfg, state = self.cfg, self.state
        totals = all_reduce_sum(torch.tensor([state.epoch_loss_sum, float(state.epoch_images)], dtype=torch.float64,
                                             device=self.device)).tolist()
        row = {"epoch": epoch + 1, "train_loss": totals[0] / max(totals[1], 1.0),
               "val_loss": None, "val_acc1": None, "val_acc5": None,
               "lr": self.parts.step.optimizer.param_groups[0]["lr"],
               "images_per_sec": stats.get("images_per_sec"), "data_wait_frac": stats.get("data_wait_frac"),
               "epoch_time_s": stats.get("epoch_time_s"), "warmup_s": warmup_s,
               "resolution": self.data.plan.resolution(epoch), "is_best": False}
        due = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        if not due or self.data.loaders.val is None:
            return row
        res = self._validate(epoch, self.models.eval, "")
        if res is None:
            return None
        row.update({k: res[k] for k in ("val_loss", "val_acc1", "val_acc5")})
        if self.parts.ema is not None:  # the averaged weights, validated beside the raw ones
            res_ema = self._validate(epoch, self.parts.ema.module, " (EMA)")
            if res_ema is None:
                return None
            row.update({f"{k}_ema": res_ema[k] for k in ("val_loss", "val_acc1", "val_acc5")})
        row["is_best"] = res["val_acc1"] > state.best_acc1  # best.pth follows the raw weights' top-1
        state.best_acc1 = max(state.best_acc1, res["val_acc1"])
        return row

    def _validate(self, epoch: int, model, label: str) -> dict | None:
        """Top-1/top-5/loss over the whole validation set; None when a stop signal arrived (agreed by all ranks)."""
        t = time.perf_counter()
        s = self.parts.step
        sums = evaluate(model, self.data.on_device(self.data.loaders.validation()), self.normalize, s.autocast,
                        self.stop, s.channels_last, pad_to=self.val_pad)
        if self.stop.should_stop():  # every rank reaches this once, whatever its batch count
            return None
        res = reduce_eval(sums)
        self.log(f"epoch {epoch + 1}: val{label} top-1 {res['val_acc1']:.2f}% top-5 {res['val_acc5']:.2f}% "
                 f"loss {res['val_loss']:.4f} on {res['val_images']:,} images at "
                 f"{self.data.plan.val_buckets.target_size} px ({time.perf_counter() - t:.1f} s)")
        return res

    def _progress(self, epoch: int):
        """A tqdm bar on rank 0 per --progress (auto: only on a terminal, so logs captured by nohup or SLURM
        hold the periodic log lines without carriage-return updates)."""
        mode = self.cfg.progress
        if not self.info.is_primary or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.data.steps_per_epoch, initial=self.state.batch_in_epoch,
                    desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch", dynamic_ncols=True, leave=False)

    def _open_metrics(self) -> MetricsWriter:
        write_json_atomic(os.path.join(self.paths.run_dir, "config.json"), self.cfg.to_dict())
        return MetricsWriter(self.paths.run_dir, resume_epoch=self.state.epoch + 1)

    def _summary(self, metrics: MetricsWriter, total_s: float) -> None:
        run = {"steps": self.state.step, "world_size": self.info.world_size,
               "global_batch": self.cfg.batch_size * self.info.world_size,
               "device": torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"}
        summary = write_summary(self.paths, metrics.rows, total_s, run)
        self.log(closing_lines(self.paths, summary))
