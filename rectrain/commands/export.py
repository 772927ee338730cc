"""`rectrain export`: a checkpoint's model in a form other tools load without rectrain.

- ``torchvision``: the plain state dict, which ``torchvision.models.resnet50(num_classes=N)`` loads with
  ``strict=True`` (our model keeps torchvision's names and layout); standard width (64) only.
- ``torchscript``: ``torch.jit.trace`` of the model in eval mode. Tracing records no shapes for a ResNet
  (convolutions, pooling, an adaptive average pool to 1x1, flatten, linear), so the file accepts any
  batch size and any height and width, square or rectangular; the export checks a rectangular input
  against the eager model before writing. (``torch.jit.script`` rejects the blocks' ``last_bn`` property.)
- ``onnx``: the ``torch.export``-based exporter, with dynamic batch, height and width; needs the ``onnx``
  and ``onnxscript`` packages.

Every format takes normalised float32 (B, 3, H, W) RGB (``IMAGENET_MEAN``/``IMAGENET_STD`` on the 0..1
scale) and returns (B, classes) logits; class names are stored in the TorchScript and ONNX files. Files
are written to a temporary name in the target folder and renamed into place.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import os
import warnings
from typing import TYPE_CHECKING

from rectrain.archs import ARCH_NAMES
from rectrain.errors import UserError
from rectrain.runtime.io import atomic_file

if TYPE_CHECKING:  # the flags need no torch: the exporters import it when they run
    from rectrain.inference import Restored

FORMATS = ("torchvision", "torchscript", "onnx")
TORCHVISION_WIDTH = 64  # torchvision's ResNets exist at the paper's width only
ONNX_PACKAGES = ("onnx", "onnxscript")
META_FILE = "rectrain.json"  # the TorchScript extra file / ONNX metadata key holding classes and input spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by rectrain train")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="file to write (its folder is created)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (model_ema)")


def metadata(r: Restored) -> dict:
    """What a user of the exported file needs besides the weights."""
    from rectrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    size = r.config.target_size
    return {"arch": r.arch, "width": r.width, "classes": r.classes, "ema": r.ema,
            "input": {"layout": "NCHW float32 RGB", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "scale": "0..1 before normalisation", "target_size": size,
                      "note": "any height and width (multiples of 32 keep every feature map whole)"}}


# -- the three formats: each writes to the open file ``f`` and returns how to load ``out`` ----------------
def export_torchvision(r: Restored, f, out: str) -> str:
    import torch
    if r.arch not in ARCH_NAMES or r.width != TORCHVISION_WIDTH:
        raise UserError(f"--format torchvision needs a standard-width ResNet (width {TORCHVISION_WIDTH}); this "
                        f"checkpoint is a {r.arch} of width {r.width}, which torchvision does not have: use "
                        "--format torchscript or onnx")
    state = {k: v.detach().cpu().contiguous() for k, v in r.model.state_dict().items()}
    torch.save(state, f)
    return (f"import torch, torchvision\n"
            f"model = torchvision.models.{r.arch}(num_classes={len(r.classes)})\n"
            f"model.load_state_dict(torch.load({out!r}, weights_only=True), strict=True)\n"
            f"# output i is the checkpoint's class i (sorted class folders): "
            f"{', '.join(r.classes[:3])}{', ...' if len(r.classes) > 3 else ''}")


def export_torchscript(r: Restored, f, out: str) -> str:
    import torch
    size = r.config.target_size
    example = torch.randn(2, 3, size, size)
    rect = torch.randn(1, 3, size, size + 32)  # checked: the traced graph must not have fixed the shape
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch>=2.9 deprecates TorchScript; it still works
        traced = torch.jit.trace(r.model.eval(), example, check_inputs=[(rect,)])
        torch.jit.save(traced, f, _extra_files={META_FILE: json.dumps(metadata(r))})
    return (f"import json, torch\n"
            f"extra = {{{META_FILE!r}: ''}}\n"
            f"model = torch.jit.load({out!r}, _extra_files=extra)  # eval mode; any batch, height and width\n"
            f"classes = json.loads(extra[{META_FILE!r}])['classes']")


def export_onnx(r: Restored, f, out: str) -> str:
    import torch
    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs the ONNX exporter's packages: pip install {' '.join(missing)}")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise UserError("--format onnx needs torch>=2.5 (the torch.export-based exporter); upgrade torch")
    import onnx
    from torch.export import Dim

    size = r.config.target_size
    dims = {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(r.model.eval(), (torch.randn(2, 3, size, size),), dynamo=True,
                                        input_names=["images"], output_names=["logits"], dynamic_shapes=(dims,),
                                        verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {META_FILE: json.dumps(metadata(r))})
    onnx.save(proto, f)
    return (f"import json, onnx, onnxruntime\n"
            f"session = onnxruntime.InferenceSession({out!r})\n"
            f"logits = session.run(None, {{'images': images}})[0]  # images: (B, 3, H, W) float32 numpy\n"
            f"meta = {{p.key: p.value for p in onnx.load({out!r}).metadata_props}}\n"
            f"classes = json.loads(meta[{META_FILE!r}])['classes']")


EXPORTERS = {"torchvision": export_torchvision, "torchscript": export_torchscript, "onnx": export_onnx}


def write_atomic(out: str, write) -> str:
    """``write(f)`` into a temporary file beside ``out`` that becomes ``out`` only when complete; write's result."""
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from None
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; give a file name")
    try:
        with atomic_file(out) as f:
            return write(f)
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}; check free space and permissions") from None


def run(args: argparse.Namespace) -> int:
    from rectrain.inference import restore
    r = restore(args.checkpoint, args.ema)
    how = write_atomic(args.out, lambda f: EXPORTERS[args.format](r, f, args.out))
    weights = "EMA weights" if args.ema else "weights"
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): {args.format} {r.arch} {weights}, "
          f"{len(r.classes)} classes; input: normalised float32 (B, 3, H, W) RGB, output: logits")
    print("load it with:\n" + "\n".join(f"    {line}" for line in how.splitlines()))
    return 0
