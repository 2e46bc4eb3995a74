"""equalize: cross-layer equalization of Conv/Gemm chains (exact through Relu-like ops)."""

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, assert_valid, op_count, random_input, run

from graph_opt.data import Dataset
from graph_opt.kernels.equalize import range_spread
from graph_opt.pass_base import PassContext
from graph_opt.passes.equalize import Equalize
from graph_opt.passes.quantize import Quantize


def _scaled(g: GraphBuilder, name: str, w: np.ndarray) -> str:
    return g.const(name, w.astype(np.float32))


def badly_scaled_model(act: str = "Relu", seed: int = 0, decades: float = 2.0, clip_max: float = 6.0,
                       gemm: bool = False) -> onnx.ModelProto:
    """x → L1 → act → depthwise Conv → act → 1×1 Conv (or Gemm → act → Gemm → act → Gemm), where
    each middle channel c of L1 is scaled by 10^u_c (u_c uniform in ±`decades`) and the next layer
    reads it scaled back by 10^-u_c: a well-behaved function whose channels span 2·`decades`
    decades in range (what BatchNorm folding leaves in real depthwise nets)."""
    g = GraphBuilder(seed=seed)
    rng = np.random.default_rng(seed)
    c = 16
    up = 10.0 ** rng.uniform(-decades, decades, c)
    up2 = 10.0 ** rng.uniform(-decades, decades, c)

    def act_node(t: str) -> str:
        if act == "Relu6":
            lo, hi = g.const(f"lo{len(g.nodes)}", np.float32(0)), g.const(f"hi{len(g.nodes)}", np.float32(clip_max))
            return g.node("Clip", [t, lo, hi])
        if act == "LeakyRelu":
            return g.node("LeakyRelu", [t], alpha=0.1)
        if act == "PRelu":
            slope = g.const(f"slope{len(g.nodes)}", rng.uniform(0.05, 0.3, (c, 1, 1) if not gemm else (c,)).astype(np.float32))
            return g.node("PRelu", [t, slope])
        if act == "Identity":
            return g.node("Identity", [t])
        return g.node(act, [t])

    if gemm:
        x = g.input("x", ["N", 8])
        w1 = rng.standard_normal((c, 8)) * up[:, None]
        b1 = rng.standard_normal(c) * up
        h = act_node(g.node("Gemm", [x, _scaled(g, "g1.w", w1), _scaled(g, "g1.b", b1)], name="g1", transB=1))
        w2 = rng.standard_normal((c, c)) / up[:, None] * up2[None, :]  # (K, N), transB=0
        h = act_node(g.node("Gemm", [h, _scaled(g, "g2.w", w2), _scaled(g, "g2.b", rng.standard_normal(c) * up2)],
                            name="g2"))
        w3 = rng.standard_normal((4, c)) / up2[None, :]
        g.node("Gemm", [h, _scaled(g, "g3.w", w3)], ["y"], name="g3", transB=1)
        g.output("y", ["N", 4])
        return g.build()
    x = g.input("x", ["N", 8, 10, 10])
    w1 = rng.standard_normal((c, 8, 1, 1)) * up[:, None, None, None]
    h = act_node(g.node("Conv", [x, _scaled(g, "c1.w", w1), _scaled(g, "c1.b", rng.standard_normal(c) * up)],
                        name="c1", kernel_shape=[1, 1]))
    wd = rng.standard_normal((c, 1, 3, 3)) / up[:, None, None, None] * up2[:, None, None, None]
    h = act_node(g.node("Conv", [h, _scaled(g, "dw.w", wd), _scaled(g, "dw.b", rng.standard_normal(c) * up2)],
                        name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=c))
    w3 = rng.standard_normal((8, c, 1, 1)) / up2[None, :, None, None]
    g.node("Conv", [h, _scaled(g, "c3.w", w3)], ["y"], name="c3", kernel_shape=[1, 1])
    g.output("y", ["N", 8, 10, 10])
    return g.build()


def _feed(model, n=4, seed=1):
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": random_input(dims, seed=seed)}


