from collections import Counter

import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, run, small_cnn
from onnx import numpy_helper

from graph_opt.data import Dataset
from graph_opt.kernels.smooth import spread
from graph_opt.pass_base import PassContext
from graph_opt.passes import _smooth
from graph_opt.passes.quantize import Quantize
from graph_opt.passes._smooth import feature_extremes
from graph_opt.passes.smooth import Smooth

D, T = 32, 8
OUTLIERS = {3: 40.0, 11: 25.0}  # feature -> LayerNorm gamma: a transformer's outlier dimensions


def _gamma(g):
    gamma = g.rng.uniform(0.5, 1.5, D).astype(np.float32)
    for j, v in OUTLIERS.items():
        gamma[j] = v
    return gamma


def _data(n=24, seed=1):
    return Dataset({"x": np.random.default_rng(seed).standard_normal((n, T, D)).astype(np.float32)})


def _ln(g, x, *, decomposed=False):
    gamma, beta = _gamma(g), (g.rng.standard_normal(D) * 0.1).astype(np.float32)
    if not decomposed:
        return g.node("LayerNormalization", [x, g.const("ln.g", gamma), g.const("ln.b", beta)], ["h"],
                      name="ln", axis=-1, epsilon=1e-5)
    # as exporters write it: (x - mean) / sqrt(var + eps) * gamma + beta
    mean = g.node("ReduceMean", [x], axes=[-1], keepdims=1)
    c = g.node("Sub", [x, mean])
    var = g.node("ReduceMean", [g.node("Mul", [c, c])], axes=[-1], keepdims=1)
    n = g.node("Div", [c, g.node("Sqrt", [g.node("Add", [var, g.const("eps", np.array(1e-5, np.float32))])])])
    return g.node("Add", [g.node("Mul", [n, g.const("ln.g", gamma)], name="ln_mul"), g.const("ln.b", beta)], ["h"],
                  name="ln_add")


def qkv_model(*, decomposed=False, residual=False, seed=0):
    """x → LayerNorm (outlier gammas) → h → Q, K, V projections, summed (and + h when `residual`)."""
    g = GraphBuilder(seed=seed)
    h = _ln(g, g.input("x", ["N", T, D]), decomposed=decomposed)
    outs = [g.node("MatMul", [h, g.weight(f"w{p}", (D, D), 0.2)], name=p) for p in "qkv"]
    y = g.node("Add", [g.node("Add", outs[:2]), outs[2]])
    if residual:
        y = g.node("Add", [y, h], name="residual")
    g.node("Identity", [y], ["y"])
    g.output("y", ["N", T, D])
    return g.build()


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


def _assert_float_parity(model, out, data):
    ref, got = run(model, data.inputs)[0], run(out, data.inputs)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _input_of(model, node_name):
    return next(n.input[0] for n in model.graph.node if n.name == node_name)


def test_layernorm_feeding_qkv_takes_one_scale_for_all_three():
    model, data = qkv_model(), _data()
    before = feature_extremes(model, data, {"h": D})["h"]
    assert spread(before) > 10  # vacuity: the input really has outlier features
    result = Smooth()(model, PassContext(data=data))
    out = result.model
    assert result.modified and len(result.report.rewritten) == 1
    entry = result.report.rewritten[0]
    assert entry["tensor"] == "h" and entry["into"] == "ln" and entry["muls"] == 0
    assert sorted(entry["layers"]) == ["k", "q", "v"]
    assert _ops(out) == _ops(model)  # exact fold: no node added
    assert_valid(out)
    _assert_float_parity(model, out, data)
    old, new = _weights(model), _weights(out)
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    s = old["ln.g"] / new[ln.input[1]]  # gamma' = gamma / s
    np.testing.assert_allclose(old["ln.b"] / s, new[ln.input[2]], rtol=1e-5, atol=1e-7)
    for p in "qkv":  # every projection's rows scaled by the same s
        w = new[next(n.input[1] for n in out.graph.node if n.name == p)]
        np.testing.assert_allclose(w, old[f"w{p}"] * s[:, None], rtol=1e-5, atol=1e-7)
    assert s[3] > 2 * np.median(s)  # the outliers moved into the weights
    after = feature_extremes(out, data, {"h": D})["h"]
    assert spread(after) < spread(before) / 2
    assert entry["spread_after"] < entry["spread_before"]
    assert not {"ln.g", "ln.b", "wq", "wk", "wv"} & set(new)  # the replaced constants are gone


