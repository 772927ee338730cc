import json
import math
import os

import pytest
import torch
from torch import nn

from rectrain.cli import main as cli_main
from rectrain.model import ARCHS, PUBLISHED_PARAMS, BasicBlock, Bottleneck, build_model, count_parameters, param_groups


def load_reference(reference_dir, name):
    with open(os.path.join(reference_dir, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameter_count_matches_published(arch, reference_dir):
    model = build_model(arch)
    ref = load_reference(reference_dir, "torchvision_resnet_state_dicts.json")[arch]
    assert count_parameters(model) == PUBLISHED_PARAMS[arch] == ref["num_params"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_dict_matches_torchvision_key_for_key(arch, reference_dir):
    ref = load_reference(reference_dir, "torchvision_resnet_state_dicts.json")[arch]["state_dict"]
    ours = [[k, list(v.shape)] for k, v in build_model(arch).state_dict().items()]
    assert ours == ref


def _reference_weights(model, state_dict_keys):
    """Weights made exactly as the reference's `procedure` says."""
    sd = model.state_dict()
    new = {}
    for i, (key, shape) in enumerate(state_dict_keys):
        r = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        if key.endswith("num_batches_tracked"):
            new[key] = torch.zeros_like(sd[key])
        elif key.endswith("running_var"):
            new[key] = 1 + 0.1 * r.abs()
        elif key.endswith("running_mean"):
            new[key] = 0.1 * r
        elif len(shape) == 1 and key.endswith("weight"):
            new[key] = 1 + 0.1 * r
        elif len(shape) == 1:
            new[key] = 0.1 * r
        else:
            new[key] = r * math.sqrt(2.0 / math.prod(shape[1:]))
    return new


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_forward_reproduces_torchvision_logits(arch, reference_dir):
    keys = load_reference(reference_dir, "torchvision_resnet_state_dicts.json")[arch]["state_dict"]
    expected = torch.tensor(load_reference(reference_dir, "torchvision_resnet_forward.json")
                            ["models"][arch]["logits"], dtype=torch.float64)
    model = build_model(arch).double().eval()
    model.load_state_dict(_reference_weights(model, keys), strict=True)
    x = torch.randn(2, 3, 224, 160, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    rel = (logits - expected).abs().max() / expected.abs().max()
    assert logits.shape == (2, 1000)
    assert rel < 1e-9


@pytest.mark.parametrize("hw", [(32, 32), (64, 96), (96, 64), (40, 72)])
def test_rectangular_inputs_give_class_logits(hw):
    model = build_model("resnet18", num_classes=7, width=8)
    out = model(torch.randn(3, 3, *hw))
    assert out.shape == (3, 7)


def test_bottleneck_stride_sits_on_the_3x3_conv():
    block = build_model("resnet50", width=8).layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_blocks_start_as_relu_of_identity(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, width=8)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    x = torch.randn(2, 3, 64, 96)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for block in blocks:
        identity = x if block.downsample is None else block.downsample(x)
        out = block(x)
        torch.testing.assert_close(out, torch.relu(identity), rtol=0, atol=0)
        x = out


def test_zero_init_can_be_switched_off():
    model = build_model("resnet50", width=8, zero_init_residual=False)
    assert all(m.bn3.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, Bottleneck))
    model = build_model("resnet18", width=8, zero_init_residual=True)
    assert all(m.bn2.weight.abs().sum() == 0 for m in model.modules() if isinstance(m, BasicBlock))


def test_init_kaiming_fan_out_and_batchnorm_ones_zeros():
    torch.manual_seed(0)
    model = build_model("resnet50", zero_init_residual=False)
    w = model.layer3[0].conv2.weight  # (256, 256, 3, 3): fan_out = 256 * 9
    expected_std = math.sqrt(2.0 / (w.shape[0] * 9))
    assert abs(w.std().item() - expected_std) < 0.02 * expected_std
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_param_groups_partition_parameters_by_module_type():
    model = build_model("resnet50", width=8)
    decay, no_decay = param_groups(model, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert bn_params | {id(model.fc.bias)} == no_decay_ids
    # downsample.1 is a BatchNorm whose name has no "bn" in it: it must still be excluded.
    assert id(model.layer1[0].downsample[1].weight) in no_decay_ids
    assert all(p.dim() > 1 for p in decay["params"])


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, width=8)
    x = torch.randn(8, 3, 32, 48)
    y = torch.arange(8) % 4
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'resnet51'"):
        build_model("resnet51")


def test_model_cli_self_test_passes_and_prints_shapes(capsys):
    assert cli_main(["model", "--arch", "resnet18", "--num_classes", "1000",
                     "--sizes", "64x64,64x96,96x64"]) == 0
    out = capsys.readouterr().out
    assert "11,689,512 parameters" in out
    assert "(2, 3, 64, 96) -> output (2, 1000)" in out
    assert "passed" in out


def test_model_cli_bad_size_is_one_line_error(capsys):
    assert cli_main(["model", "--sizes", "16x16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HxW" in err


def test_seed_entry_model_py_prints_resnet50_count_and_rectangular_shapes():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "model.py"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "25,557,032 parameters" in proc.stdout
    assert "(2, 3, 224, 320) -> output (2, 1000)" in proc.stdout
    assert "(2, 3, 320, 224) -> output (2, 1000)" in proc.stdout
