"""`rectrain bench model|e2e|ablation` on tiny CPU settings: well-formed tables and JSON; the timm runner's wiring."""

import contextlib
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from rectrain.cli import main as cli_main
from rectrain.commands.bench import ablation as ablation_mod
from rectrain.commands.bench import e2e as e2e_mod
from rectrain.commands.bench import model as model_mod
from rectrain.data.synth import make_synthetic
from rectrain.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = ["--device", "cpu", "--arch", "resnet18", "--width", "8", "--batch_size", "4"]


def run_json(argv: list[str]) -> dict:
    """Run `rectrain ARGV`; its stdout must be exactly one JSON object (log lines go to stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(argv) == 0
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def json_out(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # --json: exactly one JSON object on stdout
    return json.loads(out[0])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root), classes=3, train_per_class=16, val_per_class=2, kind="tiny", seed=0)
    return str(root)


# -- model ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_result():
    return run_json(["bench", "model", *TINY_MODEL, "--shapes", "32x32", "--optimizers", "foreach,fused",
                     "--steps", "1", "--warmup", "1", "--peak_tflops", "1.5", "--json"])


def test_model_bench_json_has_one_row_per_optimizer_with_positive_figures(model_result):
    rows = model_result["rows"]
    assert [r["optimizer"] for r in rows] == ["foreach", "fused"]
    for r in rows:
        assert r["shape"] == "32x32" and r["dtype"] == "fp32" and r["format"] == "contiguous"
        for key in ("step_ms", "images_per_sec", "gflop_per_image", "tflops", "mfu"):
            assert r[key] > 0, key
        assert r["images_per_sec"] == pytest.approx(4 / (r["step_ms"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.5)  # over the given peak
        assert r["peak_mem_gb"] is None  # CUDA only
    assert model_result["peak_source"] == "given"


def test_model_bench_compares_fused_with_foreach_sgd(model_result):
    (cmp,) = model_result["optimizer_comparison"]
    foreach, fused = model_result["rows"]
    assert cmp["fused_over_foreach"] == pytest.approx(fused["images_per_sec"] / foreach["images_per_sec"])


def test_model_bench_table_has_a_line_per_row_and_the_comparison(model_result):
    text = model_mod.render(model_result)
    assert "images/s" in text and "MFU %" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("32x32")]) == 2
    assert "fused SGD vs foreach at 32x32" in text


def test_resnet50_training_costs_about_24_gflop_per_image_at_224():
    flops = model_mod.train_flops("resnet50", 64, 1000, 2, 224, 224)  # forward 4.1 GMAC, backward twice that
    assert 23e9 < flops / 2 < 25.5e9


def test_model_bench_rejects_an_unknown_precision_in_one_line(capsys):
    assert cli_main(["bench", "model", *TINY_MODEL, "--dtypes", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dtypes" in err[0] and "fp32" in err[0]


# -- e2e -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e_result(data_dir):
    return run_json(["bench", "e2e", "--data_dir", data_dir, "--arch", "resnet18", "--width", "8", "--target_size",
                     "32", "--batch_size", "4", "--workers", "0", "--device", "cpu", "--steps", "4", "--skip", "2",
                     "--interval", "2", "--json"])


def test_e2e_bench_json_reports_the_timed_steps(e2e_result):
    r = e2e_result
    assert r["images_per_sec"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["warmup_s"] >= 0
    assert (r["skip_steps"], r["timed_steps"], r["timed_images"]) == (2, 4, 16)
    assert r["intervals"][-1]["step"] == 6  # stopped by --max_steps = skip + steps
    assert r["train_shapes"] and all(s.startswith("4x") for s in r["train_shapes"])
    assert r["settings"]["arch"] == "resnet18" and r["settings"]["precision"] == "fp32"
    assert r["peak_mem_gb"] is None
    assert r["settings"]["compile"] == "auto" and r["settings"]["compiled"] is False and r["compile_graphs"] == 0
    assert "eager on the CPU" in r["compile_decision"]  # what --compile auto chose, and why


def test_e2e_bench_table_names_images_per_sec_and_the_warm_up(e2e_result):
    text = e2e_mod.render(e2e_result)
    assert "images/s:" in text and "over steps 3-6" in text and "warm-up:" in text and "data wait:" in text
    assert ", eager, " in text and "0 compiled graph(s)" in text


def test_timed_intervals_leave_out_the_steps_before_skip():
    rows = [{"step": 5, "images_per_sec": 10.0, "data_wait_frac": 0.5},   # steps 1-5: pipeline fill, ignored
            {"step": 10, "images_per_sec": 100.0, "data_wait_frac": 0.1},  # 5 x 8 images in 0.4 s
            {"step": 15, "images_per_sec": 50.0, "data_wait_frac": 0.0}]   # 40 images in 0.8 s
    res = e2e_mod.timed_intervals(rows, skip=5, batch=8)
    assert res["timed_images"] == 80
    assert res["images_per_sec"] == pytest.approx(80 / 1.2)
    assert res["data_wait_frac"] == pytest.approx(0.04 / 1.2)


def test_e2e_bench_with_accumulation_logs_whole_optimizer_steps(tmp_path):
    """--accum_steps N: each measured interval is N x --interval batches, ending on an optimizer step, and a step
    holds N batches of images."""
    from rectrain.config import resolve_config
    cfg = resolve_config(["--data_dir", str(tmp_path), "--accum_steps", "4", "--batch_size", "8"])
    run = e2e_mod.bench_config(cfg, str(tmp_path), str(tmp_path), skip=5, steps=10, interval=5)
    assert (run.max_steps, run.print_freq, run.accum_steps) == (15, 20, 4)


def test_e2e_bench_rejects_zero_steps_in_one_line(data_dir, capsys):
    assert cli_main(["bench", "e2e", "--data_dir", data_dir, "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps" in err[0]


# -- ablation ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ablation_result(data_dir, tmp_path_factory):
    partial = tmp_path_factory.mktemp("abl") / "rows.jsonl"
    res = run_json(["bench", "ablation", "--data_dir", data_dir, *TINY_MODEL, "--target_size", "32",
                    "--workers", "0", "--steps", "2", "--warmup", "1", "--rows", "fp32,rect,gpu_decode,area",
                    "--partial", str(partial), "--json"])
    return res, partial


def test_ablation_json_rows_are_in_the_seeds_order_with_positive_figures(ablation_result):
    res, _ = ablation_result
    assert [r["name"] for r in res["rows"]] == ["fp32", "rect", "gpu_decode", "area"]
    for r in (r for r in res["rows"] if r["skipped"] is None):
        assert r["images_per_sec"] > 0 and r["step_ms"] > 0 and r["warmup_s"] > 0
        assert 0 <= r["data_wait_frac"] <= 1 and r["shapes"]


def test_ablation_ratio_is_images_per_sec_over_the_fp32_baseline(ablation_result):
    res, _ = ablation_result
    base = res["rows"][0]
    assert base["name"] == "fp32" and base["ratio"] == pytest.approx(1.0)
    for r in res["rows"]:
        if r["skipped"] is None:
            assert r["ratio"] == pytest.approx(r["images_per_sec"] / base["images_per_sec"])


@pytest.mark.skipif(ablation_mod.gpu_decode_problem(torch.device("cpu")) is None, reason="GPU decode runs here")
def test_ablation_skips_gpu_decode_on_a_cpu_with_a_note(ablation_result):
    res, _ = ablation_result
    row = next(r for r in res["rows"] if r["name"] == "gpu_decode")
    assert "images_per_sec" not in row
    assert row["skipped"].startswith("GPU decode unavailable") and row["ratio"] is None
    assert "not measured: + GPU JPEG decode" in ablation_mod.render(res)


def test_ablation_table_has_a_line_per_row(ablation_result):
    res, _ = ablation_result
    text = ablation_mod.render(res)
    assert "vs fp32" in text and "peak GiB" in text
    for r in res["rows"]:
        assert any(line.startswith(r["label"]) for line in text.splitlines())


def test_ablation_appends_each_row_to_the_partial_file_as_it_finishes(ablation_result):
    res, partial = ablation_result
    lines = [json.loads(ln) for ln in partial.read_text().splitlines()]
    assert sorted(r["name"] for r in lines) == sorted(r["name"] for r in res["rows"])


def test_plan_batches_keeps_the_most_common_shapes_and_crosses_epochs():
    ids = np.array([0] * 12 + [1] * 4 + [2] * 8)  # full batches of 4: bucket 0 three, 2 two, 1 one
    plan = ablation_mod.plan_batches(ids, batch_size=4, seed=0, count=7, max_shapes=2)
    assert len(plan) == 7 and {e for e, _ in plan} == {0, 1}  # 5 per epoch: the plan goes on into epoch 1
    assert all(len(b) == 4 and set(ids[b]) <= {0, 2} and len(set(ids[b])) == 1 for _, b in plan)


def test_plan_batches_without_a_full_batch_is_a_user_error():
    with pytest.raises(UserError, match="--batch_size"):
        ablation_mod.plan_batches(np.array([0, 0, 1]), batch_size=4, seed=0, count=2, max_shapes=None)


# -- the timm runner (benchmarks/bench_timm.py), with a stand-in timm and train.py -------------------------------
FAKE_TRAIN_PY = '''
import sys
def create_loader(dataset, batch_size=1, is_training=False, **kw):
    return [(i, i) for i in range(8)]
def main():
    args = sys.argv[1:]
    loader = create_loader(None, batch_size=int(args[args.index("-b") + 1]), is_training=True)
    for _ in range(len(loader)):
        pass
    for batch in loader:
        pass
'''


def load_bench_timm():
    spec = importlib.util.spec_from_file_location("bench_timm", os.path.join(ROOT, "benchmarks", "bench_timm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timm_runner_times_the_window_of_the_matching_train_py(tmp_path, monkeypatch, data_dir, capsys):
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("__version__ = '1.0.20'\n")
    scripts = tmp_path / "copies"
    scripts.mkdir()
    for v in ("1.0.15", "1.0.20", "1.0.29.dev0"):
        (scripts / f"train-{v}.py").write_text(FAKE_TRAIN_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    bench = load_bench_timm()
    assert bench.main(["--data_dir", data_dir, "--timm_dir", str(scripts), "--batch_size", "4", "--workers", "0",
                       "--steps", "3", "--skip", "2", "--device", "cpu", "--json"]) == 0
    res = json_out(capsys)
    assert res["train_py"] == "train-1.0.20.py" and res["timm"] == "1.0.20"
    assert res["images_per_sec"] > 0 and res["timed_steps"] == 3 and 0 <= res["data_wait_frac"] <= 1
    assert "--channels-last" not in res["argv"] and res["argv"][res["argv"].index("--num-classes") + 1] == "3"


def test_timm_runner_skips_cleanly_without_timm(monkeypatch, data_dir, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    assert load_bench_timm().main(["--data_dir", data_dir, "--json"]) == 0
    assert json_out(capsys)["skipped"].startswith("timm is not installed")


def test_timm_runner_picks_the_newest_copy_not_newer_than_timm(tmp_path):
    for v in ("1.0.9", "1.0.20", "1.0.29.dev0"):
        (tmp_path / f"train-{v}.py").write_text("")
    pick = lambda v: os.path.basename(load_bench_timm().pick_train_py(str(tmp_path), v))  # noqa: E731
    assert pick("1.0.31") == "train-1.0.29.dev0.py"
    assert pick("1.0.28") == "train-1.0.20.py"
    assert pick("1.0.20") == "train-1.0.20.py"
    assert pick("1.0.3") == "train-1.0.9.py"  # older than every copy: the oldest


# -- on a GPU (the session's GPU-only tests) ---------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_bench_on_cuda_reports_peak_memory_and_an_mfu_below_one(capsys):
    assert cli_main(["bench", "model", "--device", "cuda", "--arch", "resnet18", "--width", "16", "--batch_size", "32",
                     "--shapes", "64x64", "--dtypes", "bf16", "--steps", "3", "--warmup", "2", "--json"]) == 0
    res = json_out(capsys)
    for r in res["rows"]:
        assert r["peak_mem_gb"] > 0 and 0 < r["mfu"] < 1
    assert res["peak_tflops"]["bf16"] > 10  # a measured bf16 matmul on any recent GPU
