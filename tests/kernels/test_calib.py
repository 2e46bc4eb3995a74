"""Tests of the streaming calibration observers: streaming equals batch, ranges on known
distributions, outliers clipped by percentile/entropy/mse but not by minmax, bounded state."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph_opt.kernels import calib, quant

FUZZ = settings(derandomize=True, max_examples=15, deadline=None, print_blob=True)
METHODS = ["minmax", "percentile", "entropy", "mse"]


def normal_upper_quantile(tail: float) -> float:
    """z with P(N(0,1) > z) = tail, by bisection on erfc (no scipy needed)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > tail:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fed(batches, bins: int = 4096) -> calib.HistogramObserver:
    obs = calib.HistogramObserver(bins)
    for b in batches:
        obs.update(b)
    return obs


def all_ranges(obs: calib.HistogramObserver) -> list[tuple[float, float]]:
    out = [obs.range(m, symmetric=sym) for m in METHODS for sym in (True, False)]
    return out + [obs.range(m, dtype="int4") for m in ("entropy", "mse")]


def reference_kl_threshold(h: np.ndarray, levels: int) -> int:
    """Bins kept by the KL criterion, straight from its definition, one candidate at a time."""
    h = h[: np.flatnonzero(h)[-1] + 1].astype(np.float64)
    best_i, best_kl = len(h), np.inf
    for i in range(len(h), levels - 1, -1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        q = np.zeros(i)
        edges = [(g * i) // levels for g in range(levels + 1)]
        for a, b in itertools.pairwise(edges):
            nonempty = h[a:b] > 0
            if nonempty.any():
                q[a:b][nonempty] = h[a:b].sum() / nonempty.sum()
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), (1 - 1e-8) * q / q.sum() + 1e-8 / i
        kl = sum(pj * np.log(pj / qj) for pj, qj in zip(p, q) if pj > 0)
        if kl < best_kl - 1e-12:
            best_i, best_kl = i, kl
    return best_i


# --------------------------------------------------------------------------- streaming == batch


def test_minmax_streaming_equals_batch_exactly():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 50)) * (i + 1) + i for i in range(10)]
    batches[4][0, 0] = np.nan
    batches[7][1, 1] = -np.inf
    obs = calib.MinMaxObserver()
    for b in batches:
        obs.update(b)
    whole = np.concatenate([b.ravel() for b in batches])
    finite = whole[np.isfinite(whole)]
    assert obs.range() == (float(finite.min()), float(finite.max()))
    assert obs.count == finite.size and obs.n_nonfinite == 2
    one = calib.MinMaxObserver()
    one.update(whole)
    assert one.range() == obs.range()
    a, b = calib.MinMaxObserver(), calib.MinMaxObserver()
    for i, batch in enumerate(batches):
        (a if i % 2 else b).update(batch)
    assert a.merge(b).range() == obs.range()


