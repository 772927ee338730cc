"""`rectrain train` / `python train_g4.dn_12xlarge.py`: the whole training run.

main -> preflight (user errors before any process starts) -> launch (one process per GPU, torchrun or
SLURM) -> worker: data, model, optimizer, resume, then epochs of train_one_epoch + evaluate, with a
checkpoint and a metrics row after each epoch and a mid-epoch checkpoint on SIGTERM/SIGINT.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import sys
import time
from dataclasses import fields

import numpy as np
import torch

from rectrain import checkpoint as ckpt_io
from rectrain.checkpoint import Checkpointer, Stateful, load_initial_weights
from rectrain.arscan import scan_split
from rectrain.augment import BatchAugment
from rectrain.buckets import make_buckets
from rectrain.config import TrainConfig, add_arguments as add_config_arguments, given_settings, resolve_config
from rectrain.distributed import (DistInfo, StopFlag, all_reduce_sum, average_buffers, launch, on_primary,
                                  preempted_exit_code, resolve_device)
from rectrain.engine import (LoopSettings, LRSchedule, TrainState, TrainStep, autocast_factory, evaluate,
                             reduce_eval, train_one_epoch)
from rectrain.errors import DataMistake, UserError
from rectrain.loader import DecodeFailurePolicy, DeviceNormalize, build_loaders, cap_workers
from rectrain.metrics import (MetricsWriter, RunPaths, close_logger, closing_lines, setup_rank_logger,
                              write_json_atomic, write_summary)
from rectrain.resume import settle_resume
from rectrain.ema import ModelEma
from rectrain.gpu_decode import GpuBatchDecoder, decoded, resolve_decode
from rectrain.model import build_model, count_parameters, param_groups
from rectrain.schedule import ResolutionSchedule, describe_lr, final_size, peak_lr, validation_size
from rectrain.warmup import compiled_graphs, plan_shapes, warm_up


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in ckpt_io.unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    cfg = resolve_config(args.command_argv, prog="rectrain train")
    return main(cfg, given=given_settings(args.command_argv))


def main(cfg: TrainConfig, given: set[str] | None = None) -> int:
    """``given``: the settings the user chose (default: those that differ from the defaults)."""
    if given is None:
        given = {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != f.default}
    cfg, notes = settle_resume(cfg, given)
    fresh = preflight(cfg)
    worker = functools.partial(train_worker, cfg, notes, fresh)
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
    run_dir = os.path.join(cfg.output, cfg.run_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not cfg.resume and os.path.isdir(ckpt_dir) and any(f.endswith(".pth") for f in os.listdir(ckpt_dir)):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume auto to continue that run, or choose "
                        "a new --run_name (nothing was overwritten)")
    fresh = not os.path.exists(run_dir)
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output {cfg.output} ({e.strerror}); choose a writable folder") from None
    return fresh


def check_training_set(train, batch_size: int) -> None:
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


def train_worker(cfg: TrainConfig, notes: list[str], fresh: bool, info: DistInfo) -> int:
    paths = RunPaths.of(cfg.output, cfg.run_name)
    logger = setup_rank_logger(paths.log_dir, info.rank, echo=info.is_primary)
    for note in notes:
        logger.info(note)
    trainer = Trainer(cfg, info, paths, logger)
    try:
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
        trainer.close()
        close_logger(logger)


class Trainer:
    """One process's share of a run: set-up, resume, then epochs of training, validation and checkpoints."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, paths: RunPaths, logger):
        self.cfg, self.info, self.paths, self.logger = cfg, info, paths, logger
        self.device = torch.device(info.device)
        self.is_cuda = self.device.type == "cuda"
        self.log = logger.info  # every rank to its file; the primary also to the console
        self.stop = StopFlag()
        self.graphs_after_warmup, self.warned_recompile = 0, False
        self.logged_resolution = None
        self.loaders = None

    # -- set-up ---------------------------------------------------------------------------------
    def _scan(self, split: str, classes=None):
        """Rank 0 scans (and writes the cache) first, telling the others if it failed; they then read the cache."""
        kw = dict(classes=classes, cache_dir=self.paths.run_dir, workers=None, progress=self.info.is_primary)
        scan = on_primary(lambda: scan_split(self.cfg.data_dir, split, **kw), f"scanning {split}/", self.log)
        return scan if scan is not None else scan_split(self.cfg.data_dir, split, **kw)

    def setup_data(self) -> None:
        cfg, info = self.cfg, self.info
        train = self._scan("train")
        val = None
        if os.path.isdir(os.path.join(cfg.data_dir, "val")):
            val = self._scan("val", classes=train.index.classes)
        else:
            self.log(f"note: {cfg.data_dir} has no val/ folder: training without validation")
        for name, s in (("train", train), ("val", val)):
            if s is not None and s.bad:
                self._log_unusable(name, s.bad)
        check_training_set(train, cfg.batch_size)
        self.classes = train.index.classes
        self.plan_resolution()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        workers, note = cap_workers(cfg.workers, local_world)
        if note and info.is_primary:
            self.log(f"note: {note}")
        self.decode = resolve_decode(cfg.decode, self.device, workers)
        self.loaders = build_loaders(train, val, self.buckets, batch_size=cfg.batch_size,
                                     val_batch_size=cfg.val_batch_size or cfg.batch_size, workers=workers,
                                     seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                     crop_scale=cfg.crop_scale, pin_memory=self.is_cuda, decoder=cfg.decoder,
                                     hflip=cfg.hflip, crop=cfg.train_crop, epoch_shapes=self.epoch_shapes,
                                     val_buckets=self.val_buckets, decode=self.decode, val_crop=cfg.val_crop)
        self.gpu_decoder = (GpuBatchDecoder(self.device, cpu_decoder=cfg.decoder, log=self.log)
                            if self.decode == "gpu" else None)
        self.steps_per_epoch = len(self.loaders.train_sampler)
        self.log(f"data: {len(train.index):,} train / {len(val.index) if val else 0:,} val images, "
                 f"{len(self.classes)} classes, {len(self.buckets)} bucket shapes ({self.buckets.describe()}), "
                 f"{self.steps_per_epoch} batches per epoch per process, "
                 f"{workers} worker{'s' if workers != 1 else ''} per process")

    def _log_unusable(self, split: str, bad: list[tuple[str, str]], shown: int = 20) -> None:
        self.log(f"note: {len(bad)} unusable {split} file(s) excluded:")
        for path, reason in bad[:shown]:
            self.log(f"  {path}: {reason}")
        if len(bad) > shown:
            self.log(f"  ... and {len(bad) - shown} more: `rectrain scan --data_dir {self.cfg.data_dir}` lists them all")

    def plan_resolution(self) -> None:
        """Bucket tables: ``buckets`` group the training images (at the final training size); with
        --res_schedule each epoch crops to those buckets scaled to its size; validation has its own table at
        --val_target_size (default: the final training size)."""
        cfg = self.cfg
        self.res_schedule = ResolutionSchedule.parse(cfg.res_schedule) if cfg.res_schedule else None
        self.buckets = make_buckets(final_size(cfg.target_size, cfg.res_schedule), cfg.rect_mode, cfg.max_ratio)
        self.val_buckets = make_buckets(validation_size(cfg.target_size, cfg.res_schedule, cfg.val_target_size),
                                        cfg.rect_mode, cfg.max_ratio)
        self.epoch_shapes = None
        if self.res_schedule is not None:
            self.epoch_shapes = [self.buckets.scaled(self.resolution(e)) for e in range(cfg.epochs)]
            self.log(f"progressive resolution {self.res_schedule}: " + ", ".join(
                f"{size} px from epoch {next(e for e in range(cfg.epochs) if self.resolution(e) == size) + 1}"
                for size in self.res_schedule.sizes(cfg.epochs)) + f"; batch size {cfg.batch_size} throughout")

    def resolution(self, epoch: int) -> int:
        return self.res_schedule.at(epoch) if self.res_schedule else self.buckets.target_size

    def setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.is_cuda:
            torch.backends.cudnn.benchmark = True  # a handful of bucket shapes: autotune each once
        model = build_model(cfg.arch, num_classes=len(self.classes), width=cfg.width).to(self.device)
        self.channels_last = cfg.channels_last and self.is_cuda
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # torch's default implementation (foreach on CUDA): fused measured 1.004x on an H200, within noise
        # (docs/benchmarks.md), so it is not worth a second code path.
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov)
        amp = not cfg.no_amp and self.is_cuda
        if not cfg.no_amp and not self.is_cuda:
            self.log("note: mixed precision is used on CUDA only; training in fp32 on the CPU")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp_dtype] if amp else None
        self.autocast = autocast_factory(str(self.device), amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.augment = BatchAugment(cfg.augmentation(), seed=cfg.seed, rank=self.info.rank, device=self.device)
        self.failures = DecodeFailurePolicy(cfg.max_decode_failures, log=self.log)
        if cfg.initial_checkpoint:
            load_initial_weights(model, cfg.initial_checkpoint, log=self.log)
        # The EMA starts from the initial weights (or the resumed ones: Checkpointer.restore).
        self.ema = ModelEma(model, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay else None
        self.log(f"model: {cfg.arch} ({count_parameters(model):,} parameters), device {self.device}, "
                 f"precision {'fp32' if amp_dtype is None else cfg.amp_dtype}, augmentations {self.augment.config}")

    def wrap_model(self) -> None:
        """train_model: DDP (several processes) and compiled (--compile); eval_model: compiled, never DDP (ranks
        validate different batch counts). Both share the weights of ``self.model``, which checkpoints save."""
        self.train_model = self.eval_model = self.model
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.is_cuda else None,
                                   gradient_as_bucket_view=True)
        if self.cfg.compile or self.cfg.cuda_graphs:
            import torch._dynamo
            # One graph per batch shape (training and validation): keep them all instead of recompiling.
            shapes = len(self.train_shapes) + len(self.val_shapes)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, shapes + 8)
            mode = "reduce-overhead" if self.cfg.cuda_graphs else None  # CUDA graphs: one per batch shape
            self.train_model = torch.compile(self.train_model, dynamic=False, mode=mode)
            self.eval_model = torch.compile(self.model, dynamic=False, mode=mode)

    def plan_shapes(self) -> None:
        """Every batch shape of the run, for the warm-up (see ``rectrain.warmup.plan_shapes``)."""
        cfg, loaders = self.cfg, self.loaders
        self.val_pad = (cfg.val_batch_size or cfg.batch_size) if (self.is_cuda or cfg.compile or cfg.cuda_graphs) else None
        tables = [loaders.train_set.shapes_at(e) for e in range(self.state.epoch, cfg.epochs)]
        val = None if loaders.val is None else ([[i for i, _ in b] for b in loaders.val.batch_sampler],
                                                loaders.val_set.bucket_ids, self.val_buckets.shapes)
        self.train_shapes, self.val_shapes = plan_shapes(
            loaders.train_sampler.global_batches(self.state.epoch), loaders.train_set.bucket_ids, tables, val,
            self.val_pad)

    def warm_up(self) -> float:
        """Run every shape once before the first epoch (cudnn autotuning, compilation); 0 when there is nothing
        to gain (CPU without --compile)."""
        if not (self.is_cuda or self.cfg.compile or self.cfg.cuda_graphs):
            return 0.0
        seconds = warm_up(self.train_model, self.eval_model, self.train_shapes, self.val_shapes,
                          autocast=self.autocast, channels_last=self.channels_last, device=self.device, log=self.log)
        self.graphs_after_warmup = compiled_graphs()
        return seconds

    def check_recompiles(self) -> None:
        new = compiled_graphs() - self.graphs_after_warmup
        if self.cfg.compile and new > 0 and not self.warned_recompile:
            self.warned_recompile = True
            self.log(f"warning: torch.compile built {new} new graph(s) after the warm-up: a batch shape or input "
                     "layout that the warm-up did not foresee (each costs a compilation). Please report it with "
                     "the log.")

    def build_step(self) -> TrainStep:
        cfg, spe = self.cfg, self.steps_per_epoch
        peak = peak_lr(cfg.lr, cfg.lr_per_256, cfg.batch_size * self.info.world_size)
        schedule = LRSchedule(peak, total_steps=cfg.epochs * spe, warmup_steps=round(cfg.warmup * spe),
                              min_lr=cfg.min_lr, rebased=self.state.lr_rebased)
        if self.state.resumed_lr is not None:
            continued = schedule.continuing(self.state.step, self.state.resumed_lr)
            if continued is not schedule:
                self.log(f"note: the learning-rate schedule changed on resume (--epochs, --lr or the batch count): it "
                         f"continues from {self.state.resumed_lr:.5g} at step {self.state.step} and decays to "
                         f"--min_lr {cfg.min_lr} by step {schedule.total_steps}")
                schedule, self.state.lr_rebased = continued, continued.rebased
        return TrainStep(self.train_model, self.optimizer, self.scaler, DeviceNormalize(self.device), self.augment,
                         self.autocast, schedule, cfg.label_smoothing, self.channels_last, ema=self.ema)

    def build_checkpointer(self) -> Checkpointer:
        parts = Stateful(self.model, self.optimizer, self.scaler, self.augment, self.failures, self.ema)
        return Checkpointer(self.paths.ckpt_dir, parts, info=self.info, config=self.cfg.to_dict(),
                            classes=self.classes, steps_per_epoch=self.steps_per_epoch,
                            keep=self.cfg.keep_checkpoints, log=self.log)

    # -- the run ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the DataLoader workers; call it on every way out of ``fit``. They ignore SIGTERM (the main process
        decides when to stop), so after an error nothing else would, and stopping them can take seconds: an error is
        logged first."""
        if self.loaders is not None:
            self.loaders.close()

    def fit(self) -> int:
        cfg, info = self.cfg, self.info
        t0 = time.time()
        self.setup_data()
        self.setup_model()
        self.state = TrainState()
        self.checkpointer = self.build_checkpointer()
        found = self.checkpointer.find(cfg.resume)
        if found is not None:
            self.checkpointer.restore(*found, self.state)
        self.plan_shapes()
        self.wrap_model()
        self.log(describe_lr(cfg.lr, cfg.lr_per_256, cfg.batch_size, info.world_size))
        metrics = on_primary(self._open_metrics, "writing config.json and the metrics files", self.log)
        self.train_step = self.build_step()
        self.loop = LoopSettings(steps_per_epoch=self.steps_per_epoch, print_freq=cfg.print_freq,
                                 world_size=info.world_size, log=self.log, max_steps=cfg.max_steps,
                                 on_interval=metrics.add_interval if metrics is not None else None,
                                 rank=info.rank)
        self.stop.install()
        try:
            # Workers start decoding the first batches while the warm-up autotunes and compiles.
            self.batches = self._on_device(self.loaders.epochs(self.state.epoch, self.state.batch_in_epoch, cfg.epochs))
            self.warmup_s = self.warm_up()
            self.pending_warmup_s = self.warmup_s  # reported in the first metrics row of this process
            code = self._epochs(metrics)
        finally:
            self.stop.uninstall()
            if metrics is not None:
                metrics.close()
        if code == 0:
            # Every rank logs a digest of its weights: DDP replicas must be bit-identical.
            self.logger.info(f"final weights sha1 {weights_digest(self.model)}")
            if info.is_primary:
                self._summary(metrics, time.time() - t0)
        return code

    def _on_device(self, batches):
        """--decode gpu: the workers' encoded batches decoded and cropped on the device; else as they are."""
        return decoded(batches, self.gpu_decoder) if self.gpu_decoder is not None else batches

    def _open_metrics(self) -> MetricsWriter:
        write_json_atomic(os.path.join(self.paths.run_dir, "config.json"), self.cfg.to_dict())
        return MetricsWriter(self.paths.run_dir, resume_epoch=self.state.epoch + 1)

    def _train_epoch(self, epoch: int) -> tuple[dict, int]:
        if self.res_schedule is not None and self.resolution(epoch) != self.logged_resolution:
            self.logged_resolution = self.resolution(epoch)
            self.log(f"epoch {epoch + 1}: training at {self.resolution(epoch)} px "
                     f"({', '.join(f'{h}x{w}' for h, w in self.loaders.train_set.shapes_at(epoch))})")
        # self.batches is one loader iterator for the rest of the run: workers prefetch across epochs.
        this_epoch = itertools.islice(self.batches, self.steps_per_epoch - self.state.batch_in_epoch)
        progress = self._progress(epoch)
        try:
            return train_one_epoch(self.train_step, this_epoch, self.state, self.stop, self.loop, self.failures,
                                   progress)
        finally:
            if progress is not None:
                progress.close()

    def _epochs(self, metrics: MetricsWriter | None) -> int:
        cfg, state, save = self.cfg, self.state, self.checkpointer.save
        if cfg.max_steps is not None and state.step >= cfg.max_steps:  # e.g. a requeued job that already got there
            self.log(f"--max_steps {cfg.max_steps} was already reached (step {state.step}): nothing to train")
            return 0
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            stats = {}
            if state.batch_in_epoch < self.steps_per_epoch:
                stats, signum = self._train_epoch(epoch)
                if signum:
                    self.log(f"stopping on signal {signum}: saving a checkpoint at epoch {epoch + 1}, "
                             f"batch {state.batch_in_epoch}")
                    save("last", state)
                    return preempted_exit_code(signum)
                if state.batch_in_epoch < self.steps_per_epoch:  # --max_steps reached mid-epoch
                    self.log(f"--max_steps {cfg.max_steps} reached at step {state.step}")
                    save("last", state)
                    return 0
            self.check_recompiles()
            if self.gpu_decoder is not None:
                self.log(self.gpu_decoder.summary())
            average_buffers(self.model)  # identical BatchNorm statistics on every rank
            row = self._validate_and_row(epoch, stats)
            if row is None:  # a stop signal during validation: resume will validate this epoch again
                self.log(f"stopping on signal {self.stop.signum} during validation of epoch {epoch + 1}: "
                         "saving a checkpoint")
                save("last", state)
                return preempted_exit_code(self.stop.signum)
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            state.epoch_loss_sum, state.epoch_images = 0.0, 0
            save("epoch", state, row)
            on_primary(lambda: metrics.add({k: v for k, v in row.items() if k != "is_best"}),
                       f"writing the metrics of epoch {epoch + 1}", self.log)
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                break
        return 0

    def _validate_and_row(self, epoch: int, stats: dict) -> dict | None:
        cfg, state = self.cfg, self.state
        totals = all_reduce_sum(torch.tensor([state.epoch_loss_sum, float(state.epoch_images)], dtype=torch.float64,
                                             device=self.device)).tolist()
        row = {"epoch": epoch + 1, "train_loss": totals[0] / max(totals[1], 1.0),
               "val_loss": None, "val_acc1": None, "val_acc5": None,
               "lr": self.optimizer.param_groups[0]["lr"],
               "images_per_sec": stats.get("images_per_sec"), "data_wait_frac": stats.get("data_wait_frac"),
               "epoch_time_s": stats.get("epoch_time_s"), "warmup_s": self.pending_warmup_s,
               "resolution": self.resolution(epoch), "is_best": False}
        self.pending_warmup_s = None
        due = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        if not due or self.loaders.val is None:
            return row
        res = self._validate(epoch, self.eval_model, "")
        if res is None:
            return None
        row.update({k: res[k] for k in ("val_loss", "val_acc1", "val_acc5")})
        if self.ema is not None:  # the averaged weights, validated beside the raw ones
            res_ema = self._validate(epoch, self.ema.module, " (EMA)")
            if res_ema is None:
                return None
            row.update({f"{k}_ema": res_ema[k] for k in ("val_loss", "val_acc1", "val_acc5")})
        row["is_best"] = res["val_acc1"] > state.best_acc1  # best.pth follows the raw weights' top-1
        state.best_acc1 = max(state.best_acc1, res["val_acc1"])
        return row

    def _validate(self, epoch: int, model, label: str) -> dict | None:
        """Top-1/top-5/loss over the whole validation set; None when a stop signal arrived (agreed by all ranks)."""
        t = time.perf_counter()
        sums = evaluate(model, self._on_device(self.loaders.validation()), DeviceNormalize(self.device), self.autocast, self.stop,
                        self.channels_last, pad_to=self.val_pad)
        if self.stop.should_stop():  # every rank reaches this once, whatever its batch count
            return None
        res = reduce_eval(sums)
        self.log(f"epoch {epoch + 1}: val{label} top-1 {res['val_acc1']:.2f}% top-5 {res['val_acc5']:.2f}% "
                 f"loss {res['val_loss']:.4f} on {res['val_images']:,} images at {self.val_buckets.target_size} px "
                 f"({time.perf_counter() - t:.1f} s)")
        return res

    def _progress(self, epoch: int):
        """A tqdm bar on rank 0 per --progress (auto: only on a terminal, so logs captured by nohup or SLURM
        hold the periodic log lines without carriage-return updates)."""
        mode = self.cfg.progress
        if not self.info.is_primary or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=self.state.batch_in_epoch, desc=f"epoch {epoch + 1}/"
                    f"{self.cfg.epochs}", unit="batch", dynamic_ncols=True, leave=False)

    def _summary(self, metrics: MetricsWriter, total_s: float) -> None:
        run = {"steps": self.state.step, "world_size": self.info.world_size,
               "global_batch": self.cfg.batch_size * self.info.world_size,
               "device": torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"}
        summary = write_summary(self.paths, metrics.rows, total_s, run)
        self.log(closing_lines(self.paths, summary))
