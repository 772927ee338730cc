"""`rectrain export`: torchvision state dicts (checked against torchvision's stored layouts), TorchScript and
ONNX files that reproduce the checkpoint's model on square and rectangular inputs, atomic writes, errors."""

import json
import os
import sys

import pytest
import torch

from rectrain.cli import main as cli_main
from rectrain.inference import restore
from rectrain.model import build_model
from rectrain.training.checkpoint import load as load_ckpt

# (B, 3, H, W): square, landscape and portrait, of sizes other than the export's example input
SHAPES = [(2, 3, 32, 32), (1, 3, 32, 64), (3, 3, 96, 64)]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def ckpt(tiny_run):
    """last.pth of a one-epoch tiny run (resnet18, width 8, 3 classes)."""
    return tiny_run.ckpt


@pytest.fixture(scope="module")
def wide_ckpt(ckpt, tmp_path_factory):
    """The run's checkpoint with standard-width (64) resnet18 weights in it, as a full-size run would have."""
    c = load_ckpt(ckpt)
    torch.manual_seed(0)
    c["model"] = build_model("resnet18", num_classes=3, width=64, zero_init_residual=False).state_dict()
    c["config"]["width"] = 64
    path = tmp_path_factory.mktemp("wide") / "wide.pth"
    torch.save(c, path)
    return str(path)


def export(capsys, checkpoint, fmt, out, *extra):
    capsys.readouterr()
    code = cli_main(["export", "--checkpoint", checkpoint, "--format", fmt, "--out", str(out), *extra])
    return code, capsys.readouterr()


def seeded_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def test_torchvision_export_has_torchvisions_keys_and_shapes(wide_ckpt, reference_dir, tmp_path, capsys):
    code, out = export(capsys, wide_ckpt, "torchvision", tmp_path / "tv.pth")
    assert code == 0
    with open(os.path.join(reference_dir, "torchvision_resnet_state_dicts.json")) as f:
        ref = json.load(f)["resnet18"]["state_dict"]  # torchvision.models.resnet18(): 1000 classes
    ref = [[k, [3] + s[1:] if k.startswith("fc.") else s] for k, s in ref]  # resnet18(num_classes=3)
    sd = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert type(sd) is dict and [[k, list(v.shape)] for k, v in sd.items()] == ref
    stored = load_ckpt(wide_ckpt)["model"]
    assert all(torch.equal(sd[k], stored[k]) for k in stored)
    assert "torchvision.models.resnet18(num_classes=3)" in out.out and "strict=True" in out.out


def test_torchvision_export_loads_into_torchvision_strictly(wide_ckpt, tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    assert export(capsys, wide_ckpt, "torchvision", tmp_path / "tv.pth")[0] == 0
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)


def test_torchvision_export_refuses_a_non_standard_width(ckpt, tmp_path, capsys):
    code, out = export(capsys, ckpt, "torchvision", tmp_path / "tv.pth")
    assert code == 2 and not os.listdir(tmp_path)
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "width 8" in err and "--format torchscript" in err


def test_torchscript_export_matches_the_model_on_square_and_rectangular_inputs(ckpt, tmp_path, capsys):
    code, out = export(capsys, ckpt, "torchscript", tmp_path / "m.pt")
    assert code == 0 and "torch.jit.load" in out.out
    extra = {"rectrain.json": ""}
    loaded = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["rectrain.json"])["classes"] == ["class_000", "class_001", "class_002"]
    model = restore(ckpt).model
    with torch.no_grad():
        for x in seeded_inputs():
            assert torch.allclose(loaded(x), model(x), atol=1e-5), tuple(x.shape)


def test_ema_export_writes_the_ema_weights(ckpt, tmp_path, capsys):
    c = load_ckpt(ckpt)
    torch.manual_seed(1)
    c["model_ema"] = build_model("resnet18", num_classes=3, width=8, zero_init_residual=False).state_dict()
    torch.save(c, tmp_path / "ema.pth")
    assert export(capsys, str(tmp_path / "ema.pth"), "torchscript", tmp_path / "ema.pt", "--ema")[0] == 0
    loaded = torch.jit.load(str(tmp_path / "ema.pt"))
    ema, plain = restore(str(tmp_path / "ema.pth"), ema=True).model, restore(ckpt).model
    x = seeded_inputs()[1]
    with torch.no_grad():
        assert torch.allclose(loaded(x), ema(x), atol=1e-5)
        assert not torch.allclose(loaded(x), plain(x), atol=1e-3)


def test_ema_export_of_a_checkpoint_without_ema_is_a_one_line_error(ckpt, tmp_path, capsys):
    code, out = export(capsys, ckpt, "torchscript", tmp_path / "m.pt", "--ema")
    assert code == 2 and not os.listdir(tmp_path)
    assert len(out.err.strip().splitlines()) == 1 and "no EMA weights" in out.err


@pytest.fixture(scope="module")
def onnx_file(ckpt, tmp_path_factory):
    """The checkpoint exported to ONNX once (skipped when the exporter's packages are missing)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    assert cli_main(["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(path)]) == 0
    return str(path)


def test_onnx_export_has_dynamic_batch_height_and_width(onnx_file):
    import onnx

    proto = onnx.load(onnx_file)
    onnx.checker.check_model(proto)
    (images,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["rectrain.json"])["classes"] == ["class_000", "class_001", "class_002"]


def test_onnx_export_matches_the_model_on_square_and_rectangular_inputs(ckpt, onnx_file):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    model = restore(ckpt).model
    with torch.no_grad():
        for x in seeded_inputs():
            got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
            assert torch.allclose(got, model(x), atol=1e-4), tuple(x.shape)


def test_onnx_export_without_its_packages_says_what_to_install(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    code, out = export(capsys, ckpt, "onnx", tmp_path / "m.onnx")
    assert code == 2 and not os.listdir(tmp_path)
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "onnxscript" in err


def test_a_failed_export_leaves_the_previous_file_and_no_temporary(ckpt, tmp_path, capsys, monkeypatch):
    target = tmp_path / "m.pt"
    target.write_bytes(b"previous export")

    def save_half_then_fail(obj, f, **kw):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.jit, "save", save_half_then_fail)
    code, out = export(capsys, ckpt, "torchscript", target)
    assert code == 2 and "No space left" in out.err
    assert target.read_bytes() == b"previous export" and os.listdir(tmp_path) == ["m.pt"]


def test_export_creates_the_output_folder(ckpt, tmp_path, capsys):
    code, out = export(capsys, ckpt, "torchscript", tmp_path / "new" / "deeper" / "m.pt")
    assert code == 0 and (tmp_path / "new" / "deeper" / "m.pt").is_file()
    assert out.out.startswith(f"wrote {tmp_path / 'new' / 'deeper' / 'm.pt'}")


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    code, out = export(capsys, str(tmp_path / "nope.pth"), "torchscript", tmp_path / "m.pt")
    assert code == 2 and len(out.err.strip().splitlines()) == 1 and "not found" in out.err
