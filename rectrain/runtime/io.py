"""What every part shares with the operating system: atomic file writes, the CPU cores this process may use, and
process pools.

Atomic writes: every file rectrain writes (checkpoints, the scan cache, config/metrics/summary files, the curves
plot, exported models, prepared images) is written to a hidden temporary file in the target's own folder, flushed
and fsynced, then renamed onto the target with ``os.replace``, and the folder is fsynced so the rename survives a
power loss. A reader therefore sees the old file or the complete new one, never half of one; a failure or an
interruption (an exception, Ctrl-C, a full disk) removes the temporary file and leaves the old target as it was.
Only a SIGKILL or a power loss mid-write leaves a temporary behind: ``is_temporary`` recognises them, and the owners
of a folder (the checkpointer, ``rectrain prepare``) remove stale ones when they start.

A full disk does not always say so: ``torch.save`` reports it as a ``RuntimeError`` ("unexpected pos ...",
"file write failed"). A RuntimeError while the target's file system has almost no free space left is therefore
reported as ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
import signal
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

__all__ = ["TMP_SUFFIX", "FULL_BELOW_BYTES", "temporary_path", "is_temporary", "atomic_file", "atomic_write",
           "write_json_atomic", "remove_temporaries", "usable_cores", "pool_context", "process_pool", "pool_map",
           "user_cache_dir"]

TMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")  # ".{name}.{pid}-{random}.tmp"
FULL_BELOW_BYTES = 4 << 20  # a failed write with less free space than this is a full disk (4 MiB)


def temporary_path(path: str) -> str:
    """A hidden, unique temporary name in ``path``'s own folder (a rename never crosses file systems). Hidden: the
    image index skips it, so a prepared dataset never lists a half-written image."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of ``temporary_path``'s (a write that a kill or power loss interrupted)."""
    return bool(_TEMPORARY.match(os.path.basename(name)))


def _fsync_folder(folder: str) -> None:
    try:  # make the rename itself durable; not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(folder: str) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@contextmanager
def atomic_file(path: str, mode: str = "wb", fsync: bool = True) -> Iterator:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` becomes the complete new file when the block ends, or
    stays as it was when the block raises (the temporary is removed and the exception propagates; a RuntimeError
    on a file system with almost no free space, torch's way of saying so, is raised as ``OSError(ENOSPC)`` naming
    ``path``).

    ``mode``: "wb" or "w". ``fsync=False`` skips the flush to disk (the rename is still atomic for every reader, and a
    killed process loses nothing that was renamed): for many small files, where an fsync each costs more than the
    work (``rectrain prepare``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temporary_path(path)
    # A new file (O_EXCL), 0666 & ~umask as any file opened for writing (mkstemp's 0600 would hide a shared
    # dataset's files); opened by name, so the file object's ``name`` is the temporary's path.
    f = open(tmp, mode, opener=lambda name, flags: os.open(name, flags | os.O_EXCL, 0o666))
    try:
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # torch.save reports a full disk as a RuntimeError; the free space is measured while the temporary still
        # holds its bytes
        full = isinstance(e, RuntimeError) and _disk_full(folder)
        _remove(tmp)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path
        raise
    if fsync:
        _fsync_folder(folder)


def atomic_write(path: str, data: bytes | str, fsync: bool = True) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def remove_temporaries(folder: str, recursive: bool = False) -> list[str]:
    """Delete the temporary files that interrupted writes left in ``folder`` (and its sub-folders); their paths.
    Call it only where no other process is writing at the same time."""
    removed = []
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder) if os.path.isdir(folder) else [])]
    for root, _dirs, names in walk:
        for name in names:
            if is_temporary(name):
                _remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


def user_cache_dir() -> str:
    """This user's cache folder for rectrain: $XDG_CACHE_HOME/rectrain, else ~/.cache/rectrain (not /tmp: it outlives
    a reboot and is this user's own). The scan cache of a read-only dataset and the compile cache live there."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rectrain")


# -- CPU cores and process pools ------------------------------------------------------------------------------
def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (a job scheduler or ``taskset`` may grant fewer
    than the machine has), else the machine's count (macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pool_context():
    """fork where available (Linux), as the DataLoader does: children start in milliseconds and only run Pillow and
    numpy, never torch or CUDA. forkserver/spawn would re-import the caller's ``__main__``, breaking scripts without
    an ``if __name__ == "__main__"`` guard, and cost ~0.2 s to start."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """A pool process's initializer: on Linux the kernel kills it (SIGKILL) when the process that started it dies,
    so a ``kill PID`` or a crash of the main process during a long scan leaves no worker blocked forever on its
    task queue. (The kernel watches the thread that forked: pools are started from the main thread.)"""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        return
    if os.getppid() != parent:  # the parent died before the call above: nobody is left to serve
        os._exit(1)


@contextmanager
def process_pool(workers: int, tasks: int, parallel_from: int = 2) -> Iterator[cf.ProcessPoolExecutor | None]:
    """A process pool of ``min(workers, tasks)`` processes, or None (run inline) when fewer than 2 workers or fewer
    than ``parallel_from`` tasks would use it; shut down on the way out, pending tasks cancelled (Ctrl-C, errors).
    Its processes die with this one (``_die_with_parent``)."""
    if workers < 2 or tasks < max(parallel_from, 2):
        yield None
        return
    pool = cf.ProcessPoolExecutor(min(workers, tasks), mp_context=pool_context(), initializer=_die_with_parent,
                                  initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def pool_map(pool: cf.ProcessPoolExecutor | None, fn: Callable, items: Iterable) -> Iterator:
    """``pool.map`` in order (the builtin ``map`` when ``pool`` is None), without Python 3.12+'s warning that forking
    a multi-threaded process may deadlock: the children run only Pillow and numpy code."""
    if pool is None:
        return map(fn, items)
    with warnings.catch_warnings():  # every fork happens inside map(): all tasks are submitted there
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        return pool.map(fn, items)
