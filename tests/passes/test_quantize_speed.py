"""quantize's speed rules (passes/quantize/speed.py): MatMul + bias as Gemm, the target's
activation type, and the latency gate, fed fake timings (tests never depend on this CPU's speed)."""

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, assert_valid, op_count, optimized_ops, run

from graph_opt.data import random_dataset
from graph_opt.metrics import cosine
from graph_opt.pass_base import PassContext
from graph_opt.passes.quantize import Quantize, speed
from graph_opt.runtime import make_session, profile_nodes


def encoder_ffn(batch=1, tokens=16, width=32, hidden=64, seed=0):
    """x[B,T,W] → MatMul+Add → Relu → MatMul+Add → y: a transformer feed-forward block."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", [batch, tokens, width])
    h = g.node("MatMul", [x, g.weight("fc1.w", (width, hidden), 0.3)], name="fc1")
    h = g.node("Relu", [g.node("Add", [h, g.weight("fc1.b", (hidden,))], name="fc1_bias")], name="act")
    h = g.node("MatMul", [h, g.weight("fc2.w", (hidden, width), 0.2)], name="fc2")
    y = g.node("Add", [h, g.weight("fc2.b", (width,))], ["y"], name="fc2_bias")
    g.output(y, [batch, tokens, width])
    return g.build()


def _outs(model, data, *, deployed=False):
    """The first output over every sample of `data`, one sample per run (the batch is static)."""
    session = make_session(model, optimize=deployed)
    return np.concatenate([session.run(None, data.slice(i, i + 1))[0] for i in range(len(data))])


def _ctx(model, n=64, seed=0):
    return PassContext(data=random_dataset(model, n, seed=seed))


# ----------------------------------------------------------------------------- MatMul + bias as Gemm


def test_matmul_bias_of_static_shape_becomes_gemm_exactly():
    model = encoder_ffn()
    assert op_count(model, "Gemm") == 0 and op_count(model, "MatMul") == 2  # vacuity guard
    out, names = speed.gemm_form(model)
    assert names == ["fc1", "fc2"]
    assert op_count(out, "Gemm") == 2 and op_count(out, "MatMul") == 0 and op_count(out, "Add") == 0
    assert op_count(out, "Reshape") == 4
    assert op_count(model, "MatMul") == 2, "the input model is never edited"
    assert_valid(out)
    data = random_dataset(model, 4, seed=1)
    for i in range(4):
        feed = {"x": data.inputs["x"][i:i + 1]}
        np.testing.assert_allclose(run(out, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_dynamic_shapes_and_shared_biases_are_left_as_they_are():
    model = encoder_ffn(batch="N")
    assert speed.gemm_form(model) == (model, [])
    g = GraphBuilder(seed=0)
    x = g.input("x", [4, 8])
    b = g.weight("b", (8,))
    y1 = g.node("Add", [g.node("MatMul", [x, g.weight("w1", (8, 8))]), b], ["y1"])
    y2 = g.node("Add", [g.node("MatMul", [x, g.weight("w2", (8, 8))]), b], ["y2"])
    g.output(y1, [4, 8])
    g.output(y2, [4, 8])
    shared = g.build()
    assert speed.gemm_form(shared)[1] == []


def test_static_transformer_block_runs_on_integer_kernels(tmp_path):
    model = encoder_ffn()
    # the hazard: onnxruntime itself turns the float MatMul + Add into a Gemm before any QDQ fusion
    assert "Gemm" in optimized_ops(model, tmp_path)
    result = Quantize()(model, _ctx(model))
    out = result.model
    assert_valid(out)
    assert {e["node"] for e in result.report.rewritten if e.get("weight")} == {"fc1", "fc2"}
    assert any("written as Gemm" in n for n in result.report.notes)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QGemm") == 2 and "Gemm" not in ops and "MatMul" not in ops
    assert "DequantizeLinear" not in ops  # no weight is dequantized at run time
    test = random_dataset(model, 16, seed=5)
    assert cosine(_outs(model, test), _outs(out, test, deployed=True)) >= 0.999


def test_a_float_gemm_output_moved_by_a_reshape_stays_float():
    # fc2's output goes through the Reshape of the Gemm form to a float graph output: no QDQ after it
    model = encoder_ffn()
    plan = Quantize().plan(model, random_dataset(model, 16))
    quantized = {t.tensor for t in plan.by_role("activation")}
    assert "y" not in quantized and not any(t.startswith("y_2d") for t in quantized)
    # fc2 reads its input through the Gemm form's Reshape: the 2-D tensor carries the QDQ
    fc2 = next(d for d in plan.nodes if d.node == "fc2")
    assert fc2.inputs and fc2.inputs[0] in quantized and fc2.inputs[0].endswith("_2d")


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("target,acts,steps", [("x86-avx2", "uint8", 63), ("x86-avx512-vnni", "uint8", 127),
                                               ("arm64", "int8", 127), ("arm64-dotprod", "int8", 127)])
def test_activation_type_and_weight_grid_follow_the_target(target, acts, steps):
    model = encoder_ffn()
    q = Quantize(sensitivity_snr_db=None, target=target)
    assert q.activations == "auto" and q.activation_dtype == acts
    plan = q.plan(model, random_dataset(model, 8))
    assert {t.dtype for t in plan.by_role("activation")} == {acts}
    assert max(np.abs(t.codes).max() for t in plan.by_role("weight")) == steps
    assert Quantize(target=target, activations="uint8").activation_dtype == "uint8"  # an explicit choice wins


def test_a_named_target_is_never_timed(monkeypatch):
    def no_timer(*a, **k):
        raise AssertionError("a named target cannot be timed")

    monkeypatch.setattr(speed, "profile_timer", no_timer)
    model = encoder_ffn()
    result = Quantize(target="arm64")(model, _ctx(model))
    assert result.modified
    assert any("nothing can be timed for another machine" in n and "S8S8" in n for n in result.report.notes)


# ----------------------------------------------------------------------------- the latency gate


def _fake(float_us, int8_us, calls=None):
    """A `speed.profile_timer` giving fixed kernel times; `int8_us` a list: one per call, in turn."""
    per_call = int8_us if isinstance(int8_us, list) else [int8_us]
    seen = []

    def factory(feed, runs, threads=1):
        def timer(f, q):
            seen.append(1)
            if calls is not None:
                calls.append((f, q))
            return list(float_us.items()), list(per_call[min(len(seen), len(per_call)) - 1].items())
        return timer
    return factory


def _clock(ms, seen=None):
    """A `speed.latency_timer` giving fixed whole-model times (float first), recording the models."""
    def factory(feed, runs, threads=1):
        def timer(models):
            if seen is not None:
                seen.append(list(models))
            return list(ms[:len(models)])
        return timer
    return factory


def test_decide_keeps_float_what_does_not_gain_and_shares_a_tensor_qdq():
    layers = [speed.LayerKeys("a", ("a", "a_out"), ("x", "a_out", "wa")),
              speed.LayerKeys("b", ("b", "b_out"), ("x", "wb")),
              speed.LayerKeys("c", ("c",), ())]
    f = [("a", 100.0), ("b_out_nchwc", 100.0), ("other", 500.0)]
    q = [("a", 60.0), ("b", 70.0), ("x_QuantizeLinear", 40.0), ("wb_DequantizeLinear", 5.0), ("c", 1.0)]
    r = speed.decide(layers, f, q)
    # a: 60 + 40/2 = 80 < 95 gains; b: 70 + 20 + 5 = 95, not below 0.95 × 100
    assert r.costs == {"a": (100.0, 80.0), "b": (100.0, 95.0)}
    assert list(r.keep_float) == ["b"] and "not faster in int8" in r.keep_float["b"]
    assert r.unmatched == ["c"]  # no float kernel matched: left as planned


def test_name_matching_takes_the_longest_key_and_needs_a_separator():
    got = speed._attribute([("conv1_nchwc", 1.0), ("conv12", 2.0), ("conv1x", 4.0)],
                           {"a": ("conv1",), "b": ("conv12",)})
    assert got == {"a": 1.0, "b": 2.0}


def test_gate_keeps_the_slow_layer_float(tmp_path, monkeypatch):
    model = encoder_ffn()
    calls, timed = [], []
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 85.0, "fc2": 130.0}, calls))
    # the wall clock: float, planned, gated; the gated model is the fastest
    monkeypatch.setattr(speed, "latency_timer", _clock([1.0, 0.9, 0.8], timed))
    result = Quantize()(model, _ctx(model))
    assert len(calls) == 1  # the float and planned models profiled once
    f, q = calls[0]
    assert op_count(f, "QuantizeLinear") == 0 and op_count(q, "QuantizeLinear") > 0
    (models,) = timed
    assert models[0] is f and models[1] is q and 0 < op_count(models[2], "QuantizeLinear") < op_count(q, "QuantizeLinear")
    layers = {e["node"] for e in result.report.rewritten if e.get("weight")}
    assert layers == {"fc1"}
    skipped = {s.node: s.reason for s in result.report.skipped}
    assert "not faster in int8" in skipped["fc2"]
    assert any("1 of 2 quantized layers not faster" in n and "those kept float" in n for n in result.report.notes)
    out = result.model
    assert_valid(out)
    assert "fc2.w" in {t.name for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    test = random_dataset(model, 8, seed=2)
    assert cosine(_outs(model, test), _outs(out, test)) >= 0.999
    assert "QGemm" in optimized_ops(out, tmp_path)


def test_gate_keeps_everything_float_when_nothing_gains(monkeypatch):
    model = encoder_ffn()
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 100.0, "fc2": 100.0}))
    monkeypatch.setattr(speed, "latency_timer", _clock([1.0, 1.0]))  # and the whole is no faster either
    result = Quantize()(model, _ctx(model))
    assert not result.modified and op_count(result.model, "QuantizeLinear") == 0
    assert {s.node for s in result.report.skipped} >= {"fc1", "fc2"}


def test_a_model_not_faster_as_a_whole_stays_float(monkeypatch):
    # each layer gains in the profile, but the wall clock finds no int8 form 5% faster
    model = encoder_ffn()
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0},
                                                      {"fc1": 50.0, "fc2": 50.0, "stray_QuantizeLinear": 200.0}))
    monkeypatch.setattr(speed, "latency_timer", _clock([1.0, 0.97]))
    result = Quantize()(model, _ctx(model))
    assert not result.modified and op_count(result.model, "QuantizeLinear") == 0
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert "faster as a whole" in reasons["fc1"] and "faster as a whole" in reasons["fc2"]
    assert any("prefer=size quantizes it" in n for n in result.report.notes)


def test_the_planned_model_wins_when_it_runs_faster_than_the_gated_one(monkeypatch):
    # the profile calls fc2 slow in int8, the wall clock says the fully int8 model is the fastest
    model = encoder_ffn()
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 85.0, "fc2": 130.0}))
    monkeypatch.setattr(speed, "latency_timer", _clock([1.0, 0.5, 0.7]))
    result = Quantize()(model, _ctx(model))
    assert {e["node"] for e in result.report.rewritten if e.get("weight")} == {"fc1", "fc2"}
    assert any("the planned int8 model ran fastest" in n for n in result.report.notes)


def test_the_gated_model_must_beat_the_planned_one_too(monkeypatch):
    # the profile calls fc2 slow in int8; the wall clock puts the gated form within 5% of the planned one
    model = encoder_ffn()
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 85.0, "fc2": 130.0}))
    monkeypatch.setattr(speed, "latency_timer", _clock([1.0, 0.80, 0.78]))
    result = Quantize()(model, _ctx(model))
    assert {e["node"] for e in result.report.rewritten if e.get("weight")} == {"fc1", "fc2"}
    assert any("the planned int8 model is kept: the form with the slow layers float is not 5% faster" in n
               for n in result.report.notes)
    # ... but when the planned model is not 5% faster than float, the gated one is taken alone
    monkeypatch.setattr(speed, "latency_timer", _clock([1.0, 0.97, 0.9]))
    gated = Quantize()(model, _ctx(model))
    assert {e["node"] for e in gated.report.rewritten if e.get("weight")} == {"fc1"}


def test_prefer_size_does_not_gate(monkeypatch):
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 1.0, "fc2": 1.0}, {"fc1": 100.0, "fc2": 100.0}))
    model = encoder_ffn()
    result = Quantize(prefer="size")(model, _ctx(model))
    assert {e["node"] for e in result.report.rewritten if e.get("weight")} == {"fc1", "fc2"}


def test_profile_nodes_names_every_kernel_of_each_model():
    model = encoder_ffn()
    feed = random_dataset(model, 1).slice(0, 1)
    f, q = profile_nodes([model, model], feed, runs=2, warmup=1)
    assert f and q and {t.name for t in f} == {t.name for t in q}
    assert all(t.us >= 0 for t in f) and any(t.op == "Gemm" or t.op == "MatMul" for t in f)


def test_an_excluded_matmul_keeps_its_form():
    model = encoder_ffn()
    plan = Quantize(exclude=("fc2",)).plan(model, random_dataset(model, 16))
    assert any("1 MatMul + bias Add" in n for n in plan.notes)
    assert {d.node: d.op for d in plan.nodes if d.node in ("fc1", "fc2")} == {"fc1": "Gemm", "fc2": "MatMul"}


def _counted(monkeypatch, module, name):
    """Replace module.name by a wrapper that still calls it; returns the list its calls append to."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_gated_replan_reuses_the_sensitivity_verdicts(monkeypatch):
    from graph_opt.passes.quantize import sensitivity

    calls = _counted(monkeypatch, sensitivity, "measure")
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 40.0, "fc2": 130.0}))
    model = encoder_ffn()
    result = Quantize()(model, _ctx(model))
    assert {e["node"] for e in result.report.rewritten if e.get("weight")} == {"fc1"}
    assert len(calls) == 1  # measured for the first plan only


