"""The seed's pre-training checklist, automated (`rectrain check`, whose command line is
``rectrain.commands.check``).

Takes the training flags (or ``--config FILE``) and checks what the run will meet: software, GPUs,
the dataset's layout, the aspect-ratio cache, unusable files, free disk, a writable ``--output``, GPU
memory at ``--batch_size`` and the loader's speed. One line per item, each ``pass``, ``warn``,
``fail`` or ``skip`` (does not apply here), with the fix on a warning or failure. Exit status 1 when
something would make the run fail; warnings do not. ``--json`` prints the items as one JSON list.

It changes nothing: no scan (that is ``rectrain scan``), no cache, no run folder; the write test
removes its probe file.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from rectrain.config import TrainConfig
from rectrain.data.buckets import make_buckets
from rectrain.data.index import FileList, describe_skipped, list_files, missing_classes, name_some
from rectrain.data.scan import INLINE_BELOW, BadImage, CacheStatus, SplitScan, cache_status, read_size
from rectrain.data.shards import is_remote, is_shards
from rectrain.data.workers import cap_workers
from rectrain.errors import UserError
from rectrain.runtime.io import usable_cores
from rectrain.runtime.lock import busy_holder

MIN_PYTHON = (3, 10)
MIN_TORCH = "2.4"
GiB = 1024 ** 3
MiB = 1024 ** 2
CKPT_EXTRA = 1 * MiB  # per checkpoint beyond weights and momentum: RNG states of every rank, config, metadata
RUN_EXTRA = 128 * MiB  # logs, metrics, curves.png and (for read-only data) the scan cache in the run folder
LOW_FREE_GPU = 0.8  # warn when a GPU has less than this share of its memory free (another process uses it)
HIGH_PEAK_GPU = 0.9  # warn when the probe's peak uses more than this share of the GPU
LOADER_SECONDS = 4.0  # at most this long per loader probe (two probes: 1 and --workers)
SCALING = 0.75  # workers "scale" when W of them decode at least this share of W times one worker's rate
PROBE_BATCH = 32  # loader probe batch size cap: images/s barely depends on it; fewer images to read
HEADER_SAMPLE = 32  # files whose headers are timed to estimate a full scan


@dataclass
class Item:
    name: str
    status: str  # "pass", "warn", "fail" or "skip"
    message: str
    fix: str | None = None  # what to change, on a warning or failure
    details: dict = field(default_factory=dict)  # the numbers behind the message, for --json


@dataclass
class _State:
    """What the checks learn on the way, for the checks after them."""

    cfg: TrainConfig
    device: str | None = None  # "cuda:0", "cpu", or None when the asked-for device does not exist
    train: FileList | None = None
    val: FileList | None = None
    caches: dict = field(default_factory=dict)  # split -> CacheStatus
    gpu_images_per_s: float | None = None  # training speed at the largest bucket, from the memory probe
    gpu_shape: tuple[int, int] | None = None  # (H, W) of that bucket

    @property
    def run_dir(self) -> str:
        return os.path.join(self.cfg.output, self.cfg.run_name)

    @property
    def num_classes(self) -> int:
        return len(self.train.index.classes) if self.train else 1000

    def cache(self, split: str) -> CacheStatus:
        if split not in self.caches:
            files = self.train if split == "train" else self.val
            self.caches[split] = cache_status(self.cfg.data_dir, split, files.index.classes,
                                              cache_dir=self.run_dir, files=files)
        return self.caches[split]


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    return f"about {seconds:,.0f} s" if seconds < 120 else f"about {seconds / 60:,.0f} min"


def _names(items, k: int = 3) -> str:
    items = list(items)
    return ", ".join(map(str, items[:k])) + (f" and {len(items) - k:,} more" if len(items) > k else "")


# -- software ---------------------------------------------------------------------------------------
def check_python() -> Item:
    v = sys.version_info
    ok = v[:2] >= MIN_PYTHON
    return Item("python", "pass" if ok else "fail", f"{v.major}.{v.minor}.{v.micro}",
                None if ok else f"use Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")


def check_torch() -> Item:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    if torch.backends.cudnn.is_available():
        build += f", cuDNN {torch.backends.cudnn.version()}"
    ok = torch.__version__ >= MIN_TORCH  # TorchVersion compares as a version, not as a string
    return Item("pytorch", "pass" if ok else "fail", f"{torch.__version__} ({build})",
                None if ok else f"pip install 'torch>={MIN_TORCH}' (the CUDA build for your driver: "
                                "https://pytorch.org/get-started/locally/)",
                {"version": str(torch.__version__), "cuda": torch.version.cuda})


def check_opencv(cfg: TrainConfig) -> Item:
    from rectrain.data.transforms import cv2  # None when missing: the decoder's own view
    if cv2 is not None:
        note = " (unused: --decoder pil)" if cfg.decoder == "pil" else ": the fast JPEG decoder"
        return Item("opencv", "pass", f"{cv2.__version__}{note}")
    fix = "pip install opencv-python-headless"
    if cfg.decoder == "opencv":
        return Item("opencv", "fail", "not installed, but --decoder opencv asks for it", f"{fix}, or --decoder auto")
    return Item("opencv", "warn", "not installed: the loader decodes with Pillow, about 1.5-1.8x slower per core", fix)


def check_decoder(cfg: TrainConfig) -> Item:
    """Which JPEG decoder the workers will run (``--decoder``), and how to get the region decoder where it is missing."""
    from rectrain.data.transforms import decoder_problem, resolve_decoder
    wheel = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info < (3, 14)
    fix = "pip install turbojpeg" if wheel else None  # its wheels (Linux x86_64, CPython <= 3.13) ship libjpeg-turbo 3
    if cfg.decoder == "turbo" and decoder_problem("turbo"):
        return Item("decoder", "fail", f"--decoder turbo cannot be used: {decoder_problem('turbo')}",
                    f"{fix + ', or ' if fix else ''}--decoder auto")
    used = resolve_decoder(cfg.decoder)
    if used == "turbo":
        return Item("decoder", "pass", "turbo: only each crop's region of a JPEG is decoded (libjpeg-turbo 3); "
                                       "other files go to OpenCV, then Pillow", None, {"decoder": used})
    text = {"opencv": "opencv: whole JPEGs are decoded", "pil": "pil: Pillow decodes every image"}[used]
    if cfg.decoder == "auto" and fix:  # the package's own dependency here: an install that lost it
        return Item("decoder", "warn", f"{text}; the region decoder is missing ({decoder_problem('turbo')})",
                    fix, {"decoder": used})
    return Item("decoder", "pass", text + (" (--decoder)" if cfg.decoder != "auto" else ""), None, {"decoder": used})


# -- GPUs -------------------------------------------------------------------------------------------
def check_cuda(state: _State) -> Item:
    cfg = state.cfg
    wants_cuda = cfg.device.startswith("cuda")
    if not torch.cuda.is_available():
        state.device = None if wants_cuda else "cpu"
        if not wants_cuda:
            return Item("cuda", "skip", "no CUDA GPU: the run trains on the CPU, in fp32 (fine for tests and demos)")
        fix = ("this PyTorch is a CPU-only build: install a CUDA build (https://pytorch.org/get-started/locally/)"
               if torch.version.cuda is None else
               "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --device cpu")
        return Item("cuda", "fail", f"--device {cfg.device} but no CUDA GPU is visible", fix)
    n = torch.cuda.device_count()
    index = int(cfg.device.split(":")[1]) if cfg.device.startswith("cuda:") else 0
    if index >= n:
        state.device = None
        return Item("cuda", "fail", f"--device {cfg.device} but only {n} GPU(s) are visible",
                    f"use --device cuda:0 .. cuda:{n - 1}")
    state.device = "cpu" if cfg.device == "cpu" else f"cuda:{index}"
    return _describe_gpus(cfg, n, state.device)


def _describe_gpus(cfg: TrainConfig, n: int, device: str) -> Item:
    gpus, problems, fixes = [], [], []
    for i in range(n):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": props.name, "free_bytes": free, "total_bytes": total,
                     "capability": f"{props.major}.{props.minor}"})
        if free < LOW_FREE_GPU * total:
            problems.append(f"GPU {i} has only {_gib(free)} of {_gib(total)} free: another process is using it")
            fixes.append("stop the other processes (nvidia-smi lists them) or pick free GPUs with CUDA_VISIBLE_DEVICES")
        if device != "cpu" and not cfg.no_amp and cfg.amp_dtype == "bf16" and props.major < 8:
            problems.append(f"GPU {i} ({props.name}) predates Ampere: bf16 is slow or unsupported there")
            fixes.append("use --amp_dtype fp16 on GPUs older than Ampere")
    text = "; ".join(f"{g['index']}: {g['name']}, {_gib(g['free_bytes'])} of {_gib(g['total_bytes'])} free"
                     for g in gpus)
    if device == "cpu":
        text += " (unused: --device cpu)"
    if problems:
        return Item("cuda", "warn", f"{text}. {'; '.join(problems)}", "; ".join(dict.fromkeys(fixes)), {"gpus": gpus})
    return Item("cuda", "pass", text, None, {"gpus": gpus})


# -- dataset ----------------------------------------------------------------------------------------
def _class_counts(files: FileList) -> np.ndarray:
    return np.bincount(files.index.labels, minlength=len(files.index.classes))


def _split_summary(files: FileList) -> tuple[str, dict]:
    counts = _class_counts(files)
    classes = files.index.classes
    lo, hi = int(np.argmin(counts)), int(np.argmax(counts))
    spread = (f"{counts[lo]:,} per class" if counts[lo] == counts[hi] else
              f"smallest {classes[lo]}: {counts[lo]:,}, largest {classes[hi]}: {counts[hi]:,}")
    text = f"{len(files.index):,} images in {len(classes):,} classes ({spread})"
    return text, {"images": len(files.index), "classes": len(classes), "smallest": [classes[lo], int(counts[lo])],
                  "largest": [classes[hi], int(counts[hi])]}


def check_train_split(state: _State) -> Item:
    try:
        state.train = list_files(state.cfg.data_dir, "train")
    except UserError as e:
        return Item("train data", "fail", str(e), "point --data_dir at DATA_DIR holding train/<class>/<images>")
    text, details = _split_summary(state.train)
    skipped = describe_skipped(state.train.index)
    if skipped:
        text += "; skipped " + "; ".join(skipped)
    return Item("train data", "pass", f"{state.train.index.split_dir}: {text}", None, details)


def check_val_split(state: _State) -> Item:
    cfg = state.cfg
    if state.train is None:
        return Item("val data", "skip", "train data failed")
    if not os.path.isdir(os.path.join(cfg.data_dir, "val")):
        return Item("val data", "warn", f"{cfg.data_dir} has no val/ folder: the run trains without validation",
                    "add DATA_DIR/val/<class>/<images> to see top-1/top-5 each epoch")
    try:
        state.val = list_files(cfg.data_dir, "val", state.train.index.classes)
    except UserError as e:
        return Item("val data", "fail", str(e), "give val/ only class folders that train/ has, each with images")
    present = np.flatnonzero(_class_counts(state.val))
    text = f"{len(state.val.index):,} images in {len(present):,} of train's {len(state.train.index.classes):,} classes"
    details = {"images": len(state.val.index), "classes": len(present)}
    missing = missing_classes(state.train.index, state.val.index)
    if missing:
        return Item("val data", "warn", f"{state.val.index.split_dir}: {text}; no val images for {name_some(missing)}: "
                    "their accuracy is never measured", "add val/<class>/ images for those classes",
                    {**details, "missing": missing})
    return Item("val data", "pass", f"{state.val.index.split_dir}: {text}", None, details)


def check_empty_classes(state: _State) -> Item:
    """A train class folder without images still gets an output of the head, one that never sees an example."""
    if state.train is None:
        return Item("empty classes", "skip", "train data failed")
    classes = state.train.index.classes
    empty = [classes[i] for i in np.flatnonzero(_class_counts(state.train) == 0)]
    cache = state.cache("train")
    unusable = []
    if cache.fresh:  # folders with files, none of them usable
        usable = np.bincount(cache.scan.index.labels, minlength=len(classes))
        unusable = [classes[i] for i in np.flatnonzero(usable == 0) if classes[i] not in empty]
    if not empty and not unusable:
        return Item("empty classes", "pass", f"every one of the {len(classes):,} train class folders holds images")
    parts = [f"{len(empty)} without image files ({_names(empty)})"] if empty else []
    parts += [f"{len(unusable)} without a usable image ({_names(unusable)})"] if unusable else []
    return Item("empty classes", "fail",
                f"train class folders: {'; '.join(parts)}: each still adds a class to the model's head, "
                "one it never sees (the class count is the number of folders)",
                "remove those folders from train/ (and val/), or add images to them",
                {"empty": empty, "unusable": unusable})


# -- tar shards -------------------------------------------------------------------------------------
def check_shard_split(state: _State, split: str) -> Item:
    """Shards in place of a split's folder: how many, how big, and whether their index is fresh (it plays the cache's
    part: without it the run's first start reads every shard once)."""
    from rectrain.data.shard_index import index_status
    from rectrain.data.shards import shard_layout
    cfg, name = state.cfg, f"{split} data"
    if split == "val" and state.train is None and not state.caches:
        return Item(name, "skip", "train data failed")
    try:
        layout = shard_layout(cfg.data_dir)
        if split == "val" and not layout.splits.get("val"):
            return Item(name, "warn", f"{cfg.data_dir} names no val shards: the run trains without validation",
                        "add shards whose names contain 'val' (e.g. val-000000.tar) to see top-1/top-5 each epoch")
        shards = layout.shards(split)
        classes = state.train.index.classes if split == "val" and state.train is not None else None
        st = state.caches[split] = index_status(cfg.data_dir, split, classes, cache_dir=state.run_dir)
    except UserError as e:
        return Item(name, "fail", str(e), "point --data_dir at the shards (a folder of *.tar, a brace pattern or a "
                    "list file; `rectrain --help` of train explains)")
    size = sum(os.path.getsize(s) for s in shards if not is_remote(s))
    where = f"{len(shards):,} shards" + (f", {_gib(size)}" if size else " (remote)")
    details = {"shards": len(shards), "bytes": size, "index": st.path, "fresh": st.fresh}
    if not st.fresh and layout.remote:
        return Item(name, "warn", f"{where}: the run fetches the index shipped beside them ({split}.index.npz) if "
                    "there is one, else downloads every shard once to index it", None, details)
    if not st.fresh:
        what = f"its index {st.path} no longer matches them" if st.path else "not indexed yet"
        return Item(name, "warn", f"{where}; {what}: the run's start reads every shard once to index them",
                    f"`rectrain scan --data_dir {cfg.data_dir}` indexes them ahead of time", details)
    index = st.scan.index
    files = FileList(index, np.zeros(len(index), np.int64), np.zeros(len(index), np.int64))
    if split == "train":
        state.train = files
    else:
        state.val = files
    text, more = _split_summary(files)
    return Item(name, "pass", f"{where}: {text} (index {st.path})", None, {**details, **more})


