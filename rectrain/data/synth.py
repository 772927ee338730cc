"""Synthetic ImageNet-style folders of JPEGs, for tests, the CPU demo and benchmarks.

``OUT/{train,val}/class_XXX/*.jpg`` with ImageNet-like aspect ratios (W/H about 0.5 to 2; most 4:3
or 3:4, some square). ``imagenet`` images are about 500x375 at JPEG quality 90 (the sizes that
scan and loader benchmarks need); ``tiny`` ones have a short side of 40-80 px (tests, CPU demo).

Classes are learnable from pixels and survive random-resized crops, flips and MixUp: each class has
its own colour palette (hue spaced by the golden ratio) *and* texture (stripes, crosshatch, rings,
checks, dots at one of two frequencies; all symmetric under a horizontal flip), drawn at a random
phase inside a randomly placed ellipse, over a background in the class's dark colour, plus noise.

Deterministic: image ``i`` of class ``c`` in a split depends only on (seed, split, c, i), whatever
the worker count. Never deletes anything: a non-empty split folder is refused unless ``force``,
which then overwrites same-named files only.
"""

from __future__ import annotations

import colorsys
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from rectrain.errors import UserError
from rectrain.runtime.io import atomic_write, pool_map, process_pool, usable_cores

__all__ = ["KINDS", "make_synthetic", "image_size", "render"]

KINDS = ("imagenet", "tiny")
SPLITS = ("train", "val")
QUALITY = 90  # ImageNet's JPEGs are mostly quality ~90-96
PARALLEL_FROM = 200  # images: below this a process pool costs more than it saves
CHUNK = 32  # images per pool task
_GOLDEN = 0.6180339887  # hue step between classes: neighbours end up far apart on the colour wheel
_TEXTURES = 5  # stripes-h, stripes-v, crosshatch, rings, dots
_FREQS = (3.0, 7.0)  # texture cycles per short side
_DRAW_SCALE = 4  # the pattern is drawn at 1/4 resolution, then upscaled
_NOISE = 20  # +- grey levels of per-pixel noise
# W/H ratios and their probabilities: ImageNet is mostly 4:3 landscapes and 3:4 portraits.
_RATIOS = np.array([4 / 3, 3 / 4, 1.0, 3 / 2, 2 / 3])
_RATIO_P = np.array([0.42, 0.18, 0.12, 0.10, 0.05])  # the remaining 0.13: log-uniform over [1/2, 2]


