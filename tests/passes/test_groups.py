"""The channel dependency analysis on its own: groups, tied channels, mapped positions, reasons."""

import numpy as np
import onnx
import pytest
from builders import (GraphBuilder, assert_valid, concat_model, depthwise_model, ffn_model, flatten_model, random_input,
                      residual_model, run, se_model)
from onnx import helper

from graph_opt.gs_convert import to_graph
from graph_opt.passes._graph import infer_shapes
from graph_opt.passes._groups import analyze, boundary_layers, fold_problems
from graph_opt.passes._groups_layout import _map_axis
from graph_opt.passes.prune_channels import PruneChannels


def _analyze(model):
    graph = to_graph(model)
    graph.toposort()
    return graph, analyze(graph, infer_shapes(model))


def _group(an, *producers):
    for g in an.groups:
        if [p.node.name for p in g.producers] == list(producers):
            return g
    raise AssertionError(f"no group {producers}: {[g.label for g in an.groups]}")


def _chan_into(graph, an, node_name, index=0):
    node = next(n for n in graph.nodes if n.name == node_name)
    return an.chans[node.inputs[index].name]


def test_residual_add_ties_channels_position_by_position():
    graph, an = _analyze(residual_model())
    tied = _group(an, "stem", "res2")
    assert not tied.reasons and len(tied.classes) == 8
    stem, res2 = tied.producers
    np.testing.assert_array_equal(an.class_root[stem.atoms], an.class_root[res2.atoms])
    assert not _group(an, "res1").reasons and not _group(an, "expand").reasons
    assert "graph output 'y'" in _group(an, "head").reasons[0]
    first, last = boundary_layers(graph)
    assert {n.name for n in graph.nodes if id(n) in first} == {"stem"}
    assert {n.name for n in graph.nodes if id(n) in last} == {"head"}


def test_concat_maps_ranges_and_marks_the_raw_input_unprunable():
    graph, an = _analyze(concat_model())
    chan = _chan_into(graph, an, "mix")
    a, b = _group(an, "branch_a").producers[0], _group(an, "branch_b").producers[0]
    np.testing.assert_array_equal(chan.atoms[:6], a.atoms)
    np.testing.assert_array_equal(chan.atoms[6:10], b.atoms)
    raw_groups = an.groups_touching(chan.atoms[10:])
    assert raw_groups.isdisjoint({_group(an, "branch_a").root, _group(an, "branch_b").root})


def test_depthwise_multiplier_repeats_each_channel():
    graph, an = _analyze(depthwise_model(mult=2))
    pw_in = _group(an, "pw_in").producers[0]
    chan = _chan_into(graph, an, "pw_out")
    np.testing.assert_array_equal(chan.atoms, np.repeat(pw_in.atoms, 2))
    assert [e.kind for e in an.edits] == ["group"]


def test_se_gate_is_tied_to_the_features():
    _, an = _analyze(se_model())
    assert len(_group(an, "feat", "se_expand").classes) == 8
    assert len(_group(an, "feat2", "se2_expand").classes) == 8
    assert not _group(an, "se_reduce").reasons


def test_flatten_expands_each_channel_to_its_block_of_features():
    graph, an = _analyze(flatten_model())
    conv = _group(an, "conv").producers[0]
    chan = _chan_into(graph, an, "fc1")
    assert chan.axis == 1 and len(chan.atoms) == 128
    np.testing.assert_array_equal(chan.atoms, np.repeat(conv.atoms, 16))


def test_dead_values_follow_bn_and_activation():
    model = residual_model(1)
    graph, an = _analyze(model)
    chan = _chan_into(graph, an, "res2")  # res1 → BN → Relu → res2
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization" and n.inputs[0].inputs[0].name == "res1")
    g, b, m, v = (w[t.name] for t in bn.inputs[1:5])
    expected = np.maximum(g * (w["res1.b"] - m) / np.sqrt(v + 1e-5) + b, 0)
    np.testing.assert_allclose(chan.value, expected, rtol=1e-12)
    assert not chan.approx.any()


def test_ffn_hidden_units_form_one_group_and_output_is_frozen():
    graph, an = _analyze(ffn_model("gelu_erf"))
    hidden = _group(an, "fc1")
    assert not hidden.reasons and len(hidden.classes) == 32
    assert "'x'" in _group(an, "fc2").reasons[0]
    assert len(an.folds) == 1 and an.folds[0].node.name == "fc2"