@FUZZ
@given(
    seed=st.integers(0, 2**31 - 1),
    n_batches=st.integers(1, 10),
    growth=st.sampled_from([1.0, 1.7, 10.0]),
    bins=st.sampled_from([64, 4096]),
)
def test_histogram_streaming_equals_batch(seed, n_batches, growth, bins):
    """Batches whose range grows force re-binning; the result must equal one concatenated batch."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(n_batches):
        b = rng.standard_normal(int(rng.integers(1, 3000))) * growth**i + rng.uniform(-1, 1)
        batches.append(np.maximum(b, 0) if rng.random() < 0.3 else b)  # some exact zeros
    streamed = fed(batches, bins)
    whole = fed([np.concatenate(batches)], bins)
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert streamed.bin_width == whole.bin_width
    assert (streamed.min, streamed.max) == (whole.min, whole.max)
    assert all_ranges(streamed) == all_ranges(whole)
    # Merging observers built on any split of the batches gives the same state again.
    cut = int(rng.integers(0, n_batches + 1))
    merged = fed(batches[:cut], bins).merge(fed(batches[cut:], bins))
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.n_zero == streamed.n_zero == whole.n_zero
    assert all_ranges(merged) == all_ranges(whole)


def test_histogram_ranges_within_one_bin_of_exact_batch_statistics():
    """Against statistics computed on the raw concatenated data, not on a histogram."""
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(100_000) * (1 + i / 5) for i in range(10)]
    obs = fed(batches)
    x = np.abs(np.concatenate(batches))
    t = obs.range("percentile", percentile=99.9)[1]
    assert abs(t - np.percentile(x, 99.9)) <= obs.bin_width
    whole = np.concatenate(batches)
    assert obs.range("minmax") == (float(whole.min()), float(whole.max()))


def test_rebinning_is_exact_even_for_extreme_magnitudes():
    batches = [
        np.array([-1e-310, 3e-300]),
        np.array([-2.0, 0.0, 5e-324]),
        np.array([1e300, -7.5e299]),
    ]
    np.testing.assert_array_equal(fed(batches).counts, fed([np.concatenate(batches)]).counts)
    assert fed(batches).counts.sum() == 7


def test_state_is_bounded_independent_of_batches():
    obs = calib.HistogramObserver(1024)
    rng = np.random.default_rng(2)
    sizes = []
    for i in range(50):
        obs.update(rng.standard_normal(1000) * (i + 1))
        sizes.append(sum(v.nbytes for v in vars(obs).values() if isinstance(v, np.ndarray)))
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 1024 * 8


# --------------------------------------------------------------------------- known distributions


def test_uniform_all_methods_near_a():
    a = 2.5
    x = np.random.default_rng(3).uniform(-a, a, 1_000_000)
    obs = fed(np.array_split(x, 10))
    lo, hi = obs.range("minmax")
    assert lo == pytest.approx(-a, rel=1e-3) and hi == pytest.approx(a, rel=1e-3)
    assert obs.range("percentile", percentile=99.99)[1] == pytest.approx(
        a * 0.9999, abs=2 * obs.bin_width
    )
    for method in ("entropy", "mse"):
        for symmetric in (True, False):
            lo, hi = obs.range(method, symmetric=symmetric)
            assert hi == pytest.approx(a, rel=0.02) and lo == pytest.approx(-a, rel=0.02), (
                method,
                symmetric,
            )


def test_gaussian_percentile_is_the_normal_quantile():
    x = np.random.default_rng(4).standard_normal(2_000_000)
    obs = fed(np.array_split(x, 10))
    z = normal_upper_quantile(0.0001 / 2)  # 99.99 % of |x| <=> 0.005 % in each tail: 3.8906
    lo, hi = obs.range("percentile", percentile=99.99)
    assert hi == pytest.approx(z, abs=0.05) and lo == -hi
    lo, hi = obs.range("percentile", percentile=99.99, symmetric=False)  # tails split evenly
    assert hi == pytest.approx(z, abs=0.08) and lo == pytest.approx(-z, abs=0.08)
    lo, hi = obs.range("percentile", percentile=99.0)
    assert hi == pytest.approx(normal_upper_quantile(0.005), abs=0.02)


def expected_gaussian_mse(t: float, steps: int) -> float:
    """Expected squared error of a symmetric quantizer with clip t on N(0, 1), Δ²/12 inside."""
    tail = 0.5 * math.erfc(t / math.sqrt(2))
    pdf = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    clip = 2 * ((1 + t * t) * tail - t * pdf)  # 2 ∫_t^∞ (x - t)² φ(x) dx
    return clip + (1 - 2 * tail) * (t / steps) ** 2 / 12


@pytest.mark.parametrize("dtype,tol", [("int4", 0.04), ("int8", 0.25)])
def test_gaussian_mse_threshold_matches_the_analytic_optimum(dtype, tol):
    steps = quant.symmetric_steps(dtype)
    grid = np.linspace(0.5, 6.0, 5501)
    t_star = grid[np.argmin([expected_gaussian_mse(t, steps) for t in grid])]
    x = np.random.default_rng(5).standard_normal(1_000_000)
    t = fed(np.array_split(x, 4)).range("mse", dtype=dtype)[1]
    # int8's optimum sits far in the tail (~4σ) where a finite sample is thin, hence the wider
    # tolerance; int4's (~2.5σ) is well sampled.
    assert t == pytest.approx(t_star, abs=tol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_the_definition_computed_candidate_by_candidate(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(20_000) * rng.uniform(0.5, 2)
    x[:3] = rng.uniform(5, 40, 3) * np.sign(rng.standard_normal(3))  # a few outliers
    obs = fed([x], bins=256)
    counts, _ = obs.histogram()
    folded = counts[256:] + counts[:256][::-1]
    for levels, dtype in [(128, "int8"), (8, "int4")]:
        want = reference_kl_threshold(folded, levels) * obs.bin_width
        lo, hi = obs.range("entropy", dtype=dtype)
        assert hi == pytest.approx(min(want, obs.max)) and lo == pytest.approx(max(-want, obs.min))


def test_gaussian_entropy_clips_inside_the_observed_range():
    x = np.random.default_rng(6).standard_normal(1_000_000)
    obs = fed([x])
    t8 = obs.range("entropy")[1]
    t4 = obs.range("entropy", dtype="int4")[1]
    assert 3.0 < t8 <= obs.max and 1.5 < t4 < t8  # fewer levels: clip harder


def test_outliers_clipped_by_percentile_entropy_mse_but_not_minmax():
    rng = np.random.default_rng(7)
    n, big = 1_000_000, 1000.0
    x = rng.standard_normal(n)
    x[rng.integers(0, n)] = big  # one huge outlier
    obs = fed(np.array_split(x, 10))
    assert obs.range("minmax")[1] == big
    assert obs.range("percentile")[1] < 5.0
    assert obs.range("entropy")[1] < big / 10
    # MSE weighs the outlier squared: its optimum is analytic here. With Δ = T/127 the noise is
    # T²/(12·127²) per value and the clipped outlier costs (big − T)²/n, so
    # T* = big / (1 + n / (12·127²)) ≈ 0.16·big.
    t_star = big / (1 + n / (12 * 127**2))
    t = obs.range("mse")[1]
    assert t < big / 4 and t == pytest.approx(t_star, abs=3 * obs.bin_width)
    for method in ("percentile", "entropy"):
        lo, hi = obs.range(method, symmetric=False)
        assert hi < big / 10 and lo < 0, method
    # Asymmetric, the grid spends no levels on a negative side as wide as the outlier, so the
    # noise is lower and MSE keeps more: with Δ = (hi − lo)/255 the optimum in hi solves
    # a·(hi − lo) = big − hi, a = (values inside [lo, hi])/(12·255²), i.e. hi* ≈ 0.44·big.
    lo, hi = obs.range("mse", symmetric=False)
    a = np.count_nonzero((x >= lo) & (x <= hi)) / (12 * 255**2)
    assert hi < big / 2 and hi == pytest.approx((big + a * lo) / (1 + a), abs=3 * obs.bin_width)
    # Negative outliers are clipped on their own side too.
    obs_neg = fed([-x])
    assert obs_neg.range("percentile", symmetric=False)[0] > -5.0
    assert obs_neg.range("entropy", symmetric=False)[0] > -big / 10


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_mse_range_nearly_minimizes_the_actual_quantization_error(symmetric, dtype):
    """Fake-quantize the real data with the chosen range and with many other ranges."""
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.gamma(2.0, 1.0, 150_000) - 1.0, -rng.exponential(0.3, 50_000)])
    obs = fed(np.array_split(x, 5))
    qdtype = dtype if symmetric else ("uint8" if dtype == "int8" else "uint4")

    def actual_mse(lo: float, hi: float) -> float:
        p = quant.compute_params((lo, hi), qdtype, symmetric=symmetric)
        return float(np.mean((quant.fake_quantize(x, p) - x) ** 2))

    chosen = actual_mse(*obs.range("mse", symmetric=symmetric, dtype=qdtype))
    others = [
        obs.range(m, symmetric=symmetric, dtype=qdtype) for m in ("minmax", "percentile", "entropy")
    ]
    others += [(-rng.uniform(0, -x.min()), rng.uniform(0, x.max())) for _ in range(60)]
    best_other = min(actual_mse(lo, hi) for lo, hi in others)
    assert chosen <= best_other * 1.03


def test_relu_output_one_sided_ranges_and_zero_spike_ignored():
    x = np.maximum(np.random.default_rng(9).standard_normal(1_000_000), 0.0)  # half exact zeros
    obs = fed(np.array_split(x, 10))
    assert obs.n_zero == np.count_nonzero(x == 0)
    for method in METHODS:
        lo, hi = obs.range(method, symmetric=False, dtype="uint8")
        assert lo == 0.0 and 3.0 < hi <= x.max(), method
    # The top 0.01 % of all values is the top 0.01 % of N(0, 1): P(Z > T) = 1e−4.
    assert obs.range("percentile", symmetric=False)[1] == pytest.approx(
        normal_upper_quantile(0.0001), abs=0.05
    )


# --------------------------------------------------------------------------- edge cases


def test_all_zero_and_empty_and_bad_arguments():
    obs = calib.HistogramObserver()
    with pytest.raises(ValueError, match="no finite value"):
        obs.range()
    obs.update(np.zeros((4, 4)))
    obs.update(np.array([np.nan, np.inf]))
    assert obs.n_nonfinite == 2 and obs.bin_width == 0.0
    for method in METHODS:
        assert obs.range(method) == (0.0, 0.0)
    obs.update(np.array([3.0, -1.0]))  # the stored zeros survive the first real grid
    assert obs.counts.sum() == 18 and obs.n_zero == 16
    with pytest.raises(ValueError, match="unknown range method"):
        obs.range("kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="percentile"):
        obs.range("percentile", percentile=0.0)
    with pytest.raises(ValueError, match="power of two"):
        calib.HistogramObserver(1000)
    with pytest.raises(ValueError, match="same bins_per_side"):
        calib.HistogramObserver(64).merge(calib.HistogramObserver(128))
    with pytest.raises(ValueError, match="only supports"):
        calib.MinMaxObserver().range("entropy")


def test_ranges_feed_compute_params():
    x = np.random.default_rng(10).standard_normal(10_000).astype(np.float32)
    obs = fed([x])
    for method in METHODS:
        p = quant.compute_params(obs.range(method), "int8")
        assert float(p.scale) > 0 and np.all(quant.fake_quantize(np.float32(0.0), p) == 0.0)


@pytest.mark.parametrize("scale_exp", [-40, 0, 20])
def test_float32_fast_path_equals_float64_path(scale_exp):
    """float32 data is binned in float32 (no float64 copy): the same state as its exact float64 copy,
    including negative values so tiny that x·2^-e underflows in float32, NaN/inf and exact zeros."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(50_000) * 2.0**scale_exp).astype(np.float32)
    x[:4] = [0.0, -0.0, np.float32(-1e-45), np.float32(-2.0**-140)]
    x[4] = np.float32(3e38) if scale_exp == 20 else x[4]  # e > 0: a down-scale that underflows
    bad = x.copy()
    bad[10:13] = [np.nan, np.inf, -np.inf]
    for data in (x, bad):
        a, b = calib.HistogramObserver(), calib.HistogramObserver()
        mm32, mm64 = calib.MinMaxObserver(), calib.MinMaxObserver()
        for part in np.array_split(data, 3):
            a.update(part)
            b.update(part.astype(np.float64))
            mm32.update(part)
            mm64.update(part.astype(np.float64))
        assert a.exponent == b.exponent and np.array_equal(a.counts, b.counts)
        assert (a.n_zero, a.n_nonfinite, a.count) == (b.n_zero, b.n_nonfinite, b.count)
        assert (mm32.min, mm32.max, mm32.count, mm32.n_nonfinite) == (mm64.min, mm64.max, mm64.count, mm64.n_nonfinite)
        assert a.counts.sum() == a.count and mm32.n_nonfinite == (3 if data is bad else 0)
        assert a.range("percentile", percentile=99.0) == b.range("percentile", percentile=99.0)
    # The tiny negatives sit in bin -1, not in bin 0 with the positive values.
    n = calib.HistogramObserver().bins_per_side
    small = calib.HistogramObserver()
    small.update(np.array([np.float32(-1e-45), 3e38], np.float32))
    assert small.exponent > 0 and small.counts[n - 1] == 1 and small.counts[n] == 0


