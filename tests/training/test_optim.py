"""LARS and LAMB (``rectrain.training.optim``) against plain per-parameter references written from their papers and
MLPerf's reference, on small tensors over several steps; their state through a checkpoint; no read-back."""

import io
import math

import pytest
import torch

from rectrain.model import build_model
from rectrain.training.optim import Lamb, Lars, build_optimizer

LRS = [0.5, 1.0, 2.0, 1.5, 0.25]  # a rate that changes every step: LARS keeps it inside the momentum buffer


def make_params():
    """Decayed, trust-ratio tensors (one all zero: ratio 1; one whose gradient is zero: ratio 1; one without a
    gradient: untouched) and excluded ones (BatchNorm-like and a bias)."""
    g = torch.Generator().manual_seed(0)
    adapted = [torch.randn(4, 3, generator=g), torch.zeros(5), torch.randn(6, generator=g),
               torch.randn(2, 2, generator=g)]
    excluded = [torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)]
    return [torch.nn.Parameter(t) for t in adapted], [torch.nn.Parameter(t) for t in excluded]


def gradients(params, step):
    """Step ``step``'s gradients: random, the third adapted tensor's zero, the fourth's missing (None)."""
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    grads[2].zero_()
    grads[3] = None
    return grads


def run(optimizer, params, steps=len(LRS), first=0):
    for t in range(first, first + steps):
        for p, grad in zip(params, gradients(params, t)):
            p.grad = grad
        for group in optimizer.param_groups:
            group["lr"] = LRS[t % len(LRS)]
        optimizer.step()


def groups(adapted, excluded, wd):
    return [{"params": adapted, "weight_decay": wd, "trust_ratio": True},
            {"params": excluded, "weight_decay": 0.0, "trust_ratio": False}]


