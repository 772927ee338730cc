"""`rectrain prepare`: a downscaled, resumable copy of an image folder (``rectrain.data.prepare``), so that every
epoch decodes fewer pixels; or, with ``--format shards``, WebDataset tar shards with their index
(``rectrain.data.prepare_shards``), from an image folder or Hugging Face parquet files."""

from __future__ import annotations

import os

from rectrain.data.prepare import DEFAULT_QUALITY, prepare_dataset
from rectrain.errors import UserError

_SHOWN_BAD = 20  # bad files printed; all of them go to the list file


def add_arguments(p) -> None:
    p.epilog = ("Every output is a JPEG under its original name (x.png then holds JPEG data: decoders read the "
                "content, and the relative paths stay identical). Images with a shorter side above "
                "--short_side are resized (LANCZOS, ratio kept); smaller upright RGB JPEGs are copied byte for "
                "byte, other small files re-encoded. EXIF rotation is applied; colour modes become RGB as in "
                "training. Bad files are skipped and listed in OUT/prepare_bad_files.txt. Files outside "
                "train/ and val/ class folders (e.g. the scan cache) are not copied. Interrupted? Rerun the "
                "same command: finished files are kept. --format shards writes WebDataset tar shards instead "
                "(train-000000.tar, ...: KEY.jpg and KEY.cls per image, in the folder's sorted order; without "
                "--short_side the images' bytes as they are), their index and classes.json, from the folder or "
                "from Hugging Face parquet files (pip install pyarrow); rerunning it resumes after the last "
                "finished shard.")
    p.add_argument("--data_dir", required=True,
                   help="source folder: DATA_DIR/{train,val}/<class>/<images>; with --format shards also a folder of "
                        "Hugging Face parquet files (DATA_DIR/*.parquet or DATA_DIR/data/*.parquet); only read")
    p.add_argument("--out", required=True, help="output folder (same layout, or the shards), outside DATA_DIR")
    p.add_argument("--format", choices=("folder", "shards"), default="folder",
                   help="folder: a downscaled copy of the image folder; shards: WebDataset tar shards (KEY.jpg + "
                        "KEY.cls per image), their index (train.index.npz, val.index.npz) and classes.json, for "
                        "rectrain train --data_dir OUT")
    p.add_argument("--short_side", type=int, default=None,
                   help="shorter side of the resized images, in pixels (>= 32); e.g. 160 for --target_size "
                        "128, 320 for 224. Crops under (target/short_side)^2 of an image's area get upsampled. "
                        "Required for --format folder; for shards, without it every image is stored as it is")
    p.add_argument("--shard_size", default="1GB",
                   help="--format shards: bytes per shard, about (e.g. 1GB, 500MB, 256MiB)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help="JPEG quality of re-encoded images (ffcv-imagenet writes ImageNet at 90; ImageNet's "
                        "own JPEGs are ~90-96)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core; 0 or 1: no pool)")


def _print_bad(bad: list[tuple[str, str]], data_dir: str, bad_list: str) -> None:
    print(f"bad files: {len(bad):,} skipped (paths relative to {data_dir}; all in {bad_list})")
    for rel, reason in bad[:_SHOWN_BAD]:
        print(f"  {rel}: {reason}")
    if len(bad) > _SHOWN_BAD:
        print(f"  ... and {len(bad) - _SHOWN_BAD:,} more")


def run(args) -> int:
    if args.format == "shards":
        return _run_shards(args)
    if args.short_side is None:
        raise UserError("--short_side is required for --format folder (e.g. --short_side 320 for --target_size 224)")
    r = prepare_dataset(args.data_dir, args.out, args.short_side, args.quality, args.workers, progress=True)
    if r["bad_files"]:
        _print_bad(r["bad_files"], args.data_dir, r["bad_list"])
    written = r["resized"] + r["copied"] + r["reencoded"]
    if written + r["existing"] == 0:
        raise UserError(f"none of the {r['bad']:,} image files could be prepared (first: {r['bad_files'][0][0]}: "
                        f"{r['bad_files'][0][1]}); check --data_dir")
    ratio = f", {r['bytes_out'] / r['bytes_in']:.0%} of the bytes read" if r["bytes_in"] else ""
    print(f"prepared {written:,} images in {r['seconds']:.1f} s ({r['resized']:,} resized to short side "
          f"{args.short_side}, {r['copied']:,} copied, {r['reencoded']:,} re-encoded{ratio}); "
          f"{r['existing']:,} already done, {r['bad']:,} bad, {r['stale_temps']:,} stale temp files removed; "
          f"-> {os.path.abspath(args.out)}")
    return 0


def _run_shards(args) -> int:
    from rectrain.data.prepare_shards import prepare_shards
    r = prepare_shards(args.data_dir, args.out, args.shard_size, args.short_side, args.quality, args.workers,
                       progress=True)
    if r["bad_files"]:
        _print_bad(r["bad_files"], args.data_dir, r["bad_list"])
    if r["written"] + r["existing"] == 0:
        raise UserError(f"none of the {r['bad']:,} images could be written (first: {r['bad_files'][0][0]}: "
                        f"{r['bad_files'][0][1]}); check --data_dir")
    how = f"resized to short side {args.short_side}" if args.short_side else "stored as they are"
    print(f"wrote {r['written']:,} images ({how}) in {r['seconds']:.1f} s; {r['existing']:,} already done, "
          f"{r['bad']:,} bad; {r['shards']:,} shards, {r['classes']:,} classes, with their index -> "
          f"{os.path.abspath(args.out)} (train with --data_dir {args.out})")
    return 0
