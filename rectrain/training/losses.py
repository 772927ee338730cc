"""Training losses for (possibly mixed) batches: the seed's ``mixup_criterion`` and ``augmented_loss``.

``augmented_loss`` is the one loss the training loop calls, whatever the augmentation switches: with
``lam`` None (no mixing this batch) it is cross-entropy with label smoothing; with MixUp or CutMix (either
alone, or both) it is cross-entropy against the soft target

    lam * smooth(onehot(labels_a)) + (1 - lam) * smooth(onehot(labels_b)),
    smooth(t) = (1 - label_smoothing) * t + label_smoothing / num_classes,

so label smoothing composes with mixing and a CutMix-only run never falls back to plain cross-entropy.
Cross-entropy is linear in its target, so this equals ``lam * CE_ls(out, a) + (1 - lam) * CE_ls(out, b)``,
which is how it is computed (no (B, num_classes) target tensor). ``soft_target_cross_entropy`` and
``mixed_targets`` build the target explicitly; tests use them as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mixup_criterion", "augmented_loss", "soft_target_cross_entropy", "mixed_targets"]


def mixup_criterion(criterion, outputs: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor, lam):
    """The seed's form: lam * criterion(outputs, labels_a) + (1 - lam) * criterion(outputs, labels_b)."""
    return lam * criterion(outputs, labels_a) + (1 - lam) * criterion(outputs, labels_b)


def augmented_loss(outputs: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor, lam,
                   label_smoothing: float) -> torch.Tensor:
    """Mean loss over the batch for every combination of switches (see the module docstring).

    outputs: (B, num_classes) logits, computed in fp32 whatever their dtype; lam: float, 0-dim tensor or None.
    """
    logits = outputs.float()

    def ce(labels):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    if lam is None:
        return ce(labels_a)
    return mixup_criterion(lambda _outputs, labels: ce(labels), logits, labels_a, labels_b, lam)


def mixed_targets(labels_a: torch.Tensor, labels_b: torch.Tensor, lam, num_classes: int,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """(B, num_classes) fp32 soft targets lam * smooth(onehot(a)) + (1 - lam) * smooth(onehot(b));
    lam None means 1 (no mixing)."""
    def smooth(labels):
        return F.one_hot(labels, num_classes).float() * (1.0 - label_smoothing) + label_smoothing / num_classes

    lam = 1.0 if lam is None else lam
    return lam * smooth(labels_a) + (1.0 - lam) * smooth(labels_b)


def soft_target_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets[k] * log_softmax(outputs)[k]; targets rows are probabilities."""
    return torch.sum(-targets * F.log_softmax(outputs.float(), dim=-1), dim=-1).mean()
