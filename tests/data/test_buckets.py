"""Bucket table: few shapes, multiples of 32, short_side and area modes, clamping, nearest-ratio assignment."""

import math

import numpy as np
import pytest

from rectrain.data.buckets import RECT_MODES, make_buckets

TARGETS = range(64, 385, 32)


@pytest.mark.parametrize("mode", RECT_MODES)
def test_shapes_are_multiples_of_32(mode):
    for t in TARGETS:
        shapes = make_buckets(t, mode).shapes
        assert np.all(shapes % 32 == 0) and np.all(shapes >= 32)


@pytest.mark.parametrize("mode", RECT_MODES)
def test_at_most_16_distinct_shapes(mode):
    for t in TARGETS:
        shapes = make_buckets(t, mode).shapes
        assert 1 <= len({tuple(s) for s in shapes}) == len(shapes) <= 16


@pytest.mark.parametrize("mode", RECT_MODES)
def test_table_contains_the_square_bucket(mode):
    for t in TARGETS:
        assert (t, t) in {tuple(s) for s in make_buckets(t, mode).shapes.tolist()}


def test_short_side_mode_shorter_side_equals_target():
    for t in TARGETS:
        shapes = make_buckets(t, "short_side").shapes
        assert np.all(shapes.min(axis=1) == t)


def test_short_side_mode_spans_max_ratio_both_ways():
    b = make_buckets(224, "short_side", max_ratio=2.0)
    assert [448, 224] in b.shapes.tolist() and [224, 448] in b.shapes.tolist()


def test_area_mode_area_is_within_20_percent_of_target_squared():
    # From 96 up: at 64 a 32-pixel grid cannot hold both the ratio and the area (e.g. 2:1 is 32x64 or 64x128).
    for t in range(96, 385, 32):
        area = make_buckets(t, "area").shapes.prod(axis=1)
        assert np.all(np.abs(area / t**2 - 1) <= 0.2 + 1e-9), (t, area / t**2)


def test_area_mode_keeps_wide_and_tall_ratios():
    ratios = make_buckets(224, "area", max_ratio=2.0).ratios
    assert ratios.min() <= 0.6 and ratios.max() >= 1 / 0.6


def test_max_ratio_bounds_the_bucket_ratios():
    for max_ratio in (1.5, 2.0, 3.0):
        ratios = make_buckets(256, "short_side", max_ratio=max_ratio).ratios
        assert ratios.max() == pytest.approx(max_ratio, rel=0.07)
        assert ratios.min() == pytest.approx(1 / max_ratio, rel=0.07)


def test_buckets_are_sorted_portrait_first():
    assert np.all(np.diff(make_buckets(224).ratios) > 0)


@pytest.mark.parametrize("mode", RECT_MODES)
def test_ratios_beyond_max_ratio_go_to_the_extreme_buckets(mode):
    b = make_buckets(224, mode, max_ratio=2.0)
    sizes = np.array([[100, 500], [100, 1000], [500, 100], [1000, 100]])  # (H, W): 5:1, 10:1, 1:5, 1:10
    assert b.assign(sizes).tolist() == [len(b) - 1, len(b) - 1, 0, 0]


@pytest.mark.parametrize("mode", RECT_MODES)
def test_assign_picks_the_nearest_ratio_in_log_space(mode):
    b = make_buckets(224, mode)
    rng = np.random.default_rng(0)
    sizes = rng.integers(40, 1200, size=(2000, 2))
    log_r = np.clip(np.log(sizes[:, 1] / sizes[:, 0]), -math.log(2), math.log(2))
    nearest = np.abs(log_r[:, None] - np.log(b.ratios)[None, :]).argmin(axis=1)
    assert np.array_equal(b.assign(sizes), nearest)


def test_assign_puts_an_image_of_a_bucket_ratio_in_that_bucket():
    b = make_buckets(224)
    assert b.assign(b.shapes * 3).tolist() == list(range(len(b)))


def test_assign_reads_sizes_as_height_width():
    b = make_buckets(224)
    tall, wide = b.assign(np.array([[400, 200], [200, 400]]))
    assert b.shape(tall) == (448, 224) and b.shape(wide) == (224, 448)


def test_assign_of_no_images_is_empty():
    assert make_buckets(224).assign(np.zeros((0, 2))).shape == (0,)


def test_target_size_is_rounded_to_a_multiple_of_32():
    assert make_buckets(230).target_size == 224


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="rect mode"):
        make_buckets(224, "squash")
    with pytest.raises(ValueError, match="max_ratio"):
        make_buckets(224, max_ratio=0.5)
    with pytest.raises(ValueError, match="target_size"):
        make_buckets(16)
