"""Region JPEG decoding against the standard per-image work, per core, on real photos (issue 16, item 2).

One process decodes and crops every image of a set, for each pipeline, in turn, several times; pin it to one core
(``taskset -c 1 python benchmarks/bench_region_decode.py``). Images/s are per CPU second of this process
(``time.process_time``): on a shared machine, time spent waiting for the core does not count, so the figure is the
per-core rate even when other jobs compete for it (the wall-clock rate is printed beside it):

  (a) the standard: what torchvision's RandomResizedCrop(224) + RandomHorizontalFlip do with Pillow (full
      decode, crop, Pillow's antialiased bilinear resize, flip), output uint8 (224, 224, 3), no float conversion;
  (b) rectrain's OpenCV path (``--decoder opencv``): whole-image decode (DCT-reduced when the crop allows),
      OpenCV resize of the crop box;
  (c) rectrain's region decoder (``--decoder turbo``): only the crop's region of the JPEG is decoded;
  (c) with libjpeg-turbo's speed flags, one and both: TJPARAM_FASTUPSAMPLE (no fancy chroma upsampling) and
      TJPARAM_FASTDCT (the fast integer IDCT) -- off in the loader (``RectangularCropTfm(turbo_flags=)`` sets them).

(b) and (c) crop to the bucket shapes of ``--target_size`` in ``short_side`` and in ``area`` mode, with the boxes
that training draws (``RectangularCropTfm.box``, from the per-sample rng). For each, the mean absolute difference
to an exact crop is printed, in grey levels of 0..255: the same box cut from the full-resolution decode (Pillow,
whose libjpeg decodes as OpenCV's and TurboJPEG's) and resampled in float64 by the ideal of the filter the path uses
(bilinear at the exact sample positions below a 2x shrink, area averaging over the exact footprint at 2x or more).
The standard has no such figure: it is a full decode by definition.

Then where a region crop's time goes, per image (CPU µs), on the short_side crops with the default flags, each part
timed alone: TurboJPEG's whole-image decode; a 16-pixel-wide strip of every row (libjpeg must entropy-decode every
row above and beside a region, only the rows below it are skipped); the budget a region crop must fit to reach 3x the
standard, and the parts it is made of: the header and a 16x16 corner (the fixed cost of a decode), a 16-pixel strip
down to the region's bottom row (the entropy decoding no region decode avoids), the region itself (TurboJPEG), the
resampling to the bucket shape (``_finish``: warpAffine, flip), reading the file and drawing the box; and
``_region_crop`` and the loader's whole call (``RectangularCropTfm.__call__`` with the sample's rng) as measured.

The set is built at run time from real photographs that Python packages ship as files (the packages are not
imported): scikit-image's astronaut, chelsea, coffee, motorcycle_left/right and rocket, scikit-learn's china and
flower, matplotlib's grace_hopper. Each image is a random crop of one of them at an ImageNet-like size (500x375
on average, portrait and square ones too), resized with Lanczos and saved by Pillow at quality 90, 4:2:0. Nothing
is written outside a temporary folder and no photo is kept. Usage:

    pip install scikit-image scikit-learn      # for their photos (matplotlib's alone is one photo)
    taskset -c 1 python benchmarks/bench_region_decode.py [--images 400] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import random
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rectrain.commands.bench.standard import rrc_params  # noqa: E402
from rectrain.data import transforms, turbo  # noqa: E402
from rectrain.data.buckets import make_buckets  # noqa: E402
from rectrain.data.transforms import RectangularCropTfm  # noqa: E402

PHOTOS = {  # package -> its photographs (colour, everyday scenes), as files inside the package
    "skimage": ["data/astronaut.png", "data/chelsea.png", "data/coffee.png", "data/motorcycle_left.png",
                "data/motorcycle_right.png", "data/rocket.jpg"],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
    "matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
}
# The loader's decoders, and the region decoder with libjpeg-turbo's speed flags: name -> its turbo_flags
VARIANTS = {"opencv": (), "turbo": (), "turbo+up": ("fast_upsample",), "turbo+dct": ("fast_dct",),
            "turbo+both": ("fast_upsample", "fast_dct")}
# (W, H) of the generated images and how often: ImageNet's common shapes (most are 500 on the long side, 4:3)
SHAPES = [((500, 375), 0.45), ((375, 500), 0.15), ((500, 333), 0.15), ((500, 500), 0.1), ((333, 500), 0.05),
          ((640, 480), 0.05), ((400, 300), 0.05)]


def find_photos() -> list[str]:
    """Paths of the photographs installed here (found through each package's folder, not imported)."""
    found = []
    for package, files in PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = list(spec.submodule_search_locations)[0]
        found += [os.path.join(root, f) for f in files if os.path.exists(os.path.join(root, f))]
    return found


def build_set(photos: list[str], n: int, out_dir: str, seed: int = 0, quality: int = 90) -> list[str]:
    """``n`` JPEGs at ImageNet-like sizes, cut from ``photos`` at random and re-encoded (4:2:0)."""
    sources = [Image.open(p).convert("RGB") for p in photos]
    shapes, weights = zip(*SHAPES)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = shapes[rng.choice(len(shapes), p=np.asarray(weights) / sum(weights))]
        jitter = rng.uniform(0.85, 1.15)
        w, h = max(64, round(w * jitter)), max(64, round(h * jitter))
        sw, sh = src.size
        side = math.sqrt(rng.uniform(0.6, 1.0))  # area fraction of the largest box of the shape's ratio
        bw, bh = (sh * w / h, sh) if sw / sh >= w / h else (sw, sw * h / w)
        bw, bh = bw * side, bh * side
        x0, y0 = rng.uniform(0, sw - bw), rng.uniform(0, sh - bh)
        img = src.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + bw, y0 + bh))
        path = os.path.join(out_dir, f"{i:05d}.jpg")
        img.save(path, quality=quality, subsampling="4:2:0")
        paths.append(path)
    return paths