def test_decomposed_layernorm_folds_into_its_gamma_and_beta():
    model, data = qkv_model(decomposed=True), _data()
    result = Smooth()(model, PassContext(data=data))
    out = result.model
    assert [e["into"] for e in result.report.rewritten] == ["ln_add"]
    assert _ops(out) == _ops(model)
    assert_valid(out)
    _assert_float_parity(model, out, data)
    old, new = _weights(model), _weights(out)
    mul = next(n for n in out.graph.node if n.name == "ln_mul")
    s = old["ln.g"] / new[mul.input[1]]
    assert s[3] > 2 * np.median(s)


def _chain(gemm=False):
    """x → MatMul(W0) + b0 (an outlier column) → MatMul(W1) → y; or the same with Gemm (transB=1)."""
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", D])
    w0 = g.rng.standard_normal((D, D)).astype(np.float32) * 0.2
    w0[:, 5] *= 60.0  # the producer writes an outlier feature
    if gemm:
        h = g.node("Gemm", [x, g.const("w0", w0.T.copy()), g.weight("b0", (D,))], ["h"], name="first", transB=1)
        y = g.node("Gemm", [h, g.weight("w1", (8, D)), g.weight("b1", (8,))], ["y"], name="second", transB=1)
    else:
        h = g.node("Add", [g.node("MatMul", [x, g.const("w0", w0)], name="first"), g.weight("b0", (D,))], ["h"],
                   name="bias")
        y = g.node("MatMul", [h, g.weight("w1", (D, 8))], ["y"], name="second")
    g.output(y, ["N", 8])
    return g.build(), Dataset({"x": np.random.default_rng(2).standard_normal((32, D)).astype(np.float32)})


@pytest.mark.parametrize("gemm", [False, True])
def test_a_preceding_layer_takes_one_over_s_in_its_columns_and_bias(gemm):
    model, data = _chain(gemm)
    result = Smooth()(model, PassContext(data=data))
    out = result.model
    assert [e["tensor"] for e in result.report.rewritten] == ["h"]
    assert result.report.rewritten[0]["into"] == ("first" if gemm else "bias")
    assert _ops(out) == _ops(model)
    assert_valid(out)
    _assert_float_parity(model, out, data)
    old, new = _weights(model), _weights(out)
    first = next(n for n in out.graph.node if n.name == "first")
    w0 = new[first.input[1]]
    s = (old["w0"] / w0)[5] if gemm else (old["w0"] / w0)[:, 5]
    assert np.allclose(s, s[0])  # one factor per output column
    assert s[0] > 1


def test_op_types_limits_the_layers_that_take_s():
    model, data = _chain(gemm=True)
    assert Smooth()(model, PassContext(data=data)).modified
    result = Smooth(op_types=("MatMul",))(model, PassContext(data=data))
    assert not result.modified and not result.report.skipped


def test_post_ln_residual_reader_is_skipped_with_the_reason_or_restored_by_a_mul():
    model, data = qkv_model(residual=True), _data()
    skipped = Smooth()(model, PassContext(data=data))
    assert not skipped.modified
    assert [s.node for s in skipped.report.skipped] == ["h"]
    assert "also read by residual" in skipped.report.skipped[0].reason
    assert skipped.model.SerializeToString() == model.SerializeToString()
    result = Smooth(unfoldable="mul")(model, PassContext(data=data))
    out = result.model
    assert result.report.rewritten[0]["muls"] == 1 and any("1 Mul node(s) added" in n for n in result.report.notes)
    assert _ops(out) == _ops(model) + Counter({"Mul": 1})
    assert_valid(out)
    _assert_float_parity(model, out, data)
    # the layers read the smoothed tensor, the residual Add gets h back under its own name
    assert _input_of(out, "q") != "h" and "h" in next(n for n in out.graph.node if n.name == "residual").input


