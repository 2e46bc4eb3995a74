"""Intermediate tensors of a model: exposed, reduced inside onnxruntime, streamed batch by batch;
teacher/student layer matching.

`with_outputs(model, names, reducers=)` makes a `Capture`: a private, weightless copy of the
model (`external_data.detached`: its weights as arrays, handed to onnxruntime beside it) that also
outputs the tensors `names` and, per `reducers` (``{tensor: reductions}``), reductions of a
tensor computed inside onnxruntime, so that a few numbers per batch leave the session instead
of the tensor: ``"min"``, ``"max"``, ``"sum"``, ``"sumsq"`` (ReduceMin, ReduceMax, ReduceSum,
ReduceSumSquare over every axis) and ``"size"`` (its number of elements), one scalar each,
``"shape"`` (its dims, an int64 vector), and
`PerFeature` (the max, min or mean of every sample's every feature). Each reduction node is moved next
to its tensor's producer, so that onnxruntime can free the tensor soon after it is made. A
caller may add nodes of its own to `Capture.model` first (probes); they are moved the same way.

`stream(model, data, names)` runs such a copy and yields ``(feed, {name: value})`` one batch at
a time (`runtime.run_batches`: a fixed batch, or with ``budget_bytes`` batches sized by the bytes
of their outputs), so callers accumulate statistics (calibration ranges, XᵀX for a refit,
per-layer errors) with memory bounded by one batch, never by the number of samples.

`divergence(teacher, student, data)` answers "which rewrite hurt": it matches the tensors that
teacher and student both compute (same name and same shape; after a rewrite, a layer's output
keeps its name) and reports, in the teacher's topological order, SNR / cosine / relative error of
each, accumulated over all batches. The first tensor whose SNR falls below a threshold is where
the two models part ways.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_opt.data import Dataset, batch_size_for, batch_size_within, paired_batch_size
from graph_opt.errors import GraphOptError
from graph_opt.external_data import detached
from graph_opt.kernels.lstsq import conv_output_shape, conv_pads, im2col
from graph_opt.onnx_util import Namer, opset_version
from graph_opt.row_mask import RowMask
from graph_opt.runtime import make_session, run_batches


def node_outputs(model: onnx.ModelProto) -> list[str]:
    """Every tensor produced by a node of the main graph, in node order."""
    return [o for n in model.graph.node for o in n.output if o]


# Whole-tensor reductions: one scalar per tensor and run.
_REDUCE_OPS = {"min": "ReduceMin", "max": "ReduceMax", "sum": "ReduceSum", "sumsq": "ReduceSumSquare", "size": "Size",
               "shape": "Shape"}


@dataclass(frozen=True)
class PerFeature:
    """The max, min or mean of each sample's each feature: over every axis but the batch (0) and
    `axis`. ``axis`` 1 gives ``(samples·features,)`` (Flatten from axis 2), the last axis (of
    static length `features`) gives ``(samples, features)`` (Reshape to samples × rest × features)."""

    op: Literal["max", "min", "mean"]
    axis: int
    features: int | None = None

    def __post_init__(self) -> None:
        if self.op not in ("max", "min", "mean") or (self.axis != 1 and not self.features):
            raise ValueError(f"{self}: op 'max', 'min' or 'mean'; away from axis 1 the number of features is needed")


Reducer = str | PerFeature


class Capture:
    """A private, weightless copy of a model that also outputs internal tensors or reductions of
    them (see the module docstring). `names` lists what a run fetches, in the order asked;
    `reduced[tensor][reducer]` is the output holding one reduction."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.weights = detached(model)
        self.names: list[str] = []
        self.reduced: dict[str, dict[Reducer, str]] = {}
        self._placed = len(self.model.graph.node)  # nodes after these are moved next to their producers

    def expose(self, names: Sequence[str], label: str = "") -> Capture:
        """Make every tensor of `names` an output (types left for onnxruntime to infer)."""
        g = self.model.graph
        present = {o.name for o in g.output}
        known = self._known()
        for name in dict.fromkeys(names):
            _check(name, known, label)
            if name not in present:
                g.output.append(helper.ValueInfoProto(name=name))
                present.add(name)
            self.names.append(name)
        return self

    def reduce(self, reducers: Mapping[str, Sequence[Reducer]], label: str = "") -> Capture:
        """Add, per tensor, the `reducers` asked for as outputs, and move every node added since
        the last call (the reductions, and nodes a caller appended) next to its producers."""
        g = self.model.graph
        known = self._known()
        emit = _Reductions(g, opset_version(self.model))
        for t, wanted in reducers.items():
            _check(t, known, label)
            out = self.reduced.setdefault(t, {})
            for r in wanted:
                if r not in out:
                    out[r] = emit(t, r)
                    g.output.append(onnx.ValueInfoProto(name=out[r]))
                    self.names.append(out[r])
        _place_after_producers(g, self._placed)
        self._placed = len(g.node)
        return self

    def _known(self) -> set[str]:
        """The tensors the copy computes or is given: node outputs (a caller's too), inputs, initializers."""
        g = self.model.graph
        return set(node_outputs(self.model)) | {i.name for i in g.input} | {t.name for t in g.initializer}