@pytest.mark.parametrize("levels", [8, 12, 64, 100])
@pytest.mark.parametrize("kind", ["sparse", "one_sided", "heavy_tail"])
def test_vectorized_kl_search_equals_the_loop_on_gapped_and_odd_level_histograms(kind, levels):
    # The search scores every candidate at once (power-of-two `levels` by a shift, others by a
    # floor division) and gives empty groups a unit count instead of masking 0/0 afterwards:
    # both must agree with the definition, also where many groups are empty.
    rng = np.random.default_rng(levels)
    if kind == "sparse":  # few distinct values: most bins, and many groups, are empty
        x = rng.choice(rng.uniform(-3, 3, 40), 5_000)
    elif kind == "one_sided":
        x = np.abs(rng.standard_normal(5_000)) ** 2
    else:
        x = rng.standard_t(2, 5_000)
    obs = fed([x], bins=256)
    folded = obs._folded(False)
    assert (folded[: np.flatnonzero(folded)[-1]] == 0).sum() > 0  # vacuity: the histogram has gaps
    want = reference_kl_threshold(folded, levels)
    got = obs._kl_threshold(folded, levels) / obs.bin_width
    assert got == want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale_exp", [-30, 0, 14])
def test_bins_equal_the_floor_of_x_over_the_bin_width(dtype, scale_exp):
    # The update shifts the bin index into [0, 2N) in the float type before the integer cast; the
    # counts must equal floor(x / w) computed exactly (float64 division by a power of two),
    # including values on bin edges, the last bin of each side and exact zeros.
    rng = np.random.default_rng(5)
    n = 4096
    x = (rng.standard_normal(200_000) * 2.0**scale_exp).astype(dtype)
    obs = calib.HistogramObserver(n)
    obs.update(x[:1000])
    w = obs.bin_width
    edges = (np.arange(-n, n, 97) * w).astype(dtype)  # exactly on bin edges
    edges = edges[np.abs(edges.astype(np.float64)) < n * w]
    x = np.concatenate([x, edges, np.array([0.0, -0.0, (n - 1) * w, -n * w], dtype)]).astype(dtype)
    obs = calib.HistogramObserver(n)
    for part in np.array_split(x, 4):
        obs.update(part)
    w = obs.bin_width
    want = np.bincount((np.floor(x.astype(np.float64) / w) + obs.bins_per_side).astype(np.int64),
                       minlength=2 * obs.bins_per_side)
    np.testing.assert_array_equal(obs.counts, want)


