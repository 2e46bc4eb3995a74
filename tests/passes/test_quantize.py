import importlib
import json
import time
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import GraphBuilder, assert_valid, decoder_model, op_count, optimized_ops, run, small_cnn
from onnx import TensorProto, helper, numpy_helper

from graph_opt.data import Dataset, random_dataset
from graph_opt.kernels.quant import (
    binary_weights,
    blockwise_params,
    compute_params,
    fake_quantize,
    symmetric_steps,
    ternary_weights,
    unpack_int4,
)
from graph_opt.metrics import cosine, snr_db
from graph_opt.pass_base import PassContext
from graph_opt.passes.fold_batchnorm import FoldBatchnorm
from graph_opt import runtime
from graph_opt.passes.quantize import calibration as quantize_mod
from graph_opt.passes.quantize import gptq as gptq_mod
from graph_opt.passes.quantize import sensitivity as sensitivity_mod
from graph_opt.passes.quantize import CONCAT_RANGE_RATIO, Quantize, apply_plan


def _ctx(model, n=32, seed=0):
    return PassContext(data=random_dataset(model, n, seed=seed))


def _outputs(model, data):
    return run(model, data.inputs)


def _float_weight_names(model):
    return {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) and
            int(np.prod(t.dims)) > 16}


def _optimized_nodes(model, tmp_path):
    """The nodes after onnxruntime's own optimizations (all levels), read back from the saved file."""
    optimized_ops(model, tmp_path)
    return list(onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _deployed(model, feeds):
    """The first output under onnxruntime as deployed (all optimizations on)."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _expose(model, names):
    """A copy of `model` with extra float outputs (e.g. the DequantizeLinear output of a weight)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in names:
        out.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return out


def _assert_deployable(original, quantized, data, floor=0.999):
    """Runs under onnxruntime as deployed (all optimizations on, fused integer kernels) with parity."""
    fused = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    for ref, got in zip(_outputs(original, data), fused.run(None, data.inputs)):
        assert cosine(ref, got) >= floor


def _dq_outputs(model, names, feeds):
    sess = ort.InferenceSession(_expose(model, names).SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds)))


def mlp(seed=0, k=32, hidden=64, n=10):
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", k])
    h = g.node("MatMul", [x, g.weight("fc1.w", (k, hidden), 0.3)], name="fc1")
    h = g.node("Relu", [g.node("Add", [h, g.weight("fc1.b", (hidden,))])])
    h = g.node("MatMul", [h, g.weight("fc2.w", (hidden, hidden), 0.2)], name="fc2")
    h = g.node("Relu", [h])
    y = g.gemm(h, hidden, n, name="head")
    g.node("Identity", [y], ["logits"])
    g.output("logits", ["N", n])
    return g.build()


def conv_chain(seed=0, opset=17):
    """Conv-Relu-MaxPool-Conv-Relu: a chain onnxruntime can run entirely in int8."""
    g = GraphBuilder(seed=seed, opset=opset)
    x = g.input("x", ["N", 4, 8, 8])
    a = g.node("Relu", [g.conv(x, 4, 16, name="c1")])
    a = g.node("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2])
    y = g.node("Relu", [g.conv(a, 16, 8, name="c2")], ["y"])
    g.output(y, ["N", 8, 4, 4])
    return g.build()


# ----------------------------------------------------------------------------- static int8


def test_small_cnn_int8_static_parity_and_fusion(tmp_path):
    model = FoldBatchnorm()(small_cnn(channels=4)).model  # 4 channels: the stem takes the int8 kernel too
    assert op_count(model, "QuantizeLinear") == 0  # vacuity guard
    weights = _float_weight_names(model)
    result = Quantize()(model, _ctx(model))
    assert result.modified
    out = result.model
    assert_valid(out)
    assert op_count(out, "QuantizeLinear") >= 5 and op_count(out, "DequantizeLinear") >= 10
    assert not (_float_weight_names(out) & weights), "float weights must be removed"
    layers = [e for e in result.report.rewritten if e["op"] in ("Conv", "Gemm")]
    assert len(layers) == 5 and all(e["weight"]["granularity"] == "channel" for e in layers)
    assert all(e.get("bias") == "int32" for e in layers)
    test = random_dataset(model, 16, seed=7)
    ref, got = _outputs(model, test)[0], _outputs(out, test)[0]
    assert cosine(ref, got) >= 0.999
    _assert_deployable(model, out, test)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == 4 and "QGemm" in ops and "QLinearAdd" in ops
    assert "Conv" not in ops and "Gemm" not in ops


def test_conv_chain_becomes_qlinearconv_with_relu_absorbed(tmp_path):
    model = conv_chain()
    result = Quantize()(model, _ctx(model))
    assert_valid(result.model)
    rewritten = {e["node"]: e for e in result.report.rewritten}
    assert rewritten["c1"]["absorbed"] and rewritten["c2"]["output"] == "y"
    ops = optimized_ops(result.model, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "Relu" not in ops
    assert "MaxPool" in ops or "NhwcMaxPool" in ops  # int8 MaxPool: the shared scale let ORT drop the QDQ
    # The graph output keeps its name and its float type.
    assert [o.name for o in result.model.graph.output] == ["y"]
    test = random_dataset(model, 8, seed=3)
    assert cosine(_outputs(model, test)[0], _outputs(result.model, test)[0]) >= 0.999
    _assert_deployable(model, result.model, test)


def test_mlp_matmul_int8_static(tmp_path):
    model = mlp()
    # minmax (not the default output-error search, which clips): enough samples that test data stays in range
    result = Quantize(calibration="minmax")(model, _ctx(model, 256))
    out = result.model
    assert_valid(out)
    assert not (_float_weight_names(out) & {"fc1.w", "fc2.w", "head.w"})
    test = random_dataset(model, 32, seed=9)
    assert cosine(_outputs(model, test)[0], _outputs(out, test)[0]) >= 0.999
    _assert_deployable(model, out, test)
    ops = optimized_ops(out, tmp_path)
    # fc1 + its bias Add become QGemm (float output), fc2 QLinearMatMul, the head QGemm.
    integer = ("QLinearMatMul", "MatMulIntegerToFloat", "QGemm")
    assert sum(ops.count(op) for op in integer) == 3 and "QLinearMatMul" in ops
    assert "MatMul" not in ops and "Gemm" not in ops


def test_batched_matmul_weight_runs_fused(tmp_path):
    g = GraphBuilder(seed=0)
    x = g.input("x", ["N", 3, 5, 16])
    y = g.node("MatMul", [x, g.weight("w3", (3, 16, 8), 0.3)], name="mm")
    g.output(g.node("Relu", [y], ["y"]), ["N", 3, 5, 8])
    model = g.build()
    result = Quantize()(model, _ctx(model))
    assert result.report.rewritten[0]["weight"]["granularity"] == "tensor" and result.report.rewritten[0]["input"]
    _assert_deployable(model, result.model, random_dataset(model, 8, seed=3))
    assert "MatMul" not in optimized_ops(result.model, tmp_path)


@pytest.mark.parametrize("target,reduced", [("x86-avx2", True), ("x86-avx512", True), ("x86-avx512-vnni", False),
                                            ("x86-avx-vnni", False), ("arm64", False)])
def test_int8_weights_follow_the_target(target, reduced):
    # u8 activations x full-range s8 weights saturate in the kernels of x86 CPUs without int8 dot
    # products (docs/design.md): 7-bit weights there, the full grid elsewhere.
    model = conv_chain()
    result = Quantize(sensitivity_snr_db=None, target=target)(model, _ctx(model))
    plan = Quantize(sensitivity_snr_db=None, target=target).plan(model, random_dataset(model, 8))
    assert max(np.abs(t.codes).max() for t in plan.by_role("weight")) == (63 if reduced else 127)
    assert any(n.startswith(f"target {target} (") and ("7-bit" in n) == reduced for n in result.report.notes)
    for explicit, steps in ((True, 63), (False, 127)):  # an explicit reduce_range wins over the target
        plan = Quantize(sensitivity_snr_db=None, target=target, reduce_range=explicit).plan(model, random_dataset(model, 8))
        assert max(np.abs(t.codes).max() for t in plan.by_role("weight")) == steps


def test_unknown_target_is_a_spec_error():
    from graph_opt.errors import SpecError
    from graph_opt.registry import parse_spec

    with pytest.raises(SpecError, match="unknown target 'x86-avx9'.*x86-avx2"):
        parse_spec("quantize:target=x86-avx9")


@pytest.mark.parametrize("weights,symmetric", [("uint8", True), ("int8", False), ("uint8", False)])
def test_other_weight_types_stay_fusable(weights, symmetric, tmp_path):
    model = conv_chain()
    result = Quantize(weights=weights, symmetric=symmetric)(model, _ctx(model))
    assert_valid(result.model)
    assert optimized_ops(result.model, tmp_path).count("QLinearConv") == 2
    test = random_dataset(model, 8, seed=3)
    ref = _outputs(model, test)[0]
    assert cosine(ref, _outputs(result.model, test)[0]) >= 0.999
    _assert_deployable(model, result.model, test)  # the fused integer kernels keep that parity


# ----------------------------------------------------------------------------- weights only


def _single_layer(op, trans_b=1, k=24, n=12, opset=17, scale=0.5):
    g = GraphBuilder(seed=3, opset=opset)
    if op == "Conv":
        x = g.input("x", ["N", k, 5, 5])
        g.output(g.conv(x, k, n, name="layer"), ["N", n, 5, 5])
        return g.build(), "layer.w", 0
    x = g.input("x", ["N", k])
    if op == "Gemm":
        y = g.gemm(x, k, n, trans_b=trans_b, name="layer")
        axis = 0 if trans_b else 1
    else:
        y = g.node("MatMul", [x, g.weight("layer.w", (k, n), scale)], name="layer")
        axis = 1
    g.output(y, ["N", n])
    return g.build(), "layer.w", axis


@pytest.mark.parametrize("op,trans_b", [("Conv", 1), ("Gemm", 0), ("Gemm", 1), ("MatMul", 1)])
def test_per_channel_axis_matches_fake_quantization(op, trans_b):
    model, wname, axis = _single_layer(op, trans_b)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}[wname]
    result = Quantize(activations="none")(model)
    assert result.report.rewritten[0]["weight"]["axis"] == axis
    feeds = random_dataset(model, 2).inputs
    got = _dq_outputs(result.model, [wname], feeds)[wname]
    expected = fake_quantize(w, compute_params(w, "int8", axis=axis))
    np.testing.assert_array_equal(got, expected)
    # A wrong axis would give a different tensor (the test can tell them apart).
    other = fake_quantize(w, compute_params(w, "int8", axis=(axis + 1) % w.ndim))
    assert not np.array_equal(got, other)


@pytest.mark.parametrize("op,trans_b", [("Conv", 1), ("Gemm", 0), ("MatMul", 1)])
def test_weights_on_the_grid_are_exact_weight_only(op, trans_b):
    model, wname, axis = _single_layer(op, trans_b)
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        if t.name == wname:
            w = onnx.numpy_helper.to_array(t)
            shape = [1] * w.ndim
            shape[axis] = w.shape[axis]
            s = rng.uniform(0.001, 0.01, w.shape[axis]).astype(np.float32).reshape(shape)
            codes = rng.integers(-127, 128, w.shape)
            codes[(0,) * w.ndim] = 127
            codes = np.moveaxis(codes, axis, 0)
            codes[:, (0,) * (w.ndim - 1)] = 127  # every channel reaches the top of the grid
            codes = np.moveaxis(codes, 0, axis)
            t.CopyFrom(onnx.numpy_helper.from_array((codes * s).astype(np.float32), wname))
    result = Quantize(activations="none")(model)
    assert result.modified and op_count(result.model, "QuantizeLinear") == 0
    data = random_dataset(model, 4, seed=1)
    np.testing.assert_allclose(_outputs(result.model, data)[0], _outputs(model, data)[0], atol=1e-6, rtol=0)


def test_no_data_falls_back_to_weight_only_and_says_so():
    model = conv_chain()
    result = Quantize()(model)  # activations=uint8 requested, but no calibration data
    assert result.modified
    assert op_count(result.model, "QuantizeLinear") == 0 and op_count(result.model, "DequantizeLinear") == 2
    assert any("no calibration data" in n and "weight-only" in n for n in result.report.notes)
    assert_valid(result.model)


# ----------------------------------------------------------------------------- int4 / int2


def test_int4_weight_only_matmul_is_blocked_along_k(tmp_path):
    model, wname, _ = _single_layer("MatMul", k=256, n=32)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}[wname]
    result = Quantize(weights="int4", rounding="nearest")(model, _ctx(model, 8))  # (auto: GPTQ, with data)
    out = result.model
    assert_valid(out)
    entry = result.report.rewritten[0]
    assert entry["weight"] == {"dtype": "int4", "scheme": "affine", "granularity": "block", "axis": 0,
                               "block_size": 128}
    assert entry["input"] == "float"  # weight-only
    assert max(i.version for i in out.opset_import if i.domain == "") >= 21
    q = {t.name: t for t in out.graph.initializer if t.data_type == TensorProto.INT4}
    assert len(q[f"{wname}_quantized"].raw_data) == w.size // 2  # two codes per byte
    got = _dq_outputs(out, [wname], random_dataset(model, 2).inputs)[wname]
    np.testing.assert_array_equal(got, fake_quantize(w, blockwise_params(w, 128, 0, "int4")))
    assert "MatMulNBits" in optimized_ops(out, tmp_path)


