"""`rectrain prepare`: a downscaled, resumable copy of an image folder (``rectrain.data.prepare``), so that every
epoch decodes fewer pixels."""

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
                "same command: finished files are kept.")
    p.add_argument("--data_dir", required=True, help="source folder: DATA_DIR/{train,val}/<class>/<images>; only read")
    p.add_argument("--out", required=True, help="output folder (same layout), outside DATA_DIR")
    p.add_argument("--short_side", type=int, required=True,
                   help="shorter side of the resized images, in pixels (>= 32); e.g. 160 for --target_size "
                        "128, 320 for 224. Crops under (target/short_side)^2 of an image's area get upsampled")
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
