"""rounding=gptq on 1×1 Convs (passes/quantize/weights.py): a pointwise Conv is a Gemm over its
channels at every position, so its codes follow E[x xᵀ] over the channels."""

import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, op_count, run

from graph_opt.data import Dataset
from graph_opt.pass_base import PassContext
from graph_opt.passes.quantize import Quantize

C = 48


def _model_and_data():
    """x [N, C, 6, 6] → 1×1 Conv(C→32) → Relu → 1×1 Conv(32→16), the channels of x strongly
    correlated (a few directions carry the energy), where GPTQ's feedback pays."""
    mix = np.random.default_rng(100).standard_normal((C, C)) * np.exp(-np.arange(C) / 6.0)[None, :]

    def draw(n, seed):
        z = np.random.default_rng(seed).standard_normal((n, 6, 6, C)) @ mix.T
        return Dataset({"x": np.ascontiguousarray(z.transpose(0, 3, 1, 2)).astype(np.float32)})

    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", C, 6, 6])
    h = g.node("Relu", [g.conv(x, C, 32, 1, name="pw1")])
    g.node("Identity", [g.conv(h, 32, 16, 1, name="pw2")], ["y"])
    g.output("y", ["N", 16, 6, 6])
    return g.build(), draw(128, 0), draw(64, 1)


@pytest.mark.parametrize("activations", ["none", "uint8"])
def test_gptq_rounds_pointwise_convs_against_their_inputs(activations):
    model, calib, test = _model_and_data()
    assert op_count(model, "Conv") == 2 and op_count(model, "DequantizeLinear") == 0  # vacuity
    ref = run(model, test.inputs)[0]
    err, codes = {}, {}
    for rounding in ("nearest", "gptq"):
        q = Quantize(activations=activations, rounding=rounding, sensitivity_snr_db=None, prefer="size",
                     calibration="minmax")
        result = q(model, PassContext(data=calib))
        assert len(result.report.rewritten) >= 2
        assert_valid(result.model)  # checker, onnxruntime loads and runs it
        err[rounding] = float(np.linalg.norm(run(result.model, test.inputs)[0] - ref) / np.linalg.norm(ref))
        codes[rounding] = {t.tensor: t.codes for t in q.plan(model, calib).by_role("weight")}
        if rounding == "gptq":
            assert any(n.startswith("rounding=gptq: 2 of 2 ") for n in result.report.notes), result.report.notes
    assert set(codes["gptq"]) == set(codes["nearest"]) and len(codes["gptq"]) == 2
    for name, c in codes["gptq"].items():  # fired: codes moved off nearest, same shape, same grid
        assert c.shape == codes["nearest"][name].shape
        assert np.any(c != codes["nearest"][name])
        assert np.abs(c.astype(np.int64)).max() <= 127
    # held-out data: the data-aware rounding must lower the output error (clearly when the weights
    # are the only error; with uint8 activations their rounding error is most of what is left)
    assert err["gptq"] < (0.95 if activations == "none" else 1.0) * err["nearest"], err


def test_grouped_or_spatial_convs_keep_nearest_rounding():
    """Only 1×1 Convs of one group: a 3×3 Conv and a depthwise 1×1 Conv keep nearest rounding."""
    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 8, 6, 6])
    h = g.conv(x, 8, 8, 3, name="spatial", pads=[1, 1, 1, 1])
    g.node("Identity", [g.conv(h, 8, 8, 1, name="depthwise", group=8)], ["y"])
    g.output("y", ["N", 8, 6, 6])
    model = g.build()
    data = Dataset({"x": np.random.default_rng(0).standard_normal((32, 8, 6, 6)).astype(np.float32)})
    result = Quantize(activations="none", rounding="gptq", sensitivity_snr_db=None)(model, PassContext(data=data))
    assert any(n.startswith("rounding=gptq: 0 of 2 ") for n in result.report.notes), result.report.notes
    assert_valid(result.model)
