import re

import numpy as np
import onnx
import pytest
from builders import (GraphBuilder, assert_valid, classifier_head, concat_model, depthwise_model, ffn_model,
                      flatten_model, op_count, random_input, residual_model, run, se_model, small_cnn, split_model)
from onnx import numpy_helper

from graph_opt.data import Dataset
from graph_opt.errors import SpecError
from graph_opt.kernels.importance import ActivationStats
from graph_opt.pass_base import PassContext
from graph_opt.passes.fold_batchnorm import FoldBatchnorm
from graph_opt.passes.prune_channels import PruneChannels, unit_shapes
from graph_opt.registry import parse_spec
from graph_opt.stats import model_stats
from graph_opt.runtime import make_session

FREE = {"keep_first_last": False, "round_to": 1}  # exact ratios; the default rounds kept widths to 4

# name → (builder, input shape); k=1 variants have no zero padding, so every channel is removable exactly
MODELS = {
    "residual_k3": (lambda: residual_model(3), (2, 3, 8, 8)),
    "residual_k1": (lambda: residual_model(1), (2, 3, 8, 8)),
    "concat_k3": (lambda: concat_model(3), (2, 3, 8, 8)),
    "concat_k1": (lambda: concat_model(1), (2, 3, 8, 8)),
    "depthwise": (lambda: depthwise_model(1), (2, 3, 8, 8)),
    "depthwise_mult2_k3": (lambda: depthwise_model(3, mult=2), (2, 3, 8, 8)),
    "se_k1": (lambda: se_model(1), (2, 3, 8, 8)),
    "flatten_gemm": (lambda: flatten_model(), (2, 3, 6, 6)),
    "reshape_gemm": (lambda: flatten_model(use_reshape=True), (2, 3, 6, 6)),
    "ffn_gelu": (lambda: ffn_model("Gelu"), (2, 5, 8)),
    "ffn_gelu_erf": (lambda: ffn_model("gelu_erf"), (2, 5, 8)),
    "ffn_relu_no_bias": (lambda: ffn_model("Relu", bias=False), (2, 5, 8)),
    "split_slice": (lambda: split_model(1), (2, 3, 8, 8)),
}


def _out(model, x):
    return run(model, {"x": x})[0]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))


def _groups(report):
    return [r for r in report.rewritten if "pruned" in r]


