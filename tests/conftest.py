import os

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


@pytest.fixture
def reference_dir():
    return REFERENCE_DIR
