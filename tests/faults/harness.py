"""Run the real trainer CLI in a subprocess, inject faults into it, and watch it.

Every run is a new process group (``start_new_session``), so a test can signal the whole group as a
scheduler does (``os.killpg``) and a hang never outlives its test: on timeout the whole group is killed
and the run is marked ``hung``. Faults are described by ``RECTRAIN_FAULT`` (see inject/sitecustomize.py)
and report themselves in an event file, which tests poll instead of guessing with sleeps.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
INJECT_DIR = Path(__file__).resolve().parent / "inject"
SOAK = os.environ.get("RECTRAIN_FAULTS_SOAK", "") not in ("", "0")

# The tiny model of tests/test_train.py, with real DataLoader workers.
TINY = ["--arch", "resnet18", "--width", "8", "--target_size", "32", "--batch_size", "8", "--device", "cpu",
        "--print_freq", "1", "--lr", "0.05", "--warmup_epochs", "0.5", "--max_ratio", "1.5", "--deterministic",
        "--workers", "2", "--progress", "off"]
LR = 0.05
RUN_TIMEOUT_S = 180     # a whole tiny run on a busy 2-core machine; only a hang gets near it
STOP_TIMEOUT_S = 120    # from a signal to the exit of every process of the run
# A peer of a failed rank must stop well before a stuck collective times out (--dist_timeout, 1800 s by
# default; DIST_TIMEOUT_S in these runs): within PEER_STOP_S of the fault. A run still alive PEER_WAIT_S
# after the fault is killed and counts as hung. (The built-in launcher kills ranks still alive 15 s after
# another failed: a rank stuck mid-step in a collective cannot do better; torchrun and srun
# --kill-on-bad-exit do the same. Errors that every rank can see coming are agreed instead, and each
# rank's log then says why it stopped: tests of those check the logs too.)
DIST_TIMEOUT_S = 60
PEER_STOP_S = DIST_TIMEOUT_S // 2
PEER_WAIT_S = PEER_STOP_S + 5


def hold(rank: int) -> dict:
    """Fault spec: rank ``rank``'s connections stay open after it dies (how a dead rank looks under NCCL;
    see inject/sitecustomize.py), so its peers cannot learn of it from a closed gloo socket."""
    return {"hold": {"rank": rank, "seconds": 300}}


# The uninterrupted runs every interrupted one is compared with (fixtures ref1, ref2). 1 process: 6 steps
# per epoch, the schedule planned for 3 epochs, stopped after 2 (so a resume with other settings still has
# an epoch to show its learning-rate curve). 2 processes: 3 steps per epoch per rank, planned for 4,
# stopped after 2.
REF1 = ["--epochs", "3", "--max_steps", "12"]
REF2 = ["--epochs", "4", "--max_steps", "6"]
REF1_STEPS, REF2_STEPS = 12, 6
EXIT_SIGTERM, EXIT_SIGINT = 128 + signal.SIGTERM, 128 + signal.SIGINT


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@dataclass
class Result:
    code: int | None        # exit status; None when it hung and was killed
    stdout: str
    stderr: str
    seconds: float          # from start to exit (or to the kill after the timeout)
    hung: bool = False
    stopped_s: float | None = None  # from the fault (signal, kill) to the exit
    ended_at: float = 0.0           # wall-clock time (time.time()) of the exit, to compare with event times

    stacks: str = ""                # where a hung run was stuck (every process's threads), see inject/

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


@dataclass
class Run:
    """A trainer started in its own process group."""

    proc: subprocess.Popen
    workdir: Path
    events_path: Path
    started: float
    fault_at: float | None = None
    result: Result | None = None
    _out: object = field(default=None, repr=False)
    _err: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def events(self) -> list[tuple[float, int, int, str, str]]:
        """(time, pid, rank, name, detail) of every injected fault that fired so far."""
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            t, pid, rank, name, *detail = line.split(" ", 4)
            out.append((float(t), int(pid), int(rank[4:]), name, detail[0] if detail else ""))
        return out

    def wait_for(self, what: str, predicate, timeout: float = RUN_TIMEOUT_S, poll: float = 0.01):
        """Poll ``predicate()`` until it is truthy; fail if the run ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if not self.alive():
                res = self.finish(1)
                raise AssertionError(f"the run ended (exit {res.code}) before {what}:\n{res.stderr[-3000:]}")
            time.sleep(poll)
        self.kill_group(signal.SIGKILL)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_event(self, name: str, rank: int | None = None, count: int = 1, timeout: float = RUN_TIMEOUT_S):
        def found():
            hits = [e for e in self.events() if e[3] == name and (rank is None or e[2] == rank)]
            return hits[count - 1] if len(hits) >= count else None
        return self.wait_for(f"event {name!r} x{count}" + (f" on rank {rank}" if rank is not None else ""), found,
                             timeout)

    def first_event(self, name: str):
        return next((e for e in self.events() if e[3] == name), None)

    def finish_after(self, name: str, seconds: float = PEER_WAIT_S) -> tuple[Result, tuple | None]:
        """Wait for the exit, allowing ``seconds`` after the injected fault ``name`` fired; a run still alive
        then is killed and reported as hung. Returns the result and the fault's event (None: never fired)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        ev = None
        while self.alive() and time.monotonic() < deadline:
            ev = ev or self.first_event(name)
            if ev is not None and time.time() > ev[0] + seconds:
                break
            time.sleep(0.05)
        res = self.finish(0.5)
        return res, ev or self.first_event(name)

    def signal_main(self, sig: int) -> None:
        """Signal the trainer's main process only (``kill PID``; with --nproc, the launcher)."""
        if not self.alive():
            return
        self.fault_at = time.monotonic()
        os.kill(self.pid, sig)

    def kill_group(self, sig: int) -> None:
        """Signal every process of the run: the launcher, its ranks and their DataLoader workers."""
        if not self.alive():
            return
        if self.fault_at is None:
            self.fault_at = time.monotonic()
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> Result:
        """Wait for the exit; on timeout kill the whole group and report a hang. Idempotent."""
        if self.result is not None:
            return self.result
        hung = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
        tree = descendants(self.pid)
        if hung:  # where is it stuck? (inject/sitecustomize.py writes the stacks)
            _signal_all(self.pid, tree, signal.SIGUSR2)
            time.sleep(2)
        # Whatever happened, nothing of this run may survive it (workers, ranks of a broken job; torchrun
        # starts its workers in sessions of their own, so the process group is not enough).
        _signal_all(self.pid, tree | descendants(self.pid), signal.SIGKILL)
        if hung:
            self.proc.wait()
        end, ended_at = time.monotonic(), time.time()
        for f in (self._out, self._err):
            f.close()
        out = (self.workdir / "stdout.txt").read_text(errors="replace")
        err = (self.workdir / "stderr.txt").read_text(errors="replace")
        stopped = end - self.fault_at if self.fault_at is not None else None
        stacks = "".join(f"--- process {p.name[7:-4]}\n{p.read_text(errors='replace')}"
                         for p in sorted(self.workdir.glob("stacks.*.txt")) if p.stat().st_size)
        if hung and "_exit_function" in stacks:
            EXIT_HANGS.append(str(self.workdir))
        self.result = Result(None if hung else self.proc.returncode, out, err, end - self.started, hung, stopped,
                             ended_at, stacks)
        return self.result


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _signal_all(leader: int, pids: set[int], sig: int) -> None:
    """Signal the process group of ``leader`` and every process in ``pids`` (and their groups)."""
    groups = {leader}
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never the test's own group
    for target in groups:
        try:
            os.killpg(target, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


# Work folders of runs that hung in the interpreter's exit (multiprocessing's _exit_function), for the report.
EXIT_HANGS: list[str] = []

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def start(args: list[str], workdir: Path, fault: dict | None = None, script: bool = False,
          env: dict | None = None, launcher: list[str] | None = None) -> Run:
    """Start ``python -m rectrain train ARGS`` (or the seed's ``python train_g4.dn_12xlarge.py ARGS``, or
    ``LAUNCHER -m rectrain train ARGS`` with e.g. ``TORCHRUN``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.txt"
    events.unlink(missing_ok=True)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.pop("RECTRAIN_FAULT", None)
    # Runs without faults get the injector too, doing nothing but print where a hung process is stuck.
    spec = {"events": str(events), **(fault if fault is not None else {"stacks_only": True})}
    full_env["RECTRAIN_FAULT"] = json.dumps(spec)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INJECT_DIR), os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    if script:
        cmd = [sys.executable, "train_g4.dn_12xlarge.py"]
    else:
        cmd = [*(launcher or [sys.executable]), "-m", "rectrain", "train"]
    out, err = open(workdir / "stdout.txt", "w"), open(workdir / "stderr.txt", "w")
    proc = subprocess.Popen(cmd + list(args), cwd=REPO, env=full_env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return Run(proc, workdir, events, time.monotonic(), _out=out, _err=err)


def seconds_after(res: Result, event: tuple) -> float:
    """Seconds from an injected fault's event to the exit of the whole run."""
    return res.ended_at - event[0]


def run(args: list[str], workdir: Path, fault: dict | None = None, timeout: float = RUN_TIMEOUT_S,
        **kw) -> Result:
    return start(args, workdir, fault, **kw).finish(timeout)


def cli(*argv: str, workdir: Path, timeout: float = 120) -> Result:
    """Any other rectrain subcommand (scan, eval, ...) in its own process group."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "rectrain", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, err, time.monotonic() - t0)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Result(None, out, err, time.monotonic() - t0, hung=True)


def assert_job_stopped_for(res: Result, rank: int, stop_s: float, record) -> None:
    """The job ended by itself, soon, with a failure status and a message naming the failed rank."""
    record(exit_code=res.code, hangs=int(res.hung), seconds_to_stop=round(stop_s, 1), repetitions=1,
           runs_finished=0)
    assert not res.hung, f"the job hung until the test's timeout:\n{res.stderr[-3000:]}\nstacks:\n{res.stacks[-6000:]}"
    assert res.code not in (0, EXIT_SIGTERM, EXIT_SIGINT), res.stderr[-3000:]
    assert stop_s < PEER_STOP_S, f"the other rank stopped only after {stop_s:.0f} s (a timeout, not a stop)"
    assert re.search(rf"\brank {rank}\b", res.stderr), f"the error does not name rank {rank}:\n{res.stderr[-3000:]}"


# -- reading a run's outputs ---------------------------------------------------------------------

def train_args(data: str | Path, output: Path, name: str, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--output", str(output), "--run_name", name, *TINY, *extra]


def ddp(*extra: str) -> list[str]:
    return ["--nproc", "2", "--dist_port", free_port(), "--dist_timeout", str(DIST_TIMEOUT_S), *extra]


def ckpt_dir(output: Path, name: str) -> Path:
    return output / name / "checkpoints"


def load_ckpt(path: Path) -> dict:
    from rectrain.training.checkpoint import load
    return load(str(path))


def model_of(path: Path) -> dict:
    return load_ckpt(path)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unreadable_checkpoints(folder: Path) -> list[str]:
    """Every *.pth of a run folder that does not load (there must never be one)."""
    bad = []
    for p in sorted(folder.glob("*.pth")):
        try:
            load_ckpt(p)
        except Exception as e:  # noqa: BLE001 - any failure counts
            bad.append(f"{p.name}: {e}")
    return bad


def stray_temp_files(folder: Path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(folder / "**" / "*.tmp*"), recursive=True)
                  + glob.glob(str(folder / "**" / ".*.tmp*"), recursive=True))


def log_text(output: Path, name: str, rank: int = 0) -> str:
    p = output / name / "logs" / f"rank{rank}.log"
    return p.read_text(errors="replace") if p.exists() else ""


STEP_LINE = re.compile(r"epoch (\d+) batch (\d+)/(\d+) step (\d+) loss \S+ lr ([0-9.eE+-]+)")


def logged_lr(output: Path, name: str) -> list[tuple[int, float]]:
    """(step, lr) of every training log line of rank 0, in the order written (resumed runs append)."""
    return [(int(m.group(4)), float(m.group(5))) for m in STEP_LINE.finditer(log_text(output, name))]


def ranks_logging(output: Path, name: str, text: str, world: int = 2) -> list[int]:
    """The ranks whose log has a line with ``text`` (e.g. the reason of an agreed stop)."""
    return [r for r in range(world) if any(text in ln for ln in log_text(output, name, r).splitlines())]


def steps_per_epoch(output: Path, name: str) -> int:
    """Batches per epoch per process of the newest run logged in ``name`` (its "data: ..." line)."""
    found = re.findall(r"(\d+) batches per epoch per process", log_text(output, name))
    assert found, "no 'batches per epoch per process' line in the log"
    return int(found[-1])


def metric_rows(output: Path, name: str) -> list[dict]:
    p = output / name / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def copy_run(ref_out: Path, name: str, out: Path, as_name: str | None = None) -> Path:
    """Copy run ``name`` of ``ref_out`` into ``out`` (mtimes kept: they order checkpoints); returns the copy."""
    dst = out / (as_name or name)
    shutil.copytree(ref_out / name, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path -> contents of every file under ``folder`` except the logs (which a refused run may append to)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "logs" not in p.relative_to(folder).parts}