# -- aspect-ratio cache and unusable files ----------------------------------------------------------
def seconds_per_header(files: FileList, k: int = HEADER_SAMPLE, seed: int = 0) -> float:
    """Measured seconds to read one image header (what the scan does per file), on a sample of ``k`` files."""
    n = len(files.index)
    pick = np.random.default_rng(seed).choice(n, size=min(k + 1, n), replace=False)
    try:
        read_size(files.index.abspath(int(pick[0])))  # untimed: Pillow loads its format plugins on first use
    except BadImage:
        pass
    pick = pick[1:] if len(pick) > 1 else pick
    t0 = time.perf_counter()
    for i in pick:
        try:
            read_size(files.index.abspath(int(i)))
        except BadImage:
            pass
    return (time.perf_counter() - t0) / len(pick)


def _scan_estimate(files: FileList) -> float:
    """Seconds a run's first scan of ``files`` takes: one core below INLINE_BELOW files, else all usable cores."""
    workers = usable_cores() if len(files.index) >= INLINE_BELOW else 1
    return len(files.index) * seconds_per_header(files) / workers


def check_cache(state: _State, split: str) -> Item:
    name = f"{split} cache"
    files = state.train if split == "train" else state.val
    if files is None:
        return Item(name, "skip", f"no usable {split} folder (see above)")
    st = state.cache(split)
    details = {"path": st.path, "fresh": st.fresh, "files": st.files}
    if st.fresh:
        return Item(name, "pass", f"fresh: {st.path}", None, details)
    seconds = _scan_estimate(files)
    details["scan_seconds_estimate"] = round(seconds, 1)
    what = f"stale ({st.path} no longer matches the files)" if st.path else "missing"
    return Item(name, "warn", f"{what}: the first run will scan {st.files:,} files, {_duration(seconds)}",
                f"`rectrain scan --data_dir {state.cfg.data_dir}` does it ahead of time", details)


