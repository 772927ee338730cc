"""Fault injection for the real `rectrain train` CLI, loaded by Python at start-up (``sitecustomize``).

The fault-injection suite (tests/faults) puts this folder on ``PYTHONPATH`` of the trainer's subprocess
and describes the faults in the environment variable ``RECTRAIN_FAULT`` (JSON). Without that variable this
module does nothing. Every process of the job reads it: the launcher, the ranks it spawns (fresh
interpreters) and the DataLoader workers (forked, so they inherit the patches).

Patches are applied right after the module that defines the patched name is executed (an import hook), so
``from rectrain.training.losses import augmented_loss`` elsewhere binds the patched function. Each patch writes one
line to ``events`` when it fires, which is how a test knows the fault really happened and when.

On SIGUSR2 every process of a run writes its threads' stacks to ``stacks.<pid>.txt`` beside the event log
(the harness sends it to a hung run before killing it), so a hang shows where it is stuck.

Keys of ``RECTRAIN_FAULT`` (all optional):
  stacks_only     true: inject nothing, only answer SIGUSR2 (the harness sets it for runs without faults)
  events          path of the event log: lines "<unix time> <pid> rank<R> <event> <detail>"
  slow_step       seconds to sleep in every training step (a window to signal "during training")
  slow_val        seconds to sleep per validation image, in the workers (a window "during validation")
  slow_save       seconds torch.save keeps its (temporary) file open after writing, from call ``slow_save_from``
  enospc          {"what": "checkpoint"|"metrics", "after": N, "rank": R}: the write after N good ones raises
                  OSError(ENOSPC); a checkpoint write leaves half a file behind first, like a full disk
  nan             {"rank": R, "call": N}: the N-th training loss (1-based, this process) becomes NaN
  raise           {"rank": R, "where": "step"|"scan"|"save", "call": N}: an unexpected exception there
  undecodable     {"rank": R, "every": N}: every N-th training image (default: all) fails to decode in
                  that rank's DataLoader workers, as on a node whose storage fails
  hold            {"rank": R, "seconds": S}: right after rank R joins the process group, fork a child that
                  keeps the rank's descriptors open for S seconds. The rank's gloo connections then stay open
                  when it dies, so its peers are not told by a closed socket: this is how a dead rank looks
                  under NCCL, where peers wait in their next collective until --dist_timeout. The child only
                  sleeps; the test's killpg ends it.
  slow_worker_start   seconds a spawned DataLoader worker sleeps as it starts (a window "while workers start";
                  with --nproc the ranks' workers are spawned, and each reports "worker_start")
  no_gc           true: the garbage collector never runs (gc.disable()), so nothing is freed by it before
                  the interpreter exits: whether an exit path depends on a collection is then certain, not luck
  first_attempt_only  true: inject only when TORCHELASTIC_RESTART_COUNT is 0 (torchrun restarts)
"""

import errno
import importlib.abc
import json
import os
import sys
import time

_SPEC = json.loads(os.environ.get("RECTRAIN_FAULT", "null") or "null")
if _SPEC and _SPEC.get("first_attempt_only") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
    _SPEC = {"events": _SPEC["events"], "stacks_only": True} if _SPEC.get("events") else None  # stacks, no faults
_COUNTS: dict[str, int] = {}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _mine(rule: dict) -> bool:
    return rule is not None and int(rule.get("rank", 0)) == _rank()


def _count(name: str) -> int:
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    return _COUNTS[name]


def event(name: str, detail: str = "") -> None:
    path = _SPEC.get("events") if _SPEC else None
    if not path:
        return
    line = f"{time.time():.3f} {os.getpid()} rank{_rank()} {name} {detail}".rstrip() + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines of several processes never interleave
    finally:
        os.close(fd)


def _hold_connections(seconds: float) -> None:
    if os.fork() == 0:  # the child inherits every descriptor, sockets included, and only sleeps
        try:
            time.sleep(seconds)
        finally:
            os._exit(0)
    event("holding", f"{seconds:g} s")


# -- patches, one per module ---------------------------------------------------------------------

def _patch_losses(mod) -> None:
    real = mod.augmented_loss
    nan, boom = _SPEC.get("nan"), _SPEC.get("raise")

    def augmented_loss(*a, **k):
        n = _count("step")
        event("step", str(n))
        if _SPEC.get("slow_step"):
            time.sleep(float(_SPEC["slow_step"]))
        if _mine(boom) and boom.get("where") == "step" and n == int(boom.get("call", 1)):
            event("raise", f"step {n}")
            raise RuntimeError(f"injected failure in training step {n}")
        loss = real(*a, **k)
        if _mine(nan) and n == int(nan.get("call", 1)):
            event("nan", str(n))
            loss = loss * float("nan")
        return loss

    mod.augmented_loss = augmented_loss


