"""Case 11: a data set that changes between runs (files added, removed, replaced). The scan cache is keyed by
the file list (paths, sizes, mtimes): a changed data set must be rescanned by itself, never read stale.
"""

import numpy as np
import pytest
from PIL import Image

from . import harness as h


def _add(split):
    Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(split / "class_000" / "added.jpg")
    return 49, 0


def _remove(split):
    (split / "class_001" / "class_001_00000.jpg").unlink()
    return 47, 0


def _replace_with_another_image(split):
    Image.fromarray(np.full((96, 32, 3), 90, np.uint8)).save(split / "class_002" / "class_002_00000.jpg")
    return 48, 0


def _replace_with_garbage(split):
    (split / "class_002" / "class_002_00001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return 47, 1


CHANGES = {"file-added": _add, "file-removed": _remove, "file-replaced": _replace_with_another_image,
           "file-replaced-by-garbage": _replace_with_garbage}


def _scan(data, workdir):
    res = h.cli("scan", "--data_dir", str(data), "--split", "train", "--target_size", "32", "--max_ratio", "1.5",
                workdir=workdir)
    assert res.code == 0, res.stderr
    return res.stdout


@pytest.mark.fault(case="11 data set changes", fault="files added, removed or replaced between runs")
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_data_set_is_rescanned_not_read_from_a_stale_cache(change, own_data, tmp_path, outcome):
    first = _scan(own_data, tmp_path / "scan1")
    assert "images: 48 usable" in first and "cache written" in first
    assert "read from cache" in _scan(own_data, tmp_path / "scan2")  # unchanged: the cache is used
    usable, bad = CHANGES[change](own_data / "train")
    again = _scan(own_data, tmp_path / "scan3")
    outcome(repetitions=1, runs_finished=1, exit_code=0)
    assert "read from cache" not in again, again
    assert f"images: {usable} usable" in again and f"bad files: {bad}" in again, again
    if change == "file-replaced":  # the new size counts: a tall image lands in the tall bucket
        assert "64x32" in again and first.split("64x32")[1].split()[1] != again.split("64x32")[1].split()[1]


@pytest.mark.soak
@pytest.mark.fault(case="11 data set changes", fault="files added between a run and its resume")
def test_a_resumed_run_trains_on_the_changed_data_set(own_data, tmp_path, outcome):
    out = tmp_path / "out"
    res = h.run(h.train_args(own_data, out, "c", "--epochs", "2", "--max_steps", "6"), tmp_path / "run1")
    assert res.code == 0, res.stderr[-3000:]
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(own_data / "train" / "class_000" / f"new{i}.jpg")
    res = h.run(h.train_args(own_data, out, "c", "--epochs", "2", "--resume", "auto"), tmp_path / "run2")
    outcome(repetitions=1, exit_code=res.code, runs_finished=int(res.code == 0), hangs=int(res.hung))
    assert res.code == 0, res.stderr[-3000:]
    assert "data: 56 train" in h.log_text(out, "c")