def _weights(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- pass

@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "PRelu", "Identity"])
@pytest.mark.parametrize("gemm", [False, True], ids=["conv", "gemm"])
def test_equalize_is_exact_and_evens_the_channel_ranges(act, gemm):
    model = badly_scaled_model(act, gemm=gemm)
    result = Equalize()(model)
    assert result.modified
    out = result.model
    assert_valid(out)
    for op in ("Conv", "Gemm", act):
        assert op_count(out, op) == op_count(model, op)
    assert len(out.graph.node) == len(model.graph.node)
    rows = {r["node"]: r for r in result.report.rewritten}
    assert set(rows) == ({"g1", "g2"} if gemm else {"c1", "dw"})
    for r in rows.values():
        assert r["spread_before"] > 100  # vacuity: the input really is badly scaled
        assert r["spread_after"] < r["spread_before"] / 10
    changed = {"g1.w", "g1.b", "g2.w", "g2.b", "g3.w"} if gemm else {"c1.w", "c1.b", "dw.w", "dw.b", "c3.w"}
    assert not changed & set(_weights(out))  # rescaled weights take fresh names; the old ones are gone
    feed = _feed(model)
    ref, got = run(model, feed)[0], run(out, feed)[0]
    assert _rel_err(got, ref) < 1e-5


def test_depthwise_range_spread_drops():
    model = badly_scaled_model()
    out = Equalize()(model).model
    w = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    dw_before = range_spread(np.abs(_weights(model)["dw.w"]).reshape(16, -1).max(1))
    dw_name = next(n for n in out.graph.node if n.name == "dw").input[1]
    dw_after = range_spread(np.abs(w[dw_name]).reshape(16, -1).max(1))
    assert dw_before > 1e3 and dw_after < dw_before / 100


def test_relu6_is_skipped_with_the_reason_by_default():
    model = badly_scaled_model("Relu6")
    result = Equalize()(model)
    assert not result.modified
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert "not positively homogeneous" in reasons["c1"] and "clip=relu" in reasons["c1"]
    assert result.model.SerializeToString() == model.SerializeToString()


def test_relu6_as_relu_is_reported_lossy():
    model = badly_scaled_model("Relu6", clip_max=1e6)  # never reached: the replacement changes nothing here
    result = Equalize(clip="relu")(model)
    assert op_count(model, "Clip") == 2 and op_count(result.model, "Clip") == 0
    assert op_count(result.model, "Relu") == 2
    assert all("lossy" in r for r in result.report.rewritten)
    assert_valid(result.model)
    feed = _feed(model)
    assert _rel_err(run(result.model, feed)[0], run(model, feed)[0]) < 1e-5


def test_clip_without_upper_bound_is_homogeneous():
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 6, 6])
    lo = g.const("lo", np.float32(0))
    h = g.node("Clip", [g.conv(x, 4, 8, name="a"), lo])
    g.output(g.conv(h, 8, 4, name="b"), ["N", 4, 6, 6])
    result = Equalize()(g.build())
    assert [r["node"] for r in result.report.rewritten] == ["a"]


