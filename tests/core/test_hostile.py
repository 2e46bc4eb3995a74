"""Hostile and odd models: every pass, run by the Pipeline, either rewrites into a model that passes
the full onnx.checker and loads in onnxruntime, or leaves it as it was and says why. Never a crash,
never an invalid model; what cannot be verified at all is refused in one line.

The file-level hostile inputs (truncated/random/zip files, broken external data) live in
test_model_io.py and test_cli.py; this file covers the graphs themselves.
"""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import pytest
from builders import (
    assert_valid,
    constant_node_model,
    control_flow_model,
    conv_bn_gemm_model,
    custom_domain_model,
    dynamic_quant_model,
    float16_model,
    matmulnbits_model,
    no_weights_model,
    nonfinite_weights_model,
    op_count,
    outer_scope_weight_model,
    overridable_weights_model,
    qoperator_model,
    renamed_nodes_model,
    run,
    runtime_weights_model,
    scalar_output_model,
    shared_weights_model,
    small_cnn,
    symbolic_model,
    unknown_domain_model,
    weights_as_inputs_model,
    zero_sized_model,
)

from graph_opt.cli import main
from graph_opt.data import random_dataset
from graph_opt.errors import InvalidModelError
from graph_opt.model_io import check_model, save_model
from graph_opt.pass_base import Pass, PassContext
from graph_opt.pipeline import Pipeline
from graph_opt.registry import parse_spec

# Every pass, with settings that make it fire on these small models (gates off, no first/last rule).
_LR = "align=0,latency_gate=false,require_saving=false"
EVERY_PASS = (
    "fold_batchnorm",
    "cleanup",
    "prune_weights:sparsity=0.5,keep_first_last=false",
    "prune_channels:ratio=0.3,keep_first_last=false,round_to=1",
    f"factorize_gemm:rank_ratio=0.5,{_LR}",
    f"factorize_conv:rank_ratio=0.5,{_LR}",
    "quantize",
    "quantize:weights=int4",
    "reconstruct",
)


def _each_pass(model, shapes=None, specs=EVERY_PASS, **kw):
    """Each pass on its own Pipeline (the original as input); the step of each, by spec."""
    data = random_dataset(model, 4, shapes=shapes)
    steps = {}
    for spec in specs:
        result = Pipeline([parse_spec(spec)], verify_data=data, latency=False, shapes=shapes, **kw).run(model)
        steps[spec] = _checked(result)[0]
    return steps


def _checked(result):
    """The validity invariant on every step: an accepted rewrite is valid; a refused one is said why
    and the model before it goes on; no pass here may emit an invalid model at all."""
    before = result.baseline.model
    for step in result.steps:
        if step.accepted and step.modified:
            assert_valid(step.model)
            assert step.report.rewritten
        else:
            assert step.model is before
        assert not step.reason.startswith("invalid output"), f"{step.name} emitted an invalid model: {step.reason}"
        for skip in step.report.skipped:
            assert skip.node and skip.reason
        before = step.model
    return result.steps


def _skips(step) -> dict[str, str]:
    return {s.node: s.reason for s in step.report.skipped}


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ opsets


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21, 25])
def test_conv_bn_gemm_at_every_opset(opset):
    model = conv_bn_gemm_model(opset)
    assert model.ir_version < 4 or opset >= 9  # opset 7 is IR 3: initializers listed as graph inputs
    steps = _each_pass(model)
    for spec, step in steps.items():
        assert step.accepted, (spec, step.reason)
        if not spec.startswith("quantize"):  # only quantize may change the opset (and says so)
            assert [(i.domain, i.version) for i in step.model.opset_import] == [("", opset)]
            assert step.model.ir_version == model.ir_version
    for spec in ("fold_batchnorm", "prune_weights:sparsity=0.5,keep_first_last=false",
                 f"factorize_gemm:rank_ratio=0.5,{_LR}", f"factorize_conv:rank_ratio=0.5,{_LR}", "quantize"):
        assert steps[spec].modified, (spec, _skips(steps[spec]))  # not vacuous at any opset
    quant = steps["quantize"]
    if opset < 13:  # per-channel DequantizeLinear needs opset 13: upgraded, and the report says how
        assert any(n.startswith(f"opset upgraded {opset} → 13") for n in quant.report.notes)
        assert quant.model.opset_import[0].version == 13
    int4 = steps["quantize:weights=int4"]
    assert int4.modified and int4.model.opset_import[0].version == max(opset, 21)