def _layers(report):
    return [r for r in report.rewritten if "params_before" in r]


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _stats(model, shape):
    return model_stats(model, shapes=unit_shapes(model) if len(shape) == 3 else None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_then_remove_is_exact_and_remove_shrinks(name):
    build, shape = MODELS[name]
    model = build()
    x = random_input(shape)
    zeroed = PruneChannels(mode="zero", ratio=0.5, **FREE)(model)
    removed = PruneChannels(mode="remove", ratio=0.5, **FREE)(model)
    assert zeroed.modified and removed.modified
    for r in (zeroed, removed):
        assert_valid(r.model)
    # the pass fired: channels chosen, and the same ones in both modes
    assert sum(g["pruned"] for g in _groups(removed.report)) > 0
    assert [g["pruned_channels"] for g in _groups(zeroed.report)] == [g["pruned_channels"] for g in _groups(removed.report)]
    # zeroing keeps shapes and op counts
    assert _stats(zeroed.model, shape).params == _stats(model, shape).params
    # removing the zeroed channels (all their filter weights are 0) changes nothing
    again = PruneChannels(mode="remove", ratio=0.5, **FREE)(zeroed.model)
    assert again.modified
    assert_valid(again.model)
    ref = _out(zeroed.model, x)
    assert _rel(ref, _out(again.model, x)) <= 1e-5
    # and removing directly computes the same function as zeroing (the fold is exact here)
    assert _rel(ref, _out(removed.model, x)) <= 1e-5
    # remove really shrinks parameters and MACs, by the amounts the report states
    s0, s1 = _stats(model, shape), _stats(removed.model, shape)
    layers = _layers(removed.report)
    assert s1.params < s0.params and s1.macs < s0.macs
    assert s0.params - s1.params == sum(r["params_before"] - r["params_after"] for r in layers)
    assert s0.macs - s1.macs == sum(r.get("macs_before", 0) - r.get("macs_after", 0) for r in layers)
    note = next(n for n in removed.report.notes if n.startswith("parameters"))
    assert f"({s1.params - s0.params:+d})" in note and f"({s1.macs - s0.macs:+d})" in note


def test_residual_add_ties_the_stem_and_the_block_output():
    model = residual_model(1)
    result = PruneChannels(ratio=0.5, **FREE)(model)
    tied = next(g for g in _groups(result.report) if g["producers"] == ["stem", "res2"])
    assert tied["pruned"] == 4
    w = _weights(result.model)
    stem_w = next(v for k, v in w.items() if k.startswith("stem.") and v.ndim == 4)
    res2_w = next(v for k, v in w.items() if k.startswith("res2.") and v.ndim == 4)
    res1_w = next(v for k, v in w.items() if k.startswith("res1.") and v.ndim == 4)
    expand_w = next(v for k, v in w.items() if k.startswith("expand.") and v.ndim == 4)
    assert stem_w.shape[0] == res2_w.shape[0] == 4   # both sides of the Add lose the same channels
    assert res1_w.shape == (4, 4, 1, 1) and expand_w.shape == (6, 4, 1, 1)
    assert op_count(result.model, "Add") == 1 and op_count(result.model, "Conv") == 4


def test_concat_maps_channel_ranges_and_keeps_the_raw_input():
    result = PruneChannels(ratio=0.5, **FREE)(concat_model(1))
    groups = {g["node"]: g for g in _groups(result.report)}
    assert groups["branch_a"]["pruned"] == 3 and groups["branch_b"]["pruned"] == 2
    mix = next(v for k, v in _weights(result.model).items() if k.startswith("mix.") and v.ndim == 4)
    assert mix.shape[1] == 3 + 2 + 3  # 13 concatenated channels − 5 pruned; the 3 input channels stay
    bn = [v for k, v in _weights(result.model).items() if v.ndim == 1 and v.size == 8]
    assert bn, "the BatchNormalization after the Concat was sliced to 8 channels"


def test_depthwise_carries_channels_and_updates_group():
    result = PruneChannels(ratio=0.5, **FREE)(depthwise_model(3, mult=2))
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    group = next(a.i for a in dw.attribute if a.name == "group")
    groups = {g["node"]: g for g in _groups(result.report)}
    kept = 8 - groups["pw_in"]["pruned"]
    assert group == kept
    w = _weights(result.model)[dw.input[1]]
    assert w.shape == (2 * kept, 1, 3, 3)


def test_se_block_gate_follows_the_features():
    result = PruneChannels(ratio=0.5, **FREE)(se_model(1))
    groups = {g["node"]: g for g in _groups(result.report)}
    assert groups["feat (+1: se_expand)"]["producers"] == ["feat", "se_expand"]
    assert groups["feat2 (+1: se2_expand)"]["producers"] == ["feat2", "se2_expand"]
    model = result.model
    shape = next(n for n in model.graph.node if n.op_type == "Reshape").input[1]
    assert _weights(model)[shape].tolist() == [-1, 4, 1, 1]  # Reshape [N, C] → [N, C, 1, 1] rewritten


def test_flatten_and_reshape_to_gemm_drop_whole_blocks_of_features():
    for use_reshape in (False, True):
        result = PruneChannels(ratio=0.5, **FREE)(flatten_model(use_reshape))
        w = _weights(result.model)
        fc1 = next(v for k, v in w.items() if k.startswith("fc1.") and v.ndim == 2)
        assert fc1.shape == (8, 4 * 16)  # 4 of 8 channels removed, 16 features each; 8 of 16 units
        if use_reshape:
            target = next(v for v in w.values() if v.dtype == np.int64)
            assert target.tolist() == [-1, 64]


def test_ffn_hidden_units_prune_like_channels():
    model = ffn_model("Gelu")
    result = PruneChannels(ratio=0.25, **FREE)(model)
    w = _weights(result.model)
    shapes = sorted(v.shape for v in w.values() if v.ndim == 2)
    assert shapes == [(8, 24), (24, 8)]
    assert [v.shape for v in w.values() if v.ndim == 1 and v.size in (24, 32)] == [(24,)]
    # the output group is tied to the graph input by the residual Add: left alone, with the reason
    assert any("'x'" in s.reason and "spans the channel axis" in s.reason for s in result.report.skipped)


def test_matmul_without_bias_gets_one_for_the_fold():
    model = ffn_model("Relu", bias=False, seed=3)
    result = PruneChannels(ratio=0.5, **FREE)(model)
    inserted = [r for r in result.report.rewritten if r.get("action") == "inserted bias"]
    assert op_count(result.model, "Add") == op_count(model, "Add") + len(inserted)
    x = random_input((2, 5, 8))
    zeroed = PruneChannels(ratio=0.5, mode="zero", **FREE)(model).model
    assert _rel(_out(zeroed, x), _out(result.model, x)) <= 1e-5


def test_split_sizes_and_slice_bounds_are_rewritten():
    result = PruneChannels(ratio=0.5, **FREE)(split_model(1))
    w = _weights(result.model)
    groups = {g["node"]: g for g in _groups(result.report)}
    dead = set(groups["wide"]["pruned_channels"])
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert w[split.input[1]].tolist() == [4 - len(dead & set(range(4))), 6 - len(dead & set(range(4, 10)))]
    sl = next(n for n in result.model.graph.node if n.op_type == "Slice")
    start, end = int(w[sl.input[1]][0]), int(w[sl.input[2]][0])
    assert (start, end) == (2 - len(dead & {0, 1}), 8 - len(dead & set(range(8))))


# ---------------------------------------------------------------- skips with reasons

def _conv_relu_then(tail_op=None, **attrs):
    g = GraphBuilder()
    a = g.node("Relu", [g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, 1, name="c1")])
    if tail_op:
        a = g.node(tail_op, [a], **attrs)
    g.node("Relu", [g.conv(a, 8, 8, 1, name="c2")], ["y"])
    g.output("y", ["N", 8, 8, 8])
    return g.build()