def test_bins_per_side_is_capped_where_the_float32_shift_stays_exact():
    calib.HistogramObserver(1 << 22)
    with pytest.raises(ValueError, match="power of two"):
        calib.HistogramObserver(1 << 23)


@pytest.mark.parametrize("seed", range(6))
def test_screened_kl_search_equals_scoring_every_candidate_in_float64(seed):
    # The search screens every candidate in float32 and re-scores only those near the screen's
    # minimum in float64: it must pick exactly what scoring every candidate in float64 picks, and
    # the screen must stay within its stated error bound of the float64 score.
    rng = np.random.default_rng(seed)
    kind = seed % 3
    if kind == 0:
        x = np.concatenate([rng.standard_normal(300_000), rng.standard_t(2, 20_000) * 3])
    elif kind == 1:
        x = np.abs(rng.standard_normal(300_000)) ** 3
    else:
        x = rng.choice(rng.uniform(-3, 3, 300), 100_000)
    obs = fed([x])
    folded = obs._folded(False)
    for levels in (128, 256, 100):
        h = obs._trim(folded).astype(np.float64)
        scores = calib._KLScores(h, levels)
        cands = np.arange(levels, h.size + 1)
        exact = scores(cands, exact=True)
        rough = scores(cands, exact=False)
        ok = np.isfinite(exact)
        assert np.array_equal(ok, np.isfinite(rough))
        assert np.max(np.abs(rough[ok] - exact[ok])) <= scores.screen_error
        want = cands[np.flatnonzero(exact <= exact.min() + 1e-12)[-1]]
        assert obs._kl_threshold(folded, levels) == float(want) * obs.bin_width