def check_unusable_files(state: _State) -> Item:
    splits = [s for s, f in (("train", state.train), ("val", state.val)) if f is not None]
    if not splits:
        return Item("unusable files", "skip", "no data")
    unknown = [s for s in splits if not state.cache(s).fresh]
    bad = [(s, p, r) for s in splits if s not in unknown for p, r in state.cache(s).scan.bad]
    details = {"count": len(bad), "examples": [{"split": s, "path": p, "reason": r} for s, p, r in bad[:10]],
               "unknown_splits": unknown}
    later = f"; {' and '.join(unknown)} not scanned yet (`rectrain scan` lists them)" if unknown else ""
    if bad:
        shown = "; ".join(f"{s}/{p} ({r})" for s, p, r in bad[:3])
        return Item("unusable files", "warn", f"{len(bad):,} file(s) the run will skip, e.g. {shown}{later}",
                    f"`rectrain scan --data_dir {state.cfg.data_dir}` lists them all; fix or delete them", details)
    if len(unknown) == len(splits):
        return Item("unusable files", "skip", "not known until the files are scanned (`rectrain scan` lists them)",
                    None, details)
    return Item("unusable files", "pass", f"none{later}", None, details)


# -- disk and output --------------------------------------------------------------------------------
def checkpoint_bytes(arch: str, num_classes: int, width: int, ema: bool = False, opt: str = "sgd") -> int:
    """Bytes of one checkpoint: weights and buffers, the optimizer's state (SGD's and LARS's momentum: one tensor per
    parameter; LAMB's two moments: two), the EMA copy of weights and buffers with --ema_decay, a little more."""
    from rectrain.model import build_model
    # Built for real on the CPU (~0.5 s for ResNet-50): on the meta device, its random init imports torch._dynamo (~3 s).
    model = build_model(arch, num_classes=num_classes, width=width)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return (3 if opt == "lamb" else 2) * params + buffers + (params + buffers if ema else 0) + CKPT_EXTRA


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_disk(state: _State, disk_usage: Callable = shutil.disk_usage) -> Item:
    """Free space at --output against the checkpoints the run keeps.

    Peak files: the K kept epoch checkpoints, the next one being written before the oldest is pruned,
    and a mid-epoch ``last.pth`` after a stop (a file of its own; ``last``/``best`` are otherwise hard links).
    """
    cfg = state.cfg
    per = checkpoint_bytes(cfg.arch, state.num_classes, cfg.width, ema=cfg.ema_decay > 0, opt=cfg.opt)
    kept = min(cfg.keep_checkpoints or cfg.epochs, cfg.epochs)
    need = per * (kept + 2) + RUN_EXTRA
    where = _existing_parent(state.run_dir)
    free = int(disk_usage(where).free)
    details = {"free_bytes": free, "needed_bytes": need, "checkpoint_bytes": per, "checkpoints_kept": kept}
    text = (f"{_gib(free)} free at {where}; the run writes up to {_gib(need)} "
            f"({kept} checkpoint(s) kept + 2 being replaced, {_gib(per)} each, + logs)")
    if need <= free:
        return Item("disk", "pass", text, None, details)
    fits = (free - RUN_EXTRA) // per - 2
    fix = (f"--keep_checkpoints {fits} (keeps the newest {fits}), or an --output with {_gib(need)} free"
           if fits >= 1 else f"choose an --output with {_gib(need)} free (or free space at {where})")
    return Item("disk", "fail", f"not enough room: {text}", fix, details)