def test_a_producer_that_cannot_absorb_the_scale_is_skipped_or_gets_a_mul():
    g = GraphBuilder(seed=4)
    h = g.node("Relu", [g.input("x", ["N", T, D])], ["h"], name="act")
    g.node("MatMul", [h, g.weight("w", (D, D), 0.2)], ["y"], name="proj")
    g.output("y", ["N", T, D])
    model = g.build()
    values = np.abs(_data().inputs["x"])
    values[:, :, 7] *= 50
    data = Dataset({"x": values})
    skipped = Smooth()(model, PassContext(data=data))
    assert not skipped.modified
    assert skipped.report.skipped[0].reason.startswith("producer Relu: 1/s cannot be folded")
    result = Smooth(unfoldable="mul")(model, PassContext(data=data))
    out = result.model
    assert result.modified and _ops(out) == _ops(model) + Counter({"Mul": 1})
    assert_valid(out)
    _assert_float_parity(model, out, data)


def test_a_shared_weight_keeps_its_layer_out_and_the_tensor_is_skipped():
    g = GraphBuilder(seed=5)
    h = _ln(g, g.input("x", ["N", T, D]))
    w = g.weight("w", (D, D), 0.2)
    a = g.node("MatMul", [h, w], name="a")
    b = g.node("MatMul", [g.node("Relu", [a]), w], name="b")  # the same weight, elsewhere
    g.output(g.node("Identity", [b], ["y"]), ["N", T, D])
    model = g.build()
    result = Smooth()(model, PassContext(data=_data()))
    assert not result.modified
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert reasons["h"] == "no reader takes s: a (weight is shared with another node)"


def test_min_spread_skips_tensors_without_outliers():
    model, data = qkv_model(), _data()
    result = Smooth(min_spread=1e6)(model, PassContext(data=data))
    assert not result.modified
    assert "no outliers" in result.report.skipped[0].reason


def test_without_data_seeded_random_inputs_stand_in_and_say_so():
    model = qkv_model()
    result = Smooth()(model, PassContext())
    assert result.modified and any("seeded random inputs" in n for n in result.report.notes)
    _assert_float_parity(model, result.model, _data())


def test_options_are_validated():
    for bad in ({"alpha": 1.5}, {"min_spread": 0.5}, {"max_samples": 0}, {"unfoldable": "maybe"},
                {"op_types": ("Conv",)}, {"op_types": ()}, {"scope": "cnn"}):
        with pytest.raises(ValueError):
            Smooth(**bad)


def test_int8_after_smooth_loses_less_than_int8_alone():
    model, data = qkv_model(), _data(n=32)
    smoothed = Smooth(alpha=0.5)(model, PassContext(data=data)).model
    q = Quantize(target="x86-avx512-vnni", sensitivity_snr_db=None, smooth="off")
    plain = q(model, PassContext(data=data)).model
    both = q(smoothed, PassContext(data=data)).model
    ref = run(model, data.inputs)[0].astype(np.float64)

    def err(m):
        return float(np.mean((run(m, data.inputs)[0] - ref) ** 2) / np.mean(ref ** 2))

    # one activation scale for h: the 40x feature coarsens every other feature's grid without smoothing
    assert err(both) < 0.6 * err(plain), (err(both), err(plain))


def attention_model(*, residual=True, seed=0):
    """One transformer block: x → LayerNorm (outlier gammas) → h → Q, K, V; softmax(Q·Kᵀ/√D)·V → the
    output projection (+ h when `residual`, as a post-LN encoder adds it)."""
    g = GraphBuilder(seed=seed)
    h = _ln(g, g.input("x", ["N", T, D]))
    q, k, v = (g.node("MatMul", [h, g.weight(f"w{p}", (D, D), 0.2)], name=p) for p in "qkv")
    scores = g.node("Mul", [g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])], name="qk"),
                            g.const("inv_sqrt_d", np.array(D ** -0.5, np.float32))])
    mixed = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v], ["mixed"], name="av")
    y = g.node("MatMul", [mixed, g.weight("wo", (D, D), 0.2)], name="o")
    if residual:
        y = g.node("Add", [y, h], name="residual")
    g.node("Identity", [y], ["y"])
    g.output("y", ["N", T, D])
    return g.build()


# A named target (no latency gate: deterministic plans) and every layer int8.
FIXED = {"target": "x86-avx512-vnni", "sensitivity_snr_db": None}


def _rel_err(model, out, data):
    ref = run(model, data.inputs)[0].astype(np.float64)
    return float(np.mean((run(out, data.inputs)[0] - ref) ** 2) / np.mean(ref ** 2))


