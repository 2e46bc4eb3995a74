"""kernels.equalize: cross-layer equalization numerics (ranges evened, function kept)."""

import numpy as np

from graph_opt.kernels.equalize import DEAD_RANGE, EqLayer, equalize, pair_scales, range_spread


def test_pair_scales_even_the_ranges_of_a_grouped_pair():
    rng = np.random.default_rng(0)
    first = EqLayer(rng.standard_normal((8, 4, 3, 3)) * 10.0 ** rng.uniform(-2, 2, (8, 1, 1, 1)), groups=1,
                    bias=rng.standard_normal(8))
    second = EqLayer(rng.standard_normal((6, 4, 3, 3)), groups=2)  # input channel c: group c // 4
    s = pair_scales(first, second)
    assert np.ptp(np.log10(first.output_ranges())) > 1.0  # vacuity: uneven to begin with
    out = equalize([first, second], [(0, 1)])
    assert out.converged and out.sweeps <= 2
    np.testing.assert_allclose(out.layers[0].output_ranges(), out.layers[1].input_ranges(), rtol=1e-12)
    np.testing.assert_allclose(out.scales[0], s, rtol=1e-12)
    np.testing.assert_allclose(out.layers[0].bias, first.bias / s, rtol=1e-12)
    assert np.array_equal(first.weight, EqLayer(first.weight, 1).weight)  # the inputs are left as they are


def test_equalize_preserves_the_function_of_a_relu_chain():
    rng = np.random.default_rng(1)
    layers = [EqLayer(rng.standard_normal((5, 3)) * rng.uniform(0.01, 10, (5, 1)), bias=rng.standard_normal(5)),
              EqLayer(rng.standard_normal((4, 5)) * rng.uniform(0.01, 10, (4, 1)), bias=rng.standard_normal(4)),
              EqLayer(rng.standard_normal((2, 4)))]

    def f(ls, x):
        for k, lay in enumerate(ls):
            x = x @ lay.weight.T + (0 if lay.bias is None else lay.bias)
            x = np.maximum(x, 0) if k < len(ls) - 1 else x
        return x

    x = rng.standard_normal((7, 3))
    out = equalize(layers, [(0, 1), (1, 2)])
    assert out.converged
    np.testing.assert_allclose(f(out.layers, x), f(layers, x), rtol=1e-10, atol=1e-12)
    assert range_spread(out.layers[1].output_ranges()) < range_spread(layers[1].output_ranges())


def test_zero_channels_keep_scale_one():
    first = EqLayer(np.array([[0.0, 0.0], [1.0, 2.0]]))
    second = EqLayer(np.array([[3.0, 4.0]]))
    assert pair_scales(first, second)[0] == 1.0


def test_dead_channels_keep_scale_one():
    # a channel with (near) zero weights and a bias: a huge s would blow the bias up
    w1 = np.array([[1.0, 2.0], [DEAD_RANGE * 1e-3, 0.0]])
    first = EqLayer(w1, bias=np.array([0.1, 0.5]))
    second = EqLayer(np.array([[3.0, 4.0]]))
    s = pair_scales(first, second)
    assert s[1] == 1.0 and s[0] != 1.0


def test_equalize_is_deterministic_and_converges_on_a_long_chain():
    rng = np.random.default_rng(5)
    layers = [EqLayer(rng.standard_normal((6, 6)) * rng.uniform(0.01, 100, (6, 1))) for _ in range(5)]
    pairs = [(k, k + 1) for k in range(4)]
    a, b = equalize(layers, pairs), equalize(layers, pairs)
    assert a.converged and a.sweeps > 1
    for x, y in zip(a.layers, b.layers):
        assert np.array_equal(x.weight, y.weight)
    for (i, j), s in zip(pairs, a.scales):
        np.testing.assert_allclose(a.layers[i].output_ranges(), a.layers[j].input_ranges(), rtol=1e-3)
