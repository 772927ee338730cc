import math

import pytest

from rectrain.errors import UserError
from rectrain.training.schedule import (LRSchedule, ResolutionSchedule, accumulation, describe_lr, lr_at,
                                       optimizer_steps, poly_lr_at, resolution_at)


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


# --- progressive resolution ----------------------------------------------------------------------

def test_poly_warms_up_as_the_cosine_then_decays_as_a_square_to_min_lr_at_the_last_step():
    assert [poly_lr_at(s, 2.0, 110, 10) for s in range(10)] == [lr_at(s, 2.0, 110, 10) for s in range(10)]
    assert poly_lr_at(10, 2.0, 110, 10, min_lr=1e-4) == pytest.approx(2.0)
    assert poly_lr_at(109, 2.0, 110, 10, min_lr=1e-4) == pytest.approx(1e-4)
    # MLPerf's power 2: a quarter of the way down the decay, (3/4)^2 of the span is left
    quarter = 10 + round(99 / 4)
    assert poly_lr_at(quarter, 2.0, 110, 10) == pytest.approx(2.0 * (1 - (quarter - 10) / 99) ** 2)
    assert poly_lr_at(quarter, 2.0, 110, 10, power=1.0) == pytest.approx(2.0 * (1 - (quarter - 10) / 99))


def test_a_rebased_poly_schedule_continues_as_a_poly_from_the_rate_it_had():
    s = LRSchedule(1.0, total_steps=100, warmup_steps=5, min_lr=0.0, kind="poly")
    rebased = s.continuing(50, 0.3)  # a resume whose settings changed the curve: it goes on from 0.3
    assert rebased.rebased == (49, 0.3) and rebased(49) == pytest.approx(0.3)
    assert rebased(60) == pytest.approx(poly_lr_at(11, 0.3, 51, 0))
    assert s.continuing(50, s(49)) is s  # an unchanged resume keeps the schedule as it was


def test_optimizer_steps_count_accumulations_and_the_short_last_one():
    assert [optimizer_steps(b, 4) for b in (1, 4, 5, 8, 10)] == [1, 1, 2, 2, 3]
    assert optimizer_steps(10) == 10


def test_accumulations_start_at_multiples_of_n_and_the_last_one_takes_what_is_left():
    assert [accumulation(b, 10, 4) for b in range(10)] == [(0, 4), (1, 4), (2, 4), (3, 4), (0, 4), (1, 4), (2, 4),
                                                          (3, 4), (0, 2), (1, 2)]
    assert [accumulation(b, 3) for b in range(3)] == [(0, 1)] * 3


def test_the_start_up_line_counts_accumulated_batches_in_the_global_batch():
    line = describe_lr(0.1, 0.1, batch_size=256, world_size=8, accum_steps=4)
    assert line.startswith("global batch 8192 (8 process(es) x 256 x 4 accumulated batches)")
    assert "peak lr 3.2 (--lr_per_256 0.1 x 8192/256)" in line


def test_the_linear_scaling_note_is_sgds_only():
    assert "linear-scaling rule would give" in describe_lr(0.1, None, 256, 64)
    line = describe_lr(25.0, None, 256, 64, opt="lars", lr_schedule="poly")
    assert "linear-scaling" not in line and line.endswith("lars with poly decay")


def test_resolution_is_start_until_start_epoch_and_end_from_end_epoch():
    sizes = [resolution_at(e, 128, 256, 3, 7) for e in range(10)]
    assert sizes[:4] == [128] * 4 and sizes[7:] == [256] * 3


def test_resolution_ramp_follows_the_line_rounded_to_32():
    # 128 + 32 * (e - 2) exactly on the multiples: 128, 160, 192, 224, 256 at epochs 2..6.
    assert [resolution_at(e, 128, 256, 2, 6) for e in range(2, 7)] == [128, 160, 192, 224, 256]


def test_resolution_ramp_rounds_to_the_nearest_multiple_ties_to_even_as_ffcv():
    # 128 + 16 e: 144 and 208 are exact ties (4.5 and 6.5 x 32) and go to 128 and 192; 176 (5.5) to 192.
    assert [resolution_at(e, 128, 224, 0, 6) for e in range(7)] == [128, 128, 160, 192, 192, 192, 224]


def test_ffcv_resnet50_schedule_switches_at_the_ramp_midpoint():
    schedule = ResolutionSchedule.parse("160:192:2:13")
    assert [schedule.at(e) for e in range(16)] == [160] * 8 + [192] * 8


def test_resolution_is_monotone_and_a_multiple_of_32():
    for spec in ["160:192:2:13", "128:288:0:9", "96:512:5:6", "224:224:0:0", "64:256:3:40"]:
        s = ResolutionSchedule.parse(spec)
        sizes = [s.at(e) for e in range(45)]
        assert all(a <= b for a, b in zip(sizes, sizes[1:])), spec
        assert all(v % 32 == 0 for v in sizes) and sizes[0] == s.start and sizes[-1] == s.end, spec


def test_equal_ramp_epochs_jump_after_the_start_epoch():
    assert [resolution_at(e, 160, 224, 4, 4) for e in range(3, 6)] == [160, 160, 224]


def test_sizes_lists_the_distinct_sizes_a_run_uses_in_order():
    s = ResolutionSchedule.parse("128:256:2:6")
    assert s.sizes(10) == [128, 160, 192, 224, 256]
    assert s.sizes(4) == [128, 160]  # a short run never reaches the end
    assert s.sizes(10, first_epoch=4) == [192, 224, 256]  # resumed at epoch 4


def test_schedule_prints_back_its_spec():
    assert str(ResolutionSchedule.parse("160:192:2:13")) == "160:192:2:13"
    assert ResolutionSchedule.parse("160:192:2:13") == ResolutionSchedule(160, 192, 2, 13)


@pytest.mark.parametrize("spec, words", [
    ("160:192:2", "START:END:E1:E2"),
    ("160:192:2:13:1", "START:END:E1:E2"),
    ("160:192:a:13", "START:END:E1:E2"),
    ("160.5:192:2:13", "START:END:E1:E2"),
    ("", "START:END:E1:E2"),
    ("150:192:2:13", "multiples of 32"),
    ("160:200:2:13", "multiples of 32"),
    ("0:192:2:13", "multiples of 32"),
    ("224:192:2:13", "must not exceed END"),
    ("160:192:13:2", "E1 <= E2"),
    ("160:192:-1:2", "E1 <= E2"),
])
def test_bad_resolution_specs_are_refused_with_one_line(spec, words):
    with pytest.raises(UserError, match=words) as e:
        ResolutionSchedule.parse(spec)
    message = str(e.value)
    assert "\n" not in message and message.startswith("resolution schedule")


def test_ramp_ending_after_the_last_epoch_is_refused():
    ResolutionSchedule.parse("160:192:2:13").check_epochs(14)  # epoch 13 is the last: fine
    ResolutionSchedule.parse("160:192:2:13").check_epochs(10)  # 192 reached at epoch 8 already: fine
    with pytest.raises(UserError, match="--epochs"):
        ResolutionSchedule.parse("160:256:2:13").check_epochs(10)  # epoch 9 is at 224


def test_resolution_at_refuses_a_falling_ramp():
    with pytest.raises(ValueError):
        resolution_at(0, 224, 160, 0, 5)
