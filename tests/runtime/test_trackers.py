"""Experiment trackers (--log_to): the flag, the one-line error for a missing package, a failing or stalled tracker
that never stops or slows the run, and W&B (offline mode) and MLflow (a local file store) receiving every metrics row
and the resolved config, a resumed run continuing the same tracker runs. No network: W&B writes its offline files and
MLflow a file store under tmp."""

import glob
import json
import os
import struct
import threading

import pytest

from rectrain import trainer as train_mod
from rectrain.cli import main as cli_main
from rectrain.config import resolve_config
from rectrain.errors import UserError
from rectrain.runtime import trackers as trackers_mod
from rectrain.runtime.trackers import Trackers, parse_log_to
from tests.tiny import TINY, make_tiny_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def run(data_dir, out, *extra, name="run"):
    cfg = resolve_config(["--data_dir", data_dir, "--output", str(out), "--run_name", name, *TINY, *extra])
    return train_mod.train(cfg)


def jsonl(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_log_to_takes_a_comma_list_of_known_trackers():
    assert parse_log_to("wandb,mlflow") == ("wandb", "mlflow") and parse_log_to(" mlflow ") == ("mlflow",)
    assert parse_log_to(None) == () and parse_log_to("wandb,wandb") is None and parse_log_to("tensorboard") is None
    with pytest.raises(UserError, match="--log_to must be a comma list of wandb, mlflow"):
        resolve_config(["--log_to", "wandb,mlfow"])


def test_a_missing_tracker_package_stops_the_run_at_start_up_with_the_install_command(data_dir, tmp_path, monkeypatch,
                                                                                        capsys):
    real = trackers_mod.importlib.util.find_spec
    monkeypatch.setattr(trackers_mod.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path / "out"), "--log_to", "wandb,mlflow",
                     *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--log_to mlflow: the mlflow package is not installed: pip install mlflow" \
        in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


class FakeTracker:
    """A tracker that records its calls and fails where told to."""

    def __init__(self, name, fail_at=None, block=None):
        self.name, self.fail_at, self.block = name, fail_at, block
        self.calls, self.entered = [], threading.Event()

    def _call(self, what, *args):
        self.entered.set()
        if self.block is not None:
            self.block.wait()
        self.calls.append((what, *args))
        if what == self.fail_at:
            raise ConnectionError(f"{self.name}: connection lost")

    def start(self, config, run_id):
        self._call("start", config["arch"], run_id)
        return f"{self.name}-id"

    def log(self, scalars, axis, x):
        self._call("log", axis, x)

    def finish(self):
        self._call("finish")


def test_a_tracker_that_fails_to_start_or_to_log_is_switched_off_with_one_warning_and_the_run_trains_on(
        data_dir, tmp_path, monkeypatch):
    made = {}

    def adapter(name, fail_at):
        def make(run_dir, run_name):
            made[name] = FakeTracker(name, fail_at)
            return made[name]
        return make

    monkeypatch.setattr(train_mod, "check_installed", lambda log_to: None)  # fakes: no package needed
    monkeypatch.setitem(trackers_mod.ADAPTERS, "wandb", adapter("wandb", "log"))
    monkeypatch.setitem(trackers_mod.ADAPTERS, "mlflow", adapter("mlflow", "start"))
    assert run(data_dir, tmp_path, "--epochs", "1", "--log_to", "wandb,mlflow") == 0
    log = (tmp_path / "run/logs/rank0.log").read_text()
    assert log.count("warning: the wandb tracker is switched off (ConnectionError: wandb: connection lost)") == 1
    assert log.count("warning: the mlflow tracker is switched off (ConnectionError: mlflow: connection lost)") == 1
    assert [r["epoch"] for r in jsonl(tmp_path / "run/metrics.jsonl")] == [1]  # the files have every row
    assert [r["step"] for r in jsonl(tmp_path / "run/steps.jsonl")] == [2, 4, 6]
    assert [c[0] for c in made["wandb"].calls] == ["start", "log"]  # off after the failing call: nothing more
    assert [c[0] for c in made["mlflow"].calls] == ["start"]
    assert json.loads((tmp_path / "run/trackers.json").read_text()) == {"wandb": "wandb-id"}


def test_a_stalled_tracker_never_blocks_the_caller_and_is_switched_off_once_it_falls_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers_mod, "QUEUE_CALLS", 4)
    release, warnings = threading.Event(), []
    stalled = FakeTracker("wandb", block=release)
    trackers = Trackers([stalled], str(tmp_path), {"arch": "resnet18"}, resumed=False, log=warnings.append,
                        close_timeout=0.2)
    assert stalled.entered.wait(10)
    for step in range(1, 11):  # the tracker is stuck in start(): every call below only enqueues
        trackers.interval({"step": step, "epoch": step / 10, "lr": 0.1, "train_loss": 1.0})
    assert not release.is_set() and stalled.calls == []
    assert warnings == ["warning: the wandb tracker is switched off (it fell 4 calls behind: a slow or lost "
                        "connection); training continues, and the metrics files keep every row"]
    trackers.close()  # still stuck: close gives up after close_timeout instead of hanging
    release.set()
    trackers.channels[0].thread.join(5)
    assert not trackers.channels[0].thread.is_alive() and [c[0] for c in stalled.calls] == ["start"]