def lars_reference(adapted, excluded, wd, eta, momentum, nesterov, steps=len(LRS)):
    """MLPerf's LARS, one tensor at a time (lars_optimizer.py): trust = eta |w| / (|g| + wd |w| + eps), 1 when a norm
    is 0; d = lr trust (g + wd w); buf = momentum buf + d; w -= buf (Nesterov: momentum buf + d). Excluded tensors:
    d = lr g."""
    ws = [p.detach().clone() for p in adapted + excluded]
    bufs = [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for i, (w, g) in enumerate(zip(ws, gradients(ws, t))):
            if g is None:
                continue
            if i < len(adapted):
                wn, gn = w.norm().item(), g.norm().item()
                trust = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
                d = LRS[t] * trust * (g + wd * w)
            else:
                d = LRS[t] * g
            bufs[i] = momentum * bufs[i] + d
            w -= momentum * bufs[i] + d if nesterov else bufs[i]
    return ws


def lamb_reference(adapted, excluded, wd, betas, eps, steps=len(LRS)):
    """You et al. 2019, Algorithm 2, one tensor at a time: Adam's bias-corrected moments, r = m^ / (sqrt(v^) + eps)
    + wd w, w -= lr |w| / |r| r (ratio 1 when a norm is 0; excluded tensors: no ratio)."""
    b1, b2 = betas
    ws = [p.detach().clone() for p in adapted + excluded]
    m, v = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for i, (w, g) in enumerate(zip(ws, gradients(ws, t))):
            if g is None:
                continue
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            r = (m[i] / (1 - b1 ** (t + 1))) / ((v[i] / (1 - b2 ** (t + 1))).sqrt() + eps)
            trust = 1.0
            if i < len(adapted):
                r = r + wd * w
                wn, rn = w.norm().item(), r.norm().item()
                trust = wn / rn if wn > 0 and rn > 0 else 1.0
            w -= LRS[t] * trust * r
    return ws


def assert_params(params, expected):
    for i, (p, e) in enumerate(zip(params, expected)):
        torch.testing.assert_close(p.detach(), e, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_the_per_parameter_reference(wd, nesterov):
    adapted, excluded = make_params()
    expected = lars_reference(adapted, excluded, wd, eta=0.02, momentum=0.9, nesterov=nesterov)
    run(Lars(groups(adapted, excluded, wd), eta=0.02, momentum=0.9, nesterov=nesterov), adapted + excluded)
    assert_params(adapted + excluded, expected)
    assert torch.equal(adapted[3], make_params()[0][3])  # never had a gradient: untouched


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_the_per_parameter_reference(wd):
    adapted, excluded = make_params()
    expected = lamb_reference(adapted, excluded, wd, betas=(0.9, 0.99), eps=1e-6)
    run(Lamb(groups(adapted, excluded, wd), betas=(0.9, 0.99), eps=1e-6), adapted + excluded)
    assert_params(adapted + excluded, expected)
    assert torch.equal(adapted[3], make_params()[0][3])


def test_the_trust_ratio_changes_the_step_where_it_applies():
    """The reference is not vacuous: LARS's step on the adapted tensors differs from momentum SGD's, on the excluded
    ones it is momentum SGD's (with the rate in the buffer)."""
    adapted, excluded = make_params()
    run(Lars(groups(adapted, excluded, 0.0), eta=0.02, momentum=0.0), adapted + excluded, steps=1)
    plain_a, plain_e = make_params()
    g = gradients(plain_a + plain_e, 0)
    assert not torch.allclose(adapted[0], plain_a[0] - LRS[0] * g[0])
    torch.testing.assert_close(excluded[0].detach(), plain_e[0] - LRS[0] * g[4])


@pytest.mark.parametrize("make", [lambda g: Lars(g, eta=0.02, momentum=0.9, nesterov=True),
                                  lambda g: Lamb(g, betas=(0.9, 0.99))], ids=["lars", "lamb"])
def test_state_saved_and_loaded_continues_bit_for_bit(make):
    adapted, excluded = make_params()
    straight = make(groups(adapted, excluded, 0.01))
    run(straight, adapted + excluded, steps=3)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)  # as a checkpoint holds it
    copies = [torch.nn.Parameter(p.detach().clone()) for p in adapted + excluded]
    resumed = make(groups(copies[:4], copies[4:], 0.01))
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    run(straight, adapted + excluded, steps=4, first=3)
    run(resumed, copies, steps=4, first=3)
    for a, b in zip(adapted + excluded, copies):
        assert torch.equal(a, b)
    if isinstance(resumed, Lamb):
        counts = [resumed.state[p]["step_count"] for p in copies if p.grad is not None]
        assert all(c.dtype == torch.float32 and c.item() == 7 for c in counts)


@pytest.mark.parametrize("make", [lambda g: Lars(g, momentum=0.9), lambda g: Lamb(g)], ids=["lars", "lamb"])
def test_a_step_reads_nothing_back_from_the_device(make, monkeypatch):
    """No .item(), no Python branch on a tensor's value: nothing that would sync a GPU or break torch.compile."""
    adapted, excluded = make_params()
    optimizer = make(groups(adapted, excluded, 0.01))
    for p, grad in zip(adapted + excluded, gradients(adapted + excluded, 0)):
        p.grad = grad

    def read_back(*a, **k):
        raise AssertionError("the optimizer step read a tensor's value on the host")
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    optimizer.step()
    optimizer.step()
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in adapted + excluded)


@pytest.mark.parametrize("opt", ["lars", "lamb"])
def test_batchnorm_parameters_and_biases_get_no_trust_ratio_and_no_decay_by_module_type(opt):
    model = build_model("resnet18", num_classes=3, width=8)
    optimizer = build_optimizer(model, opt, lr=1.0, weight_decay=1e-4)
    adapted, excluded = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded["params"]}
    assert "layer2.0.downsample.1.weight" in excluded_names and "fc.bias" in excluded_names  # a BatchNorm by type
    assert all(".bn" in n or "downsample.1" in n or n.startswith("bn1") or n.endswith("bias") for n in excluded_names)
    assert {names[id(p)] for p in adapted["params"]} == {n for n in names.values() if n not in excluded_names}
    assert (adapted["trust_ratio"], adapted["weight_decay"]) == (True, 1e-4)
    assert (excluded["trust_ratio"], excluded["weight_decay"]) == (False, 0.0)


def test_lars_moves_each_layer_by_about_eta_times_its_norm():
    """What LARS is for: whatever the gradient's scale, a layer's first step (without weight decay) is
    lr * eta * |w|, so layers with tiny and huge gradients move alike, relative to their size."""
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(16))]
    before = [p.detach().clone() for p in w]
    w[0].grad, w[1].grad = torch.randn(8, 8) * 1e-4, torch.randn(16) * 1e3
    Lars([{"params": w, "weight_decay": 0.0}], lr=2.0, eta=0.001, momentum=0.9).step()
    for p, b in zip(w, before):
        assert math.isclose((p - b).norm().item(), 2.0 * 0.001 * b.norm().item(), rel_tol=1e-5)
