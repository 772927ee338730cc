"""`rectrain eval` on a checkpoint of a real (tiny) training run: the run's own numbers, square crops,
flip TTA, per-class accuracy, EMA weights, and one-line errors."""

import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

from rectrain.cli import main as cli_main
from rectrain.commands.eval import per_class_lines
from rectrain.config import TrainConfig
from rectrain.data.loader import LoaderSettings, build_val_loader
from rectrain.data.source import scan_split
from rectrain.data.transforms import RectangularCropTfm
from rectrain.inference import inference_buckets, restore
from rectrain.training.checkpoint import load as load_ckpt
from rectrain.training.evaluation import log_probs
from rectrain.training.step import DeviceNormalize

CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def run_dir(tiny_run):
    """A one-epoch run on 3 classes x 5 val images: (data dir, last.pth, its metrics row)."""
    return tiny_run.data, tiny_run.ckpt, tiny_run.row


def eval_json(capsys, ckpt, *extra):
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", ckpt, "--json", *CPU, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def with_ema(ckpt_path, out_path, edit, as_model_ema_state=False):
    """A copy of the checkpoint whose model_ema is the model's weights changed by ``edit(state_dict)``:
    a plain state dict, or ``rectrain.training.ema.ModelEma.state_dict()``'s layout."""
    ckpt = load_ckpt(ckpt_path)
    ema = {k: v.clone() for k, v in ckpt["model"].items()}
    edit(ema)
    ckpt["model_ema"] = {"module": ema, "decay": 0.999, "every": 1, "warmup": True} if as_model_ema_state else ema
    torch.save(ckpt, out_path)
    return str(out_path)


def test_eval_equals_the_runs_validation_of_the_same_weights(run_dir, capsys):
    _, ckpt, row = run_dir
    res = eval_json(capsys, ckpt)
    assert res["val_images"] == 15
    for key in ("val_acc1", "val_acc5", "val_loss"):
        assert res[key] == pytest.approx(row[key], abs=1e-6), key


def test_per_class_numbers_add_up_to_the_runs_validation(run_dir, capsys):
    _, ckpt, row = run_dir
    res = eval_json(capsys, ckpt, "--per_class")
    per = res["per_class"]
    assert [c["class"] for c in per] == ["class_000", "class_001", "class_002"]  # class order in JSON
    assert [c["images"] for c in per] == [5, 5, 5]
    assert res["val_acc1"] == pytest.approx(row["val_acc1"], abs=1e-6)
    assert res["val_loss"] == pytest.approx(row["val_loss"], abs=1e-5)
    assert sum(c["acc1"] for c in per) / 3 == pytest.approx(row["val_acc1"], abs=1e-5)
    assert sum(c["loss"] for c in per) / 3 == pytest.approx(row["val_loss"], abs=1e-5)


def test_per_class_table_lists_the_worst_class_first(run_dir, capsys):
    _, ckpt, _ = run_dir
    per = eval_json(capsys, ckpt, "--per_class")["per_class"]
    assert cli_main(["eval", "--checkpoint", ckpt, "--per_class", *CPU]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [ln.split() for ln in lines if ln.strip().startswith("class_")]
    assert [float(t[1].rstrip("%")) for t in table] == sorted(round(c["acc1"], 2) for c in per)
    assert "top-1" in lines[0] and "%" in lines[0]  # the summary line comes first, rounded


def test_per_class_table_puts_classes_without_images_last():
    per = [{"class": "a", "images": 0, "acc1": None, "acc5": None, "loss": None},
           {"class": "b", "images": 4, "acc1": 75.0, "acc5": 100.0, "loss": 0.5},
           {"class": "c", "images": 4, "acc1": 25.0, "acc5": 50.0, "loss": 1.5}]
    rows = [ln.split() for ln in per_class_lines(per)[2:]]
    assert [r[0] for r in rows] == ["c", "b", "a"] and rows[-1][1:3] == ["-", "-"]


def test_flip_tta_is_the_mean_softmax_of_image_and_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6, 4))  # sees left from right
    x = torch.randn(3, 3, 4, 6)
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
        got = log_probs(model, x, nullcontext, "flip").exp()
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, model(x).softmax(1), atol=1e-3)  # the mirror did change something


def test_eval_with_flip_tta_scores_the_averaged_softmax(run_dir, capsys):
    data, ckpt, _ = run_dir
    res = eval_json(capsys, ckpt, "--tta", "flip")
    r = restore(ckpt)
    scan = scan_split(data, "val", classes=r.classes)
    loader, _ = build_val_loader(scan, inference_buckets(r.config), LoaderSettings(batch_size=4))
    normalize, hits, nll, n = DeviceNormalize("cpu"), 0, 0.0, 0
    with torch.no_grad():
        for images, labels, _ in loader:
            x, labels = normalize(images, labels)
            p = (r.model(x.contiguous()).softmax(1) + r.model(x.flip(3).contiguous()).softmax(1)) / 2
            hits += int((p.argmax(1) == labels).sum())
            nll -= float(p[torch.arange(len(labels)), labels].log().sum())
            n += len(labels)
    assert res["val_images"] == n == 15
    assert res["val_acc1"] == pytest.approx(100 * hits / n, abs=1e-5)
    assert res["val_loss"] == pytest.approx(nll / n, abs=1e-5)