def test_quantize_smooths_a_transformer_by_default_and_says_so():
    model, data = attention_model(), _data(n=32)
    assert spread(feature_extremes(model, data, {"h": D})["h"]) > 10  # vacuity: outlier features to move
    assert Quantize().smooth == "auto"
    default = Quantize(**FIXED)(model, PassContext(data=data))
    plain = Quantize(**FIXED, smooth="off")(model, PassContext(data=data))
    assert_valid(default.model)
    assert not any(n.startswith("smooth") for n in plain.report.notes)  # off says nothing and does nothing
    # h (read by the residual Add too) and the attention output (written by a MatMul of two
    # activations) cannot absorb 1/s: one Mul each, as the note says
    assert any(n.startswith("smooth: ") and "2 Mul node(s) added" in n and "2 tensor(s) smoothed" in n
               for n in default.report.notes), default.report.notes
    assert _ops(default.model)["Mul"] == _ops(plain.model)["Mul"] + 2
    weights = {e["node"] for e in default.report.rewritten if e.get("weight")}
    assert weights == {e["node"] for e in plain.report.rewritten if e.get("weight")} >= {"q", "k", "v", "o"}
    # one activation scale for h: the 40x features coarsen every other feature's grid without smoothing
    assert _rel_err(model, default.model, data) < 0.6 * _rel_err(model, plain.model, data)


def test_quantize_default_leaves_a_model_without_attention_as_smooth_off_does(monkeypatch):
    """A CNN's classifier MatMul whose input has outlier features: smooth could move them (vacuity),
    the default leaves them, bit for bit as smooth=off, and streams no statistics for it."""
    g = GraphBuilder(seed=8)
    x = g.input("x", ["N", 4, 8, 8])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [g.conv(x, 4, D, 3)])])], axis=1)
    g.node("MatMul", [g.node("Mul", [f, g.const("boost", np.where(np.arange(D) == 3, 40.0, 1.0).astype(np.float32))],
                                 ["h"]), g.weight("head", (D, 10), 0.2)], ["y"], name="head")
    g.output("y", ["N", 10])
    model = g.build()
    data = Dataset({"x": np.random.default_rng(2).standard_normal((16, 4, 8, 8)).astype(np.float32)})
    ctx = PassContext(data=data)
    assert Smooth(unfoldable="mul", op_types=("MatMul",))(model, ctx).modified  # vacuity: smooth=alpha would fire
    scoped = Smooth(unfoldable="mul", op_types=("MatMul",), scope="transformer")(model, ctx)
    assert not scoped.modified and [s.node for s in scoped.report.skipped] == ["h"]
    assert "no attention" in scoped.report.skipped[0].reason

    def no_stream(*args, **kwargs):
        raise AssertionError("smooth streamed statistics for a model it leaves alone")

    monkeypatch.setattr(_smooth, "feature_extremes", no_stream)
    default = Quantize(**FIXED)(model, ctx)
    off = Quantize(**FIXED, smooth="off")(model, ctx)
    assert default.report.rewritten  # the model was quantized
    assert default.model.SerializeToString(deterministic=True) == off.model.SerializeToString(deterministic=True)
    assert any(n.startswith("smooth: ") and "no attention" in n for n in default.report.notes)


def test_quantize_default_leaves_a_cnn_alone():
    model = small_cnn()
    data = Dataset({"x": np.random.default_rng(3).standard_normal((16, 3, 16, 16)).astype(np.float32)})
    default = Quantize(**FIXED)(model, PassContext(data=data))
    off = Quantize(**FIXED, smooth="off")(model, PassContext(data=data))
    assert default.report.rewritten
    assert default.model.SerializeToString(deterministic=True) == off.model.SerializeToString(deterministic=True)


