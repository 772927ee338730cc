import math

import pytest

from rectrain.schedule import lr_at


def test_warmup_rises_linearly_to_base_lr():
    lrs = [lr_at(s, 0.4, total_steps=100, warmup_steps=10) for s in range(10)]
    assert lrs[0] == pytest.approx(0.04)
    assert lrs[9] == pytest.approx(0.4)
    assert all(b - a == pytest.approx(0.04) for a, b in zip(lrs, lrs[1:]))


def test_cosine_decays_from_base_to_min_at_last_step():
    assert lr_at(10, 0.4, 100, 10, min_lr=0.01) == pytest.approx(0.4)
    assert lr_at(99, 0.4, 100, 10, min_lr=0.01) == pytest.approx(0.01)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), 0.4, 100, 10) == pytest.approx(0.2 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_schedule_is_monotone_after_warmup():
    lrs = [lr_at(s, 0.1, 50, 5) for s in range(5, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_base_lr():
    assert lr_at(0, 0.1, 20, 0) == pytest.approx(0.1)


def test_steps_beyond_the_end_are_clamped():
    assert lr_at(1000, 0.1, 20, 2) == lr_at(19, 0.1, 20, 2)


def test_zero_total_steps_is_an_error():
    with pytest.raises(ValueError):
        lr_at(0, 0.1, 0)