def test_skip_channels_reaching_a_graph_output():
    g = GraphBuilder()
    a = g.node("Relu", [g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, 1, name="c1")], ["feat"])
    g.output("feat", ["N", 8, 8, 8])
    g.node("Relu", [g.conv(a, 8, 4, 1, name="c2")], ["y"])
    g.output("y", ["N", 4, 8, 8])
    model = g.build()
    result = PruneChannels(ratio=0.5, **FREE)(model)
    assert not result.modified
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert "reach the graph output 'feat'" in reasons["c1"]
    assert "reach the graph output 'y'" in reasons["c2"]
    assert result.model.SerializeToString() == model.SerializeToString()


def test_skip_unknown_op_in_the_group():
    result = PruneChannels(ratio=0.5, **FREE)(_conv_relu_then("LRN", size=3))
    assert not result.modified
    reason = next(s.reason for s in result.report.skipped if s.node == "c1")
    assert "op LRN" in reason and "not understood" in reason


def test_skip_unmappable_reshape():
    g = GraphBuilder()
    x = g.input("x", ["B", 5, 8])
    h = g.node("Relu", [g.node("MatMul", [x, g.weight("w1", (8, 16))], name="fc1")])
    h = g.node("Reshape", [h, g.const("heads", np.array([0, 0, 4, 4], np.int64))])  # splits the 16 units
    g.node("ReduceMean", [h], ["y"], axes=[-1], keepdims=0)
    g.output("y", ["B", 5, 4])
    result = PruneChannels(ratio=0.5, **FREE)(g.build())
    assert not result.modified
    reason = next(s.reason for s in result.report.skipped if s.node == "fc1")
    assert "splits the channel axis" in reason and "[?, 5, 16] → [?, 5, 4, 4]" in reason


def test_skip_grouped_conv():
    g = GraphBuilder()
    a = g.node("Relu", [g.conv(g.input("x", ["N", 8, 8, 8]), 8, 8, 1, name="c1")])
    g.node("Identity", [g.conv(a, 8, 8, 1, group=2, name="grouped")], ["y"])
    g.output("y", ["N", 8, 8, 8])
    result = PruneChannels(ratio=0.5, **FREE)(g.build())
    assert not result.modified
    assert "grouped conv (group=2)" in {s.node: s.reason for s in result.report.skipped}["c1"]


def test_skip_reshape_target_computed_at_run_time():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 4, 4])
    a = g.node("Relu", [g.conv(x, 3, 8, 1, name="c1")])
    bounds = [g.const("s0", np.array([0], np.int64)), g.const("s1", np.array([1], np.int64))]
    batch = g.node("Slice", [g.node("Shape", [x]), *bounds])
    target = g.node("Concat", [batch, g.const("minus1", np.array([-1], np.int64))], axis=0)
    g.node("Identity", [g.gemm(g.node("Reshape", [a, target]), 128, 4, name="fc")], ["y"])
    g.output("y", ["N", 4])
    result = PruneChannels(ratio=0.5, **FREE)(g.build())
    assert not result.modified
    assert "computed at run time" in {s.node: s.reason for s in result.report.skipped}["c1"]