def test_fold_problems_exact_versus_approximate():
    g = GraphBuilder(seed=2)
    a = g.node("Relu", [g.bn(g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, 1, name="c1"), 8)])
    g.node("Identity", [g.conv(a, 8, 4, 3, name="c2")], ["y"])
    g.output("y", ["N", 4, 8, 8])
    graph, an = _analyze(g.build())
    value = _chan_into(graph, an, "c2").value
    exact = fold_problems(an, exact=True)
    c1 = _group(an, "c1")
    flagged = np.array([int(c) in exact for c in c1.classes])
    np.testing.assert_array_equal(flagged, value != 0)  # zero constants fold exactly despite padding
    assert fold_problems(an, exact=False) == {}


def test_runtime_multiplier_makes_the_constant_unknown():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 4, 4])
    m = g.input("m", ["N", 1, 4, 4])  # a spatial attention map broadcast over the channels
    a = g.node("Mul", [g.node("Relu", [g.conv(x, 3, 8, 1, name="c1")]), m])
    g.node("Identity", [g.conv(a, 8, 4, 1, name="c2")], ["y"])
    g.output("y", ["N", 4, 4, 4])
    model = g.build()
    graph, an = _analyze(model)
    chan = _chan_into(graph, an, "c2")
    bias = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c1.b"))
    # relu(b)·m is a constant only where relu(b) = 0; elsewhere it varies with the input m
    np.testing.assert_array_equal(np.isnan(chan.value), bias > 0)
    assert np.all(chan.value[bias <= 0] == 0) and (bias > 0).any() and (bias <= 0).any()
    problems = fold_problems(an, exact=False)
    for c, b in zip(_group(an, "c1").classes, bias):
        assert (int(c) in problems) == bool(b > 0)


def test_channels_read_inside_a_subgraph_freeze_the_group():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 4, 4])
    a = g.node("Relu", [g.conv(x, 3, 8, 1, name="c1")])
    branch = helper.make_graph([helper.make_node("Identity", [a], ["inner"])], "branch", [],
                               [helper.make_tensor_value_info("inner", onnx.TensorProto.FLOAT, None)])
    cond = g.const("cond", np.array(True))
    g.node("If", [cond], ["y"], then_branch=branch, else_branch=branch)
    g.output("y", None)
    g.node("Identity", [g.conv(a, 8, 4, 1, name="c2")], ["z"])
    g.output("z", ["N", 4, 4, 4])
    _, an = _analyze(g.build(check=False))
    assert any("subgraph" in r for r in _group(an, "c1").reasons)


def test_transpose_to_channels_last_feeds_a_matmul():
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", 3, 4, 4])
    a = g.node("Relu", [g.conv(x, 3, 8, 1, name="c1")])
    t = g.node("Transpose", [a], perm=[0, 2, 3, 1])                      # NCHW → NHWC
    h = g.node("MatMul", [t, g.weight("w", (8, 6))], name="proj")
    h = g.node("Unsqueeze", [h, g.const("ax", np.array([1], np.int64))])  # [N, 1, H, W, 6]
    g.node("Squeeze", [h, g.const("ax1", np.array([1], np.int64))], ["y"])
    g.output("y", ["N", 4, 4, 6])
    model = g.build()
    graph, an = _analyze(model)
    assert _chan_into(graph, an, "proj").axis == 3
    assert "graph output 'y'" in _group(an, "proj").reasons[0]
    zero = PruneChannels(ratio=0.5, mode="zero", keep_first_last=False)(model).model
    removed = PruneChannels(ratio=0.5, keep_first_last=False)(model)
    assert_valid(removed.model)
    x = random_input((2, 3, 4, 4))
    np.testing.assert_allclose(run(removed.model, {"x": x})[0], run(zero, {"x": x})[0], atol=1e-5)
    assert [list(t.dims) for t in removed.model.graph.initializer if len(t.dims) == 2] == [[4, 6]]


@pytest.mark.parametrize("s_in, s_out, k, expected", [
    ((None, 8, 4, 4), (None, 128), 1, (1, 1, 3)),           # Flatten: channel → block of 16 features
    ((None, 8, 1, 1), (None, 8), 1, (1, 1, 1)),             # squeeze the pooled map
    ((None, 8), (None, 8, 1, 1), 1, (1, 1, 1)),             # SE gate back to a map
    ((None, 8, 4, 4), (None, 32, 4), 1, (1, 1, 2)),         # channel and H merged, W kept
    ((None, None, 16), (None, None, 4, 4), 2, None),        # splitting heads: unmappable
    ((None, 8, 4, 4), (None, 2, 64), 1, None),              # channel split across two axes
    ((2, 8, 4), (16, 4), 1, (0, 0, 1)),                     # merged with a static batch: outer tiling
])
def test_map_axis(s_in, s_out, k, expected):
    assert _map_axis(s_in, s_out, k) == expected


