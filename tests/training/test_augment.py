"""Batch augmentations: the seed's AugmentationConfig, MixUp, CutMix, Random Erasing, Cutout, BatchAugment.

Statistical tests use fixed seeds and about 2,000 draws; tolerances are ~3.5 standard deviations.
"""

import json

import pytest
import torch

from rectrain.errors import UserError
from rectrain.training.augment import (AugmentationConfig, AugmentationConfigError, BatchAugment, apply_augmentations,
                                       cutmix_box)

NONE_ON = dict(use_mixup=False, use_cutmix=False, use_random_erasing=False, use_cutout=False)


def only(**kw) -> AugmentationConfig:
    """A config with every augmentation off except what ``kw`` switches on."""
    return AugmentationConfig(**{**NONE_ON, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant_batch(values, c=1, h=8, w=12) -> torch.Tensor:
    """(B, c, h, w) batch whose image i is filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, c, h, w).contiguous()


def bbox(mask: torch.Tensor):
    """(rows, cols) index ranges of the True pixels of a (H, W) mask, and whether they fill that box."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return (y0, y1, x0, x1), int(mask.sum()) == (y1 - y0) * (x1 - x0)


# --- configuration -------------------------------------------------------------------------


def test_config_defaults_are_the_seeds():
    assert AugmentationConfig().to_dict() == {
        "use_mixup": True, "mixup_alpha": 0.2, "use_cutmix": True, "cutmix_alpha": 1.0,
        "use_cutout": False, "cutout_n_holes": 1, "cutout_length": 8, "cutout_prob": 0.5,
        "use_random_erasing": True, "random_erasing_prob": 0.25, "random_erasing_scale": [0.02, 0.33],
        "batch_aug_prob": 0.5}
    assert AugmentationConfig().random_erasing_scale == (0.02, 0.33)


@pytest.mark.parametrize("field, value", [
    ("mixup_alpha", 0.0), ("cutmix_alpha", -1.0), ("cutout_prob", 1.5), ("random_erasing_prob", -0.1),
    ("batch_aug_prob", 2), ("random_erasing_scale", (0.3, 0.1)), ("random_erasing_scale", (0.0, 0.3)),
    ("random_erasing_scale", (0.1,)), ("random_erasing_scale", "0.1"), ("cutout_n_holes", -1),
    ("cutout_length", 0), ("cutout_length", 2.5), ("use_mixup", "yes"), ("mixup_alpha", float("nan"))])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(AugmentationConfigError, match=field) as err:
        AugmentationConfig(**{field: value})
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_config_checks_an_alpha_only_while_its_op_is_on():
    assert AugmentationConfig(use_mixup=False, mixup_alpha=0.0).mixing_enabled
    assert not AugmentationConfig(use_mixup=False, use_cutmix=False, cutmix_alpha=0.0).mixing_enabled


def test_config_round_trips_through_json():
    cfg = AugmentationConfig(mixup_alpha=0.1, use_cutout=True, random_erasing_scale=(0.05, 0.2))
    assert AugmentationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(AugmentationConfigError, match="mixup_alfa"):
        AugmentationConfig.from_dict({"mixup_alfa": 0.3})


def test_config_repr_names_the_active_augmentations():
    text = repr(AugmentationConfig(use_mixup=False, use_cutout=True))
    assert "CutMix(alpha=1.0)" in text and "Cutout(p=0.5, n_holes=1, length=8)" in text
    assert "MixUp" not in text and "RandomErasing(p=0.25" in text
    assert repr(only()) == "AugmentationConfig(no augmentation)"


# --- MixUp ---------------------------------------------------------------------------------


def test_mixup_output_is_lam_x_plus_one_minus_lam_times_the_flipped_partner():
    x = torch.randn(6, 3, 8, 14, generator=gen(1))
    x_before = x.clone()
    out, labels_a, labels_b, lam = apply_augmentations(x, torch.arange(6), only(use_mixup=True, batch_aug_prob=1),
                                                       gen(2))
    assert isinstance(lam, float) and 0 < lam < 1
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(x, x_before)  # the source batch is not written


def test_mixup_lam_follows_beta_alpha_alpha():
    alpha, n = 0.2, 2000
    cfg, g, x, y = only(use_mixup=True, mixup_alpha=alpha, batch_aug_prob=1), gen(3), torch.zeros(2, 1, 1, 1), \
        torch.arange(2)
    lams = torch.tensor([apply_augmentations(x, y, cfg, g)[3] for _ in range(n)], dtype=torch.float64)
    torch.manual_seed(4)
    ref = torch.distributions.Beta(alpha, alpha).sample((n,)).double()
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ks = ((lams[None] <= grid[:, None]).double().mean(1) - (ref[None] <= grid[:, None]).double().mean(1)).abs().max()
    assert ks < 0.062  # two-sample Kolmogorov-Smirnov, 0.1% critical value for 2,000 + 2,000 draws
    assert abs(lams.mean() - 0.5) < 0.03
    assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.015  # Beta(a, a) variance: 0.179 for a = 0.2


# --- CutMix --------------------------------------------------------------------------------


def test_cutmix_partner_pixel_fraction_is_one_minus_lam_exactly_including_clipped_boxes():
    h, w = 12, 20  # rectangular
    x = constant_batch([1.0, 2.0, 3.0, 4.0], c=2, h=h, w=w)
    cfg, g = only(use_cutmix=True, batch_aug_prob=1), gen(5)
    clipped = inner = 0
    for _ in range(300):
        out, _, _, lam = apply_augmentations(x, torch.arange(4), cfg, g)
        from_partner = out != x  # every image differs from its partner, so changed == pasted
        assert torch.equal(from_partner, from_partner[:1].expand_as(from_partner))  # one box, all images/channels
        count = int(from_partner[0, 0].sum())
        assert count == round((1 - lam) * h * w) and abs((1 - lam) - count / (h * w)) < 1e-12
        if count:
            (y0, y1, x0, x1), is_box = bbox(from_partner[0, 0])
            assert is_box
            at_border = y0 == 0 or x0 == 0 or y1 == h or x1 == w
            clipped, inner = clipped + at_border, inner + (not at_border)
    assert clipped > 30 and inner > 30  # both cases were exercised


def test_cutmix_box_sides_are_proportional_to_height_and_width():
    h, w, lam, g = 40, 80, 0.75, gen(6)  # sqrt(1 - lam) = 0.5: a 20 x 40 box before clipping
    sizes = set()
    for _ in range(500):
        y0, y1, x0, x1 = cutmix_box(h, w, lam, g)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        if 0 < y0 and y1 < h and 0 < x0 and x1 < w:
            sizes.add((y1 - y0, x1 - x0))
        else:
            assert y1 - y0 <= 20 and x1 - x0 <= 40
    assert sizes == {(20, 40)}


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_labels_b_are_the_labels_of_the_partner_actually_used(op):
    labels = torch.tensor([7, 2, 9, 4, 5])  # odd batch: the middle image pairs with itself
    x = constant_batch(labels.tolist(), h=16, w=16)
    cfg = only(use_mixup=op == "mixup", mixup_alpha=1.0, use_cutmix=op == "cutmix", batch_aug_prob=1)
    for seed in range(20):
        out, labels_a, labels_b, lam = apply_augmentations(x, labels, cfg, gen(seed))
        assert torch.equal(labels_a, labels)
        if op == "mixup":  # labels are >= 1 apart, so any other partner would be off by >= min(lam, 1 - lam)
            expected = lam * labels.float() + (1 - lam) * labels_b.float()
            torch.testing.assert_close(out[:, 0, 0, 0], expected, rtol=0, atol=min(lam, 1 - lam) / 10)
        else:
            for i in range(len(labels)):
                pasted = out[i, 0][out[i, 0] != labels[i]]
                assert (pasted == labels_b[i]).all()
                assert len(pasted) == (0 if i == 2 else round((1 - lam) * 256))


# --- per-batch switches --------------------------------------------------------------------


def classify(out: torch.Tensor) -> str:
    """For the batch [zeros, ones]: which op produced image 0."""
    img = out[0]
    if ((img == 0) | (img == 1)).all():
        return "cutmix" if (img == 1).any() else "none"
    return "mixup"


def test_batch_aug_prob_and_the_50_50_switch_hold_statistically():
    cfg, g, x, y = AugmentationConfig(batch_aug_prob=0.3, use_random_erasing=False), gen(7), \
        constant_batch([0.0, 1.0], h=4, w=4), torch.arange(2)
    ops, lams = [], []
    for _ in range(2000):
        out, _, _, lam = apply_augmentations(x, y, cfg, g)
        ops.append(classify(out))
        lams.append(lam)
    mixed = sum(lam is not None for lam in lams) / 2000
    assert abs(mixed - 0.3) < 0.035
    n_cut, n_mix = ops.count("cutmix"), ops.count("mixup")
    assert abs(n_cut / (n_cut + n_mix) - 0.5) < 0.07
    assert all(op == "none" for lam, op in zip(lams, ops) if lam is None)  # lam None <=> images untouched
    assert all(lam is not None for lam, op in zip(lams, ops) if op != "none")


def test_cutmix_alone_applies_cutmix_to_every_mixed_batch():
    cfg, g, x, y = only(use_cutmix=True, batch_aug_prob=1), gen(8), constant_batch([0.0, 1.0], h=8, w=8), \
        torch.arange(2)
    results = [apply_augmentations(x, y, cfg, g) for _ in range(200)]
    assert all(lam is not None for *_, lam in results)
    assert {classify(out) for out, *_ in results} <= {"cutmix", "none"}  # "none": an empty box, lam = 1
    assert sum(classify(out) == "cutmix" for out, *_ in results) > 150


# --- Random Erasing ------------------------------------------------------------------------


def test_random_erasing_per_image_rate_is_near_its_probability():
    x = torch.full((2000, 1, 32, 32), 100.0)  # noise never reaches 100: changed pixels are erased ones
    out = apply_augmentations(x, torch.zeros(2000, dtype=torch.long), only(use_random_erasing=True), gen(9))[0]
    rate = (out != 100).flatten(1).any(1).double().mean()
    assert abs(rate - 0.25) < 0.035


def test_random_erasing_boxes_have_area_and_aspect_in_range():
    n, h, w, (lo, hi) = 600, 64, 96, (0.02, 0.33)
    x = torch.full((n, 1, h, w), 100.0)
    cfg = only(use_random_erasing=True, random_erasing_prob=1.0, random_erasing_scale=(lo, hi))
    out = apply_augmentations(x, torch.zeros(n, dtype=torch.long), cfg, gen(10))[0]
    fractions = []
    for i in range(n):
        (y0, y1, x0, x1), is_box = bbox(out[i, 0] != 100)
        assert is_box
        fractions.append((y1 - y0) * (x1 - x0) / (h * w))
        assert 0.3 / 1.2 <= (y1 - y0) / (x1 - x0) <= 1.2 / 0.3  # log-uniform in [0.3, 1/0.3], plus rounding
    assert lo * 0.9 <= min(fractions) < lo + 0.02 and hi - 0.02 < max(fractions) <= hi * 1.1


def test_random_erasing_fills_a_box_with_standard_normal_noise_and_leaves_other_pixels_unchanged():
    x = torch.randn(200, 3, 24, 40, generator=gen(11))
    cfg = only(use_random_erasing=True, random_erasing_prob=1.0)
    out = apply_augmentations(x, torch.zeros(200, dtype=torch.long), cfg, gen(12))[0]
    changed = out != x
    assert torch.equal(changed, changed[:, :1].expand_as(changed))  # same box in every channel
    for i in range(200):
        assert bbox(changed[i, 0])[1]  # the changed pixels are exactly one box: the rest is untouched
    fill = out[changed]
    assert abs(fill.mean()) < 0.02 and abs(fill.std() - 1) < 0.02


# --- Cutout --------------------------------------------------------------------------------


def test_cutout_per_image_rate_is_near_its_probability():
    x = torch.full((2000, 1, 16, 16), 5.0)
    out = apply_augmentations(x, torch.zeros(2000, dtype=torch.long), only(use_cutout=True), gen(13))[0]
    rate = (out == 0).flatten(1).any(1).double().mean()
    assert abs(rate - 0.5) < 0.04


def test_cutout_holes_are_zero_filled_squares_clipped_at_the_borders():
    n, h, w, side = 1000, 20, 28, 8
    x = torch.full((n, 2, h, w), 5.0)
    cfg = only(use_cutout=True, cutout_prob=1.0, cutout_n_holes=1, cutout_length=side)
    out = apply_augmentations(x, torch.zeros(n, dtype=torch.long), cfg, gen(14))[0]
    assert ((out == 0) | (out == 5)).all()  # holes hold 0, every other pixel is unchanged
    clipped = 0
    for i in range(n):
        (y0, y1, x0, x1), is_box = bbox(out[i, 0] == 0)
        assert is_box and torch.equal(out[i, 0], out[i, 1])
        if 0 < y0 and y1 < h and 0 < x0 and x1 < w:
            assert (y1 - y0, x1 - x0) == (side, side)
        else:
            clipped += 1
            assert side // 2 <= y1 - y0 <= side and side // 2 <= x1 - x0 <= side
    assert 100 < clipped < n - 100


def test_cutout_draws_n_holes_per_image():
    n, side = 300, 4
    x = torch.full((n, 1, 64, 64), 5.0)
    cfg = only(use_cutout=True, cutout_prob=1.0, cutout_n_holes=3, cutout_length=side)
    holes = (apply_augmentations(x, torch.zeros(n, dtype=torch.long), cfg, gen(15))[0] == 0).flatten(1).sum(1)
    assert holes.max() <= 3 * side * side
    assert holes.double().mean() > 2.5 * side * side  # three holes (overlaps and borders take a little)


# --- identity, dtypes, memory format -------------------------------------------------------


@pytest.mark.parametrize("cfg", [only(), AugmentationConfig(batch_aug_prob=0, random_erasing_prob=0, use_cutout=True,
                                                            cutout_prob=0)])
def test_disabled_config_is_the_identity(cfg):
    x, y = torch.randn(4, 3, 8, 10), torch.tensor([3, 1, 0, 2])
    out, labels_a, labels_b, lam = apply_augmentations(x, y, cfg, gen(16))
    assert torch.equal(out, x) and torch.equal(labels_a, y) and torch.equal(labels_b, y) and lam is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_outputs_keep_dtype_and_memory_format(dtype, channels_last, op):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 12, 20).to(dtype=dtype, memory_format=fmt)
    cfg = AugmentationConfig(use_mixup=op == "mixup", use_cutmix=op == "cutmix", batch_aug_prob=1.0,
                             random_erasing_prob=1.0, use_cutout=True, cutout_prob=1.0)
    out, _, _, lam = apply_augmentations(x, torch.arange(4), cfg, gen(17))
    assert lam is not None and out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    assert torch.isfinite(out.float()).all()


def test_rejects_batches_that_are_not_bchw_or_labels_that_do_not_match():
    with pytest.raises(ValueError, match="B, C, H, W"):
        apply_augmentations(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long), AugmentationConfig())
    with pytest.raises(ValueError, match="labels"):
        apply_augmentations(torch.zeros(3, 1, 8, 8), torch.zeros(4, dtype=torch.long), AugmentationConfig())


