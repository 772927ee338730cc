"""Weight EMA: the average itself (every step, every N steps, warm-up), buffers, exact resume, no host
sync, and wrapped, channels_last and low-precision source models."""

import io

import pytest
import torch
from torch import nn

from rectrain.training.ema import ModelEma


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def state(module):
    """Parameters and buffers by name, as float64 copies (integer buffers as int64)."""
    return {k: v.detach().clone().double() if v.is_floating_point() else v.detach().clone()
            for k, v in [*module.named_parameters(), *module.named_buffers()]}


def train_step(model, seed):
    """Stand-in for an optimizer step: new weights, and one BatchNorm forward that moves its buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model.train()(torch.randn(2, 3, 6, 6, generator=g))


def assert_state_close(module, expected):
    got = state(module)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=0, atol=1e-5), k


def test_every_step_equals_the_hand_computed_average():
    model = tiny_model()
    ema = ModelEma(model, decay=0.7)
    expected = state(model)
    for step in range(4):
        train_step(model, step)
        assert ema.update(model, step)
        live = state(model)
        expected = {k: 0.7 * v + 0.3 * live[k] if v.is_floating_point() else live[k] for k, v in expected.items()}
    assert_state_close(ema.module, expected)


def test_every_3_averages_on_every_third_step_with_decay_cubed():
    model = tiny_model()
    ema = ModelEma(model, decay=0.9, every=3)
    expected = state(model)
    for step in range(7):
        train_step(model, step)
        did = ema.update(model, step)
        assert did == (step in (2, 5))
        if did:
            live = state(model)
            expected = {k: 0.729 * v + 0.271 * live[k] if v.is_floating_point() else live[k]
                        for k, v in expected.items()}
        assert_state_close(ema.module, expected)  # untouched between averaging steps


def test_warmup_uses_the_smaller_early_decay():
    ema = ModelEma(tiny_model(), decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10**6) == 0.999
    assert ModelEma(tiny_model(), decay=0.999).decay_at(0) == 0.999  # off by default


def test_float_buffers_are_averaged_and_integer_buffers_copied():
    model = tiny_model()
    ema = ModelEma(model, decay=0.5)
    before = state(model)["1.running_mean"]
    for step in range(3):
        model.train()(torch.randn(2, 3, 6, 6))
    ema.update(model, 0)
    live = model[1]
    assert torch.allclose(ema.module[1].running_mean.double(), 0.5 * before + 0.5 * live.running_mean.double())
    assert ema.module[1].num_batches_tracked.dtype == torch.int64
    assert ema.module[1].num_batches_tracked.item() == live.num_batches_tracked.item() == 3


def run_updates(ema, model, steps):
    for step in steps:
        train_step(model, step)
        ema.update(model, step)


def test_resume_from_state_dict_is_bit_identical_to_an_uninterrupted_run():
    model = tiny_model()
    straight = ModelEma(model, decay=0.95, every=2, warmup=True)
    run_updates(straight, model, range(8))

    model = tiny_model()
    first = ModelEma(model, decay=0.95, every=2, warmup=True)
    run_updates(first, model, range(5))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model = tiny_model()
    model.load_state_dict(saved["model"])
    resumed = ModelEma(model, decay=0.95, every=2, warmup=True)
    resumed.load_state_dict(saved["ema"])
    run_updates(resumed, model, range(5, 8))

    a, b = straight.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_update_runs_on_meta_tensors_so_it_never_reads_a_device_value():
    # A meta tensor has no data: .item(), bool() or any host read of a value raises.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    ema = ModelEma(model, decay=0.9, every=2, warmup=True)
    for step in range(4):
        ema.update(model, step)
    assert ema.module[0].weight.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_makes_no_cuda_host_sync():
    model = tiny_model().cuda()
    ema = ModelEma(model, decay=0.9, every=1, warmup=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            ema.update(model, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class FakeDDP(nn.Module):
    """Holds the model as ``.module``, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, raised while torch.compile imports
@pytest.mark.parametrize("wrap", [FakeDDP, torch.compile], ids=["ddp", "compile"])
def test_wrapped_model_is_averaged_through_its_plain_module(wrap):
    model = tiny_model()
    wrapped = wrap(model)  # torch.compile only wraps here: nothing is compiled before a forward
    ema = ModelEma(wrapped, decay=0.5)
    assert type(ema.module) is nn.Sequential
    assert ema.module.state_dict().keys() == model.state_dict().keys()  # no module. / _orig_mod. prefixes
    expected = state(model)
    train_step(model, 0)
    ema.update(wrapped, 0)
    live = state(model)
    assert_state_close(ema.module, {k: 0.5 * v + 0.5 * live[k] if v.is_floating_point() else live[k]
                                    for k, v in expected.items()})


def test_channels_last_model_gives_a_channels_last_average():
    model = tiny_model().to(memory_format=torch.channels_last)
    ema = ModelEma(model, decay=0.5)
    expected = state(model)
    train_step(model, 0)
    ema.update(model, 0)
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    live = state(model)
    assert_state_close(ema.module, {k: 0.5 * v + 0.5 * live[k] if v.is_floating_point() else live[k]
                                    for k, v in expected.items()})


def test_low_precision_model_is_averaged_in_fp32():
    model = tiny_model().to(torch.bfloat16)
    ema = ModelEma(model, decay=0.9998)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    before = ema.module[4].weight.clone()
    with torch.no_grad():
        model[4].weight.add_(1.0)
    ema.update(model, 0)
    # The average moves by 2e-4: representable in fp32, lost below bf16's resolution near 1.
    moved = ema.module[4].weight - before
    assert torch.allclose(moved, torch.full_like(moved, 2e-4), rtol=0.05)


def test_average_is_an_eval_module_without_gradients():
    model = tiny_model()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    ema = ModelEma(model)
    assert not ema.module.training
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())


def test_average_does_not_share_memory_with_the_model():
    model = tiny_model()
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model[4].weight.add_(1.0)
    assert not torch.equal(ema.module[4].weight, model[4].weight)


def test_another_architecture_is_refused():
    ema = ModelEma(tiny_model())
    with pytest.raises(ValueError, match="architecture"):
        ema.update(nn.Linear(2, 2), 0)


@pytest.mark.parametrize("kw", [{"decay": 1.0}, {"decay": 0.0}, {"every": 0}, {"every": 1.5}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        ModelEma(tiny_model(), **kw)
