"""Intermediate tensors of a model, streamed batch by batch, and teacher/student layer matching.

`stream(model, data, names)` exposes any internal tensors as extra outputs of a private copy of
the model and yields them one batch at a time, so callers accumulate statistics (calibration
ranges, XᵀX for a refit, per-layer errors) with memory bounded by one batch, never by the
number of samples.

`divergence(teacher, student, data)` answers "which rewrite hurt": it matches the tensors that
teacher and student both compute (same name and same shape; after a rewrite, a layer's output
keeps its name) and reports, in the teacher's topological order, SNR / cosine / relative error of
each, accumulated over all batches. The first tensor whose SNR falls below a threshold is where
the two models part ways.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from graph_opt.data import Dataset, batch_size_for
from graph_opt.errors import GraphOptError
from graph_opt.model_io import copy_model
from graph_opt.progress import progress
from graph_opt.runtime import make_session


def node_outputs(model: onnx.ModelProto) -> list[str]:
    """Every tensor produced by a node of the main graph, in node order."""
    return [o for n in model.graph.node for o in n.output if o]


def with_outputs(model: onnx.ModelProto, names: list[str], label: str = "") -> onnx.ModelProto:
    """A copy of `model` that also outputs `names` (types left for onnxruntime to infer)."""
    work = copy_model(model)
    present = {o.name for o in work.graph.output}
    produced = set(node_outputs(work)) | {i.name for i in work.graph.input} | {t.name for t in work.graph.initializer}
    for name in names:
        if name not in produced:
            raise GraphOptError(f"no tensor named {name!r} in the model{label}")
        if name not in present:
            work.graph.output.append(helper.ValueInfoProto(name=name))
            present.add(name)
    return work


def stream(model: onnx.ModelProto, data: Dataset, names: list[str], *, batch_size: int | None = None,
           threads: int = 1, desc: str = "capture") -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (feed, {name: value}) per batch for the requested tensors (and nothing else kept)."""
    session = make_session(with_outputs(model, names, f" ({desc})"), threads=threads)
    bs = batch_size or batch_size_for(model)
    for feed in progress(data.batches(bs), total=math.ceil(len(data) / bs), desc=desc):
        values = session.run(names, feed)
        yield feed, dict(zip(names, values))


@dataclass
class _Acc:
    ref2: float = 0.0
    diff2: float = 0.0
    dot: float = 0.0
    cand2: float = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = np.asarray(ref, np.float64).ravel()
        c = np.asarray(cand, np.float64).ravel()
        self.ref2 += float(r @ r)
        self.cand2 += float(c @ c)
        self.dot += float(r @ c)
        d = r - c
        self.diff2 += float(d @ d)


@dataclass
class LayerDivergence:
    tensor: str
    producer: str
    snr_db: float
    cosine: float
    rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in self.__dict__.items()}


def matched_tensors(teacher: onnx.ModelProto, student: onnx.ModelProto, shapes: dict | None = None) -> list[tuple[str, str]]:
    """(tensor, teacher producer) pairs computed by both models with the same inferred shape, in
    the teacher's order. Tensors of non-float type are left out."""
    from graph_opt.stats import bound_model

    def typed(model):
        bound = bound_model(model, shapes)
        out = {}
        for v in list(bound.graph.value_info) + list(bound.graph.output):
            t = v.type.tensor_type
            if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return out

    t_shapes, s_shapes = typed(teacher), typed(student)
    producers = {o: (n.name or n.op_type) for n in teacher.graph.node for o in n.output}
    return [(name, producers[name]) for name in node_outputs(teacher)
            if name in t_shapes and s_shapes.get(name) == t_shapes[name]]


def divergence(teacher: onnx.ModelProto, student: onnx.ModelProto, data: Dataset, *, threads: int = 1,
               shapes: dict | None = None) -> list[LayerDivergence]:
    """Per matched tensor, teacher vs student error over all of `data`, in the teacher's order."""
    pairs = matched_tensors(teacher, student, shapes)
    names = [n for n, _ in pairs]
    if not names:
        return []
    accs = {n: _Acc() for n in names}
    bs = batch_size_for(teacher)
    student_batches = stream(student, data, names, batch_size=bs, threads=threads, desc="student layers")
    for (_, t_vals), (_, s_vals) in zip(stream(teacher, data, names, batch_size=bs, threads=threads,
                                               desc="teacher layers"), student_batches):
        for n in names:
            accs[n].add(t_vals[n], s_vals[n])
    out = []
    for name, producer in pairs:
        a = accs[name]
        snr = float("inf") if a.diff2 == 0 else (10 * math.log10(a.ref2 / a.diff2) if a.ref2 > 0 else float("-inf"))
        denom = math.sqrt(a.ref2 * a.cand2)
        cos = 1.0 if denom == 0 and a.diff2 == 0 else (a.dot / denom if denom else 0.0)
        rel = math.sqrt(a.diff2 / a.ref2) if a.ref2 > 0 else (0.0 if a.diff2 == 0 else float("inf"))
        out.append(LayerDivergence(name, producer, snr, cos, rel))
    return out


def first_divergence(layers: list[LayerDivergence], snr_db: float = 30.0) -> LayerDivergence | None:
    """The first matched tensor (teacher order) whose SNR is below `snr_db`."""
    return next((l for l in layers if l.snr_db < snr_db), None)


