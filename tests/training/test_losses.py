"""Losses for mixed batches: augmented_loss against cross-entropy and a hand computation of soft targets."""

import math

import pytest
import torch
import torch.nn.functional as F

from rectrain.training.augment import AugmentationConfig, apply_augmentations
from rectrain.training.losses import augmented_loss, mixed_targets, mixup_criterion, soft_target_cross_entropy

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.0, 0.7]])
LABELS_A = torch.tensor([0, 2, 1])
LABELS_B = torch.tensor([1, 2, 3])


def hand_loss(logits, labels_a, labels_b, lam, eps):
    """-sum_k t_k log softmax_k averaged over the batch, t = lam*smooth(a) + (1-lam)*smooth(b), in plain Python."""
    total = 0.0
    for row, a, b in zip(logits.tolist(), labels_a.tolist(), labels_b.tolist()):
        k = len(row)
        log_z = math.log(sum(math.exp(v) for v in row))
        for j, v in enumerate(row):
            target = lam * ((1 - eps) * (j == a) + eps / k) + (1 - lam) * ((1 - eps) * (j == b) + eps / k)
            total -= target * (v - log_z)
    return total / len(logits)


def test_no_mixing_without_smoothing_equals_cross_entropy():
    assert torch.equal(augmented_loss(LOGITS, LABELS_A, LABELS_A, None, 0.0), F.cross_entropy(LOGITS, LABELS_A))


def test_no_mixing_with_smoothing_equals_cross_entropy_with_label_smoothing():
    expected = F.cross_entropy(LOGITS, LABELS_A, label_smoothing=0.1)
    assert torch.equal(augmented_loss(LOGITS, LABELS_A, LABELS_A, None, 0.1), expected)
    assert augmented_loss(LOGITS, LABELS_A, LABELS_A, None, 0.1).item() == pytest.approx(
        hand_loss(LOGITS, LABELS_A, LABELS_A, 1.0, 0.1), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("lam", [0.3, 0.85])
def test_mixed_loss_equals_hand_computed_soft_target_cross_entropy(lam, eps):
    expected = hand_loss(LOGITS, LABELS_A, LABELS_B, lam, eps)
    assert augmented_loss(LOGITS, LABELS_A, LABELS_B, lam, eps).item() == pytest.approx(expected, rel=1e-6)
    targets = mixed_targets(LABELS_A, LABELS_B, lam, 4, eps)
    assert soft_target_cross_entropy(LOGITS, targets).item() == pytest.approx(expected, rel=1e-6)


def test_mixed_targets_rows_are_probabilities_with_the_right_weights():
    t = mixed_targets(LABELS_A, LABELS_B, 0.3, 4, 0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(3))
    assert t[0].tolist() == pytest.approx([0.3 * 0.925 + 0.7 * 0.025, 0.3 * 0.025 + 0.7 * 0.925, 0.025, 0.025])
    assert t[1].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])  # a == b: plain smoothed one-hot


def test_loss_gradient_is_softmax_minus_soft_target_over_batch():
    logits = LOGITS.clone().requires_grad_(True)
    augmented_loss(logits, LABELS_A, LABELS_B, 0.3, 0.1).backward()
    expected = (F.softmax(LOGITS, 1) - mixed_targets(LABELS_A, LABELS_B, 0.3, 4, 0.1)) / len(LOGITS)
    torch.testing.assert_close(logits.grad, expected)


def test_cutmix_alone_does_not_fall_back_to_plain_cross_entropy():
    images = torch.randn(3, 3, 16, 16)
    cfg = AugmentationConfig(use_mixup=False, batch_aug_prob=1.0, use_random_erasing=False)
    _, labels_a, labels_b, lam = apply_augmentations(images, LABELS_A, cfg, torch.Generator().manual_seed(0))
    assert lam is not None and 0 < lam < 1
    loss = augmented_loss(LOGITS, labels_a, labels_b, lam, 0.1)
    assert loss.item() == pytest.approx(hand_loss(LOGITS, labels_a, labels_b, lam, 0.1), rel=1e-6)
    assert abs(loss.item() - F.cross_entropy(LOGITS, labels_a, label_smoothing=0.1).item()) > 1e-3


def test_mixup_criterion_is_the_seeds_weighted_sum_and_matches_augmented_loss():
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    got = mixup_criterion(ce, LOGITS, LABELS_A, LABELS_B, 0.3)
    assert torch.equal(got, 0.3 * ce(LOGITS, LABELS_A) + 0.7 * ce(LOGITS, LABELS_B))
    torch.testing.assert_close(got, augmented_loss(LOGITS, LABELS_A, LABELS_B, 0.3, 0.1))


def test_lam_may_be_a_zero_dim_tensor():
    torch.testing.assert_close(augmented_loss(LOGITS, LABELS_A, LABELS_B, torch.tensor(0.3), 0.1),
                               augmented_loss(LOGITS, LABELS_A, LABELS_B, 0.3, 0.1))


def test_low_precision_logits_give_an_fp32_loss():
    loss = augmented_loss(LOGITS.bfloat16(), LABELS_A, LABELS_B, 0.3, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, augmented_loss(LOGITS.bfloat16().float(), LABELS_A, LABELS_B, 0.3, 0.1))