# --- randomness: reproducibility, ranks, resume, no host sync ------------------------------


def full_config() -> AugmentationConfig:
    return AugmentationConfig(batch_aug_prob=1.0, random_erasing_prob=0.5, use_cutout=True)


def test_same_generator_seed_gives_identical_results():
    x, y = torch.randn(8, 3, 16, 24, generator=gen(18)), torch.arange(8)
    runs = [[apply_augmentations(x, y, full_config(), g) for _ in range(5)] for g in (gen(1), gen(1), gen(2))]
    for (o1, _, b1, l1), (o2, _, b2, l2) in zip(runs[0], runs[1]):
        assert torch.equal(o1, o2) and torch.equal(b1, b2) and l1 == l2
    assert any(not torch.equal(o1, o3) for (o1, *_), (o3, *_) in zip(runs[0], runs[2]))


def test_batch_augment_ranks_draw_differently_and_reproducibly():
    x, y = torch.randn(8, 3, 16, 24, generator=gen(19)), torch.arange(8)
    a0, a0_again, a1 = (BatchAugment(full_config(), seed=5, rank=r) for r in (0, 0, 1))
    outs = [[aug(x, y)[0] for _ in range(3)] for aug in (a0, a0_again, a1)]
    assert all(torch.equal(p, q) for p, q in zip(outs[0], outs[1]))
    assert not any(torch.equal(p, q) for p, q in zip(outs[0], outs[2]))


