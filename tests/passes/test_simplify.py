"""simplify: each rewrite on a model built here that lacks it, parity under onnxruntime, names kept."""

import numpy as np
import onnx
import pytest
from builders import (GraphBuilder, assert_valid, constant_node_model, control_flow_model, op_count, random_input,
                      run, tf_same_padding_model)
from onnx import TensorProto, helper, numpy_helper

import graph_opt.external_data as ext
import graph_opt.model_io as mio
from graph_opt import api
from graph_opt.data import random_dataset
from graph_opt.external_data import on_disk
from graph_opt.model_io import load_model, save_model
from graph_opt.onnx_util import all_graphs
from graph_opt.pass_base import PassContext
from graph_opt.passes.simplify import Simplify


def _simplify(model, pass_=None, shapes=None, data=None):
    """The pass's result, checked (full checker, onnxruntime loads it)."""
    result = (pass_ or Simplify())(model, PassContext(data=data, shapes=shapes))
    assert_valid(result.model)
    return result


def _close(before, after, feeds, rtol=1e-5):
    for a, b in zip(run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= rtol * max(np.abs(a).max(), 1e-30)


def _names(model):
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits], [v.name for v in model.graph.output]


def _count(model, op):
    return sum(1 for g in all_graphs(model.graph) for n in g.node if n.op_type == op)


def test_tf_same_padding_chain_folds_and_keeps_the_batch_dynamic():
    model = tf_same_padding_model()
    assert op_count(model, "Shape") == 6 and op_count(model, "Pad") == 6 and op_count(model, "Constant") > 0
    result = _simplify(model, data=random_dataset(model, 4, seed=0))
    out = result.model
    assert result.modified
    for op in ("Shape", "Gather", "Pad", "Constant", "Identity", "Transpose", "Cast"):
        assert op_count(out, op) == 0, op
    assert op_count(out, "Conv") == 5 and op_count(out, "MaxPool") == 1
    assert len(out.graph.node) < len(model.graph.node) // 10
    assert _names(out) == _names(model)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 3):  # folded for every batch size, not only the probed ones
        _close(model, out, {"image": random_input((batch, 3, 16, 16), seed=batch)})


def test_folding_that_needs_the_batch_binds_it_only_when_the_user_did():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 4])
    n = g.node("Cast", [g.node("Gather", [g.node("Shape", [x]), g.const("zero", np.int64(0))])], to=TensorProto.FLOAT)
    g.node("Mul", [x, n], ["y"])  # the output scales with the batch size: folding needs it bound
    g.output("y", ["N", 4])
    model = g.build()
    free = _simplify(model)
    assert op_count(free.model, "Shape") == 1
    assert any("dynamic batch" in note for note in free.report.notes)
    bound = _simplify(model, shapes={"x": (2, 4)})
    assert op_count(bound.model, "Shape") == 0
    assert bound.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    _close(model, bound.model, {"x": random_input((2, 4))})


@pytest.mark.parametrize("size", [1, 3])
def test_a_batch_bound_by_the_user_is_one_of_the_two_probes(monkeypatch, size):
    """Folding that depends on the batch, bound by the user: the engine runs at that size and at
    one other, and the first answer is kept (no third run)."""
    from graph_opt.passes import simplify

    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 4])
    n = g.node("Cast", [g.node("Gather", [g.node("Shape", [x]), g.const("zero", np.int64(0))])], to=TensorProto.FLOAT)
    g.node("Mul", [x, n], ["y"])
    g.output("y", ["N", 4])
    model = g.build()
    runs = []
    real = simplify._engine
    monkeypatch.setattr(simplify, "_engine", lambda m, dims=None: runs.append((dims or {}).get("x", {}).get(0))
                        or real(m, dims))
    out = _simplify(model, shapes={"x": (size, 4)})
    assert len(runs) == 2 and runs[0] == size and runs[1] != size
    assert op_count(out.model, "Shape") == 0
    _close(model, out.model, {"x": random_input((size, 4))})


def test_constant_nodes_become_initializers():
    model = constant_node_model()
    assert op_count(model, "Constant") > 0 and not model.graph.initializer
    out = _simplify(model).model
    assert op_count(out, "Constant") == 0 and len(out.graph.initializer) > 0
    _close(model, out, {"x": random_input((2, 3, 8, 8))})


