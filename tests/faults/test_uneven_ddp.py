"""Case 10: uneven data under DDP: a bucket with fewer batches than ranks, a validation set smaller than the
world size. Promise: no hang (every rank reaches every collective), exact validation counts (every image
once), identical replicas.
"""

import re

import numpy as np
import pytest
from PIL import Image

from . import harness as h


def make_uneven(root, val_images):
    """40 square, 8 wide (2:1) and 3 tall train images over 3 classes; ``val_images`` square val images.

    At batch 8 on 2 ranks: the square bucket gives 5 batches, the wide one a single batch (fewer than the
    ranks), the tall one a single short batch of 3.
    """
    rng = np.random.default_rng(10)
    shapes = [(32, 32)] * 40 + [(32, 64)] * 8 + [(64, 32)] * 3  # (H, W)
    for i, (hh, ww) in enumerate(shapes):
        d = root / "train" / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (hh, ww, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg")
    for i in range(val_images):
        d = root / "val" / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32 + 16 * i, 3), dtype=np.uint8)).save(d / f"v{i}.jpg")


@pytest.mark.fault(case="10 uneven DDP data", fault="a bucket with 1 batch for 2 ranks, 1 validation image for 2 ranks")
@pytest.mark.parametrize("val_images", [1, pytest.param(3, marks=pytest.mark.soak)])
def test_uneven_buckets_and_a_tiny_validation_set_neither_hang_nor_miscount(val_images, tmp_path, outcome):
    data = tmp_path / "data"
    make_uneven(data, val_images)
    out = tmp_path / "out"
    res = h.run(h.train_args(data, out, "u", "--epochs", "1", "--val_batch_size", "2", *h.ddp()), tmp_path / "run")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert not res.hung and res.code == 0, res.stderr[-3000:]
    log = h.log_text(out, "u")
    counts = [int(n) for n in re.findall(r"val top-1 .* on ([\d,]+) images", log)]
    assert counts == [val_images], log[-2000:]
    digests = [re.findall(r"final weights sha1 (\w+)", h.log_text(out, "u", r)) for r in (0, 1)]
    assert digests[0] and digests[0] == digests[1]
    assert [r["epoch"] for r in h.metric_rows(out, "u")] == [1]