def test_the_gated_replan_reuses_the_first_calibration(monkeypatch):
    from graph_opt.passes.quantize import calibration

    calls = _counted(monkeypatch, calibration, "calibrate")
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 40.0, "fc2": 130.0}))
    model = encoder_ffn()
    ctx = _ctx(model)
    gated = Quantize()(model, ctx)
    assert {e["node"] for e in gated.report.rewritten if e.get("weight")} == {"fc1"}  # the gate re-planned
    assert len(calls) == 1  # the data streamed once
    assert any("the first plan's streaming pass, reused" in n for n in gated.report.notes)
    # the same layer kept float by hand, calibrated afresh: the same model
    by_hand = Quantize(prefer="size", keep_float=("fc2",))(model, ctx)
    assert len(calls) == 2
    assert by_hand.model.SerializeToString() == gated.model.SerializeToString()


def test_the_gated_replan_reuses_the_first_plans_second_moments(monkeypatch):
    from graph_opt.passes.quantize import plan

    calls = _counted(monkeypatch, plan, "second_moments")
    monkeypatch.setattr(speed, "profile_timer", _fake({"fc1": 100.0, "fc2": 100.0}, {"fc1": 40.0, "fc2": 130.0}))
    monkeypatch.setattr(speed, "latency_timer", _clock([10.0, 9.0, 5.0]))  # the gated form wins
    model = encoder_ffn()
    ctx = _ctx(model)
    gated = Quantize()(model, ctx)
    assert {e["node"] for e in gated.report.rewritten if e.get("weight")} == {"fc1"}  # the gate re-planned
    assert len(calls) == 1  # computed for the first plan only (GPTQ ran: rounding=auto with data)
    by_hand = Quantize(prefer="size", keep_float=("fc2",))(model, ctx)
    assert len(calls) == 2
    assert by_hand.model.SerializeToString() == gated.model.SerializeToString()


@pytest.mark.parametrize("shape,bias_shape", [((6, 8), (5,)), ((2, 3, 8), (1, 5)), ((1, 2, 3, 8), (5,))])
def test_gemm_form_is_exact_for_every_input_rank(shape, bias_shape):
    g = GraphBuilder(seed=3)
    x = g.input("x", list(shape))
    h = g.node("MatMul", [x, g.weight("w", (8, 5))], name="mm")
    g.output(g.node("Add", [g.weight("b", bias_shape), h], ["y"]), [*shape[:-1], 5])  # bias on the left
    model = g.build()
    out, names = speed.gemm_form(model)
    assert names == ["mm"] and op_count(out, "Gemm") == 1 and op_count(out, "Add") == 0
    assert op_count(out, "Reshape") == (0 if len(shape) == 2 else 2)
    assert "b" not in {t.name for t in out.graph.initializer} or bias_shape == (5,)  # a (1, N) bias became a vector
    assert_valid(out)
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    np.testing.assert_allclose(run(out, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