def test_keep_first_last_and_layer_selection():
    model = residual_model(1)
    result = PruneChannels(ratio=0.5)(model)  # keep_first_last on by default
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert "first layer stem" in reasons["stem (+1: res2)"]
    assert "last layer head" in reasons["expand"]
    assert [g["node"] for g in _groups(result.report)] == ["res1"]
    excluded = PruneChannels(ratio=0.5, exclude=("res*",), **FREE)(model)
    assert "not selected" in {s.node: s.reason for s in excluded.report.skipped}["res1"]
    only = PruneChannels(ratio=0.5, include=("expand",), **FREE)(model)
    assert [g["node"] for g in _groups(only.report)] == ["expand"]
    gemm_only = PruneChannels(ratio=0.5, op_types=("Gemm",), **FREE)(model)
    assert not gemm_only.modified


def test_fold_exact_refuses_constants_meeting_padding_and_approximate_bounds_the_error():
    g = GraphBuilder(seed=2)
    a = g.node("Relu", [g.bn(g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, 1, name="c1"), 8)])
    g.node("Identity", [g.conv(a, 8, 4, 3, name="c2")], ["y"])  # 3×3, zero padding 1
    g.output("y", ["N", 4, 8, 8])
    model = g.build()
    x = random_input((2, 3, 8, 8))
    exact = PruneChannels(ratio=0.75, **FREE)(model)
    approx = PruneChannels(ratio=0.75, fold="approximate", **FREE)(model)
    zeroed = PruneChannels(ratio=0.75, fold="approximate", mode="zero", **FREE)(model)
    n_exact = _groups(exact.report)[0]["pruned"] if exact.modified else 0
    assert _groups(approx.report)[0]["pruned"] == 6 > n_exact
    if exact.modified:  # what fold=exact removes is removed exactly
        ref = _out(PruneChannels(ratio=0.75, mode="zero", **FREE)(model).model, x)
        assert _rel(ref, _out(exact.model, x)) <= 1e-5
    note = next(n for n in approx.report.notes if "approximate fold into c2" in n)
    bound = float(re.search(r"<= ([0-9.e+-]+)", note).group(1))
    err = np.abs(_out(zeroed.model, x) - _out(approx.model, x))
    assert err[:, :, 1:-1, 1:-1].max() <= 1e-5      # exact away from the border
    assert 0 < err.max() <= bound * 1.001           # the border error stays under the reported bound


def test_bn_gamma_importance_prunes_the_smallest_gamma():
    model = residual_model(1)
    bn = next(t for t in model.graph.initializer if t.name.endswith(".gamma")
              and any(n.op_type == "BatchNormalization" and n.input[1] == t.name and "res1" in n.input[0]
                      for n in model.graph.node))
    gamma = numpy_helper.to_array(bn).copy()
    gamma[[1, 5]] = 1e-3
    bn.CopyFrom(numpy_helper.from_array(gamma, bn.name))
    result = PruneChannels(ratio=0.25, importance="bn_gamma", **FREE)(model)
    res1 = next(g for g in _groups(result.report) if g["node"] == "res1")
    assert res1["pruned_channels"] == [1, 5]


def test_bn_gamma_without_batchnorm_is_skipped_with_reason():
    model = flatten_model()
    result = PruneChannels(ratio=0.5, importance="bn_gamma", **FREE)(FoldBatchnorm()(model).model)
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert "no BatchNormalization" in reasons["conv"]


@pytest.mark.parametrize("stat", ["mean_abs", "apoz"])
def test_activation_importance_streams_calibration_data(stat):
    model = flatten_model()
    pc = PruneChannels(ratio=0.5, importance="activation", activation_stat=stat, **FREE)
    without = pc(model)
    assert not without.modified and "needs calibration data" in without.report.skipped[0].reason
    data = Dataset({"x": random_input((10, 3, 6, 6))})
    result = pc(model, PassContext(data=data))
    assert result.modified
    assert_valid(result.model)
    # the channels chosen are those with the lowest statistic the consumer (the Flatten → Gemm) saw
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    relu = next(n for n in probe.graph.node if n.op_type == "Relu")
    probe.graph.output.append(onnx.helper.make_tensor_value_info(relu.output[0], onnx.TensorProto.FLOAT, None))
    act = make_session(probe).run([relu.output[0]], data.inputs)[0]
    stats = ActivationStats(8)
    stats.update(act, 1)
    expected = sorted(np.argsort(stats.importance(stat), kind="stable")[:4].tolist())
    conv = next(g for g in _groups(result.report) if g["node"] == "conv")
    assert conv["pruned_channels"] == expected