# -- the exact crop: float64 resampling of the full-resolution decode ------------------------------------------
def _weights(n_in: int, lo: float, hi: float, n_out: int, area: bool) -> np.ndarray:
    """(n_out, n_in) resampling matrix of [lo, hi) onto n_out pixels: area overlap, or bilinear taps at the pixel
    centres (OpenCV's and Pillow's convention), indices clamped at the image's edges."""
    k = (hi - lo) / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        if area:
            a, b = lo + i * k, lo + (i + 1) * k
            for j in range(max(0, math.floor(a)), min(n_in, math.ceil(b))):
                m[i, j] = max(0.0, min(b, j + 1) - max(a, j))
            m[i] /= m[i].sum()
        else:
            s = lo + (i + 0.5) * k - 0.5
            j0 = math.floor(s)
            for j, w in ((j0, 1 - (s - j0)), (j0 + 1, s - j0)):
                m[i, min(max(j, 0), n_in - 1)] += w
    return m


def exact_crop(full: np.ndarray, box, out_hw) -> np.ndarray:
    """``box`` (x0, y0, x1, y1) of the full-resolution (H, W, 3) image -> (oh, ow, 3) float64, by the ideal of the
    fast paths' filter: area averaging at a 2x shrink or more, else bilinear."""
    oh, ow = out_hw
    x0, y0, x1, y1 = box
    area = min((x1 - x0) / ow, (y1 - y0) / oh) >= 2
    wy = _weights(full.shape[0], y0, y1, oh, area)
    wx = _weights(full.shape[1], x0, x1, ow, area)
    rows = np.einsum("ij,jkc->ikc", wy, full.astype(np.float64))
    return np.einsum("ikc,lk->ilc", rows, wx)