@pytest.mark.parametrize("batches_before_save", [0, 2])
def test_batch_augment_state_dict_resumes_the_same_draws(batches_before_save):
    x, y = torch.randn(8, 3, 16, 24, generator=gen(20)), torch.arange(8)
    aug = BatchAugment(full_config(), seed=3)
    for _ in range(batches_before_save):
        aug(x, y)
    state = aug.state_dict()
    expected = [aug(x, y) for _ in range(3)]
    resumed = BatchAugment(full_config(), seed=99)  # different seed: everything comes from the state
    resumed.load_state_dict(state)
    for (o1, _, b1, l1), (o2, _, b2, l2) in zip(expected, (resumed(x, y) for _ in range(3))):
        assert torch.equal(o1, o2) and torch.equal(b1, b2) and l1 == l2


def test_apply_augmentations_reads_nothing_back_from_the_device():
    # Meta tensors have shapes but no data: any .item(), .cpu(), bool() or value-dependent branch on an
    # image-derived tensor raises. Only the CPU generator's per-batch draws are read on the host.
    x = torch.empty(8, 3, 16, 24, device="meta").to(memory_format=torch.channels_last)
    y = torch.empty(8, dtype=torch.long, device="meta")
    cfg, g = AugmentationConfig(random_erasing_prob=1.0, use_cutout=True, cutout_n_holes=2), gen(21)
    ops = set()
    for _ in range(40):
        out, labels_a, labels_b, lam = apply_augmentations(x, y, cfg, g)
        assert out.device.type == "meta" and out.shape == x.shape and labels_b.device.type == "meta"
        assert lam is None or isinstance(lam, float)
        ops.add(lam is None)
    assert ops == {True, False}  # mixed and unmixed batches both ran


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_batch_augment_makes_no_host_device_sync():
    x = torch.randn(16, 3, 32, 48, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    y = torch.arange(16, device="cuda")
    aug = BatchAugment(AugmentationConfig(batch_aug_prob=1.0, random_erasing_prob=0.5, use_cutout=True),
                       seed=0, device="cuda")
    aug(x, y)  # first call: lazy CUDA initialisation outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            out, _, _, _ = aug(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)


@cuda
def test_cuda_results_are_reproducible_for_a_seed():
    x = torch.randn(16, 3, 32, 48, device="cuda")
    y = torch.arange(16, device="cuda")
    a, b = (BatchAugment(full_config(), seed=1, device="cuda") for _ in range(2))
    for _ in range(3):
        assert torch.equal(a(x, y)[0], b(x, y)[0])
    g1, g2 = gen(4), gen(4)
    assert torch.equal(apply_augmentations(x, y, full_config(), g1)[0], apply_augmentations(x, y, full_config(), g2)[0])