def test_gemm_factor_before_opset_11_is_a_matmul_and_exact():
    """Gemm's C is required before opset 11: the first factor of a Gemm becomes a MatMul."""
    model = conv_bn_gemm_model(9)
    step, = _checked(Pipeline([parse_spec(f"factorize_gemm:rank_ratio=1.0,{_LR}")],
                              verify_data=random_dataset(model, 4), tolerances={"rel_error": 1e-5},
                              latency=False).run(model))
    assert step.accepted and step.modified
    first = {n.name: n.op_type for n in step.model.graph.node}
    assert first["head/svd_0"] == "MatMul" and first["head/svd_1"] == "Gemm"


def test_opset_onnxruntime_cannot_run_is_refused_in_one_line(tmp_path, capsys):
    path = save_model(conv_bn_gemm_model(6), tmp_path / "old.onnx")  # BatchNormalization-6: no CPU kernel
    code, out, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--no-latency")
    assert code == 2 and err.count("\n") == 1 and "the input model cannot be verified" in err
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------ custom ops


def test_microsoft_domain_ops_pass_through_untouched():
    model = custom_domain_model()
    custom = {n.name: n.SerializeToString() for n in model.graph.node if n.domain == "com.microsoft"}
    weights = {t.name: t.SerializeToString() for t in model.graph.initializer if t.name.startswith("fused.")}
    steps = _each_pass(model)
    for spec, step in steps.items():
        out = step.model
        assert {n.name: n.SerializeToString() for n in out.graph.node if n.domain == "com.microsoft"} == custom, spec
        assert {t.name: t.SerializeToString() for t in out.graph.initializer if t.name in weights} == weights, spec
        assert any(i.domain == "com.microsoft" for i in out.opset_import)
    assert steps["fold_batchnorm"].modified and steps["quantize"].modified
    assert "custom op com.microsoft.FusedConv" in _skips(steps["prune_channels:ratio=0.3,keep_first_last=false,round_to=1"])["c1"]


def test_unknown_domain_passes_keep_the_node_and_the_pipeline_refuses(tmp_path, capsys):
    model = unknown_domain_model()
    data = random_dataset(model, 2)
    for spec in EVERY_PASS:  # the passes alone: never a crash, the custom node kept as it is
        out = parse_spec(spec)(model, PassContext(data=data, original=model)).model
        frob = [n for n in out.graph.node if n.op_type == "Frobnicate"]
        assert len(frob) == 1 and frob[0].domain == "org.example.custom", spec
        assert frob[0].attribute[0].i == 2
        check_model(out)  # onnx.checker accepts unknown domains; onnxruntime does not
    with pytest.raises(InvalidModelError, match="the input model cannot be verified"):
        Pipeline([parse_spec("fold_batchnorm")], latency=False).run(model)  # no data: still checked
    path = save_model(model, tmp_path / "custom.onnx")
    code, _, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx")
    assert code == 2 and err.count("\n") == 1 and "Frobnicate" in err and not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------ weights


def test_no_initializers_weights_in_constant_nodes():
    model = constant_node_model()
    assert not model.graph.initializer
    steps = _each_pass(model)
    for spec in ("fold_batchnorm", "prune_weights:sparsity=0.5,keep_first_last=false", f"factorize_conv:rank_ratio=0.5,{_LR}",
                 "quantize"):
        assert steps[spec].modified, (spec, _skips(steps[spec]))


