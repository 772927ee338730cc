"""The training configuration: one typed dataclass, the seed's flag names and defaults.

Every field is a command-line flag of `rectrain train` / `python train_g4.dn_12xlarge.py` and a key of
an optional config file (`--config run.toml|.yaml|.json`); flags given on the command line override the
file. A file key is either the flag without its dashes (`batch_size = 512`, `no_mixup = true`,
`cutout = true`) or the field name (`use_mixup = false`, as in a run's config.json). Unknown keys, values
of the wrong type and bad values are errors of one line, so a typo never silently does nothing. The
resolved config is saved as `config.json` in the run folder and inside every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields

from rectrain.archs import ARCH_NAMES
from rectrain.cli import ArgParser, HelpFormatter, did_you_mean
from rectrain.data.buckets import MULTIPLE, RECT_MODES
from rectrain.data.samplers import LEFTOVER_POLICIES
from rectrain.errors import UserError
from rectrain.runtime.trackers import parse_log_to
from rectrain.training.augment_config import AugmentationConfig
from rectrain.training.schedule import LR_SCHEDULES, ResolutionSchedule

# Help sections of `rectrain train --help`, in this order; every field names one in its metadata.
DATA, MODEL, OPTIM, AUG, SPEED, DIST, LOGS = GROUPS = (
    "data", "model", "optimisation", "augmentation", "precision and speed", "distributed",
    "checkpoints and logging")


def _f(group: str, default, help: str, **kw):
    """A field's default and metadata: help text, help group, and optionally flag/invert/choices.

    Switches (bool fields) describe the feature in ``help``; the flag's help then reads "turn off
    <help> (on by default)" for a ``--no_*`` flag and "turn on <help> (off by default)" otherwise.
    ``invert=True``: the flag stores False (``--no_mixup`` sets ``use_mixup``), so does its file key.
    A choice can also be a switch: ``const`` is the value of the bare flag (``--compile`` is ``--compile on``),
    ``off_flag`` a second flag for the first of ``bools`` (``--no_compile``), and ``bools`` what false and true mean
    in a file (``compile = false``, as runs before the choice wrote it, is ``off``).
    """
    assert group in GROUPS, group
    return field(default=default, metadata={"group": group, "help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a training run; fields = flags (the seed's names and defaults, then additions).

    Config-file keys: a field name (``use_mixup = false``) or its flag without dashes where that
    differs (``no_mixup = true``, ``cutout = true``, ``no_channels_last = true``); giving one setting
    both ways with contradicting values is an error. ``to_dict()`` uses the field names and
    ``from_dict`` reads either spelling, so ``config.json`` of a run is itself a valid config file.
    """

    # --- data ---
    data_dir: str = _f(DATA, "/mnt/data/imagenet", "dataset root holding train/<class>/* and val/<class>/*")
    batch_size: int = _f(DATA, 256, "batch size per GPU (per process); the global batch is this x world size")
    target_size: int = _f(DATA, 224, "shorter side of the crops (short_side mode) or sqrt of their area "
                                     "(area mode), in pixels; a multiple of 32")
    workers: int = _f(DATA, 8, "DataLoader worker processes per GPU; capped to the CPU cores available")
    rect_mode: str = _f(DATA, "short_side", "bucket shapes: short_side (shorter side = target_size, as the "
                                            "seed) or area (H*W ~ target_size^2: the compute of square crops)",
                        choices=list(RECT_MODES))
    max_ratio: float = _f(DATA, 2.0, "widest aspect ratio kept (2.0 = 1:2 .. 2:1); wider images are cropped to it")
    crop_scale: tuple[float, float] = _f(DATA, (0.08, 1.0), "random-resized-crop area range, as a fraction of the "
                                         "largest crop of the bucket's ratio (Inception's and torchvision's range)")
    decoder: str = _f(DATA, "auto", "JPEG decoder in the workers: turbo (decodes only the crop's region: "
                                    "libjpeg-turbo 3 from the turbojpeg package), opencv (the whole JPEG), pil, or "
                                    "auto (the first of these installed); files one cannot take go to the next",
                      choices=["auto", "turbo", "opencv", "pil"])
    hflip: float = _f(DATA, 0.5, "probability of a horizontal flip per training image; 0 turns flipping off "
                                 "(digits, text, many medical or industrial images are not mirror-symmetric)")
    train_crop: str = _f(DATA, "random", "per-image training crop: random (random-resized crop keeping the bucket's "
                                         "ratio, --crop_scale) or resize (the seed's: the whole image resized to its "
                                         "bucket; all augmentation on the batch)", choices=["random", "resize"])
    res_schedule: str | None = _f(DATA, None, "progressive training resolution START:END:E1:E2 (FFCV's: START px "
                                              "until epoch E1, rising linearly to END at epoch E2, multiples of 32, "
                                              "epochs from 0; e.g. 160:192:2:13); replaces --target_size for "
                                              "training, batch size unchanged")
    val_target_size: int | None = _f(DATA, None, "validation resolution (default: the final training size); "
                                                 "FixRes: random-resized-crop training at r validates best near 1.15r")
    decode: str = _f(DATA, "cpu", "where JPEGs are decoded: cpu (DataLoader workers), gpu (workers only read the files; "
                                  "the main process decodes each batch with torchvision's nvJPEG and crops on the GPU; "
                                  "needs torchvision with CUDA) or auto (gpu where available and --workers is under 6, else cpu: "
                                  "with enough workers the CPU decode overlaps the step and trains faster)",
                     choices=["auto", "cpu", "gpu"])
    val_crop: float = _f(DATA, 0.875, "validation centre crop: the fraction of each side of the image's largest box "
                                      "of its bucket's ratio that is kept (0.875: resize to target/0.875, crop the "
                                      "target, as the standard protocol; 1.0: the whole box, e.g. after --train_crop "
                                      "resize)")
    val_batch_size: int | None = _f(DATA, None, "validation batch size per GPU (default: --batch_size)")
    max_decode_failures: int = _f(DATA, 100, "stop the run when more images than this fail to decode")
    shard_cache: str | None = _f(DATA, None, "remote tar shards (--data_dir with https://, s3://, gs:// URLs): the "
                                             "folder their local copies are kept in (default: "
                                             "~/.cache/rectrain/shards)")
    shard_cache_gb: float = _f(DATA, 100.0, "remote tar shards: at most this many GB of local copies; when the train "
                                            "shards do not fit beside the val shards, each epoch reads them in "
                                            "windows of half the rest")
    # --- model ---
    arch: str = _f(MODEL, "resnet50", "model architecture", choices=sorted(ARCH_NAMES))
    width: int = _f(MODEL, 64, "stem width of the ResNet (64 is the paper's; smaller for quick tests)")
    initial_checkpoint: str | None = _f(MODEL, None, "fine-tune: start from these weights (a rectrain checkpoint or a "
                                                     "torchvision-layout state dict); another class count "
                                                     "re-initialises fc. Not a resume: epochs, optimizer and "
                                                     "schedule start afresh")
    # --- optimisation ---
    epochs: int = _f(OPTIM, 90, "total training epochs")
    lr: float = _f(OPTIM, 0.1, "peak learning rate for the GLOBAL batch (the seed's meaning; the linear-scaling rule "
                               "gives 0.1 x global/256)")
    lr_per_256: float | None = _f(OPTIM, None, "peak learning rate per 256 images instead of --lr: the rate is "
                                               "X x global batch / 256 (Goyal et al.); exclusive with --lr")
    momentum: float = _f(OPTIM, 0.9, "momentum of SGD and LARS, in [0, 1) (LAMB's are --lamb_betas)")
    weight_decay: float = _f(OPTIM, 1e-4, "L2 weight decay (not applied to BatchNorm parameters or biases)")
    seed: int = _f(OPTIM, 42, "random seed (>= 0): data order, crops, augmentations, initial weights")
    label_smoothing: float = _f(OPTIM, 0.1, "label smoothing in [0, 1), composed with MixUp/CutMix targets")
    warmup_epochs: float | None = _f(OPTIM, None, "linear learning-rate warm-up, in epochs, before the cosine "
                                                  "decay (default: 5, or a tenth of --epochs when that is shorter)")
    min_lr: float = _f(OPTIM, 0.0, "learning rate at the end of the cosine decay")
    nesterov: bool = _f(OPTIM, False, "Nesterov momentum")
    max_steps: int | None = _f(OPTIM, None, "stop after this many optimizer steps in total (smoke tests, benchmarks)")
    ema_decay: float = _f(OPTIM, 0.0, "weight EMA decay per step, e.g. 0.9998 (0: off); validated beside the raw "
                                      "weights (val_acc1_ema) and saved in checkpoints")
    ema_every: int = _f(OPTIM, 1, "update the EMA every N steps (decay^N each time: the same time constant)")
    # large global batches: the optimizer, the decay and gradient accumulation (README: "Large global batches")
    opt: str = _f(OPTIM, "sgd", "optimizer: sgd (the seed's; with the linear-scaling rule, good to a global batch of "
                                "about 8k), lars (momentum with a per-layer trust ratio: MLPerf's ResNet-50 "
                                "optimizer for larger batches; pair it with --lr_schedule poly) or lamb (Adam's "
                                "moments with the per-layer trust ratio, You et al. 2019); BatchNorm parameters and "
                                "biases get no trust ratio and no weight decay", choices=["sgd", "lars", "lamb"])
    lr_schedule: str = _f(OPTIM, "cosine", "decay after the warm-up: cosine, or poly (min_lr + (lr - min_lr) x "
                                           "(1 - progress)^--poly_power: MLPerf's LARS schedule, with --min_lr 1e-4)",
                          choices=list(LR_SCHEDULES))
    poly_power: float = _f(OPTIM, 2.0, "the power of --lr_schedule poly (MLPerf's: 2)")
    lars_eta: float = _f(OPTIM, 0.001, "LARS trust coefficient: a layer's rate is lr x eta x |w| / (|g| + "
                                       "weight_decay x |w|) (MLPerf's: 0.001)")
    lamb_betas: tuple[float, float] = _f(OPTIM, (0.9, 0.999), "LAMB's decay rates of the gradient's first and "
                                         "second moments", metavar=("BETA1", "BETA2"))
    opt_eps: float | None = _f(OPTIM, None, "epsilon of LARS's trust ratio (not given: 0, MLPerf's) or of LAMB's "
                                            "denominator (not given: 1e-6)")
    accum_steps: int = _f(OPTIM, 1, "gradient accumulation: N batches per optimizer step, their gradients averaged "
                                    "(DDP synchronises only the last). The global batch becomes --batch_size x "
                                    "processes x N, for --lr_per_256 too; the schedule and --max_steps count "
                                    "optimizer steps, --print_freq batches")
    # --- batch augmentations (the seed's AugmentationConfig) ---
    use_mixup: bool = _f(AUG, True, "MixUp", flag="--no_mixup", invert=True)
    mixup_alpha: float = _f(AUG, 0.2, "MixUp Beta(alpha, alpha)")
    use_cutmix: bool = _f(AUG, True, "CutMix", flag="--no_cutmix", invert=True)
    cutmix_alpha: float = _f(AUG, 1.0, "CutMix Beta(alpha, alpha)")
    use_cutout: bool = _f(AUG, False, "Cutout (square holes)", flag="--cutout")
    cutout_n_holes: int = _f(AUG, 1, "Cutout holes per image")
    cutout_length: int = _f(AUG, 8, "Cutout hole side in pixels")
    cutout_prob: float = _f(AUG, 0.5, "probability that an image gets Cutout")
    use_random_erasing: bool = _f(AUG, True, "Random Erasing", flag="--no_random_erasing", invert=True)
    random_erasing_prob: float = _f(AUG, 0.25, "probability that an image gets Random Erasing")
    random_erasing_scale: tuple[float, float] = _f(AUG, (0.02, 0.33), "erased area range (fraction of the image)")
    batch_aug_prob: float = _f(AUG, 0.5, "probability that a batch gets MixUp or CutMix")
    # --- precision and speed ---
    no_amp: bool = _f(SPEED, False, "mixed precision on CUDA (see --amp_dtype; CPU runs are fp32)")
    amp_dtype: str = _f(SPEED, "bf16", "mixed-precision dtype: bf16 (no loss scaling needed, same range as "
                                       "fp32; for Ampere and newer) or fp16 (with a GradScaler; for older GPUs)",
                        choices=["bf16", "fp16"])
    channels_last: bool = _f(SPEED, True, "the channels_last memory format on CUDA", flag="--no_channels_last",
                             invert=True)
    compile: str = _f(SPEED, "auto", "torch.compile of the model, compiled in the warm-up before epoch 1 (1.46x "
                                     "faster ResNet-50 steps on an H200): auto compiles on CUDA when the estimated "
                                     "warm-up is under 5 percent of the run's estimated training time, and says so at "
                                     "start-up; --compile (on) forces it, --no_compile (off) never compiles",
                      choices=["auto", "on", "off"], const="on", off_flag="--no_compile", bools=("off", "on"))
    compile_shapes: str = _f(SPEED, "per_shape", "what --compile compiles: per_shape (one graph per batch shape, "
                                                 "static kernels) or dynamic (one graph for every shape, the height "
                                                 "and width marked dynamic: fewer graphs to compile)",
                             choices=["per_shape", "dynamic"])
    compile_cache: str | None = _f(SPEED, None, "folder of torch.compile's persistent caches, shared by runs and "
                                                "ranks (default: $TORCHINDUCTOR_CACHE_DIR when set, else "
                                                "~/.cache/rectrain/torch_compile); a warm cache shortens the warm-up")
    cuda_graphs: bool = _f(SPEED, False, "CUDA graphs: one captured graph per batch shape (torch.compile's "
                                         "reduce-overhead mode; implies --compile; more GPU memory; one process "
                                         "only: refused under DDP, pytorch#139207)")
    deterministic: bool = _f(SPEED, False, "deterministic algorithms (bit-exact resume; slower on GPU)")
    # --- distributed ---
    device: str = _f(DIST, "auto", "cuda, cuda:N, cpu or auto (cuda when available)")
    nproc: int | None = _f(DIST, None, "processes for the built-in launcher (default: every visible GPU; 1 on CPU)")
    dist_port: str = _f(DIST, "12355", "master port of the built-in multi-GPU launcher")
    dist_timeout: float = _f(DIST, 1800.0, "seconds before a stuck collective (or rendezvous) fails instead of hanging")
    ddp_leftovers: str = _f(DIST, "mix", "each bucket's last batches, too few to give every process one (issue 18): mix "
                                         "(trained in steps that mix neighbouring shapes, each as slow as its largest; "
                                         "the fastest for ImageNet-length runs, docs/benchmarks.md), drop (left out: "
                                         "every step one shape, up to processes-1 batches per bucket per epoch and every "
                                         "bucket with fewer batches than processes) or split (cut into equal smaller "
                                         "batches of their shape, one per process: every step one shape, each split "
                                         "size one more shape to warm up or compile)", choices=list(LEFTOVER_POLICIES))
    sync_bn: bool = _f(DIST, False, "SyncBatchNorm under DDP: BatchNorm statistics over the global batch rather than "
                                    "each GPU's own (for small per-GPU batches; collectives in every BatchNorm "
                                    "layer's forward and backward; torch's SyncBatchNorm on CUDA, an all-reduce "
                                    "version on CPUs under gloo; no effect with one process)")
    # --- checkpoints and logging ---
    output: str = _f(LOGS, "./runs_rect_ddp", "root folder of runs: {output}/{run_name}/checkpoints and /logs")
    run_name: str = _f(LOGS, "resnet50_rect", "subfolder of --output for this run")
    resume: str | None = _f(LOGS, None, "checkpoint to resume from, or 'auto' for the newest good one of this run")
    keep_checkpoints: int = _f(LOGS, 0, "keep only the newest K checkpoint_epoch_*.pth files (0: keep all, "
                                        "as the seed)")
    val_every: int = _f(LOGS, 1, "validate every N epochs (and always after the last)")
    print_freq: int = _f(LOGS, 50, "log a line every N batches (scalars are read from the device only then)")
    progress: str = _f(LOGS, "auto", "progress bar: auto (a tqdm bar only when stderr is a terminal; otherwise "
                                     "the periodic log lines only), on or off", choices=["auto", "on", "off"])
    log_to: str | None = _f(LOGS, None, "experiment trackers that get the metrics rows and the resolved config too, "
                                        "a comma list of wandb, mlflow (rank 0 only; each needs its package: pip install "
                                        "wandb / pip install mlflow). W&B reads WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE "
                                        "(offline: log locally, `wandb sync` later); MLflow reads MLFLOW_TRACKING_URI "
                                        "and MLFLOW_EXPERIMENT_NAME. A resumed run continues the same tracker run; a "
                                        "tracker that fails is switched off with one warning, never stopping the run")

    @property
    def warmup(self) -> float:
        """Warm-up epochs in effect: --warmup_epochs, else 5 (Goyal et al. 2017) capped at a tenth of the run."""
        return self.warmup_epochs if self.warmup_epochs is not None else min(5.0, self.epochs / 10)

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: what --no_amp and --amp_dtype ask for (CPU runs are fp32 whatever they ask)."""
        return "fp32" if self.no_amp else self.amp_dtype

    def augmentation(self) -> AugmentationConfig:
        return self.slice(AugmentationConfig)

    def slice(self, cls, **overrides):
        """A typed slice of the settings: ``cls`` (a dataclass whose fields are named like some of this config's)
        built from those fields, ``overrides`` for the rest (``cfg.slice(LoaderSettings, rank=1)``). Each part of
        the package declares what it needs, and nothing is copied from the config by hand."""
        names = {f.name for f in fields(self)}
        picked = {f.name: getattr(self, f.name) for f in fields(cls) if f.name in names and f.name not in overrides}
        return cls(**picked, **overrides)

    @classmethod
    def from_checkpoint(cls, saved: dict | None, source: str = "checkpoint") -> "TrainConfig":
        """The settings a checkpoint's ``config`` dict holds, as a ``TrainConfig``: today's defaults fill the keys
        that an older rectrain did not write, and keys this rectrain no longer knows are left out (not validated:
        the settings of a finished run are what they were)."""
        known = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in (saved or {}).items() if k in known}, source)

    def to_dict(self) -> dict:
        """Field names -> plain JSON values (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """The inverse of ``to_dict``; also reads the flag spellings of a config file (not validated)."""
        return cls(**settings_from_mapping(d, source))

    def validate(self) -> "TrainConfig":
        """Check every value and the combinations; raise UserError naming the flag and the fix."""
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        _check_combinations(self)
        try:
            self.augmentation()
        except ValueError as e:
            raise UserError(str(e)) from None
        return self


# ---------------------------------------------------------------------------------------------
# Validation: one rule per field (None of an optional field means "derived" and is always fine)

_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
_POSITIVE = (lambda v: v > 0, "positive")
_NOT_EMPTY = (lambda v: v != "", "a non-empty string")
_PORT = (lambda v: v.isdigit() and 0 < int(v) < 65536, "a TCP port number, 1-65535")
_DEVICE = (lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
           "auto, cpu, cuda or cuda:N")
_FRACTION_PAIR = (lambda v: 0 < v[0] <= v[1] <= 1, "two numbers MIN MAX with 0 < MIN <= MAX <= 1")

# Fields without a rule: the booleans, choices (checked from the metadata), resume (checked by train's
# preflight) and the augmentation fields (AugmentationConfig checks them).
RULES: dict[str, tuple] = {
    "data_dir": _NOT_EMPTY, "batch_size": _AT_LEAST_1, "workers": _NOT_NEGATIVE,
    "max_ratio": (lambda v: v >= 1, "at least 1, e.g. 2.0 for 1:2 .. 2:1"), "crop_scale": _FRACTION_PAIR,
    "val_batch_size": _AT_LEAST_1, "max_decode_failures": _NOT_NEGATIVE, "width": _AT_LEAST_1,
    "epochs": _AT_LEAST_1, "lr": _POSITIVE, "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": _NOT_NEGATIVE, "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)"), "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "min_lr": _NOT_NEGATIVE, "max_steps": _AT_LEAST_1, "device": _DEVICE, "nproc": _AT_LEAST_1,
    "dist_port": _PORT, "dist_timeout": _POSITIVE, "output": _NOT_EMPTY, "run_name": (lambda v: _plain_name(v), "one folder name (letters, digits, '.', '-', '_'; not '.' or '..', no '/'), "
                 "e.g. resnet50_lr02: the run's folder under --output"),
    "keep_checkpoints": _NOT_NEGATIVE, "val_every": _AT_LEAST_1, "print_freq": _AT_LEAST_1,
    "hflip": (lambda v: 0 <= v <= 1, "a probability in [0, 1] (0: never flip)"),
    "val_crop": (lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.875"),
    "val_target_size": (lambda v: v >= MULTIPLE and v % MULTIPLE == 0, f"a multiple of {MULTIPLE}, at least {MULTIPLE}"),
    "lr_per_256": _POSITIVE, "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9998 (0: off)"),
    "ema_every": _AT_LEAST_1, "initial_checkpoint": _NOT_EMPTY, "compile_cache": _NOT_EMPTY,
    "log_to": (lambda v: parse_log_to(v) is not None, "a comma list of wandb, mlflow, e.g. wandb or wandb,mlflow"),
    "poly_power": _POSITIVE, "lars_eta": _POSITIVE,
    "lamb_betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. 0.9 0.999"),
    "opt_eps": _NOT_NEGATIVE, "accum_steps": _AT_LEAST_1,
    "shard_cache": _NOT_EMPTY, "shard_cache_gb": _POSITIVE,
}


