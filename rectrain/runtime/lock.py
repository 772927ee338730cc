"""One run per run folder: an exclusive lock on ``{run_dir}/.rectrain.lock``, held for the whole run.

Two processes writing one run folder (a double launch, a SLURM requeue racing the old job, ``--resume auto`` on a
live run) would interleave their metrics, logs and checkpoints. The process that owns the run (the launcher of
spawned ranks, or global rank 0 under torchrun and srun) takes the lock before it reads or writes anything there,
and a second run on the same folder stops at once with one line naming the holder.

The lock is ``flock(2)`` on the lock file, which the kernel releases when the holder's process ends, however it
ends (kill -9 included): a lock left by a dead run is simply free again, and the next run takes it over with a note
naming the run that did not release it (the file still holds that run's host and PID). The file is never deleted
while a run may use it (deleting a lock file races with a process opening it); a clean end empties it.

Network file systems: NFSv4 and Lustre (mounted with ``flock``) honour the lock across machines; NFSv3 without
lockd, or Lustre with ``localflock``, lock per machine only, so two nodes may still both run on one folder there.
A machine that crashes while holding an NFS lock keeps it until the server's lease expires (90 s by default).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from rectrain.errors import UserError

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "busy_holder", "read_holder"]

LOCK_NAME = ".rectrain.lock"


class RunFolderBusy(UserError):
    pass


class RunLock:
    """``RunLock(run_dir, run_name).acquire()`` -> a note (str) when a dead run's lock was taken over, else None;
    ``release()`` (also on garbage collection and at exit, by the kernel) frees it."""

    def __init__(self, run_dir: str, run_name: str | None = None):
        self.run_dir, self.run_name = run_dir, run_name
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> str | None:
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {self.run_dir} ({e.strerror or e}); choose a writable "
                            "--output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderBusy(self._busy_message(read_holder(self.path))) from None
        previous = read_holder(self.path)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous:
            return (f"note: {self.run_dir} was locked by a run that ended without releasing it (PID "
                    f"{previous.get('pid')} on {previous.get('host')}, since {previous.get('since')}; killed?): "
                    "taken over")
        return None

    def _busy_message(self, holder: dict | None) -> str:
        who = (f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}" if holder
               else "another process")
        change = f"choose a --run_name other than {self.run_name}" if self.run_name else "choose another --run_name"
        return (f"the run folder {self.run_dir} is in use by another run ({who}): wait for it to end, or {change} "
                "(nothing was written)")

    def release(self) -> None:
        """Empty the file (a clean end leaves no holder to report) and free the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:  # the folder was removed, or the disk is full: the lock is freed all the same
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def busy_holder(run_dir: str) -> dict | None:
    """The holder of ``run_dir``'s lock while a run holds it ({} when it wrote no details), else None; creates and
    changes nothing (`rectrain check`)."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_holder(path: str) -> dict | None:
    """The host, PID and start time written by the lock's last holder; None when empty or unreadable."""
    try:
        with open(path) as f:
            text = f.read().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None
