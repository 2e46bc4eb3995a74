import numpy as np
import pytest
from builders import (
    GraphBuilder,
    assert_valid,
    constant_node_model,
    conv_bn_model,
    gemm_bn_model,
    op_count,
    random_input,
    run,
    small_cnn,
)

from graph_opt.passes.fold_batchnorm import FoldBatchnorm


def _parity(model, folded, shape):
    x = random_input(shape)
    return max(float(np.max(np.abs(ref - out)) / max(1.0, float(np.max(np.abs(ref)))))
               for ref, out in zip(run(model, {"x": x}), run(folded, {"x": x}), strict=True))


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


def _dead(model):
    """Initializers nothing reads and nodes whose outputs nothing reads (graph outputs count as read)."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return ([t.name for t in model.graph.initializer if t.name not in read],
            [n.name for n in model.graph.node if not any(o in read for o in n.output)])


def test_leaves_nothing_that_only_the_folded_nodes_read():
    """Constant-node weights and Identity-tied parameters: the old weights, the BN parameters and
    the Constant/Identity nodes that produced them go with the BN; a parameter another node still
    reads stays."""
    model = constant_node_model()
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 8, 8])
    c = g.conv(x, 3, 4, name="c")
    y = g.bn(c, 4, name="bnT")
    bn = g.nodes[-1]
    bn.input[1] = g.node("Identity", [bn.input[1]], ["gamma_alias"])
    g.nodes.insert(len(g.nodes) - 2, g.nodes.pop())
    g.output(g.node("Relu", [y], ["y"]), ["N", 4, 8, 8])
    g.output(g.node("Neg", [bn.input[2]], ["b"]), [4])  # beta is also read by the Neg
    tied = g.build()
    for before in (model, tied):
        result = FoldBatchnorm()(before)
        assert result.modified and op_count(result.model, "BatchNormalization") == 0
        assert _dead(result.model) == ([], [])
        assert_valid(result.model)
    assert op_count(result.model, "Identity") == 0
    assert "bnT.beta" in {t.name for t in result.model.graph.initializer}
    assert _parity(tied, result.model, (2, 3, 8, 8)) < 1e-5
    assert _parity(model, FoldBatchnorm()(model).model, (2, 3, 8, 8)) < 1e-5


def test_the_replaced_weights_are_gone_and_each_new_one_is_there_once():
    """The output holds the folded layers' new weights and the untouched initializers, and none of
    the replaced ones."""
    model = small_cnn()
    result = FoldBatchnorm()(model)
    before = {t.name for t in model.graph.initializer}
    after = {t.name: t for t in result.model.graph.initializer}
    replaced = before - set(after)
    assert replaced and all(n.endswith((".w", ".b", ".gamma", ".beta", ".mean", ".var")) for n in replaced)
    assert sum(n.endswith("_bnfold") for n in after) == 2 * len(result.report.rewritten)
    assert len(after) == len(result.model.graph.initializer)  # no name twice


def test_reads_the_callers_model_without_a_deep_copy_and_always_returns_a_new_one(monkeypatch):
    """The pass only reads its input (no private deep copy of every weight first), and hands back
    a model of its own, also when there is nothing to fold."""
    from graph_opt import pass_base

    copies = []
    real = pass_base.copy_model
    monkeypatch.setattr(pass_base, "copy_model", lambda m, **kw: copies.append(m) or real(m, **kw))
    model = small_cnn()
    before = model.SerializeToString()
    result = FoldBatchnorm()(model)
    assert result.modified and not copies and result.model is not model
    assert model.SerializeToString() == before
    folded = result.model
    again = FoldBatchnorm()(folded)
    assert not again.modified and again.model is not folded
    assert again.model.SerializeToString() == folded.SerializeToString()