def _chain(extra=None, shared=False, bn=False):
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 6, 6])
    a = g.conv(x, 4, 8, name="a")
    if bn:
        a = g.bn(a, 8, name="bn")
    h = g.node("Relu", [a], name="relu")
    b = g.conv(h, 8, 4, name="b")
    outs = [b]
    if extra == "branch":
        outs.append(g.node("Sigmoid", [h], name="side"))
    if extra == "output":
        g.output(h, ["N", 8, 6, 6])
    if shared:
        g.node("Conv", [x, "a.w"], name="twin", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        outs.append("twin_out")
    for o in outs:
        g.output(o, ["N", None, 6, 6])
    return g.build()


@pytest.mark.parametrize("case, reason", [
    ({"extra": "branch"}, "branch point"),
    ({"extra": "output"}, "model output"),
    ({"shared": True}, "shared with another node"),
    ({"bn": True}, "run fold_batchnorm first"),
])
def test_skips_with_reasons(case, reason):
    model = _chain(**case)
    result = Equalize()(model)
    assert not result.modified
    assert any(reason in s.reason for s in result.report.skipped), result.report.skipped
    base = Equalize()(_chain())
    assert base.modified  # the same chain without the obstacle is equalized


def test_non_constant_weight_is_skipped():
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 6, 6])
    wa = g.input("wa", [8, 4, 3, 3])
    h = g.node("Relu", [g.node("Conv", [x, wa], name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    g.output(g.conv(h, 8, 4, name="b"), ["N", 4, 6, 6])
    result = Equalize()(g.build())
    assert not result.modified
    assert any("not a constant" in s.reason for s in result.report.skipped)


def test_pooling_between_the_layers_commutes():
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 8, 8])
    h = g.node("MaxPool", [g.node("Relu", [g.conv(x, 4, 8, name="a")])], kernel_shape=[2, 2], strides=[2, 2])
    g.output(g.conv(h, 8, 4, name="b"), ["N", 4, 4, 4])
    model = g.build()
    result = Equalize()(model)
    assert result.modified
    feed = {"x": random_input([2, 4, 8, 8])}
    assert _rel_err(run(result.model, feed)[0], run(model, feed)[0]) < 1e-5


def _data(model, n=64, seed=3):
    rng = np.random.default_rng(seed)
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return Dataset({"x": rng.standard_normal(dims).astype(np.float32)})


def test_quantizing_after_equalize_is_more_accurate():
    model = badly_scaled_model(decades=2.0)
    calib, test = _data(model, seed=3), _data(model, seed=4)
    q = Quantize(reduce_range=False, sensitivity_snr_db=None)
    plain = q(model, PassContext(data=calib)).model
    eq = Equalize()(model).model
    equalized = q(eq, PassContext(data=calib)).model
    feed = {"x": test.inputs["x"]}
    ref = run(model, feed)[0]
    e_plain, e_eq = _rel_err(run(plain, feed)[0], ref), _rel_err(run(equalized, feed)[0], ref)
    assert op_count(plain, "QuantizeLinear") > 0 and op_count(equalized, "QuantizeLinear") > 0
    assert e_plain > 0.2  # the badly scaled channels really hurt per-tensor activations
    assert e_eq < e_plain / 4


def random_chain(seed: int) -> onnx.ModelProto:
    """A seeded random Conv chain: 2-4 layers, grouped/depthwise/dense, 1×1 or 3×3, strides,
    homogeneous ops between them, channels scaled over ±2 decades."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder(seed=seed)
    c = int(rng.choice([4, 8, 12]))
    t = g.input("x", ["N", c, 9, 9])
    for k in range(int(rng.integers(2, 5))):
        groups = int(rng.choice([d for d in (1, 2, 4, c) if c % d == 0]))
        cout = int(rng.choice([4, 8, 12])) if groups == 1 else c * int(rng.choice([1, 2]))
        if cout % groups:
            groups = 1
        ks = int(rng.choice([1, 3]))
        w = rng.standard_normal((cout, c // groups, ks, ks)) * 10.0 ** rng.uniform(-2, 2, (cout, 1, 1, 1))
        ins = [t, g.const(f"w{k}", w.astype(np.float32))]
        if rng.random() < 0.7:
            ins.append(g.const(f"b{k}", rng.standard_normal(cout).astype(np.float32)))
        t = g.node("Conv", ins, name=f"conv{k}", kernel_shape=[ks, ks], pads=[ks // 2] * 4, group=groups,
                   strides=[int(rng.choice([1, 2]))] * 2 if ks == 3 else [1, 1])
        op = str(rng.choice(["Relu", "LeakyRelu", "Identity", "MaxPool", "none"]))
        if op == "MaxPool":
            t = g.node("MaxPool", [t], kernel_shape=[2, 2], pads=[0, 0, 1, 1])
        elif op == "LeakyRelu":
            t = g.node("LeakyRelu", [t], alpha=0.2)
        elif op != "none":
            t = g.node(op, [t])
        c = cout
    g.node("Identity", [t], ["y"])
    g.output("y", ["N", c, None, None])
    return g.build()


@pytest.mark.parametrize("seed", range(12))
def test_random_chains_stay_exact(seed):
    model = random_chain(seed)
    result = Equalize()(model)
    assert result.modified, f"seed {seed}: nothing equalized"
    assert len(result.model.graph.node) == len(model.graph.node)
    assert_valid(result.model)
    feed = {"x": random_input([2, int(model.graph.input[0].type.tensor_type.shape.dim[1].dim_value), 9, 9], seed=seed)}
    ref, got = run(model, feed)[0], run(result.model, feed)[0]
    assert _rel_err(got, ref) < 1e-4, f"seed {seed}"


def test_weights_kept_on_disk():
    from builders import _on_disk

    from graph_opt.external_data import on_disk

    g = GraphBuilder()
    x = g.input("x", ["N", 16, 6, 6])
    h = g.node("Relu", [g.conv(x, 16, 32, name="a")])
    g.output(g.conv(h, 32, 16, name="b"), ["N", 16, 6, 6])
    model = g.build()
    disk = _on_disk(model)
    assert any(on_disk(t) for t in disk.graph.initializer)  # vacuity: the weights really are on disk
    result = Equalize()(disk)
    assert result.modified
    assert any(on_disk(t) for t in result.model.graph.initializer)  # the rescaled weights go to disk too
    feed = {"x": random_input([2, 16, 6, 6])}
    assert _rel_err(run(result.model, feed)[0], run(model, feed)[0]) < 1e-5