def _pad_then(op: str, value: float, before: str | None = None, **attrs):
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 4, 8, 8])
    if before:
        x = g.node(before, [x])
    pads = g.const("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))
    p = g.node("Pad", [x, pads, g.const("pv", np.float32(value))], name="pad", mode="constant")
    if op == "Conv":
        y = g.node("Conv", [p, g.weight("w", (4, 4, 3, 3))], ["y"], kernel_shape=[3, 3], **attrs)
    else:
        y = g.node(op, [p], ["y"], kernel_shape=[3, 3], **attrs)
    g.output(y, ["N", 4, "H", "W"])
    return g.build()


@pytest.mark.parametrize("op,value,before,attrs", [
    ("Conv", 0.0, None, {}),
    ("AveragePool", 0.0, None, {}),
    ("AveragePool", 0.0, None, {"count_include_pad": 1, "pads": [0, 0, 0, 1]}),
    ("MaxPool", -np.inf, None, {}),
    ("MaxPool", 0.0, "Relu", {}),  # a zero pad cannot win the max over non-negative inputs
])
def test_pad_folds_into_the_next_conv_or_pool(op, value, before, attrs):
    model = _pad_then(op, value, before, **attrs)
    assert op_count(model, "Pad") == 1
    result = _simplify(model)
    out = result.model
    assert op_count(out, "Pad") == 0 and op_count(out, op) == 1
    node = next(n for n in out.graph.node if n.op_type == op)
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "pads")) != [0, 0, 0, 0]
    read = {i for n in out.graph.node for i in n.input}
    assert [t.name for t in out.graph.initializer if t.name not in read] == []  # the Pad's pads are gone
    _close(model, out, {"x": random_input((2, 4, 8, 8))})


@pytest.mark.parametrize("op,value,attrs,reason", [
    ("MaxPool", 0.0, {}, "before a MaxPool"),
    ("AveragePool", 0.0, {"pads": [1, 1, 1, 1]}, "without counting the pad"),
    ("AveragePool", 0.0, {"ceil_mode": 1, "strides": [2, 2]}, "ceil_mode"),
    ("Conv", 1.0, {}, "before a Conv"),
])
def test_pad_that_would_change_the_result_is_skipped_with_the_reason(op, value, attrs, reason):
    model = _pad_then(op, value, **attrs)
    result = _simplify(model)
    assert op_count(result.model, "Pad") == 1
    assert any(reason in s.reason for s in result.report.skipped), result.report.skipped
    _close(model, result.model, {"x": random_input((2, 4, 8, 8))})


def test_conv_and_gemm_absorb_constant_mul_and_add():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 3, 8, 8])
    c = g.conv(x, 3, 6, name="c1")
    c = g.node("Add", [g.node("Mul", [c, g.weight("s", (6, 1, 1))]), g.weight("t", (1, 6, 1, 1))])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [c])], axis=1)
    y = g.gemm(f, 6, 5, name="head")
    y = g.node("Add", [g.const("t2", np.arange(5, dtype=np.float32)), g.node("Mul", [y, g.weight("s2", (5,))])], ["y"])
    g.output(y, ["N", 5])
    model = g.build()
    assert op_count(model, "Mul") == 2 and op_count(model, "Add") == 2
    result = _simplify(model)
    out = result.model
    assert op_count(out, "Mul") == 0 and op_count(out, "Add") == 0
    assert sum("folded into" in r.get("action", "") for r in result.report.rewritten) == 4
    assert {t.name for t in model.graph.initializer} - {"s", "t", "s2", "t2"} <= {t.name for t in out.graph.initializer} | {
        "c1.w", "c1.b", "head.w", "head.b"}
    read = {i for n in out.graph.node for i in n.input}
    assert [t.name for t in out.graph.initializer if t.name not in read] == []  # the replaced weights are gone
    _close(model, out, {"x": random_input((2, 3, 8, 8))})


