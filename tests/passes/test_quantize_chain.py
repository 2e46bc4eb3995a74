"""Chained GPTQ rounding (passes/quantize/chain.py): each GPTQ layer's statistics come from the
model in which the layers before it are quantized, and its codes aim at the weight that corrects
the error reaching it."""

import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, op_count, run
from graph_opt.kernels.quant import compute_params
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes.quantize import Quantize, chain
from graph_opt.passes.quantize import weights as qw
from graph_opt.passes.quantize.plan import make_plan, shared_calibration
from onnx import numpy_helper

from graph_opt.data import Dataset
from graph_opt.intermediates import stream
from graph_opt.model_io import copy_model
from graph_opt.pass_base import PassContext
from graph_opt.registry import parse_spec

K = 32


def _mlp(depth: int = 4):
    """x [N, K] (strongly correlated features) → (Gemm → Relu) × (depth − 1) → Gemm → y: every
    layer a GPTQ layer, each one reading the one before."""
    mix = np.random.default_rng(100).standard_normal((K, K)) * np.exp(-np.arange(K) / 5.0)[None, :]

    def draw(n, seed):
        return Dataset({"x": (np.random.default_rng(seed).standard_normal((n, K)) @ mix.T).astype(np.float32)})

    g = GraphBuilder(seed=3)
    h = g.input("x", ["N", K])
    for i in range(depth - 1):
        h = g.node("Relu", [g.gemm(h, K, K, name=f"fc{i}")])
    g.node("Identity", [g.gemm(h, K, 16, name=f"fc{depth - 1}")], ["y"])
    g.output("y", ["N", 16])
    return g.build(), draw(512, 0), draw(256, 1)


def _quantize(model, data, **kw):
    opts = {"sensitivity_snr_db": None, "prefer": "size", "calibration": "minmax", "rounding": "gptq"}
    return Quantize(**{**opts, **kw})(model, PassContext(data=data))


def _error(model, out, test):
    ref = run(model, test.inputs)[0]
    return float(np.linalg.norm(run(out, test.inputs)[0] - ref) / np.linalg.norm(ref))


def test_stages_follow_the_depth_of_the_layers():
    model, _, _ = _mlp(4)
    ix = GraphIndex(model)
    ids = {i for i, n in enumerate(ix.nodes) if n.op_type == "Gemm"}
    depth = chain.depths(ix, ids)
    assert sorted(depth.values()) == [0, 1, 2, 3]
    assert [len(s) for s in chain.stages(depth, 2)] == [2, 2]
    assert [len(s) for s in chain.stages(depth, 99)] == [1, 1, 1, 1]  # never more stages than depths
    assert chain.stages(depth, 1) == [sorted(ids)]