def _plain_name(v: str) -> bool:
    """A run name is one folder under --output: no path separators, no climbing out, nothing invisible."""
    return (v not in ("", ".", "..") and "/" not in v and "\\" not in v and v.isprintable() and v == v.strip()
            and not v.startswith("-"))


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f"--{f.name}")


def _check_field(f: dataclasses.Field, value) -> None:
    if value is None:
        return
    flag = flag_of(f)
    numbers = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise UserError(f"{flag} must be a finite number (got {value})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{flag} {value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}")
    if f.name in RULES:
        ok, requirement = RULES[f.name]
        if not ok(value):
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else repr(value)
            raise UserError(f"{flag} must be {requirement} (got {shown})")


def _check_combinations(cfg: TrainConfig) -> None:
    t = cfg.target_size
    if t < MULTIPLE:
        raise UserError(f"--target_size must be at least {MULTIPLE} (got {t})")
    if t % MULTIPLE:  # every bucket side is a multiple of the network's stride; no silent rounding
        low = t // MULTIPLE * MULTIPLE
        raise UserError(f"--target_size must be a multiple of {MULTIPLE}, the network's stride (got {t}): "
                        f"use {low} or {low + MULTIPLE}")
    if cfg.warmup_epochs is not None and not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise UserError(f"--warmup_epochs must be between 0 and --epochs={cfg.epochs} (got {cfg.warmup_epochs})")
    if cfg.min_lr > cfg.lr:
        raise UserError(f"--min_lr {cfg.min_lr} is above --lr {cfg.lr}: the cosine decay ends at --min_lr; "
                        "lower it (0 is usual)")
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("--nesterov needs a momentum: set --momentum (e.g. 0.9) or drop --nesterov")
    if cfg.nesterov and cfg.opt == "lamb":
        raise UserError("--nesterov is for --opt sgd or lars; LAMB has no Nesterov variant here: drop --nesterov")
    if cfg.res_schedule:
        ResolutionSchedule.parse(cfg.res_schedule).check_epochs(cfg.epochs)
    if cfg.cuda_graphs and cfg.compile == "off":
        raise UserError("--cuda_graphs runs the compiled step (torch.compile's reduce-overhead mode) and --no_compile "
                        "(--compile off) turns compiling off: drop one of them")