def test_model_without_weights(tmp_path, capsys):
    for step in _each_pass(no_weights_model()).values():
        assert not step.modified
    path = save_model(no_weights_model(), tmp_path / "plain.onnx")
    assert _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--no-latency")[0] == 0
    assert_valid(onnx.load(str(tmp_path / "o.onnx")))


def test_weights_that_are_graph_inputs_are_skipped_with_the_reason():
    model = weights_as_inputs_model()
    steps = _each_pass(model)
    for spec, step in steps.items():
        assert not step.modified, spec
    assert "not a constant" in _skips(steps["fold_batchnorm"])["bn2"]
    assert "computed at run time" in _skips(steps["prune_weights:sparsity=0.5,keep_first_last=false"])["fc"]
    assert "not a constant" in _skips(steps[f"factorize_conv:rank_ratio=0.5,{_LR}"])["conv"]
    assert "not a constant" in _skips(steps["quantize"])["conv"]


def test_initializers_listed_as_inputs_stay_listed():
    """IR ≥ 4 initializers that are also graph inputs (overridable defaults, as old exporters wrote
    them) count as weights; the ones a pass leaves in place stay in the interface."""
    model = overridable_weights_model()
    steps = _each_pass(model)
    assert steps["fold_batchnorm"].modified and steps["quantize"].modified
    for spec, step in steps.items():
        out = step.model
        inits = {t.name for t in out.graph.initializer}
        listed = {i.name for i in out.graph.input}
        assert "x" in listed
        assert listed - {"x"} <= inits, spec  # no dangling input left behind
        kept = {t.name for t in model.graph.initializer} & inits
        assert kept <= listed, (spec, kept - listed)


def test_weights_computed_at_run_time_are_skipped():
    steps = _each_pass(runtime_weights_model())
    for spec, step in steps.items():
        assert not step.modified, spec
    assert "not a constant" in _skips(steps[f"factorize_gemm:rank_ratio=0.5,{_LR}"])["fc"]
    assert "both operands are activations" in _skips(steps["quantize"])["mm"]


def test_weights_shared_by_several_nodes_are_never_rewritten():
    model = shared_weights_model()
    shared = {t.name: t.SerializeToString() for t in model.graph.initializer if t.name.startswith(("shared", "embed"))}
    steps = _each_pass(model)
    for spec, step in steps.items():
        out = {t.name: t.SerializeToString() for t in step.model.graph.initializer}
        assert all(out.get(name) == value for name, value in shared.items()), spec
    assert "shared with another node" in _skips(steps["fold_batchnorm"])["bn2"]
    for spec in ("prune_weights:sparsity=0.5,keep_first_last=false", "quantize", f"factorize_conv:rank_ratio=0.5,{_LR}"):
        assert "shared with another node" in _skips(steps[spec])["conv_a"], spec


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_weights(bad):
    model = nonfinite_weights_model(bad)
    steps = _each_pass(model)
    assert "NaN or inf" in _skips(steps[f"factorize_gemm:rank_ratio=0.5,{_LR}"])["fc"]
    assert "NaN or inf" in _skips(steps[f"factorize_conv:rank_ratio=0.5,{_LR}"])["conv"]
    assert "NaN or inf" in _skips(steps["quantize"])["conv"]
    # With a fidelity tolerance the non-finite outputs cannot be vouched for: rolled back, not accepted.
    step, = _checked(Pipeline([parse_spec("prune_weights:sparsity=0.5,keep_first_last=false")],
                              verify_data=random_dataset(model, 4), tolerances={"cosine": 0.9}, latency=False).run(model))
    assert not step.accepted and step.reason.startswith("tolerance exceeded")


def test_zero_sized_tensors():
    model = zero_sized_model()
    steps = _each_pass(model)
    assert "empty" in _skips(steps[f"factorize_gemm:rank_ratio=0.5,{_LR}"])["fc_empty"]
    assert steps["cleanup"].modified  # the unused zero-sized initializer goes
    assert "empty" not in {t.name for t in steps["cleanup"].model.graph.initializer}
    assert steps["quantize"].modified