def _check(name: str, known: set[str], label: str) -> None:
    if name not in known:
        raise GraphOptError(f"no tensor named {name!r} in the model{label}")


def with_outputs(model: onnx.ModelProto, names: Sequence[str], label: str = "", *,
                 reducers: Mapping[str, Sequence[Reducer]] | None = None) -> Capture:
    """A `Capture` of `model` exposing `names` and the `reducers` of its tensors (module docstring)."""
    cap = Capture(model).expose(names, label)
    return cap.reduce(reducers, label) if reducers else cap


def stream(model: onnx.ModelProto, data: Dataset, names: list[str], *, batch_size: int | None = None,
           threads: int = 1, desc: str = "capture", budget_bytes: int | None = None
           ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (feed, {name: value}) per batch for the requested tensors (and nothing else kept).

    Batches of `batch_size` samples (default: the model's static batch, else 32); with
    `budget_bytes` and no `batch_size`, batches whose tensors take about that many bytes
    (`runtime.run_batches`). Graph optimizations off, as the parity harness runs."""
    cap = with_outputs(model, names, f" ({desc})")
    session = make_session(cap.model, weights=cap.weights, threads=threads)
    del cap
    bs = batch_size or batch_size_for(model, 0 if budget_bytes is not None else 32)
    for feed, values in run_batches(session, names, data, bs, desc, budget_bytes=budget_bytes):
        yield feed, dict(zip(names, values))


class _Reductions:
    """Appends to `g` the nodes of one reduction of a tensor and returns its output's name."""

    def __init__(self, g: onnx.GraphProto, opset: int) -> None:
        self.g, self.fresh = g, Namer(g)
        self.axes_input = opset >= 18  # ReduceMax/ReduceMin/ReduceMean take their axes as an input from opset 18
        self.axes: str | None = None
        self.rows: dict[tuple[str, int], str] = {}  # (tensor, feature axis) -> its Flatten/Reshape

    def __call__(self, t: str, r: Reducer) -> str:
        if not isinstance(r, PerFeature):
            if r not in _REDUCE_OPS:
                raise ValueError(f"unknown reduction {r!r} (known: {', '.join(_REDUCE_OPS)}, PerFeature)")
            out = self.fresh(f"{t}_{r}")
            attrs = {} if r in ("size", "shape") else {"keepdims": 0}
            self.g.node.append(helper.make_node(_REDUCE_OPS[r], [t], [out], **attrs))
            return out
        rows = self.rows.get((t, r.axis)) or self._feature_rows(t, r)
        out = self.fresh(f"{t}_feature_{r.op}")
        op = {"max": "ReduceMax", "min": "ReduceMin", "mean": "ReduceMean"}[r.op]
        if self.axes_input:
            if self.axes is None:
                self.axes = self.fresh("feature_reduce_axes")
                self.g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), self.axes))
            self.g.node.append(helper.make_node(op, [rows, self.axes], [out], keepdims=0))
        else:
            self.g.node.append(helper.make_node(op, [rows], [out], axes=[1], keepdims=0))
        return out

    def _feature_rows(self, t: str, r: PerFeature) -> str:
        """`t` laid out so that axis 1 is what a `PerFeature` reduction reduces (see its docstring)."""
        rows = self.rows[(t, r.axis)] = self.fresh(f"{t}_per_feature")
        if r.axis == 1:  # (N, C, …) → (N·C, …): the max of each row is one sample's one channel
            self.g.node.append(helper.make_node("Flatten", [t], [rows], axis=2))
        else:  # (N, …, C) → (N, M, C): the middle axes merged
            shape = self.fresh(f"{t}_per_feature_shape")
            self.g.initializer.append(numpy_helper.from_array(np.array([0, -1, r.features], np.int64), shape))
            self.g.node.append(helper.make_node("Reshape", [t, shape], [rows]))
        return rows