def test_global_scope_and_zero_ratio():
    model = residual_model(1)
    result = PruneChannels(ratio=0.5, scope="global", **FREE)(model)
    total = sum(g["channels"] for g in _groups(result.report))
    assert sum(g["pruned"] for g in _groups(result.report)) == total // 2
    assert not PruneChannels(ratio=0.0)(model).modified


def test_registry_parses_the_options():
    p = parse_spec("prune_channels:ratio=0.3,mode=zero,importance=bn_gamma,exclude=stem,head,keep_first_last=false")
    assert p == PruneChannels(ratio=0.3, mode="zero", importance="bn_gamma", exclude=("stem", "head"), keep_first_last=False)
    with pytest.raises(SpecError):
        parse_spec("prune_channels:mode=delete")
    with pytest.raises(SpecError):
        parse_spec("prune_channels:ratio=1.5")
    with pytest.raises(ValueError):
        PruneChannels(op_types=("Relu",))


def test_small_cnn_defaults_leave_first_and_last_alone():
    model = small_cnn()
    before = model.SerializeToString()
    result = PruneChannels()(model)
    assert model.SerializeToString() == before
    assert_valid(result.model)
    head = next(v for k, v in _weights(result.model).items() if "head" in k and v.ndim == 2)
    assert head.shape == (10, 16)  # the head's input group touches the first layer: kept