def test_minmax_from_extremes_equals_update():
    rng = np.random.default_rng(2)
    parts = [rng.standard_normal(int(rng.integers(1, 500))).astype(np.float32) for _ in range(5)]
    a, b = calib.MinMaxObserver(), calib.MinMaxObserver()
    for p in parts:
        a.update(p)
        b.update_extremes(float(p.min()), float(p.max()), p.size)
    b.update_extremes(0.0, 0.0, 0)  # an empty batch changes nothing
    assert (a.min, a.max, a.count) == (b.min, b.max, b.count)
    with pytest.raises(ValueError, match="finite"):
        b.update_extremes(float("nan"), 1.0, 3)
    with pytest.raises(TypeError, match="values"):
        calib.HistogramObserver().update_extremes(0.0, 1.0, 2)


def test_minmax_mapped_through_a_nondecreasing_function_equals_observing_its_values():
    x = np.random.default_rng(5).standard_normal(1000).astype(np.float32) * 4
    src = calib.MinMaxObserver()
    src.update(x)
    for f, fx in ((lambda v: max(v, 0.0), np.maximum(x, 0)), (lambda v: min(max(v, -1.0), 2.0), np.clip(x, -1, 2))):
        ref = calib.MinMaxObserver()
        ref.update(fx)
        got = src.mapped(f)
        assert (got.min, got.max, got.count) == (ref.min, ref.max, ref.count)
    assert calib.MinMaxObserver().mapped(abs).count == 0  # nothing seen, nothing mapped
    with pytest.raises(ValueError, match="decreases"):
        src.mapped(lambda v: -v)


