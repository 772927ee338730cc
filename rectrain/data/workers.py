"""The DataLoader worker processes' lifecycle: how many, how they start, how they are stopped.

Workers decode in processes of their own. Three rules keep a run's stop clean:
- **Stop signals belong to the main process.** A scheduler (SLURM's scancel and preemption, systemd,
  ``kill -- -PGID``) signals the whole process group; a worker that died of it would crash the main process with
  "DataLoader worker ... killed by signal" before it saves. Workers are forked with the stop signals blocked
  (``start_workers``) and then ignore them (``ignore_stop_signals``, their init function).
- **Stopped explicitly.** Since they ignore SIGTERM, multiprocessing's exit handler (SIGTERM, then join) would wait
  for them forever: ``shut_down`` stops a loader's persistent workers (SIGKILL for a stuck one) on every way out of
  a run, and an ``atexit`` hook stops any still alive at interpreter exit.
- **No more workers than cores**: ``cap_workers``.
"""

from __future__ import annotations

import atexit
import signal
import weakref

import torch

from rectrain.runtime.distributed import STOP_SIGNALS
from rectrain.runtime.io import usable_cores

__all__ = ["ignore_stop_signals", "start_workers", "track", "shut_down", "cap_workers"]


def ignore_stop_signals(_worker_id: int) -> None:
    """A worker's init function: the stop signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1) are the main process's to act on
    (it stops the run, then the workers). Workers still exit when the main process does (PyTorch's watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` with the stop signals blocked while the workers are forked.

    A SIGTERM to the whole process group that lands while workers start would kill a worker that has not yet
    reached its init function (PyTorch's handler dies of a SIGTERM not sent by the parent) and crash the run.
    Blocked, not ignored: a signal for the main process stays pending and is delivered when the block ends, so it
    is never lost; the workers inherit the block, and so never die of a stop signal.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_LIVE_LOADERS: "weakref.WeakSet[torch.utils.data.DataLoader]" = weakref.WeakSet()


@atexit.register
def _shut_down_all() -> None:
    """At interpreter exit, before multiprocessing's own exit handler (atexit runs the later-registered first),
    which SIGTERMs daemonic children and joins them: our workers ignore SIGTERM, so they are stopped here."""
    for loader in list(_LIVE_LOADERS):
        shut_down(loader)


def track(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """Register a loader with workers for the exit hook; returns it."""
    if loader.num_workers > 0:
        _LIVE_LOADERS.add(loader)
    return loader


def shut_down(loader: torch.utils.data.DataLoader | None) -> None:
    """Stop a DataLoader's persistent workers (PyTorch keeps them in ``_iterator`` between epochs)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        workers = list(getattr(it, "_workers", ()))
        it._shutdown_workers()
        for w in workers:  # PyTorch's last resort is SIGTERM, which our workers block: a stuck one is killed
            if w.is_alive():
                w.kill()
                w.join(timeout=1)
    if loader is not None:
        loader._iterator = None


def cap_workers(requested: int, world_local: int = 1) -> tuple[int, str | None]:
    """Cap workers per process to the cores this process may use; returns (workers, note or None)."""
    cores = usable_cores()
    limit = max(1, cores // max(world_local, 1))
    if requested > limit:
        return limit, (f"--workers {requested} capped to {limit}: {cores} CPU core(s) shared by "
                       f"{world_local} process(es) on this node")
    return requested, None