def _op_zoo(opset: int):
    """PRelu, MaxPool, Clip, AveragePool, Pad (edge/reflect), LeakyRelu, ReduceMean gate, per-channel
    Add constant, a residual tie, Split (attribute / input / num_outputs by opset), channel Concat,
    GlobalMaxPool, and Gemms with transB=0, alpha, beta and a missing C."""
    g = GraphBuilder(opset=opset, seed=0)
    rng = np.random.default_rng(5)
    x = g.input("x", ["N", 3, 8, 8])
    a = g.bn(g.conv(x, 3, 8, 1, name="c1"), 8)
    a = g.node("PRelu", [a, g.const("slope", rng.uniform(0, 0.3, (8, 1, 1)).astype(np.float32))])
    a = g.node("MaxPool", [a], kernel_shape=[2, 2], pads=[1, 1, 1, 1], strides=[1, 1])
    a = g.node("Clip", [a, g.const("lo", np.array(-0.5, np.float32)), g.const("hi", np.array(2.0, np.float32))])
    a = g.node("AveragePool", [a], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    a = g.node("Pad", [a, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="edge")
    a = g.node("LeakyRelu", [a], alpha=0.1)
    if opset >= 18:
        m = g.node("ReduceMean", [a, g.const("rax", np.array([2, 3], np.int64))], keepdims=1)
    else:
        m = g.node("ReduceMean", [a], axes=[2, 3], keepdims=1)
    a = g.node("Add", [g.node("Mul", [a, g.node("Sigmoid", [m])]),
                       g.const("perchan", rng.standard_normal((1, 8, 1, 1)).astype(np.float32))])
    b = g.node("Relu", [g.conv(x, 3, 8, 1, name="c2", pads=[0, 0, 0, 0])])
    b = g.node("Pad", [b, g.const("pads2", np.array([0, 0, 1, 1, 0, 0, 2, 2], np.int64))], mode="reflect")
    tied = g.node("Add", [a, b])
    if opset >= 18:
        g.node("Split", [tied], ["p", "q"], axis=1, num_outputs=2)
        n1 = 4
    elif opset >= 13:
        g.node("Split", [tied, g.const("sizes", np.array([3, 5], np.int64))], ["p", "q"], axis=1)
        n1 = 3
    else:
        g.node("Split", [tied], ["p", "q"], axis=1, split=[3, 5])
        n1 = 3
    t = g.node("Concat", [g.conv("p", n1, 6, 1, name="from_p"), g.conv("q", 8 - n1, 6, 1, name="from_q")], axis=1)
    f = g.node("Flatten", [g.node("GlobalMaxPool", [g.node("Relu", [t])])], axis=1)
    h = g.node("Relu", [g.gemm(f, 12, 10, trans_b=0, name="g1", alpha=0.5, beta=2.0)])
    h = g.node("Tanh", [g.gemm(h, 10, 7, bias=False, name="g2", alpha=1.5)])
    g.node("Identity", [g.gemm(h, 7, 4, name="g3")], ["y"])
    g.output("y", ["N", 4])
    return g.build()


@pytest.mark.parametrize("opset", [12, 17, 18])
def test_op_zoo_zero_equals_remove(opset):
    model = _op_zoo(opset)
    x = random_input((2, 3, 8, 8))
    zeroed = PruneChannels(mode="zero", ratio=0.5, **FREE)(model)
    removed = PruneChannels(ratio=0.5, **FREE)(model)
    assert_valid(removed.model)
    assert {g["node"] for g in _groups(removed.report)} == {"c1 (+1: c2)", "from_p", "from_q", "g1", "g2"}
    assert _rel(_out(zeroed.model, x), _out(removed.model, x)) <= 1e-5
    split = next(n for n in removed.model.graph.node if n.op_type == "Split")
    assert not any(a.name == "num_outputs" for a in split.attribute)
    # zeroing is idempotent: a second run has nothing to change and says so
    again = PruneChannels(mode="zero", ratio=0.5, **FREE)(zeroed.model)
    assert not again.modified and again.model.SerializeToString() == zeroed.model.SerializeToString()


def test_a_split_piece_never_empties():
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 3, 4, 4])
    w = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    w[0] *= 1e-3  # the lowest-L1 filter is channel 0, alone in the first Split piece
    a = g.node("Relu", [g.node("Conv", [x, g.const("c1.w", w)], name="c1", kernel_shape=[1, 1])])
    g.node("Split", [a, g.const("sizes", np.array([1, 3], np.int64))], ["p", "q"], axis=1)
    t = g.node("Add", [g.conv("p", 1, 4, 1, name="from_p"), g.conv("q", 3, 4, 1, name="from_q")])
    g.node("Identity", [t], ["y"])
    g.output("y", ["N", 4, 4, 4])
    model = g.build()
    result = PruneChannels(ratio=0.25, **FREE)(model)
    c1 = next(r for r in _groups(result.report) if r["node"] == "c1")
    assert c1["pruned_channels"] != [0] and c1["pruned"] == 1 and c1["kept_so_no_piece_empties"] == 1
    assert_valid(result.model)
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert _weights(result.model)[split.input[1]].tolist() == [1, 2]
    x = random_input((2, 3, 4, 4))
    zeroed = PruneChannels(ratio=0.25, mode="zero", **FREE)(model).model
    assert _rel(_out(zeroed, x), _out(result.model, x)) <= 1e-5


