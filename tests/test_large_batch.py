"""Large global batches in real runs: --opt lars|lamb with --lr_schedule poly, --accum_steps (a stop inside an
accumulation, exact resume), --sync_bn (the conversion, and a CPU run with 2 processes)."""

import os
import re
import signal

import pytest
import torch

from rectrain import trainer as train_mod
from rectrain.cli import main as cli_main
from rectrain.config import resolve_config
from rectrain.errors import UserError
from rectrain.model import build_model
from rectrain.runtime.distributed import DistInfo
from rectrain.training import loop
from rectrain.training.checkpoint import load as load_ckpt
from rectrain.training.optim import build_optimizer
from rectrain.training.sync_bn import GlooSyncBatchNorm
from tests.test_train import assert_same_weights, data_dir, free_port, model_of, run  # noqa: F401 (fixture)

ACCUM = ["--opt", "lamb", "--lr", "0.01", "--lr_schedule", "poly", "--accum_steps", "4", "--epochs", "1"]


def test_a_stop_inside_an_accumulation_saves_at_its_end_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """6 batches per epoch in accumulations of 4 and 2. A SIGTERM arriving before the second batch is agreed at the
    first accumulation's end (batch 4, step 1); the resumed run (LAMB's moments and step counts from the checkpoint,
    the short last accumulation) ends with the uninterrupted run's weights, bit for bit."""
    assert run(data_dir, tmp_path, *ACCUM, name="straight") == 0
    log = (tmp_path / "straight/logs/rank0.log").read_text()
    assert "global batch 32 (1 process(es) x 8 x 4 accumulated batches)" in log and "lamb with poly decay" in log
    assert "gradient accumulation: 4 batches per optimizer step, 2 steps per epoch (the last of 2 batches)" in log
    straight = load_ckpt(tmp_path / "straight/checkpoints/last.pth")
    assert (straight["steps_per_epoch"], straight["step"]) == (6, 2)  # 6 batches, ceil(6 / 4) optimizer steps

    real = loop.accumulation

    def signal_before_the_second_batch(batch, *a):
        if batch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, *a)

    monkeypatch.setattr(loop, "accumulation", signal_before_the_second_batch)
    assert run(data_dir, tmp_path, *ACCUM, name="stopped") == 128 + signal.SIGTERM
    monkeypatch.setattr(loop, "accumulation", real)
    stopped = load_ckpt(tmp_path / "stopped/checkpoints/last.pth")
    assert (stopped["batch_in_epoch"], stopped["step"]) == (4, 1)
    assert stopped["optimizer"]["state"][0]["step_count"].item() == 1
    assert run(data_dir, tmp_path, *ACCUM, "--resume", "auto", name="stopped") == 0
    assert_same_weights(model_of(tmp_path / "straight/checkpoints/last.pth"),
                        model_of(tmp_path / "stopped/checkpoints/last.pth"))


@pytest.mark.parametrize("argv, words", [
    (["--accum_steps", "0"], "--accum_steps must be at least 1"),
    (["--lamb_betas", "0.9", "1.0"], "--lamb_betas must be two numbers in [0, 1)"),
    (["--lars_eta", "0"], "--lars_eta must be positive"),
    (["--poly_power", "-1"], "--poly_power must be positive"),
    (["--opt_eps", "-1e-8"], "--opt_eps must be 0 or more"),
    (["--opt", "lamb", "--nesterov"], "--nesterov is for --opt sgd or lars"),
])
def test_each_bad_large_batch_setting_is_refused_naming_its_flag(argv, words):
    with pytest.raises(UserError) as e:
        resolve_config(argv)
    assert words in str(e.value)


def test_the_schedule_counts_optimizer_steps_and_lr_per_256_the_accumulated_batch(tmp_path):
    cfg = resolve_config(["--data_dir", str(tmp_path), "--batch_size", "64", "--lr_per_256", "0.1", "--epochs", "10",
                          "--warmup_epochs", "2", "--accum_steps", "4", "--lr_schedule", "poly", "--min_lr", "1e-4"])
    s = train_mod.planned_schedule(cfg, steps_per_epoch=10, world_size=2)  # 10 batches: accumulations 4, 4, 2
    assert (s.total_steps, s.warmup_steps, s.kind, s.power) == (30, 6, "poly", 2.0)
    assert s.base_lr == pytest.approx(0.1 * 64 * 2 * 4 / 256)
    assert s(29) == pytest.approx(1e-4)


