"""Whether and how the training step is compiled: ``--compile auto``'s rule, the persistent compile cache, one graph
per batch shape or one graph with the spatial dimensions dynamic, and DDP's overlap kept under compile.

**The rule of ``--compile auto``** (``decide_compile``, a pure function): compile on CUDA when the estimated warm-up
(the graphs to compile x seconds per graph) is at most ``MAX_WARMUP_SHARE`` (5%) of the run's estimated eager training
time; eager on anything but CUDA, and for short runs. Why 5%: the compiled ResNet-50 step is 1.46x the eager one on an
H200 (docs/benchmarks.md, 2026-11-27), so compiling saves about 31% of the step time; a warm-up of 5% of the run pays
back six times over, and the margin covers the estimates' error. Both estimates err towards eager: the training time
is estimated at the eager speed of an H200, the fastest card measured (a slower card trains longer, so compiling pays
more there), and the loader is assumed to keep up.

- Warm-up: ``COLD_S_PER_GRAPH`` for a graph the cache does not hold (measured: about 30-40 s per ResNet-50 shape,
  forward and backward, on an H200), ``WARM_S_PER_GRAPH`` for one it holds (an assumption until
  benchmarks/gpu_session.sh measures it), scaled by the network's depth; with ``--compile_shapes dynamic`` one graph
  per batch size stands for every shape, at ``DYNAMIC_GRAPH_COST`` times a static one (an assumption too).
- Training: the steps left x the batch / an eager rate, 4,663 images/s for ResNet-50 at 224x224 (bf16, H200,
  measured), scaled by the architecture's FLOPs, the width squared and the batch shapes' pixels.
- The cache's state: after each warm-up rank 0 records the graphs it compiled in ``rectrain_compiled.json`` in the
  cache folder, keyed by what makes a graph (torch, GPU, architecture, classes, precision, memory format, mode, DDP):
  the next run counts those graphs as warm.

**The persistent cache**: torch.compile keeps compiled graphs on disk (Inductor's FX graph cache and AOTAutograd's
cache, both in TORCHINDUCTOR_CACHE_DIR; Triton's kernels under it too unless TRITON_CACHE_DIR is set). Its default is
``/tmp/torchinductor_USER``, which a reboot or a tmp cleaner empties; rectrain points it at ``--compile_cache``, else
an existing TORCHINDUCTOR_CACHE_DIR, else ``~/.cache/rectrain/torch_compile`` (``$XDG_CACHE_HOME`` respected). Every
rank of every run on the machine shares it (Inductor writes its entries atomically, under file locks). Deleting the
folder is always safe: the next run compiles afresh.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from rectrain.archs import PUBLISHED_GFLOPS, depth
from rectrain.errors import UserError
from rectrain.runtime.io import user_cache_dir, write_json_atomic

__all__ = ["COLD_S_PER_GRAPH", "WARM_S_PER_GRAPH", "DYNAMIC_GRAPH_COST", "REFERENCE_IMAGES_PER_S",
           "MAX_WARMUP_SHARE", "CACHE_ENV", "MARKER", "WarmupEstimate", "CompileDecision", "estimate_warmup",
           "estimate_train_s", "decide_compile", "graph_labels", "specialised_note", "torch_default_cache_dir",
           "compile_cache_dir", "use_compile_cache", "graph_signature", "cached_graphs", "record_graphs",
           "keep_ddp_overlap", "SpatialDynamic"]

COLD_S_PER_GRAPH = 35.0        # s to compile one ResNet-50 training graph (forward + backward), H200, 2026-11-27
WARM_S_PER_GRAPH = 10.0        # s for one the persistent cache holds: assumed, to be measured (gpu_session.sh)
DYNAMIC_GRAPH_COST = 1.5       # a graph with dynamic height and width, in static graphs: assumed, to be measured
REFERENCE_IMAGES_PER_S = 4663.0  # eager ResNet-50 step at 224x224, bf16, channels_last, batch 256, H200 (measured)
REFERENCE_GFLOPS = PUBLISHED_GFLOPS["resnet50"]
REFERENCE_PIXELS = 224 * 224
MAX_WARMUP_SHARE = 0.05        # auto compiles when the warm-up is at most this share of the eager training time

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
MARKER = "rectrain_compiled.json"  # the graphs this machine's runs compiled into the cache (see the docstring)


# -- the rule of --compile auto -------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupEstimate:
    """The warm-up's estimated compile time: ``cold`` graphs to compile afresh, ``warm`` ones the cache holds."""

    cold: int
    warm: int
    seconds: float

    def __str__(self) -> str:
        parts = [f"{self.cold} graph{'s' if self.cold != 1 else ''} to compile"] if self.cold else []
        parts += [f"{self.warm} from the warm cache"] if self.warm else []
        return ", ".join(parts) or "no graph"