def test_quantize_smooth_alpha_smooths_any_model_and_is_validated():
    model, data = qkv_model(), _data(n=32)  # projections without attention: auto leaves them
    auto = Quantize(**FIXED)(model, PassContext(data=data))
    plain = Quantize(**FIXED, smooth="off")(model, PassContext(data=data))
    assert auto.model.SerializeToString(deterministic=True) == plain.model.SerializeToString(deterministic=True)
    smoothed = Quantize(**FIXED, smooth=0.5)(model, PassContext(data=data))  # an alpha: asked for, no scope
    assert_valid(smoothed.model)
    assert any(n.startswith("smooth: ") and "1 tensor(s) smoothed" in n for n in smoothed.report.notes)
    assert len(smoothed.report.rewritten) == len(plain.report.rewritten)
    assert _rel_err(model, smoothed.model, data) < 0.6 * _rel_err(model, plain.model, data)
    with pytest.raises(ValueError, match="smooth must be"):
        Quantize(smooth=2.0)


@pytest.mark.parametrize("form", ["torchscript", "dynamo"])
def test_an_exported_gelu_takes_one_over_s_in_its_constant(form):
    """GELU as the two exporters write it: ((x·(1 + erf(x/√2)))·0.5) or x·(0.5·(1 + erf(x/√2)))."""
    g = GraphBuilder(seed=6)
    x = g.input("x", ["N", T, D])
    e = g.node("Add", [g.node("Erf", [g.node("Div", [x, g.const("sqrt2", np.array(np.sqrt(2), np.float32))])]),
                       g.const("one", np.array(1, np.float32))])
    half = g.const("half", np.array(0.5, np.float32))
    if form == "torchscript":
        h = g.node("Mul", [g.node("Mul", [x, e]), half], ["h"], name="gelu")
    else:
        h = g.node("Mul", [x, g.node("Mul", [half, e])], ["h"], name="gelu")
    g.node("MatMul", [h, g.weight("w", (D, D), 0.2)], ["y"], name="proj")
    g.output("y", ["N", T, D])
    model = g.build()
    values = _data().inputs["x"]
    values[:, :, 9] *= 30
    data = Dataset({"x": values})
    result = Smooth()(model, PassContext(data=data))
    out = result.model
    assert [e["into"] for e in result.report.rewritten] == ["gelu"]
    assert _ops(out) == _ops(model)
    assert_valid(out)
    _assert_float_parity(model, out, data)
    assert "half" not in _weights(out)  # the scalar 0.5 became 0.5/s, one per feature


def test_a_constant_shared_by_two_producers_is_copied_for_each():
    """Two dynamo-style GELUs reading one 0.5 (exporters deduplicate constants), each feeding a layer."""
    g = GraphBuilder(seed=7)
    x = g.input("x", ["N", T, D])
    half = g.const("half", np.array(0.5, np.float32))
    outs = []
    for i in range(2):
        a = g.node("Add", [x, g.weight(f"shift{i}", (D,), 0.1)])
        h = g.node("Mul", [a, g.node("Mul", [half, g.node("Sigmoid", [a])])], [f"h{i}"], name=f"gate{i}")
        outs.append(g.node("MatMul", [h, g.weight(f"w{i}", (D, D), 0.2)], name=f"proj{i}"))
    g.node("Add", outs, ["y"])
    g.output("y", ["N", T, D])
    model = g.build()
    values = _data().inputs["x"]
    values[:, :, 9] *= 30
    data = Dataset({"x": values})
    result = Smooth()(model, PassContext(data=data))
    out = result.model
    assert sorted(e["into"] for e in result.report.rewritten) == ["gate0", "gate1"]
    assert _ops(out) == _ops(model)
    assert_valid(out)
    _assert_float_parity(model, out, data)
    inner = [n for n in out.graph.node if n.op_type == "Mul" and not n.name.startswith("gate")]
    assert len({n.input[0] for n in inner}) == 2 and "half" not in _weights(out)


def test_a_model_with_weights_on_disk_gets_its_new_weights_on_disk_with_the_same_values(tmp_path):
    from graph_opt import external_data as ext
    from graph_opt.model_io import load_model, save_model
    from graph_opt.stats import weights_of

    model, data = qkv_model(), _data()
    expected = Smooth()(model, PassContext(data=data)).model
    disk = load_model(save_model(model, tmp_path / "in.onnx", external_data=True), weights="disk")
    got = Smooth()(disk, PassContext(data=data)).model
    assert any(ext.on_disk(t) and ext.spill_dir().name in t.external_data[-1].value for t in got.graph.initializer)
    want = weights_of(expected)
    assert weights_of(got).keys() == want.keys()
    for name, value in weights_of(got).items():
        np.testing.assert_array_equal(value, want[name])