def _decoder_data(d=128, n=24, seed=0):
    """Inputs with strongly correlated features (random mixing), as a transformer's hidden states are."""
    mix = np.random.default_rng(100).standard_normal((d, d)) * (3.0 / np.sqrt(d)) + np.eye(d)  # one distribution
    return Dataset({"x": (np.random.default_rng(seed).standard_normal((n, 8, d)) @ mix).astype(np.float32)})


def _nbits_weight(model, node):
    """The dequantized (K, N) weight a MatMulNBits node holds, unpacked from its initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    k, n, block = a["K"], a["N"], a["block_size"]
    u = unpack_int4(inits[node.input[1]], inits[node.input[1]].size * 2, signed=False).reshape(n, -1)[:, :k]
    s = np.repeat(inits[node.input[2]].reshape(n, -1), block, axis=1)[:, :k]
    assert len(node.input) == 3  # symmetric codes: onnxruntime's default zero point (8)
    return ((u.astype(np.float32) - 8) * s).T


def test_w4a8_only_when_activations_are_asked_for_by_name():
    """int4 weights keep activations float by default (no CPU kernel for the pair); activations=int8
    or uint8 asks for W4A8: per-channel int4 weights, 8-bit activations, each layer still computing
    its float result within the grids' error."""
    model = small_cnn()
    ctx = _ctx(model, 16)
    default = Quantize(weights="int4", prefer="size")(model, ctx)
    assert op_count(default.model, "QuantizeLinear") == 0  # vacuity: weight-only unless asked
    result = Quantize(weights="int4", activations="uint8", prefer="size")(model, ctx)
    out = result.model
    assert_valid(out)
    assert op_count(out, "QuantizeLinear") > 0
    int4 = [t for t in out.graph.initializer if t.data_type == TensorProto.INT4]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(int4) >= len(convs)
    assert all(e["input"] != "float" for e in result.report.rewritten if e["op"] == "Conv")
    assert any("W4A8" in n for n in result.report.notes)
    data = random_dataset(model, 16, seed=5).inputs
    ref, got = _outputs(model, Dataset(data, None, "t"))[0], run(out, data)[0]
    assert snr_db(ref, got) > 12.0  # int4 weights: a bounded, not an exact, error


def test_int4_matmulnbits_matches_the_dequantizelinear_form(tmp_path):
    model = decoder_model()
    data = _decoder_data()
    assert op_count(model, "MatMulNBits") == 0 and op_count(model, "DequantizeLinear") == 0  # vacuity
    dq = Quantize(weights="int4", activations="none", rounding="gptq")(model, PassContext(data=data)).model
    nb_result = Quantize(weights="int4", activations="none", rounding="gptq", int4_format="matmulnbits")(
        model, PassContext(data=data))
    nb = nb_result.model
    assert op_count(dq, "DequantizeLinear") == 7 and op_count(dq, "MatMulNBits") == 0
    assert op_count(nb, "MatMulNBits") == 7 and op_count(nb, "DequantizeLinear") == 0
    assert op_count(nb, "MatMul") == 2  # the two attention products (activations on both sides) stay
    assert_valid(nb)
    assert {i.domain: i.version for i in nb.opset_import}.get("com.microsoft") == 1
    names = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".w")]
    assert len(names) == 7 and not set(names) & {t.name for t in nb.graph.initializer}  # float weights gone
    # bit for bit: the weights MatMulNBits holds are exactly those DequantizeLinear computes
    want = _dq_outputs(dq, names, {"x": data.inputs["x"][:1]})
    for node in (n for n in nb.graph.node if n.op_type == "MatMulNBits"):
        w_name = node.name + ".w"
        np.testing.assert_array_equal(_nbits_weight(nb, node), want[w_name])
    # as deployed, onnxruntime fuses the DQ form into the same MatMulNBits kernel (accuracy level 4)
    fused = [n for n in _optimized_nodes(dq, tmp_path) if n.op_type == "MatMulNBits"]
    assert len(fused) == 7
    assert {helper.get_attribute_value(a) for n in fused for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert {helper.get_attribute_value(a) for n in nb.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "accuracy_level"} == {4}
    x = data.inputs["x"][:4]
    y_dq, y_nb = _deployed(dq, {"x": x}), _deployed(nb, {"x": x})
    assert np.max(np.abs(y_dq - y_nb)) <= 1e-4 * np.max(np.abs(y_dq))
    sizes = len(dq.SerializeToString()), len(nb.SerializeToString())
    assert sizes[1] <= sizes[0] * 1.05, sizes


def test_int4_gptq_beats_nearest_rounding_on_a_decoder():
    model = decoder_model()
    data = _decoder_data(n=128)  # 1024 rows: 4× the widest input (down's 256); fewer rows overfit H
    held = _decoder_data(n=8, seed=5)
    ref = run(model, held.inputs)[0]
    x = held.inputs["x"]
    errs = {}
    for rounding in ("nearest", "gptq"):
        result = Quantize(weights="int4", activations="none", rounding=rounding, int4_format="matmulnbits")(
            model, PassContext(data=data))
        assert op_count(result.model, "MatMulNBits") == 7
        # the residual stream carries x itself: measure the error of what the blocks add
        errs[rounding] = np.linalg.norm(run(result.model, held.inputs)[0] - ref) / np.linalg.norm(ref - x)
    note = " ".join(result.report.notes)
    assert "7 of 7 block-wise layers solved" in note and "full feedback" in note
    assert errs["gptq"] < 0.9 * errs["nearest"], errs


def test_int4_gptq_spilled_to_disk_equals_in_memory(monkeypatch):
    model = decoder_model(d=64, ff=128)
    data = _decoder_data(d=64, n=16)
    q = Quantize(weights="int4", activations="none", rounding="gptq", block_size=32, sensitivity_snr_db=None)
    in_memory = q.plan(model, data)
    monkeypatch.setattr(gptq_mod, "SPILL_BYTES", 1)  # every batch's rows go to disk
    spills = []
    real = gptq_mod.LayerInputs._spill
    monkeypatch.setattr(gptq_mod.LayerInputs, "_spill", lambda self: spills.append(1) or real(self))
    on_disk = q.plan(model, data, batch_size=4)
    assert spills  # the vacuity guard: the disk path really ran
    for a, b in zip(in_memory.by_role("weight"), on_disk.by_role("weight")):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)


def test_gptq_feedback_window_bounds_the_cost():
    assert gptq_mod.feedback_window([(64, 256)], 128, budget=1e9) is None  # small: full GPTQ
    sizes = [(2048, 2048)] * 4 + [(5632, 2048)] * 2 + [(2048, 5632)]
    w = gptq_mod.feedback_window(sizes, 128, budget=5e10)
    assert w is not None and w % 128 == 0 and w & (w - 1) == 0
    assert sum(n * k * min(k, w) for n, k in sizes) <= 5e10 < sum(n * k * min(k, 2 * w) for n, k in sizes)
    assert gptq_mod.shrinkage(256, 100_000) == gptq_mod.MIN_DAMP and gptq_mod.shrinkage(256, 64) == 1.0