# -- per-feature floor (feature_axis)


def outlier_feature_batches(rng, n_batches=4, per_batch=8, tokens=128, features=256, level=20.0):
    """[samples, tokens, features] hidden states, N(0, 1) but for feature 3 of one token (any),
    near `level` in every sample (a transformer's outlier dimension): 1 value in 32768, a tail
    that percentile (99.99) and entropy clip when the values are pooled."""
    out = []
    for _ in range(n_batches):
        b = rng.standard_normal((per_batch, tokens, features))
        b[np.arange(per_batch), rng.integers(0, tokens, per_batch), 3] = level + 0.5 * rng.standard_normal(per_batch)
        out.append(b.astype(np.float32))
    return out


def fed_features(batches, axis):
    obs = calib.HistogramObserver(feature_axis=axis)
    for b in batches:
        obs.update(b)
    return obs


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_feature_floor_keeps_a_feature_large_on_every_sample(method):
    rng = np.random.default_rng(3)
    batches = outlier_feature_batches(rng)
    x = np.concatenate(batches)
    floor = x[:, :, 3].max(axis=1).min()  # the value feature 3 reaches in every sample
    pooled = fed(batches).range(method, symmetric=False)
    kept = fed_features(batches, -1).range(method, symmetric=False)
    assert pooled[1] < floor / 2, pooled
    assert kept[1] == pytest.approx(float(floor), rel=1e-6) and kept[0] == pooled[0]
    lo, hi = fed_features(batches, -1).range(method, symmetric=True)
    assert hi == pytest.approx(float(floor), rel=1e-6) and lo == x.min()  # [-T, T] ∩ [min, max]
    # minmax never clips, so it has nothing to keep; mse weighs the feature's squared distance
    # and keeps it by itself (its share is far above 1/(12·255²)), floor or not.
    assert fed_features(batches, -1).range("minmax") == fed(batches).range("minmax")
    assert fed_features(batches, -1).range("mse", symmetric=False)[1] >= floor