def check_data_dir(data_dir: str) -> None:
    """UserError unless ``data_dir`` holds a train/ folder, saying what it looks like instead (no torch: it answers
    before anything heavy is imported)."""
    from rectrain.data.shards import is_shards
    if is_shards(data_dir):  # tar shards: their layout is checked when they are listed (rectrain.data.shards)
        return
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} does not exist; point it at a folder holding "
                        "train/<class>/<images> and val/<class>/<images> (try `rectrain synth --out DIR` for a demo set)")
    if os.path.isdir(os.path.join(data_dir, "train")):
        return
    parent = os.path.dirname(os.path.abspath(data_dir))
    hint = ""
    if os.path.basename(os.path.normpath(data_dir)) in ("train", "val") and os.path.isdir(os.path.join(parent, "train")):
        hint = f"; it looks like the {os.path.basename(os.path.normpath(data_dir))}/ folder itself: pass its parent, " \
               f"--data_dir {parent}"
    raise UserError(f"--data_dir {data_dir} has no train/ folder; expected DATA_DIR/train/<class>/<images> "
                    f"and DATA_DIR/val/<class>/<images>{hint}")


def check_resume_path(resume: str | None) -> None:
    """UserError when --resume names something that is not a checkpoint file, with what to pass instead."""
    if not resume or resume == "auto" or os.path.isfile(resume):
        return
    if os.path.isdir(resume):
        found = sorted(f for f in os.listdir(resume) if f.endswith(".pth"))
        if not found and os.path.isdir(os.path.join(resume, "checkpoints")):
            resume = os.path.join(resume, "checkpoints")
            found = sorted(f for f in os.listdir(resume) if f.endswith(".pth"))
        listed = f"pass one of its checkpoints ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found \
            else "it holds no checkpoint (*.pth)"
        raise UserError(f"--resume {resume} is a folder, not a checkpoint file: {listed}, e.g. --resume "
                        f"{os.path.join(resume, found[-1] if found else 'last.pth')}; or --resume auto for the newest "
                        "of --run_name")
    raise UserError(f"--resume {resume}: no such checkpoint file (use --resume auto for the newest of this run)")