def test_reshape_merging_batch_and_channels_is_mapped_with_tiling():
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    a = g.node("Relu", [g.conv(x, 3, 8, 1, name="c1")])
    r = g.node("Reshape", [a, g.const("shape", np.array([16, 16], np.int64))])  # [2·8, 16]
    g.node("Identity", [g.node("MatMul", [r, g.weight("w", (16, 5))], name="m")], ["y"])
    g.output("y", [16, 5])
    graph, an = _analyze(g.build())
    chan = an.chans[next(n for n in graph.nodes if n.op == "Reshape").outputs[0].name]
    c1 = _group(an, "c1").producers[0]
    assert chan.axis == 0
    np.testing.assert_array_equal(chan.atoms, np.tile(np.repeat(c1.atoms, 1), 2))
    # the channels now lie on axis 0, which the MatMul does not contract: the group is frozen
    assert any("reads them on another axis" in r for r in _group(an, "c1").reasons)


def test_spatial_concat_ties_channels_but_mixed_constants_cannot_fold():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 4, 4])
    a = g.node("Relu", [g.conv(x, 3, 8, 1, name="c1")])
    b = g.node("Relu", [g.conv(x, 3, 8, 1, name="c2")])
    g.node("Identity", [g.conv(g.node("Concat", [a, b], axis=3), 8, 4, 1, name="c3")], ["y"])
    g.output("y", ["N", 4, 4, 8])
    model = g.build()
    graph, an = _analyze(model)
    tied = _group(an, "c1", "c2")
    value = _chan_into(graph, an, "c3").value
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    same = np.maximum(w["c1.b"], 0) == np.maximum(w["c2.b"], 0)
    np.testing.assert_array_equal(np.isnan(value), ~same)
    problems = fold_problems(an, exact=True)
    assert sum(int(c) in problems for c in tied.classes) == int((~same).sum())
    assert any("depends on the input" in r for r in problems.values())


def test_pad_on_the_channel_axis_freezes_the_group():
    g = GraphBuilder()
    a = g.node("Relu", [g.conv(g.input("x", ["N", 3, 4, 4]), 3, 8, 1, name="c1")])
    p = g.node("Pad", [a, g.const("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    g.node("Identity", [g.conv(p, 10, 4, 1, name="c2")], ["y"])
    g.output("y", ["N", 4, 4, 4])
    _, an = _analyze(g.build())
    assert any("pads the channel axis" in r for r in _group(an, "c1").reasons)


@pytest.mark.parametrize("axis, ok", [(1, True), (-3, True), (0, True), (2, False), (-1, False)])
def test_flatten_axis_decides_whether_channels_can_be_followed(axis, ok):
    g = GraphBuilder()
    a = g.node("Relu", [g.conv(g.input("x", [2, 3, 4, 4]), 3, 8, 1, name="c1")])
    f = g.node("Flatten", [a], axis=axis)
    dims, cut = [2, 8, 4, 4], axis if axis >= 0 else axis + 4
    rows, features = int(np.prod(dims[:cut])), int(np.prod(dims[cut:]))
    g.node("Identity", [g.node("MatMul", [f, g.weight("w", (features, 3))], name="m")], ["y"])
    g.output("y", [rows, 3])
    graph, an = _analyze(g.build())
    reasons = _group(an, "c1").reasons
    assert (not reasons) == ok, reasons
    if ok:
        chan = _chan_into(graph, an, "m")
        c1 = _group(an, "c1").producers[0]
        outer = 2 if axis == 0 else 1
        np.testing.assert_array_equal(chan.atoms, np.tile(np.repeat(c1.atoms, 16), outer))
    else:
        assert "merges the channel axis" in reasons[0]


def test_boundary_layers_see_through_skip_connections():
    """A residual stream reaches every block from the input without crossing a layer (as in a
    transformer), yet only the first block's input projection is the first layer."""
    from builders import GraphBuilder

    from graph_opt.gs_convert import to_graph
    from graph_opt.passes._groups import boundary_layers

    g = GraphBuilder()
    x = g.node("Relu", [g.input("x", ["N", 8])])
    for i in range(3):
        h = g.node("Relu", [g.node("MatMul", [x, g.weight(f"up{i}", (8, 16))], name=f"up{i}")])
        x = g.node("Add", [x, g.node("MatMul", [h, g.weight(f"down{i}", (16, 8))], name=f"down{i}")])
    g.output(g.node("Identity", [x], ["y"]), ["N", 8])
    graph = to_graph(g.build())
    first, last = boundary_layers(graph)
    names = {id(n): n.name for n in graph.nodes}
    assert {names[i] for i in first} == {"up0"}
    assert {names[i] for i in last} == {"down2"}
