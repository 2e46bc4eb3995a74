"""Streaming ridge least squares, bias-correction accumulators and im2col: streaming equals one
batch, ridge → 0 is numpy's lstsq, the residual from the statistics is the real one, and a conv
computed as im2col rows @ weight matrices equals a direct convolution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph_opt.kernels import lstsq

FUZZ = settings(derandomize=True, max_examples=20, deadline=None, print_blob=True)


def regression(seed: int, rows: int = 300, d: int = 6, m: int = 3, groups: int = 1, offset: float = 2.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, groups, d)) + offset
    w = rng.standard_normal((groups, d, m))
    y = np.einsum("rgd,gdm->rgm", x, w) + rng.standard_normal((groups, m))
    y = y + 0.1 * rng.standard_normal((rows, groups, m))
    return x, y


def fed(x, y, splits, **kw) -> lstsq.LstsqAccumulator:
    acc = lstsq.LstsqAccumulator(x.shape[-1], y.shape[-1], groups=x.shape[1], **kw)
    bounds = [0, *sorted(splits), len(x)]
    for a, b in zip(bounds, bounds[1:]):
        acc.update(x[a:b], y[a:b])
    return acc


@FUZZ
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 299), max_size=6),
       ridge=st.sampled_from([0.0, 1e-4, 0.3]), intercept=st.booleans(), groups=st.integers(1, 3))
def test_streaming_equals_one_batch(seed, cuts, ridge, intercept, groups):
    x, y = regression(seed, groups=groups)
    one = fed(x, y, [], intercept=intercept).solve(ridge)
    many_acc = fed(x, y, cuts, intercept=intercept)
    many = many_acc.solve(ridge)
    assert many_acc.rows == len(x)
    np.testing.assert_allclose(many.weight, one.weight, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(many.bias, one.bias, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("intercept", [True, False])
def test_ridge_zero_is_numpy_lstsq_on_full_rank_data(intercept):
    x, y = regression(3, rows=400, d=8, m=4)
    sol = fed(x, y, [100, 250], intercept=intercept).solve(0.0)
    design = np.hstack([x[:, 0], np.ones((len(x), 1))]) if intercept else x[:, 0]
    ref = np.linalg.lstsq(design, y[:, 0], rcond=None)[0]
    np.testing.assert_allclose(sol.weight[0], ref[:8], rtol=1e-9, atol=1e-10)
    if intercept:
        np.testing.assert_allclose(sol.bias[0], ref[8], rtol=1e-9, atol=1e-10)
    else:
        assert not sol.bias.any()


def test_ridge_solves_the_penalized_normal_equations_and_shrinks():
    x, y = regression(5)
    acc = fed(x, y, [50])
    norms = []
    for ridge in (0.0, 0.01, 1.0, 100.0):
        sol = acc.solve(ridge)
        xc, yc = x[:, 0] - x[:, 0].mean(0), y[:, 0] - y[:, 0].mean(0)
        lam = ridge * np.mean(np.sum(xc * xc, axis=0))
        assert sol.lam[0] == pytest.approx(lam)
        np.testing.assert_allclose((xc.T @ xc + lam * np.eye(6)) @ sol.weight[0], xc.T @ yc, rtol=1e-8, atol=1e-8)
        norms.append(np.linalg.norm(sol.weight))
    assert norms == sorted(norms, reverse=True)


@FUZZ
@given(seed=st.integers(0, 2**16), intercept=st.booleans())
def test_sse_from_statistics_is_the_real_residual(seed, intercept):
    x, y = regression(seed, groups=2)
    acc = fed(x, y, [77, 150], intercept=intercept)
    rng = np.random.default_rng(seed + 1)
    for w, b in [(None, None), (rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 3))),
                 (acc.solve(0.01).weight, acc.solve(0.01).bias)]:
        pred = 0 if w is None else np.einsum("rgd,gdm->rgm", x, w)
        pred = pred + (0 if b is None else b)
        real = float(np.sum((y - pred) ** 2))
        assert acc.sse(w, b) == pytest.approx(real, rel=1e-9, abs=1e-9)


def test_the_least_squares_solution_has_the_least_sse():
    x, y = regression(11)
    acc = fed(x, y, [])
    sol = acc.solve(0.0)
    best = acc.sse(sol.weight, sol.bias)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert acc.sse(sol.weight + 1e-3 * rng.standard_normal(sol.weight.shape), sol.bias) > best


def test_groups_are_independent_problems():
    x, y = regression(2, groups=3)
    together = fed(x, y, [100]).solve(1e-3)
    for g in range(3):
        alone = fed(x[:, g:g + 1], y[:, g:g + 1], [100]).solve(1e-3)
        np.testing.assert_allclose(together.weight[g], alone.weight[0], rtol=1e-10)
        np.testing.assert_allclose(together.bias[g], alone.bias[0], rtol=1e-10)


def test_a_constant_feature_gets_no_weight_and_the_bias_carries_it():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 1, 6))
    x[:, 0, 2] = 5.0
    y = x[:, 0] @ rng.standard_normal((6, 3)) + 1.5 + 0.1 * rng.standard_normal((300, 3))
    y = y[:, None, :]
    sol = fed(x, y, [10]).solve(1e-6)
    assert np.all(sol.weight[0, 2] == 0)
    pred = np.einsum("rd,dm->rm", x[:, 0], sol.weight[0]) + sol.bias[0]
    assert np.mean((y[:, 0] - pred) ** 2) < 0.02


def test_solve_is_deterministic_and_rejects_a_negative_ridge():
    x, y = regression(9)
    a, b = fed(x, y, [3]).solve(), fed(x, y, [3]).solve()
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    with pytest.raises(ValueError):
        fed(x, y, []).solve(-1.0)
    with pytest.raises(ValueError):
        lstsq.LstsqAccumulator(3, 2).update(np.zeros((4, 2)), np.zeros((4, 2)))


def test_mean_error_accumulator():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((500, 4)) + np.array([1.0, -2.0, 0.0, 0.5])
    acc = lstsq.MeanErrorAccumulator(4)
    for part in np.array_split(e, 7):
        acc.update(part)
    np.testing.assert_allclose(acc.mean(), e.mean(0), rtol=1e-12)
    assert acc.sse() == pytest.approx(float(np.sum(e ** 2)))
    shift = np.array([0.3, -1.0, 0.2, 0.0])
    assert acc.sse(shift) == pytest.approx(float(np.sum((e - shift) ** 2)))
    assert acc.sse(acc.mean()) < acc.sse(shift) < acc.sse()


# ---------------------------------------------------------------------------------- im2col


def direct_conv(x, w, b, strides, pads, dilations, groups):
    """Reference: sum over kernel taps of strided slices of the padded input (no im2col)."""
    k = w.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + k]) for i in range(k)])
    out = [(xp.shape[2 + i] - dilations[i] * (w.shape[2 + i] - 1) - 1) // strides[i] + 1 for i in range(k)]
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    y = np.zeros((x.shape[0], w.shape[0], *out))
    for g in range(groups):
        for tap in itertools.product(*(range(s) for s in w.shape[2:])):
            sl = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilations, strides, out))
            patch = xp[(slice(None), slice(g * cg, (g + 1) * cg), *sl)]  # [N, cg, *out]
            wt = w[(slice(g * og, (g + 1) * og), slice(None), *tap)]  # [og, cg]
            y[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", patch, wt)
    return y + b.reshape(1, -1, *[1] * k)


CONV_CASES = [
    # (input spatial, kernel, strides, pads, dilations, groups, cin, cout)
    ((9, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, 5),
    ((9, 8), (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2, 6, 4),
    ((7, 7), (3, 3), (2, 2), (0, 0, 0, 0), (2, 2), 1, 3, 2),
    ((8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 6, 12),  # depthwise, multiplier 2
    ((6, 6), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, 5, 3),   # a strided 1×1: matmul over pixels
    ((11,), (3,), (2,), (1, 2), (1,), 1, 3, 4),                # Conv1d
    ((4, 5, 5), (3, 1, 2), (1, 2, 1), (1, 0, 0, 1, 0, 1), (1, 1, 2), 1, 2, 3),  # Conv3d
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{len(c[1])}d-k{c[1]}-s{c[2]}-g{c[5]}")
def test_im2col_conv_equals_a_direct_conv(case):
    spatial, kernel, strides, pads, dilations, groups, cin, cout = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cin, *spatial))
    w = rng.standard_normal((cout, cin // groups, *kernel))
    b = rng.standard_normal(cout)
    got = lstsq.conv_via_matmul(x, w, b, strides=strides, pads=pads, dilations=dilations, groups=groups)
    np.testing.assert_allclose(got, direct_conv(x, w, b, strides, pads, dilations, groups), rtol=1e-10, atol=1e-10)
    # the row views agree with each other and a row subset gathers exactly those rows
    patches = lstsq.im2col(x, kernel, strides=strides, pads=pads, dilations=dilations, groups=groups)
    rows = rng.permutation(len(patches))[:7]
    sub = lstsq.im2col(x, kernel, strides=strides, pads=pads, dilations=dilations, groups=groups, rows=rows)
    np.testing.assert_array_equal(sub, patches[rows])
    y_rows = lstsq.conv_rows(got, groups)
    np.testing.assert_allclose(y_rows, np.einsum("rgd,gdo->rgo", patches, lstsq.conv_weight_matrix(w, groups)) +
                               b.reshape(groups, -1), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(lstsq.conv_weight_from_matrix(lstsq.conv_weight_matrix(w, groups), w.shape), w)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_matches_onnxruntime(auto_pad):
    from onnx import TensorProto, helper, numpy_helper

    from graph_opt.runtime import make_session

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 8, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 4, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, strides=[3, 2], kernel_shape=[4, 3])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ref = make_session(model).run(None, {"x": x})[0]
    got = lstsq.conv_via_matmul(x, w, strides=[3, 2], auto_pad=auto_pad)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_im2col_rejects_bad_shapes():
    with pytest.raises(ValueError):
        lstsq.im2col(np.zeros((1, 3, 4, 4)), (3, 3), groups=2)
    with pytest.raises(ValueError):
        lstsq.im2col(np.zeros((1, 3, 2, 2)), (3, 3))
