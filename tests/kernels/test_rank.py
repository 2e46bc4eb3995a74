"""Tests of rank selection and cost accounting: hand-counted costs, budgets that never exceed the
asked ratio, energy ranks on constructed spectra, EVBMF recovering a planted rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
from graph_opt.kernels import lowrank as lr
from graph_opt.kernels import rank as rk
from hypothesis import given, settings
from hypothesis import strategies as st

FUZZ = settings(derandomize=True, max_examples=40, deadline=None, print_blob=True)


# --------------------------------------------------------------------------------------------
# Costs (hand-counted)


def test_matmul_and_svd_costs():
    assert rk.matmul_costs(512, 256) == (131072, 131072)
    assert rk.matmul_costs(512, 256, rows=10) == (131072, 1310720)
    assert rk.svd_costs(512, 256, 32) == (24576, 24576)  # 32·(512+256)
    assert rk.svd_costs(512, 256, 32, rows=10) == rk.Cost(params=24576, macs=245760)


def test_conv_costs():
    assert rk.conv_costs(64, 32, 3, 3, (10, 10)) == (18432, 1843200)
    assert rk.conv_costs(64, 32, 3, 3, (10, 10), groups=32) == (576, 57600)


def test_tucker2_costs():
    # first 32·8 = 256, core 16·8·9 = 1152, last 16·64 = 1024.
    assert rk.tucker2_costs(64, 32, 3, 3, 16, 8, (10, 10)) == (2432, 100 * 2432)
    # Stride 2: the first 1×1 runs at the 20×20 input: 400·256 + 100·(1152 + 1024).
    assert rk.tucker2_costs(64, 32, 3, 3, 16, 8, (10, 10), in_hw=(20, 20)) == (2432, 320000)


def test_cp_costs():
    # 1×1 32·16 = 512, kh×1 16·3 = 48, 1×kw 16·3 = 48, 1×1 16·64 = 1024.
    # MACs: 20·20·512 + (10·20)·48 + (10·10)·(48 + 1024).
    assert rk.cp_costs(64, 32, 3, 3, 16, (10, 10), in_hw=(20, 20)) == (1632, 321600)
    assert rk.cp_costs(64, 32, 3, 3, 16, (10, 10)) == (1632, 163200)


def test_spatial_svd_costs():
    # kh×1: 16·32·3 = 1536 at 10×20, 1×kw: 64·16·3 = 3072 at 10×10.
    assert rk.spatial_svd_costs(64, 32, 3, 3, 16, (10, 10), in_hw=(20, 20)) == (4608, 614400)


def test_cost_params_match_factor_sizes():
    k = np.random.default_rng(0).standard_normal((8, 6, 3, 2))
    t = lr.tucker2(k, 4, 3)
    assert (
        rk.tucker2_costs(8, 6, 3, 2, 4, 3, (1, 1)).params
        == t.first.size + t.core.size + t.last.size
    )
    c = lr.cp_conv(k, 5, n_iter=10)
    n_cp = c.pointwise_in.size + c.vertical.size + c.horizontal.size + c.pointwise_out.size
    assert rk.cp_costs(8, 6, 3, 2, 5, (1, 1)).params == n_cp
    s = lr.spatial_svd(k, 4)
    assert rk.spatial_svd_costs(8, 6, 3, 2, 4, (1, 1)).params == s.vertical.size + s.horizontal.size
    f = lr.svd_factors(k.reshape(8, -1), 3)
    assert rk.svd_costs(8, 36, 3).params == f.left.size + f.right.size


# --------------------------------------------------------------------------------------------
# Ratio and energy


@pytest.mark.parametrize(
    ("full", "ratio", "expected"),
    [(64, 0.5, 32), (10, 0.3, 3), (10, 0.25, 3), (10, 1.0, 10), (10, 0.01, 1), (1, 0.5, 1)],
)
def test_rank_for_ratio(full, ratio, expected):
    assert rk.rank_for_ratio(full, ratio) == expected


@pytest.mark.parametrize(("full", "ratio"), [(0, 0.5), (10, 0.0), (10, 1.5), (10, -0.1)])
def test_rank_for_ratio_rejects(full, ratio):
    with pytest.raises(ValueError):
        rk.rank_for_ratio(full, ratio)


@pytest.mark.parametrize(
    ("energy", "expected"),
    [(0.5, 1), (9 / 14, 1), (0.65, 2), (13 / 14, 2), (0.93, 3), (1.0, 3)],
)
def test_rank_for_energy_on_constructed_spectrum(energy, expected):
    # σ² = 9, 4, 1 (total 14): cumulative shares 9/14, 13/14, 1.
    assert rk.rank_for_energy(np.array([3.0, 2.0, 1.0]), energy) == expected
    assert rk.rank_for_energy(np.array([1.0, 3.0, 2.0, 0.0, 0.0]), energy) == expected


def test_rank_for_energy_edge_cases():
    assert rk.rank_for_energy(np.zeros(4), 0.9) == 0
    assert rk.rank_for_energy(np.array([5.0, 0.0, 0.0]), 1.0) == 1
    with pytest.raises(ValueError):
        rk.rank_for_energy(np.ones(3), 0.0)


@FUZZ
@given(
    s=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30),
    energy=st.floats(0.01, 1.0),
)
def test_rank_for_energy_is_smallest_sufficient(s, energy):
    s = np.array(s)
    r = rk.rank_for_energy(s, energy)
    total = np.sum(s**2)
    if total == 0:
        assert r == 0
        return
    share = np.cumsum(np.sort(s)[::-1] ** 2) / total
    assert share[r - 1] >= energy - 1e-12
    assert r == 1 or share[r - 2] < energy - 1e-12


# --------------------------------------------------------------------------------------------
# Budgets


@FUZZ
@given(
    m=st.integers(1, 600),
    n=st.integers(1, 600),
    params_ratio=st.one_of(st.none(), st.floats(0.01, 1.0)),
    macs_ratio=st.floats(0.01, 1.0),
)
def test_svd_budget_never_exceeds_ratio_and_is_largest(m, n, params_ratio, macs_ratio):
    ref = rk.matmul_costs(m, n, rows=7)

    def cost(r: int) -> rk.Cost:
        return rk.svd_costs(m, n, r, rows=7)

    full = min(m, n)
    r = rk.rank_for_budget(cost, ref, full, params_ratio=params_ratio, macs_ratio=macs_ratio)
    assert 0 <= r <= full

    def fits(c: rk.Cost) -> bool:
        return (params_ratio is None or c.params / ref.params <= params_ratio) and (
            c.macs / ref.macs <= macs_ratio
        )

    if r:
        assert fits(cost(r))
        assert cost(r).macs / ref.macs <= macs_ratio
    if r < full:
        assert not fits(cost(r + 1))


@FUZZ
@given(
    o=st.integers(1, 96),
    i=st.integers(1, 96),
    k=st.integers(1, 5),
    hw=st.integers(1, 16),
    stride=st.integers(1, 2),
    ratio=st.floats(0.02, 1.0),
)
def test_tucker2_budget_never_exceeds_ratio(o, i, k, hw, stride, ratio):
    out_hw, in_hw = (hw, hw), (hw * stride, hw * stride)
    ref = rk.conv_costs(o, i, k, k, out_hw)
    r_out, r_in = rk.tucker2_ranks_for_budget(
        o, i, k, k, out_hw, in_hw=in_hw, params_ratio=ratio, macs_ratio=ratio
    )
    if (r_out, r_in) == (0, 0):
        # Nothing fits: not even the smallest proportional ranks.
        c = rk.tucker2_costs(o, i, k, k, -(-o // max(o, i)), -(-i // max(o, i)), out_hw, in_hw)
        assert c.params / ref.params > ratio or c.macs / ref.macs > ratio
        return
    assert 1 <= r_out <= o and 1 <= r_in <= i
    c = rk.tucker2_costs(o, i, k, k, r_out, r_in, out_hw, in_hw)
    assert c.params / ref.params <= ratio and c.macs / ref.macs <= ratio


def test_budget_requires_a_ratio_and_reports_no_fit():
    ref = rk.matmul_costs(10, 10)
    with pytest.raises(ValueError):
        rk.rank_for_budget(lambda r: rk.svd_costs(10, 10, r), ref, 10)
    assert rk.rank_for_budget(lambda r: rk.svd_costs(10, 10, r), ref, 10, params_ratio=0.1) == 0
    assert rk.rank_for_budget(lambda r: rk.svd_costs(10, 10, r), ref, 10, params_ratio=0.2) == 1


def test_max_saving_rank_is_the_break_even_limit():
    # SVD saves only when r(m+n) < mn.
    assert (
        rk.max_saving_rank(lambda r: rk.svd_costs(100, 100, r), rk.matmul_costs(100, 100), 100)
        == 49
    )
    assert (
        rk.max_saving_rank(lambda r: rk.svd_costs(512, 256, r), rk.matmul_costs(512, 256), 256)
        == 170
    )
    assert rk.max_saving_rank(lambda r: rk.svd_costs(2, 2, r), rk.matmul_costs(2, 2), 2) == 0


@pytest.mark.parametrize(
    ("r", "max_rank", "expected"),
    [
        (12, 20, 16),
        (12, 15, 12),
        (16, 16, 16),
        (17, 40, 32),
        (17, 31, 17),
        (1, 16, 16),
        (40, 64, 48),
    ],
)
def test_round_rank_rounds_up_only_within_limit(r, max_rank, expected):
    assert rk.round_rank(r, max_rank=max_rank) == expected


def test_round_rank_other_multiple_and_rejects():
    assert rk.round_rank(5, max_rank=100, multiple=8) == 8
    with pytest.raises(ValueError):
        rk.round_rank(0, max_rank=16)


# --------------------------------------------------------------------------------------------
# Empirical VBMF


def planted(seed: int, shape=(100, 80), rank=5, noise=0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    return signal + noise * rng.standard_normal(shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.1, 1.0])
def test_vbmf_recovers_planted_rank(seed, noise):
    v = planted(seed, noise=noise)
    est = rk.vbmf(v)
    assert est.rank == 5
    assert est.noise_variance == pytest.approx(noise**2, rel=0.1)
    s = np.linalg.svd(v, compute_uv=False)
    assert np.count_nonzero(s > est.threshold) == 5
    # The 5th signal value is far above the cut and the 6th (noise) below it.
    assert s[5] < est.threshold < s[4]


def test_vbmf_pure_noise_is_rank_zero():
    v = np.random.default_rng(3).standard_normal((100, 80))
    est = rk.vbmf(v)
    assert est.rank == 0
    assert est.noise_variance == pytest.approx(1.0, rel=0.1)


def test_vbmf_same_from_spectrum_and_transpose():
    v = planted(4, rank=7, noise=0.3)
    s = np.linalg.svd(v, compute_uv=False)
    a, b, c = rk.vbmf(v), rk.vbmf(s, shape=v.shape), rk.vbmf(v.T)
    assert a.rank == b.rank == c.rank == 7
    # σ̂² is a minimiser of a flat objective: equal to ~√ε, not to the last digit.
    assert a.noise_variance == pytest.approx(b.noise_variance, rel=1e-6)
    assert a.noise_variance == pytest.approx(c.noise_variance, rel=1e-6)
    assert rk.vbmf_rank(s[::-1], shape=(80, 100)) == 7


def test_vbmf_noise_free_low_rank_and_zero():
    rng = np.random.default_rng(5)
    v = rng.standard_normal((60, 4)) @ rng.standard_normal((4, 50))
    assert rk.vbmf_rank(v) == 4
    assert rk.vbmf_rank(np.zeros((6, 5))) == 0


def test_vbmf_rank_is_capped_by_evb_limit():
    # EVB never keeps more than H̄ = ⌈L/(1+α)⌉ − 1 components (here L = 80, α = 0.8: 44).
    rng = np.random.default_rng(6)
    est = rk.vbmf(rng.standard_normal((100, 60)) @ rng.standard_normal((60, 80)))
    assert est.max_rank == math.ceil(80 / 1.8) - 1 == 44
    assert est.rank <= est.max_rank


def test_vbmf_rejects_bad_input():
    with pytest.raises(ValueError):
        rk.vbmf(np.ones(5))
    with pytest.raises(ValueError):
        rk.vbmf(np.ones(5), shape=(10, 8))
    with pytest.raises(ValueError):
        rk.vbmf(np.ones((2, 2, 2)))


def test_tucker2_vbmf_ranks_recover_planted_tucker_ranks():
    rng = np.random.default_rng(7)
    core = rng.standard_normal((4, 3, 3, 3))
    k = np.einsum(
        "abyx,oa,ib->oiyx", core, rng.standard_normal((32, 4)), rng.standard_normal((24, 3))
    )
    k = k + 0.05 * rng.standard_normal(k.shape)
    assert rk.tucker2_vbmf_ranks(k) == (4, 3)


def test_vbmf_threshold_constant_for_square_matrices():
    # α = 1: τ̲ ≈ 2.5129 (Nakajima et al. 2013), so the cut is γ² > M σ² (1 + τ̲)(1 + 1/τ̲).
    est = rk.vbmf(np.random.default_rng(8).standard_normal((64, 64)))
    x_bar = est.threshold**2 / (64 * est.noise_variance)
    assert x_bar == pytest.approx((1 + 2.5129) * (1 + 1 / 2.5129), rel=1e-4)


@pytest.mark.parametrize(("factor", "expected"), [(0.98, 0), (1.02, 1)])
@pytest.mark.parametrize("shape", [(100, 80), (64, 64), (40, 200)])
def test_vbmf_keeps_a_component_only_above_the_threshold(factor, expected, shape):
    s = np.linalg.svd(np.random.default_rng(9).standard_normal(shape), compute_uv=False)
    s[0] = factor * rk.vbmf(s, shape).threshold  # move the top value to just below/above the cut
    est = rk.vbmf(s, shape)
    assert est.rank == expected == np.count_nonzero(s > est.threshold)
