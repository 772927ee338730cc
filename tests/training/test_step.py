"""The training step, driven directly on device tensors (no loader, no trainer)."""

import pytest
import torch

from rectrain.model import build_model, param_groups
from rectrain.training.augment import AugmentationConfig, BatchAugment
from rectrain.training.parts import autocast_factory
from rectrain.training.schedule import LRSchedule
from rectrain.training.step import DeviceNormalize, TrainStep

NO_AUG = AugmentationConfig(use_mixup=False, use_cutmix=False, use_random_erasing=False)


def tiny_step(model, scaler=None, lr=0.05, augment=NO_AUG, total_steps=100):
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=lr, momentum=0.9)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return TrainStep(model, opt, scaler, DeviceNormalize("cpu"), BatchAugment(augment, seed=0, device="cpu"),
                     autocast_factory("cpu", None), LRSchedule(lr, total_steps, warmup_steps=0),
                     label_smoothing=0.0, channels_last=False)


def two_class_batch(n=16, h=32, w=48, seed=0):
    """Class 0: dark images, class 1: bright ones; uint8 (B, H, W, 3) as the loader gives them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 200, 40)
    noise = torch.randint(-30, 30, (n, h, w, 3), generator=g)
    return (base + noise).clamp(0, 255).to(torch.uint8), labels


def test_train_step_on_a_fixed_batch_makes_the_loss_fall():
    torch.manual_seed(0)
    step = tiny_step(build_model("resnet18", num_classes=2, width=8))
    images, labels = two_class_batch()
    losses = []
    for i in range(12):
        loss, stepped = step(images, labels, i)
        assert stepped and loss.shape == () and loss.dtype == torch.float32 and not loss.requires_grad
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_step_sets_the_scheduled_learning_rate_before_the_update():
    torch.manual_seed(0)
    step = tiny_step(build_model("resnet18", num_classes=2, width=8), lr=0.1, total_steps=10)
    images, labels = two_class_batch(n=4)
    for i in (0, 5, 9):
        step(images, labels, i)
        assert step.optimizer.param_groups[0]["lr"] == pytest.approx(step.lr_schedule(i))
    assert step.lr_schedule(9) < step.lr_schedule(5) < step.lr_schedule(0)


def test_a_step_skipped_by_the_fp16_scaler_reports_not_stepped():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2, width=8)
    step = tiny_step(model, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    images, labels = two_class_batch(n=4)
    _, stepped = step(images, labels, 0)
    assert stepped
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        model.fc.weight.grad = None
        model.fc.bias.add_(float("inf"))  # every logit inf -> inf/nan gradients -> the scaler skips the step
    scale = step.scaler.get_scale()
    _, stepped = step(images, labels, 1)
    assert not stepped and step.scaler.get_scale() < scale
    weights = {k: v for k, v in model.state_dict().items() if k in before and "running" not in k}
    for k, v in weights.items():
        if k != "fc.bias":
            assert torch.equal(v, before[k]), k
