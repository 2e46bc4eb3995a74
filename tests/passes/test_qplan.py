import json

import numpy as np
import pytest

from graph_opt.kernels.quant import compute_params
from graph_opt.passes._qplan import COMPACT_MAX, NodeDecision, QuantPlan, TensorQuant


def _plan():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 3, 3, 3)).astype(np.float32)
    plan = QuantPlan(opset=13, notes=["a note"])
    plan.add(TensorQuant.from_params("conv.w", "weight", compute_params(w, "int8", axis=0), shape=w.shape,
                                     codes=np.zeros(w.shape, np.int8)))
    plan.add(TensorQuant("conv.b", "bias", "int32", np.full(64, 1e-4, np.float32), np.zeros(64, np.int32), axis=0,
                         scheme="bias"))
    plan.add(TensorQuant.from_params("x", "activation", compute_params((-1.5, 3.0), "uint8", symmetric=False),
                                     method="minmax", range=(-1.5, 3.0), consumers=["conv"]))
    plan.add(TensorQuant("pool", "activation", "uint8", np.float32(0.1), np.uint8(3), scheme="shared", shared_with="x"))
    plan.nodes += [NodeDecision("conv", "Conv", "quantize", inputs=["x"], weight="conv.w", bias="conv.b", output="y",
                                absorbed="relu", sensitivity={"snr_db": 35.5}),
                   NodeDecision("cat", "Concat", "float", "input ranges differ by 640x")]
    return plan


def test_full_round_trip_is_exact():
    plan = _plan()
    text = json.dumps(plan.to_dict(compact=False))
    back = QuantPlan.from_dict(json.loads(text))
    assert back.opset == 13 and back.notes == ["a note"]
    assert [d.to_dict() for d in back.nodes] == [d.to_dict() for d in plan.nodes]
    for name, t in plan.tensors.items():
        b = back.tensors[name]
        assert (b.role, b.dtype, b.axis, b.block_size, b.scheme, b.method, b.shared_with, b.consumers) == \
               (t.role, t.dtype, t.axis, t.block_size, t.scheme, t.method, t.shared_with, t.consumers)
        assert b.scale.dtype == np.float32 and b.zero_point.dtype == t.zero_point.dtype
        np.testing.assert_array_equal(b.scale, t.scale)
        np.testing.assert_array_equal(b.zero_point, t.zero_point)
        assert b.codes is None  # codes never travel through JSON
    assert back.tensors["x"].range == (-1.5, 3.0)
    assert back.tensors["pool"].consumers is None  # 'all readers'
    # Kernel params come back bit for bit.
    p = back.tensors["conv.w"].params()
    assert p.axis == 0 and p.granularity == "axis"


def test_compact_form_summarizes_large_arrays_only():
    d = _plan().to_dict(compact=True)
    tensors = {t["tensor"]: t for t in d["tensors"]}
    assert set(tensors["conv.w"]["scale"]) == {"n", "shape", "min", "max"} and tensors["conv.w"]["scale"]["n"] == 64
    assert isinstance(tensors["x"]["scale"], float) and tensors["x"]["zero_point"] == 85
    assert tensors["conv.w"]["granularity"] == "channel" and tensors["x"]["consumers"] == ["conv"]
    assert len(json.dumps(d)) < 2000
    small = TensorQuant("t", "weight", "int8", np.ones(COMPACT_MAX, np.float32), np.zeros(COMPACT_MAX), axis=0)
    assert small.to_dict()["scale"]["values"] == [1.0] * COMPACT_MAX
    with pytest.raises(ValueError, match="compact"):
        QuantPlan.from_dict(d)


def test_queries():
    plan = _plan()
    assert [t.tensor for t in plan.by_role("activation")] == ["x", "pool"]
    assert plan.decision("cat").action == "float" and plan.decision("nope") is None
    assert [d.node for d in plan.decisions("quantize")] == ["conv"]
    assert not plan.empty and QuantPlan(opset=13).empty
    assert json.loads(plan.to_json())["opset"] == 13


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="zero point shape"):
        TensorQuant("t", "weight", "int8", np.ones(3, np.float32), np.zeros(2), axis=0)