def test_feature_floor_still_clips_spikes_of_single_samples():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((8, 64, 256)).astype(np.float32) for _ in range(4)]
    batches[2][5, 7, 9] = 500.0  # one value of one sample: an outlier, not a feature
    for method in ("percentile", "entropy"):
        assert fed_features(batches, -1).range(method, symmetric=False) == fed(batches).range(method, symmetric=False)


def test_feature_floor_of_nchw_channels_on_axis_1():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 64, 24, 24)).astype(np.float32)
    # Channel 2 peaks at 12 at one pixel of every sample, never the same pixel twice in a row.
    x[np.arange(16), 2, rng.permutation(24)[:16], rng.integers(0, 24, 16)] = 12.0
    floor = x[:, 2].max(axis=(1, 2)).min()
    assert floor == 12.0
    assert fed_features([x], 1).range("percentile", symmetric=False)[1] == floor
    assert fed([x]).range("percentile", symmetric=False)[1] < floor / 2
    # Along the rows (axis 2) the peak moves from row to row: no row is large in every sample.
    assert fed_features([x], 2).range("percentile", symmetric=False) == fed([x]).range("percentile", symmetric=False)


def test_feature_floor_is_exact_under_streaming_and_merging():
    rng = np.random.default_rng(6)
    batches = outlier_feature_batches(rng, n_batches=5, per_batch=3)
    whole = fed_features([np.concatenate(batches)], -1)
    streamed = fed_features(batches, -1)
    merged = fed_features(batches[:2], -1).merge(fed_features(batches[2:], -1))
    assert whole.feature_top is not None and whole.range("entropy") != fed(batches).range("entropy")
    for obs in (streamed, merged):
        np.testing.assert_array_equal(obs.feature_top, whole.feature_top)
        np.testing.assert_array_equal(obs.feature_bottom, whole.feature_bottom)
        assert all_ranges(obs) == all_ranges(whole)


def test_feature_floor_skips_nan_samples_and_drops_when_the_axis_changes():
    rng = np.random.default_rng(8)
    batches = outlier_feature_batches(rng)
    clean = fed_features(batches, -1)
    poisoned = [b.copy() for b in batches]
    poisoned[1][0, 4, 3] = np.nan  # sample 0 of batch 1 says nothing about feature 3
    obs = fed_features(poisoned, -1)
    x = np.concatenate(batches)
    per_sample = x[:, :, 3].max(axis=1)
    per_sample[8] = np.inf  # the skipped sample (batch 1, sample 0)
    assert obs.feature_top[3] == pytest.approx(float(per_sample.min()))
    assert obs.n_nonfinite == 1 and clean.n_nonfinite == 0
    # A feature axis whose length changes, a 1-D batch, or axis 0 (the samples): no floor.
    changed = fed_features(batches + [rng.standard_normal((2, 64, 255)).astype(np.float32)], -1)
    assert changed.feature_top is None and changed.feature_axis is None
    for bad, axis in ((np.concatenate(batches).reshape(-1), -1), (batches[0], 0)):
        obs = fed_features([bad], axis)
        assert obs.feature_top is None
        assert obs.range("percentile") == fed([bad]).range("percentile")
    # Merging with an observer that keeps no floor drops it.
    assert fed_features(batches, -1).merge(fed(batches)).feature_top is None
