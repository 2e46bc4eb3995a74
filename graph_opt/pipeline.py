"""Run passes in order, check every result, roll back what breaks the user's tolerance.

For each pass: run it on the current model (the pass works on its own copy), then enforce the
postconditions: the output passes onnx.checker (full check), onnxruntime loads it, and, when
verification data is given, its parity against the *original* model meets every tolerance.
An input onnxruntime refuses is refused, unless the pipeline starts with `simplify` and its opset
converts and verifies (`graph_opt.opset`): the converted model is then the reference. A pass that
fails any of these is rolled back (the model before it continues down the pipeline)
and the step says why; with `rollback=False` a tolerance violation stops the pipeline instead.
Each step records its time, model statistics and parity; latencies of all distinct step models
are measured together at the end, interleaved in one run. When the input's weights are kept on
disk (over 2 GB, see `model_io`), so are every step's, and latencies are measured one model after
the other: memory never holds two models' weights besides onnxruntime's.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError, InvalidModelError
from graph_opt.model_io import check_model, has_disk_weights, spill, spill_dir
from graph_opt.opset import RuntimeOpsetError, runnable_original
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.progress import progress
from graph_opt.stats import ModelStats, measure_latency, model_stats
from graph_opt.runtime import make_session
from graph_opt.verify import ParityReport, Reference

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    name: str
    spec: str
    modified: bool = False
    accepted: bool = True
    reason: str = ""
    seconds: float = 0.0
    report: PassReport | None = None
    stats: ModelStats | None = None
    parity: ParityReport | None = None
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "spec": self.spec, "modified": self.modified, "accepted": self.accepted,
            "reason": self.reason, "seconds": round(self.seconds, 4),
            "report": self.report.to_dict() if self.report else None,
            "stats": self.stats.to_dict() if self.stats else None,
            "parity": self.parity.to_dict() if self.parity else None,
        }


@dataclass
class PipelineResult:
    original: onnx.ModelProto
    model: onnx.ModelProto
    baseline: StepRecord
    steps: list[StepRecord]
    tolerances: dict[str, float]
    stopped: str = ""  # set when rollback=False and a step violated the tolerance

    @property
    def passed(self) -> bool:
        return not self.stopped

    @property
    def final_parity(self) -> ParityReport | None:
        for step in reversed(self.steps):
            if step.accepted and step.parity is not None:
                return step.parity
        return self.baseline.parity

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerances": dict(self.tolerances),
            "passed": self.passed,
            "stopped": self.stopped,
            "original": self.baseline.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
        }


def check_candidate(candidate: onnx.ModelProto, reference: Reference | None, tolerances: dict[str, float], *,
                    threads: int = 1) -> tuple[str | None, ParityReport | None]:
    """The postconditions of a pass's output: (None, parity) when it may be accepted, else (why not, parity).

    Invalid when onnx.checker (full) fails, onnxruntime refuses it, or it fails to run on the
    verification data or loses/reshapes an output; rejected when it breaks a tolerance.
    """
    try:
        check_model(candidate, full=True)
        if reference is None:  # with a reference, comparing loads the candidate: one session, not two
            make_session(candidate, threads=threads)
    except InvalidModelError as exc:
        return f"invalid output: {exc}", None
    if reference is None:
        return None, None
    try:
        parity = reference.compare(candidate, tolerances)
    except GraphOptError as exc:
        return f"invalid output: {exc}", None
    if parity.violations:
        return "tolerance exceeded: " + "; ".join(parity.violations), parity
    return None, parity


class Pipeline:
    """An ordered list of configured passes with verification against the original model."""

    def __init__(self, passes: list[Pass], *, verify_data: Dataset | None = None, calib_data: Dataset | None = None,
                 tolerances: dict[str, float] | None = None, rollback: bool = True, latency: bool = True,
                 latency_runs: int = 100, threads: int = 1, seed: int = 0,
                 shapes: dict[str, tuple[int, ...]] | None = None):
        self.passes = list(passes)
        self.verify_data = verify_data
        self.calib_data = calib_data if calib_data is not None else verify_data
        self.tolerances = dict(tolerances or {})
        self.rollback = rollback
        self.latency = latency
        self.latency_runs = latency_runs
        self.threads = threads
        self.seed = seed
        self.shapes = shapes

    def run(self, original: onnx.ModelProto) -> PipelineResult:
        for p in self.passes:
            p.preflight()
        upgraded = ""
        try:  # an input onnxruntime refuses cannot be verified: say so, instead of blaming every pass
            reference = self._reference(original)
        except InvalidModelError as exc:
            # unless the pipeline starts with `simplify`, which converts an opset onnxruntime does not run
            try:
                original, upgraded = runnable_original(original, self.passes[0] if self.passes else None, self.shapes)
            except RuntimeOpsetError as why:
                raise InvalidModelError(f"the input model cannot be verified: {why}") from None
            if not upgraded:
                raise InvalidModelError(f"the input model cannot be verified: {exc}") from None
            reference = self._reference(original)
        baseline = StepRecord("original", "original", stats=self._stats(original), model=original, reason=upgraded)
        if reference is not None:
            baseline.parity = reference.compare(original)
        ctx = PassContext(data=self.calib_data, original=original, seed=self.seed, shapes=self.shapes)
        # A model whose weights stay on disk (over 2 GB) keeps each step's weights on disk too: a
        # step in memory would cost a copy of the weights next to onnxruntime's while verifying.
        spill_to = spill_dir() if has_disk_weights(original) else None
        current, current_parity, current_stats = original, baseline.parity, baseline.stats
        steps: list[StepRecord] = []
        stopped = ""
        for p in progress(self.passes, total=len(self.passes), desc="passes"):
            step = StepRecord(p.name, p.spec())
            start = time.perf_counter()
            result = p(current, ctx)
            step.report, step.modified = result.report, result.modified
            candidate = result.model if result.modified else current
            del result
            if candidate is not current and spill_to is not None:
                candidate = spill(candidate, spill_to)  # its new weights go to disk, out of memory
            # graphsurgeon graphs are reference cycles: a pass's working copy of every weight
            # lives until the cyclic collector runs, which may be never before the next pass
            gc.collect()
            step.seconds = time.perf_counter() - start
            if step.modified:
                problem, step.parity = check_candidate(candidate, reference, self.tolerances, threads=self.threads)
                if step.parity is not None and step.parity.violations and not self.rollback:
                    stopped = f"{p.name}: {problem}"
                if problem is not None:
                    step.accepted, step.reason = False, problem
                    log.warning("%s rolled back: %s", p.name, problem)
                    candidate = current
            if candidate is current:
                step.parity = step.parity if not step.accepted else current_parity
                step.stats = current_stats
            else:
                step.stats = self._stats(candidate)
                ctx.history.append(step.report)
            step.model = candidate
            steps.append(step)
            current, current_stats = candidate, step.stats
            if step.accepted:
                current_parity = step.parity
            if stopped:
                break
        result = PipelineResult(original, current, baseline, steps, self.tolerances, stopped)
        if self.latency:
            self._measure_latency(result)
        return result

    def _reference(self, original: onnx.ModelProto) -> Reference | None:
        reference = Reference(original, self.verify_data, threads=self.threads) if self.verify_data is not None else None
        if reference is None:
            make_session(original, threads=self.threads)
        return reference

    def _stats(self, model: onnx.ModelProto) -> ModelStats:
        return model_stats(model, shapes=self.shapes)  # over 2 GB it infers shapes on a weightless copy

    def _measure_latency(self, result: PipelineResult) -> None:
        data = self.verify_data if self.verify_data is not None else self.calib_data
        if data is None:
            from graph_opt.data import random_dataset

            data = random_dataset(result.original, 1, shapes=self.shapes, seed=self.seed)
        feed = data.sample(0)
        records = [result.baseline, *result.steps]
        unique: list[onnx.ModelProto] = []
        for r in records:
            if not any(r.model is u for u in unique):
                unique.append(r.model)
        if has_disk_weights(result.original):  # over 2 GB: one session at a time, not one per model at once
            times = [measure_latency([m], feed, runs=self.latency_runs, threads=self.threads)[0] for m in unique]
        else:
            times = measure_latency(unique, feed, runs=self.latency_runs, threads=self.threads)
        by_id = {id(m): t for m, t in zip(unique, times)}
        for r in records:  # records that share a model share its stats object
            r.stats.latency_ms = by_id[id(r.model)]
