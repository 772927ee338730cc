import os

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


@pytest.fixture
def reference_dir():
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One trained tiny checkpoint shared by the eval, predict and export tests (read-only: copy to change it)."""
    from tests.tiny import train_tiny
    return train_tiny(tmp_path_factory.mktemp("tiny_run"))