@pytest.mark.parametrize("activations", ["none", "uint8"])
def test_chained_statistics_equal_the_float_ones_for_the_first_layer_only(monkeypatch, activations):
    model, calib, _ = _mlp(2)
    seen = {}
    original = chain.rechain

    def spy(model, ix, layers, *args, **kw):
        before = {lay.label: lay.hessian.copy() for lay in layers.values()}
        done = original(model, ix, layers, *args, **kw)
        seen.update({lay.label: (before[lay.label], lay.hessian, lay.aim, lay.wv) for lay in layers.values()})
        return done

    monkeypatch.setattr(chain, "rechain", spy)
    _quantize(model, calib, activations=activations, chain=2)
    assert set(seen) == {"fc0", "fc1"}
    h_float, h_chained, aim, w = seen["fc0"]
    if activations == "none":  # its input is the graph input: nothing before it is quantized
        np.testing.assert_allclose(h_chained, h_float, rtol=1e-5, atol=1e-7 * np.abs(h_float).max())
        np.testing.assert_allclose(aim, w, rtol=1e-4, atol=1e-6)
    else:  # its own input's QuantizeLinear → DequantizeLinear, and nothing else
        assert not np.allclose(h_chained, h_float, rtol=1e-7, atol=0)
        np.testing.assert_allclose(h_chained, h_float, rtol=0.05, atol=0.01 * np.abs(h_float).max())
    h_float, h_chained, aim, w = seen["fc1"]  # reads fc0's quantized output
    rel = np.linalg.norm(h_chained - h_float) / np.linalg.norm(h_float)
    assert 1e-5 < rel < 0.2, rel
    assert not np.allclose(aim, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activations", ["none", "uint8"])
def test_chained_rounding_fires_and_stays_valid(activations):
    model, calib, test = _mlp(4)
    assert op_count(model, "Gemm") == 4 and op_count(model, "DequantizeLinear") == 0  # vacuity
    plain = _quantize(model, calib, activations=activations, chain="off")
    chained = _quantize(model, calib, activations=activations, chain=4)
    assert not any(n.startswith("chain:") for n in plain.report.notes)
    assert any(n.startswith("chain: 4 of 4 GPTQ layers") and "in 4 stages" in n for n in chained.report.notes), \
        chained.report.notes
    assert len(chained.report.rewritten) == len(plain.report.rewritten) == 4
    assert_valid(chained.model)  # checker, onnxruntime loads it
    weights = {}
    for name, r in (("plain", plain), ("chained", chained)):
        weights[name] = {t.name: t for t in r.model.graph.initializer if t.name.endswith(".w_quantized")}
    assert weights["plain"].keys() == weights["chained"].keys() and len(weights["plain"]) == 4
    moved = [n for n in weights["plain"]
             if not np.array_equal(numpy_helper.to_array(weights["plain"][n]), numpy_helper.to_array(weights["chained"][n]))]
    assert any(not n.startswith("fc0") for n in moved), moved  # the deeper layers' codes followed their inputs
    assert _error(model, chained.model, test) < (0.02 if activations == "none" else 0.1)  # parity bound


def test_chained_rounding_lowers_the_output_error():
    """Weight-only int8, four layers: each layer's rounding error reaches the next, which the
    chained codes correct (on held-out data, by a margin far above float accidents)."""
    model, calib, test = _mlp(4)
    err = {c: _error(model, _quantize(model, calib, activations="none", chain=c).model, test) for c in ("off", 4)}
    assert err[4] < 0.9 * err["off"], err


def test_chain_option_is_validated_and_spelled_on_the_cli():
    with pytest.raises(ValueError, match="chain must be"):
        Quantize(chain=0)
    assert parse_spec("quantize:chain=3").chain == 3
    assert parse_spec("quantize:chain=off").chain_stages() == 0
    assert Quantize(chain="auto").chain_stages() >= 1


def test_chain_without_gptq_layers_does_nothing():
    model, calib, _ = _mlp(2)
    result = _quantize(model, calib, activations="none", rounding="nearest", chain=2)
    assert not any(n.startswith("chain") for n in result.report.notes)


def test_plans_made_again_in_one_run_reuse_the_chained_statistics(monkeypatch):
    """The latency gate plans again inside the same run (`plan.shared_calibration`): the chained
    statistics of the first plan are reused, not streamed again, and give the same codes."""
    model, calib, _ = _mlp(3)
    calls = []
    original = chain.rechain
    monkeypatch.setattr(chain, "rechain", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q = Quantize(activations="uint8", rounding="gptq", chain=3, sensitivity_snr_db=None, prefer="size")
    with shared_calibration():
        first, _ = make_plan(model, calib, q)
        again, _ = make_plan(model, calib, q)
    assert len(calls) == 1
    assert any(n.startswith("chain: 3 GPTQ layers") and "reused" in n for n in again.notes), again.notes
    codes = [{t.tensor: t.codes for t in p.by_role("weight")} for p in (first, again)]
    assert codes[0].keys() == codes[1].keys() and len(codes[0]) == 3
    assert all(np.array_equal(codes[0][k], codes[1][k]) for k in codes[0])


def test_a_chained_aim_moves_each_weight_at_most_one_grid_step():
    w = np.random.default_rng(7).standard_normal((8, 6, 1, 1)).astype(np.float32)
    p = compute_params(w, "int8", axis=0)
    far = w + np.random.default_rng(8).standard_normal(w.shape).astype(np.float32)
    bounded = qw._bounded_aim(w, far, p)
    step = p.scale.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(bounded - w) <= qw.AIM_STEPS * step + 1e-6 * (np.abs(w) + step))  # float32 ulps
    assert np.any(np.abs(far - w) > step)  # vacuity: the bound did clip
    near = w + 0.25 * step * np.sign(far - w)
    np.testing.assert_array_equal(qw._bounded_aim(w, near, p), near)  # within the bound: untouched


def test_a_stage_runs_only_the_nodes_its_inputs_depend_on():
    model, calib, _ = _mlp(4)
    cut = chain.upto(copy_model(model), ["fc1_out"])
    assert [n.op_type for n in cut.graph.node] == ["Gemm", "Relu", "Gemm"]  # of 7
    assert [o.name for o in cut.graph.output] == ["fc1_out"]
    (_, whole), (_, part) = (next(stream(m, calib, ["fc1_out"], batch_size=len(calib))) for m in (model, cut))
    np.testing.assert_array_equal(whole["fc1_out"], part["fc1_out"])  # the same tensor, computed alike


def _attention(d: int = 16, t: int = 6):
    """softmax(Q·Kᵀ)·V → output projection: a transformer's attention, every projection a GPTQ layer."""
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", t, d])
    q, k, v = (g.node("MatMul", [x, g.weight(f"w{p}", (d, d), 0.3)], name=p) for p in "qkv")
    scores = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])], name="qk")
    mixed = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v], name="av")
    g.node("MatMul", [mixed, g.weight("wo", (d, d), 0.3)], ["y"], name="o")
    g.output("y", ["N", t, d])
    data = Dataset({"x": np.random.default_rng(0).standard_normal((64, t, d)).astype(np.float32)})
    return g.build(), data


def test_chain_auto_chains_a_cnn_or_mlp_and_leaves_a_transformer_unchained():
    model, calib, _ = _mlp(4)
    default = _quantize(model, calib, activations="uint8", rounding="auto")
    assert any(n.startswith("rounding=gptq: 4 of 4") for n in default.report.notes)  # GPTQ, unchained
    assert not any(n.startswith("chain") for n in default.report.notes)  # chain=off is the default
    auto = _quantize(model, calib, activations="uint8", rounding="auto", chain="auto")
    assert any(n.startswith("chain: 4 of 4 GPTQ layers") for n in auto.report.notes), auto.report.notes
    attn, data = _attention()
    kw = {"activations": "uint8", "rounding": "auto", "smooth": "off", "chain": "auto"}
    skipped = _quantize(attn, data, **kw)
    assert any(n.startswith("chain=auto: GPTQ not chained on a transformer") for n in skipped.report.notes)
    assert not any(n.startswith("chain:") for n in skipped.report.notes)
    assert any(n.startswith("rounding=gptq: 4 of 4") for n in skipped.report.notes), skipped.report.notes  # vacuity
    forced = _quantize(attn, data, **{**kw, "chain": 2})
    assert any(n.startswith("chain: 4 of 4 GPTQ layers") for n in forced.report.notes), forced.report.notes
    assert_valid(forced.model)