def check_output(state: _State) -> Item:
    """--output writable (a probe file, removed; no run folder created), and no clash with an earlier run."""
    cfg, run_dir = state.cfg, state.run_dir
    base = _existing_parent(run_dir)
    if not os.path.isdir(base):
        return Item("output", "fail", f"--output {cfg.output}: {base} is a file, not a folder",
                    "choose another --output")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rectrain-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return Item("output", "fail", f"--output {cfg.output}: cannot write in {base} ({e.strerror})",
                    "choose a writable --output, or fix that folder's permissions")
    holder = busy_holder(run_dir)
    if holder is not None:
        who = f"PID {holder.get('pid')} on host {holder.get('host')}" if holder else "another process"
        return Item("output", "fail", f"{run_dir} is in use by a run that is still going ({who})",
                    f"wait for it to end, or choose a --run_name other than {cfg.run_name}")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not cfg.resume and os.path.isdir(ckpt_dir) and any(f.endswith(".pth") for f in os.listdir(ckpt_dir)):
        return Item("output", "fail", f"{run_dir} already holds checkpoints",
                    "pass --resume auto to continue that run, or choose a new --run_name")
    if cfg.resume and cfg.resume != "auto" and not os.path.isfile(cfg.resume):
        return Item("output", "fail", f"--resume {cfg.resume}: no such checkpoint file",
                    "use --resume auto for the newest checkpoint of --run_name")
    return Item("output", "pass", f"{os.path.abspath(run_dir)} is writable")


