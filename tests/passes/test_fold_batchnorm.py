import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, conv_bn_model, gemm_bn_model, op_count, random_input, run, small_cnn

from graph_opt.passes.fold_batchnorm import FoldBatchnorm


def _parity(model, folded, shape):
    x = random_input(shape)
    ref, out = run(model, {"x": x})[0], run(folded, {"x": x})[0]
    return float(np.max(np.abs(ref - out)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("group", [1, 4, 8])
def test_conv_bn_folds_exactly(group):
    model = conv_bn_model(cin=8, cout=8, group=group)
    assert op_count(model, "BatchNormalization") == 1  # vacuity guard
    result = FoldBatchnorm()(model)
    assert result.modified and len(result.report.rewritten) == 1
    assert op_count(result.model, "BatchNormalization") == 0
    assert op_count(result.model, "Conv") == 1
    assert_valid(result.model)
    assert _parity(model, result.model, (2, 8, 8, 8)) < 1e-5


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.5, "beta": 2.0}])
def test_gemm_bn_folds_exactly(trans_b, attrs):
    model = gemm_bn_model(trans_b=trans_b, **attrs)
    assert op_count(model, "BatchNormalization") == 1
    result = FoldBatchnorm()(model)
    assert result.modified
    assert op_count(result.model, "BatchNormalization") == 0
    assert_valid(result.model)
    assert _parity(model, result.model, (5, 16)) < 1e-5


def test_conv_without_bias_gets_one():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 8, 8])
    g.output(g.node("Relu", [g.bn(g.conv(x, 3, 4, bias=False), 4)], ["y"]), ["N", 4, 8, 8])
    model = g.build()
    result = FoldBatchnorm()(model)
    assert op_count(result.model, "BatchNormalization") == 0
    assert len([n for n in result.model.graph.node if n.op_type == "Conv"][0].input) == 3
    assert _parity(model, result.model, (1, 3, 8, 8)) < 1e-5


def test_skips_when_conv_output_has_another_reader():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 8, 8])
    c = g.conv(x, 3, 4)
    g.output(g.node("Add", [g.bn(c, 4), c], ["y"]), ["N", 4, 8, 8])
    result = FoldBatchnorm()(g.build())
    assert not result.modified
    assert "also read elsewhere" in result.report.skipped[0].reason


def test_skips_shared_weight():
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 8, 8])
    w = g.weight("shared.w", (4, 4, 3, 3))
    c1 = g.node("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    c2 = g.node("Conv", [c1, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output(g.node("Identity", [g.bn(c2, 4)], ["y"]), ["N", 4, 8, 8])
    result = FoldBatchnorm()(g.build())
    assert not result.modified
    assert "shared" in result.report.skipped[0].reason


def test_skips_bn_after_non_layer():
    g = GraphBuilder()
    x = g.input("x", ["N", 4, 8, 8])
    g.output(g.node("Identity", [g.bn(g.node("Relu", [x]), 4)], ["y"]), ["N", 4, 8, 8])
    result = FoldBatchnorm()(g.build())
    assert not result.modified and "not Conv or Gemm" in result.report.skipped[0].reason


def test_whole_cnn():
    model = small_cnn()
    n_bn = op_count(model, "BatchNormalization")
    assert n_bn == 4
    result = FoldBatchnorm()(model)
    assert len(result.report.rewritten) == n_bn
    assert op_count(result.model, "BatchNormalization") == 0
    assert_valid(result.model)
    assert _parity(model, result.model, (3, 3, 16, 16)) < 1e-5


def test_reads_bn_parameters_through_identity():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 8, 8])
    c = g.conv(x, 3, 4)
    y = g.bn(c, 4, name="bnI")
    bn = g.nodes[-1]
    bn.input[2] = g.node("Identity", [bn.input[2]], ["beta_alias"])  # as torch exports tied parameters
    g.nodes.insert(len(g.nodes) - 2, g.nodes.pop())  # keep topological order: Identity before the BN
    g.output(g.node("Relu", [y], ["y"]), ["N", 4, 8, 8])
    model = g.build()
    result = FoldBatchnorm()(model)
    assert result.modified and op_count(result.model, "BatchNormalization") == 0
    assert_valid(result.model)
    assert _parity(model, result.model, (2, 3, 8, 8)) < 1e-5
