from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from builders import op_count, small_cnn
from onnx import numpy_helper

from graph_opt.data import random_dataset
from graph_opt.pass_base import Pass
from graph_opt.passes import Cleanup, FoldBatchnorm
from graph_opt.pipeline import Pipeline


@dataclass(frozen=True, kw_only=True)
class ScaleHead(Pass):
    """Deliberately wrong rewrite: scales the head weight."""

    name: ClassVar[str] = "scale_head"
    factor: float = 1.5

    def run(self, model, report, ctx):
        for i, t in enumerate(model.graph.initializer):
            if t.name == "head.w":
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * self.factor, t.name))
                report.rewrite("head", factor=self.factor)
        return model


@dataclass(frozen=True, kw_only=True)
class Breaker(Pass):
    """Emits a model that fails onnx.checker (a node reading a tensor nobody produces)."""

    name: ClassVar[str] = "breaker"

    def run(self, model, report, ctx):
        model.graph.node[0].input[0] = "does_not_exist"
        report.rewrite(model.graph.node[0].name)
        return model


def _pipeline(passes, **kw):
    model = small_cnn()
    return model, Pipeline(passes, verify_data=random_dataset(model, 8), latency=False, **kw)


def test_exact_passes_are_accepted_and_recorded():
    model, pipe = _pipeline([FoldBatchnorm(), Cleanup()], tolerances={"max_abs": 1e-4})
    result = pipe.run(model)
    fold, clean = result.steps
    assert fold.accepted and fold.modified and fold.parity.max_abs < 1e-4
    assert op_count(result.model, "BatchNormalization") == 0
    assert not clean.modified and clean.parity is fold.parity  # nothing changed, nothing re-run
    assert fold.stats.params < result.baseline.stats.params
    assert result.passed and result.to_dict()["steps"][0]["report"]["pass"] == "fold_batchnorm"


def test_tolerance_violation_rolls_back():
    model, pipe = _pipeline([FoldBatchnorm(), ScaleHead(), Cleanup()], tolerances={"snr_db": 40})
    result = pipe.run(model)
    fold, scale, clean = result.steps
    assert fold.accepted
    assert not scale.accepted and "tolerance exceeded: snr_db" in scale.reason
    assert scale.model is fold.model  # the pipeline continued from the model before the bad pass
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(w["head.w"], {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["head.w"])
    assert result.passed


def test_no_rollback_stops():
    model, pipe = _pipeline([ScaleHead(), FoldBatchnorm()], tolerances={"snr_db": 40}, rollback=False)
    result = pipe.run(model)
    assert not result.passed and result.stopped.startswith("scale_head")
    assert len(result.steps) == 1


def test_invalid_output_is_rolled_back_even_without_tolerance():
    model, pipe = _pipeline([Breaker()])
    result = pipe.run(model)
    assert not result.steps[0].accepted and "invalid output" in result.steps[0].reason
    assert result.model is model


def test_latency_is_measured_for_each_distinct_model():
    model = small_cnn()
    pipe = Pipeline([FoldBatchnorm(), Cleanup()], verify_data=random_dataset(model, 2), latency_runs=5)
    result = pipe.run(model)
    assert result.baseline.stats.latency_ms > 0 and result.steps[0].stats.latency_ms > 0
    assert result.steps[1].stats is result.steps[0].stats


def test_latency_times_the_original_and_the_final_model_unless_every_step_is_asked_for():
    model = small_cnn()
    passes = [FoldBatchnorm(), ScaleHead(factor=1.0 + 1e-7)]  # two steps, each a new model
    result = Pipeline(passes, verify_data=random_dataset(model, 2), latency_runs=3).run(model)
    assert result.steps[0].model is not result.model  # vacuity: the first step is an intermediate model
    assert result.steps[0].stats.latency_ms is None
    assert result.baseline.stats.latency_ms > 0 and result.steps[1].stats.latency_ms > 0
    every = Pipeline(passes, verify_data=random_dataset(model, 2), latency_runs=3, latency_steps=True).run(model)
    assert all(s.stats.latency_ms > 0 for s in every.steps)


def test_the_original_row_is_not_run_twice(monkeypatch):
    import importlib

    verify = importlib.import_module("graph_opt.verify")  # the module, not the function of that name
    model = small_cnn()
    data = random_dataset(model, 4)
    runs = []
    real = verify.run_model
    monkeypatch.setattr(verify, "run_model", lambda *a, **k: runs.append(1) or real(*a, **k))
    result = Pipeline([FoldBatchnorm()], verify_data=data, latency=False).run(model)
    assert len(runs) == 2  # the reference and the one step's candidate
    assert result.baseline.parity.cosine == 1.0 and result.baseline.parity.max_abs == 0.0
    assert result.baseline.parity.to_dict() == verify.Reference(model, data).compare(model).to_dict()


def test_verification_runs_on_their_own_threads_and_latency_on_the_deployments(monkeypatch):
    import importlib

    verify = importlib.import_module("graph_opt.verify")
    pipeline = importlib.import_module("graph_opt.pipeline")
    model = small_cnn()
    runs, timed = [], []
    real_run, real_time = verify.run_model, pipeline.measure_latency
    monkeypatch.setattr(verify, "run_model", lambda *a, **k: runs.append(k["threads"]) or real_run(*a, **k))
    monkeypatch.setattr(pipeline, "measure_latency", lambda *a, **k: timed.append(k["threads"]) or real_time(*a, **k))
    Pipeline([FoldBatchnorm()], verify_data=random_dataset(model, 2), latency_runs=3, threads=1).run(model)
    assert runs == [0, 0] and timed == [1]  # the default: every core for the data, the deployment's for latency
    runs.clear(), timed.clear()
    Pipeline([FoldBatchnorm()], verify_data=random_dataset(model, 2), latency_runs=3, threads=2,
             verify_threads=1).run(model)
    assert runs == [1, 1] and timed == [2]
