"""quantize:bias_correction: the expected output shift of rounded weights removed from the bias."""

import numpy as np
import onnx
from builders import GraphBuilder, assert_valid, op_count, run

from graph_opt.data import Dataset
from graph_opt.intermediates import channel_means
from graph_opt.pass_base import PassContext
from graph_opt.passes.quantize import Quantize


def leaning_model(bias: bool = True, on_grid: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x (positive) → Relu → Conv 8→8 3×3 → Gemm-free output. Every weight of a channel sits 0.45
    of a grid step above a grid point (one weight at 127 steps sets the per-channel scale), so
    rounding to nearest pulls every weight down the same way: a systematic output shift of
    −0.45·s·ΣE[x] per channel. ``on_grid``: the weights are grid points (nothing to correct)."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 8, 6, 6])
    h = g.node("Relu", [x], name="relu")
    steps = rng.uniform(0.05, 0.2, (8, 1, 1, 1))
    codes = rng.integers(-40, 40, (8, 8, 3, 3)).astype(np.float64) + (0.0 if on_grid else 0.45)
    codes[:, 0, 0, 0] = 127.0
    w = g.const("conv.w", (codes * steps).astype(np.float32))
    ins = [h, w] + ([g.const("conv.b", rng.standard_normal(8).astype(np.float32))] if bias else [])
    y = g.node("Conv", ins, name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output(g.node("Relu", [y], ["y"], name="out"), ["N", 8, 6, 6])
    return g.build()


def _data(seed: int, n: int = 64) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset({"x": rng.uniform(0.5, 1.5, (n, 8, 6, 6)).astype(np.float32)})


def _channel_mean_error(model, cand, data) -> float:
    x = data.inputs["x"]
    ref, got = run(model, {"x": x})[0], run(cand, {"x": x})[0]
    return float(np.linalg.norm((got - ref).mean(axis=(0, 2, 3))))


def _quantize(model, data, **kw):
    return Quantize(reduce_range=False, sensitivity_snr_db=None, **kw)(model, PassContext(data=data))


def test_bias_correction_removes_the_systematic_shift():
    model = leaning_model()
    calib, test = _data(1), _data(2)
    plain = _quantize(model, calib)
    fixed = _quantize(model, calib, bias_correction=True)
    assert op_count(plain.model, "QuantizeLinear") > 0 and op_count(fixed.model, "QuantizeLinear") > 0
    assert_valid(fixed.model)
    assert any("bias_correction" in n for n in fixed.report.notes)
    e_plain, e_fixed = _channel_mean_error(model, plain.model, test), _channel_mean_error(model, fixed.model, test)
    assert e_plain > 0.5  # vacuity: the rounding really leans one way
    assert e_fixed < e_plain / 5


def test_a_layer_without_bias_gets_one():
    model = leaning_model(bias=False)
    calib, test = _data(1), _data(2)
    plain = _quantize(model, calib)
    fixed = _quantize(model, calib, bias_correction=True)
    conv = next(n for n in fixed.model.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2]
    assert len(next(n for n in model.graph.node if n.op_type == "Conv").input) == 2  # the input had none
    assert_valid(fixed.model)
    assert _channel_mean_error(model, fixed.model, test) < _channel_mean_error(model, plain.model, test) / 5


def test_weights_on_the_grid_keep_their_bias():
    model = leaning_model(on_grid=True)
    calib = _data(1)
    plain, fixed = _quantize(model, calib), _quantize(model, calib, bias_correction=True)

    def inits(m):
        return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}

    a, b = inits(plain.model), inits(fixed.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_channel_means_match_numpy():
    model = leaning_model()
    data = _data(3, n=10)
    got = channel_means(model, data, {"x": 8, "relu_out": 8}, batch_size=4)
    x = data.inputs["x"].astype(np.float64)
    np.testing.assert_allclose(got["x"].mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(got["relu_out"].mean, np.maximum(x, 0).mean(axis=(0, 2, 3)), rtol=1e-6)
    assert got["x"].shape[1:] == (8, 6, 6)


def test_tap_shares_count_the_padded_positions():
    from onnx import helper

    from graph_opt.intermediates import ChannelMean
    from graph_opt.passes.quantize.bias import tap_shares

    m = ChannelMean(np.zeros(1), (1, 1, 3, 8))
    padded = helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 1, 2, 1], strides=[1, 2])
    f = tap_shares(padded, m, (5, 3))
    np.testing.assert_allclose(f[:, 1], [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])  # 3 rows, 5 taps, pad 2
    np.testing.assert_allclose(f[2], [0.75, 1, 1])  # 8 columns, stride 2, pad 1: 4 outputs
    same = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")
    np.testing.assert_allclose(tap_shares(same, m, (3, 3))[1], [7 / 8, 1, 7 / 8])
    assert np.all(tap_shares(helper.make_node("Conv", ["x", "w"], ["y"]), m, (3, 3)) == 1)


def test_bias_correction_without_data_is_a_no_op():
    model = leaning_model(bias=False)
    plain = Quantize(reduce_range=False)(model)
    asked = Quantize(reduce_range=False, bias_correction=True)(model)
    assert op_count(asked.model, "QuantizeLinear") == 0  # weight-only: nothing to correct, no bias added
    assert asked.model.SerializeToString() == plain.model.SerializeToString()