# -- the pipelines ---------------------------------------------------------------------------------------------
def standard(path: str, size: int) -> np.ndarray:
    """torchvision's RandomResizedCrop(size) + RandomHorizontalFlip on a PIL image, uint8 out."""
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    top, left, ch, cw = rrc_params(*img.size)  # F.resized_crop: crop, then resize (Pillow antialiases)
    img = img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.Resampling.BILINEAR)
    if random.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def time_runs(pipelines: dict, n: int, repeats: int) -> dict:
    """name -> (median images per CPU second, median images per wall second) over ``repeats`` passes over the
    ``n`` images, the pipelines taking turns (so a change in the machine's load hits them alike)."""
    for fn in pipelines.values():  # warm: page cache, imports, the first call's set-up
        for i in range(n):
            fn(i)
    cpu, wall = {k: [] for k in pipelines}, {k: [] for k in pipelines}
    for _ in range(repeats):
        for name, fn in pipelines.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(n):
                fn(i)
            cpu[name].append(n / (time.process_time() - c0))
            wall[name].append(n / (time.perf_counter() - w0))
    return {k: (float(np.median(cpu[k])), float(np.median(wall[k]))) for k in pipelines}


def _recorded(module, name: str, calls: list):
    """``module.name`` wrapped to append each call's arguments to ``calls`` (to replay a crop's parts alone)."""
    fn = getattr(module, name)

    def wrapper(*a, **kw):
        calls.append(a)
        return fn(*a, **kw)
    return fn, wrapper