def _random_cnn(seed: int):
    """A random chain of conv-bn-act, residual, depthwise, concat and SE blocks (replay with the seed)."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder(seed=seed)
    c = int(rng.integers(4, 9))
    cur = _cbr_act(g, g.input("x", ["N", 3, 8, 8]), 3, c, int(rng.choice([1, 3])), rng)
    for _ in range(int(rng.integers(3, 7))):
        kind = rng.choice(["cbr", "res", "dw", "cat", "se"])
        k = int(rng.choice([1, 3]))
        if kind == "cbr":
            c2 = int(rng.integers(4, 12))
            cur, c = _cbr_act(g, cur, c, c2, k, rng), c2
        elif kind == "res":
            cur = g.node("Relu", [g.node("Add", [cur, g.bn(g.conv(_cbr_act(g, cur, c, c, k, rng), c, c, k), c)])])
        elif kind == "dw":
            cur = _cbr_act(g, cur, c, c, 3, rng, group=c)
        elif kind == "cat":
            c2 = int(rng.integers(2, 6))
            cur, c = g.node("Concat", [cur, _cbr_act(g, cur, c, c2, k, rng)], axis=1), c + c2
        else:
            s = g.node("GlobalAveragePool", [cur])
            s = g.node("Sigmoid", [g.conv(g.node("Relu", [g.conv(s, c, 2, 1)]), 2, c, 1)])
            cur = g.node("Mul", [cur, s])
    classifier_head(g, cur, c)
    return g.build()


def _cbr_act(g, x, cin, cout, k, rng, **kw):
    act = str(rng.choice(["Relu", "HardSwish", "Sigmoid", "LeakyRelu"]))
    return g.node(act, [g.bn(g.conv(x, cin, cout, k, **kw), cout)])


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_random_cnns_zero_equals_remove(seed):
    model = _random_cnn(seed)
    x = random_input((2, 3, 8, 8), seed=seed)
    for fold in ("exact", "approximate"):
        kw = dict(ratio=0.4, fold=fold, **FREE)
        zeroed = PruneChannels(mode="zero", **kw)(model)
        removed = PruneChannels(**kw)(model)
        assert removed.modified or fold == "exact", f"seed {seed}: nothing pruned"
        assert_valid(removed.model)
        s0, s1 = model_stats(model), model_stats(removed.model)
        layers = _layers(removed.report)
        assert s0.params - s1.params == sum(r["params_before"] - r["params_after"] for r in layers), f"seed {seed}"
        if fold == "exact":
            assert _rel(_out(zeroed.model, x), _out(removed.model, x)) <= 1e-5, f"replay with _random_cnn({seed})"


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_filter_norms_see_through_batchnorm(importance):
    model = residual_model(1, seed=7)
    folded = FoldBatchnorm()(model).model
    assert op_count(folded, "BatchNormalization") == 0
    a = PruneChannels(ratio=0.5, importance=importance, **FREE)(model)
    b = PruneChannels(ratio=0.5, importance=importance, **FREE)(folded)
    # BN scaling does not change which channels are weak: the same ones go with or without BN
    assert [g["pruned_channels"] for g in _groups(a.report)] == [g["pruned_channels"] for g in _groups(b.report)]


def test_round_to_keeps_hardware_friendly_widths():
    model = residual_model(1)
    plain = PruneChannels(ratio=0.5, **FREE)(model)
    rounded = PruneChannels(ratio=0.5, keep_first_last=False)(model)  # the default rounds to 4
    kept_plain = {g["node"]: g["kept"] for g in _groups(plain.report)}
    assert kept_plain["expand"] == 6                         # vacuity guard: half of 12 is not a multiple of 4
    assert {g["node"]: g["kept"] for g in _groups(rounded.report)}["expand"] == 8
    assert any("not multiples of 4" in n for n in plain.report.notes)
    for g in _groups(rounded.report):
        assert g["kept"] % 4 == 0 and g["kept"] >= kept_plain[g["node"]]
    assert not any("not multiples of 4" in n for n in rounded.report.notes)
    assert_valid(rounded.model)
    with pytest.raises(ValueError):
        PruneChannels(round_to=0)


def test_activation_importance_counts_the_positions_the_mask_keeps():
    """Half the hidden units read only the real positions' subspace, half only the padding's (30x
    larger): unmasked mean |a| keeps the padding units, the masked one the units the pooled output uses."""
    from builders import masked_pool_model, padded_data, padding_bases

    real, pad = padding_bases(32)
    rng = np.random.default_rng(3)
    def away_from(basis):  # projector onto the complement of `basis`' rows
        q, _ = np.linalg.qr(basis.T)
        return np.eye(32) - q @ q.T

    w1 = np.concatenate([away_from(pad) @ real.T @ rng.standard_normal((8, 32)),
                         away_from(real) @ pad.T @ rng.standard_normal((8, 32))], axis=1)
    teacher = masked_pool_model()
    for t in teacher.graph.initializer:
        if t.name == "w1":
            t.CopyFrom(numpy_helper.from_array((w1 / 8).astype(np.float32), "w1"))
    calib, held_out = Dataset(padded_data(48, seed=0), source="calib"), padded_data(48, seed=1)
    pruned, errors = {}, {}
    for mask in ("auto", None):
        result = PruneChannels(importance="activation", ratio=0.5, keep_first_last=False, row_mask=mask)(
            teacher, PassContext(data=calib, original=teacher))
        assert result.modified and op_count(result.model, "MatMul") == 2
        assert_valid(result.model)
        (group,) = [e for e in result.report.rewritten if e.get("pruned_channels") is not None]
        pruned[mask] = set(group["pruned_channels"])
        ref, out = run(teacher, held_out)[0], run(result.model, held_out)[0]
        errors[mask] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert pruned["auto"] == set(range(32, 64)) and pruned[None] == set(range(32))
    assert errors["auto"] < 0.5 * errors[None], errors
