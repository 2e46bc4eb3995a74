import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, ffn_model, op_count, random_input, residual_model, run, small_cnn
from onnx import numpy_helper

from graph_opt.errors import SpecError
from graph_opt.passes.prune_weights import PruneWeights, compressed_sizes
from graph_opt.registry import parse_spec

FREE = {"keep_first_last": False}


def _layer_weights(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
            and n.input[1] in inits}


def _zero_share(w):
    return float(np.count_nonzero(w == 0) / w.size)


def test_per_layer_sparsity_is_reached_and_reported():
    model = residual_model()
    result = PruneWeights(sparsity=0.6, **FREE)(model)
    assert result.modified
    assert_valid(result.model)
    before, after = _layer_weights(model), _layer_weights(result.model)
    assert all(_zero_share(w) == 0 for w in before.values())  # vacuity guard
    for entry in result.report.rewritten:
        w = after[entry["node"]]
        assert entry["sparsity"] == pytest.approx(_zero_share(w))
        assert abs(entry["sparsity"] - 0.6) <= 0.5 / w.size + 1e-12  # round(0.6 · size) zeros
        kept, dropped = np.abs(before[entry["node"]][w != 0]), np.abs(before[entry["node"]][w == 0])
        assert kept.min() >= dropped.max()                          # the smallest went
    assert {e["node"] for e in result.report.rewritten} == set(before)
    assert op_count(result.model, "Conv") == op_count(model, "Conv")


def test_global_scope_ranks_all_layers_together():
    model = residual_model()
    result = PruneWeights(sparsity=0.5, scope="global", **FREE)(model)
    weights = _layer_weights(result.model)
    total = sum(w.size for w in weights.values())
    zeros = sum(np.count_nonzero(w == 0) for w in weights.values())
    assert zeros == round(0.5 * total)
    shares = [e["sparsity"] for e in result.report.rewritten]
    assert max(shares) - min(shares) > 0.05  # layers differ, unlike scope=layer
    threshold = max(np.abs(w[w == 0]).max(initial=0) for w in weights.values())
    before = _layer_weights(model)
    assert min(np.abs(before[k][w != 0]).min() for k, w in weights.items()) >= threshold


def test_two_four_pattern_along_the_reduction_axis():
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 8, 4, 4])
    c = g.conv(x, 8, 4, 3, name="conv")
    f = g.node("Flatten", [g.node("GlobalAveragePool", [c])], axis=1)
    g.node("Identity", [g.gemm(f, 4, 8, trans_b=0, name="fc")], ["y"])
    g.output("y", ["N", 8])
    result = PruneWeights(pattern="2:4", **FREE)(g.build())
    weights = _layer_weights(result.model)
    conv = np.moveaxis(weights["conv"], 1, -1).reshape(-1, 4)   # runs of 4 input channels
    fc = np.moveaxis(weights["fc"], 0, -1).reshape(-1, 4)       # runs of 4 along K (transB=0: axis 0)
    for runs in (conv, fc):
        assert (np.count_nonzero(runs, axis=1) == 2).all()
    assert all(e["sparsity"] == 0.5 and e["pattern"] == "2:4" for e in result.report.rewritten)


def test_pattern_that_does_not_divide_is_skipped_with_reason():
    g = GraphBuilder()
    x = g.input("x", ["N", 6])
    g.node("Identity", [g.gemm(x, 6, 4, name="fc")], ["y"])
    g.output("y", ["N", 4])
    result = PruneWeights(pattern="2:4", **FREE)(g.build())
    assert not result.modified
    assert "multiple of 4" in result.report.skipped[0].reason


def test_matmul_weights_of_a_transformer_ffn():
    model = ffn_model("Gelu")
    result = PruneWeights(sparsity=0.5, pattern="1:2", **FREE)(model)
    assert_valid(result.model)
    w = _layer_weights(result.model)
    assert (np.count_nonzero(w["fc1"].reshape(-1, 2, 32), axis=1) == 1).all()  # runs along K (axis 0)


def test_first_last_kept_dense_and_shared_weights_skipped():
    result = PruneWeights(sparsity=0.5)(small_cnn())
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert "first layer" in reasons["conv1"] and "last layer" in reasons["head"]
    assert _zero_share(_layer_weights(result.model)["head"]) == 0
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 4, 4])
    w = g.weight("shared.w", (4, 4, 1, 1))
    y = g.node("Conv", [g.node("Conv", [x, w], name="a", kernel_shape=[1, 1]), w], name="b", kernel_shape=[1, 1])
    g.output(g.node("Identity", [y], ["y"]), ["N", 4, 4, 4])
    shared = PruneWeights(**FREE)(g.build())
    assert not shared.modified and "shared" in shared.report.skipped[0].reason


def test_lossy_bound_for_a_single_linear_layer():
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 16])
    g.node("Identity", [g.gemm(x, 16, 8, trans_b=0, bias=False, name="fc")], ["y"])
    g.output("y", ["N", 8])
    model = g.build()
    result = PruneWeights(sparsity=0.7, **FREE)(model)
    w0, w1 = _layer_weights(model)["fc"], _layer_weights(result.model)["fc"]
    xs = random_input((32, 16))
    err = np.abs(run(model, {"x": xs})[0] - run(result.model, {"x": xs})[0])
    # |Δy[n]| = |Σ_k x[k] · w_dropped[k, n]| ≤ max|x| · Σ_k |w_dropped[k, n]|
    bound = np.abs(xs).max(axis=1, keepdims=True) * np.abs(w0 - w1).sum(axis=0, keepdims=True)
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()


def test_report_states_compressibility_not_speed():
    model = residual_model()
    result = PruneWeights(sparsity=0.8, **FREE)(model)
    notes = " ".join(result.report.notes)
    assert "no speed-up" in notes and "gzip" in notes
    s0, s1 = compressed_sizes(model), compressed_sizes(result.model)
    assert f"gzip {s0['gzip_bytes']} → {s1['gzip_bytes']}" in notes
    assert s1["gzip_bytes"] < 0.8 * s0["gzip_bytes"]


def test_nothing_to_do_is_not_a_modification():
    model = residual_model()
    assert not PruneWeights(sparsity=0.0)(model).modified
    once = PruneWeights(sparsity=0.5, **FREE)(model).model
    again = PruneWeights(sparsity=0.5, **FREE)(once)
    assert not again.modified and again.model.SerializeToString() == once.SerializeToString()


def test_registry_and_validation():
    assert parse_spec("prune_weights:sparsity=0.7,scope=global,op_types=Conv,Gemm") == \
        PruneWeights(sparsity=0.7, scope="global", op_types=("Conv", "Gemm"))
    assert parse_spec("prune_weights:pattern=2:4") == PruneWeights(pattern="2:4")
    for bad in ("prune_weights:pattern=4:2", "prune_weights:sparsity=1", "prune_weights:scope=row"):
        with pytest.raises(SpecError):
            parse_spec(bad)


def test_layer_selection_by_name_and_op_type():
    model = residual_model()
    only = PruneWeights(include=("res*",), **FREE)(model)
    assert {e["node"] for e in only.report.rewritten} == {"res1", "res2"}
    convs = PruneWeights(op_types=("Gemm",), **FREE)(model)
    assert {e["node"] for e in convs.report.rewritten} == {"head"}
    rest = PruneWeights(exclude=("head", "stem"), **FREE)(model)
    assert {e["node"] for e in rest.report.rewritten} == {"res1", "res2", "expand"}