# ---------------------------------------------------------------------------------------------
# Config files: keys (flag or field spelling) -> typed field values


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """('bool' | 'int' | 'float' | 'str' | 'pair', optional?) from the annotation (a string here)."""
    t = str(f.type)
    base = t.replace("| None", "").strip()
    return ("pair" if base.startswith("tuple") else base), "None" in t


def _as_bool(v):
    if isinstance(v, bool):
        return v
    raise TypeError


def _as_int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError  # "32" is a string: a file's values are typed, as flags are (write 32)
    return v


def _as_float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError  # (YAML files are read with a loader that takes 1e-4 as the number it is)
    return float(v)


def _as_str(v):
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise TypeError
    return str(v)  # dist_port = 12355 is written as a number in TOML


def _as_pair(v):
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise TypeError
    return tuple(_as_float(x) for x in v)


# kind -> (converter, what the value should be)
_CONVERTERS = {"bool": (_as_bool, "true or false"), "int": (_as_int, "a whole number"),
               "float": (_as_float, "a number"), "str": (_as_str, "a string"),
               "pair": (_as_pair, "a list of two numbers, e.g. [0.08, 1.0]")}


def _convert(f: dataclasses.Field, key: str, value, source: str, inverted: bool = False):
    kind, optional = _kind(f)
    if value is None and optional:
        return None
    bools = f.metadata.get("bools")  # a choice that a switch also spells: (what false means, what true means)
    if bools is not None and (inverted or isinstance(value, bool)):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} = {json.dumps(value, default=str)} must be true or false")
        return bools[value != inverted]  # compile = false (a run of rectrain before --compile auto): "off"
    convert, expected = _CONVERTERS[kind]
    try:
        return (not convert(value)) if inverted else convert(value)
    except (TypeError, ValueError):
        expected += " or null" if optional else ""
        shown = json.dumps(value, default=str)
        unquote = (f" (write {value} without quotes)" if isinstance(value, str) and kind in ("int", "float")
                   and _is_number(value) else "")
        raise UserError(f"{source}: {key} = {shown} must be {expected}{unquote}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_keys() -> dict[str, tuple[str, bool]]:
    """Accepted config-file key -> (field name, inverted?): every field name, and every flag without dashes."""
    keys = {}
    for f in fields(TrainConfig):
        keys[f.name] = (f.name, False)
        keys[flag_of(f)[2:]] = (f.name, bool(f.metadata.get("invert")))
        if "off_flag" in f.metadata:  # no_compile = true
            keys[f.metadata["off_flag"][2:]] = (f.name, True)
    return keys


# Other tools' names for settings (timm, torchvision's references, common scripts) -> ours, for the did-you-mean.
ALIASES = {"learning_rate": "lr", "num_workers": "workers", "bs": "batch_size", "img_size": "target_size",
           "image_size": "target_size", "input_size": "target_size", "model": "arch", "num_epochs": "epochs",
           "wd": "weight_decay", "smoothing": "label_smoothing", "mixup": "mixup_alpha", "cutmix": "cutmix_alpha",
           "amp": "no_amp", "output_dir": "output", "experiment": "run_name", "warmup": "warmup_epochs",
           "model_ema_decay": "ema_decay"}


def settings_from_mapping(data: dict, source: str) -> dict:
    """Config-file mapping -> {field name: value of the field's type}; one UserError per mistake."""
    keys, by_name = config_keys(), {f.name: f for f in fields(TrainConfig)}
    out, spelled = {}, {}
    for key, value in data.items():
        if key == "config":
            raise UserError(f"{source}: a config file cannot name another config file (key 'config')")
        if key not in keys:
            hint = did_you_mean(str(key), keys) or (f" (did you mean {ALIASES[key]}?)" if key in ALIASES else "")
            raise UserError(f"{source}: unknown key {key!r}{hint}; "
                            "the keys are the flag names of `rectrain train --help` without the dashes")
        name, inverted = keys[key]
        value = _convert(by_name[name], key, value, source, inverted)
        if name in out and out[name] != value:
            raise UserError(f"{source}: {spelled[name]} and {key} contradict each other (both set {name}); keep one")
        out[name], spelled[name] = value, key
    return out


def load_config_file(path: str) -> dict:
    """Read a .toml, .yaml/.yml or .json file -> {field name: typed value}."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    data = _read_mapping(path)
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting names to values")
    return settings_from_mapping(data, f"config file {path}")


def _yaml_loader(yaml):
    """PyYAML's safe loader, reading 1e-4 and 5E+3 as the numbers they are (YAML 1.1 wants a dot: 1.0e-4)."""
    import re

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))
    return Loader