def estimate_warmup(cold_graphs: int, warm_graphs: int, arch: str, dynamic: bool = False) -> WarmupEstimate:
    """Seconds to compile ``cold_graphs`` afresh and load ``warm_graphs`` from the cache: the measured ResNet-50 cost
    scaled by the network's depth (a graph's ops), dynamic graphs at ``DYNAMIC_GRAPH_COST`` static ones."""
    scale = depth(arch) / depth("resnet50") * (DYNAMIC_GRAPH_COST if dynamic else 1.0)
    seconds = (cold_graphs * COLD_S_PER_GRAPH + warm_graphs * WARM_S_PER_GRAPH) * scale
    return WarmupEstimate(cold_graphs, warm_graphs, seconds)


def estimate_train_s(steps: int, batch: int, pixels: float, arch: str, width: int) -> float:
    """Seconds of eager training for ``steps`` steps of ``batch`` images of ``pixels`` (mean H x W) on one device:
    the H200's measured ResNet-50 rate scaled by FLOPs per image. Small networks come out faster than they run (launch
    overheads do not shrink with the FLOPs): an underestimate, which errs towards eager."""
    flops = PUBLISHED_GFLOPS[arch] * (width / 64) ** 2 * pixels / REFERENCE_PIXELS
    images_per_s = REFERENCE_IMAGES_PER_S * REFERENCE_GFLOPS / flops
    return steps * batch / images_per_s


@dataclass(frozen=True)
class CompileDecision:
    """Whether this run compiles its step, and the one line that says why (logged at start-up)."""

    compile: bool
    why: str
    warmup: WarmupEstimate | None = None
    train_s: float | None = None

    @property
    def line(self) -> str:
        return f"compile: {'compiled step' if self.compile else 'eager step'} ({self.why})"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def decide_compile(setting: str, device_type: str, warmup: WarmupEstimate | None = None,
                   train_s: float | None = None, cuda_graphs: bool = False) -> CompileDecision:
    """--compile ``setting`` (auto, on, off) on ``device_type`` -> whether to compile, and why in one line. ``warmup``
    and ``train_s`` (``estimate_warmup``, ``estimate_train_s``) are needed for auto on CUDA only."""
    if cuda_graphs:
        return CompileDecision(True, "--cuda_graphs captures the compiled step")
    if setting == "on":
        return CompileDecision(True, "--compile on")
    if setting == "off":
        return CompileDecision(False, "--compile off")
    if device_type != "cuda":
        return CompileDecision(False, f"--compile auto: eager on the {device_type.upper()}, where compiling costs more "
                                      "than it saves; auto compiles on CUDA GPUs only; --compile forces it")
    if warmup is None or train_s is None:
        raise ValueError("--compile auto on CUDA needs the warm-up and training-time estimates")
    share = warmup.seconds / max(train_s, 1e-9)
    estimate = (f"the estimated warm-up, {_duration(warmup.seconds)} ({warmup}), is {100 * share:.1f}% of the "
                f"estimated {_duration(train_s)} of eager training")
    rule = f"auto compiles under {100 * MAX_WARMUP_SHARE:.0f}%"
    if share <= MAX_WARMUP_SHARE:
        return CompileDecision(True, f"--compile auto: {estimate}; {rule}", warmup, train_s)
    return CompileDecision(False, f"--compile auto: {estimate}, a short run; {rule}; --compile forces it", warmup,
                           train_s)


def graph_labels(train_shapes, val_shapes, dynamic: bool) -> list[str]:
    """The graphs the warm-up compiles, one label each: per (batch, height, width) for the training and the
    validation model, or with ``dynamic`` one per batch size (height and width are symbolic)."""
    def labels(kind: str, shapes) -> list[str]:
        if dynamic:
            return [f"{kind} {b}xHxW" for b in sorted({s[0] for s in shapes})]
        return [f"{kind} {b}x{h}x{w}" for b, h, w in shapes]
    return labels("train", train_shapes) + labels("eval", val_shapes)


def specialised_note(built: int, train_shapes, val_shapes) -> str | None:
    """--compile_shapes dynamic checked after the warm-up: a note when torch built more graphs than one per batch size
    and model, i.e. specialised the height and width after all. Seen on the CPU with torch 2.13: Inductor's
    convolution backward lowering guards on the feature maps' strides (``_inductor/kernel/conv.py``,
    ``convolution_backward_lowering``), so 3 shapes built 3 graphs, in twice the time of ``per_shape``
    (docs/benchmarks.md)."""
    expected = len(graph_labels(train_shapes, val_shapes, dynamic=True))
    if built <= expected:
        return None
    return (f"note: --compile_shapes dynamic built {built} graphs for {len(train_shapes) + len(val_shapes)} batch "
            f"shapes, not {expected}: torch specialised the height and width (guards of the compiled kernels), so "
            "the shapes were compiled one by one anyway, as dynamic code; --compile_shapes per_shape compiles them "
            "faster")