def by_position(teacher: onnx.ModelProto, student: onnx.ModelProto, tensor: str) -> str:
    """The student tensor at the same position as teacher `tensor`: the output of the k-th node of
    the same op type (e.g. the 3rd Softmax), for when a rewrite renamed it."""
    producers = {o: n for n in teacher.graph.node for o in n.output}
    if tensor not in producers:
        raise GraphOptError(f"no tensor named {tensor!r} in the model (teacher)")
    node = producers[tensor]
    same_t = [n for n in teacher.graph.node if n.op_type == node.op_type]
    same_s = [n for n in student.graph.node if n.op_type == node.op_type]
    k = next(i for i, n in enumerate(same_t) if n is node)
    if len(same_t) != len(same_s):
        raise GraphOptError(f"{tensor!r} is not in the student, and the student has {len(same_s)} {node.op_type} "
                            f"nodes where the teacher has {len(same_t)}: cannot match it by position")
    return same_s[k].output[list(node.output).index(tensor)]


def feature_distances(teacher: onnx.ModelProto, student: onnx.ModelProto, data: Dataset,
                      pairs: list[tuple[str, str]], *, threads: int = 1) -> dict[str, float]:
    """½‖A_s − A_t‖_F² per element for each (teacher tensor, student tensor) pair, over all of `data`.

    A student name that the student does not have is matched by position (`by_position`)."""
    if not pairs:
        return {}
    pairs = [(t, st if st in set(node_outputs(student)) else by_position(teacher, student, t)) for t, st in pairs]
    t_names = list(dict.fromkeys(t for t, _ in pairs))
    s_names = list(dict.fromkeys(s for _, s in pairs))
    sums = {p: 0.0 for p in pairs}
    count = {p: 0 for p in pairs}
    bs = batch_size_for(teacher)
    for (_, tv), (_, sv) in zip(stream(teacher, data, t_names, batch_size=bs, threads=threads, desc="teacher"),
                                stream(student, data, s_names, batch_size=bs, threads=threads, desc="student")):
        for t, s in pairs:
            a, b = np.asarray(tv[t], np.float64), np.asarray(sv[s], np.float64)
            if a.shape != b.shape:
                raise GraphOptError(f"feature {t!r} has shape {a.shape} in the teacher, {s!r} {b.shape} in the student")
            sums[(t, s)] += 0.5 * float(np.sum((a - b) ** 2))
            count[(t, s)] += a.size
    return {(t if t == s else f"{t}={s}"): sums[(t, s)] / max(count[(t, s)], 1) for t, s in pairs}


# The largest input width whose second moment is accumulated (a k×k float64 matrix per layer).
MAX_GRAM_WIDTH = 8192
# One memo entry: a budgeted pass runs the same model on the same data at every level and layer.
_GRAM_MEMO: dict[tuple, dict[tuple[str, int], np.ndarray]] = {}


def second_moments(model: onnx.ModelProto, data: Dataset | None,
                   requests: set[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
    """(tensor, feature axis) → ``E[x xᵀ]`` over every position of the tensor (all axes but the
    feature axis are samples), streamed over `data` in float64: the input statistics of
    data-aware factorization and rounding. Graph inputs are read from the feed; intermediate
    tensors are exposed as extra outputs of one session. Tensors wider than `MAX_GRAM_WIDTH`,
    not float, or not finite are left out. The last result is memoized (see the key)."""
    requests = {r for r in requests if r[0]}
    if not requests or data is None:
        return {}
    # id(model): a pass that only retrains weights (distill) keeps every name, so the structure
    # alone cannot tell its output from its input; a budget's runs all read the same model object.
    key = (id(model), _fingerprint(model), id(data), len(data), tuple(sorted(requests)))
    if key in _GRAM_MEMO:
        return _GRAM_MEMO[key]
    inputs = {i.name for i in model.graph.input}
    names = sorted({name for name, _ in requests if name not in inputs})
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    batches = (stream(model, data, names, desc="input statistics") if names
               else ((feed, {}) for feed in data.batches(batch_size_for(model))))
    for feed, values in batches:
        for name, axis in requests:
            x = np.asarray(feed[name] if name in inputs else values[name])
            if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
                continue
            rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
            if rows.shape[1] > MAX_GRAM_WIDTH or not np.all(np.isfinite(rows)):
                continue
            sums[(name, axis)] = sums.get((name, axis), 0.0) + rows.T @ rows
            counts[(name, axis)] = counts.get((name, axis), 0) + rows.shape[0]
    grams = {k: v / counts[k] for k, v in sums.items() if counts[k]}
    _GRAM_MEMO.clear()
    _GRAM_MEMO[key] = grams
    return grams


def _fingerprint(model: onnx.ModelProto) -> str:
    """The graph's structure and weight names: passes give rewritten weights fresh names, so a
    model whose activations could differ has a different fingerprint."""
    h = hashlib.sha1()
    for n in model.graph.node:
        h.update(f"{n.op_type}|{','.join(n.input)}|{','.join(n.output)};".encode())
    for t in model.graph.initializer:
        h.update(t.name.encode())
    return h.hexdigest()