def test_int4_matmulnbits_leaves_unsupported_blocks_as_dequantizelinear():
    model, _, _ = _single_layer("MatMul", k=96, n=32)
    result = Quantize(weights="int4", activations="none", block_size=24, int4_format="matmulnbits")(model, _ctx(model, 8))
    assert op_count(result.model, "MatMulNBits") == 0 and op_count(result.model, "DequantizeLinear") == 1
    assert_valid(result.model)


@pytest.mark.parametrize("kind,kernel", [("ternary", ternary_weights), ("binary", binary_weights)])
def test_ternary_binary_dequantize_to_alpha_times_codes(kind, kernel):
    model, wname, axis = _single_layer("Gemm", trans_b=1)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}[wname]
    result = Quantize(weights=kind)(model, _ctx(model, 8))
    out = result.model
    assert_valid(out)
    assert [i.version for i in out.opset_import if i.domain == ""] == [25]
    assert any("opset upgraded 17 → 25" in n for n in result.report.notes)
    assert any(t.data_type == TensorProto.INT2 for t in out.graph.initializer)
    codes, params = kernel(w, axis)
    got = _dq_outputs(out, [wname], random_dataset(model, 2).inputs)[wname]
    np.testing.assert_array_equal(got, codes.astype(np.float32) * params.scale[:, None])
    assert set(np.unique(codes)) <= {-1, 0, 1}
    _assert_deployable(model, out, random_dataset(model, 4), floor=0.5)  # loads and runs as deployed


def test_ternary_file_really_shrinks_16x():
    g = GraphBuilder(seed=0)
    x = g.input("x", ["N", 512])
    g.output(g.gemm(x, 512, 512, name="big"), ["N", 512])
    model = g.build()
    before = len(model.SerializeToString())
    result = Quantize(weights="ternary")(model)
    after = len(result.model.SerializeToString())
    assert before / after >= 14, (before, after)  # 1 MiB of float32 → 64 KiB of int2 (+ scales, bias)
    assert "big.w" not in {t.name for t in result.model.graph.initializer}
    assert_valid(result.model)


def test_opset_11_model_is_upgraded_for_per_channel():
    model = conv_chain(opset=11)
    result = Quantize()(model, _ctx(model))
    assert [i.version for i in result.model.opset_import if i.domain == ""] == [13]
    assert any("opset upgraded 11 → 13" in n for n in result.report.notes)
    assert_valid(result.model)


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_streaming_calibration_equals_one_batch(method):
    model = FoldBatchnorm()(small_cnn()).model
    data = random_dataset(model, 24, seed=2)
    q = Quantize(calibration=method, sensitivity_snr_db=None)
    one = q.plan(model, data, batch_size=24)
    many = q.plan(model, data, batch_size=1)
    acts = one.by_role("activation")
    assert len(acts) >= 5
    for t in acts:
        other = many.tensors[t.tensor]
        assert t.range == other.range
        np.testing.assert_array_equal(t.scale, other.scale)
        np.testing.assert_array_equal(t.zero_point, other.zero_point)


def test_minmax_reduces_inside_onnxruntime_and_stays_exact_around_nan_and_inf(monkeypatch):
    """minmax takes ReduceMin/ReduceMax from onnxruntime, which skips a NaN that is not first;
    a batch with a non-finite reduction (an inf that Clip hides from the output) or a non-finite
    output (a NaN) is observed from the whole tensors: the ranges are the finite values' ones."""
    from graph_opt.kernels.calib import MinMaxObserver

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])
    two, lo, hi = (numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                   (("two", 2.0), ("lo", -5.0), ("hi", 5.0)))
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["m"]),
                               helper.make_node("Clip", ["m", "lo", "hi"], ["y"])], "g", [x], [y],
                              [two, lo, hi])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(8, 6)).astype(np.float32)

    def expected(values):
        m = 2 * values
        out = {}
        for name, v in (("m", m), ("y", np.clip(m, -5, 5))):
            o = MinMaxObserver()
            o.update(v)
            out[name] = (o.min, o.max, o.count)
        return out

    def got(values, **kw):
        obs = quantize_mod.calibrate(model, Dataset({"x": values}), ["m", "y"], "minmax", batch_size=2, **kw)
        return {t: (o.min, o.max, o.count) for t, o in obs.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("the tensors were exposed")

    with monkeypatch.context() as mp:  # finite data: only scalars leave onnxruntime
        mp.setattr(quantize_mod, "_exposing", refuse)
        assert got(clean) == expected(clean)
    dirty = clean.copy()
    dirty[1, 3] = np.nan   # not the first value: onnxruntime's reductions would skip it (and count it)
    dirty[0, 1] = -30.0    # m's true min, in the NaN's batch
    dirty[4, 2] = np.inf   # m is inf there, y is clipped to 5: only m's reduction shows it
    dirty[5, 0] = 40.0     # m's true max, in the inf's batch
    assert got(dirty) == expected(dirty)
    assert got(dirty)["m"][:2] == (-60.0, 80.0)


def test_minmax_derives_ranges_that_follow_from_observed_ones_without_reducing_them(monkeypatch):
    """Relu, LeakyRelu, Clip, Sigmoid, Tanh, Reshape and Concat outputs of observed tensors get
    their range from their inputs' (f(min), f(max); a union for Concat): only `m` is reduced, and
    the ranges equal those of the whole tensors (Sigmoid and Tanh to onnxruntime's last bits),
    around a NaN too."""
    from graph_opt.kernels.calib import MinMaxObserver

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("rs", "cat", "lr", "c")]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("two", 2.0), ("lo", -1.0), ("hi", 1.5))]
    inits.append(numpy_helper.from_array(np.array([-1, 24], np.int64), "shape"))
    graph = helper.make_graph([
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["rs"]),
        helper.make_node("Sigmoid", ["m"], ["s"]),
        helper.make_node("Tanh", ["m"], ["th"]),
        helper.make_node("Concat", ["s", "th"], ["cat"], axis=1),
        helper.make_node("LeakyRelu", ["m"], ["lr"], alpha=0.1),
        helper.make_node("Clip", ["m", "lo", "hi"], ["c"]),
    ], "g", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tensors = ["m", "r", "rs", "s", "th", "cat", "lr", "c"]
    reduced = []
    real = quantize_mod.make_session

    def spy(m, **kw):
        reduced.extend(n.input[0] for n in m.graph.node if n.op_type == "ReduceMin")
        return real(m, **kw)

    monkeypatch.setattr(quantize_mod, "make_session", spy)
    values = np.random.default_rng(3).normal(size=(10, 4, 6)).astype(np.float32) * 3

    for batch in (values, np.where(np.arange(values.size).reshape(values.shape) == 53, np.nan, values)):
        reduced.clear()
        obs = quantize_mod.calibrate(model, Dataset({"x": batch}), tensors, "minmax", batch_size=3)
        assert reduced == ["m"]
        whole = dict(zip(tensors, quantize_mod._exposing(model, tensors, 1)[0].run(tensors, {"x": batch})))
        for t in tensors:
            ref = MinMaxObserver()
            ref.update(whole[t])
            got = (obs[t].min, obs[t].max, obs[t].count)
            if t in ("s", "th", "cat"):
                assert got == pytest.approx((ref.min, ref.max, ref.count), rel=1e-6, abs=1e-7), t
            else:
                assert got == (ref.min, ref.max, ref.count), t
        assert obs["c"].max == 1.5 and obs["r"].min == 0.0


@pytest.mark.parametrize("build", ["mlp", "detector_head", "small_cnn"])
@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_only_tensors_the_placement_can_use_are_calibrated_and_the_plan_is_unchanged(build, method, monkeypatch):
    """A dry run of the placement on stand-in ranges picks the tensors to calibrate (an MLP's
    Gemm outputs that nothing quantized reads, a detector's mixed-range Concat). Calibrating
    every candidate instead gives the same plan, decisions and reasons included."""
    model = {"mlp": mlp, "detector_head": detector_head, "small_cnn": small_cnn}[build]()
    data = random_dataset(model, 24, seed=4)
    calibrated = []
    real = quantize_mod.calibrate

    def spy(m, d, tensors, *args, **kwargs):
        calibrated.append(list(tensors))
        return real(m, d, tensors, *args, **kwargs)

    monkeypatch.setattr(quantize_mod, "calibrate", spy)
    q = Quantize(calibration=method)
    pruned = q.plan(model, data)

    class AskAll(quantize_mod._Asking):  # every candidate counts as asked for
        def __init__(self, names, value):
            super().__init__(names, value)
            self.asked = dict.fromkeys(sorted(names))

    monkeypatch.setattr(quantize_mod, "_Asking", AskAll)
    full = q.plan(model, data)
    # The detector's candidates are all usable; what matters there is its range-dependent Concat.
    assert len(calibrated[0]) < len(calibrated[1]) or build == "detector_head"
    assert set(calibrated[0]) >= {t.tensor for t in pruned.by_role("activation")}

    def without_counts(plan):  # the calibration note counts the tensors observed: the one difference
        d = plan.to_dict(compact=False)
        d["notes"] = [n for n in d["notes"] if "tensors observed" not in n]
        return d

    a, b = without_counts(pruned), without_counts(full)
    assert pruned.by_role("activation") and a["nodes"] and a["tensors"]
    # Ranges may differ in the last bits: which tensors a calibration session exposes decides which
    # of onnxruntime's fusions apply (small_cnn's float stem: calibrating its Conv output keeps its
    # BatchNormalization unfused), and the fused form rounds differently.
    _assert_same_plan(a, b)