# -- the persistent cache -------------------------------------------------------------------------------------
def torch_default_cache_dir() -> str | None:
    """Inductor's own default folder (``/tmp/torchinductor_USER``). ``import torch._dynamo`` writes it into
    TORCHINDUCTOR_CACHE_DIR, so a process that imported it finds that variable set without anyone having chosen it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # torch >= 2.5
    except ImportError:
        try:
            from torch._inductor.runtime.runtime_utils import default_cache_dir  # torch 2.4
        except ImportError:
            return None
    return os.path.abspath(default_cache_dir())


def compile_cache_dir(flag: str | None, env=None, torch_default: str | None = "ask torch") -> tuple[str, str]:
    """(the compile cache's folder, where that came from): --compile_cache, else a TORCHINDUCTOR_CACHE_DIR that the
    user set (not torch's own default, ``torch_default``, which lives in /tmp), else rectrain's folder in the user's
    cache."""
    env = os.environ if env is None else env
    if flag:
        return os.path.abspath(os.path.expanduser(flag)), "--compile_cache"
    if torch_default == "ask torch":
        torch_default = torch_default_cache_dir()
    chosen = os.path.abspath(os.path.expanduser(env[CACHE_ENV])) if env.get(CACHE_ENV) else None
    if chosen and chosen != torch_default:
        return chosen, CACHE_ENV
    return os.path.join(user_cache_dir(), "torch_compile"), "the default"


def use_compile_cache(path: str) -> None:
    """Point torch.compile's on-disk caches at ``path`` for this process (and the processes it starts), and switch
    on the FX graph and AOTAutograd caches where this torch has them off by default. A setting the user made in the
    environment (TORCHINDUCTOR_FX_GRAPH_CACHE, TORCHINDUCTOR_AUTOGRAD_CACHE, TORCHINDUCTOR_FORCE_DISABLE_CACHES)
    is left alone."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".rectrain-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"the compile cache folder {path} is not writable ({e.strerror or e}): pass --compile_cache "
                        "with a folder of your own (or --no_compile)") from None
    os.environ[CACHE_ENV] = path  # read by Inductor whenever it opens its caches (cache_dir_utils.cache_dir)
    if os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1":
        return
    from torch._inductor import config as inductor_config
    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ and hasattr(inductor_config, "fx_graph_cache"):
        inductor_config.fx_graph_cache = True  # off by default in torch 2.4, on from 2.5
    # AOTAutograd's cache (the backward graph too) exists from torch 2.5, experimental and off there; from 2.6 on it
    # is on by default and this only restates it (on torch >= 2.13 the setting holds for this thread, which compiles).
    release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ and release >= (2, 6):
        from torch._functorch import config as functorch_config
        if hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = True


def graph_signature(**parts) -> str:
    """What makes two runs' graphs the same (torch version, GPU, architecture, ...), as one stable string."""
    return " ".join(f"{k}={parts[k]}" for k in sorted(parts))


def _read_marker(cache_dir: str) -> dict:
    try:
        with open(os.path.join(cache_dir, MARKER)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: everything is cold
        return {}


def cached_graphs(cache_dir: str, signature: str) -> set[str]:
    """The graph labels that runs with this ``signature`` compiled into ``cache_dir`` before (``record_graphs``)."""
    return set(_read_marker(cache_dir).get(signature, []))


def record_graphs(cache_dir: str, signature: str, labels: list[str]) -> None:
    """Add ``labels`` to the record of ``cache_dir`` (rank 0, after a warm-up). Losing a concurrent run's update
    costs only an estimate: the record is a hint, never a cache."""
    data = _read_marker(cache_dir)
    data[signature] = sorted(set(data.get(signature, [])) | set(labels))
    write_json_atomic(os.path.join(cache_dir, MARKER), data)


# -- DDP and dynamic shapes -----------------------------------------------------------------------------------
def keep_ddp_overlap(dynamo_config) -> str | None:
    """Keep Dynamo's DDPOptimizer on: it splits the compiled graph at DDP's gradient buckets so that each bucket's
    all-reduce overlaps the rest of the backward pass. Off ("no_optimization"/False), a compiled DDP model all-reduces
    only after the whole backward. Turns it back on and says so; None when it was on (torch's default)."""
    value = getattr(dynamo_config, "optimize_ddp", True)
    if value in (False, "no_optimization"):
        dynamo_config.optimize_ddp = True
        return (f"note: torch._dynamo.config.optimize_ddp was {value!r}: set back to the DDPOptimizer (True), which "
                "keeps DDP's bucketed all-reduce overlapping the compiled backward pass")
    return None


def _mark_dynamic():
    """``torch._dynamo.maybe_mark_dynamic`` where it exists: a dimension the graph must specialise (a feature map
    of 1 pixel, say) then costs one more graph, which the warm-up counts, rather than an error that ends the run."""
    from torch import _dynamo
    return getattr(_dynamo, "maybe_mark_dynamic", None) or _dynamo.mark_dynamic


class SpatialDynamic(torch.nn.Module):
    """Calls a compiled module with its input's height and width (dims 2 and 3 of (B, C, H, W)) marked dynamic,
    so that one graph serves every bucket shape. ``module`` is the compiled module (``unwrap`` reaches the plain
    one through it)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self._mark = _mark_dynamic()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._mark(images, 2)
        self._mark(images, 3)
        return self.module(images)
