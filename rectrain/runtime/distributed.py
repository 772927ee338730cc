"""Processes and collectives: who am I, how the job was launched, and how ranks agree to stop.

Launch modes, in order of precedence:
1. torchrun (single or multi-node, c10d rendezvous): RANK / WORLD_SIZE / LOCAL_RANK are in the environment.
2. SLURM `srun` with one task per GPU: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, and
   MASTER_ADDR from the first host of the job's node list unless set.
3. Plain `python train_g4.dn_12xlarge.py`: one process per visible GPU (or `--nproc N`, also on CPU),
   spawned here on 127.0.0.1:`--dist_port` (the seed's "automatic multi-GPU detection").

NCCL on GPUs, gloo on CPU. Multi-node misconfiguration (a rendezvous address that is loopback) fails at
once with the fix instead of hanging; every collective has `--dist_timeout`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from rectrain.errors import UserError


# The signals that stop a training run after a checkpoint: SIGTERM (kill, scancel, preemption), SIGINT (Ctrl-C),
# SIGHUP (the terminal or ssh session closed) and SIGUSR1 (SLURM's --signal=USR1@N warning before the time limit).
# SIGUSR2 and the rest keep their default action.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


# Exit status of a run stopped by a stop signal after saving its checkpoint: 128 + signal number, the
# shell's convention (143 SIGTERM, 130 SIGINT, 129 SIGHUP, 138 SIGUSR1). Schedulers treat it as "preempted, requeue".
def preempted_exit_code(signum: int) -> int:
    return 128 + signum


PREEMPTED_CODES = frozenset(preempted_exit_code(s) for s in STOP_SIGNALS)


FAILURE_GRACE_S = 15  # after one worker fails, how long the others get to exit before they are killed (a rank
                      # blocked in a collective with the failed one never returns by itself under NCCL)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ---------------------------------------------------------------------------------------------
# Launch


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'node[01-03,07],gpu5' -> ['node01', 'node02', 'node03', 'node07', 'gpu5'] (SLURM's compressed form)."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def launch_mode(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "slurm"
    return "local"


def slurm_to_env(env: dict, port: str) -> None:
    """Translate an `srun` task's SLURM variables into torch.distributed's (in place)."""
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    env["LOCAL_WORLD_SIZE"] = str(int(env["WORLD_SIZE"]) // max(nodes, 1))
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        env["MASTER_ADDR"] = expand_slurm_nodelist(nodelist)[0]
    env.setdefault("MASTER_PORT", port)


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise UserError(f"MASTER_ADDR={host!r} does not resolve on this node; set it to the hostname or IP of "
                        "the rank-0 node that every node can reach") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_multinode_env(env: dict) -> None:
    """Fail loudly on settings that would make a multi-node job hang."""
    world = int(env["WORLD_SIZE"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if world < 1 or not 0 <= int(env["RANK"]) < world:
        raise UserError(f"RANK={env['RANK']} is not in [0, WORLD_SIZE={world}): check the launcher's settings")
    if world > local_world:  # more than one node
        host = env.get("MASTER_ADDR", "127.0.0.1")
        if is_loopback(host):
            raise UserError(
                f"multi-node job (WORLD_SIZE={world}, {local_world} per node) but MASTER_ADDR={host} is a loopback "
                "address that other nodes cannot reach: pass torchrun --rdzv_endpoint=<first node's hostname>:PORT "
                "(or set MASTER_ADDR); if the wrong network interface is picked, set NCCL_SOCKET_IFNAME and "
                "GLOO_SOCKET_IFNAME (e.g. eth0)")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu "
                        "(or check CUDA_VISIBLE_DEVICES and the driver)")
    return requested


def launch(worker: Callable[[DistInfo], int], device: str = "auto", nproc: int | None = None,
           port: str = "12355", timeout_s: float = 1800.0) -> int:
    """Run ``worker(info)`` in every process of the job and return the exit status of rank 0."""
    device = resolve_device(device)
    mode = launch_mode()
    if mode == "slurm":
        slurm_to_env(os.environ, port)
    if mode in ("torchrun", "slurm"):
        if nproc not in (None, int(os.environ["WORLD_SIZE"])) and mode == "torchrun":
            raise UserError(f"--nproc {nproc} conflicts with torchrun's WORLD_SIZE={os.environ['WORLD_SIZE']}; "
                            "drop --nproc under torchrun")
        check_multinode_env(os.environ)
        return _run_worker(worker, device, timeout_s)
    if nproc is None:  # the seed's automatic multi-GPU detection: every visible GPU
        nproc = torch.cuda.device_count() if device == "cuda" else 1
    if nproc <= 1:
        return worker(DistInfo(device=device))
    if device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} but only {torch.cuda.device_count()} GPU(s) are visible")
    return _spawn_local(worker, device, nproc, port, timeout_s)


def _spawn_local(worker, device: str, nproc: int, port: str, timeout_s: float) -> int:
    """Start ``nproc`` workers and wait for all of them.

    A preemption stop (exit 128 + a stop signal) is not a failure: the other ranks are left to finish their own
    checkpoint-and-exit. Any other non-zero exit is: the remaining workers are terminated. A stop signal sent
    to this launcher alone (`kill PID`, SLURM's USR1 to the batch step) is forwarded to the workers, which then
    stop cleanly; SIGINT from a terminal already reaches the whole process group.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    if _port_in_use(int(port)):
        raise UserError(f"--dist_port {port} is already in use on this machine (another run?); pick a free port")
    ctx = mp.start_processes(_local_entry, args=(worker, device, nproc, port, timeout_s), nprocs=nproc,
                             join=False, start_method="spawn")
    procs = ctx.processes
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    # Forwarded: `kill PID` or `kill -INT PID` reaches only this launcher. When the whole group got it (Ctrl-C in
    # a terminal, scancel), the ranks get it twice within a moment, which their StopFlag counts as one.
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _signal_all(procs, signum))
    try:
        failed, failed_at = None, 0.0
        while any(p.is_alive() for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
            bad = [p for p in procs if p.exitcode is not None and p.exitcode != 0 and p.exitcode not in PREEMPTED_CODES]
            if bad and failed is None:
                failed, failed_at = bad[0].exitcode, time.monotonic()
                stopped = [i for i, p in enumerate(procs) if p.is_alive() and _process_state(p.pid) == "T"]
                cause = (f"rank {stopped[0]} is stopped (SIGSTOP, or Ctrl-Z: process state T) and the others timed "
                         "out waiting for it; " if stopped else "")
                print(f"rectrain: {cause}rank {procs.index(bad[0])} exited with status {failed}"
                      f"{' (killed by signal ' + str(-failed) + ')' if failed < 0 else ''}; stopping the other ranks",
                      file=sys.stderr, flush=True)
                _signal_all(procs, signal.SIGTERM)  # the others try to stop cleanly...
            if failed is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                for p in procs:  # ...but may be stuck in a collective with the dead rank
                    if p.is_alive():
                        p.kill()
        codes = [p.exitcode for p in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is not None:
        return failed if failed > 0 else 1
    return max(codes) if any(codes) else 0


def _process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (R running, S sleeping, T stopped, Z zombie...); "" off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return ""


def is_collective_timeout(e: BaseException) -> bool:
    """Whether ``e`` is a collective (gloo, NCCL) or a store that waited past the process group's timeout."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (  # torch's DistBackendError is a RuntimeError
        "timed out" in text or "timeout" in text) and any(w in text for w in ("gloo", "nccl", "collective", "store",
                                                                               "recv", "send", "wait"))


def _signal_all(procs, signum: int) -> None:
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _local_entry(local_rank: int, worker, device: str, nproc: int, port: str, timeout_s: float) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        code = _run_worker(worker, device, timeout_s)
    except UserError as e:  # one line per rank, like the single-process CLI
        print(f"rectrain: error (rank {local_rank}): {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except BaseException:
        traceback.print_exc()
        code = 1
    # Exit here, every time: torch's wrapper would report a plain non-zero exit as a crash, and the interpreter's
    # finalisation can race the communication library's threads (an abort after a finished run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_worker(worker, device: str, timeout_s: float) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                            "start one process per GPU (torchrun --nproc_per_node=<GPUs per node>)")
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)
    if world == 1:
        return worker(DistInfo(device=device))
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(world, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except Exception as e:  # rendezvous failure or timeout: say what to check
        raise UserError(f"rank {rank}/{world}: could not join the process group at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({e}); check that every "
                        "node uses the same address, port and world size, and that the port is open") from None
    finished = False
    try:
        code = worker(info)
        finished = True
        return code
    finally:
        if dist.is_initialized():
            if finished:  # leave together: a rank closing its connections while a peer still uses them
                dist.barrier()  # can abort gloo's threads ("terminate called without an active exception")
            dist.destroy_process_group()


def _restart_store(world: int, timeout: datetime.timedelta):
    """Under torchrun, the store of this attempt, or None for torch's own rendezvous.

    torchrun's agent hosts the store on one port for every attempt of a job, and torch (2.13) no longer prefixes
    the keys by attempt: after ``--max-restarts`` restarts the job, the ranks read the previous attempt's
    addresses, and gloo fails with "Connection refused" (NCCL would read a stale unique id). Reproduced with a
    ten-line script and torchrun alone; prefixing the keys by ``TORCHELASTIC_RESTART_COUNT`` fixes it, as torch
    used to do.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                        timeout=timeout)
    return dist.PrefixStore(f"/rectrain/attempt_{attempt}", tcp)


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP broadcasts rank 0's buffers at the start of each forward, so after the last step of an epoch
    every rank holds statistics updated by its own batch; averaging them (timm's distribute_bn
    'reduce') makes the replicas identical before validation and checkpointing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def all_gather_object(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def on_primary(fn, what: str, log=None):
    """Run ``fn()`` on rank 0 only and tell every rank how it went (one broadcast).

    Rank-0-only work (metrics and summary files, the scan that writes the cache) can fail, e.g. on a full
    disk; if rank 0 simply raised, the other ranks would wait in their next collective until the timeout.
    Here a failure becomes one UserError on every rank, naming ``what`` failed. Returns ``fn()``'s result on
    rank 0 and None elsewhere.
    """
    error, result = None, None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error = (type(e), str(e))  # the kind of mistake travels too (a data mistake leaves no run folder)
        except OSError as e:
            error = f"{what} failed: {e.strerror or e}{' (' + e.filename + ')' if e.filename else ''}; free disk " \
                    "space or choose another --output, then resume with --resume auto"
        except Exception as e:  # our bug: keep its traceback in the log, stop every rank cleanly
            if log is not None:
                log(f"error: {what} failed:\n{traceback.format_exc()}")
            error = f"{what} failed: {type(e).__name__}: {e}"
    raise_primary_error(broadcast_object(error))
    return result


def raise_primary_error(error: str | tuple | None, cls: type[UserError] = UserError) -> None:
    """Raise rank 0's failure (a message every rank received) on this rank, saying where it happened: each rank
    prints its error, and whichever exits first must not seem to be the one that failed."""
    if error:
        if isinstance(error, tuple):
            cls, error = error
        primary = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        raise cls(error if primary else f"rank 0 stopped the run: {error}")


class StopFlag:
    """A stop signal (``STOP_SIGNALS``) -> every rank agrees to stop at the same step boundary.

    A signal only sets a local flag (``received``), which nothing else ever clears. ``should_stop()`` is
    called once per step by every rank; with several processes it all-reduces (MAX) the local flags on
    the CPU (gloo), so no GPU sync is added, and every rank gets the same answer at the same step. The
    first signal asks for a clean stop; a second one (a second later or more: the copies a launcher forwards
    and a process group receives arrive together and count once) stops at once, without a checkpoint, as if no
    handler were installed.
    """

    REPEAT_S = 1.0  # a second signal sooner than this is the same stop (forwarded by a launcher and sent to the group)

    def __init__(self):
        self.received = 0  # set by the handler only
        self._first_at = 0.0
        self.agreed = 0    # the last answer of should_stop(), the same on every rank
        self.error: UserError | None = None  # this rank's pending failure (fail()), raised by every rank together
        self._previous = {}
        self._group = None

    @property
    def signum(self) -> int:
        """The signal this rank received or the ranks agreed on (0: none)."""
        return self.agreed or self.received

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_available() and dist.is_initialized():
            # A CPU group for the flag, so the check never waits on the GPU stream.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received and now - self._first_at >= self.REPEAT_S:  # a second stop: the default action, now
            self.uninstall()
            signal.raise_signal(signum)  # SIGINT raises KeyboardInterrupt (Python's own handler); the others kill
            return
        if not self.received:
            self._first_at = now
        self.received = self.received or signum

    def fail(self, error: UserError) -> None:
        """Record a failure of this rank (e.g. too many undecodable images): at the next ``should_stop()``
        every rank raises it together, instead of this rank leaving the others waiting in a collective."""
        if self.error is None:
            self.error = error

    def should_stop(self) -> int:
        """0 to go on, else the signal number (the same on every rank); raises a failure of any rank."""
        if self._group is None:
            if self.error is not None:
                raise self.error
            self.agreed = self.received
            return self.agreed
        # A handler may run at any bytecode boundary, e.g. right after the all-reduce returns: it only
        # ever writes ``received``, so a signal is never lost, at worst seen one step later.
        t = torch.tensor([self.received, int(self.error is not None)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        if t[1]:
            self._raise_agreed_error()
        self.agreed = int(t[0])  # a CPU tensor: no device sync
        return self.agreed

    def _raise_agreed_error(self) -> None:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if self.error is None else str(self.error), group=self._group)
        if self.error is not None:
            raise self.error
        rank = next(r for r, m in enumerate(messages) if m is not None)
        raise UserError(f"rank {rank} stopped the run: {messages[rank]}")
