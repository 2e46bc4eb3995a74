"""calibration='output' (the quantize default): activation ranges chosen by the error of the layers
reading them (passes/quantize/search.py)."""

import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, run

from graph_opt.data import Dataset
from graph_opt.pass_base import PassContext
from graph_opt.passes.quantize import Quantize
from graph_opt.passes.quantize import search as search_mod

SAMPLES = 16


def _model():
    """x [N, 1024, 32] → MatMul(32→16) → y: a 3-D MatMul on the graph input, so its input gets its
    own activation scale, and the layer's output is the model's."""
    g = GraphBuilder(seed=0)
    x = g.input("x", ["N", 1024, 32])
    g.node("MatMul", [x, g.weight("w1", (32, 16))], ["y"])
    g.output("y", ["N", 1024, 16])
    return g.build()


def _data(outlier: bool, n: int = SAMPLES, seed: int = 0) -> Dataset:
    """|N(0, 1)| with one value of 40 (its min/max step is 8x the bulk's), or uniform on [0, 1]
    (a dense top: any clipping saturates 15% of the values or more)."""
    rng = np.random.default_rng(seed)
    if not outlier:
        return Dataset({"x": rng.uniform(0.0, 1.0, (n, 1024, 32)).astype(np.float32)})
    x = np.abs(rng.standard_normal((n, 1024, 32))).astype(np.float32)
    x[0, 7, 3] = 40.0
    return Dataset({"x": x})


def _plan_and_model(model, data, calibration):
    q = Quantize(calibration=calibration, sensitivity_snr_db=None, prefer="size")
    result = q(model, PassContext(data=data))
    return q.plan(model, data), result


def _position_error(model, quantized, data) -> float:
    """What the search minimizes: the mean over output positions (tokens) of Σ_f (y − ŷ)² / Σ_f y²."""
    ref = run(model, data.inputs)[0].astype(np.float64)
    out = run(quantized, data.inputs)[0].astype(np.float64)
    return float((((ref - out) ** 2).sum(-1) / (ref ** 2).sum(-1)).mean())


def test_outlier_input_is_clipped_and_the_error_drops():
    model, data = _model(), _data(outlier=True)
    observed = float(data.inputs["x"].max())
    minmax_plan, minmax = _plan_and_model(model, data, "minmax")
    # vacuity: min/max calibration keeps the whole observed range
    assert minmax_plan.tensors["x"].range[1] == pytest.approx(observed, rel=1e-6)
    plan, searched = _plan_and_model(model, data, "output")
    hi = plan.tensors["x"].range[1]
    assert hi < 0.95 * observed  # fired: clipped, to one of the candidates
    assert hi / observed == pytest.approx(min(search_mod.ALPHAS, key=lambda a: abs(a - hi / observed)), abs=1e-6)
    assert any(n.startswith("ranges by output-error search") for n in searched.report.notes)
    assert_valid(searched.model)  # onnx.checker and onnxruntime load and run
    # the search minimizes this error on the calibration samples: clearly below the min/max range's
    assert _position_error(model, searched.model, data) < 0.8 * _position_error(model, minmax.model, data)


def test_dense_top_keeps_its_range():
    """uniform [0, 1]: clipping loses more on the saturated values than it gains in step size, so
    the min/max range (α = 1) is kept."""
    model, data = _model(), _data(outlier=False)
    plan, searched = _plan_and_model(model, data, "output")
    assert plan.tensors["x"].range[1] == pytest.approx(float(data.inputs["x"].max()), rel=1e-6)
    assert_valid(searched.model)


def test_search_costs_are_the_ones_measured(monkeypatch):
    """The chosen range is the candidate of least error: forcing the search's candidates to one
    value gives that value's range."""
    model, data = _model(), _data(outlier=True)
    monkeypatch.setattr(search_mod, "ALPHAS", (1.0, 0.5))
    plan, _ = _plan_and_model(model, data, "output")
    assert plan.tensors["x"].range[1] == pytest.approx(0.5 * float(data.inputs["x"].max()), rel=1e-6)


def test_without_data_nothing_is_searched():
    model = _model()
    result = Quantize()(model, PassContext(data=None))
    assert not any("output-error search" in n for n in result.report.notes)
    assert_valid(result.model)
