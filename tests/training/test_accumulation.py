"""Gradient accumulation (``--accum_steps``) in ``TrainStep``: N micro-batches make the update of one batch of all
their images (on a model without BatchNorm, which normalises each micro-batch on its own), DDP synchronises only
the last one, and 2 real processes accumulating give the update of one process with the whole global batch."""

import os

import torch
import torch.distributed as dist
from torch import nn

from rectrain.model import param_groups
from rectrain.runtime.distributed import launch
from rectrain.training.augment import BatchAugment
from rectrain.training.parts import autocast_factory
from rectrain.training.schedule import LRSchedule
from rectrain.training.step import DeviceNormalize, TrainStep
from tests.test_train import free_port
from tests.training.test_step import NO_AUG, two_class_batch

STEPS = 3


def no_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 2))


def make_step(model: nn.Module, params_of: nn.Module | None = None) -> TrainStep:
    opt = torch.optim.SGD(param_groups(params_of or model, 1e-4), lr=0.1, momentum=0.9)
    return TrainStep(model, opt, torch.amp.GradScaler("cpu", enabled=False), DeviceNormalize("cpu"),
                     BatchAugment(NO_AUG, seed=0, device="cpu"), autocast_factory("cpu", None),
                     LRSchedule(0.1, 100, warmup_steps=2), label_smoothing=0.1, channels_last=False)


def reference(batch: int) -> dict:
    """One process, one batch of ``batch`` images per optimizer step."""
    model = no_bn_model()
    step = make_step(model)
    for s in range(STEPS):
        _, stepped = step(*two_class_batch(n=batch, seed=s), s)
        assert stepped
    return model.state_dict()


def assert_same_update(a: dict, b: dict) -> None:
    for k in a:  # the same sums in another order: equal to float rounding, not bit for bit
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_four_micro_batches_make_the_update_of_one_batch_four_times_as_large():
    model = no_bn_model()
    step = make_step(model)
    for s in range(STEPS):
        images, labels = two_class_batch(n=16, seed=s)
        flags = [step(images[4 * m:4 * m + 4], labels[4 * m:4 * m + 4], s, m, 4)[1] for m in range(4)]
        assert flags == [False, False, False, True]
    assert_same_update(model.state_dict(), reference(16))


def test_a_short_last_accumulation_averages_the_micro_batches_it_has():
    """An epoch whose batch count is not a multiple of N ends with a shorter accumulation: 2 micro-batches of 4 are
    one batch of 8, not half of one of 16."""
    model = no_bn_model()
    step = make_step(model)
    for s in range(STEPS):
        images, labels = two_class_batch(n=8, seed=s)
        for m in range(2):
            step(images[4 * m:4 * m + 4], labels[4 * m:4 * m + 4], s, m, 2)
    assert_same_update(model.state_dict(), reference(8))


def test_each_micro_batch_draws_its_own_mixup():
    """MixUp/CutMix are per batch, as without accumulation: 4 micro-batches, 4 draws of lambda."""
    from rectrain.training.augment import AugmentationConfig
    step = make_step(no_bn_model())
    real = BatchAugment(AugmentationConfig(use_cutmix=False, use_random_erasing=False, batch_aug_prob=1.0), seed=0,
                        device="cpu")
    drawn = []
    step.augment = lambda images, labels: _record(drawn, real, images, labels)
    images, labels = two_class_batch(n=16)
    for m in range(4):
        step(images[4 * m:4 * m + 4], labels[4 * m:4 * m + 4], 0, m, 4)
    assert len(drawn) == 4 and len(set(drawn)) == 4 and all(0 < lam < 1 for lam in drawn)


def _record(drawn, augment, images, labels):
    out = augment(images, labels)
    drawn.append(float(out[3]))
    return out


def test_only_the_last_micro_batch_synchronises_under_ddp(tmp_path):
    """DDP decides in forward whether the coming backward all-reduces: all but the last forward run in no_sync."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = no_bn_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        seen = []
        model.register_forward_pre_hook(lambda module, args: seen.append(ddp.require_backward_grad_sync))
        step = make_step(ddp, model)
        images, labels = two_class_batch(n=12)
        for m in range(3):
            step(images[4 * m:4 * m + 4], labels[4 * m:4 * m + 4], 0, m, 3)
        step(images, labels, 1)  # no accumulation: synchronised
        assert seen == [False, False, True, True]
    finally:
        dist.destroy_process_group()


def _accumulating_rank(out: str, info) -> int:
    """One rank of 2: micro-batches of 4 from its half of each step's 16 images, 2 per optimizer step."""
    model = no_bn_model()
    step = make_step(nn.parallel.DistributedDataParallel(model), model)
    for s in range(STEPS):
        images, labels = two_class_batch(n=16, seed=s)
        for m in range(2):
            part = slice(8 * info.rank + 4 * m, 8 * info.rank + 4 * m + 4)
            step(images[part], labels[part], s, m, 2)
    torch.save(model.state_dict(), os.path.join(out, f"rank{info.rank}.pt"))
    return 0


def test_two_processes_accumulating_make_the_update_of_the_whole_global_batch(tmp_path):
    import functools
    code = launch(functools.partial(_accumulating_rank, str(tmp_path)), device="cpu", nproc=2, port=free_port())
    assert code == 0
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the replicas stay identical
    assert_same_update(ranks[0], reference(16))
