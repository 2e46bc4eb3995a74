"""A second consumer: the same model and data under OpenVINO's CPU plugin and onnxruntime.

The OpenVINO cases run only where the optional extra is installed (CI installs it)."""

import importlib.util

import numpy as np
import pytest
from builders import GraphBuilder, random_input, small_cnn

from graph_opt import runtime
from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError
from graph_opt.pass_base import PassContext
from graph_opt.passes.quantize import Quantize
from graph_opt.verify import compare_outputs

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the optional openvino extra is not installed")


def test_unknown_runtime_is_a_user_error():
    with pytest.raises(GraphOptError, match="unknown runtime 'tvm'"):
        runtime.get("tvm")


def test_onnxruntime_runtime_runs_and_times():
    model = small_cnn(channels=4)
    data = Dataset({"x": random_input([5, 4, 16, 16])}, None, "t")
    rt = runtime.get("onnxruntime")
    assert rt.load(model) is None
    out = rt.run(model, data)
    assert out["logits"].shape == (5, 10)
    assert len(rt.latency([model, model], data.sample(0), runs=3)) == 2


@needs_openvino
def test_openvino_matches_onnxruntime_on_float_and_int8_models():
    model = small_cnn(channels=4)
    data = Dataset({"x": random_input([6, 4, 16, 16])}, None, "t")
    ort_rt, ov_rt = runtime.get("onnxruntime"), runtime.get("openvino")
    float_parity = compare_outputs(ort_rt.run(model, data), ov_rt.run(model, data))
    assert float_parity.cosine > 0.99999 and list(ov_rt.run(model, data)) == ["logits"]
    q = Quantize(sensitivity_snr_db=None)(model, PassContext(data=data)).model
    assert ov_rt.load(q) is None  # the QDQ graph is read as it is
    int8 = compare_outputs(ov_rt.run(model, data), ov_rt.run(q, data))
    assert int8.cosine > 0.99
    times = ov_rt.latency([model, q], data.sample(0), runs=3)
    assert len(times) == 2 and all(t > 0 for t in times)


@needs_openvino
def test_openvino_names_why_it_refuses_a_model():
    g = GraphBuilder()
    x = g.input("x", ["N", 4])
    g.node("MadeUpOp", [x], ["y"], domain="com.example")
    g.output("y", ["N", 4])
    model = g.build(check=False)
    reason = runtime.get("openvino").load(model)
    assert reason and "MadeUpOp" in reason
    with pytest.raises(GraphOptError, match="OpenVINO refuses the model"):
        runtime.get("openvino").run(model, Dataset({"x": np.ones((2, 4), np.float32)}, None, "t"))


def test_an_openvino_refusal_keeps_the_message_on_the_line_after_the_op():
    from graph_opt.runtime import _openvino_reason

    exc = RuntimeError("Exception from src/core/src/node.cpp:123:\nConv-16 with a message:\n"
                       "Input rank is dynamic inside If\nSummary: ...")
    assert _openvino_reason(exc) == "Conv-16 with a message: Input rank is dynamic inside If"
    assert _openvino_reason(RuntimeError("Check 'x' failed\nUnsupported op Foo")) == "Unsupported op Foo"
