import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph_opt.kernels.importance import (ActivationStats, bn_gamma_scores, channel_norms, channel_sumsq,
                                          global_magnitude_masks, magnitude_mask, nm_mask, select_channels, sparsity)

RNG = np.random.default_rng(0)


def test_channel_norms_match_the_definition():
    w = RNG.standard_normal((6, 4, 3, 3))
    l1 = channel_norms(w, 0, 1)
    l2 = channel_norms(w, 0, 2)
    for c in range(6):
        assert l1[c] == pytest.approx(np.abs(w[c]).sum())
        assert l2[c] == pytest.approx(np.sqrt((w[c] ** 2).sum()))
    np.testing.assert_allclose(channel_sumsq(w, 0), l2 ** 2)
    cols = channel_norms(w.reshape(6, -1), axis=1, p=1)  # columns of a [K, N] weight
    np.testing.assert_allclose(cols, np.abs(w.reshape(6, -1)).sum(axis=0))
    with pytest.raises(ValueError):
        channel_norms(w, 0, 3)


def test_bn_gamma_scores_are_absolute_values():
    np.testing.assert_array_equal(bn_gamma_scores([-2.0, 0.5, 0.0]), [2.0, 0.5, 0.0])


def test_activation_stats_stream_equals_one_shot():
    a = np.maximum(RNG.standard_normal((10, 5, 4, 4)), 0)  # ReLU output: real zeros
    streamed = ActivationStats(5)
    for start in range(0, 10, 3):  # uneven batches
        streamed.update(a[start:start + 3], axis=1)
    once = ActivationStats(5)
    once.update(a, axis=1)
    np.testing.assert_allclose(streamed.mean_abs, once.mean_abs)
    np.testing.assert_array_equal(streamed.apoz, once.apoz)
    per_channel = np.moveaxis(a, 1, 0).reshape(5, -1)
    np.testing.assert_allclose(streamed.mean_abs, np.abs(per_channel).mean(axis=1))
    np.testing.assert_allclose(streamed.apoz, (per_channel == 0).mean(axis=1))
    np.testing.assert_allclose(streamed.importance("apoz"), 1 - streamed.apoz)
    with pytest.raises(ValueError):
        streamed.update(a, axis=0)  # 10 channels on axis 0, not 5
    with pytest.raises(ValueError):
        ActivationStats(3).importance()


def test_activation_stats_last_axis():
    a = RNG.standard_normal((2, 7, 6))  # [batch, seq, hidden]
    s = ActivationStats(6)
    s.update(a, axis=-1)
    np.testing.assert_allclose(s.mean_abs, np.abs(a).reshape(-1, 6).mean(axis=0))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 200), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_magnitude_mask_zeroes_exactly_the_smallest(size, target, seed):
    w = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    keep = magnitude_mask(w, target)
    assert (~keep).sum() == round(target * size)
    if keep.any() and (~keep).any():
        assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max()
    np.testing.assert_array_equal(keep, magnitude_mask(w, target))  # deterministic


def test_magnitude_mask_counts_existing_zeros_and_breaks_ties_by_index():
    w = np.array([0.0, 1.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(magnitude_mask(w, 0.4), [False, True, False, True, True])
    np.testing.assert_array_equal(magnitude_mask(w, 0.6), [False, False, False, True, True])
    assert magnitude_mask(w, 0.0).all()
    with pytest.raises(ValueError):
        magnitude_mask(w, 1.5)


def test_global_masks_rank_all_layers_together():
    small = np.full((4, 4), 0.01)
    big = RNG.uniform(1, 2, (4, 4))
    keep_small, keep_big = global_magnitude_masks([small, big], 0.5)
    assert (~keep_small).sum() + (~keep_big).sum() == 16
    assert not keep_small.any() and keep_big.all()  # the small layer goes entirely
    assert global_magnitude_masks([], 0.5) == []


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8)]), st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000),
       st.integers(0, 2))
