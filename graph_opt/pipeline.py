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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError, InvalidModelError, PassError
from graph_opt.external_data import has_disk_weights, spill, spill_dir
from graph_opt.model_io import check_model
from graph_opt.onnx_util import first_line
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
        check_model(candidate, full=True, infer=False)
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


@dataclass
class StepOutcome:
    """What one step did: the pass's report and, when accepted, the model it produced."""

    modified: bool
    report: PassReport
    seconds: float
    accepted: bool = True
    reason: str = ""
    parity: ParityReport | None = None
    stats: ModelStats | None = None
    model: onnx.ModelProto | bytes | None = None  # None: the step hands on its input model


def reference_for(original: onnx.ModelProto, verify_data: Dataset | None, firsts: Sequence[Pass | None], *,
                  threads: int = 1, shapes: dict[str, tuple[int, ...]] | None = None
                  ) -> tuple[onnx.ModelProto, Reference | None, str]:
    """(original, reference, note): what every step is verified against (None without data: the
    original is only loaded). An input onnxruntime refuses is refused with the reason, unless each
    pipeline's first pass (`firsts`) converts opsets (`simplify`) and the converted model verifies:
    it is then the original, and `note` says so."""
    def reference(model: onnx.ModelProto) -> Reference | None:
        if verify_data is None:
            make_session(model, threads=threads)
            return None
        return Reference(model, verify_data, threads=threads)

    try:
        return original, reference(original), ""
    except InvalidModelError as exc:
        first = firsts[0] if firsts and all(getattr(f, "upgrade_opset", False) for f in firsts) else None
        try:
            upgraded, note = runnable_original(original, first, shapes)
        except RuntimeOpsetError as why:
            raise InvalidModelError(f"the input model cannot be verified: {why}") from None
        if not note:
            raise InvalidModelError(f"the input model cannot be verified: {exc}") from None
        return upgraded, reference(upgraded), note


def run_step(p: Pass, model: onnx.ModelProto, ctx: PassContext, reference: Reference | None,
             tolerances: dict[str, float], *, threads: int = 1, shapes: dict[str, tuple[int, ...]] | None = None,
             before: Sequence[str] = (), keep: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
             ) -> StepOutcome:
    """Run `p` on `model` and check its output (`check_candidate`): the one step of `Pipeline.run`
    and of `compare`. `before` names the steps run before it (for the error message); `keep` is
    applied to a new model before it is verified (a pipeline over 2 GB spills its weights to disk).
    An exception inside the pass is raised as `PassError` naming the pass and those steps."""
    start = time.perf_counter()
    try:
        result = p(model, ctx)
    except Exception as exc:
        internal = not isinstance(exc, GraphOptError)
        where = f"after {' -> '.join(before)}" if before else "the first step"
        what = f"{type(exc).__name__}: {first_line(exc)} (a bug in graph-opt)" if internal else first_line(exc)
        raise PassError(f"pass {p.spec()} failed ({where}): {what}", p.name, internal) from exc
    out = StepOutcome(result.modified, result.report, 0.0)
    candidate = result.model if result.modified else None
    del result
    if candidate is not None and keep is not None:
        candidate = keep(candidate)
    # graphsurgeon graphs are reference cycles: a pass's working copy of every weight
    # lives until the cyclic collector runs, which may be never before the next pass
    gc.collect()
    out.seconds = time.perf_counter() - start
    if candidate is None:
        return out
    problem, out.parity = check_candidate(candidate, reference, tolerances, threads=threads)
    if problem is not None:
        out.accepted, out.reason = False, problem
        return out
    out.model, out.stats = candidate, model_stats(candidate, shapes=shapes)
    return out


