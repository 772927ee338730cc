"""The warm-up runs every batch shape once and leaves the run exactly as it found it."""

import numpy as np
import torch

from rectrain.model import build_model
from rectrain.training.parts import autocast_factory
from rectrain.training.warmup import batch_shapes, warm_up


def test_batch_shapes_are_distinct_largest_first():
    table = np.array([[32, 64], [32, 32]])
    bucket_ids = np.array([0, 0, 1, 1, 1])
    batches = [[0, 1], [2, 3], [4], [3, 2]]
    assert batch_shapes(batches, bucket_ids, table) == [(2, 32, 64), (2, 32, 32), (1, 32, 32)]


def test_warm_up_leaves_weights_buffers_and_gradients_as_they_were():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, width=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append((m.training, tuple(args[0].shape))))
    seconds = warm_up(model, model, [(4, 32, 64), (2, 32, 32)], [(4, 32, 32)],
                      autocast=autocast_factory("cpu", None), channels_last=False, device=torch.device("cpu"),
                      log=lambda s: None)
    assert seconds > 0
    assert calls == [(True, (4, 3, 32, 64)), (True, (2, 3, 32, 32)), (False, (4, 3, 32, 32))]
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # BatchNorm running stats and counters restored
    assert all(p.grad is None for p in model.parameters())
    assert model.training
