"""The one parity harness: run the original and a candidate under onnxruntime and compare.

Strict defaults, shared by the pipeline, the CLI and the tests: CPU execution provider, graph
optimizations OFF (onnxruntime's own fusions must not hide a wrong rewrite), explicit thread count,
the same seeded or user-given inputs for both models. Per output it reports max abs error,
relative L2 error, cosine similarity and SNR; for 2-D float outputs read as logits, top-1/top-5
agreement and the soft-label KD loss; task accuracy of both models when labels are known.
The sessions and the batched runs are `graph_opt.runtime`'s (`run_model`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graph_opt import metrics
from graph_opt.data import Dataset, batch_size_for, batch_size_within
from graph_opt.errors import GraphOptError, InvalidModelError
from graph_opt.runtime import make_session, run_model, weights_dequantized

log = logging.getLogger(__name__)


@dataclass
class OutputParity:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_error: float
    cosine: float
    snr_db: float
    top1: float | None = None
    top5: float | None = None
    kd_loss: float | None = None
    relation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _num(v) for k, v in self.__dict__.items()}


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass
class ParityReport:
    """Candidate vs reference on the same inputs."""

    outputs: list[OutputParity]
    samples: int
    data_source: str
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    violations: list[str] = field(default_factory=list)
    layers: list = field(default_factory=list)  # LayerDivergence, teacher order (optional)
    features: dict[str, float] = field(default_factory=dict)  # feature-map distances (optional)
    runtime: str = "onnxruntime"  # the runtime both models ran under
    latency_ratio: float | None = None  # candidate / original latency there (set by api.verify off onnxruntime)

    @property
    def cosine(self) -> float:
        return self.metric("cosine")  # worst over outputs; NaN if any is NaN

    @property
    def snr_db(self) -> float:
        return self.metric("snr_db")  # worst over outputs; NaN if any is NaN

    @property
    def max_abs(self) -> float:
        return self.metric("max_abs")  # worst over outputs; NaN if any is NaN

    @property
    def rel_error(self) -> float:
        return self.metric("rel_error")  # worst over outputs; NaN if any is NaN

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    def metric(self, name: str) -> float | None:
        """Worst value over outputs of one tolerance metric."""
        if name == "accuracy":
            return self.accuracy_candidate
        if name == "accuracy_drop":
            if self.accuracy_reference is None or self.accuracy_candidate is None:
                return None
            return self.accuracy_reference - self.accuracy_candidate
        values = [getattr(o, name) for o in self.outputs if getattr(o, name) is not None]
        if not values:
            return None
        if any(math.isnan(v) for v in values):  # min/max would skip a NaN depending on the order
            return math.nan
        return min(values) if TOLERANCE_METRICS[name] == "min" else max(values)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "data": self.data_source,
            "outputs": [o.to_dict() for o in self.outputs],
            "accuracy_reference": self.accuracy_reference,
            "accuracy_candidate": self.accuracy_candidate,
            "violations": list(self.violations),
            "passed": self.passed,
            **({"layers": [l.to_dict() for l in self.layers]} if self.layers else {}),
            **({"features": dict(self.features)} if self.features else {}),
            "runtime": self.runtime,
            **({"latency_ratio": self.latency_ratio} if self.latency_ratio is not None else {}),
        }


# metric → whether the tolerance is a floor ("min") or a ceiling ("max")
TOLERANCE_METRICS = {
    "cosine": "min", "snr_db": "min", "top1": "min", "top5": "min", "accuracy": "min",
    "max_abs": "max", "rel_error": "max", "kd_loss": "max", "accuracy_drop": "max", "relation": "max",
}


def parse_tolerance(text: str) -> tuple[str, float]:
    """``cosine=0.999`` → ('cosine', 0.999)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in TOLERANCE_METRICS:
        raise GraphOptError(f"bad --tolerance {text!r}: expected METRIC=VALUE with METRIC one of "
                            + ", ".join(TOLERANCE_METRICS))
    try:
        return name, float(value)
    except ValueError:
        raise GraphOptError(f"bad --tolerance {text!r}: {value!r} is not a number") from None


def check_tolerances(report: ParityReport, tolerances: dict[str, float]) -> list[str]:
    """Human-readable violations of `tolerances` (empty when all hold)."""
    out = []
    for name, bound in tolerances.items():
        value = report.metric(name)
        if value is None:
            out.append(f"{name}: not measurable on this model/data (no labels or no logits output)")
            continue
        kind = TOLERANCE_METRICS[name]
        if (kind == "min" and not value >= bound) or (kind == "max" and not value <= bound):
            out.append(f"{name} = {value:.6g} {'<' if kind == 'min' else '>'} {bound:g}")
    return out