def test_nm_mask_keeps_n_of_every_m(nm, groups, rows, seed, axis):
    n, m = nm
    shape = [rows + 1, rows + 2, 2]
    shape[axis] = groups * m
    w = np.random.default_rng(seed).standard_normal(shape)
    keep = nm_mask(w, n, m, axis)
    runs = np.moveaxis(keep, axis, -1).reshape(-1, m)
    assert (runs.sum(axis=1) == n).all()
    vals = np.moveaxis(np.abs(w), axis, -1).reshape(-1, m)
    for k, v in zip(runs, vals):
        assert v[k].min() >= v[~k].max()


def test_nm_mask_rejects_indivisible_axes():
    with pytest.raises(ValueError):
        nm_mask(np.ones((3, 6)), 2, 4, axis=1)
    with pytest.raises(ValueError):
        nm_mask(np.ones((4, 4)), 5, 4, axis=1)


def test_select_channels_per_layer():
    scores = [np.array([5.0, 1.0, 3.0, 2.0]), np.array([1.0, 2.0])]
    masks = select_channels(scores, 0.5)
    np.testing.assert_array_equal(masks[0], [False, True, False, True])
    np.testing.assert_array_equal(masks[1], [True, False])
    # eligibility and the minimum kept per group bind
    masks = select_channels(scores, 0.5, eligible=[[True, False, True, True], [True, True]], min_keep=1)
    np.testing.assert_array_equal(masks[0], [False, False, True, True])
    assert masks[1].sum() == 1
    assert not select_channels([np.ones(3)], 0.3)[0].any()  # floor(0.9) = 0


def test_select_channels_global_normalizes_each_group():
    a = np.array([10.0, 20.0, 30.0, 40.0])   # mean 25
    b = np.array([0.1, 0.2, 0.3, 0.4])       # same shape of scores, 100x smaller
    masks = select_channels([a, b], 0.25, scope="global")
    assert masks[0].sum() + masks[1].sum() == 2
    assert masks[0][0] and masks[1][0]     # scale does not decide, the relative rank does
    masks = select_channels([a, b], 0.9, scope="global", min_keep=1)
    assert masks[0].sum() == 3 and masks[1].sum() == 3


def test_sparsity():
    assert sparsity(np.array([0.0, 1.0, 0.0, 2.0])) == 0.5
    assert sparsity(np.zeros(0)) == 0.0


def test_select_channels_min_keep_caps_the_ratio():
    masks = select_channels([np.arange(4.0)], 0.9, min_keep=2)
    np.testing.assert_array_equal(masks[0], [True, True, False, False])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=4), st.floats(0.0, 0.95), st.sampled_from([1, 4, 8]),
       st.sampled_from(["layer", "global"]), st.integers(0, 1000))
def test_round_to_never_prunes_more_and_keeps_multiples(sizes, ratio, round_to, scope, seed):
    rng = np.random.default_rng(seed)
    scores = [rng.random(n) for n in sizes]
    plain = select_channels(scores, ratio, scope=scope)
    rounded = select_channels(scores, ratio, scope=scope, round_to=round_to)
    for n, p, r, s in zip(sizes, plain, rounded, scores):
        assert not (r & ~p).any()                       # a subset of the plain choice
        kept = n - int(r.sum())
        assert kept % round_to == 0 or kept == n
        if r.any() and (p & ~r).any():                  # what was spared scored higher than what went
            assert s[p & ~r].min() >= s[r].max()


def test_activation_stats_count_only_kept_positions():
    a = RNG.standard_normal((3, 4, 5))  # [N, S, C], channels last
    keep = RNG.random(12) < 0.5
    keep[0] = True
    masked = ActivationStats(5)
    masked.update(a, -1, keep)
    direct = ActivationStats(5)
    direct.update(a.reshape(12, 5)[keep], -1)
    np.testing.assert_array_equal(masked.mean_abs, direct.mean_abs)
    assert masked.count == keep.sum()
    # channels on axis 1: positions are the other axes in C order
    b = np.moveaxis(a, -1, 1)
    moved = ActivationStats(5)
    moved.update(b, 1, keep)
    np.testing.assert_allclose(moved.mean_abs, direct.mean_abs)
    with pytest.raises(ValueError, match="one per position"):
        ActivationStats(5).update(a, -1, keep[:5])