def _place_after_producers(g: onnx.GraphProto, n_model: int) -> None:
    """Move each node after the first `n_model` (already in a valid order among themselves) to
    just after the last producer of its inputs, so that onnxruntime can consume a tensor (and
    free it) soon after it is made, not only at the end of the graph."""
    nodes = list(g.node)
    if len(nodes) == n_model:
        return
    slot: dict[str, int] = {}  # tensor -> index of the model node it follows (-1: before all)
    for k, n in enumerate(nodes[:n_model]):
        for o in n.output:
            slot[o] = k
    after: dict[int, list[onnx.NodeProto]] = {}
    for n in nodes[n_model:]:
        k = max((slot.get(t, -1) for t in n.input if t), default=-1)
        after.setdefault(k, []).append(n)
        for o in n.output:
            slot[o] = k
    del g.node[:]
    g.node.extend(after.get(-1, ()))
    for k, n in enumerate(nodes[:n_model]):
        g.node.append(n)
        g.node.extend(after.get(k, ()))


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
    bs = paired_batch_size(teacher, student)
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
    bs = paired_batch_size(teacher, student)
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
# Rows of one tensor gathered before their product is added: a batch of one short sequence gives a
# few dozen rows, and the product of so few rows with a wide input is bound by memory, not
# arithmetic (each one reads and writes the whole k×k sum). Batches with at least this many rows
# are added as they come.
GRAM_ROWS = 1024
# The rows held back at once over every tensor (as they come, float32 mostly); past it all are added.
GRAM_BUFFER_BYTES = 64 * 2**20
# One memo entry: a budgeted pass runs the same model on the same data at every level and layer.
_GRAM_MEMO: dict[tuple, tuple[frozenset[tuple[str, int]], dict[tuple[str, int], np.ndarray]]] = {}