def _assert_same_plan(a, b, where="plan"):
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_plan(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_plan(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_histogram_calibration_gives_onnxruntime_a_thread_less_when_the_observer_is_slower(monkeypatch):
    """The first batch is observed in sequence and timed against a warm rerun: an observer slower
    than onnxruntime (here made so) moves the rest of the pass to a session with one thread less,
    and the batches still reach the observers in order: the same plan as at one thread."""
    from graph_opt.kernels.calib import HistogramObserver

    model = small_cnn(seed=3)
    data = random_dataset(model, 40, seed=6)
    real_update, real_exposing = HistogramObserver.update, quantize_mod._exposing
    threads = []

    def slow_update(self, x, **kw):
        time.sleep(0.01)
        real_update(self, x, **kw)

    alive = []  # each earlier session, seen through a weak reference

    def spy(m, tensors, n, features=None):
        threads.append(n)
        # One session at a time: each holds the weights, so the first is gone before the second.
        assert not any(ref() is not None for ref in alive), "an earlier calibration session is still alive"
        session, reduced = real_exposing(m, tensors, n, features)
        alive.append(weakref.ref(session))
        return session, reduced

    monkeypatch.setattr(quantize_mod, "cores", lambda n: n or 4)
    monkeypatch.setattr(quantize_mod, "_exposing", spy)
    monkeypatch.setattr(HistogramObserver, "update", slow_update)
    switched = Quantize(calibration="percentile", sensitivity_snr_db=None, batch_size=8).plan(model, data)
    assert threads == [0, 3]
    threads.clear()
    one = Quantize(calibration="percentile", sensitivity_snr_db=None, batch_size=8, threads=1).plan(model, data)
    assert threads == [1]
    assert switched.by_role("activation") and switched.to_json(compact=False) == one.to_json(compact=False)


def test_minmax_falls_back_to_exposed_tensors_when_onnxruntime_cannot_reduce_one(monkeypatch):
    """A bool tensor among the candidates: ReduceMin has no bool kernel at opset 17, so the
    reducing copy does not load; the tensors are exposed instead and the float32 one observed."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph = helper.make_graph([helper.make_node("Greater", ["x", "zero"], ["b"]),
                               helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)], "g", [x], [y], [zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    values = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    exposed = []
    real = quantize_mod._exposing

    def spy(m, tensors, threads, features=None):
        exposed.append(list(tensors))
        return real(m, tensors, threads, features)

    monkeypatch.setattr(quantize_mod, "_exposing", spy)
    obs = quantize_mod.calibrate(model, Dataset({"x": values}), ["b", "y"], "minmax", batch_size=4)
    assert exposed == [["b", "y"]]
    assert list(obs) == ["y"] and (obs["y"].min, obs["y"].max, obs["y"].count) == (0.0, 1.0, values.size)


def test_minmax_on_a_model_with_a_static_batch_runs_one_sample_at_a_time_without_exposing(monkeypatch):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["m"]), helper.make_node("Exp", ["m"], ["y"])],
                              "g", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    values = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("the tensors were exposed")

    monkeypatch.setattr(quantize_mod, "_exposing", refuse)
    obs = quantize_mod.calibrate(model, Dataset({"x": values}), ["m", "y"], "minmax")
    assert (obs["m"].min, obs["m"].max, obs["m"].count) == (2 * values.min(), 2 * values.max(), values.size)


def _record_batch_sizes(monkeypatch) -> list[int]:
    """The number of samples of every batch quantize's sessions run, in order (filled as they run)."""
    sizes: list[int] = []

    def spy(session, names, data, batch_size, desc, **kw):
        for feed, outs in runtime.run_batches(session, names, data, batch_size, desc, **kw):
            sizes.append(len(next(iter(feed.values()))))
            yield feed, outs

    for module in (quantize_mod, sensitivity_mod):
        monkeypatch.setattr(module, "run_batches", spy)
    return sizes


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_automatic_batches_follow_the_memory_budget_and_change_nothing(method, monkeypatch):
    model = FoldBatchnorm()(small_cnn()).model
    data = random_dataset(model, 24, seed=3)
    sizes = _record_batch_sizes(monkeypatch)
    fixed = Quantize(calibration=method, batch_size=24).plan(model, data)
    assert sizes == [24, 16]  # calibration in one batch; sensitivity on its 16 samples
    sizes.clear()
    # Sessions that reduce inside onnxruntime return scalars: after the first sample their batches
    # stop at REDUCE_BATCH well under the budget (this model's weights are small); an exposing
    # calibration takes the rest at once.
    default = Quantize(calibration=method).plan(model, data)
    k = runtime.REDUCE_BATCH
    assert sizes == ([1, *_chunks(23, k)] if method == "minmax" else [1, 23]) + [1, *_chunks(15, k)]
    assert [t.range for t in default.by_role("activation")] == [t.range for t in fixed.by_role("activation")]
    sizes.clear()
    # A budget below one sample's outputs: one sample per run, same ranges, same decisions.
    monkeypatch.setattr(runtime, "STREAM_BUDGET_BYTES", 1)
    auto = Quantize(calibration=method).plan(model, data)
    assert set(sizes) == {1} and len(sizes) == 24 + 16
    acts = fixed.by_role("activation")
    assert len(acts) >= 5 and all(auto.tensors[t.tensor].range == t.range for t in acts)
    for d, e in zip(fixed.nodes, auto.nodes):
        assert (d.node, d.action) == (e.node, e.action)
        if d.sensitivity:
            assert e.sensitivity["snr_db"] == pytest.approx(d.sensitivity["snr_db"], abs=0.02)


def _chunks(n: int, k: int) -> list[int]:
    """Batch sizes of n samples taken k at a time."""
    return [k] * (n // k) + ([n % k] if n % k else [])


@pytest.mark.parametrize("budget, weight_bytes, want", [
    (10_000, None, 10),        # exposing: the whole budget, 1,000 bytes per sample
    (6_000, 0, 3),             # reducing: half the budget binds before REDUCE_BATCH
    (1 << 30, 0, 4),           # reducing: REDUCE_BATCH
    (1 << 30, 20_000, 20),     # reducing: as many samples as the weights outweigh
    (30_000, 1 << 30, 15),     # ... within half the budget
])
def test_the_automatic_batch_rule(budget, weight_bytes, want, monkeypatch):
    class Session:
        def run(self, names, feed):
            return [np.zeros(len(feed["x"]))]

    monkeypatch.setattr(runtime, "STREAM_BUDGET_BYTES", budget)
    assert runtime.REDUCE_BATCH == 4
    data = Dataset({"x": np.zeros((100, 3), np.float32)})
    sizes = [len(feed["x"]) for feed, _ in runtime.run_batches(
        Session(), ["y"], data, 0, "test", batch_bytes=lambda outs: 1000 * len(outs[0]), weight_bytes=weight_bytes)]
    assert sizes[:2] == [1, want] and sum(sizes) == 100


def test_reducing_sessions_take_larger_batches_when_the_weights_outweigh_them(monkeypatch):
    """Each run reads every weight once: an MLP whose weights outweigh a sample's tensors by far
    gets large reducing batches, a small CNN REDUCE_BATCH; the ranges do not depend on it."""
    sizes = _record_batch_sizes(monkeypatch)
    heavy = mlp(hidden=256)
    data = random_dataset(heavy, 40, seed=1)
    plan = Quantize(sensitivity_snr_db=None).plan(heavy, data)
    assert sizes == [1, 39]
    one = Quantize(sensitivity_snr_db=None, batch_size=1).plan(heavy, data)
    assert plan.by_role("activation") and plan.to_json(compact=False) == one.to_json(compact=False)
    sizes.clear()
    Quantize(sensitivity_snr_db=None).plan(small_cnn(), random_dataset(small_cnn(), 40, seed=1))
    assert sizes == [1, *_chunks(39, runtime.REDUCE_BATCH)]


def test_sensitivity_on_a_few_samples_finds_the_sensitive_layer():
    w = (np.random.default_rng(1).standard_normal((32, 16)) * 0.3).astype(np.float32)
    w[0] = 0.0
    model = _two_layer_mlp(w)
    data = random_dataset(model, 32, seed=0)
    data.inputs["x"][:4, 0] = 3000.0  # the outlier feature: in the first 4 samples only
    few = Quantize(sensitivity_samples=4)(model, PassContext(data=data)).report
    assert any(s.node == "fc1" and s.reason.startswith("sensitive: SNR") for s in few.skipped)
    assert f"sensitivity threshold {Quantize().threshold_db():g} dB: 1 of" in " ".join(few.notes)
    with pytest.raises(ValueError, match="sensitivity_samples"):
        Quantize(sensitivity_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        Quantize(batch_size=0)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_clipping_methods_tighten_an_outlier_range(method):
    model = conv_chain()
    data = random_dataset(model, 32, seed=4)
    data.inputs["x"][0, 0, 0, 0] = 80.0  # one outlier in 8192 values
    wide = Quantize(calibration="minmax", sensitivity_snr_db=None).plan(model, data).tensors["x"].range
    tight = Quantize(calibration=method, percentile=99.9, sensitivity_snr_db=None).plan(model, data).tensors["x"].range
    assert wide[1] == 80.0 and tight[1] < 20.0


def _outlier_feature_model_and_data(samples=32, tokens=16, features=256, seed=5):
    """x [N, tokens, features] → MatMul: feature 3 reaches 20 at one token of every sample (a
    transformer's outlier dimension), 1 value in 4096 — a tail a 99.9 percentile cuts."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", tokens, features])
    g.node("MatMul", [x, g.weight("w", (features, 32), 0.1)], ["y"], name="proj")
    g.output("y", ["N", tokens, 32])
    model = g.build()
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((samples, tokens, features)).astype(np.float32)
    values[np.arange(samples), rng.integers(0, tokens, samples), 3] = 20.0
    return model, Dataset({"x": values})


def test_clipping_keeps_a_feature_that_is_large_on_every_sample(monkeypatch):
    model, data = _outlier_feature_model_and_data()
    opts = Quantize(calibration="percentile", percentile=99.9, sensitivity_snr_db=None)
    result = opts(model, PassContext(data=data))
    assert_valid(result.model)
    assert op_count(result.model, "QuantizeLinear") == 1 and op_count(result.model, "DequantizeLinear") == 2
    kept = opts.plan(model, data).tensors["x"].range
    assert kept[1] == 20.0
    ref = _outputs(model, data)[0]
    with_floor = cosine(ref, _outputs(result.model, data)[0])
    # Without the floor, the pooled percentile clips the feature to the bulk's tail (~3.5).
    monkeypatch.setattr(quantize_mod, "_feature_axes", lambda ix: None)
    clipped = opts.plan(model, data).tensors["x"].range
    assert clipped[1] < 5.0
    without = cosine(ref, _outputs(opts(model, PassContext(data=data)).model, data)[0])
    assert with_floor >= 0.999 and without < 0.99, (with_floor, without)
    _assert_deployable(model, result.model, data)


def _outlier_feature_inside(kind, alternate=False):
    """The outlier feature in a tensor the model computes (not a graph input), so that
    onnxruntime reduces its per-feature extremes: a sequence tensor (features last) or an NCHW
    one (channels on axis 1). ``alternate``: the peak moves to another feature every other
    sample, so that no feature is large on every sample (though every sample has a peak)."""
    rng = np.random.default_rng(11)
    g = GraphBuilder(seed=11)
    if kind == "sequence":
        x = g.input("x", ["N", 16, 256])
        h = g.node("Add", [x, g.weight("shift", (256,), 0.01)], ["h"])
        g.node("MatMul", [h, g.weight("w", (256, 32), 0.1)], ["y"], name="proj")
        g.output("y", ["N", 16, 32])
        values = rng.standard_normal((32, 16, 256)).astype(np.float32)
        values[np.arange(32), rng.integers(0, 16, 32), 3 + 16 * (np.arange(32) % 2 if alternate else 0)] = 20.0
    else:
        x = g.input("x", ["N", 64, 24, 24])
        h = g.node("Add", [x, g.weight("shift", (64, 1, 1), 0.01)], ["h"])
        g.node("Conv", [h, g.weight("w", (8, 64, 1, 1), 0.1)], ["y"], name="proj", kernel_shape=[1, 1])
        g.output("y", ["N", 8, 24, 24])
        values = rng.standard_normal((16, 64, 24, 24)).astype(np.float32)
        channel = 2 + 4 * (np.arange(16) % 2 if alternate else 0)
        values[np.arange(16), channel, rng.permutation(24)[:16], rng.integers(0, 24, 16)] = 20.0
    return g.build(), Dataset({"x": values})


@pytest.mark.parametrize("kind", ["sequence", "nchw"])
def test_per_feature_extremes_reduced_inside_onnxruntime_equal_numpys(kind, monkeypatch):
    model, data = _outlier_feature_inside(kind)
    opts = Quantize(calibration="percentile", percentile=99.9, sensitivity_snr_db=None, batch_size=5)
    inside = quantize_mod._inside_features(model, ["h"], quantize_mod._feature_axes(quantize_mod.GraphIndex(model)))
    assert inside == {"h": (2, 256) if kind == "sequence" else (1, 64)}
    updates = {}  # observed tensor's shape -> how each batch came: with onnxruntime's extremes?
    real = quantize_mod.HistogramObserver.update

    def spy(self, x, **kw):
        updates.setdefault(x.shape[1:], []).append("feature_extremes" in kw)
        real(self, x, **kw)

    monkeypatch.setattr(quantize_mod.HistogramObserver, "update", spy)
    plan = opts.plan(model, data)
    shape = data.inputs["x"].shape[1:]
    assert updates[shape] == [True] * -(-len(data) // 5)  # h, batch after batch
    shift = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "shift"))
    h = data.inputs["x"] + shift
    feature = h[:, :, 3] if kind == "sequence" else h[:, 2]
    floor = feature.reshape(len(h), -1).max(axis=1).min()
    assert plan.tensors["h"].range[1] == floor
    monkeypatch.setattr(quantize_mod, "_inside_features", lambda *a: {})
    updates.clear()
    by_numpy = opts.plan(model, data)
    assert updates[shape] == [False] * -(-len(data) // 5)
    assert by_numpy.to_json(compact=False) == plan.to_json(compact=False)
    # Peaks in every sample but never the same feature twice in a row: nothing to keep, the
    # percentile clips them, reduced inside onnxruntime or not.
    model, data = _outlier_feature_inside(kind, alternate=True)
    clipped = opts.plan(model, data)
    assert clipped.tensors["h"].range[1] < 10.0
    monkeypatch.undo()
    assert opts.plan(model, data).to_json(compact=False) == clipped.to_json(compact=False)


def test_feature_axes_only_for_tensors_read_linearly():
    g = GraphBuilder(seed=0)
    x = g.input("x", ["N", 8, 6, 6])
    c = g.conv(x, 8, 8, name="c")
    s = g.node("Sigmoid", [c])
    m = g.node("Mul", [c, s])                          # SiLU: c is bent before anything uses it
    seq = g.input("seq", ["N", 5, 16])
    h = g.node("MatMul", [seq, g.weight("w", (16, 16))])
    line = g.input("line", ["N", 8, 10])
    l2 = g.node("Conv", [line, g.weight("lw", (8, 8, 3))], kernel_shape=[3])
    g.output(m, ["N", 8, 6, 6]), g.output(h, ["N", 5, 16]), g.output(l2, ["N", 8, 8])
    ix = quantize_mod.GraphIndex(g.build())
    axis = quantize_mod._feature_axes(ix)
    assert axis(x, 4) == 1 and axis(m, 4) is None       # m: a graph output nothing reads
    assert axis(c, 4) is None                           # read by Sigmoid and Mul
    assert axis(seq, 3) == 2 and axis(line, 3) == 1     # features last; a Conv1d's channels
    assert axis(seq, 1) is None                         # no feature axis below rank 2


# ----------------------------------------------------------------------------- placement rules


def detector_head(seed=0):
    """Boxes in pixels (hundreds) and class probabilities (0..1) concatenated into one output."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 16, 4, 4])  # 16 input channels: not too small for int8 (MIN_INT8_REDUCTION)
    box = g.node("Conv", [x, g.weight("box.w", (4, 16, 1, 1), 60.0)], name="box", kernel_shape=[1, 1])
    logit = g.node("Conv", [x, g.weight("cls.w", (3, 16, 1, 1), 0.28)], name="cls", kernel_shape=[1, 1])
    prob = g.node("Sigmoid", [logit])
    g.node("Concat", [box, prob], ["out"], name="concat", axis=1)
    g.output("out", ["N", 7, 4, 4])
    return g.build()


def test_detector_concat_with_mismatched_ranges_keeps_probabilities_accurate():
    model = detector_head()
    result = Quantize()(model, _ctx(model, 32))
    out = result.model
    assert_valid(out)
    skip = {s.node: s.reason for s in result.report.skipped}
    assert "ranges differ" in skip["concat"]
    rewritten = {e["node"] for e in result.report.rewritten}
    assert {"box", "cls"} <= rewritten  # the convs are still quantized, each with its own output scale
    test = random_dataset(model, 16, seed=8)
    ref, got = _outputs(model, test)[0], _outputs(out, test)[0]
    assert np.max(np.abs(ref[:, :4])) > 100 * CONCAT_RANGE_RATIO / 10  # vacuity: boxes span hundreds
    assert np.max(np.abs(ref[:, 4:] - got[:, 4:])) <= 0.02
    # One shared 8-bit scale over the concatenated range would have a step of ~range/255 > 1.
    assert (np.max(ref) - np.min(ref)) / 255 > 1.0
    fused = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.max(np.abs(ref[:, 4:] - fused.run(None, test.inputs)[0][:, 4:])) <= 0.02


def test_attention_style_matmul_is_left_float():
    g = GraphBuilder()
    q = g.input("q", ["N", 4, 8])
    k = g.input("k", ["N", 8, 4])
    g.output(g.node("MatMul", [q, k], ["y"], name="scores"), ["N", 4, 4])
    model = g.build()
    result = Quantize()(model, _ctx(model))
    assert not result.modified
    assert "both operands are activations" in result.report.skipped[0].reason


def test_exclude_and_keep_float():
    model = conv_chain()
    result = Quantize(exclude=("c2",))(model, _ctx(model))
    assert {e["node"] for e in result.report.rewritten if e["op"] == "Conv"} == {"c1"}
    assert "exclude" in {s.node: s.reason for s in result.report.skipped}["c2"]
    assert "c2.w" in _float_weight_names(result.model)
    result = Quantize(exclude=("Conv",))(model, _ctx(model))
    assert not result.modified
    result = Quantize(keep_float=("y",))(model, _ctx(model))
    c2 = {e["node"]: e for e in result.report.rewritten}["c2"]
    assert c2["output"] == "float" and "keep_float" in c2["note"]
    assert op_count(result.model, "QuantizeLinear") == 3  # x, c1 Relu output, the MaxPool (shared scale)


def test_shared_weight_is_skipped():
    g = GraphBuilder()
    x = g.input("x", ["N", 8])
    w = g.weight("shared.w", (8, 8))
    h = g.node("MatMul", [x, w], name="m1")
    g.output(g.node("MatMul", [h, w], ["y"], name="m2"), ["N", 8])
    result = Quantize()(g.build())
    assert not result.modified
    assert all("shared" in s.reason for s in result.report.skipped)


def _two_layer_mlp(w1):
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 32])
    h = g.node("Relu", [g.node("MatMul", [x, g.const("fc1.w", w1)], name="fc1")])
    g.output(g.node("MatMul", [h, g.weight("fc2.w", (16, 8), 0.3)], ["y"], name="fc2"), ["N", 8])
    return g.build()


def test_probe_names_avoid_every_name_of_the_model_graph_inputs_included():
    """The sensitivity copy names its probes from the tensors they read ('x' → 'x_probe_q'); a
    graph input already called that (one no node reads) must not be reused, or the copy does
    not load and nothing is measured."""
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 32])
    g.input("x_probe_q", ["N", 16])
    h = g.node("Relu", [g.node("MatMul", [x, g.weight("fc1.w", (32, 16), 0.3)], name="fc1")])
    g.output(g.node("MatMul", [h, g.weight("fc2.w", (16, 8), 0.3)], ["y"], name="fc2"), ["N", 8])
    model = g.build()
    plan = Quantize().plan(model, random_dataset(model, 16, seed=0))
    assert not any("sensitivity not measured" in n for n in plan.notes)
    assert {d.node for d in plan.nodes if d.sensitivity} >= {"fc1", "fc2"}