@pytest.mark.parametrize("mode", ["short_side", "area"])
def test_square_uses_a_single_square_bucket(mode):
    buckets = inference_buckets(TrainConfig(target_size=64, rect_mode=mode, max_ratio=2.0), square=True)
    assert buckets.shapes.tolist() == [[64, 64]]
    assert buckets.assign(np.array([[100, 200], [300, 100], [50, 50]])).tolist() == [0, 0, 0]


def test_square_crop_is_resize_then_centre_crop(tmp_path):
    """The standard protocol, Resize(t / 0.875) + CenterCrop(t), done directly with Pillow."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(small).resize((200, 120), Image.Resampling.BICUBIC).save(tmp_path / "wide.png")  # smooth
    t = 64
    (h, w), = inference_buckets(TrainConfig(target_size=t), square=True).shapes.tolist()
    ours = RectangularCropTfm(train=False)(str(tmp_path / "wide.png"), (h, w)).astype(np.float64)
    short = round(t / 0.875)
    resized = Image.open(tmp_path / "wide.png").resize((round(200 * short / 120), short), Image.Resampling.BILINEAR)
    left, top = (resized.width - t) // 2, (resized.height - t) // 2
    reference = np.asarray(resized.crop((left, top, left + t, top + t)), dtype=np.float64)
    assert ours.shape == reference.shape == (t, t, 3)
    # Grey levels: ~6.5 from resampling and half-pixel offsets; crops of 0.8 or 1.0 instead of 0.875 give 26 and 40.
    assert np.abs(ours - reference).mean() < 10


def test_eval_square_scores_every_image_once(run_dir, capsys):
    _, ckpt, _ = run_dir
    res = eval_json(capsys, ckpt, "--square", "--per_class")
    assert res["square"] is True and res["val_images"] == 15
    assert [c["images"] for c in res["per_class"]] == [5, 5, 5]


@pytest.mark.parametrize("layout", ["state_dict", "ModelEma"])
def test_ema_flag_evaluates_the_ema_weights(run_dir, capsys, tmp_path, layout):
    _, ckpt, row = run_dir

    def always_class_2(sd):
        sd["fc.weight"].zero_()
        sd["fc.bias"].copy_(torch.tensor([0.0, 0.0, 10.0]))

    path = with_ema(ckpt, tmp_path / "ema.pth", always_class_2, as_model_ema_state=layout == "ModelEma")
    ema = eval_json(capsys, path, "--ema", "--per_class")
    assert ema["ema"] is True
    assert [c["acc1"] for c in ema["per_class"]] == [0.0, 0.0, 100.0]
    assert eval_json(capsys, path)["val_acc1"] == pytest.approx(row["val_acc1"], abs=1e-6)  # without --ema


def test_ema_flag_on_a_checkpoint_without_ema_is_a_one_line_error(run_dir, capsys):
    _, ckpt, _ = run_dir
    assert cli_main(["eval", "--checkpoint", ckpt, "--ema", *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no EMA weights" in err and "--ema" in err


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "nope.pth"), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_corrupt_checkpoint_is_a_one_line_error(run_dir, tmp_path, capsys):
    _, ckpt, _ = run_dir
    with open(ckpt, "rb") as f:
        (tmp_path / "cut.pth").write_bytes(f.read()[:5000])
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "cut.pth"), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be loaded" in err


def test_weights_of_another_architecture_are_a_one_line_error(run_dir, tmp_path, capsys):
    _, ckpt, _ = run_dir
    c = load_ckpt(ckpt)
    c["config"]["arch"] = "resnet50"
    torch.save(c, tmp_path / "wrong.pth")
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "wrong.pth"), *CPU]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not fit a resnet50" in err


def test_two_processes_give_the_numbers_of_one(run_dir, capfd):
    _, ckpt, _ = run_dir
    one = eval_json(capfd, ckpt, "--per_class", "--tta", "flip", "--batch_size", "4")
    two = eval_json(capfd, ckpt, "--per_class", "--tta", "flip", "--batch_size", "4", "--nproc", "2",
                    "--dist_port", str(29500 + os.getpid() % 1000))
    assert two["val_images"] == 15
    assert_same_result(one, two)


def assert_same_result(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "per_class":
            for x, y in zip(a[k], b[k]):
                assert x == pytest.approx(y, abs=1e-5)
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("extra", [[], ["--per_class"]])
def test_a_val_image_that_turns_bad_after_the_scan_is_named_and_a_stand_in_scored(run_dir, tmp_path, capfd, extra):
    import shutil
    data, ckpt, _ = run_dir
    own = tmp_path / "data"
    shutil.copytree(data, own)
    victim = sorted((own / "val" / "class_001").iterdir())[0]
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # same size and mtime: the copied scan cache still lists it as good
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    capfd.readouterr()
    assert cli_main(["eval", "--checkpoint", ckpt, "--json", *CPU, "--data_dir", str(own), "--workers", "2",
                     *extra]) == 0
    out, err = capfd.readouterr()
    res = json.loads(out)
    assert res["val_images"] == 15  # every image scored once: the bad one's stand-in in its place
    warned = [ln for ln in err.splitlines() if "could not decode" in ln]
    assert len(warned) == 1 and str(victim) in warned[0] and "another image of its shape was scored" in warned[0]
