import numpy as np
import pytest

from graph_opt.kernels.smooth import MAX_SCALE, migration_scales, row_max, spread


def _case(seed=0, k=64):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, k)
    a[[3, 17]] = [60.0, 25.0]  # outlier features
    w = rng.uniform(0.05, 0.5, k)
    return a, w


def test_alpha_one_flattens_the_activation_and_alpha_zero_leaves_it_alone():
    a, w = _case()
    s1 = migration_scales(a, w, 1.0)
    np.testing.assert_allclose(a / s1, np.ones_like(a))
    s0 = migration_scales(a, w, 0.0)
    np.testing.assert_allclose(s0, 1.0 / w)  # the weights come out flat: w·s = 1
    np.testing.assert_allclose(w * s0, np.ones_like(w))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_the_migrated_ranges_follow_the_formula_and_the_spread_shrinks(alpha):
    a, w = _case()
    s = migration_scales(a, w, alpha)
    np.testing.assert_allclose(a / s, a ** (1 - alpha) * w ** (1 - alpha))
    np.testing.assert_allclose(w * s, a ** alpha * w ** alpha)
    assert spread(a / s) < spread(a)


def test_dead_or_non_finite_features_keep_scale_one_and_scales_are_bounded():
    a, w = _case()
    a[0], w[1], a[2] = 0.0, 0.0, np.nan
    a[5], w[5] = 1e30, 1e-30
    s = migration_scales(a, w, 0.5)
    assert s[0] == s[1] == s[2] == 1.0
    assert s[5] == MAX_SCALE and np.all((s >= 1 / MAX_SCALE) & (s <= MAX_SCALE))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        migration_scales(np.ones(3), np.ones(3), 1.5)
    with pytest.raises(ValueError, match="vectors"):
        migration_scales(np.ones(3), np.ones(4), 0.5)


def test_row_max_reads_the_input_features_of_either_layout():
    w = np.array([[1.0, -5.0, 2.0], [0.5, 0.25, -3.0]])  # [K=2, N=3]
    np.testing.assert_array_equal(row_max(w, 0), [5.0, 3.0])
    np.testing.assert_array_equal(row_max(w.T, 1), [5.0, 3.0])


def test_spread():
    assert spread(np.array([1.0, 1.0, 1.0])) == 1.0
    assert spread(np.array([1.0, 2.0, 40.0])) == 20.0
    assert spread(np.zeros(4)) == 1.0
    assert spread(np.array([0.0, 0.0, 3.0])) == float("inf")