def test_duplicate_initializers_of_any_size_are_merged():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 32, 8, 8])
    w = g.rng.standard_normal((32, 32, 3, 3)).astype(np.float32)  # 9216 elements: above the engine's own limit
    a = g.node("Conv", [x, g.const("w1", w)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.node("Conv", [g.node("Relu", [a]), g.const("w2", w.copy())], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output("y", ["N", 32, 8, 8])
    model = g.build()
    result = _simplify(model)
    assert len(result.model.graph.initializer) == 1
    assert any(r.get("action") == "merged duplicate initializer" for r in result.report.rewritten)
    _close(model, result.model, {"x": random_input((1, 32, 8, 8))})


def test_if_branches_are_simplified_too():
    model = control_flow_model("If")
    inside = sum(op_count(helper.make_model(g), "Identity") for g in list(all_graphs(model.graph))[1:])
    assert inside == 2
    out = _simplify(model).model
    assert sum(op_count(helper.make_model(g), "Identity") for g in list(all_graphs(out.graph))[1:]) < inside
    assert _names(out) == _names(model)
    _close(model, out, {"x": random_input((2, 3, 8, 8))})


def _opset6(nodes, inits):
    g = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "H", "W"])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 4
    return model


def test_an_opset_onnxruntime_does_not_run_is_upgraded_and_verified():
    c = numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4, 1, 1), "c")
    model = _opset6([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])], [c])
    with pytest.raises(Exception):
        run(model, {"x": random_input((1, 4, 4, 4))})
    result = _simplify(model)
    assert next(o.version for o in result.model.opset_import if o.domain == "") >= 13
    assert any("upgraded" in str(r.get("action")) for r in result.report.rewritten)
    x = random_input((1, 4, 4, 4))
    np.testing.assert_allclose(run(result.model, {"x": x})[0], np.maximum(x, 0) + numpy_helper.to_array(c), rtol=1e-6)


def test_an_opset_the_converter_cannot_convert_is_refused_with_the_reason():
    model = _opset6([helper.make_node("Upsample", ["x"], ["y"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")], [])
    result = Simplify()(model, PassContext())
    assert not result.modified and result.model == model
    assert any("version converter" in s.reason for s in result.report.skipped)


def test_pipeline_upgrades_the_reference_when_it_starts_with_simplify():
    c = numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "c")
    model = _opset6([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])], [c])
    result = api.optimize(model, latency=False)
    assert result.baseline.reason.startswith("opset 6 upgraded")
    with pytest.raises(Exception, match="cannot be verified"):
        api.optimize(model, ["cleanup"], simplify=False, latency=False)


def test_weights_kept_on_disk_stay_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)
    model = tf_same_padding_model(constant_weights=False)
    path = save_model(model, tmp_path / "big.onnx")
    loaded = load_model(path, weights="disk")
    assert any(on_disk(t) for t in loaded.graph.initializer)
    out = Simplify()(loaded, PassContext()).model
    mio.check_model(out, full=True)
    assert op_count(out, "Pad") == 0
    disk_before = {t.name for t in loaded.graph.initializer if on_disk(t)}
    disk_after = {t.name for t in out.graph.initializer if on_disk(t)}
    assert disk_after and disk_after <= disk_before
    assert all(on_disk(t) for t in out.graph.initializer if t.name in disk_before and t.name in disk_after)
    _close(model, out, {"image": random_input((1, 3, 16, 16))})


def test_simplify_runs_first_by_default_and_not_twice(tmp_path, capsys):
    from builders import run_cli

    model = tf_same_padding_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, out, _ = run_cli(capsys, "optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--no-latency",
                           "--input-shape", "image=1x3x16x16", "--json")
    assert code == 0
    import json

    steps = [s["name"] for s in json.loads(out)["steps"]]
    assert steps == ["simplify", "fold_batchnorm", "cleanup"]
    code, out, _ = run_cli(capsys, "optimize", str(path), "-o", str(tmp_path / "o2.onnx"), "--no-latency",
                           "--pass", "simplify", "--pass", "cleanup", "--json")
    assert [s["name"] for s in json.loads(out)["steps"]] == ["simplify", "cleanup"]
    code, out, _ = run_cli(capsys, "optimize", str(path), "-o", str(tmp_path / "o3.onnx"), "--no-latency",
                           "--pass", "cleanup", "--no-simplify", "--json")
    assert [s["name"] for s in json.loads(out)["steps"]] == ["cleanup"]
    saved = load_model(tmp_path / "o.onnx")
    assert op_count(saved, "Pad") == 0 and op_count(saved, "Shape") == 0