def test_layer_with_lossy_activations_falls_back_to_weight_only():
    w = (np.random.default_rng(1).standard_normal((32, 16)) * 0.3).astype(np.float32)
    w[0] = 0.0  # the outlier feature carries no signal, but it sets the input's range
    model = _two_layer_mlp(w)
    data = random_dataset(model, 32, seed=0)
    data.inputs["x"][:, 0] = 3000.0
    by_default = Quantize()(model, PassContext(data=data))  # sensitive='float': fc1 stays float entirely
    assert "fc1" not in {e["node"] for e in by_default.report.rewritten}
    assert any(s.node == "fc1" and s.reason.startswith("sensitive: SNR") for s in by_default.report.skipped)
    result = Quantize(sensitive="weight_only")(model, PassContext(data=data))
    entries = {e["node"]: e for e in result.report.rewritten}
    fc1 = entries["fc1"]
    assert fc1["input"] == "float" and "weight-only: quantized activations too lossy" in fc1["note"]
    t = Quantize().threshold_db()  # 25 dB, 30 on a CPU whose int8 weights are 7-bit
    assert f"dB < {t:g} dB" in fc1["note"] and fc1["snr_db"] < t
    assert entries["fc2"]["input"] != "float" and entries["fc2"]["snr_db"] > t
    assert "x_scale" not in {t.name for t in result.model.graph.initializer}  # the input stays float
    # Its weight, quantized for the static first placement (7-bit grid), is quantized again for the
    # weight-only one: the full int8 grid; fc2 keeps its 7-bit grid.
    plan = Quantize(sensitive="weight_only", target="x86-avx2").plan(model, data)  # a 7-bit target
    codes = {d.node: np.abs(plan.tensors[d.weight].codes).max() for d in plan.nodes if d.weight}
    assert codes == {"fc1": 127, "fc2": 63}
    test = Dataset({"x": data.inputs["x"][:16]})
    assert cosine(_outputs(model, test)[0], _outputs(result.model, test)[0]) >= 0.999
    _assert_deployable(model, result.model, test)
    # Without the check the layer would be ruined.
    blind = Quantize(sensitivity_snr_db=None)(model, PassContext(data=data)).model
    assert cosine(_outputs(model, test)[0], _outputs(blind, test)[0]) < 0.99


