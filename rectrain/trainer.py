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
import traceback
from dataclasses import dataclass, fields

import numpy as np
import torch

from rectrain.config import TrainConfig, check_data_dir, check_resume_path
from rectrain.data.buckets import BucketTable, make_buckets
from rectrain.data.failures import DecodeFailurePolicy, stand_in_warning
from rectrain.data.gpu_decode import GpuBatchDecoder, decoded, resolve_decode
from rectrain.data.index import name_some
from rectrain.data.loader import Loaders, LoaderSettings, build_loaders
from rectrain.data.scan import SplitScan, data_notes
from rectrain.data.source import shared_scan
from rectrain.data.shards import split_exists
from rectrain.data.workers import cap_workers
from rectrain.errors import DataMistake, PeerTimeout, UserError
from rectrain.model import count_parameters
from rectrain.resume import Resume, Start
from rectrain.runtime.distributed import (DistInfo, StopFlag, all_reduce_sum, average_buffers, broadcast_object,
                                          is_collective_timeout, launch, launch_mode, on_primary, preempted_exit_code,
                                          resolve_device)
from rectrain.runtime.io import write_json_atomic
from rectrain.runtime.lock import RunLock
from rectrain.runtime.logs import close_logger, log_to_file, setup_rank_logger
from rectrain.runtime.metrics import MetricsWriter, RunPaths, closing_lines, write_summary
from rectrain.runtime.trackers import check_installed, open_trackers
from rectrain.training import sync_bn
from rectrain.training.augment import BatchAugment
from rectrain.training.checkpoint import CheckpointError, Checkpointer, Stateful, load_initial_weights
from rectrain.training.compilation import (CompileDecision, SpatialDynamic, cached_graphs, compile_cache_dir,
                                           decide_compile, estimate_train_s, estimate_warmup, graph_labels,
                                           graph_signature, keep_ddp_overlap, record_graphs, specialised_note,
                                           use_compile_cache)
from rectrain.training.ema import ModelEma
from rectrain.training.evaluation import evaluate, format_top5, reduce_eval
from rectrain.training.loop import LoopSettings, train_one_epoch
from rectrain.training.parts import OptimSettings, StepParts, build_step_parts, unwrap
from rectrain.training.schedule import (LRSchedule, ResolutionSchedule, describe_lr, final_size, optimizer_steps,
                                       peak_lr, validation_size)
from rectrain.training.step import DeviceNormalize, TrainStep
from rectrain.training.warmup import compiled_graphs, plan_shapes, warm_up

__all__ = ["train", "check_inputs", "prepare_run_folder", "preflight", "train_worker", "Trainer", "BucketPlan", "RunData", "RunParts", "plan_buckets",
           "build_data", "build_parts", "weights_digest"]


# -- the whole run --------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, given: set[str] | None = None) -> int:
    """Run a training job; the exit status. ``given``: the settings the user chose (default: those that differ
    from the defaults), which override a resumed checkpoint's."""
    if given is None:
        given = {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != f.default}
    check_inputs(cfg)
    owner = owns_the_run()
    paths = RunPaths.of(cfg.output, cfg.run_name)
    created = first_missing(paths.run_dir) if owner else None  # removed again if the set-up fails
    lock = RunLock(paths.run_dir, cfg.run_name)
    with lock:
        try:
            notes = [lock.acquire()] if owner else []
            resume = Resume.plan(cfg, given)
            cfg = resume.config
            if RunPaths.of(cfg.output, cfg.run_name).run_dir != paths.run_dir and owner:
                lock.release()  # the checkpoint's settings moved the run to its own folder: hold that one instead
                paths = RunPaths.of(cfg.output, cfg.run_name)
                created = _remove_created(created) or first_missing(paths.run_dir)
                lock = RunLock(paths.run_dir, cfg.run_name)
                notes.append(lock.acquire())
            resume.notes[:0] = [n for n in notes if n]
            check_inputs(cfg)
            prepare_run_folder(cfg)
        except UserError:
            lock.release()
            _remove_created(created)
            raise
        worker = functools.partial(train_worker, resume, created)
        try:
            return launch(worker, device=cfg.device, nproc=cfg.nproc, port=cfg.dist_port, timeout_s=cfg.dist_timeout)
        finally:
            lock.release()


