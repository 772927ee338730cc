"""`rectrain predict`: images and folders in, class names and probabilities out, with a checkpoint of a real
(tiny) training run; every format the pipeline reads; unreadable files reported and skipped."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from rectrain.cli import main as cli_main
from rectrain.data.transforms import open_rgb

CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def run_dir(tiny_run):
    """A one-epoch run on 3 classes x 5 val images: (data dir, last.pth)."""
    return tiny_run.data, tiny_run.ckpt


def predict_json(capsys, ckpt, *args):
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", ckpt, "--json", "--topk", "3", *CPU, *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def by_name(result):
    return {os.path.basename(p["path"]): p for p in result["predictions"]}


def probs(pred):
    """The full probability vector, by class index (needs --topk = number of classes)."""
    out = np.zeros(len(pred["top"]))
    for t in pred["top"]:
        out[t["index"]] = t["prob"]
    return out


@pytest.fixture(scope="module")
def photo(run_dir):
    """A real (H, W, 3) uint8 image of the data set: a val image, made portrait-shaped (48 x 32)."""
    data, _ = run_dir
    folder = os.path.join(data, "val", "class_001")
    img = open_rgb(os.path.join(folder, sorted(os.listdir(folder))[0]))
    return np.asarray(img.resize((32, 48), Image.Resampling.BILINEAR))


def test_top1_on_the_val_images_agrees_with_eval_accuracy(run_dir, capsys):
    data, ckpt = run_dir
    res, _ = predict_json(capsys, ckpt, os.path.join(data, "val"))
    preds = res["predictions"]
    assert len(preds) == 15 and res["skipped"] == []
    acc1 = 100 * np.mean([p["top"][0]["class"] == os.path.basename(os.path.dirname(p["path"])) for p in preds])
    assert cli_main(["eval", "--checkpoint", ckpt, "--json", *CPU]) == 0
    assert acc1 == pytest.approx(json.loads(capsys.readouterr().out)["val_acc1"], abs=1e-5)


def test_crops_are_rectangular_in_the_checkpoints_bucket_for_the_image_ratio(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    Image.fromarray(photo).save(tmp_path / "portrait.png")  # 32 wide, 48 tall: ratio 2/3
    Image.fromarray(photo.transpose(1, 0, 2)).save(tmp_path / "landscape.png")
    Image.fromarray(photo[:32]).save(tmp_path / "square.png")
    res, _ = predict_json(capsys, ckpt, str(tmp_path))
    shapes = {k: v["input_hw"] for k, v in by_name(res).items()}
    # The run's buckets (target 32, max ratio 1.5) are 64x32, 32x32 and 32x64; 2/3 is nearest 1/2 in log space.
    assert shapes == {"portrait.png": [64, 32], "landscape.png": [32, 64], "square.png": [32, 32]}


def test_reads_cmyk_greyscale_png_and_exif_rotated_images(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    upright = Image.fromarray(photo)
    upright.save(tmp_path / "rgb.png")
    upright.save(tmp_path / "rgb.jpg", quality=95)
    upright.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    grey = upright.convert("L")
    grey.save(tmp_path / "grey.png")
    grey.save(tmp_path / "grey.jpg", quality=95)
    grey.convert("RGB").save(tmp_path / "grey_as_rgb.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored as a 48 x 32 landscape
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "exif6.png", exif=exif)
    stored.save(tmp_path / "exif6.jpg", exif=exif, quality=95)
    res, err = predict_json(capsys, ckpt, str(tmp_path))
    got = by_name(res)
    assert res["skipped"] == [] and err == ""
    assert sorted(got) == sorted(os.listdir(tmp_path))
    assert np.allclose(probs(got["grey.png"]), probs(got["grey_as_rgb.png"]), atol=1e-6)  # lossless: equal
    assert np.allclose(probs(got["exif6.png"]), probs(got["rgb.png"]), atol=1e-6)
    assert got["exif6.png"]["input_hw"] == got["exif6.jpg"]["input_hw"] == got["rgb.png"]["input_hw"] == [64, 32]
    for lossy, ref in (("cmyk.jpg", "rgb.jpg"), ("exif6.jpg", "rgb.jpg"), ("grey.jpg", "grey.png")):
        assert np.abs(probs(got[lossy]) - probs(got[ref])).max() < 0.03, lossy  # inverted colours: 0.18
    for p in got.values():
        assert sum(t["prob"] for t in p["top"]) == pytest.approx(1.0, abs=1e-5)


def test_folders_are_searched_recursively_in_sorted_order(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("b/deep/x.png", "b/a.PNG", "a.png", ".hidden/h.png", "b/.h.png"):
        Image.fromarray(photo).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    res, _ = predict_json(capsys, ckpt, str(tmp_path))
    assert [os.path.relpath(p["path"], tmp_path) for p in res["predictions"]] == ["a.png", "b/a.PNG", "b/deep/x.png"]


def test_a_symlink_back_up_the_tree_is_not_followed_forever(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    (tmp_path / "a").mkdir()
    Image.fromarray(photo).save(tmp_path / "a" / "x.png")
    os.symlink("..", tmp_path / "a" / "up")
    res, _ = predict_json(capsys, ckpt, str(tmp_path))
    assert [os.path.relpath(p["path"], tmp_path) for p in res["predictions"]] == ["a/x.png"]


def test_batching_does_not_change_the_results(run_dir, capsys):
    data, ckpt = run_dir
    one, _ = predict_json(capsys, ckpt, os.path.join(data, "val"), "--batch_size", "1")
    many, _ = predict_json(capsys, ckpt, os.path.join(data, "val"), "--batch_size", "64")
    assert [p["path"] for p in one["predictions"]] == [p["path"] for p in many["predictions"]]
    for a, b in zip(one["predictions"], many["predictions"]):
        assert np.allclose(probs(a), probs(b), atol=1e-5)


def test_unreadable_files_are_reported_by_path_and_skipped(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    Image.fromarray(photo).save(tmp_path / "good.jpg", quality=95)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    missing = str(tmp_path / "missing.jpg")
    res, err = predict_json(capsys, ckpt, str(tmp_path), missing)
    assert [os.path.basename(p["path"]) for p in res["predictions"]] == ["good.jpg"]
    bad = ["cut.jpg", "empty.png", "missing.jpg", "text.jpg"]
    assert sorted(os.path.basename(s["path"]) for s in res["skipped"]) == bad
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(any(os.path.join(str(tmp_path), b) in ln for ln in lines) for b in bad)


def test_nothing_readable_exits_non_zero(run_dir, tmp_path, capsys):
    _, ckpt = run_dir
    (tmp_path / "text.jpg").write_text("not a jpeg")
    assert cli_main(["predict", "--checkpoint", ckpt, *CPU, str(tmp_path / "text.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "text.jpg" in err[0] and "could be read" in err[1]


def test_a_folder_without_images_is_a_one_line_error(run_dir, tmp_path, capsys):
    _, ckpt = run_dir
    (tmp_path / "readme.txt").write_text("no images here")
    assert cli_main(["predict", "--checkpoint", ckpt, *CPU, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image files" in err


@pytest.mark.parametrize("flag,value", [("--topk", "0"), ("--batch_size", "0")])
def test_counts_below_one_are_a_one_line_error(run_dir, photo, tmp_path, capsys, flag, value):
    _, ckpt = run_dir
    Image.fromarray(photo).save(tmp_path / "a.png")
    assert cli_main(["predict", "--checkpoint", ckpt, *CPU, flag, value, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_topk_above_the_class_count_lists_every_class(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    Image.fromarray(photo).save(tmp_path / "a.png")
    res, _ = predict_json(capsys, ckpt, "--topk", "10", str(tmp_path))
    top = res["predictions"][0]["top"]
    assert sorted(t["class"] for t in top) == ["class_000", "class_001", "class_002"]
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)


def test_text_output_is_one_line_per_image_with_rounded_percentages(run_dir, photo, tmp_path, capsys):
    _, ckpt = run_dir
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo[:32]).save(tmp_path / "b.png")
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", ckpt, *CPU, "--topk", "2", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "a.png"))
    fields = lines[0].split()
    assert fields[1].startswith("class_") and fields[2].endswith("%") and len(fields[2].split(".")[1]) == 3


def test_missing_checkpoint_is_a_one_line_error(photo, tmp_path, capsys):
    Image.fromarray(photo).save(tmp_path / "a.png")
    assert cli_main(["predict", "--checkpoint", str(tmp_path / "nope.pth"), *CPU, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