def test_a_resumed_run_continues_the_tracker_run_whose_id_the_run_folder_holds(tmp_path):
    first, second = FakeTracker("mlflow"), FakeTracker("mlflow")
    Trackers([first], str(tmp_path), {"arch": "resnet18"}, resumed=False, log=print).close()
    Trackers([second], str(tmp_path), {"arch": "resnet18"}, resumed=True, log=print).close()
    assert first.calls[0] == ("start", "resnet18", None) and second.calls[0] == ("start", "resnet18", "mlflow-id")
    fresh = FakeTracker("mlflow")
    Trackers([fresh], str(tmp_path), {"arch": "resnet18"}, resumed=False, log=print).close()
    assert fresh.calls[0] == ("start", "resnet18", None)  # a new run (not --resume) starts a new tracker run


# --- the real packages, offline ---------------------------------------------------------------------------------

def wandb_records(path):
    """The records of a W&B ``.wandb`` file (its LevelDB-style log: 32 KiB blocks of records with a 7-byte header,
    after a 7-byte file header), as protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_offline_runs(wandb_dir):
    """[(run id, config {key: value}, history rows)] of every offline run under ``wandb_dir``, oldest first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run_id, config, history = None, {}, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({c.key: json.loads(c.value_json) for c in record.run.config.update})
            elif kind == "config":
                config.update({c.key: json.loads(c.value_json) for c in record.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        runs.append((run_id, config, history))
    return runs


def test_wandb_offline_and_mlflow_file_store_get_every_row_and_the_config_and_a_resumed_run_continues_them(
        data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": str(tmp_path / "wb"), "WANDB_CACHE_DIR": str(tmp_path / "wb"),
                       "WANDB_DATA_DIR": str(tmp_path / "wb"), "MLFLOW_TRACKING_URI": (tmp_path / "ml").as_uri(),
                       "MLFLOW_ALLOW_FILE_STORE": "true"}.items():  # a file:// store is opt-in since MLflow 3.x
        monkeypatch.setenv(key, value)
    os.makedirs(tmp_path / "wb")
    # 6 steps per epoch: stopped at step 3, then resumed to the end of the epoch.
    assert run(data_dir, tmp_path, "--epochs", "1", "--max_steps", "3", "--log_to", "wandb,mlflow") == 0
    ids = json.loads((tmp_path / "run/trackers.json").read_text())
    assert run(data_dir, tmp_path, "--epochs", "1", "--resume", "auto") == 0
    assert json.loads((tmp_path / "run/trackers.json").read_text()) == ids  # the same tracker runs, continued
    rows, steps = jsonl(tmp_path / "run/metrics.jsonl"), jsonl(tmp_path / "run/steps.jsonl")
    log = (tmp_path / "run/logs/rank0.log").read_text()
    assert f"mlflow: continuing run {ids['mlflow']}" in log and "switched off" not in log

    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["arch"] == "resnet18"
    assert mlrun.data.params["log_to"] == "wandb,mlflow" and mlrun.data.params["epochs"] == "1"
    history = client.get_metric_history(ids["mlflow"], "train_loss")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["train_loss"])) for r in rows]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "step/train_loss"))
    assert logged == [(r["step"], pytest.approx(r["train_loss"])) for r in steps] and len(steps) == 3

    wb = wandb_offline_runs(str(tmp_path / "wb"))
    assert [run_id for run_id, _, _ in wb] == [ids["wandb"]] * 2  # one offline folder per process, one run id
    assert all(config["arch"] == "resnet18" and config["epochs"] == 1 for _, config, _ in wb)
    history = [row for _, _, h in wb for row in h]
    epoch_rows = [(h["epoch"], h["train_loss"]) for h in history if "train_loss" in h]
    assert epoch_rows == [(r["epoch"], pytest.approx(r["train_loss"])) for r in rows] and len(rows) == 1
    interval_rows = [(h["step/step"], h["step/train_loss"]) for h in history if "step/step" in h]
    assert interval_rows == [(r["step"], pytest.approx(r["train_loss"])) for r in steps]