def test_api_prepends_simplify_unless_told_not_to():
    model = tf_same_padding_model()
    with_it = api.optimize(model, ["cleanup"], latency=False, n_random=2)
    assert [s.name for s in with_it.steps] == ["simplify", "cleanup"] and with_it.steps[0].modified
    without = api.optimize(model, ["cleanup"], latency=False, n_random=2, simplify=False)
    assert [s.name for s in without.steps] == ["cleanup"]


def test_ir3_initializers_listed_as_inputs_fold_as_constants():
    g = GraphBuilder(opset=9)
    x = g.input("x", ["N", 4])
    scale = g.node("Mul", [g.const("a", np.full(4, 2.0, np.float32)), g.const("b", np.full(4, 3.0, np.float32))])
    g.node("Mul", [x, scale], ["y"])
    g.output("y", ["N", 4])
    model = g.build(check=False)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, [4]) for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    assert op_count(model, "Mul") == 2
    result = _simplify(model)
    assert op_count(result.model, "Mul") == 1 and result.model.ir_version == 4
    assert _names(result.model) == (["x"], ["y"])
    _close(model, result.model, {"x": random_input((2, 4))})


def test_from_ir4_an_initializer_listed_as_input_stays_overridable():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 4])
    g.node("Mul", [x, g.node("Mul", [g.const("a", np.full(4, 2.0, np.float32)), g.const("b", np.ones(4, np.float32))])], ["y"])
    g.output("y", ["N", 4])
    model = g.build(check=False)
    model.graph.input.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [4]))
    onnx.checker.check_model(model, full_check=True)
    out = _simplify(model).model
    assert "a" in {v.name for v in out.graph.input} and op_count(out, "Mul") == 2


def test_duplicate_nodes_are_merged_and_no_op_casts_removed():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 4])
    a = g.node("Relu", [g.node("Cast", [x], to=TensorProto.FLOAT)])
    b = g.node("Relu", [g.node("Cast", [x], to=TensorProto.FLOAT)])
    g.node("Add", [a, b], ["y"])
    g.output("y", ["N", 4])
    model = g.build()
    out = _simplify(model).model
    assert op_count(model, "Relu") == 2 and op_count(out, "Relu") == 1 and op_count(out, "Cast") == 0
    _close(model, out, {"x": random_input((3, 4))})


def test_matmul_and_constant_add_become_one_gemm():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 8])
    h = g.node("Add", [g.node("MatMul", [x, g.weight("w", (8, 6))]), g.weight("b", (6,))])
    g.node("Relu", [h], ["y"])
    g.output("y", ["N", 6])
    model = g.build()
    assert op_count(model, "Gemm") == 0
    out = _simplify(model).model
    assert op_count(out, "Gemm") == 1 and op_count(out, "MatMul") == 0 and op_count(out, "Add") == 0
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    _close(model, out, {"x": random_input((3, 8))})


def test_slices_of_slices_on_other_axes_merge():
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 3, 8, 8])
    ints = lambda name, v: g.const(name, np.array(v, np.int64))  # noqa: E731
    rows = g.node("Slice", [x, ints("s0", [0]), ints("e0", [8]), ints("a0", [2]), ints("st0", [2])])
    a = g.node("Slice", [rows, ints("s1", [0]), ints("e1", [8]), ints("a1", [3]), ints("st1", [2])])
    b = g.node("Slice", [rows, ints("s2", [1]), ints("e2", [8]), ints("a2", [3]), ints("st2", [2])])
    g.node("Concat", [a, b], ["y"], axis=1)  # the Focus / space-to-depth pattern of YOLO stems
    g.output("y", ["N", 6, 4, 4])
    model = g.build()
    out = _simplify(model).model
    assert op_count(model, "Slice") == 3 and op_count(out, "Slice") == 2
    _close(model, out, {"x": random_input((2, 3, 8, 8))})


def test_compare_upgrades_the_reference_when_every_pipeline_starts_with_simplify():
    c = numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "c")
    model = _opset6([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])], [c])
    comparison = api.compare(model, ["cleanup"], latency=False, n_random=2)
    assert comparison.baseline.reason.startswith("opset 6 upgraded")
    with pytest.raises(Exception, match="cannot be verified"):
        api.compare(model, ["cleanup"], latency=False, n_random=2, simplify=False)


