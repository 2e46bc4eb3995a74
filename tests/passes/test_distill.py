"""distill: the student trains towards the teacher and comes back as the same graph.

The training tests run only where the optional torch extra is installed; the refusals without it
run everywhere."""

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, assert_valid, random_input, run, small_cnn

from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError
from graph_opt.metrics import kd_loss
from graph_opt.pass_base import PassContext
from graph_opt.passes.distill import Distill, MissingExtraError
from graph_opt.passes.prune_weights import PruneWeights
from graph_opt.pipeline import Pipeline


def _data(n, seed, shape=(4, 16, 16)):
    return Dataset({"x": random_input([n, *shape], seed=seed)}, None, "calib.npz")


def _structure(model):
    return ([(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node],
            sorted(t.name for t in model.graph.initializer))


def test_without_torch_a_pipeline_refuses_before_any_pass(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    model = small_cnn(channels=4)
    pipeline = Pipeline([PruneWeights(sparsity=0.5), Distill()], verify_data=_data(4, 0))
    with pytest.raises(MissingExtraError, match=r"pip install 'graph-opt\[train\]'"):
        pipeline.run(model)
    from graph_opt.compare import Comparer, named_pipelines

    with pytest.raises(MissingExtraError):  # compare refuses as early
        Comparer(named_pipelines(["prune_weights distill"]), verify_data=_data(4, 0))


def test_without_teacher_or_data_it_skips_with_the_reason():
    model = small_cnn(channels=4)
    result = Distill()(model, PassContext())
    assert not result.modified and "no teacher" in result.report.skipped[0].reason
    result = Distill()(model, PassContext(original=model))
    assert not result.modified and "no calibration data" in result.report.skipped[0].reason


needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the optional torch extra (graph-opt[train]) is not installed")


@needs_torch
def test_distill_lowers_the_kd_loss_and_keeps_the_graph():
    teacher = small_cnn(channels=4)
    student = PruneWeights(sparsity=0.6)(teacher).model  # a compressed student that has drifted
    calib, test = _data(96, 0), _data(64, 1)
    before = kd_loss(run(teacher, test.inputs)[0], run(student, test.inputs)[0], temperature=4.0)
    result = Distill(steps=120, lr=3e-3, batch_size=16, eval_every=20, patience=10, T=4.0, threads=1)(
        student, PassContext(data=calib, original=teacher))
    assert result.modified and result.report.rewritten, result.report.skipped
    assert all(e["action"] == "trained" for e in result.report.rewritten)
    assert _structure(result.model) == _structure(student)  # same nodes, same names: only values moved
    assert_valid(result.model)
    after = kd_loss(run(teacher, test.inputs)[0], run(result.model, test.inputs)[0], temperature=4.0)
    assert after < 0.7 * before, (before, after)  # on held-out inputs, not the training ones
    assert any(n.startswith("distill:") and "held-out loss" in n for n in result.report.notes)


def _softmax_cnn():
    """small_cnn's logits through a Softmax: the graph's output holds probabilities."""
    model = small_cnn(channels=4)
    identity = next(n for n in model.graph.node if n.op_type == "Identity")
    identity.op_type = "Softmax"
    identity.attribute.append(onnx.helper.make_attribute("axis", 1))
    return model


@needs_torch
def test_a_softmax_output_is_distilled_on_its_logs():
    teacher = _softmax_cnn()
    student = PruneWeights(sparsity=0.6)(teacher).model
    calib, test = _data(96, 0), _data(64, 1)

    def kd(model):  # KD at T=4 on the logits the probabilities come from (log p = z − logsumexp z)
        return kd_loss(np.log(run(teacher, test.inputs)[0]), np.log(run(model, test.inputs)[0]), temperature=4.0)

    before = kd(student)
    result = Distill(steps=120, lr=3e-3, batch_size=16, eval_every=20, patience=10, T=4.0, threads=1)(
        student, PassContext(data=calib, original=teacher))
    assert result.modified, result.report.skipped
    assert any("logits hold probabilities" in n for n in result.report.notes), result.report.notes
    assert kd(result.model) < 0.7 * before
    # the held-out loss the pass reports is that KD (its scale), not the one of softmax(probabilities / T)
    start = float(next(n for n in result.report.notes if "held-out loss" in n).split("held-out loss ")[1].split()[0])
    assert start > 0.1 * before, (start, before)
    logits = Distill(steps=1, threads=1)(small_cnn(channels=4), PassContext(data=_data(32, 0), original=small_cnn(channels=4)))
    assert not any("probabilities" in n for n in logits.report.notes)  # logits are left as they are


@needs_torch
def test_hints_attention_and_relation_losses_train():
    teacher = small_cnn(channels=4)
    student = PruneWeights(sparsity=0.6)(teacher).model
    hint = next(n.output[0] for n in teacher.graph.node if n.op_type == "Relu")
    result = Distill(steps=40, lr=3e-3, hint=(f"{hint}={hint}",), attention=1.0, relation=1.0, eval_every=10,
                     threads=1)(
        student, PassContext(data=_data(48, 0), original=teacher))
    assert result.modified, result.report.skipped
    with pytest.raises(GraphOptError, match="not computed by the student"):
        Distill(hint=("nope",))(student, PassContext(data=_data(8, 0), original=teacher))


@needs_torch
def test_conversion_reproduces_onnxruntime_on_every_op():
    from graph_opt.passes._torch import TorchGraph

    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 4, 9, 9])
    a = g.node("HardSwish", [g.conv(x, 4, 8, pads=[1, 1, 1, 1])])
    a = g.node("Pad", [a, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="constant")
    a = g.node("AveragePool", [a], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    b = g.node("MaxPool", [a], kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER")
    c = g.node("Clip", [g.node("Sigmoid", [b]), g.const("lo", np.array(0.1, np.float32)),
                        g.const("hi", np.array(0.9, np.float32))])
    d = g.node("Concat", [b, c], axis=1)
    t = g.node("Transpose", [g.node("Reshape", [d, g.const("shape", np.array([0, 16, -1], np.int64))])], perm=[0, 2, 1])
    ln = g.node("LayerNormalization", [t, g.weight("ln.s", (16,)), g.weight("ln.b", (16,))], axis=-1)
    m = g.node("MatMul", [ln, g.weight("mm.w", (16, 8))])
    e = g.node("Tanh", [g.node("Add", [m, g.weight("mm.b", (8,))])])
    r = g.node("ReduceMean", [e], axes=[1], keepdims=0)
    s = g.node("Softmax", [g.gemm(r, 8, 5, name="head")], axis=-1)
    g.node("Identity", [s], ["y"])
    g.output("y", ["N", 5])
    model = g.build()
    feed = {"x": random_input([3, 4, 9, 9])}
    TorchGraph(model).check(feed, run(model, feed), rtol=1e-5)


@needs_torch
def test_an_op_the_conversion_lacks_is_refused_in_one_line():
    from graph_opt.passes._torch import UntrainableError

    g = GraphBuilder()
    x = g.input("x", ["N", 8])
    g.node("Identity", [g.node("Einsum", [g.gemm(x, 8, 8)], equation="ni->ni")], ["y"])
    g.output("y", ["N", 8])
    model = g.build()
    with pytest.raises(UntrainableError, match=r"op Einsum .* cannot be trained"):
        Distill()(model, PassContext(data=Dataset({"x": random_input([8, 8])}, None, "c.npz"), original=model))


def _encoder_plumbing_model():
    """The shape and pooling plumbing of a BERT-style sentence encoder export: position ids from
    Shape → ConstantOfShape → CumSum, a Reshape whose target is computed from Shape at run time,
    a masked mean (Cast, ReduceSum, Clip, Div), an L2 normalization (ReduceL2, Expand), and an
    integer Div that must truncate (8 // 3 = 2, where float division gives 2.67)."""
    g = GraphBuilder(seed=3)
    ids = g.input("ids", ["N", 6], dtype=np.int64)
    mask = g.input("mask", ["N", 6], dtype=np.int64)
    ones = g.node("ConstantOfShape", [g.node("Shape", [ids])],
                  value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
    pos = g.node("Sub", [g.node("CumSum", [ones, g.const("one_axis", np.array(1, np.int64))]),
                         g.const("one", np.array(1, np.int64))])
    x = g.node("Add", [g.node("Gather", [g.weight("tok", (10, 8)), ids]), g.node("Gather", [g.weight("pos", (6, 8)), pos])])
    h = g.node("MatMul", [x, g.weight("w", (8, 8))])
    shape = g.node("Shape", [h])
    batch = g.node("Unsqueeze", [g.node("Gather", [shape, g.const("zero", np.array(0, np.int64))], axis=0),
                                 g.const("ax0", np.array([0], np.int64))])
    heads = g.node("Reshape", [h, g.node("Concat", [batch, g.const("rest", np.array([6, 2, 4], np.int64))], axis=0)])
    h = g.node("Reshape", [heads, g.node("Concat", [batch, g.const("back", np.array([6, 8], np.int64))], axis=0)])
    third = g.node("Cast", [g.node("Div", [g.node("Gather", [shape, g.const("two", np.array(2, np.int64))], axis=0),
                                           g.const("three", np.array(3, np.int64))])], to=onnx.TensorProto.FLOAT)
    h = g.node("Mul", [h, third])
    keep = g.node("Cast", [g.node("Unsqueeze", [mask, g.const("ax2", np.array([2], np.int64))])], to=onnx.TensorProto.FLOAT)
    total = g.node("ReduceSum", [g.node("Mul", [h, keep]), g.const("ax1", np.array([1], np.int64))], keepdims=0)
    count = g.node("Clip", [g.node("ReduceSum", [keep, g.const("ax1b", np.array([1], np.int64))], keepdims=0),
                            g.const("tiny", np.array(1e-9, np.float32))])
    mean = g.node("Div", [total, count])
    norm = g.node("Clip", [g.node("ReduceL2", [mean], axes=[1], keepdims=1), g.const("eps", np.array(1e-12, np.float32))])
    g.node("Div", [mean, g.node("Expand", [norm, g.node("Shape", [mean])])], ["y"])
    g.output("y", ["N", 8])
    return g.build()


@needs_torch
def test_conversion_reproduces_a_sentence_encoders_shape_and_pooling_ops():
    from graph_opt.passes._torch import TorchGraph

    model = _encoder_plumbing_model()
    rng = np.random.default_rng(0)
    mask = np.ones((3, 6), np.int64)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    feed = {"ids": rng.integers(0, 10, (3, 6)).astype(np.int64), "mask": mask}
    TorchGraph(model).check(feed, run(model, feed), rtol=1e-5)
    # scalar constants (GELU's 0.5, a mask value) are not trained; the MatMul weight is
    assert TorchGraph.layer_weights(model) == {"w"}


@needs_torch
def test_conversion_reproduces_a_one_hot_byte_prefix_and_elementwise_extremes():
    """A byte classifier's preprocessing (magika's kind): an int32 input broadcast against the
    value range, Equal, Cast to float, then a MatMul; Max/Min over three inputs, Reciprocal,
    ReduceMax/ReduceMin with axes as an input, Where on a Greater/Less/Not mask."""
    from graph_opt.passes._torch import TorchGraph

    g = GraphBuilder(opset=18, seed=4)
    b = g.input("bytes", ["N", 6], dtype=np.int32)
    col = g.node("Unsqueeze", [b, g.const("ax", np.array([2], np.int64))])
    hot = g.node("Cast", [g.node("Equal", [col, g.const("values", np.arange(5, dtype=np.int32).reshape(1, 1, 5))])],
                 to=onnx.TensorProto.FLOAT)
    h = g.node("MatMul", [hot, g.weight("emb", (5, 4))])
    top = g.node("Max", [h, g.weight("floor", (4,)), g.node("Neg", [h])])
    low = g.node("Min", [h, g.weight("ceil", (4,)), g.node("Reciprocal", [g.node("Add", [top, g.const("one", np.array(1.0, np.float32))])])])
    keep = g.node("Not", [g.node("Less", [low, g.const("zero", np.array(0.0, np.float32))])])
    mixed = g.node("Where", [g.node("Greater", [top, low]), g.node("Where", [keep, low, top]), h])
    axes = g.const("axes1", np.array([1], np.int64))
    g.node("Add", [g.node("ReduceMax", [mixed, axes], keepdims=0), g.node("ReduceMin", [mixed, axes], keepdims=0)], ["y"])
    g.output("y", ["N", 4])
    model = g.build()
    rng = np.random.default_rng(1)
    feed = {"bytes": rng.integers(0, 6, (3, 6)).astype(np.int32)}  # 5 is outside the one-hot's range
    assert {"Equal", "Max", "Min", "Reciprocal", "ReduceMax", "ReduceMin", "Where"} <= {n.op_type for n in model.graph.node}
    TorchGraph(model).check(feed, run(model, feed), rtol=1e-5)


def _pool_student_and_data():
    from builders import masked_pool_model, padded_data

    teacher = masked_pool_model()
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    rng = np.random.default_rng(3)
    for t in student.graph.initializer:  # a student whose two layers drifted (as a compression leaves them)
        if t.name in ("w1", "w2"):
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array((w + 0.5 * np.std(w) * rng.standard_normal(w.shape))
                                                    .astype(np.float32), t.name))
    return teacher, student, Dataset(padded_data(64, seed=0), None, "calib"), padded_data(48, seed=1)


def _masked_error(teacher, student, feed):
    (t,), (s,) = run(teacher, feed), run(student, feed)
    return float(np.sum((s - t) ** 2) / np.sum(t ** 2))


@needs_torch
def test_blocks_train_a_row_wise_block_on_real_rows_and_only_run_the_rest():
    teacher, student, calib, test = _pool_student_and_data()
    fc2 = next(n for n in teacher.graph.node if "b2" in n.input).output[0]  # fc2's bias Add: row-wise up to here
    before = _masked_error(teacher, student, test)
    assert before > 0.05, before  # vacuity: pruning really moved the output
    result = Distill(blocks=(fc2, "y"), steps=0, block_epochs=30, block_lr=3e-3, batch_size=16, threads=1)(
        student, PassContext(data=calib, original=teacher))
    assert result.modified, (result.report.notes, result.report.skipped)
    assert _structure(result.model) == _structure(student)
    assert_valid(result.model)
    notes = [n for n in result.report.notes if n.startswith("distill blocks:")]
    assert any("row mask 'attention_mask'" in n for n in notes), notes
    train_rows = int(calib.inputs["attention_mask"][:48].sum())  # 4 batches of 16, the last one held out
    trained = next(n for n in notes if "block 1" in n)
    assert f"trained on {train_rows} rows" in trained, trained  # real positions only, no padding
    assert any("block 2" in n and "not trained" in n and "position's features alone" in n for n in notes), notes
    after = _masked_error(teacher, result.model, test)
    assert after < 0.5 * before, (before, after)  # on held-out inputs


@needs_torch
def test_blocks_refuse_a_boundary_the_student_lacks_and_steps_zero_needs_blocks():
    from graph_opt.passes._torch import UntrainableError

    teacher, student, calib, _ = _pool_student_and_data()
    with pytest.raises(UntrainableError, match="'nope' is not computed by the student"):
        Distill(blocks=("nope",), steps=0, threads=1)(student, PassContext(data=calib, original=teacher))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Distill(steps=0)