def step_record(p: Pass, out: StepOutcome, previous: StepRecord, parity: ParityReport | None) -> StepRecord:
    """The record of a step from its outcome. A step that changed nothing, or was rolled back,
    hands on `previous`'s model and stats; `parity` is that of the last accepted step."""
    rec = StepRecord(p.name, p.spec(), modified=out.modified, accepted=out.accepted, reason=out.reason,
                     seconds=out.seconds, report=out.report)
    if out.model is None:
        rec.model, rec.stats = previous.model, previous.stats
        rec.parity = parity if out.accepted else out.parity
    else:
        rec.model = out.model if isinstance(out.model, onnx.ModelProto) else onnx.ModelProto.FromString(out.model)
        rec.stats, rec.parity = out.stats, out.parity
    return rec


class Pipeline:
    """An ordered list of configured passes with verification against the original model."""

    def __init__(self, passes: list[Pass], *, verify_data: Dataset | None = None, calib_data: Dataset | None = None,
                 tolerances: dict[str, float] | None = None, rollback: bool = True, latency: bool = True,
                 latency_runs: int | None = None, latency_steps: bool = False, threads: int = 1, seed: int = 0,
                 shapes: dict[str, tuple[int, ...]] | None = None, verify_threads: int = 0):
        """``threads``: onnxruntime's intra-op threads when timing latency (the deployment's setting);
        ``verify_threads``: when running the models over the verification data (0: one per core),
        which measures outputs, not time."""
        self.passes = list(passes)
        self.verify_data = verify_data
        self.calib_data = calib_data if calib_data is not None else verify_data
        self.tolerances = dict(tolerances or {})
        self.rollback = rollback
        self.latency = latency
        self.latency_runs = latency_runs
        self.latency_steps = latency_steps
        self.threads = threads
        self.verify_threads = verify_threads
        self.seed = seed
        self.shapes = shapes

    def run(self, original: onnx.ModelProto) -> PipelineResult:
        for p in self.passes:
            p.preflight()
        original, reference, upgraded = reference_for(original, self.verify_data, [self.passes[0] if self.passes else None],
                                                      threads=self.verify_threads, shapes=self.shapes)
        baseline = StepRecord("original", "original", stats=self._stats(original), model=original, reason=upgraded)
        if reference is not None:
            baseline.parity = reference.itself()
        ctx = PassContext(data=self.calib_data, original=original, seed=self.seed, shapes=self.shapes)
        # A model whose weights stay on disk (over 2 GB) keeps each step's weights on disk too: a
        # step in memory would cost a copy of the weights next to onnxruntime's while verifying.
        spill_to = spill_dir() if has_disk_weights(original) else None
        current, current_parity = original, baseline.parity
        steps: list[StepRecord] = []
        stopped = ""
        for p in progress(self.passes, total=len(self.passes), desc="passes"):
            out = run_step(p, current, ctx, reference, self.tolerances, threads=self.verify_threads, shapes=self.shapes,
                           before=[s.spec for s in steps], keep=(lambda m: spill(m, spill_to)) if spill_to else None)
            if not out.accepted:
                log.warning("%s rolled back: %s", p.name, out.reason)
                if out.parity is not None and out.parity.violations and not self.rollback:
                    stopped = f"{p.name}: {out.reason}"
            step = step_record(p, out, steps[-1] if steps else baseline, current_parity)
            steps.append(step)
            if step.model is not current:
                ctx.history.append(step.report)
                current = step.model
            if step.accepted:
                current_parity = step.parity
            if stopped:
                break
        result = PipelineResult(original, current, baseline, steps, self.tolerances, stopped)
        if self.latency:
            self._measure_latency(result)
        return result

    def _stats(self, model: onnx.ModelProto) -> ModelStats:
        return model_stats(model, shapes=self.shapes)  # over 2 GB it infers shapes on a weightless copy

    def _measure_latency(self, result: PipelineResult) -> None:
        data = self.verify_data if self.verify_data is not None else self.calib_data
        if data is None:
            from graph_opt.data import random_dataset

            data = random_dataset(result.original, 1, shapes=self.shapes, seed=self.seed)
        feed = data.sample(0)
        # The original and the final model; every step's only when asked (each costs a session and its runs).
        records = [result.baseline, *(result.steps if self.latency_steps else
                                      [s for s in result.steps if s.model is result.model])]
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