def test_resuming_with_another_optimizer_starts_its_state_afresh(tiny_run, tmp_path):
    """An SGD checkpoint continued with --opt lars: SGD's momentum means something else to LARS (its buffer holds the
    rate), so the weights carry over and the optimizer's state starts again, with a note."""
    code = cli_main(["train", "--resume", tiny_run.ckpt, "--data_dir", tiny_run.data, "--output", str(tmp_path),
                     "--run_name", "lars",
                     "--opt", "lars", "--lr", "1.0", "--epochs", "2", "--workers", "0", "--device", "cpu"])
    assert code == 0
    log = (tmp_path / "lars/logs/rank0.log").read_text()
    assert "was trained with --opt sgd; this run's --opt lars starts its state" in log
    ckpt = load_ckpt(tmp_path / "lars/checkpoints/last.pth")
    assert ckpt["config"]["opt"] == "lars" and ckpt["epoch"] == 2
    assert [g["trust_ratio"] for g in ckpt["optimizer"]["param_groups"]] == [True, False]


def test_sync_bn_converts_every_batchnorm_and_keeps_a_batchnorm_models_state_dict():
    """SyncBatchNorm layers take over the same tensors under the same names: the optimizer built before still trains
    them, and the checkpoint loads into a plain model (rectrain eval and export, a run without --sync_bn)."""
    model = build_model("resnet18", num_classes=3, width=8)
    optimizer = build_optimizer(model, "lars", lr=1.0, weight_decay=1e-4)
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    plain = model.state_dict()
    train_mod.use_sync_bn(model, DistInfo(rank=0, world_size=2), log=lambda m: None)
    kinds = {type(m) for m in model.modules()}
    assert GlooSyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds  # on the CPU; torch's on CUDA
    assert {id(p) for p in model.parameters()} == params
    converted = model.state_dict()
    assert list(converted) == list(plain) and all(converted[k] is plain[k] or torch.equal(converted[k], plain[k])
                                                  for k in plain)
    build_model("resnet18", num_classes=3, width=8).load_state_dict(converted, strict=True)


def test_sync_bn_with_one_process_says_it_has_no_effect():
    model = build_model("resnet18", num_classes=3, width=8)
    notes = []
    train_mod.use_sync_bn(model, DistInfo(), log=notes.append)
    assert notes == ["note: --sync_bn has no effect with one process: its BatchNorm already sees the whole batch"]
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_sync_bn_on_two_cpu_processes_keeps_the_replicas_identical_mid_epoch(data_dir, tmp_path):
    """Under gloo, --sync_bn gives every rank the global batch's BatchNorm statistics: stopped mid-epoch by
    --max_steps, both ranks hold the same weights and buffers (without it each rank's running statistics are its
    own until the epoch's end averages them; tests/test_train.py), and the checkpoint loads into a plain model."""
    assert run(data_dir, tmp_path, "--epochs", "1", "--nproc", "2", "--dist_port", free_port(), "--sync_bn",
               "--max_steps", "2", name="sbn") == 0
    logs = [(tmp_path / f"sbn/logs/rank{r}.log").read_text() for r in (0, 1)]
    assert "SyncBatchNorm: BatchNorm statistics over the global batch of 2 processes (all-reduces over gloo" in logs[0]
    digests = [re.findall(r"final weights sha1 (\w+)", log) for log in logs]
    assert len(digests[0]) == 1 and digests[0] == digests[1]
    ckpt = load_ckpt(tmp_path / "sbn/checkpoints/last.pth")
    assert ckpt["batch_in_epoch"] == 2 and ckpt["config"]["sync_bn"]
    cfg = ckpt["config"]
    build_model(cfg["arch"], num_classes=len(ckpt["classes"]), width=cfg["width"]).load_state_dict(ckpt["model"])