# -- GPU memory -------------------------------------------------------------------------------------
def fit_batch(try_step: Callable[[int], object], batch_size: int) -> tuple[int, object, list[int]]:
    """Run ``try_step(b)`` at b = batch_size, halving on out-of-memory until it fits or b reaches 1.

    Returns (batch that fit or 0, its result, batch sizes that ran out of memory).
    """
    failed = []
    b = batch_size
    while b >= 1:
        try:
            return b, try_step(b), failed
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the failed step's tensors
        failed.append(b)
        if torch.cuda.is_available():  # hand the failed step's blocks back before the smaller try
            gc.collect()
            torch.cuda.empty_cache()
        b //= 2
    return 0, None, failed


class StepProbe:
    """The run's own training step (``TrainStep``: normalisation, batch augmentations, forward, backward, SGD, EMA) on
    the run's model, precision and memory format, fed uint8 batches as the loader would."""

    def __init__(self, cfg: TrainConfig, num_classes: int, device: str):
        from rectrain.training.augment import BatchAugment
        from rectrain.training.ema import ModelEma
        from rectrain.training.parts import OptimSettings, build_step_parts
        from rectrain.training.schedule import LRSchedule
        from rectrain.training.step import DeviceNormalize, TrainStep
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        torch.manual_seed(cfg.seed)
        p = build_step_parts(cfg.arch, num_classes, self.device, width=cfg.width, precision=cfg.precision,
                             channels_last=cfg.channels_last, optim=cfg.slice(OptimSettings))
        ema = ModelEma(p.model, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay else None
        self.train_step = TrainStep(p.model, p.optimizer, p.scaler, DeviceNormalize(self.device),
                                    BatchAugment(cfg.augmentation(), seed=cfg.seed, device=self.device), p.autocast,
                                    LRSchedule(cfg.lr, total_steps=10 ** 9, warmup_steps=0), cfg.label_smoothing,
                                    p.channels_last, ema=ema)
        self.model, self.num_classes, self.steps = p.model, num_classes, 0

    def step(self, batch: int, shape_hw: tuple[int, int]) -> None:
        images = torch.randint(0, 256, (batch, *shape_hw, 3), dtype=torch.uint8, device=self.device)
        labels = torch.randint(0, self.num_classes, (batch,), device=self.device)
        self.train_step(images, labels, self.steps)
        self.steps += 1

    def measure(self, batch: int, shape_hw: tuple[int, int], timed: int = 3) -> dict:
        """Peak memory of one step (momentum included), then images/s over ``timed`` more steps."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step(batch, shape_hw)
        sync = torch.cuda.synchronize if self.is_cuda else (lambda *a: None)
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if self.is_cuda else None
        t0 = time.perf_counter()
        for _ in range(timed):
            self.step(batch, shape_hw)
        sync(self.device)
        return {"peak_bytes": peak, "images_per_s": timed * batch / (time.perf_counter() - t0)}


def largest_bucket(cfg: TrainConfig) -> tuple[int, int]:
    """(H, W) of the bucket with the most pixels: the batch shape that needs the most memory."""
    shapes = make_buckets(cfg.target_size, cfg.rect_mode, cfg.max_ratio).shapes
    h, w = shapes[int(np.argmax(shapes[:, 0] * shapes[:, 1]))]
    return int(h), int(w)


def check_gpu_memory(state: _State) -> Item:
    cfg = state.cfg
    if state.device is None or not state.device.startswith("cuda"):
        return Item("gpu memory", "skip", "no GPU in use: the memory probe runs on CUDA only")
    shape = largest_bucket(cfg)
    torch.backends.cudnn.benchmark = not cfg.deterministic  # as the run: cuDNN picks its (workspace-hungry) kernels
    probe = StepProbe(cfg, state.num_classes, state.device)
    total = torch.cuda.get_device_properties(probe.device).total_memory
    measure = functools.partial(probe.measure, shape_hw=shape)
    fit, res, failed = fit_batch(measure, cfg.batch_size)
    del probe, measure  # frees the model and optimizer before the loader probe
    gc.collect()
    torch.cuda.empty_cache()
    item = memory_verdict(cfg, shape, fit, res, failed, total)
    if item.status != "fail":
        state.gpu_images_per_s, state.gpu_shape = res["images_per_s"], shape
    return item


def memory_verdict(cfg: TrainConfig, shape: tuple[int, int], fit: int, res: dict | None, failed: list[int],
                   total: int) -> Item:
    """The memory probe's item: ``fit_batch``'s outcome at ``shape`` on a GPU of ``total`` bytes."""
    precision = cfg.precision
    setup = f"{shape[0]}x{shape[1]} (largest bucket), {precision}{', channels_last' if cfg.channels_last else ''}"
    if fit == 0:
        return Item("gpu memory", "fail", f"one step does not fit even at batch 1 at {setup}",
                    "lower --target_size or use a smaller --arch", {"failed_batches": failed})
    details = {"batch": fit, "shape": list(shape), "peak_bytes": res["peak_bytes"], "total_bytes": total,
               "images_per_s": round(res["images_per_s"], 1), "failed_batches": failed}
    text = (f"batch {fit} at {setup}: peak {_gib(res['peak_bytes'])} of {_gib(total)}, "
            f"~{res['images_per_s']:,.0f} images/s")
    if failed:
        lr = cfg.lr * fit / cfg.batch_size
        return Item("gpu memory", "fail", f"batch {cfg.batch_size} runs out of GPU memory; {text}",
                    f"lower --batch_size to {fit} (and --lr to {lr:g} by the linear-scaling rule), "
                    "or lower --target_size", details)
    if res["peak_bytes"] > HIGH_PEAK_GPU * total:
        return Item("gpu memory", "warn", f"{text}: little headroom",
                    f"lower --batch_size to {max(1, fit // 2)} if the run runs out of memory", details)
    return Item("gpu memory", "pass", text, None, details)


# -- loader speed -----------------------------------------------------------------------------------
def _sample_scan(state: _State, n: int, part: int = 0) -> SplitScan:
    """A scan of ``n`` random train images: from the fresh cache, else by reading just their headers.

    ``part`` k takes the k-th ``n`` images of one permutation when the split is large enough, so two probes
    read different files: the second would otherwise find the first one's files in the page cache.
    """
    cache = state.cache("train")
    src = cache.scan.index if cache.fresh else state.train.index
    perm = np.random.default_rng(state.cfg.seed).permutation(len(src))
    start = part * n if len(src) >= (part + 1) * n else 0
    pick = np.sort(perm[start:start + n])
    index = src.subset(pick)
    if cache.fresh:
        return SplitScan(index, cache.scan.sizes[pick], [], None, False, 0.0)
    sizes, ok = np.zeros((len(index), 2), dtype=np.int32), np.ones(len(index), dtype=bool)
    for i in range(len(index)):
        try:
            sizes[i] = read_size(index.abspath(i))
        except BadImage:
            ok[i] = False
    return SplitScan(index.subset(ok), sizes[ok], [], None, False, 0.0)


def loader_images_per_s(scan: SplitScan, cfg: TrainConfig, workers: int, batch_size: int,
                        max_seconds: float = LOADER_SECONDS) -> float | None:
    """Decoded images/s of the training loader over one pass of ``scan`` (or ``max_seconds``).

    The first ``max(workers, 1)`` batches are not counted: the workers decode them in parallel from the
    start, so counting them would credit start-up overlap as speed. None when too few batches came.
    """
    from rectrain.data.loader import LoaderSettings, build_loaders
    buckets = make_buckets(cfg.target_size, cfg.rect_mode, cfg.max_ratio)
    settings = cfg.slice(LoaderSettings, batch_size=batch_size, val_batch_size=None, workers=workers, decode="cpu")
    loaders = build_loaders(scan, None, buckets, settings)
    skip = max(workers, 1)
    times, counts = [], []
    it = iter(loaders.train)
    try:
        t0 = time.perf_counter()
        for images, _labels, _failed in it:
            times.append(time.perf_counter())
            counts.append(images.shape[0])
            if times[-1] - t0 > max_seconds:
                break
    finally:
        del it  # shuts the workers down now, not at garbage collection
        del loaders
    if len(times) < skip + 1:
        return None
    return sum(counts[skip:]) / max(times[-1] - times[skip - 1], 1e-9)


def _local_processes(state: _State) -> int:
    if state.device and state.device.startswith("cuda"):
        return state.cfg.nproc or torch.cuda.device_count()
    return state.cfg.nproc or 1


def check_loader(state: _State, enabled: bool = True) -> Item:
    cfg = state.cfg
    if not enabled:
        return Item("loader", "skip", "skipped (--no_loader_probe)")
    if state.train is None:
        return Item("loader", "skip", "train data failed")
    workers, capped = cap_workers(cfg.workers, _local_processes(state))
    limit = cap_workers(10 ** 6, _local_processes(state))[0]  # the cores one process may use
    batch = min(cfg.batch_size, PROBE_BATCH)
    n = batch * (3 * max(workers, 1) + 4)  # enough batches to count some after the workers' first round
    rates = {}
    for part, w in enumerate(sorted({1, workers})):
        scan = _sample_scan(state, n, part)
        rates[w] = loader_images_per_s(scan, cfg, w, batch) if len(scan.index) >= 2 else None
        if rates[w] is None:
            return Item("loader", "skip", f"too few batches from {len(scan.index)} sampled images to time the loader")
    return _loader_verdict(rates, workers, limit, capped, _typical_gpu_rate(state, scan))


def _typical_gpu_rate(state: _State, scan: SplitScan) -> float | None:
    """The GPU's images/s on this data's mix of shapes: the probe's rate at the largest bucket, scaled by
    pixels (a conv net's cost is about linear in them) to the mean bucket of the sampled images."""
    if state.gpu_images_per_s is None:
        return None
    cfg = state.cfg
    buckets = make_buckets(cfg.target_size, cfg.rect_mode, cfg.max_ratio)
    pixels = buckets.shapes[:, 0] * buckets.shapes[:, 1]  # (K,) per bucket
    mean_pixels = float(pixels[buckets.assign(scan.sizes)].mean())
    return state.gpu_images_per_s * state.gpu_shape[0] * state.gpu_shape[1] / mean_pixels


def _loader_verdict(rates: dict, workers: int, limit: int, capped: str | None, gpu_rate: float | None) -> Item:
    """Compare the loader at 1 and at --workers with what the GPU consumes; suggest --workers."""
    one, many = rates[1], rates[workers]
    text = f"1 worker: {one:,.0f} images/s; {workers} workers: {many:,.0f} images/s"
    details = {"images_per_s": {str(w): round(r, 1) for w, r in rates.items()}, "workers": workers,
               "gpu_images_per_s": gpu_rate}
    if capped:
        text += f" ({capped})"
    if gpu_rate is None:  # on the CPU the model, not the loader, sets the pace: report and suggest only
        scales = workers <= 1 or many >= SCALING * workers * one
        suggest = limit if scales else max(1, round(many / one))
        details["suggested_workers"] = suggest
        why = ("decoding scales with cores" if scales else
               f"{workers} workers decode only {many / one:.1f}x as fast as 1: storage- or CPU-bound here")
        return Item("loader", "pass", f"{text}; suggest --workers {suggest} ({why})", None, details)
    need = math.ceil(1.2 * gpu_rate / one)  # 20% headroom: buckets and files vary
    suggest = min(need, limit)
    details["suggested_workers"] = suggest
    text += f"; the GPU takes ~{gpu_rate:,.0f} images/s (this data's mix of shapes)"
    if many >= gpu_rate:
        return Item("loader", "pass", f"{text}: keeps up (--workers {suggest} would do)", None, details)
    fix = (f"--workers {suggest}" if suggest > workers else
           "the CPU cannot feed the GPU: use `rectrain prepare` (a downscaled copy decodes faster) or faster storage")
    return Item("loader", "warn", f"{text}: the run will wait for data", fix, details)


# -- the checklist ----------------------------------------------------------------------------------
def iter_checks(cfg: TrainConfig, *, loader_probe: bool = True,
                disk_usage: Callable = shutil.disk_usage) -> Iterator[Item]:
    """The checklist, item by item (slow probes last). ``disk_usage``: free-space source (tests fake it)."""
    state = _State(cfg)
    yield check_python()
    yield check_torch()
    yield check_opencv(cfg)
    yield check_decoder(cfg)
    yield check_cuda(state)
    if is_shards(cfg.data_dir):
        yield check_shard_split(state, "train")
        yield check_shard_split(state, "val")
        yield check_empty_classes(state)
    else:
        yield check_train_split(state)
        yield check_val_split(state)
        yield check_empty_classes(state)
        yield check_cache(state, "train")
        yield check_cache(state, "val")
    yield check_unusable_files(state)
    yield check_disk(state, disk_usage)
    yield check_output(state)
    yield check_gpu_memory(state)
    yield check_loader(state, loader_probe)


def run_checks(cfg: TrainConfig, **kw) -> list[Item]:
    return list(iter_checks(cfg, **kw))