def _patch_arscan(mod) -> None:
    boom = _SPEC.get("raise")
    if not (_mine(boom) and boom.get("where") == "scan"):
        return
    real = mod.scan_split

    def scan_split(*a, **k):
        event("raise", "scan")
        raise OSError(errno.EIO, "injected I/O error while scanning the data set")

    scan_split.__wrapped__ = real
    mod.scan_split = scan_split


def _patch_transforms(mod) -> None:
    cls = mod.RectangularCropTfm
    real = cls.__call__
    slow_val, bad = _SPEC.get("slow_val"), _SPEC.get("undecodable")

    def __call__(self, path, *a, **k):
        if not self.train and slow_val:
            event("val_image", os.path.basename(str(path)))
            time.sleep(float(slow_val))
        if self.train and _mine(bad) and _count("decode") % int(bad.get("every", 1)) == 0:
            event("undecodable", str(path))
            raise mod.DecodeError(f"cannot decode {path}: injected storage error")
        return real(self, path, *a, **k)

    cls.__call__ = __call__


def _patch_torch(mod) -> None:
    real = mod.save
    enospc, boom = _SPEC.get("enospc"), _SPEC.get("raise")
    slow, slow_from = _SPEC.get("slow_save"), int(_SPEC.get("slow_save_from", 1))

    def save(obj, f, *a, **k):
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
        if not isinstance(name, str):  # an in-memory buffer: collectives pickle objects with torch.save
            return real(obj, f, *a, **k)
        n = _count("save")
        event("save", f"{n} {name}")
        if _mine(boom) and boom.get("where") == "save" and n == int(boom.get("call", 1)):
            event("raise", f"save {n}")
            raise RuntimeError(f"injected serialisation failure in save {n}")
        if enospc and enospc.get("what") == "checkpoint" and _mine(enospc) and n > int(enospc.get("after", 0)):
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04" + b"\0" * 4096)  # half a file, as when the disk fills up mid-write
            event("enospc", str(name))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f, *a, **k)
        if slow and n >= slow_from:
            if hasattr(f, "flush"):
                f.flush()
            event("save_slow", str(name))
            time.sleep(float(slow))

    mod.save = save
    hold = _SPEC.get("hold")
    if hold is not None and hasattr(mod, "distributed") and hasattr(mod.distributed, "init_process_group"):
        real_init = mod.distributed.init_process_group

        def init_process_group(*a, **k):
            out = real_init(*a, **k)
            if _mine(hold):
                _hold_connections(float(hold.get("seconds", 300)))
            return out

        mod.distributed.init_process_group = init_process_group


def _patch_builtins_open() -> None:
    import builtins
    enospc = _SPEC.get("enospc")
    if not (enospc and enospc.get("what") == "metrics" and _mine(enospc)):
        return
    real = builtins.open

    def open(file, mode="r", *a, **k):
        # the metrics files, or the temporaries they are written to (".metrics.jsonl.<pid>-<random>.tmp")
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)).lstrip(".").startswith("metrics.") \
                and any(c in mode for c in "wax"):
            if _count("metrics_open") > int(enospc.get("after", 0)):
                event("enospc", os.fspath(file))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real(file, mode, *a, **k)

    builtins.open = open


_PATCHES = {"rectrain.training.losses": _patch_losses, "rectrain.data.source": _patch_arscan,
            "rectrain.data.transforms": _patch_transforms, "torch": _patch_torch}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules through the other finders and patches them right after they execute."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


def _stacks_on_sigusr1() -> None:
    """Write every thread's stack to stacks.<pid>.txt on SIGUSR2; forked children get their own file."""
    import faulthandler
    import signal
    global _STACKS
    _STACKS = open(os.path.join(os.path.dirname(_SPEC["events"]), f"stacks.{os.getpid()}.txt"), "w")
    faulthandler.register(signal.SIGUSR2, file=_STACKS, all_threads=True)


if _SPEC and _SPEC.get("events"):  # the harness asks a hung run where it is stuck
    _stacks_on_sigusr1()
    os.register_at_fork(after_in_child=_stacks_on_sigusr1)
if _SPEC and not _SPEC.get("stacks_only"):
    sys.meta_path.insert(0, _AfterImport())
    if _SPEC.get("no_gc"):
        import gc
        gc.disable()
    _patch_builtins_open()
    if "--multiprocessing-fork" in sys.argv and "RANK" in os.environ:  # a worker spawned by a rank
        event("worker_start")
        if _SPEC.get("slow_worker_start"):
            time.sleep(float(_SPEC["slow_worker_start"]))