def _diluted_and_exposed_layers(tokens: int | None = None):
    """fc1's input range is set by a silent outlier feature, so fc1 alone is lossy, but its output
    is added to a residual that dwarfs it; fc2 is as lossy and feeds an output of its own. Two
    score-per-class outputs ([N, 32], [N, 8]: a classifier's shape), or with `tokens` one row of
    features per token ([N, tokens, ·]: not a classifier's)."""
    rng = np.random.default_rng(1)
    g = GraphBuilder(seed=1)
    lead = ["N"] if tokens is None else ["N", tokens]
    x, z = g.input("x", [*lead, 32]), g.input("z", [*lead, 32])
    w1 = (rng.standard_normal((32, 32)) * 0.003).astype(np.float32)
    w1[0] = 0.0
    w2 = (rng.standard_normal((32, 8)) * 0.3).astype(np.float32)
    w2[0] = 0.0
    g.output(g.node("Add", [x, g.node("MatMul", [x, g.const("fc1.w", w1)], name="fc1")], ["y"], name="residual"),
             [*lead, 32])
    g.output(g.node("MatMul", [z, g.const("fc2.w", w2)], ["y2"], name="fc2"), [*lead, 8])
    model = g.build()
    data = random_dataset(model, 32, seed=0)
    data.inputs["x"][..., 0] = 100.0
    data.inputs["z"][..., 0] = 30000.0  # fc2 is the least robust of the two on its own
    return model, data


@pytest.mark.parametrize("tokens", [None, 4], ids=["classifier", "per-token"])
def test_sensitive_layer_whose_error_does_not_reach_the_outputs_is_quantized(tokens):
    model, data = _diluted_and_exposed_layers(tokens)
    result = Quantize(prefer="size")(model, PassContext(data=data))
    plan = Quantize(prefer="size").plan(model, data)
    local = {d.node: d.sensitivity["snr_db"] for d in plan.nodes if d.sensitivity}
    t = Quantize().threshold_db()  # 25 dB, 30 on a CPU whose int8 weights are 7-bit
    assert local["fc1"] < t and local["fc2"] < local["fc1"]  # both fail on their own
    assert "fc1" in {e["node"] for e in result.report.rewritten}
    skipped = {s.node: s.reason for s in result.report.skipped}
    assert skipped["fc2"].startswith("sensitive: SNR") and "fc1" not in skipped
    # A classifier's floor is the base 25 dB + 10 (its top classes checked too); any other model's
    # is the threshold + 10, which on a 7-bit grid includes its 5 dB increment.
    floor = (Quantize().threshold_db(reduced_grid=False) if tokens is None else t) + 10
    note = next(n for n in plan.notes if n.startswith("sensitivity: 1 of"))
    assert note.startswith(f"sensitivity: 1 of 2 nodes below {t:g} dB on their own quantized anyway: the model's "
                           f"outputs hold {floor:g} dB")
    assert note.endswith(", every top class kept)") == (tokens is None)
    assert "fc1.w" not in _float_weight_names(result.model) and "fc2.w" in _float_weight_names(result.model)
    assert_valid(result.model)
    test = random_dataset(model, 16, seed=3)
    test.inputs["x"][..., 0], test.inputs["z"][..., 0] = 100.0, 30000.0
    ref, got = _outputs(model, test), _outputs(result.model, test)
    assert snr_db(ref[0], got[0]) >= floor and np.array_equal(ref[1], got[1])  # y2 stays exact: fc2 is float
    _assert_deployable(model, result.model, test)
    # An explicit threshold is a per-node rule: fc1 stays float, as its own SNR says.
    explicit = Quantize(prefer="size", sensitivity_snr_db=25.0)(model, PassContext(data=data)).report
    assert {"fc1", "fc2"} <= {s.node for s in explicit.skipped if s.reason.startswith("sensitive: SNR")}


def test_a_classifier_admits_no_node_that_changes_a_top_class(monkeypatch):
    verify = importlib.import_module("graph_opt.verify")  # the module (graph_opt.verify is also a function)
    model, data = _diluted_and_exposed_layers()
    real = verify.compare_outputs

    def one_swapped(reference, candidate, **kwargs):  # every trial model loses one check sample's top class
        report = real(reference, candidate, **kwargs)
        for o in report.outputs:
            o.top1 = min(o.top1, 0.9) if o.top1 is not None else None
        return report

    monkeypatch.setattr(verify, "compare_outputs", one_swapped)
    plan = Quantize(prefer="size").plan(model, data)
    kept = {d.node for d in plan.nodes if d.action == "float" and d.sensitivity is not None}
    assert kept == {"fc1", "fc2"}  # fc1's outputs hold the SNR floor, but a top class moved: not admitted
    assert not any(n.startswith("sensitivity: 1 of") for n in plan.notes)


def test_layer_whose_weights_do_not_survive_stays_float():
    w = (np.random.default_rng(1).standard_normal((32, 16)) * 0.3).astype(np.float32)
    w[0] = 1000.0  # one huge weight per output channel sets every channel's scale ...
    model = _two_layer_mlp(w)
    data = random_dataset(model, 32, seed=0)
    data.inputs["x"][:, 0] = 0.0  # ... and multiplies a silent input: the rest of the weights round to 0
    # Even the weight-only fallback is measured too lossy (its SNR is in the reason), so fc1 stays float.
    result = Quantize(sensitive="weight_only")(model, PassContext(data=data))
    skipped = {s.node: s.reason for s in result.report.skipped}
    assert skipped["fc1"].startswith("sensitive: SNR") and f"dB < {Quantize().threshold_db():g} dB" in skipped["fc1"]
    assert "weight_only_snr_db" in skipped["fc1"]
    # The default (sensitive='float') never needs the weight-only SNR, so it does not measure it.
    default = {s.node: s.reason for s in Quantize()(model, PassContext(data=data)).report.skipped}
    assert default["fc1"].startswith("sensitive: SNR") and "weight_only_snr_db" not in default["fc1"]
    assert "fc1.w" in _float_weight_names(result.model)
    assert {e["node"] for e in result.report.rewritten} == {"fc2"}
    test = Dataset({"x": data.inputs["x"][:16]})
    assert cosine(_outputs(model, test)[0], _outputs(result.model, test)[0]) >= 0.999


def test_factorized_layers_are_quantized_too():
    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 32])
    h = g.gemm(x, 32, 8, bias=False, name="lowrank_a")  # a factorized Gemm: two thin layers
    y = g.gemm(h, 8, 16, name="lowrank_b")
    g.output(g.node("Relu", [y], ["y"]), ["N", 16])
    model = g.build()
    result = Quantize()(model, _ctx(model, 32))
    assert {e["node"] for e in result.report.rewritten} >= {"lowrank_a", "lowrank_b"}
    test = random_dataset(model, 16, seed=5)
    assert cosine(_outputs(model, test)[0], _outputs(result.model, test)[0]) >= 0.999
    _assert_deployable(model, result.model, test)


def test_already_quantized_model_is_never_quantized_twice():
    model = conv_chain()
    once = Quantize()(model, _ctx(model)).model
    again = Quantize()(once, _ctx(model))
    assert not again.modified
    reasons = [s.reason for s in again.report.skipped]
    assert any("already quantized" in r for r in reasons)
    assert again.model.SerializeToString() == once.SerializeToString()


def test_nothing_to_do_leaves_the_model_untouched():
    g = GraphBuilder()
    g.output(g.node("Relu", [g.input("x", ["N", 4])], ["y"]), ["N", 4])
    model = g.build()
    result = Quantize()(model, _ctx(model))
    assert not result.modified and result.model.SerializeToString() == model.SerializeToString()
    # quantize reads the caller's model without copying it (edits_input=False), but never hands
    # it back: editing the result must not edit the input.
    assert not Quantize.edits_input and result.model is not model


def test_options_are_validated():
    with pytest.raises(ValueError, match="op_types"):
        Quantize(op_types=("Add",))
    with pytest.raises(ValueError, match="block_size"):
        Quantize(block_size=-1)