def test_weight_also_read_inside_a_subgraph_counts_as_shared():
    model = outer_scope_weight_model()
    steps = _each_pass(model)
    for spec, step in steps.items():
        w = {t.name: t.SerializeToString() for t in step.model.graph.initializer}
        assert w["shared.w"] == next(t for t in model.graph.initializer if t.name == "shared.w").SerializeToString(), spec
    for spec in ("fold_batchnorm", "prune_weights:sparsity=0.5,keep_first_last=false", "quantize",
                 f"factorize_conv:rank_ratio=0.5,{_LR}"):
        assert "shared with another node" in _skips(steps[spec]).get("main_conv", "") + _skips(steps[spec]).get("bn2", ""), spec


def test_float16_model():
    steps = _each_pass(float16_model())
    assert steps["fold_batchnorm"].modified
    assert "only FLOAT weights are quantized" in _skips(steps["quantize"])["conv1"]


def test_scalar_output():
    steps = _each_pass(scalar_output_model())
    assert steps["quantize"].modified and steps[f"factorize_gemm:rank_ratio=0.5,{_LR}"].modified
    assert steps["quantize"].parity.samples == 1  # one value for the whole batch


# -------------------------------------------------------------------------- shapes and names


def test_symbolic_shapes_everywhere(tmp_path, capsys):
    model = symbolic_model()
    shapes = {"x": (2, 3, 6, 6), "t": (2, 5, 16)}
    steps = _each_pass(model, shapes=shapes)
    for spec in ("fold_batchnorm", "prune_channels:ratio=0.3,keep_first_last=false,round_to=1",
                 f"factorize_gemm:rank_ratio=0.5,{_LR}", "quantize"):
        assert steps[spec].modified, (spec, _skips(steps[spec]))
    for step in steps.values():  # the interface keeps its symbolic dims
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in step.model.graph.input]
        assert dims == [["N", "C", "H", "W"], ["B", "S", "D"]]
    path = save_model(model, tmp_path / "sym.onnx")
    code, _, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--no-latency")
    assert code == 2 and err.count("\n") == 1 and "--input-shape" in err
    code, _, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--no-latency",
                        "--input-shape", "x=2x3x6x6", "--input-shape", "t=2x5x16")
    assert code == 0, err
    assert_valid(onnx.load(str(tmp_path / "o.onnx")))


def test_unnamed_nodes_are_reported_by_their_output():
    model = renamed_nodes_model("")
    steps = _each_pass(model)
    for spec, step in steps.items():
        labels = [r["node"] for r in step.report.rewritten] + [s.node for s in step.report.skipped]
        assert all(labels), spec
    assert "Conv(conv17_out)" in _skips(steps[f"factorize_conv:rank_ratio=0.5,{_LR}"])  # the depthwise conv
    assert steps["quantize"].modified and steps["fold_batchnorm"].modified


def test_duplicate_node_names(tmp_path, capsys):
    """onnx.checker accepts duplicate node names, onnxruntime refuses them: the passes never crash
    on them and never add a duplicate of their own; the pipeline refuses the model in one line."""
    model = renamed_nodes_model("n")
    data = random_dataset(model, 2)
    for spec in EVERY_PASS:
        out = parse_spec(spec)(model, PassContext(data=data, original=model)).model
        check_model(out)
        new = [n.name for n in out.graph.node if n.name != "n"]
        assert len(new) == len(set(new)), spec
    path = save_model(model, tmp_path / "dup.onnx")
    code, _, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx")
    assert code == 2 and err.count("\n") == 1 and "same node name" in err


# ------------------------------------------------------------------------ already quantized