def first_missing(path: str) -> str | None:
    """The topmost folder of ``path`` that does not exist yet (None when ``path`` exists): what a run creates."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_created(created: str | None) -> None:
    if created:
        shutil.rmtree(created, ignore_errors=True)


def owns_the_run() -> bool:
    """Whether this process holds the run folder's lock: the launcher of spawned ranks, or global rank 0 when
    torchrun or srun started every rank."""
    mode = launch_mode()
    if mode == "torchrun":
        return os.environ.get("RANK") == "0"
    if mode == "slurm":
        return os.environ.get("SLURM_PROCID") == "0"
    return True


def check_inputs(cfg: TrainConfig) -> None:
    """The mistakes a user can make that we can see before anything is written or any process starts."""
    check_data_dir(cfg.data_dir)
    check_resume_path(cfg.resume)
    if cfg.decode == "gpu":
        resolve_decode(cfg.decode, torch.device(resolve_device(cfg.device)))
    if cfg.initial_checkpoint and not os.path.isfile(cfg.initial_checkpoint):
        raise UserError(f"--initial_checkpoint {cfg.initial_checkpoint}: no such file")
    if cfg.cuda_graphs:
        refuse_cuda_graphs_under_ddp(planned_processes(cfg))
    check_installed(cfg.log_to)


def planned_processes(cfg: TrainConfig) -> int:
    """The processes the run will have, before any starts: torchrun's or SLURM's, else --nproc, else (as ``launch``)
    one per visible GPU for --device auto/cuda and one otherwise."""
    mode = launch_mode()
    if mode == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if mode == "slurm":
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
    if cfg.nproc is not None:
        return cfg.nproc
    return torch.cuda.device_count() if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else 1


def refuse_cuda_graphs_under_ddp(processes: int) -> None:
    """--cuda_graphs with several processes: BatchNorm's running statistics are inputs the compiled graph mutates,
    and under DDP torch.compile then skips CUDA graphs in DDP's graph pieces, a large slowdown (pytorch#139207)."""
    if processes > 1:
        raise UserError(f"--cuda_graphs cannot train with {processes} processes (DDP): capturing BatchNorm's mutated "
                        "running statistics in CUDA graphs under DDP is slow or unsafe (pytorch#139207); drop "
                        "--cuda_graphs (the step is still compiled with --compile) or train in one process (--nproc 1)")


