"""The tiny settings the CPU tests train with: a 3-class synthetic folder and a ResNet-18 of width 8 at 32 px."""

import json
import os
from dataclasses import dataclass

from rectrain import trainer as train_mod
from rectrain.config import resolve_config
from rectrain.data.synth import make_synthetic

# A ResNet-18 of width 8 on 32 px crops, one process on the CPU, bit-reproducible.
TINY = ["--arch", "resnet18", "--width", "8", "--target_size", "32", "--batch_size", "8", "--workers", "0",
        "--device", "cpu", "--print_freq", "2", "--lr", "0.05", "--warmup_epochs", "0.5", "--max_ratio", "1.5",
        "--deterministic"]


def make_tiny_data(path) -> str:
    """3 classes x (16 train, 5 val) small JPEGs of varied ratios."""
    make_synthetic(str(path), classes=3, train_per_class=16, val_per_class=5, kind="tiny", seed=0)
    return str(path)


@dataclass
class TinyRun:
    data: str   # the dataset root
    ckpt: str   # last.pth of the run
    row: dict   # its metrics row (epoch 1)


def train_tiny(root) -> TinyRun:
    """One epoch of the tiny model on the tiny data under ``root``."""
    data = make_tiny_data(os.path.join(str(root), "data"))
    cfg = resolve_config(["--data_dir", data, "--output", str(root), "--run_name", "run", "--epochs", "1", *TINY])
    assert train_mod.train(cfg) == 0
    row = json.loads(open(os.path.join(str(root), "run", "metrics.jsonl")).read().splitlines()[-1])
    return TinyRun(data, os.path.join(str(root), "run", "checkpoints", "last.pth"), row)


def flip_bits(path, count: int) -> None:
    """Flip the low bit of ``count`` bytes spread over the largest tensor of a checkpoint file, in place: the file
    still loads with ``torch.load`` (it does not check the zip CRCs), with wrong weights."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", raw[member.header_offset + 26: member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    for i in range(count):
        raw[start + (i * 7919) % member.file_size] ^= 1
    with open(path, "wb") as f:
        f.write(raw)
