import pytest
from builders import GraphBuilder, constant_node_model, conv_bn_gemm_model, small_cnn

from graph_opt.errors import DataError
from graph_opt.stats import count_params, layer_macs, model_stats, op_histogram


def test_macs_and_params_by_hand():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 10, 10])
    c = g.conv(x, 3, 8, 3, name="c", pads=[0, 0, 0, 0])                   # out 8x8x8, 3*3*3 per output
    d = g.conv(c, 8, 8, 3, group=8, name="dw", pads=[1, 1, 1, 1], strides=[2, 2])  # out 8x4x4, 9 per output
    f = g.node("Flatten", [d], axis=1)
    y = g.gemm(f, 128, 10, name="fc")
    m = g.node("MatMul", [y, g.weight("mm.w", (10, 4))], name="mm")
    g.output(m, ["N", 4])
    model = g.build()
    macs = {l.name: l.macs for l in layer_macs(model)}
    assert macs == {"c": 8 * 8 * 8 * 27, "dw": 8 * 4 * 4 * 9, "fc": 10 * 128, "mm": 4 * 10}
    assert count_params(model) == (8 * 27 + 8) + (8 * 9 + 8) + (128 * 10 + 10) + 40
    assert layer_macs(model, {"x": (4, 3, 10, 10)})[0].macs == 4 * macs["c"]


def test_model_stats_summary():
    model = small_cnn()
    stats = model_stats(model)
    assert stats.ops["Conv"] == 4 and stats.ops["BatchNormalization"] == 4
    assert stats.macs == sum(l.macs for l in stats.layers) and stats.macs > 0
    assert stats.file_bytes == model.ByteSize() and stats.weight_bytes <= stats.file_bytes
    assert op_histogram(model) == stats.ops


def _attention_like():
    """q[B, S, 16] and k[B, T, 16]: a MatMul on a static weight (K from the weight) and q·kᵀ (S·T)."""
    g = GraphBuilder()
    q = g.node("MatMul", [g.input("q", ["B", "S", 16]), g.weight("wq", (16, 16))], name="proj")
    kt = g.node("Transpose", [g.input("k", ["B", "T", 16])], perm=[0, 2, 1])
    g.node("MatMul", [q, kt], ["scores"], name="qk")
    g.output("scores", ["B", "S", "T"])
    return g.build()


def test_symbolic_macs_and_binding_one_symbol_everywhere():
    model = _attention_like()
    with pytest.raises(DataError):  # strict by default: callers that need numbers get the error
        layer_macs(model)
    layers = {l.name: l for l in layer_macs(model, partial=True)}
    assert layers["proj"].macs is None and layers["proj"].macs_symbolic == "256*S"
    assert layers["qk"].macs_symbolic == "16*S*T"
    stats = model_stats(model)
    assert stats.macs is None and stats.macs_known == 0 and stats.macs_symbolic == "256*S + 16*S*T"
    assert stats.hint == "--input-shape q=1xSx16 --input-shape k=1xTx16"
    bound = model_stats(model, shapes={"q": (2, 5, 16), "k": (2, 7, 16)})
    assert bound.macs == 2 * 5 * 256 + 2 * 5 * 7 * 16 and bound.hint is None and bound.macs_symbolic is None


def test_constant_node_weights_count_per_layer():
    model, reference = constant_node_model(), conv_bn_gemm_model()
    assert not model.graph.initializer
    assert [(l.name, l.params, l.macs) for l in layer_macs(model)] == \
        [(l.name, l.params, l.macs) for l in layer_macs(reference)]
    assert all(l.params > 0 for l in layer_macs(model))


def test_a_minus_one_dim_is_dynamic_not_a_negative_size():
    import onnx

    """paddle2onnx writes -1 for a dynamic batch (in inputs and value_info): MACs stay positive."""
    from builders import small_cnn

    from graph_opt.stats import model_stats

    model = small_cnn(channels=4)
    expected = model_stats(model).macs
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in inferred.graph.value_info:  # the -1 annotations a tool saved next to the graph
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = -1
    model.graph.value_info.extend(inferred.graph.value_info)
    assert expected and model_stats(model).macs == expected


def test_layers_inside_if_bodies_make_macs_unknown_not_zero():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graph_opt.stats import model_stats

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["x", "w"], [f"{name}_y"])], name, [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                            helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    stats = model_stats(model)
    assert stats.macs is None and "2 layer(s) inside If/Loop/Scan bodies" in stats.note