def prepare_run_folder(cfg: TrainConfig) -> None:
    """The run folder: refused when it holds another run's checkpoints (without --resume), created and proven
    writable otherwise."""
    paths = RunPaths.of(cfg.output, cfg.run_name)
    if not cfg.resume and os.path.isdir(paths.ckpt_dir) and any(f.endswith(".pth") for f in os.listdir(paths.ckpt_dir)):
        raise UserError(f"{paths.run_dir} already holds checkpoints: pass --resume auto to continue that run, or "
                        "choose a new --run_name (nothing was overwritten)")
    try:
        os.makedirs(paths.ckpt_dir, exist_ok=True)
        probe = os.path.join(paths.run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output {cfg.output} ({e.strerror}); choose a writable folder") from None


def preflight(cfg: TrainConfig) -> None:
    """Everything ``train`` checks and prepares before it starts processes (for callers that run a Trainer
    themselves, e.g. `rectrain bench e2e`)."""
    check_inputs(cfg)
    prepare_run_folder(cfg)


def train_worker(resume: Resume, created: str | None, info: DistInfo) -> int:
    """One process of the run: its logger, its ``Trainer``, and the one-line errors for user mistakes (printed once,
    by the command line; the log file keeps them too). ``created``: the folder this run created (its run folder, or
    the --output above it), removed again when the run fails in its set-up (bad data, a checkpoint that does not
    fit): a mistake leaves nothing behind."""
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
        log_to_file(logger, f"error: {error}")
        raise error from None
    except UserError as e:
        log_to_file(logger, f"error: {e}")
        # A mistake in the set-up (the data's layout, a checkpoint that does not fit this run): nothing left behind.
        # Other failures (a storage error while scanning, ...) keep the folder with the logs that say what happened.
        if trainer is None and info.is_primary and isinstance(e, (DataMistake, CheckpointError)):
            close_logger(logger)
            _remove_created(created)
        raise
    except Exception as e:  # our bug: its traceback goes to the rank's log as well as to stderr
        log_to_file(logger, f"error: the run crashed:\n{traceback.format_exc()}")
        if is_collective_timeout(e):
            raise PeerTimeout(f"rank {info.rank} waited {cfg.dist_timeout:g} s (--dist_timeout) for the other ranks in "
                              "a collective: one of them is stopped, stuck or gone (its log, or the launcher's line "
                              "above, names it); after fixing it, --resume auto") from None
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
    # One table per epoch up to E2 (the schedule's last change); later epochs use the last table (BucketDataset).
    shapes = [buckets.scaled(schedule.at(e)) for e in range(min(cfg.epochs, schedule.end_epoch + 1))] if schedule \
        else None
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
    if split_exists(cfg.data_dir, "val"):
        val = _scan(cfg, info, paths, "val", log, classes=train.index.classes)
    else:
        log(f"note: {cfg.data_dir} has no val/ folder (or val shards): training without validation")
    for name, s in (("train", train), ("val", val)):
        if s is not None and s.bad:
            _log_unusable(cfg, name, s.bad, log)
    check_training_set(train, cfg.batch_size)
    if info.is_primary:
        for note in data_notes(train, val):
            log(note)
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
    loaders = build_loaders(train, val, plan.buckets, settings, plan.epoch_shapes, plan.val_buckets, log=log)
    windows = getattr(loaders.train_sampler, "windows", None)
    if windows is not None and info.is_primary:
        cache = train.index.members.cache
        log(f"note: remote shards: their {train.index.members.shard_bytes.sum() / 1e9:.3g} GB do not fit the "
            f"{cache.max_bytes / 1e9:g} GB --shard_cache_gb, so each epoch reads them in {len(windows)} windows "
            "of shards, each half the cache, in a new order; an image shares batches only with its own window's "
            f"(cache: {cache.folder})")
    gpu_decoder = GpuBatchDecoder(device, cpu_decoder=cfg.decoder, log=log) if decode == "gpu" else None
    data = RunData(train.index.classes, plan, loaders, gpu_decoder)
    log(f"data: {len(train.index):,} train / {len(val.index) if val else 0:,} val images, "
        f"{len(data.classes)} classes, {len(plan.buckets)} bucket shapes ({plan.buckets.describe()}), "
        f"{data.steps_per_epoch} batches per epoch per process, {workers} worker{'s' if workers != 1 else ''} per process")
    if info.world_size > 1 and info.is_primary:
        log(loaders.train_sampler.describe(0))
    return data


def _scan(cfg: TrainConfig, info: DistInfo, paths: RunPaths, split: str, log, classes=None) -> SplitScan:
    """The split's scan on every rank: rank 0's, shared (``rectrain.data.source.shared_scan``); the run folder keeps
    the cache where the data's own folder is not writable."""
    return shared_scan(cfg.data_dir, split, classes, is_primary=info.is_primary, log=log, cache_dir=paths.run_dir,
                       shard_cache=shard_cache_of(cfg))


def shard_cache_of(cfg: TrainConfig):
    """The local cache of remote shards (--shard_cache, --shard_cache_gb), or None when the data is local."""
    from rectrain.data.shards import is_remote
    if not is_remote(cfg.data_dir):
        return None
    from rectrain.data.shard_cache import ShardCache
    return ShardCache(cfg.shard_cache, cfg.shard_cache_gb)


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
        raise DataMistake(f"class folder(s) with no usable image in {train.index.split_dir}: {name_some(empty)}; each "
                          "would be a class of the model that never trains: remove the folder(s) or add images")
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
    if cfg.sync_bn:
        use_sync_bn(step.model, info, log)
    augment = BatchAugment(cfg.augmentation(), seed=cfg.seed, rank=info.rank, device=device)
    if cfg.initial_checkpoint:
        load_initial_weights(step.model, cfg.initial_checkpoint, log=log)
    # The EMA starts from the initial weights (or the resumed ones: Resume.restore).
    ema = ModelEma(step.model, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay else None
    log(f"model: {cfg.arch} ({count_parameters(step.model):,} parameters), device {device}, precision "
        f"{'fp32' if step.amp_dtype is None else cfg.amp_dtype}, augmentations {augment.config}")
    return RunParts(step, augment, DecodeFailurePolicy(cfg.max_decode_failures, log=log), ema)


def use_sync_bn(model: torch.nn.Module, info: DistInfo, log) -> None:
    """--sync_bn: every BatchNorm of ``model`` synchronised over the ranks (``rectrain.training.sync_bn``), in place,
    before DDP wraps it. The new layers take over the same parameter and buffer tensors (the optimizer built before
    keeps them) under the same names, so a checkpoint's state dict is a BatchNorm model's: `rectrain eval`/`export`
    and runs without --sync_bn load it as it is. With one process there is nothing to synchronise."""
    if not info.distributed:
        log("note: --sync_bn has no effect with one process: its BatchNorm already sees the whole batch")
        return
    converted = sync_bn.convert(model, torch.device(info.device))
    assert converted is model  # the root is not a BatchNorm: its children were replaced in place
    how = "torch's CUDA kernels" if torch.device(info.device).type == "cuda" else "all-reduces over gloo (slow)"
    log(f"SyncBatchNorm: BatchNorm statistics over the global batch of {info.world_size} processes ({how})")


def describe_accumulation(batches: int, accum_steps: int) -> str:
    """The start-up line of --accum_steps: optimizer steps per epoch, and the short last accumulation if any."""
    if accum_steps > batches:
        return (f"gradient accumulation: an epoch has {batches} batches, fewer than --accum_steps {accum_steps}: one "
                f"optimizer step of {batches} batches per epoch")
    steps, rest = optimizer_steps(batches, accum_steps), batches % accum_steps
    last = f" (the last of {rest} batch{'es' if rest > 1 else ''})" if rest else ""
    return (f"gradient accumulation: {accum_steps} batches per optimizer step, {steps} step{'s' if steps > 1 else ''} "
            f"per epoch{last}")


def planned_schedule(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> LRSchedule:
    """The learning rate this run's settings plan (a resume may rebase it: ``Resume.restore``), over optimizer steps:
    ``steps_per_epoch`` batches make ``optimizer_steps(steps_per_epoch, --accum_steps)`` of them per epoch, and the
    global batch of one step (for --lr_per_256) is batch x processes x --accum_steps."""
    peak = peak_lr(cfg.lr, cfg.lr_per_256, cfg.batch_size * world_size * cfg.accum_steps)
    per_epoch = optimizer_steps(steps_per_epoch, cfg.accum_steps)
    return LRSchedule(peak, total_steps=cfg.epochs * per_epoch, warmup_steps=round(cfg.warmup * per_epoch),
                      min_lr=cfg.min_lr, kind=cfg.lr_schedule, power=cfg.poly_power)


@dataclass
class Models:
    """``train``: DDP (several processes) and compiled (--compile); ``eval``: compiled, never DDP (ranks validate
    different batch counts). Both share the weights of the plain model, which checkpoints save."""

    train: torch.nn.Module
    eval: torch.nn.Module


def wrap_models(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo, shapes: int, compiled: bool = False,
                log=print) -> Models:
    """``shapes``: the batch shapes of the run, one compiled graph each (--compile_shapes per_shape); ``compiled``:
    the run compiles its step (``decide_compile``)."""
    train_model = eval_model = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device = torch.device(info.device)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    if compiled:
        from torch import _dynamo
        if info.distributed:
            if cfg.cuda_graphs:  # (train refuses it before any process starts; torchrun-less callers too)
                refuse_cuda_graphs_under_ddp(info.world_size)
            note = keep_ddp_overlap(_dynamo.config)  # torch.compile(DDP(model)): the DDPOptimizer path
            if note:
                log(note)
        # One graph per batch shape (training and validation): keep them all instead of recompiling.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, shapes + 8)
        mode = "reduce-overhead" if cfg.cuda_graphs else None  # CUDA graphs: one per batch shape
        if cfg.compile_shapes == "dynamic":  # one graph for every H x W (dynamic=None: as marked, the rest static)
            train_model = SpatialDynamic(torch.compile(train_model, dynamic=None, mode=mode))
            eval_model = SpatialDynamic(torch.compile(model, dynamic=None, mode=mode))
        else:
            train_model = torch.compile(train_model, dynamic=False, mode=mode)
            eval_model = torch.compile(model, dynamic=False, mode=mode)
    return Models(train_model, eval_model)


def log_every(print_freq: int, steps_per_epoch: int, given: bool, log) -> int:
    """Batches per log line: --print_freq, or where it is the default and an epoch is short (a CPU run of a small
    data set), a quarter of an epoch, so that the first line does not take most of an epoch to appear."""
    quarter = max(1, steps_per_epoch // 4)
    if given or print_freq != TrainConfig.print_freq or print_freq <= quarter:  # a chosen value (or a resumed one)
        return print_freq
    log(f"note: a log line every {quarter} batch{'es' if quarter != 1 else ''} (a quarter of the "
        f"{steps_per_epoch}-batch epoch; --print_freq sets another interval)")
    return quarter


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
                 checkpointer: Checkpointer, start: Start, print_freq: int | None = None):
        self.cfg, self.info, self.paths, self.logger = cfg, info, paths, logger
        self.data, self.parts, self.checkpointer, self.state = data, parts, checkpointer, start.state
        self.resumed_row = start.row  # the checkpoint's epoch row, for the metrics files
        self.device = torch.device(info.device)
        self.is_cuda = self.device.type == "cuda"
        self.log = logger.info  # every rank to its file; the primary also to the console
        self.stop = StopFlag()
        self.normalize = DeviceNormalize(self.device)
        # With a fixed number of batch shapes, a bucket's last smaller validation batch is padded to full size.
        may_compile = cfg.compile == "on" or cfg.cuda_graphs  # (auto compiles on CUDA only)
        self.val_pad = (cfg.val_batch_size or cfg.batch_size) if (self.is_cuda or may_compile) else None
        self.train_shapes, self.val_shapes = self._plan_shapes()
        self.compiling = self._decide_compile(start)
        self.compiled = self.compiling.compile
        self.log(self.compiling.line)
        self.compile_cache: str | None = None  # the folder of torch.compile's on-disk caches, when compiling
        if self.compiled:
            self.compile_cache, source = compile_cache_dir(cfg.compile_cache)
            use_compile_cache(self.compile_cache)
            self.log(f"compile cache: {self.compile_cache} ({source}; shared by runs and ranks, safe to delete; "
                     "--compile_cache moves it)")
        self.models = wrap_models(parts.model, cfg, info, len(self.train_shapes) + len(self.val_shapes),
                                  self.compiled, self.log)
        s = parts.step
        self.train_step = TrainStep(self.models.train, s.optimizer, s.scaler, self.normalize, parts.augment,
                                    s.autocast, start.schedule, cfg.label_smoothing, s.channels_last, ema=parts.ema)
        self.recompiles = RecompileWatch(self.compiled, self.log)
        self.warmup_graphs = 0  # graphs torch.compile built in the warm-up
        self.print_freq = print_freq or cfg.print_freq
        self.warmup_s: float | None = None  # measured by fit
        self.logged_resolution: int | None = None
        self.stopped_val: dict | None = None  # validation at a --max_steps stop inside an epoch

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
            start = resume.restore(checkpointer, planned, info.world_size, log)
            print_freq = log_every(cfg.print_freq, data.steps_per_epoch, "print_freq" in resume.given, log)
            return cls(cfg, info, paths, logger, data, parts, checkpointer, start, print_freq)
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
        changing = len(self.data.plan.epoch_shapes or [])  # epochs from here on use the last table
        tables = [loaders.train_set.shapes_at(e) for e in range(start, min(self.cfg.epochs, max(start, changing) + 1))]
        val = None if loaders.val is None else ([[i for i, _ in b] for b in loaders.val.batch_sampler],
                                                loaders.val_set.bucket_ids, self.data.plan.val_buckets.shapes)
        return plan_shapes(loaders.train_sampler.global_batches(start), loaders.train_set.bucket_ids, tables, val,
                           self.val_pad)

    def _graphs(self) -> tuple[str, list[str]]:
        """(what makes this run's graphs, one label per graph the warm-up compiles), for the compile cache's record."""
        cfg, s = self.cfg, self.parts.step
        signature = graph_signature(
            torch=torch.__version__, device=torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu",
            arch=cfg.arch, width=cfg.width, classes=len(self.data.classes), amp=s.amp_dtype,
            channels_last=s.channels_last, mode="reduce-overhead" if cfg.cuda_graphs else "default",
            shapes=cfg.compile_shapes, ddp=self.info.distributed)
        return signature, graph_labels(self.train_shapes, self.val_shapes, cfg.compile_shapes == "dynamic")

    def _decide_compile(self, start: Start) -> CompileDecision:
        """--compile on/off, or auto's estimate for what is left of this run (rank 0's decision, on every rank)."""
        cfg = self.cfg
        if cfg.compile != "auto" or cfg.cuda_graphs or not self.is_cuda:
            return decide_compile(cfg.compile, self.device.type, cuda_graphs=cfg.cuda_graphs)
        signature, labels = self._graphs()
        warm = len(cached_graphs(compile_cache_dir(cfg.compile_cache)[0], signature) & set(labels))
        warmup = estimate_warmup(len(labels) - warm, warm, cfg.arch, cfg.compile_shapes == "dynamic")
        state, spe = start.state, self.data.steps_per_epoch
        steps = (cfg.epochs - state.epoch) * spe - state.batch_in_epoch
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps - state.step)
        pixels = float(np.mean([h * w for _, h, w in self.train_shapes])) if self.train_shapes else cfg.target_size ** 2
        decision = decide_compile("auto", "cuda", warmup, estimate_train_s(max(steps, 0), cfg.batch_size, pixels,
                                                                           cfg.arch, cfg.width))
        # Each rank reads its own machine's cache record: they must still agree (the replicas stay identical).
        return broadcast_object(decision) if self.info.distributed else decision

    def close(self) -> None:
        """Stop the DataLoader workers; call it on every way out of ``fit``. Stopping them can take seconds: an error
        is logged first."""
        self.data.close()

    def fit(self) -> int:
        cfg, state = self.cfg, self.state
        t0 = time.time()
        self.log(describe_lr(cfg.lr, cfg.lr_per_256, cfg.batch_size, self.info.world_size, cfg.accum_steps, cfg.opt,
                             cfg.lr_schedule))
        if cfg.accum_steps > 1:
            self.log(describe_accumulation(self.data.steps_per_epoch, cfg.accum_steps))
        metrics = on_primary(self._open_metrics, "writing config.json and the metrics files", self.log)
        loop = LoopSettings(steps_per_epoch=self.data.steps_per_epoch, print_freq=self.print_freq,
                            world_size=self.info.world_size, log=self.log, max_steps=cfg.max_steps,
                            on_interval=self._interval_writer(metrics), rank=self.info.rank,
                            accum_steps=cfg.accum_steps)
        self.stop.install()
        try:
            if cfg.max_steps is not None and state.step >= cfg.max_steps:  # e.g. a requeued job that got there
                self.log(f"--max_steps {cfg.max_steps} was already reached (step {state.step}): nothing to train")
                code = 0
            else:
                # One loader iterator for the rest of the run: workers prefetch across epochs, and start decoding
                # the first batches while the warm-up autotunes and compiles.
                batches = self.data.on_device(self.data.loaders.epochs(state.epoch, state.batch_in_epoch, cfg.epochs))
                if metrics is not None:  # --log_to: after the workers fork, as the trackers' threads import packages
                    metrics.trackers = open_trackers(cfg.log_to, self.paths.run_dir, cfg.run_name, cfg.to_dict(),
                                                     cfg.resume is not None, self.log)
                self.warmup_s = self.warm_up()
                code = self._epochs(batches, loop, metrics)
        finally:
            self.stop.uninstall()
            if metrics is not None:
                metrics.close()
        if code == 0:
            # Every rank logs a digest of its weights: DDP replicas must be bit-identical.
            self.logger.info(f"final weights sha1 {weights_digest(self.parts.model)}")
            self._summary(metrics, time.time() - t0)
        return code

    def _interval_writer(self, metrics: MetricsWriter | None):
        """Rank 0's interval rows into steps.jsonl. A write that fails (a full disk, the folder gone) stops the run
        with one line naming the file, on every rank at the same step (through the stop flag's agreement)."""
        if metrics is None:
            return None

        def write(row: dict) -> None:
            try:
                metrics.add_interval(row)
            except OSError as e:
                self.stop.fail(UserError(f"writing {e.filename or metrics.steps_jsonl} failed: {e.strerror or e}; "
                                         "free disk space or choose another --output, then resume with --resume auto "
                                         "(the last checkpoint is intact)"))
        return write

    def warm_up(self) -> float:
        """Run every shape once before the first epoch (cudnn autotuning, compilation); 0 when there is nothing
        to gain (CPU without --compile). Rank 0 then records the compiled graphs in the compile cache's folder."""
        if not (self.is_cuda or self.compiled):
            return 0.0
        s = self.parts.step
        before = compiled_graphs()
        seconds = warm_up(self.models.train, self.models.eval, self.train_shapes, self.val_shapes,
                          autocast=s.autocast, channels_last=s.channels_last, device=self.device, log=self.log)
        self.recompiles.start()
        self.warmup_graphs = compiled_graphs() - before
        if self.compiled:
            self.log(f"warm-up: torch.compile built {self.warmup_graphs} graph(s) ({self.cfg.compile_shapes})")
            note = (specialised_note(self.warmup_graphs, self.train_shapes, self.val_shapes)
                    if self.cfg.compile_shapes == "dynamic" else None)
            if note and self.info.is_primary:
                self.log(note)
            if self.info.is_primary:
                try:
                    record_graphs(self.compile_cache, *self._graphs())
                except OSError as e:  # a hint for the next run's estimate, never worth stopping this one
                    self.log(f"note: could not record the compiled graphs in {self.compile_cache} "
                             f"({e.strerror or e})")
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
                    if self.data.loaders.val is not None:  # what the weights are worth now, for the summary
                        self.stopped_val = self._validate(epoch, self.models.eval, f" at step {state.step}")
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
            # The row first, then the checkpoint that holds it too: a kill between the two loses neither (a resume
            # from the previous checkpoint writes the row again; one from this checkpoint restores it).
            on_primary(lambda: metrics.add({k: v for k, v in row.items() if k != "is_best"}),
                       f"writing the metrics of epoch {epoch + 1}", self.log)
            save("epoch", state, row)
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                if row["val_acc1"] is None and self.data.loaders.val is not None:  # not due: validate the end
                    self.stopped_val = self._validate(epoch, self.models.eval, f" at step {state.step}")
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

        def failed(paths: list[str]) -> None:  # not counted against --max_decode_failures: validation changes no weight
            for f in paths:
                self.log(stand_in_warning(f, f" in validation{label}"))
        sums = evaluate(model, self.data.on_device(self.data.loaders.validation()), self.normalize, s.autocast,
                        self.stop, s.channels_last, pad_to=self.val_pad, on_failed=failed)
        if self.stop.should_stop():  # every rank reaches this once, whatever its batch count
            return None
        res = reduce_eval(sums)
        top5 = format_top5(res["val_acc5"], len(self.data.classes))
        self.log(f"epoch {epoch + 1}: val{label} top-1 {res['val_acc1']:.2f}% top-5 {top5} "
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
        state = self.state
        resumed = self.cfg.resume is not None
        metrics = MetricsWriter(self.paths.run_dir, completed=state.epoch if resumed else None,
                                position=state.epoch + state.batch_in_epoch / self.data.steps_per_epoch,
                                checkpoint_row=self.resumed_row, log=self.log)
        for note in metrics.notes:
            self.log(note)
        return metrics

    def _summary(self, metrics: MetricsWriter | None, total_s: float) -> None:
        """summary.json, curves.png (also for a run that ended before its first epoch row) and the closing lines;
        called by every rank (``metrics`` is rank 0's)."""
        run = {"steps": self.state.step, "world_size": self.info.world_size,
               "global_batch": self.cfg.batch_size * self.info.world_size * self.cfg.accum_steps,
               "device": torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"}

        def write() -> dict:
            metrics.redraw()
            return write_summary(self.paths, metrics.rows, total_s, run, steps=metrics.steps,
                                 stopped=self._stopped_summary())
        summary = on_primary(write, "writing summary.json", self.log)  # every rank: it agrees on the outcome
        if self.info.is_primary:
            self.log(closing_lines(self.paths, summary, self._no_validation_reason()))

    def _stopped_summary(self) -> dict | None:
        if self.stopped_val is None:
            return None
        s, spe = self.state, self.data.steps_per_epoch
        return {"step": s.step, "epoch": s.epoch + s.batch_in_epoch / spe, "val_acc1": self.stopped_val["val_acc1"],
                "val_acc5": self.stopped_val["val_acc5"], "val_loss": self.stopped_val["val_loss"]}

    def _no_validation_reason(self) -> str:
        """Why a run without a validated epoch has none (the closing line says it)."""
        if self.data.loaders.val is None:
            return f"no val/ folder in {self.cfg.data_dir}"
        return "the run stopped before it validated"  # a stop signal during the last validation