def test_qdq_model_is_not_quantized_twice():
    model = small_cnn(channels=4)  # every layer int8 (an RGB stem would stay float, free for other passes)
    data = random_dataset(model, 8)
    first, second = _checked(Pipeline([parse_spec("quantize"), parse_spec("quantize")], verify_data=data,
                                      latency=False).run(model))
    assert first.modified and not second.modified
    assert all("already quantized" in s.reason for s in second.report.skipped if s.node != "head")
    for spec in EVERY_PASS:  # and nothing else rewrites the QDQ model's quantized layers
        step = _each_pass(first.model, specs=(spec,))[spec]
        assert op_count(step.model, "QuantizeLinear") == op_count(first.model, "QuantizeLinear"), spec
        assert op_count(step.model, "DequantizeLinear") == op_count(first.model, "DequantizeLinear"), spec


@pytest.mark.parametrize("build, node, op", [
    (qoperator_model, "qconv", "QLinearConv"),
    (dynamic_quant_model, "mmi", "MatMulInteger"),
    (dynamic_quant_model, "dql", "DynamicQuantizeLinear"),
    (matmulnbits_model, "nbits", "MatMulNBits"),
])
def test_quantized_operators_are_left_alone(build, node, op):
    model = build()
    original = next(n for n in model.graph.node if n.name == node)
    inits = {t.name: t.SerializeToString() for t in model.graph.initializer}
    steps = _each_pass(model)
    for spec, step in steps.items():
        kept = [n for n in step.model.graph.node if n.name == node]
        assert len(kept) == 1 and kept[0].SerializeToString() == original.SerializeToString(), spec
        out = {t.name: t.SerializeToString() for t in step.model.graph.initializer}
        assert all(out[i] == inits[i] for i in original.input if i in inits), spec  # its constants untouched
        feeding = [n for n in step.model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in original.input]
        assert len(feeding) == sum(n.op_type == "QuantizeLinear" and n.output[0] in original.input
                                   for n in model.graph.node), spec  # no new QuantizeLinear in front of it
    assert f"already quantized ({op})" in _skips(steps["quantize"])[node]
    assert steps["quantize"].modified  # the float layer next to it is quantized


# ---------------------------------------------------------------------------- control flow


def _subgraph_contents(node):
    """What a rewrite of a control-flow node's subgraphs would change: weights and nodes (order aside:
    graphsurgeon's sort may reorder independent nodes, the opset converter may annotate)."""
    graphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return (sorted((t.name, t.SerializeToString()) for g in graphs for t in g.initializer),
            sorted((n.op_type, tuple(n.input), tuple(n.output)) for g in graphs for n in g.node))


@pytest.mark.parametrize("kind, node, inner", [("If", "branch", "Conv"), ("Loop", "loop", "MatMul"),
                                               ("Scan", "scan", "MatMul")])
def test_control_flow_subgraphs_are_reported_not_ignored(kind, node, inner):
    model = control_flow_model(kind)
    sub = _subgraph_contents(next(n for n in model.graph.node if n.name == node))
    steps = _each_pass(model)
    for spec, step in steps.items():
        kept = [n for n in step.model.graph.node if n.name == node]
        assert len(kept) == 1 and _subgraph_contents(kept[0]) == sub, spec  # subgraph weights and nodes as they were
    for spec in ("prune_weights:sparsity=0.5,keep_first_last=false", "prune_channels:ratio=0.3,keep_first_last=false,round_to=1",
                 f"factorize_gemm:rank_ratio=0.5,{_LR}", "quantize", "quantize:weights=int4"):
        reason = _skips(steps[spec]).get(node, "")
        assert "subgraph" in reason and (inner in reason or "Conv/Gemm/MatMul" in reason), (spec, reason)
    if kind == "If":
        assert "BatchNormalization" in _skips(steps["fold_batchnorm"])["branch"]
        assert "then_conv" in _skips(steps[f"factorize_conv:rank_ratio=0.5,{_LR}"])["branch"]
    assert steps["fold_batchnorm"].modified  # the main graph is still rewritten


def test_control_flow_through_the_cli_report(tmp_path, capsys):
    path = save_model(control_flow_model("If"), tmp_path / "if.onnx")
    code, _, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--no-latency", "--no-simplify",
                        "--pass", "fold_batchnorm")
    assert code == 0, err
    report = json.loads((tmp_path / "o.json").read_text())
    skipped = report["steps"][0]["report"]["skipped"]
    assert any(s["node"] == "branch" and "BatchNormalization" in s["reason"] for s in skipped)


