"""End-to-end training runs on CPU with a tiny ResNet and tiny images."""

import csv
import json
import os
import re
import signal

import pytest
import torch

from rectrain import trainer as train_mod
from rectrain.cli import main as cli_main
from rectrain.config import resolve_config
from rectrain.data.synth import make_synthetic
from rectrain.training.checkpoint import load as load_ckpt
from tests.tiny import TINY


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root), classes=3, train_per_class=16, val_per_class=5, kind="tiny", seed=0)
    return str(root)


def run(data_dir, out, *extra, name="run"):
    cfg = resolve_config(["--data_dir", data_dir, "--output", str(out), "--run_name", name, *TINY, *extra])
    return train_mod.train(cfg)


def model_of(path):
    return load_ckpt(str(path))["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_epoch_run_writes_every_output(data_dir, tmp_path):
    assert run(data_dir, tmp_path, "--epochs", "2") == 0
    rd = tmp_path / "run"
    ck = rd / "checkpoints"
    assert sorted(os.listdir(ck)) == ["best.pth", "checkpoint_epoch_001.pth", "checkpoint_epoch_002.pth", "last.pth"]
    assert (rd / "logs" / "rank0.log").read_text().count("loss") >= 2
    assert json.loads((rd / "config.json").read_text())["epochs"] == 2
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train_loss"] > 0 and 0 <= r["val_acc1"] <= r["val_acc5"] <= 100
        assert r["images_per_sec"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["epoch_time_s"] > 0
    assert rows[0]["lr"] > rows[1]["lr"] >= 0  # cosine decay, logged at the end of each epoch
    with open(rd / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (rd / "curves.png").stat().st_size > 1000
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["best_acc1"] == max(r["val_acc1"] for r in rows)
    ckpt = load_ckpt(str(ck / "last.pth"))  # weights_only=True inside
    assert ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 0 and ckpt["config"]["epochs"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(data_dir, tmp_path):
    assert run(data_dir, tmp_path, "--epochs", "2", name="straight") == 0
    steps = load_ckpt(tmp_path / "straight/checkpoints/checkpoint_epoch_001.pth")["step"]
    assert run(data_dir, tmp_path, "--epochs", "2", "--max_steps", str(steps), name="split") == 0
    assert sorted(os.listdir(tmp_path / "split/checkpoints"))[:1] == ["best.pth"]
    assert not (tmp_path / "split/checkpoints/checkpoint_epoch_002.pth").exists()
    assert run(data_dir, tmp_path, "--epochs", "2", "--resume", "auto", name="split") == 0
    assert_same_weights(model_of(tmp_path / "straight/checkpoints/last.pth"),
                        model_of(tmp_path / "split/checkpoints/last.pth"))
    rows = (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_a_first_release_checkpoint_resumes_to_the_same_weights(data_dir, tmp_path):
    """A checkpoint whose config holds only the settings of rectrain's first release: the later ones take today's
    defaults, which are what this run trained with, so the resumed run ends where the uninterrupted one did."""
    from tests.test_config import FIRST_RELEASE_CONFIG
    assert run(data_dir, tmp_path, "--epochs", "2", name="straight") == 0
    steps = load_ckpt(tmp_path / "straight/checkpoints/checkpoint_epoch_001.pth")["step"]
    assert run(data_dir, tmp_path, "--epochs", "2", "--max_steps", str(steps), name="old") == 0
    last = tmp_path / "old/checkpoints/last.pth"
    ckpt = load_ckpt(str(last))
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k in FIRST_RELEASE_CONFIG}
    for other in (tmp_path / "old/checkpoints").glob("*.pth"):
        other.unlink()
    torch.save(ckpt, last)
    assert cli_main(["eval", "--checkpoint", str(last), "--workers", "0", "--device", "cpu"]) == 0
    assert run(data_dir, tmp_path, "--epochs", "2", "--resume", "auto", name="old") == 0
    assert_same_weights(model_of(tmp_path / "straight/checkpoints/last.pth"), model_of(last))


def test_sigterm_mid_epoch_saves_and_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    assert run(data_dir, tmp_path, "--epochs", "2", name="straight") == 0
    from rectrain.training import schedule

    real = schedule.lr_at

    def lr_at_then_signal(step, *a, **k):
        if step == 3:  # a real SIGTERM, delivered in the middle of the first epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *a, **k)

    monkeypatch.setattr(schedule, "lr_at", lr_at_then_signal)
    assert run(data_dir, tmp_path, "--epochs", "2", name="stopped") == 128 + signal.SIGTERM
    monkeypatch.setattr(schedule, "lr_at", real)
    ck = load_ckpt(tmp_path / "stopped/checkpoints/last.pth")
    assert ck["epoch"] == 0 and ck["batch_in_epoch"] == 4  # the step in flight finished, then it stopped
    assert run(data_dir, tmp_path, "--epochs", "2", "--resume", "auto", name="stopped") == 0
    assert_same_weights(model_of(tmp_path / "straight/checkpoints/last.pth"),
                        model_of(tmp_path / "stopped/checkpoints/last.pth"))


def test_sigterm_during_validation_saves_and_resume_validates_again(data_dir, tmp_path, monkeypatch):
    real_eval = train_mod.evaluate

    def signal_then_eval(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_eval(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", signal_then_eval)
    assert run(data_dir, tmp_path, "--epochs", "1", name="v") == 128 + signal.SIGTERM
    monkeypatch.setattr(train_mod, "evaluate", real_eval)
    ck = load_ckpt(tmp_path / "v/checkpoints/last.pth")
    assert ck["epoch"] == 0 and ck["batch_in_epoch"] == ck["steps_per_epoch"]
    assert not (tmp_path / "v/checkpoints/checkpoint_epoch_001.pth").exists()
    assert run(data_dir, tmp_path, "--epochs", "1", "--resume", "auto", name="v") == 0
    rows = [json.loads(r) for r in (tmp_path / "v/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["val_acc1"] is not None


def test_corrupt_last_checkpoint_falls_back_to_previous(data_dir, tmp_path, capsys):
    assert run(data_dir, tmp_path, "--epochs", "1", name="c") == 0
    last = tmp_path / "c/checkpoints/last.pth"
    last.unlink()  # last.pth is a hard link of the epoch file: replace it, don't write through it
    last.write_bytes(b"\x00garbage")
    assert run(data_dir, tmp_path, "--epochs", "2", "--resume", "auto", name="c") == 0
    log = (tmp_path / "c/logs/rank0.log").read_text()
    assert "last.pth cannot be loaded" in log and "resumed from" in log and "checkpoint_epoch_001.pth" in log
    assert load_ckpt(last)["epoch"] == 2


def test_two_process_gloo_run_under_split_leftovers_resumes_with_identical_replicas_and_eval_agrees(data_dir, tmp_path,
                                                                                                      capfd):
    """A real 2-process run with the non-default leftover policy: every step one shape, the leftovers cut into
    smaller batches (4 steps per epoch on this data, where mix has 3); stopped mid-epoch by --max_steps and resumed to
    the end, with bit-identical replicas, and its validation equal to a 1-process evaluation of the same weights.
    (That a resumed rank reads exactly the rest of its epoch is checked image by image in tests/data/test_loader.py;
    with one process every policy deals the same batches; the default policy runs 2 processes in tests/faults.)"""
    ddp = ("--epochs", "1", "--nproc", "2", "--ddp_leftovers", "split")
    assert run(data_dir, tmp_path, *ddp, "--dist_port", free_port(), "--max_steps", "2", name="split") == 0
    ck = load_ckpt(tmp_path / "split/checkpoints/last.pth")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["steps_per_epoch"]) == (0, 2, 4)
    assert run(data_dir, tmp_path, *ddp, "--dist_port", free_port(), "--resume", "auto", name="split") == 0
    logs = [(tmp_path / f"split/logs/rank{r}.log").read_text() for r in (0, 1)]
    assert "(--ddp_leftovers split): all 4 steps per epoch train one shape on every rank, 2 of them smaller" in logs[0]
    assert re.search(r"resumed from \S+last.pth: epoch 1, batch 2, step 2", logs[0]) and "may repeat" not in logs[0]
    digests = [re.findall(r"final weights sha1 (\w+)", log) for log in logs]
    # Logged at the stop (BatchNorm buffers still per rank mid-epoch) and at the end (averaged: identical replicas).
    assert len(digests[0]) == len(digests[1]) == 2 and digests[0][-1] == digests[1][-1]
    ckpt = str(tmp_path / "split/checkpoints/last.pth")
    assert load_ckpt(ckpt)["step"] == 4
    capfd.readouterr()
    assert cli_main(["eval", "--checkpoint", ckpt, "--device", "cpu", "--workers", "0", "--batch_size", "4",
                     "--json"]) == 0
    single = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    row = json.loads((tmp_path / "split/metrics.jsonl").read_text().splitlines()[0])
    assert single["val_images"] == 15
    # eval --json rounds to 6 decimals (JSON_DECIMALS); 15 images give accuracies like 53.333...
    assert (row["val_acc1"], row["val_acc5"]) == pytest.approx((single["val_acc1"], single["val_acc5"]), abs=1e-6)
    assert row["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)


def test_existing_run_is_never_overwritten_without_resume(data_dir, tmp_path, capsys):
    assert run(data_dir, tmp_path, "--epochs", "1", name="r") == 0
    before = (tmp_path / "r/checkpoints/checkpoint_epoch_001.pth").read_bytes()
    capsys.readouterr()
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path), "--run_name", "r", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "--resume auto" in err and err.count("\n") == 1
    assert (tmp_path / "r/checkpoints/checkpoint_epoch_001.pth").read_bytes() == before


def test_empty_data_dir_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    code = cli_main(["train", "--data_dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_decode_failures_past_the_limit_stop_with_a_clear_message(tmp_path, capsys):
    data = tmp_path / "data"
    make_synthetic(str(data), classes=2, train_per_class=10, val_per_class=2, kind="tiny", seed=2)
    from rectrain.data.source import scan_split
    scan = scan_split(str(data), "train")
    for rel in scan.index.paths:  # every file now fails to decode, yet the cached scan still lists it
        path = os.path.join(scan.index.split_dir, str(rel))
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    code = cli_main(["train", "--data_dir", str(data), "--output", str(tmp_path / "out"), "--epochs", "1",
                     "--max_decode_failures", "3", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "failed to decode" in err and "Traceback" not in err


def free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_sigterm_to_the_launcher_stops_both_ranks_cleanly(data_dir, tmp_path):
    """A real 2-process run; `kill PID` of the launcher reaches both ranks, which agree and save."""
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rectrain", "train", "--data_dir", data_dir, "--output", str(out), "--run_name", "p",
           *TINY, "--epochs", "200", "--nproc", "2", "--dist_port", free_port(), "--print_freq", "1"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        log = out / "p" / "logs" / "rank0.log"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (log.exists() and "epoch 2 batch" in log.read_text()):
            time.sleep(0.2)
        try:
            assert proc.poll() is None, "the run ended before it could be interrupted: " + (tmp_path / "stderr.txt").read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for rank in (0, 1):
        assert "stopping on signal 15" in (out / "p" / "logs" / f"rank{rank}.log").read_text()
    ck = load_ckpt(out / "p" / "checkpoints" / "last.pth")
    assert ck["epoch"] >= 1 and len(ck["rng"]) == 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    assert run(data_dir, tmp_path, "--epochs", "1", name="nan") == 0
    good = (tmp_path / "nan/checkpoints/last.pth").read_bytes()
    from rectrain.training import step as engine
    real = engine.augmented_loss
    calls = []

    def loss_turning_nan(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(engine, "augmented_loss", loss_turning_nan)
    capsys.readouterr()
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path), "--run_name", "nan", *TINY,
                     "--epochs", "2", "--resume", "auto"])
    err = capsys.readouterr().err
    step = load_ckpt(tmp_path / "nan/checkpoints/last.pth")["step"]
    message = err.strip().splitlines()[-1]
    # the third step after resuming: steps are counted from 1, as in the progress lines
    assert code == 2 and f"non-finite at step {step + 3} " in message, message
    assert "--lr" in message and "--weight_decay" in message
    assert (tmp_path / "nan/checkpoints/last.pth").read_bytes() == good


def test_srun_style_launch_reads_the_slurm_environment(data_dir, tmp_path):
    """Two tasks started as `srun --ntasks 2` would start them: each finds its rank in SLURM_* variables."""
    import subprocess
    import sys
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="localhost")
        env.pop("MASTER_ADDR", None)
        procs.append(subprocess.Popen([sys.executable, "train_g4.dn_12xlarge.py", "--data_dir", data_dir,
                                       "--output", str(tmp_path), "--run_name", "s", *TINY, "--epochs", "1",
                                       "--dist_port", port], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    digests = [re.findall(r"final weights sha1 (\w+)", (tmp_path / f"s/logs/rank{r}.log").read_text())
               for r in (0, 1)]
    assert digests[0] and digests[0] == digests[1]
    assert "2 process(es)" in (tmp_path / "s/logs/rank0.log").read_text()


def test_compile_warms_every_shape_up_front_and_never_recompiles(data_dir, tmp_path, monkeypatch):
    """--compile: the warm-up compiles each training and validation shape once; its time is reported apart; the
    compiled graphs go to the --compile_cache folder, which records them for the next run's estimate."""
    import torch._dynamo
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, **{**kw, "backend": "aot_eager"}))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the run sets it for itself: restored afterwards
    torch._dynamo.reset()
    cache = tmp_path / "compile_cache"
    assert run(data_dir, tmp_path, "--epochs", "2", "--compile", "--max_ratio", "1.0", "--compile_cache", str(cache),
               name="comp") == 0
    log = (tmp_path / "comp/logs/rank0.log").read_text()
    assert "compile: compiled step (--compile on)" in log and f"compile cache: {cache} (--compile_cache" in log
    shapes = re.search(r"warm-up: (\d+) training and 1 validation batch shapes", log)
    assert shapes and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    recorded = next(iter(json.loads((cache / "rectrain_compiled.json").read_text()).values()))
    assert len(recorded) == int(shapes.group(1)) + 1 and any(g.startswith("eval ") for g in recorded)
    assert "new graph" not in log
    rows = [json.loads(r) for r in (tmp_path / "comp/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["warmup_s"] > 0 and rows[1]["warmup_s"] is None
    summary = json.loads((tmp_path / "comp/summary.json").read_text())
    assert summary["warmup_s"] == rows[0]["warmup_s"]
    assert not any(k.startswith("_orig_mod.") for k in load_ckpt(tmp_path / "comp/checkpoints/last.pth")["model"])


def test_a_shape_the_warm_up_missed_is_reported_as_a_recompile(data_dir, tmp_path, monkeypatch):
    import torch._dynamo
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setattr(train_mod, "plan_shapes", lambda *a: ([], []))  # a warm-up that foresees nothing
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    assert run(data_dir, tmp_path, "--epochs", "1", "--compile", "--max_ratio", "1.0", "--compile_cache",
               str(tmp_path / "cc"), name="miss") == 0
    assert "new graph(s) after the warm-up" in (tmp_path / "miss/logs/rank0.log").read_text()


def test_compile_auto_trains_eager_on_the_cpu_and_says_why(data_dir, tmp_path):
    assert run(data_dir, tmp_path, "--epochs", "1", "--max_steps", "1", name="auto") == 0
    log = (tmp_path / "auto/logs/rank0.log").read_text()
    line = next(x for x in log.splitlines() if "compile:" in x)
    assert "eager step (--compile auto: eager on the CPU" in line and "--compile forces it" in line
    assert "warm-up" not in log and not (tmp_path / "auto/compile_cache").exists()


def test_cuda_graphs_with_several_processes_is_refused_before_anything_starts(data_dir, tmp_path, capsys):
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path / "out"), *TINY, "--nproc", "2",
                     "--cuda_graphs"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--cuda_graphs" in err and "pytorch#139207" in err
    assert not (tmp_path / "out").exists()


def test_gpu_decode_without_cuda_or_torchvision_is_one_clear_line(data_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine can decode on the GPU")
    code = cli_main(["train", "--data_dir", data_dir, "--output", str(tmp_path / "out"), *TINY, "--decode", "gpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--decode cpu" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
