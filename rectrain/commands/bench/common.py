"""What every benchmark shares: the device, the machine it ran on, timing, peak memory, tables, output.

Timing rules (cifar10-airbench's): device work is asynchronous, so a timed region starts and ends with a
device synchronisation, or is bracketed by CUDA events; host clocks alone would time the launches.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rectrain.runtime.distributed import resolve_device
from rectrain.runtime.io import usable_cores


def device_of(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a UserError."""
    return torch.device(resolve_device(name))


cpu_cores = usable_cores  # the cores this process may use (its affinity mask)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What a figure needs beside it: the accelerator, the CPU, the software."""
    info = {"device": str(device), "cpu": cpu_model(), "cores": cpu_cores(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict) -> str:
    accel = f"{info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else "no GPU"
    return (f"machine: {accel}; {info['cores']} cores of {info['cpu']}; torch {info['torch']}, "
            f"python {info['python']}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory measurement: what an earlier configuration left (reference cycles such as an optimizer's
    hooks) is collected first, so it does not count towards the next one's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since ``reset_peak_memory`` (GiB); None on a CPU, where the
    process's memory is not attributable to one configuration."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def step_times_ms(device: torch.device, fn: Callable[[], object], steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn``: CUDA events on the GPU (no host sync between calls, so
    the queue stays full as in training), perf_counter around each call on the CPU."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = ""        # format spec for numbers, e.g. ",.0f"
    width: int = 10
    left: bool = False   # text columns read better left-aligned

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None:
            text = "-"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and self.fmt:
            text = format(value, self.fmt)
        else:
            text = str(value)
        return text.ljust(self.width) if self.left else text.rjust(self.width)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A plain-text table: a header line, then one line per row ('-' for a missing value)."""
    head = " ".join(c.header.ljust(c.width) if c.left else c.header.rjust(c.width) for c in columns)
    return "\n".join([head, *(" ".join(c.cell(r) for c in columns) for r in rows)])


def emit(result: dict, text: str, as_json: bool) -> None:
    """Print the human table, or (``--json``) exactly one JSON object on stdout."""
    print(json.dumps(result) if as_json else text)
    sys.stdout.flush()


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'224x224,224x288' -> [(224, 224), (224, 288)] (H x W)."""
    from rectrain.errors import UserError
    shapes = []
    for part in text.split(","):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserError(f"--shapes: {part!r} is not HxW, e.g. 224x224,224x288") from None
        if h < 1 or w < 1:
            raise UserError(f"--shapes: {part!r} must have positive sides")
        shapes.append((h, w))
    return shapes


def parse_list(flag: str, text: str, choices: Sequence[str]) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of ``choices``; a UserError names the flag and the choices."""
    from rectrain.errors import UserError
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise UserError(f"{flag}: {', '.join(bad) or 'nothing given'} is not one of {', '.join(choices)}")
    return items