# ----------------------------------------------------------------- the invariant, enforced


@dataclass(frozen=True, kw_only=True)
class _FailsAtRunTime(Pass):
    """Valid for onnx.checker and onnxruntime's loader, fails on the first run (a bad Reshape target)."""

    name: ClassVar[str] = "fails_at_run_time"

    def run(self, model, report, ctx):
        g = model.graph
        out = g.output[0].name
        g.node[-1].output[0] = out + "_pre"
        g.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape"))  # 10 logits
        g.output[0].CopyFrom(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["N", "M"]))
        g.node.append(onnx.helper.make_node("Reshape", [out + "_pre", "bad_shape"], [out], name="bad_reshape"))
        report.rewrite("bad_reshape")
        return model


@dataclass(frozen=True, kw_only=True)
class _DropsAnOutput(Pass):
    name: ClassVar[str] = "drops_an_output"

    def run(self, model, report, ctx):
        first = model.graph.node[0].output[0]
        model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info(first, onnx.TensorProto.FLOAT, list("NCHW")))
        report.rewrite("graph")
        return model


@dataclass(frozen=True, kw_only=True)
class _DuplicateNames(Pass):
    """Passes onnx.checker (names need not be unique there); onnxruntime refuses to load it."""

    name: ClassVar[str] = "duplicate_names"

    def run(self, model, report, ctx):
        for node in model.graph.node:
            node.name = "same"
        report.rewrite("every node")
        return model


@pytest.mark.parametrize("bad, reason", [
    (_FailsAtRunTime, "onnxruntime failed to run"),
    (_DropsAnOutput, "lacks output"),
    (_DuplicateNames, "onnxruntime cannot load"),
])
def test_invalid_outputs_are_rolled_back_not_raised(bad, reason):
    model = small_cnn()
    fold, broken, clean = Pipeline([parse_spec("fold_batchnorm"), bad(), parse_spec("cleanup")],
                                   verify_data=random_dataset(model, 4), latency=False).run(model).steps
    assert fold.accepted and fold.modified
    assert not broken.accepted and broken.reason.startswith("invalid output") and reason in broken.reason
    assert broken.model is fold.model and clean.accepted


def test_invalid_output_through_the_cli_leaves_the_previous_model(tmp_path, capsys, monkeypatch):
    import graph_opt.passes

    monkeypatch.setattr(graph_opt.passes, "PASSES", graph_opt.passes.PASSES + (_FailsAtRunTime,))
    path = save_model(small_cnn(), tmp_path / "m.onnx")
    code, _, err = _cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--no-latency", "--no-simplify",
                        "--pass", "fold_batchnorm", "--pass", "fails_at_run_time")
    assert code == 0, err
    report = json.loads((tmp_path / "o.json").read_text())
    fold, broken = report["steps"]
    assert fold["accepted"] and not broken["accepted"] and "invalid output" in broken["reason"]
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert_valid(out)
    assert op_count(out, "BatchNormalization") == 0 and op_count(out, "Reshape") == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(small_cnn(), {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_nan_in_any_output_breaks_every_tolerance(order):
    """One NaN output among several must not hide behind the finite ones (min/max skip a NaN
    depending on where it sits)."""
    from graph_opt.verify import compare_outputs

    ref = {k: np.ones((4, 3), np.float32) for k in order}
    cand = {k: (np.full((4, 3), np.nan, np.float32) if k == "b" else np.ones((4, 3), np.float32)) for k in order}
    report = compare_outputs(ref, cand, tolerances={"cosine": 0.9, "max_abs": 1.0, "snr_db": 10, "rel_error": 0.1})
    assert len(report.violations) == 4, report.violations
    assert np.isnan(report.cosine) and np.isnan(report.max_abs)