def decode_parts(paths, sizes, shapes, tfm, args) -> dict:
    """CPU µs per image of the parts of a region crop (see the module's docstring), for the same files and boxes."""
    datas = [open(f, "rb").read() for f in paths]
    heads = [turbo.read_header(d) for d in datas]
    n = len(paths)
    rng = [lambda i=i: np.random.default_rng([args.seed, 0, i]) for i in range(n)]
    geometry = [tfm.box(sizes[i], shapes[i], rng[i]()) for i in range(n)]
    regions, finishes = [], []  # what the loader's crops decode and resample, recorded once, replayed alone
    (decode, transforms._finish), (real, turbo.decode_region) = (
        _recorded(transforms, "_finish", finishes), _recorded(turbo, "decode_region", regions))
    try:
        for i in range(n):
            transforms._region_crop(datas[i], shapes[i], tuple(sizes[i]), *geometry[i])
    finally:
        transforms._finish, turbo.decode_region = decode, real
    assert len(regions) == len(finishes) == n, "every crop region-decoded once"

    def head(i):
        turbo.read_header(datas[i])

    def part(x, y, w, h, denom=1):
        return lambda i: (head(i), real(datas[i], denom, x, y, w, h))

    fns = {
        "whole-image decode": lambda i: (head(i), real(datas[i], 1, 0, 0, heads[i].width, heads[i].height)),
        "16-px strip of every row": lambda i: (head(i), real(datas[i], 1, 0, 0, 16, heads[i].height)),
        "fixed: header + a 16x16 corner": lambda i: part(0, 0, 16 // regions[i][1], 16 // regions[i][1],
                                                         regions[i][1])(i),
        "entropy: 16-px strip down to the region's bottom": lambda i: part(
            0, 0, 16 // regions[i][1], regions[i][3] + regions[i][5], regions[i][1])(i),
        "the region (TurboJPEG)": lambda i: (head(i), real(*regions[i])),
        "resampling + flip (_finish)": lambda i: decode(*finishes[i]),
        "read the file": lambda i: open(paths[i], "rb").read(),
        "the sample's rng + box": lambda i: tfm.box(sizes[i], shapes[i], rng[i]()),
        "_region_crop": lambda i: transforms._region_crop(datas[i], shapes[i], tuple(sizes[i]), *geometry[i]),
        "the loader's call": lambda i: tfm(paths[i], shapes[i], rng[i](), size_hw=tuple(sizes[i])),
    }
    return {k: 1e6 / v[0] for k, v in time_runs(fns, n, args.repeats).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="images in the generated set")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline; the median is printed")
    p.add_argument("--target_size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    photos = find_photos()
    if not photos:
        sys.exit("no photographs found: pip install scikit-image scikit-learn (their sample photos are used)")
    if not turbo.available():
        sys.exit(f"the region decoder is unavailable here: {turbo.problem()}")

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_set(photos, args.images, tmp, seed=args.seed)
        sizes = np.array([Image.open(f).size[::-1] for f in paths])  # (H, W)
        n = len(paths)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
              f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable by this process, "
              f"python {platform.python_version()}, libjpeg-turbo from {turbo.library_path()}")
        print(f"set: {n} JPEGs from {len(photos)} photos ({', '.join(os.path.basename(f) for f in photos)}), "
              f"mean {sizes[:, 1].mean():.0f}x{sizes[:, 0].mean():.0f}, quality 90, 4:2:0, "
              f"{sum(os.path.getsize(f) for f in paths) / n / 1e3:.0f} kB each; {args.repeats} timed passes, median")

        pipelines = {("square", "standard"): lambda i: (random.seed(i), standard(paths[i], args.target_size))}
        tfms, shapes, mads = {}, {}, {}
        for mode in ("short_side", "area"):
            table = make_buckets(args.target_size, mode)
            shapes[mode] = [table.shape(int(b)) for b in table.assign(sizes)]
            for decoder, flags in VARIANTS.items():
                tfm = tfms[(mode, decoder)] = RectangularCropTfm(train=True, decoder=decoder.split("+")[0],
                                                                 turbo_flags=flags)

                def crop(i, tfm=tfm, shapes=shapes[mode]):  # the loader's call: (seed, epoch 0, index) rng
                    return tfm(paths[i], shapes[i], np.random.default_rng([args.seed, 0, i]),
                               size_hw=tuple(sizes[i]))

                pipelines[(mode, decoder)] = crop
        rates = time_runs(pipelines, n, args.repeats)
        parts = decode_parts(paths, sizes, shapes["short_side"], tfms[("short_side", "turbo")], args)
        for i, f in enumerate(paths):  # the exact crops of the same boxes (both decoders draw the same)
            full = np.asarray(Image.open(f).convert("RGB"))
            for mode in ("short_side", "area"):
                box, flip = tfms[(mode, "turbo")].box(sizes[i], shapes[mode][i], np.random.default_rng([args.seed, 0, i]))
                ref = exact_crop(full, box, shapes[mode][i])
                ref = ref[:, ::-1] if flip else ref
                for decoder in VARIANTS:
                    out = pipelines[(mode, decoder)](i).astype(np.float64)
                    mads.setdefault((mode, decoder), []).append(np.abs(out - ref).mean())

    std = rates[("square", "standard")][0]
    print("\n| pipeline | crops | images per CPU second | x standard | wall-clock images/s | "
          "mean abs. difference to the exact crop (0..255) |")
    print("|---|---|---:|---:|---:|---:|")
    names = {"standard": f"(a) standard: Pillow decode + RandomResizedCrop({args.target_size}) + flip, uint8",
             "opencv": "(b) rectrain, OpenCV path (`--decoder opencv`)",
             "turbo": "(c) rectrain, region decoder (`--decoder turbo`)",
             "turbo+up": "(c) + TJPARAM_FASTUPSAMPLE", "turbo+dct": "(c) + TJPARAM_FASTDCT",
             "turbo+both": "(c) + FASTUPSAMPLE + FASTDCT"}
    for (mode, name), (cpu, wall) in rates.items():
        mad = f"{np.mean(mads[(mode, name)]):.2f}" if (mode, name) in mads else "(a full decode)"
        print(f"| {names[name]} | {mode} | {cpu:,.0f} | {cpu / std:.2f} | {wall:,.0f} | {mad} |")
    fell = {f"{mode} {d}": dict(t.fallbacks) for (mode, d), t in tfms.items() if t.fallbacks}
    print(f"\nregion decoder fallbacks: {fell or 'none'}")
    print("\nper image, CPU µs (median of the passes): " + ", ".join(f"{k} {v:,.0f}" for k, v in parts.items()))
    budget = 1e6 / std / 3
    floor = parts["entropy: 16-px strip down to the region's bottom"]
    rest = sum(parts[k] for k in ("the region (TurboJPEG)", "resampling + flip (_finish)", "read the file",
                                  "the sample's rng + box")) - floor
    call = parts["the loader's call"]
    print(f"3x the standard leaves {budget:,.0f} µs per image; the decode's fixed cost and the entropy decoding "
          f"down to the region's bottom take {floor:,.0f} of them, the region's own pixels, the resampling, the file "
          f"and the box another {rest:,.0f} (sum {floor + rest:,.0f}; the loader's call as measured: {call:,.0f})")


if __name__ == "__main__":
    main()
