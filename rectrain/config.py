"""The training configuration: one typed dataclass, the seed's flag names and defaults.

Every field is a command-line flag of `rectrain train` / `python train_g4.dn_12xlarge.py` and a key of
an optional config file (`--config run.toml|.yaml|.json`); flags given on the command line override the
file. Unknown keys in a file are an error, so a typo never silently does nothing. The resolved config
is saved as `config.json` in the run folder and inside every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

from rectrain.augment import AugmentationConfig
from rectrain.buckets import RECT_MODES
from rectrain.errors import UserError
from rectrain.model import ARCHS


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- data & model (seed) ---
    data_dir: str = _f("/mnt/data/imagenet", "dataset root holding train/<class>/* and val/<class>/*")
    batch_size: int = _f(256, "batch size per GPU (per process); the global batch is this x world size")
    target_size: int = _f(224, "shorter side of the crops (short_side mode) or sqrt of their area (area mode); multiple of 32")
    workers: int = _f(8, "DataLoader worker processes per GPU; capped to the CPU cores available")
    # --- optimisation (seed) ---
    epochs: int = _f(90, "total training epochs")
    lr: float = _f(0.1, "peak learning rate for the GLOBAL batch (linear-scaling rule: 0.1 x global/256)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "L2 weight decay (not applied to BatchNorm parameters or biases)")
    no_amp: bool = _f(False, "disable mixed precision (train in fp32)", flag="--no_amp")
    seed: int = _f(42, "random seed: data order, crops, augmentations, initial weights")
    dist_port: str = _f("12355", "master port of the built-in multi-GPU launcher")
    # --- logging & checkpointing (seed) ---
    output: str = _f("./runs_rect_ddp", "root folder of runs: {output}/{run_name}/checkpoints and /logs")
    run_name: str = _f("resnet50_rect", "subfolder of --output for this run")
    resume: str | None = _f(None, "checkpoint to resume from, or 'auto' for the newest good one of this run")
    print_freq: int = _f(50, "log a line every N batches (scalars are read from the device only then)")
    # --- additions ---
    arch: str = _f("resnet50", "model architecture", choices=sorted(ARCHS))
    width: int = _f(64, "stem width of the ResNet (64 is the paper's; smaller for quick tests)")
    amp_dtype: str = _f("bf16", "mixed-precision dtype: bf16 (no loss scaling needed, same range as fp32; "
                                "the default on Ampere and newer) or fp16 (with a GradScaler; for older GPUs)",
                        choices=["bf16", "fp16"])
    label_smoothing: float = _f(0.1, "label smoothing, composed with MixUp/CutMix targets")
    warmup_epochs: float | None = _f(None, "linear learning-rate warm-up, in epochs, before the cosine decay "
                                         "(default: 5, or a tenth of --epochs when that is shorter)")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine decay")
    nesterov: bool = _f(False, "use Nesterov momentum")
    rect_mode: str = _f("short_side", "bucket shapes: short_side (shorter side = target_size, as the seed) "
                                      "or area (H*W ~ target_size^2: the compute of square crops)",
                        choices=list(RECT_MODES))
    max_ratio: float = _f(2.0, "widest aspect ratio kept (2.0 = 1:2 .. 2:1); wider images are cropped to it")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "random-resized-crop area range, as a fraction of the "
                                                      "largest crop of the bucket's ratio (Inception/torchvision default)")
    decoder: str = _f("auto", "JPEG decoder in the workers: auto (OpenCV when installed, else Pillow), opencv or pil",
                      choices=["auto", "opencv", "pil"])
    val_every: int = _f(1, "validate every N epochs (and always after the last)")
    val_batch_size: int | None = _f(None, "validation batch size per GPU (default: --batch_size)")
    keep_checkpoints: int = _f(0, "keep only the newest K checkpoint_epoch_*.pth files (0: keep all, as the seed)")
    device: str = _f("auto", "cuda, cpu or auto (cuda when available)")
    nproc: int | None = _f(None, "processes for the built-in launcher (default: every visible GPU; 1 on CPU)")
    dist_timeout: float = _f(1800.0, "seconds before a stuck collective (or rendezvous) fails instead of hanging")
    channels_last: bool = _f(True, "channels_last memory format on CUDA", flag="--no_channels_last", invert=True)
    compile: bool = _f(False, "torch.compile the model (a few minutes of compile time; faster steps)")
    max_decode_failures: int = _f(100, "stop the run when more images than this fail to decode")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in total (smoke tests, benchmarks)")
    deterministic: bool = _f(False, "deterministic algorithms (bit-exact resume; slower on GPU)")
    # --- batch augmentations (seed's AugmentationConfig) ---
    use_mixup: bool = _f(True, "MixUp", flag="--no_mixup", invert=True)
    mixup_alpha: float = _f(0.2, "MixUp Beta(alpha, alpha)")
    use_cutmix: bool = _f(True, "CutMix", flag="--no_cutmix", invert=True)
    cutmix_alpha: float = _f(1.0, "CutMix Beta(alpha, alpha)")
    use_cutout: bool = _f(False, "Cutout (square holes)", flag="--cutout")
    cutout_n_holes: int = _f(1, "Cutout holes per image")
    cutout_length: int = _f(8, "Cutout hole side in pixels")
    cutout_prob: float = _f(0.5, "probability that an image gets Cutout")
    use_random_erasing: bool = _f(True, "Random Erasing", flag="--no_random_erasing", invert=True)
    random_erasing_prob: float = _f(0.25, "probability that an image gets Random Erasing")
    random_erasing_scale: tuple[float, float] = _f((0.02, 0.33), "erased area range (fraction of the image)")
    batch_aug_prob: float = _f(0.5, "probability that a batch gets MixUp or CutMix")

    @property
    def warmup(self) -> float:
        """Warm-up epochs in effect: --warmup_epochs, else 5 (Goyal et al. 2017) capped at a tenth of the run."""
        return self.warmup_epochs if self.warmup_epochs is not None else min(5.0, self.epochs / 10)

    def augmentation(self) -> AugmentationConfig:
        names = {f.name for f in fields(AugmentationConfig)}
        return AugmentationConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}; see `rectrain train --help` for the names")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def validate(self) -> "TrainConfig":
        """Check values and combinations; raise UserError naming the flag and the fix."""
        positive = ["batch_size", "target_size", "epochs", "print_freq", "val_every", "width"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.target_size < 32:
            raise UserError(f"--target_size must be at least 32 (got {self.target_size})")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")
        if self.workers < 0 or self.keep_checkpoints < 0 or self.max_decode_failures < 0:
            raise UserError("--workers, --keep_checkpoints and --max_decode_failures cannot be negative")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise UserError(f"--warmup_epochs must be between 0 and --epochs={self.epochs} (got {self.warmup_epochs})")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(f"--crop_scale must be two numbers 0 < min <= max <= 1 (got {self.crop_scale})")
        if self.max_ratio < 1:
            raise UserError(f"--max_ratio must be >= 1, e.g. 2.0 for 1:2 .. 2:1 (got {self.max_ratio})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if self.nproc is not None and self.nproc < 1:
            raise UserError(f"--nproc must be at least 1 (got {self.nproc})")
        if not self.dist_port.isdigit() or not 0 < int(self.dist_port) < 65536:
            raise UserError(f"--dist_port must be a TCP port number (got {self.dist_port!r})")
        try:
            self.augmentation()
        except ValueError as e:
            raise UserError(str(e)) from None
        return self


# ---------------------------------------------------------------------------------------------
# Command line and config files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file of settings (keys = flag names "
                                                         "without dashes); flags on the command line override it")
    for f in fields(TrainConfig):
        meta = f.metadata
        flag = meta.get("flag", f"--{f.name}")
        if f.type in ("bool", bool):
            action = "store_false" if meta.get("invert") else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=f.default, help=meta["help"])
            continue
        kw = {"default": f.default, "help": meta["help"]}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if "tuple" in str(f.type):
            kw.update(nargs=2, type=float, metavar=("MIN", "MAX"))
        elif "int" in str(f.type):
            kw["type"] = int
        elif "float" in str(f.type):
            kw["type"] = float
        parser.add_argument(flag, dest=f.name, **kw)


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path) as fh:
                data = json.load(fh)
        elif ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise UserError("reading TOML on Python 3.10 needs `pip install tomli`; or use a .json file") from None
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise UserError("reading YAML needs `pip install pyyaml`; or use a .toml or .json file") from None
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        else:
            raise UserError(f"config file {path}: use a .toml, .yaml/.yml or .json extension")
    except UserError:
        raise
    except Exception as e:  # a syntax error in the user's file
        raise UserError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting names to values")
    data.pop("config", None)
    TrainConfig.from_dict({k: v for k, v in data.items()})  # rejects unknown keys early, with names
    return data


def build_parser(prog: str = "rectrain train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a ResNet on an image folder with rectangular, "
                                     "aspect-ratio bucketed batches.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


def resolve_config(argv: list[str], prog: str = "rectrain train") -> TrainConfig:
    """Resolve a config file (``--config``) and flags into a validated TrainConfig; flags win over the file."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.config:
        file_values = load_config_file(args.config)
        parser.set_defaults(**{k: tuple(v) if isinstance(v, list) else v for k, v in file_values.items()})
        args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return TrainConfig(**values).validate()