def second_moments(model: onnx.ModelProto, data: Dataset | None, requests: set[tuple[str, int]],
                   row_mask: RowMask | None = None, *, product: type = np.float64, threads: int = 1
                   ) -> dict[tuple[str, int], np.ndarray]:
    """(tensor, feature axis) → ``E[x xᵀ]`` over every position of the tensor (all axes but the
    feature axis are samples), streamed over `data` in float64: the input statistics of
    data-aware factorization and rounding. With `row_mask`, only the positions it keeps count
    where it applies (`graph_opt.row_mask`). Graph inputs are read from the feed; intermediate
    tensors are exposed as extra outputs of one session. Tensors wider than `MAX_GRAM_WIDTH`,
    not float, or not finite are left out (a batch with a non-finite value is skipped for that
    tensor). Batches hold at most `data.RUN_INPUT_BYTES` of inputs (`data.batch_size_within`); the
    rows of consecutive small batches are multiplied together, `GRAM_ROWS` at a time (the same
    sum, rounded in another order). The last result is memoized (see the key) and
    serves every later call asking for some of its tensors (a plan made again with fewer layers).
    ``product``: the dtype each gathered block of rows is multiplied in (`GRAM_ROWS` rows at a
    time, or a batch); the sum over blocks is float64 either way. ``np.float32`` halves the
    arithmetic (a block's product then carries a relative rounding error near 1e-6), for users
    that damp the moment far above that (GPTQ); data-aware factorization keeps float64.
    ``threads``: onnxruntime's intra-op threads for the streamed run (0: one per core)."""
    requests = {r for r in requests if r[0]}
    if not requests or data is None:
        return {}
    # id(model): a pass that only retrains weights (distill) keeps every name, so the structure
    # alone cannot tell its output from its input; a budget's runs all read the same model object.
    key = (id(model), _fingerprint(model), id(data), len(data), row_mask, np.dtype(product).name)
    if key in _GRAM_MEMO and requests <= _GRAM_MEMO[key][0]:
        grams = _GRAM_MEMO[key][1]
        return {r: grams[r] for r in requests if r in grams}
    inputs = {i.name for i in model.graph.input}
    names = sorted({name for name, _ in requests if name not in inputs})
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    held: dict[tuple[str, int], list[np.ndarray]] = {}

    def add(k: tuple[str, int]) -> None:
        parts = held.pop(k)
        rows = (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(product, copy=False)
        block = (rows.T @ rows).astype(np.float64, copy=False)
        if k in sums:
            sums[k] += block
        else:
            sums[k] = block
        counts[k] = counts.get(k, 0) + rows.shape[0]

    batches = (stream(model, data, names, desc="input statistics", batch_size=batch_size_within(data, model),
                      threads=threads)
               if names
               else ((feed, {}) for feed in data.batches(batch_size_for(model))))
    for feed, values in batches:
        for name, axis in sorted(requests):
            x = np.asarray(feed[name] if name in inputs else values[name])
            if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
                continue
            rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
            keep = row_mask.keep(feed, x.shape, axis) if row_mask is not None else None
            rows = rows if keep is None else rows[keep]
            if rows.shape[1] > MAX_GRAM_WIDTH or not np.all(np.isfinite(rows)):
                continue
            k = (name, axis)
            held.setdefault(k, []).append(rows)
            if sum(r.shape[0] for r in held[k]) >= GRAM_ROWS:
                add(k)
        if sum(r.nbytes for parts in held.values() for r in parts) > GRAM_BUFFER_BYTES:
            for k in list(held):
                add(k)
        del values
    for k in list(held):
        add(k)
    grams = {k: v / counts[k] for k, v in sums.items() if counts[k]}
    _GRAM_MEMO.clear()
    _GRAM_MEMO[key] = (frozenset(requests), grams)
    return grams


@dataclass(frozen=True)
class PatchRequest:
    """The im2col patches of one conv's input: its kernel, strides, pads, dilations, groups, auto_pad."""

    tensor: str
    kernel: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    groups: int = 1
    auto_pad: str = "NOTSET"


# im2col rows × features gathered at a time (bounds the patch buffer of one chunk).
_PATCH_CHUNK = 1 << 22
# Widest patch kept: its float64 moment is d² · 8 bytes (170 MB at 4608 = 512 channels × 3×3).
MAX_PATCH_WIDTH = 4608
_PATCH_MEMO: dict[tuple, dict[PatchRequest, np.ndarray]] = {}


def patch_moments(model: onnx.ModelProto, data: Dataset | None, requests: Mapping[str, PatchRequest]
                  ) -> dict[str, np.ndarray]:
    """key → ``E[p pᵀ]`` per group, ``[groups, d, d]`` with ``d = (C/groups)·∏kernel``, of the
    im2col patches of each requested conv input (every output pixel a sample; channel major, tap
    minor, as `kernels.lstsq.im2col` orders them), streamed over `data` in float64, in chunks
    that bound the patch buffer. Patches wider than `MAX_PATCH_WIDTH`, inputs that are not float
    or not finite are left out. The last result is memoized (a budget's runs read the same model)."""
    if not requests or data is None:
        return {}
    key = (id(model), _fingerprint(model), id(data), len(data), tuple(sorted(requests.items())))
    if key in _PATCH_MEMO:
        return {k: _PATCH_MEMO[key][r] for k, r in requests.items() if r in _PATCH_MEMO[key]}
    wanted = set(requests.values())
    inputs = {i.name for i in model.graph.input}
    names = sorted({r.tensor for r in wanted if r.tensor not in inputs})
    sums: dict[PatchRequest, np.ndarray] = {}
    counts: dict[PatchRequest, int] = {}
    bad: set[PatchRequest] = set()
    batches = (stream(model, data, names, desc="patch statistics") if names
               else ((feed, {}) for feed in data.batches(batch_size_for(model))))
    for feed, values in batches:
        for r in wanted - bad:
            x = np.asarray(feed[r.tensor] if r.tensor in inputs else values[r.tensor])
            if x.ndim != len(r.kernel) + 2 or not np.issubdtype(x.dtype, np.floating) or x.shape[1] % r.groups:
                bad.add(r)
                continue
            d = x.shape[1] // r.groups * math.prod(r.kernel)
            if d > MAX_PATCH_WIDTH or not np.all(np.isfinite(x)):
                bad.add(r)
                continue
            x = x.astype(np.float64)
            pads = conv_pads(x.shape[2:], r.kernel, strides=r.strides, dilations=r.dilations, pads=r.pads,
                             auto_pad=r.auto_pad)
            total = len(x) * math.prod(conv_output_shape(x.shape[2:], r.kernel, strides=r.strides,
                                                         dilations=r.dilations, pads=pads))
            step = max(1, _PATCH_CHUNK // (d * r.groups))
            acc = sums.get(r)
            if acc is None:
                acc = np.zeros((r.groups, d, d))
            for start in range(0, total, step):
                rows = im2col(x, r.kernel, strides=r.strides, pads=r.pads, dilations=r.dilations, groups=r.groups,
                              auto_pad=r.auto_pad, rows=np.arange(start, min(start + step, total)))
                acc += np.einsum("rgi,rgj->gij", rows, rows, optimize=True)
            sums[r] = acc
            counts[r] = counts.get(r, 0) + total
    moments = {r: v / counts[r] for r, v in sums.items() if r not in bad and counts[r]}
    _PATCH_MEMO.clear()
    _PATCH_MEMO[key] = moments
    return {k: moments[r] for k, r in requests.items() if r in moments}


@dataclass(frozen=True)
class ChannelMean:
    """The mean of each channel (axis 1) of a tensor over every sample and position, and the
    tensor's shape (of the last batch; its dims after the channels are the positions)."""

    mean: np.ndarray
    shape: tuple[int, ...]


def channel_means(model: onnx.ModelProto, data: Dataset | None, channels: Mapping[str, int], *,
                  batch_size: int | None = None, threads: int = 1) -> dict[str, ChannelMean]:
    """tensor → its `ChannelMean` (float64), for each tensor of `channels` (tensor → its number of
    channels) that is float and has them: reduced inside onnxruntime (`PerFeature` mean and
    ``"shape"``), so one number per sample and channel leaves the session, streamed over `data`
    in one run of a private copy of `model`."""
    if data is None or not channels:
        return {}
    mean = PerFeature("mean", 1)
    cap = with_outputs(model, [], " (channel means)", reducers={t: [mean, "shape"] for t in channels})
    names = [cap.reduced[t][r] for t in channels for r in (mean, "shape")]
    session = make_session(cap.model, weights=cap.weights, threads=threads)
    del cap
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    bs = batch_size or batch_size_for(model, 32)
    for _, values in run_batches(session, names, data, bs, "channel means"):
        for k, (t, c) in enumerate(channels.items()):
            v, shape = np.asarray(values[2 * k]), tuple(int(d) for d in values[2 * k + 1])
            if not np.issubdtype(v.dtype, np.floating) or v.size % c or len(shape) < 2 or shape[1] != c:
                continue
            per_sample = v.reshape(-1, c).astype(np.float64)
            sums[t] = sums.get(t, 0.0) + per_sample.sum(axis=0)
            rows[t] = rows.get(t, 0) + per_sample.shape[0]
            shapes[t] = shape
    return {t: ChannelMean(sums[t] / rows[t], shapes[t]) for t in sums
            if rows[t] and np.all(np.isfinite(sums[t]))}


def _fingerprint(model: onnx.ModelProto) -> str:
    """The graph's structure and weight names: passes give rewritten weights fresh names, so a
    model whose activations could differ has a different fingerprint."""
    h = hashlib.sha1()
    for n in model.graph.node:
        h.update(f"{n.op_type}|{','.join(n.input)}|{','.join(n.output)};".encode())
    for t in model.graph.initializer:
        h.update(t.name.encode())
    return h.hexdigest()