def is_logits(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and value.ndim == 2 and value.shape[1] >= 2


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *,
                    labels: np.ndarray | None = None, temperature: float = 1.0, kd_alpha: float = 1.0,
                    data_source: str = "", tolerances: dict[str, float] | None = None) -> ParityReport:
    outputs = []
    missing = [n for n in reference if n not in candidate]
    if missing:
        raise InvalidModelError(f"candidate lacks output {missing[0]!r} of the original model")
    acc_ref = acc_cand = None
    for name, ref in reference.items():
        cand = candidate[name]
        if ref.shape != cand.shape:
            raise InvalidModelError(f"output {name!r}: candidate shape {cand.shape} differs from original {ref.shape}")
        if ref.dtype.kind not in "fiub":
            continue
        par = OutputParity(name, tuple(ref.shape), metrics.max_abs_error(ref, cand), metrics.rel_error(ref, cand),
                           metrics.cosine(ref, cand), metrics.snr_db(ref, cand))
        if ref.ndim >= 2 and ref.dtype.kind == "f" and len(ref) > 1:
            par.relation = _relation(ref, cand)
        if is_logits(ref) and np.all(np.isfinite(cand)):
            par.top1 = metrics.top1_agreement(ref, cand)
            par.top5 = metrics.topk_agreement(ref, cand, 5)
            # α·T²·KL(teacher ‖ student) + (1 − α)·CE(student, labels) when labels are known
            kd_labels = labels if labels is not None and len(labels) == len(ref) else None
            par.kd_loss = metrics.kd_loss(ref, cand, temperature=temperature,
                                          alpha=kd_alpha if kd_labels is not None else 1.0, labels=kd_labels)
            if labels is not None and acc_ref is None and len(labels) == len(ref):
                acc_ref = metrics.accuracy(ref, labels)
                acc_cand = metrics.accuracy(cand, labels)
        outputs.append(par)
    first = next(iter(reference.values()), None)
    samples = 0 if first is None else (len(first) if np.ndim(first) else 1)  # a scalar output has no len()
    report = ParityReport(outputs, samples, data_source, acc_ref, acc_cand)
    if tolerances:
        report.violations = check_tolerances(report, tolerances)
    return report


def _relation(ref: np.ndarray, cand: np.ndarray, batch: int = 256) -> float:
    """Relation (Gram) distance averaged over batches of at most `batch` samples."""
    values = [metrics.relation_distance(ref[i:i + batch], cand[i:i + batch])
              for i in range(0, len(ref), batch) if len(ref[i:i + batch]) > 1]
    return float(np.mean(values)) if values else 0.0


class Reference:
    """The original model's outputs on a dataset, computed once and compared against many candidates."""

    def __init__(self, original: onnx.ModelProto, data: Dataset, *, threads: int = 1, temperature: float = 1.0,
                 kd_alpha: float = 1.0):
        self.data = data.laid_out(original)  # a plain Dataset gets the model's batch axes
        self.batch_size = batch_size_within(self.data, original)
        self.threads = threads
        self.temperature = temperature
        self.kd_alpha = kd_alpha
        self.outputs = run_model(original, data, batch_size=self.batch_size, threads=threads, desc="reference")

    def compare(self, candidate: onnx.ModelProto, tolerances: dict[str, float] | None = None) -> ParityReport:
        # a candidate whose batch is bound (simplify with the user's --input-shape) runs at its own size
        batch_size = batch_size_for(candidate, self.batch_size)
        folded = weights_dequantized(candidate)  # a quantized model's weights dequantized once, not per batch
        runnable = candidate
        if folded is not None:
            shell, weights = folded
            runnable = make_session(shell, weights=weights, threads=self.threads)
        cand = run_model(runnable, self.data.laid_out(candidate), batch_size=batch_size, threads=self.threads,
                         desc="candidate")
        return compare_outputs(self.outputs, cand, labels=self.data.labels, temperature=self.temperature,
                               kd_alpha=self.kd_alpha,
                               data_source=self.data.source, tolerances=tolerances)

    def itself(self) -> ParityReport:
        """The original against itself, without running it again: exact by construction, with the
        original's own task metrics (accuracy on labelled data) for the report's first row."""
        return compare_outputs(self.outputs, self.outputs, labels=self.data.labels, temperature=self.temperature,
                               kd_alpha=self.kd_alpha, data_source=self.data.source)


def verify(original: onnx.ModelProto, candidate: onnx.ModelProto, data: Dataset, *,
           tolerances: dict[str, float] | None = None, threads: int = 1, temperature: float = 1.0,
           kd_alpha: float = 1.0) -> ParityReport:
    """Run both models on `data` (optimizations off) and compare every output."""
    return Reference(original, data, threads=threads, temperature=temperature,
                     kd_alpha=kd_alpha).compare(candidate, tolerances)