def _read_mapping(path: str):
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".toml", ".yaml", ".yml"):
        raise UserError(f"config file {path}: use a .toml, .yaml/.yml or .json extension")
    if ext == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise UserError("reading TOML on Python 3.10 needs `pip install tomli`; or use a .json file") from None
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise UserError("reading YAML needs `pip install pyyaml`; or use a .toml or .json file") from None
    try:
        if ext == ".toml":
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        with open(path) as fh:
            return json.load(fh) if ext == ".json" else (yaml.load(fh, Loader=_yaml_loader(yaml)) or {})
    except Exception as e:  # a syntax error in the user's file
        raise UserError(f"cannot parse config file {path}: {' '.join(str(e).split())}") from None


# ---------------------------------------------------------------------------------------------
# Command line


def _switch_help(f: dataclasses.Field) -> str:
    if flag_of(f).startswith("--no_"):
        return f"turn off {f.metadata['help']} (on by default)"
    return f"turn on {f.metadata['help']} (off by default)"


def _add_flag(group, f: dataclasses.Field) -> None:
    kind, _ = _kind(f)
    flag, meta = flag_of(f), f.metadata
    if kind == "bool":
        action = "store_false" if meta.get("invert") else "store_true"
        group.add_argument(flag, dest=f.name, action=action, default=f.default, help=_switch_help(f))
        return
    kw = {"default": f.default, "help": meta["help"]}
    if "choices" in meta:
        kw["choices"] = meta["choices"]
    if "const" in meta:  # the value of the bare flag: --compile is --compile on
        kw.update(nargs="?", const=meta["const"])
    if kind == "pair":
        kw.update(nargs=2, type=float, metavar=meta.get("metavar", ("MIN", "MAX")))
    elif kind in ("int", "float"):
        kw.update(type=int if kind == "int" else float, metavar="N" if kind == "int" else "X")
    else:
        kw["metavar"] = f.name.upper() if "choices" not in meta else None
    group.add_argument(flag, dest=f.name, **kw)
    if "off_flag" in meta:
        group.add_argument(meta["off_flag"], dest=f.name, action="store_const", const=meta["bools"][0],
                           default=f.default, help=f"the same as {flag} {meta['bools'][0]} ({flag} {f.default} by default)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train flags, in help sections; ``--config`` first."""
    parser.usage = "%(prog)s [--config FILE] [--FLAG VALUE ...] [--SWITCH ...]"
    parser.add_argument("--config", metavar="FILE", help=(
        "TOML, YAML or JSON file of settings. Keys are the flags without the dashes (batch_size = 512, "
        "no_mixup = true, cutout = true) or the field names of a run's config.json (use_mixup = false); "
        "one setting given both ways must agree. Flags on the command line override the file"))
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        _add_flag(groups[f.metadata["group"]], f)


def build_parser(prog: str = "rectrain train") -> argparse.ArgumentParser:
    parser = ArgParser(prog=prog, formatter_class=HelpFormatter,
                       description="Train a ResNet on an image folder with rectangular, aspect-ratio bucketed batches.")
    add_arguments(parser)
    return parser


def given_settings(argv: list[str]) -> set[str]:
    """Field names that ``argv`` sets, on the command line or in its ``--config`` file (the rest are defaults).

    On resume the checkpoint's settings replace the defaults, and only these override them."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # an option that is not given leaves no attribute
    args = vars(parser.parse_args(argv))
    config = args.pop("config", None)
    return set(args) | (set(load_config_file(config)) if config else set())


def resolve_config(argv: list[str], prog: str = "rectrain train") -> TrainConfig:
    """Resolve a config file (``--config``) and flags into a validated TrainConfig; flags win over the file."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from_file = {}
    if args.config:
        from_file = load_config_file(args.config)
        parser.set_defaults(**from_file)  # typed values: argparse converts only strings
        args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    _settle_lr(values, from_file, argv)
    return TrainConfig(**values).validate()


def _settle_lr(values: dict, from_file: dict, argv: list[str]) -> None:
    """--lr and --lr_per_256 are two ways to give one rate: exclusive where given together, and the command line
    wins over the config file (a file's lr with --lr_per_256 on the command line uses --lr_per_256)."""
    on_cli = {name for name in ("lr", "lr_per_256") if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)}
    in_file = {name for name in ("lr", "lr_per_256") if from_file.get(name) is not None}
    if len(on_cli) == 2 or (not on_cli and len(in_file) == 2):
        raise UserError("--lr (the rate for the global batch) and --lr_per_256 (the rate per 256 images, scaled "
                        "with the global batch) are exclusive: give one")
    if on_cli == {"lr"}:
        values["lr_per_256"] = None
    elif on_cli == {"lr_per_256"} and "lr" in in_file:
        values["lr"] = TrainConfig.lr  # the file's --lr gives way; lr_per_256 sets the rate