def test_report_carries_a_compact_json_plan_and_apply_is_separate():
    model = FoldBatchnorm()(small_cnn()).model
    data = random_dataset(model, 16)
    result = Quantize()(model, PassContext(data=data))
    [note] = [n for n in result.report.notes if n.startswith("plan: ")]
    plan = json.loads(note[len("plan: "):])
    assert len(note) < 20000
    roles = {t["role"] for t in plan["tensors"]}
    assert roles == {"weight", "bias", "activation"}
    json.dumps(result.report.to_dict())  # the whole report is JSON-serializable
    # The plan alone determines the rewrite.
    q = Quantize()
    again = apply_plan(model, q.plan(model, data))
    assert again.SerializeToString() == result.model.SerializeToString()


def test_weight_in_a_constant_node_is_replaced_and_the_node_removed():
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", 16])
    w = (g.rng.standard_normal((16, 8)) * 0.5).astype(np.float32)
    g.node("Constant", [], ["cw"], name="const_w", value=onnx.numpy_helper.from_array(w, "cw"))
    g.output(g.node("MatMul", [x, "cw"], ["y"], name="mm"), ["N", 8])
    model = g.build()
    result = Quantize(activations="none")(model)
    assert op_count(result.model, "Constant") == 0 and op_count(result.model, "DequantizeLinear") == 1
    assert_valid(result.model)
    got = _dq_outputs(result.model, ["cw"], random_dataset(model, 2).inputs)["cw"]
    np.testing.assert_array_equal(got, fake_quantize(w, compute_params(w, "int8", axis=1)))


def test_layers_inside_subgraphs_are_reported_not_silently_left():
    def branch(name, scale):
        w = onnx.numpy_helper.from_array((np.ones((4, 4)) * scale).astype(np.float32), f"{name}.w")
        node = helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}_y"], name=f"{name}_mm")
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
        return helper.make_graph([node], name, [], [out], [w])
    g = GraphBuilder()
    g.input("x", ["N", 4])  # read by both branches (outer scope)
    cond = g.input("cond", [], dtype=np.bool_)
    y = g.node("If", [cond], ["branch_y"], name="if", then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    g.output(g.node("MatMul", [y, g.weight("top.w", (4, 4))], ["y"], name="top"), ["N", 4])
    model = g.build()
    result = Quantize(activations="none")(model)
    assert {e["node"] for e in result.report.rewritten} == {"top"}
    reason = {s.node: s.reason for s in result.report.skipped}["if"]
    assert "2 Conv/Gemm/MatMul inside its subgraphs" in reason


def test_batchnorm_after_a_conv_is_folded_so_the_output_stays_int8():
    from builders import conv_bn_model

    model = conv_bn_model(cin=8, cout=16)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)  # vacuity guard
    data = random_dataset(model, 16, seed=0)
    result = Quantize()(model, PassContext(data=data))
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert any("folded 1 BatchNormalization" in n for n in result.report.notes)
    assert_valid(result.model)
    assert cosine(_outputs(model, data)[0], _outputs(result.model, data)[0]) >= 0.999


def test_auto_sensitivity_thresholds():
    vnni, avx2 = "x86-avx512-vnni", "x86-avx2"
    assert Quantize(target=vnni).threshold_db() == 25.0 and Quantize(target=vnni, weights="uint8").threshold_db() == 25.0
    # int8 weights on a 7-bit grid (x86 without int8 dot products) carry more noise: 5 dB more
    assert Quantize(target=avx2).threshold_db() == 30.0 and Quantize(target=avx2, reduce_range=False).threshold_db() == 25.0
    assert Quantize(target=avx2, weights="uint8").threshold_db() == 25.0  # uint8 weights keep their 8 bits
    assert Quantize(target=avx2, activations="none").threshold_db() == 25.0  # weight-only: no 7-bit grid
    assert Quantize(reduce_range=True).threshold_db() == 30.0 and Quantize(reduce_range=False).threshold_db() == 25.0
    assert Quantize(weights="int4").threshold_db() == 10.0 and Quantize(weights="ternary").threshold_db() is None
    assert Quantize(sensitivity_snr_db=18.0).threshold_db() == 18.0


