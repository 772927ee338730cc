"""Experiment trackers (``--log_to wandb,mlflow``): the run's metrics rows and its resolved config, sent by rank 0 to
Weights & Biases and MLflow beside the metrics files (``rectrain.runtime.metrics``), which stay the run's record.

- A tracker is an adapter of three calls (``Tracker``): ``start`` (a new tracker run, or the one whose id the run
  folder holds), ``log`` (one row of scalars against its axis) and ``finish``. ``MetricsWriter`` feeds ``Trackers``
  the rows it writes: epoch rows under their own names against the epoch, print-interval rows under ``step/...``
  against the step (TensorBoard's layout).
- Each adapter runs on a thread of its own behind a bounded queue: the training loop only enqueues, so a slow or lost
  connection never slows a step. A call that raises (a tracker that cannot start, a lost connection, a full queue)
  switches that tracker off with one warning; the run trains on, its metrics files hold every row.
- The tracker runs' ids live in ``{run}/trackers.json`` (written atomically): a resumed run (``--resume``) continues
  the same W&B run and MLflow run. Rows that a stopped run sent after its last checkpoint are sent again by the
  resumed run (the metrics files drop them; a tracker keeps both): such a step shows twice.
- The packages are optional and imported on the tracker's thread. ``check_installed``, at start-up before anything is
  written, turns a missing one into one line saying how to install it.

Settings come from the trackers' own environment variables: ``WANDB_PROJECT`` (default rectrain), ``WANDB_ENTITY``,
``WANDB_MODE`` (offline: log to disk, ``wandb sync`` later), ``WANDB_DIR`` (default: the run folder);
``MLFLOW_TRACKING_URI`` (a server, or a local store) and ``MLFLOW_EXPERIMENT_NAME`` (default rectrain).
No torch here: the config validates ``--log_to`` with ``parse_log_to``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import threading
import time
from typing import Protocol

from rectrain.errors import UserError
from rectrain.runtime.io import write_json_atomic

__all__ = ["TRACKERS", "STATE_FILE", "parse_log_to", "check_installed", "Tracker", "WandbTracker", "MlflowTracker",
           "Trackers", "open_trackers"]

# --log_to name -> how to install its package (the import name is the --log_to name).
TRACKERS = {"wandb": "pip install wandb", "mlflow": "pip install mlflow (or the lighter client, mlflow-skinny)"}
STATE_FILE = "trackers.json"
# Calls a tracker may fall behind before it is switched off: at one row per print interval and one per epoch, hours
# of a lost connection, a few MB of queued rows.
QUEUE_CALLS = 10_000
CLOSE_TIMEOUT_S = 30.0  # at the end of the run, how long a tracker may take to finish (W&B uploads what is left)


def parse_log_to(text: str | None) -> tuple[str, ...] | None:
    """``"wandb,mlflow"`` -> ``("wandb", "mlflow")``; ``()`` for none; None when a name is not a tracker or repeats."""
    if not text:
        return ()
    names = tuple(name.strip() for name in text.split(","))
    if any(name not in TRACKERS for name in names) or len(set(names)) != len(names):
        return None
    return names


def check_installed(log_to: str | None) -> None:
    """A UserError naming the install command when a tracker's package is missing (nothing is imported)."""
    for name in parse_log_to(log_to) or ():
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--log_to {name}: the {name} package is not installed: {TRACKERS[name]}, or leave {name} "
                            "out of --log_to")


class Tracker(Protocol):
    """One experiment tracker. Its calls run on the tracker's own thread, one at a time, in order."""

    name: str

    def start(self, config: dict, run_id: str | None) -> str:
        """Begin a tracker run logging ``config`` (the resolved settings), or continue ``run_id``; -> its id."""

    def log(self, scalars: dict[str, float], axis: str, x: float) -> None:
        """One row: ``scalars`` against ``axis`` ("epoch" or "step") at ``x``."""

    def finish(self) -> None:
        """The run is over (or stopped to be resumed)."""


class WandbTracker:
    """Weights & Biases: one W&B run per rectrain run, named like it; epoch rows against ``epoch``, interval rows
    (``step/...``) against ``step/step`` (W&B's own step just counts the calls, so a resumed run's repeated rows are
    kept rather than refused as going back in time)."""

    name = "wandb"

    def __init__(self, run_dir: str, run_name: str):
        self.run_dir, self.run_name = run_dir, run_name
        self.run = None
        self.defined: set[str] = set()

    def start(self, config: dict, run_id: str | None) -> str:
        import wandb
        where = {} if os.environ.get("WANDB_DIR") else {"dir": self.run_dir}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "rectrain", name=self.run_name, id=run_id,
                              resume="allow" if run_id else None, config=config, **where,
                              settings=wandb.Settings(console="off"))  # our stdout/stderr stay ours
        if run_id:  # settings given on resume (e.g. more --epochs) replace the first run's
            self.run.config.update(config, allow_val_change=True)
        return self.run.id

    def log(self, scalars: dict[str, float], axis: str, x: float) -> None:
        x_key = "epoch" if axis == "epoch" else "step/step"
        for key in scalars.keys() - self.defined:
            self.run.define_metric(key, step_metric=x_key)
            self.defined.add(key)
        self.run.log({**scalars, x_key: x})

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker:
    """MLflow: one MLflow run per rectrain run, in experiment ``MLFLOW_EXPERIMENT_NAME`` (default rectrain); the
    settings as params (on resume, the new ones as params and changed ones as ``resumed.<key>`` tags: MLflow never
    changes a param), epoch rows at ``step=epoch``, interval rows (``step/...``) at ``step=step``."""

    name = "mlflow"
    PARAMS_PER_CALL = 100  # MLflow's log_batch limit

    def __init__(self, run_dir: str, run_name: str):
        self.run_name = run_name
        self.client = self.run_id = None

    def start(self, config: dict, run_id: str | None) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.client = client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default
        if run_id:
            existing = client.get_run(run_id).data.params  # raises when the store has no such run
            client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rectrain"
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run_id, existing = client.create_run(experiment_id, run_name=self.run_name).info.run_id, {}
        self.run_id = run_id
        params = {k: _param_text(v) for k, v in config.items()}
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), self.PARAMS_PER_CALL):
            client.log_batch(run_id, params=new[i:i + self.PARAMS_PER_CALL])
        for k, v in params.items():
            if k in existing and existing[k] != v:
                client.set_tag(run_id, f"resumed.{k}", v)
        return run_id

    def log(self, scalars: dict[str, float], axis: str, x: float) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(x)) for k, v in scalars.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


ADAPTERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _param_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Channel:
    """One tracker on a daemon thread behind a bounded queue: ``send`` never blocks the caller."""

    def __init__(self, tracker: Tracker, log):
        self.tracker, self.log = tracker, log
        self.on, self.closed = True, False
        self.queue: queue.Queue = queue.Queue(QUEUE_CALLS)
        self.thread = threading.Thread(target=self._work, name=f"rectrain-{tracker.name}", daemon=True)
        self.thread.start()

    def send(self, call, *args) -> None:
        if not self.on:
            return
        try:
            self.queue.put_nowait((call, args))
        except queue.Full:
            self.off(f"it fell {QUEUE_CALLS:,} calls behind: a slow or lost connection")

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            call, args = item
            if not self.on:
                if self.closed:  # switched off, and no sentinel may come (close gave up): nothing left to do
                    return
                continue
            try:
                call(*args)
            except BaseException as e:  # anything a tracker raises (SystemExit included) stays on this thread
                self.off(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")

    def off(self, why: str) -> None:
        if self.on:
            self.on = False
            self.log(f"warning: the {self.tracker.name} tracker is switched off ({why}); training continues, and the "
                     "metrics files keep every row")

    def close(self, timeout: float) -> None:
        """Finish the tracker run (if the tracker is still on) and stop the thread, waiting at most ``timeout`` s."""
        self.send(self.tracker.finish)
        self.closed = True
        deadline = time.monotonic() + timeout
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive() and self.on:
            self.on = False
            self.log(f"warning: the {self.tracker.name} tracker did not finish within {timeout:g} s; what it had not "
                     "sent yet may be missing there (the metrics files have every row)")


class Trackers:
    """Rank 0's trackers, fed the rows that ``MetricsWriter`` writes. ``resumed``: continue the tracker runs whose ids
    ``{run_dir}/trackers.json`` holds (a tracker without one starts a new run); otherwise start new ones."""

    def __init__(self, trackers: list[Tracker], run_dir: str, config: dict, resumed: bool, log,
                 close_timeout: float = CLOSE_TIMEOUT_S):
        self.path = os.path.join(run_dir, STATE_FILE)
        self.log, self.close_timeout = log, close_timeout
        self.ids = _read_ids(self.path, log) if resumed else {}
        self._lock = threading.Lock()  # the ids are written from the trackers' threads
        self.channels = [_Channel(t, log) for t in trackers]
        for channel in self.channels:
            channel.send(self._start, channel.tracker, config, self.ids.get(channel.tracker.name))

    def _start(self, tracker: Tracker, config: dict, run_id: str | None) -> None:
        new_id = tracker.start(config, run_id)
        with self._lock:
            self.ids[tracker.name] = new_id
            write_json_atomic(self.path, self.ids)
        self.log(f"{tracker.name}: {'continuing' if run_id else 'logging to'} run {new_id}")

    def epoch(self, row: dict) -> None:
        """An epoch row (``EPOCH_FIELDS``) against its epoch."""
        scalars = {k: v for k, v in row.items() if k != "epoch" and _finite(v)}
        for channel in self.channels:
            channel.send(channel.tracker.log, scalars, "epoch", row["epoch"])

    def interval(self, row: dict) -> None:
        """A print-interval row (``STEP_FIELDS``) under ``step/...`` against its step."""
        scalars = {f"step/{k}": v for k, v in row.items() if k != "step" and _finite(v)}
        for channel in self.channels:
            channel.send(channel.tracker.log, scalars, "step", row["step"])

    def close(self) -> None:
        for channel in self.channels:
            channel.close(self.close_timeout)


def _read_ids(path: str, log) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            ids = json.load(f)
        if not isinstance(ids, dict):
            raise ValueError("not a mapping")
        return {str(k): str(v) for k, v in ids.items()}
    except (OSError, ValueError) as e:
        log(f"warning: {path} cannot be read ({e}): the trackers start new runs")
        return {}


def open_trackers(log_to: str | None, run_dir: str, run_name: str, config: dict, resumed: bool, log
                  ) -> Trackers | None:
    """The trackers ``--log_to`` names, started (on their threads); None when it names none."""
    names = parse_log_to(log_to) or ()
    if not names:
        return None
    return Trackers([ADAPTERS[name](run_dir, run_name) for name in names], run_dir, config, resumed, log)