def test_a_batch_bound_by_the_user_is_verified_at_that_batch_size():
    """`--input-shape x=1,4` on a model whose folding needs the batch: the simplified model takes
    batches of 1 only, and the pipeline verifies it sample by sample instead of rolling it back."""
    g = GraphBuilder(opset=13)
    x = g.input("x", ["N", 4])
    ones = g.node("ConstantOfShape", [g.node("Shape", [x])], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    g.node("Add", [g.node("Mul", [x, ones]), g.const("b", np.arange(4, dtype=np.float32))], ["y"])
    g.output("y", ["N", 4])
    model = g.build()
    result = api.optimize(model, [], data=random_dataset(model, 8, seed=0), shapes={"x": (1, 4)}, latency=False)
    step = result.steps[0]
    assert step.name == "simplify" and step.modified and step.accepted, step.reason
    assert op_count(result.model, "Shape") == 0 and op_count(result.model, "ConstantOfShape") == 0
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert step.parity.max_abs == 0.0 and step.parity.samples == 8


def test_engine_tries_rules_by_root_op_and_writes_the_same_model(monkeypatch):
    """The engine tries each rewrite rule only on nodes of its pattern's root op type: the model is
    byte for byte the one of trying every rule on every node."""
    import contextlib

    from graph_opt.passes import simplify

    model = tf_same_padding_model()
    fired = []
    real = simplify._RootOpRule.try_rewrite

    def counting(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out is not None:
            fired.append(self._op_type)
        return out

    monkeypatch.setattr(simplify._RootOpRule, "try_rewrite", counting)
    filtered = simplify._engine(model)
    assert fired, "no rewrite rule fired: the comparison below would not exercise the filter"
    monkeypatch.setattr(simplify, "_rules_by_root_op", contextlib.nullcontext)
    unfiltered = simplify._engine(model)
    assert len(filtered.graph.node) < len(model.graph.node)
    assert filtered.SerializeToString(deterministic=True) == unfiltered.SerializeToString(deterministic=True)


def test_root_op_rule_skips_other_ops_and_the_rules_are_restored():
    from types import SimpleNamespace

    from onnxscript import rewriter

    from graph_opt.passes import simplify

    calls = []
    stub = SimpleNamespace(try_rewrite=lambda model, graph, node, **kw: calls.append(node.op_type) or "match",
                           name="stub")
    rule = simplify._RootOpRule(stub, "Transpose")
    assert rule.try_rewrite(None, None, SimpleNamespace(op_type="Relu")) is None and calls == []
    assert rule.try_rewrite(None, None, SimpleNamespace(op_type="Transpose")) == "match" and calls == ["Transpose"]
    assert rule.name == "stub"  # everything else is the rule's own

    before = rewriter._DEFAULT_REWRITE_RULES
    with pytest.raises(RuntimeError), simplify._rules_by_root_op():
        inside = rewriter._DEFAULT_REWRITE_RULES
        assert len(inside) == len(before)
        wrapped = [(w, b) for w, b in zip(inside, before) if isinstance(w, simplify._RootOpRule)]
        assert wrapped and all(w._rule is b for w, b in wrapped)
        raise RuntimeError("the rules are restored on the way out")
    assert rewriter._DEFAULT_REWRITE_RULES is before


def test_the_input_model_is_read_in_place_and_left_as_it_came():
    """simplify is handed the caller's model itself (no deep copy): the engine's view of it reads
    its tensor protos in place, so a Constant lifted to an initializer under its output's name must
    not rename the caller's tensor, and binding dims must not touch the caller's inputs."""
    model = constant_node_model()
    consts = [node for node in model.graph.node if node.op_type == "Constant"]
    for i, node in enumerate(consts):
        if i % 2:
            node.attribute[0].t.name = "tensor_" + node.output[0]  # differs from the name it is lifted to
        else:
            node.attribute[0].t.ClearField("name")  # no name at all (not even "")
    assert not Simplify.edits_input
    before = model.SerializeToString(deterministic=True)
    x = model.graph.input[0].type.tensor_type.shape.dim
    assert x[0].HasField("dim_param")  # vacuity guard: there is a batch dim to bind for the probes
    out = _simplify(model, shapes={model.graph.input[0].name: tuple([2] + [d.dim_value for d in x[1:]])})
    assert op_count(out.model, "Constant") == 0 and out.model.graph.initializer  # the lift fired
    assert model.SerializeToString(deterministic=True) == before