def test_tiny_stem_conv_on_the_graph_input_stays_float():
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 1, 8, 8])
    h = g.node("Relu", [g.node("Conv", [x, g.weight("stem.w", (8, 1, 3, 3), 0.5)], name="stem",
                               kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    y = g.node("Conv", [h, g.weight("body.w", (8, 8, 3, 3), 0.2)], name="body", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output(g.node("Relu", [y], ["y"]), ["N", 8, 8, 8])
    model = g.build()
    assert op_count(model, "QuantizeLinear") == 0  # vacuity
    result = Quantize()(model, _ctx(model, 32))
    skipped = {s.node: s.reason for s in result.report.skipped}
    assert "reduction of 9 < 16" in skipped["stem"]
    assert {e["node"] for e in result.report.rewritten} == {"body"}
    assert "stem.w" in _float_weight_names(result.model)
    assert op_count(result.model, "QuantizeLinear") >= 2  # body's input (the stem's float output) and output
    assert_valid(result.model)
    test = random_dataset(model, 8, seed=9)
    _assert_deployable(model, result.model, test)


@pytest.mark.parametrize("channels, quantized", [(3, False), (4, True)])
def test_stem_whose_input_channels_miss_the_fast_int8_kernel_stays_float(channels, quantized):
    """An RGB stem (3 channels, 27 products per output) stays float; 4 channels take the int8 kernel."""
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", channels, 8, 8])
    h = g.node("Relu", [g.node("Conv", [x, g.weight("stem.w", (16, channels, 3, 3), 0.5)], name="stem",
                               kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    y = g.node("Conv", [h, g.weight("body.w", (16, 16, 3, 3), 0.2)], name="body", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output(g.node("Relu", [y], ["y"]), ["N", 16, 8, 8])
    model = g.build()
    result = Quantize()(model, _ctx(model, 32))
    skipped = {s.node: s.reason for s in result.report.skipped}
    rewritten = {e["node"] for e in result.report.rewritten}
    assert rewritten == ({"stem", "body"} if quantized else {"body"})
    assert ("stem.w" in _float_weight_names(result.model)) != quantized
    if not quantized:
        assert f"{channels} input channels per group on the graph input" in skipped["stem"]
    assert_valid(result.model)
    _assert_deployable(model, result.model, random_dataset(model, 8, seed=9))


def test_depthwise_stem_is_not_held_to_the_channel_rule():
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", 16, 8, 8])
    h = g.node("Relu", [g.node("Conv", [x, g.weight("dw.w", (16, 1, 5, 5), 0.5)], name="dw", group=16,
                               kernel_shape=[5, 5], pads=[2, 2, 2, 2])])
    y = g.node("Conv", [h, g.weight("pw.w", (16, 16, 1, 1), 0.3)], name="pw", kernel_shape=[1, 1])
    g.output(g.node("Relu", [y], ["y"]), ["N", 16, 8, 8])
    model = g.build()
    result = Quantize()(model, _ctx(model, 32))
    assert {e["node"] for e in result.report.rewritten} == {"dw", "pw"}, result.report.skipped
    assert "dw.w" not in _float_weight_names(result.model)
    assert_valid(result.model)
    _assert_deployable(model, result.model, random_dataset(model, 8, seed=9))


# ---- mixed precision under a fidelity floor (min_snr_db) ----

def _example():
    from graph_opt.example import example_calibration, example_model

    return example_model(), example_calibration()


def test_min_snr_db_below_the_achieved_snr_changes_nothing():
    from graph_opt.verify import verify

    model, data = _example()
    plain = Quantize()(model, PassContext(data=data))
    floored = Quantize(min_snr_db=20.0)(model, PassContext(data=data))
    assert verify(model, plain.model, data).snr_db >= 20.0
    assert op_count(floored.model, "QuantizeLinear") == op_count(plain.model, "QuantizeLinear") > 0
    assert [e["node"] for e in floored.report.rewritten] == [e["node"] for e in plain.report.rewritten]
    assert any("holds the floor" in n for n in floored.report.notes)


def test_min_snr_db_keeps_the_least_robust_layers_float_until_the_floor_holds():
    from graph_opt.verify import verify

    model, data = _example()
    # the floor's mechanism, on the min/max ranges and nearest rounding (with the defaults' output-error
    # ranges and GPTQ rounding, 2 dB above their own SNR is held only with every layer float)
    plain = Quantize(calibration="minmax", rounding="nearest")(model, PassContext(data=data))
    achieved = verify(model, plain.model, data).snr_db
    floor = achieved + 2.0
    result = Quantize(calibration="minmax", rounding="nearest", min_snr_db=floor)(model, PassContext(data=data))
    assert_valid(result.model)
    assert verify(model, result.model, data).snr_db >= floor  # the floor holds on the calibration data
    q_plain, q_floor = op_count(plain.model, "QuantizeLinear"), op_count(result.model, "QuantizeLinear")
    assert 0 < q_floor < q_plain  # still quantized, but fewer layers
    note = next(n for n in result.report.notes if n.startswith("min_snr_db: kept"))
    kept = int(note.split("kept ")[1].split(" of")[0])
    assert kept >= 1
    # the kept layers are the least robust ones of the plain run, in order
    ranked = sorted((e for e in plain.report.rewritten if e.get("weight")), key=lambda e: e["snr_db"])
    assert all(e["node"] not in {r["node"] for r in result.report.rewritten} for e in ranked[:kept])


def test_min_snr_db_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        Quantize(min_snr_db=float("inf"))


def test_sensitivity_sums_inside_onnxruntime_match_numpy():
    # The SNRs come from ReduceSumSquare sums inside onnxruntime; recompute one tensor's output
    # SNR with numpy (fake_quantize of the exposed tensor) and compare.
    from graph_opt.kernels.quant import fake_quantize

    model = FoldBatchnorm()(small_cnn()).model
    data = random_dataset(model, 16, seed=5)
    plan = Quantize(sensitivity_snr_db=0.0).plan(model, data)
    decided = [d for d in plan.nodes if d.sensitivity and "output_snr_db" in d.sensitivity and d.output]
    assert decided
    d = decided[0]
    tq = plan.tensors[d.output]
    session = ort.InferenceSession(_expose(model, [d.output]).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([session.run([d.output], feed)[0] for feed in data.batches(4)]).astype(np.float64)
    err = ref - fake_quantize(ref.astype(np.float32), tq.params())
    want = 10 * np.log10((ref**2).sum() / (err**2).sum())
    assert d.sensitivity["output_snr_db"] == pytest.approx(want, abs=0.02)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_threads_default_to_all_cores_and_do_not_change_the_plan(method, monkeypatch):
    # threads=0 (onnxruntime's one per core) is the default of the calibration and sensitivity
    # sessions; splitting the work differently must give the same plan bit for bit.
    assert Quantize().threads == 0
    model = small_cnn(seed=3)
    data = random_dataset(model, 48, seed=5)
    seen = []

    def spy(m, **kw):
        seen.append(kw.get("threads"))
        return runtime.make_session(m, **kw)

    for module in (quantize_mod, sensitivity_mod):  # the calibration and the sensitivity sessions
        monkeypatch.setattr(module, "make_session", spy)
    default = Quantize(calibration=method).plan(model, data)
    # A histogram method may move to one thread less when its observer is the slower side.
    assert seen and seen[0] == 0 and set(seen) <= {0, max(1, quantize_mod.cores(0) - 1)}
    seen.clear()
    one = Quantize(calibration=method, threads=1).plan(model, data)
    assert set(seen) == {1}
    assert default.by_role("activation") and default.to_json(compact=False) == one.to_json(compact=False)
    with pytest.raises(ValueError, match="threads"):
        Quantize(threads=-1)


def test_sensitivity_runs_with_basic_optimizations_and_calibration_with_all(monkeypatch):
    """The sensitivity copy runs a few samples: onnxruntime's basic optimizations only, without
    the layout changes that keep reordered copies of the weights; minmax calibration runs every
    sample, with every optimization."""
    assert runtime.session_options(optimize="basic").graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    levels: dict[str, set] = {}

    def spy(m, **kw):
        ops = {n.op_type for n in m.graph.node}
        kind = "sensitivity" if "ReduceSumSquare" in ops else "calibration" if "ReduceMin" in ops else "other"
        levels.setdefault(kind, set()).add(kw.get("optimize"))
        return runtime.make_session(m, **kw)

    for module in (quantize_mod, sensitivity_mod):
        monkeypatch.setattr(module, "make_session", spy)
    model = FoldBatchnorm()(small_cnn()).model
    result = Quantize()(model, PassContext(data=random_dataset(model, 16, seed=0)))
    assert result.modified
    assert levels == {"sensitivity": {"basic"}, "calibration": {True}}


def _moved(g, op, a):
    """`op` applied to the 16-channel 8×8 tensor `a`, then convs back to 8 channels: (output, its side)."""
    if op == "Split":
        g.node("Split", [a, g.const("split", np.array([8, 8], np.int64))], ["s0", "s1"], axis=1)
        return g.node("Add", [g.conv("s0", 8, 8, name="c2"), g.conv("s1", 8, 8, name="c3")]), 8
    if op == "Slice":
        m = g.node("Slice", [a, g.const("st", np.array([4], np.int64)), g.const("en", np.array([12], np.int64)),
                             g.const("ax", np.array([1], np.int64))])
        return g.conv(m, 8, 8, name="c2"), 8
    if op == "Gather":
        return g.conv(g.node("Gather", [a, g.const("idx", np.arange(0, 16, 2, dtype=np.int64))], axis=1), 8, 8,
                      name="c2"), 8
    if op in ("Resize", "Resize-linear"):
        mode = "nearest" if op == "Resize" else "linear"
        m = g.node("Resize", [a, "", g.const("scales", np.array([1, 1, 2, 2], np.float32))], mode=mode)
        return g.conv(m, 16, 8, name="c2"), 16
    assert op == "DepthToSpace"
    return g.conv(g.node("DepthToSpace", [a], blocksize=2), 4, 8, name="c2"), 16


@pytest.mark.parametrize("op", ["Split", "Slice", "Gather", "Resize", "DepthToSpace", "Resize-linear"])
def test_data_movement_between_int8_layers_shares_the_scale_and_runs_in_int8(op, tmp_path):
    """The op's outputs share its input's scale and zero point, so onnxruntime drops the Q/DQ
    around it (int8 in, int8 out, exact); a linear Resize interpolates, and keeps its own pairs."""
    g = GraphBuilder(seed=4)
    a = g.node("Relu", [g.conv(g.input("x", ["N", 4, 8, 8]), 4, 16, name="c1")])
    y, side = _moved(g, op, a)
    g.output(g.node("Relu", [y], ["y"]), ["N", 8, side, side])
    model = g.build()
    result = Quantize()(model, _ctx(model))
    assert_valid(result.model)
    name = op.split("-")[0]
    shared = [e for e in result.report.rewritten if e["op"] == name and "shares its input's scale" in e.get("note", "")]
    ops = optimized_ops(result.model, tmp_path)
    fused = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producer = {o: n for n in fused.node for o in n.output}
    moved = [n for n in fused.node if n.op_type.endswith(name)]
    assert len(moved) == 1
    around = [producer[i].op_type for i in moved[0].input if i in producer]
    around += [n.op_type for n in fused.node if set(n.input) & set(moved[0].output)]
    if op == "Resize-linear":
        assert not shared and "DequantizeLinear" in around and "QuantizeLinear" in around
    else:
        assert len(shared) == 1
        assert "DequantizeLinear" not in around and "QuantizeLinear" not in around, around
        assert ops.count("QLinearConv") >= 2
    test = random_dataset(model, 8, seed=3)
    assert cosine(_outputs(model, test)[0], _outputs(result.model, test)[0]) >= 0.999
    _assert_deployable(model, result.model, test)


def test_a_maxpool_with_indices_is_left_float():
    """Only Split shares its scale over several outputs: a MaxPool's second output holds int64
    indices, which no QuantizeLinear may read."""
    g = GraphBuilder(seed=4)
    a = g.node("Relu", [g.conv(g.input("x", ["N", 4, 8, 8]), 4, 16, name="c1")])
    g.node("MaxPool", [a], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2])
    g.output(g.node("Relu", [g.conv("p", 16, 8, name="c2")], ["y"]), ["N", 8, 4, 4])
    g.output("idx", ["N", 16, 4, 4], dtype=np.int64)
    model = g.build()
    result = Quantize()(model, _ctx(model))
    assert result.modified and op_count(result.model, "QuantizeLinear") >= 2
    assert_valid(result.model)
    assert not [n for n in result.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "idx"]
    assert not [e for e in result.report.rewritten if e["op"] == "MaxPool"]
    test = random_dataset(model, 8, seed=3)
    ref, got = _outputs(model, test), _outputs(result.model, test)
    assert got[1].dtype == np.int64 and got[1].shape == ref[1].shape  # (int8 inputs can tie: other indices)
    assert cosine(ref[0], got[0]) >= 0.999


# ----------------------------------------------------------------------------- GPTQ rounding


def _correlated_mlp_and_data():
    mix = np.random.default_rng(100).standard_normal((96, 96)) * np.exp(-np.arange(96) / 10.0)[None, :]

    def draw(n, seed):
        return (np.random.default_rng(seed).standard_normal((n, 96)) @ mix.T).astype(np.float32)

    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 96])
    h = g.node("MatMul", [x, g.weight("w1", (96, 64), 0.1)], name="fc1")
    y = g.gemm(h, 64, 32, name="fc2")
    g.node("Identity", [y], ["y"])
    g.output("y", ["N", 32])
    return g.build(), Dataset({"x": draw(256, 0)}, None, "calib.npz"), Dataset({"x": draw(128, 1)}, None, "test.npz")


@pytest.mark.parametrize("weights,activations", [("int4", "none"), ("int8", "none"), ("int8", "uint8")])
def test_gptq_rounding_lowers_the_output_error(weights, activations):
    model, calib, test = _correlated_mlp_and_data()
    ref = _outputs(model, test)[0]
    err = {}
    for rounding in ("nearest", "gptq"):
        result = Quantize(weights=weights, activations=activations, rounding=rounding, sensitivity_snr_db=None,
                          target="x86-avx2")(model, PassContext(data=calib))
        assert len(result.report.rewritten) == 2
        assert_valid(result.model)
        err[rounding] = np.linalg.norm(_outputs(result.model, test)[0] - ref) / np.linalg.norm(ref)
        if rounding == "gptq":
            assert any(n.startswith("rounding=gptq: 2 of 2 ") for n in result.report.notes)
            plan = Quantize(weights=weights, activations=activations, rounding="gptq", sensitivity_snr_db=None,
                            target="x86-avx2").plan(model, calib)
            steps = 63 if (weights, activations) == ("int8", "uint8") else symmetric_steps(weights)
            assert all(np.abs(t.codes).max() <= steps for t in plan.by_role("weight"))  # the grid's own limits
    assert err["gptq"] < (0.5 if weights == "int4" else 0.95) * err["nearest"], err


def test_int4_rounding_auto_is_gptq_with_data_and_nearest_without():
    model, calib, _ = _correlated_mlp_and_data()
    auto = Quantize(weights="int4", activations="none", sensitivity_snr_db=None)
    gptq = Quantize(weights="int4", activations="none", sensitivity_snr_db=None, rounding="gptq")
    nearest = Quantize(weights="int4", activations="none", sensitivity_snr_db=None, rounding="nearest")
    codes = {name: [t.codes for t in q.plan(model, calib).by_role("weight")]
             for name, q in (("auto", auto), ("gptq", gptq), ("nearest", nearest))}
    assert any(not np.array_equal(a, b) for a, b in zip(codes["gptq"], codes["nearest"]))  # vacuity
    assert all(np.array_equal(a, b) for a, b in zip(codes["auto"], codes["gptq"]))
    without = [t.codes for t in auto.plan(model, None).by_role("weight")]
    assert all(np.array_equal(a, b) for a, b in zip(without, [t.codes for t in nearest.plan(model, None).by_role("weight")]))