def image_size(rng: np.random.Generator, kind: str) -> tuple[int, int]:
    """(H, W) of one image: W/H in [0.5, 2], ImageNet-like mix of ratios, sizes by ``kind``."""
    u = rng.random()
    cum = np.cumsum(_RATIO_P)
    r = float(_RATIOS[np.searchsorted(cum, u, side="right")]) if u < cum[-1] else float(
        np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    if kind == "imagenet":
        long_side = 500 if rng.random() < 0.8 else int(rng.integers(300, 641))
        h, w = (round(long_side / r), long_side) if r >= 1 else (long_side, round(long_side * r))
    else:
        short = int(rng.integers(40, 81))
        h, w = (short, round(short * r)) if r >= 1 else (round(short / r), short)
    return max(h, 1), max(w, 1)


def _palette(c: int) -> np.ndarray:
    """(3, 3) float32 RGB 0..255: the class's bright, dark and accent colours."""
    hue = (c * _GOLDEN) % 1.0
    cols = [colorsys.hsv_to_rgb(hue, 0.85, 0.95), colorsys.hsv_to_rgb(hue, 0.6, 0.35),
            colorsys.hsv_to_rgb((hue + 0.33) % 1.0, 0.5, 0.8)]
    return np.array(cols, dtype=np.float32) * 255


def _texture(c: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class texture in [0, 1] on coordinates ``u, v`` (in short sides); random phase and jitter."""
    kind, freq = c % _TEXTURES, _FREQS[(c // _TEXTURES) % len(_FREQS)]
    f = 2 * np.pi * freq * rng.uniform(0.85, 1.15)
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    if kind == 0:
        t = np.sin(f * v + p1)  # horizontal stripes
    elif kind == 1:
        t = np.sin(f * u + p1)  # vertical stripes
    elif kind == 2:
        t = 0.5 * (np.sin(f * (u + v) / np.sqrt(2) + p1) + np.sin(f * (u - v) / np.sqrt(2) + p2))  # crosshatch
    elif kind == 3:
        cu, cv = rng.uniform(0, 1, size=2)
        t = np.sin(f * np.sqrt((u - cu) ** 2 + (v - cv) ** 2) + p1)  # rings
    else:
        t = np.sin(f * u + p1) * np.sin(f * v + p2)  # dots
    return 0.5 + 0.5 * t


def render(c: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8 image of class ``c``.

    The smooth pattern is drawn at a quarter of the resolution and upscaled (bilinear); full-resolution
    noise then gives the JPEG a realistic size. About 8 ms for 500x375 instead of 30 at full resolution.
    """
    sh, sw = max(h // _DRAW_SCALE, 8), max(w // _DRAW_SCALE, 8)
    s = float(min(sh, sw))
    v, u = np.mgrid[0:sh, 0:sw].astype(np.float32) / s
    bright, dark, accent = _palette(c) * rng.uniform(0.85, 1.15)  # per-image brightness jitter
    t = _texture(c, u, v, rng)[..., None]
    fg = bright * t + accent * (1 - t)
    # A randomly placed ellipse holds the texture; the background keeps the class's dark colour.
    cy, cx = rng.uniform(0.25, 0.75) * sh / s, rng.uniform(0.25, 0.75) * sw / s
    ry, rx = rng.uniform(0.35, 0.7) * sh / s, rng.uniform(0.35, 0.7) * sw / s
    inside = (((v - cy) / ry) ** 2 + ((u - cx) / rx) ** 2 <= 1.0)[..., None]
    small = np.clip(np.where(inside, fg, dark * (0.8 + 0.4 * t)), 0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = rng.integers(0, 2 * _NOISE + 1, size=img.shape, dtype=np.int16) - _NOISE  # uniform, +-_NOISE
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _write_one(job) -> None:
    path, split_id, c, i, kind, seed = job
    rng = np.random.default_rng([seed, split_id, c, i])
    h, w = image_size(rng, kind)
    buf = io.BytesIO()
    Image.fromarray(render(c, h, w, rng)).save(buf, "JPEG", quality=QUALITY)
    atomic_write(path, buf.getvalue(), fsync=False)  # never half a JPEG under the name; fsync: see prepare


def _write_chunk(jobs) -> int:
    for job in jobs:
        _write_one(job)
    return len(jobs)


def _prepare(out: str, counts: dict[str, int], force: bool) -> None:
    """Create the split folders; refuse non-empty ones unless ``force``; unwritable -> UserError."""
    for split, n in counts.items():
        d = os.path.join(out, split)
        if n and os.path.isdir(d) and os.listdir(d) and not force:
            raise UserError(f"{d} is not empty; choose another --out, or pass --force to write into it "
                            f"(same-named files are overwritten, nothing is deleted)")
    try:
        for split, n in counts.items():
            if n:
                os.makedirs(os.path.join(out, split), exist_ok=True)
                probe = os.path.join(out, split, ".rectrain-write-test")
                open(probe, "wb").close()
                os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror}; choose a writable --out") from e


def _jobs(out: str, classes: int, counts: dict[str, int], kind: str, seed: int) -> list[tuple]:
    width = max(3, len(str(classes - 1)))
    jobs = []
    for split_id, split in enumerate(SPLITS):
        for c in range(classes):
            name = f"class_{c:0{width}d}"
            d = os.path.join(out, split, name)
            if counts[split]:
                os.makedirs(d, exist_ok=True)
            jobs += [(os.path.join(d, f"{name}_{i:05d}.jpg"), split_id, c, i, kind, seed) for i in range(counts[split])]
    return jobs


def make_synthetic(out: str, classes: int, train_per_class: int, val_per_class: int, kind: str = "tiny",
                   seed: int = 0, workers: int | None = None, force: bool = False, progress: bool = False) -> dict:
    """Write ``out/{train,val}/class_XXX/*.jpg``; returns {"train": n, "val": m, "seconds": s}."""
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise UserError("--classes and --train_per_class must be >= 1, --val_per_class >= 0")
    t0 = time.perf_counter()
    counts = {"train": train_per_class, "val": val_per_class}
    _prepare(out, counts, force)
    jobs = _jobs(out, classes, counts, kind, seed)
    workers = max(1, usable_cores() if workers is None else workers)
    chunks = [jobs[s:s + CHUNK] for s in range(0, len(jobs), CHUNK)]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), unit="img", desc="synth", file=sys.stderr,
               disable=not progress or len(jobs) < PARALLEL_FROM, mininterval=0.5)
    try:
        with process_pool(workers if len(jobs) >= PARALLEL_FROM else 1, len(chunks)) as pool:
            for n in pool_map(pool, _write_chunk, chunks):
                bar.update(n)
    except OSError as e:
        raise UserError(f"writing {out} failed: {e}; check free space and permissions") from e
    finally:
        bar.close()
    return {"train": classes * train_per_class, "val": classes * val_per_class,
            "seconds": time.perf_counter() - t0}
