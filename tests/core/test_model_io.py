import os
import zipfile

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, conv_bn_model, gemm_bn_model

from graph_opt.errors import ModelLoadError, ModelSaveError
from graph_opt.external_data import read_raw
from graph_opt.gs_convert import to_graph, to_model
from graph_opt.model_io import check_model, load_model, save_model


def _big_weight_model():
    g = GraphBuilder()
    x = g.input("x", ["N", 64])
    g.output(g.gemm(x, 64, 64, name="fc"), ["N", 64])
    return g.build()


def test_round_trip(tmp_path):
    model = conv_bn_model()
    path = save_model(model, tmp_path / "m.onnx")
    assert load_model(path).SerializeToString() == model.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left


def test_external_data_round_trip(tmp_path):
    model = _big_weight_model()
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    raw = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    loaded = load_model(path)
    for a, b in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_refuses_to_overwrite_input(tmp_path):
    path = save_model(conv_bn_model(), tmp_path / "in.onnx")
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save_model(gemm_bn_model(), tmp_path / "sub" / ".." / "in.onnx", protect=(path,))
    assert path.read_bytes() == before


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(ModelSaveError, match="does not exist"):
        save_model(conv_bn_model(), tmp_path / "nope" / "m.onnx")


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = save_model(conv_bn_model(), tmp_path / "m.onnx")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(ModelSaveError, match="No space left"):
        save_model(gemm_bn_model(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("content, message", [
    (b"", "not a valid ONNX model"),
    (os.urandom(256), "not a valid ONNX model"),
])
def test_load_rejects_garbage(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_load_rejects_zip_and_truncated(tmp_path):
    z = tmp_path / "z.onnx"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.txt", "hello" * 100)
    with pytest.raises(ModelLoadError):
        load_model(z)
    good = conv_bn_model().SerializeToString()
    t = tmp_path / "t.onnx"
    t.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError):
        load_model(t)


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.onnx")


def test_missing_and_truncated_external_data(tmp_path):
    path = save_model(_big_weight_model(), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    payload = data.read_bytes()
    data.write_bytes(payload[:10])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(path)


def test_external_data_outside_folder_is_refused(tmp_path):
    path = save_model(_big_weight_model(), tmp_path / "m.onnx", external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)


def test_graphsurgeon_copy_owns_its_weights():
    model = conv_bn_model()
    before = model.SerializeToString()
    graph = to_graph(model)
    for t in graph.tensors().values():
        if hasattr(t, "values"):
            t.values[...] = 0  # in-place edit of the graph's arrays
    assert model.SerializeToString() == before
    again = to_model(graph, model)
    assert again.opset_import == model.opset_import and again.ir_version == model.ir_version
    check_model(again)


def test_switches_to_external_data_above_the_protobuf_limit(tmp_path, monkeypatch):
    import graph_opt.external_data as ext

    model = _big_weight_model()
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)  # pretend 16 KB of weights is "over 2 GB"
    path = save_model(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").is_file()
    assert read_raw(load_model(path).graph.initializer[0]) == model.graph.initializer[0].raw_data


@pytest.mark.parametrize("elem", ["INT4", "INT2"])
def test_packed_sub_byte_weights_survive_graphsurgeon(elem):
    """graphsurgeon cannot re-export int4/int2 initializers; to_graph/to_model carry them through."""
    from onnx import TensorProto, helper

    from graph_opt.passes import Cleanup

    codes = np.array([[1, -1, 0, 1], [0, 1, -1, -2]], dtype=np.int8)
    w = helper.make_tensor("w_q", getattr(TensorProto, elem), [2, 4], codes.flatten().tolist())
    scale = onnx.numpy_helper.from_array(np.array(0.5, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s"], ["w"]),
             helper.make_node("Add", ["x", "w"], ["y"]),
             helper.make_node("Identity", ["x"], ["dead"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    model.ir_version = 13
    result = Cleanup()(model)
    assert result.modified and [n.op_type for n in result.model.graph.node] == ["DequantizeLinear", "Add"]
    kept = {t.name: t for t in result.model.graph.initializer}
    assert kept["w_q"].SerializeToString() == w.SerializeToString()
    assert [i.name for i in result.model.graph.input] == ["x"]
    from builders import assert_valid, run

    assert_valid(result.model)
    x = np.zeros((2, 4), np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], codes * 0.5)


def test_wire_size_equals_protobuf_bytesize_without_encoding_the_weights():
    """Raw data of every length class of the length varint (1 to 4 bytes), float_data, an empty
    raw_data, a Constant node, an If subgraph with its own initializer, a model without a graph,
    and a quantized model (int8, int4 and int2 initializers)."""
    from onnx import TensorProto, helper, numpy_helper

    from graph_opt.data import random_dataset
    from graph_opt.external_data import wire_size
    from graph_opt.pass_base import PassContext
    from graph_opt.passes import Quantize

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"w{n}") for n in (3, 40, 5000, 600_000)]
    inits.append(helper.make_tensor("fd", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    empty = helper.make_tensor("empty", TensorProto.FLOAT, [0], [])
    empty.raw_data = b""
    inits.append(empty)
    then = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
                             [numpy_helper.from_array(np.ones(2, np.float32), "sub_w")])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(300, dtype=np.float32))),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert wire_size(model) == model.ByteSize()
    assert wire_size(onnx.ModelProto(ir_version=8)) == onnx.ModelProto(ir_version=8).ByteSize()
    cnn = conv_bn_model()
    for opts in ({}, {"weights": "int4", "activations": "none"}, {"weights": "ternary"}):
        q = Quantize(**opts)(cnn, PassContext(data=random_dataset(cnn, 8))).model
        assert any(t.HasField("raw_data") for t in q.graph.initializer)
        assert wire_size(q) == q.ByteSize()


def test_check_model_without_inference_still_runs_the_strict_shape_check():
    from onnx import TensorProto, helper

    from graph_opt.errors import InvalidModelError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    relu = helper.make_node("Relu", ["x"], ["h"])
    good = helper.make_model(helper.make_graph([relu, helper.make_node("Relu", ["h"], ["y"])], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 13)])
    inferred = check_model(good)
    assert [v.name for v in inferred.graph.value_info] == ["h"]  # the default returns the inferred copy
    assert check_model(good, infer=False) is good and not good.graph.value_info
    # Add of float and int64: every node is well formed, only type inference finds the mismatch
    bad = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "n"], ["y"])], "g", [x, n], [y]),
                            opset_imports=[helper.make_opsetid("", 13)])
    check_model(bad, full=False, infer=False)
    for infer in (True, False):
        with pytest.raises(InvalidModelError):
            check_model(bad, full=True, infer=infer)
