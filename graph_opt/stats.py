"""Model statistics: op histogram, parameters, bytes, MACs per layer, onnxruntime latency.

MACs come from inferred shapes: Conv/ConvTranspose: out_elements · (C_in / group) · kh · kw;
Gemm: M·N·K; MatMul: out_elements · K (quantized forms QLinearConv, ConvInteger, QLinearMatMul,
MatMulInteger, MatMulNBits count alike). Inputs are bound to concrete shapes (batch 1 unless told;
a symbol bound on one input binds it on all). With ``partial=True`` a dimension nobody bound keeps
its name, and a layer's MACs are then a product with that symbol in it (``8192·seq``); a layer
whose shapes shape inference cannot resolve has unknown MACs (None), never 0. The total is None
as soon as one layer's MACs are symbolic or unknown; `ModelStats` then keeps the known part, the
symbolic terms and the ``--input-shape`` that would complete the count. Weights are counted
alike from initializers and Constant nodes (parameters per layer and conv kernel shapes).

Latency: sessions with every graph optimization on (as deployed), spinning stopped after each
run, explicit threads, warm-up, and when several models are compared, runs interleaved with a
rotating order and the median taken per model, in one run.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graph_opt.data import bind_shapes, unbound_hint
from graph_opt.errors import GraphOptError
from graph_opt.external_data import needs_external_data, read_array, tensor_bytes, weightless_copy, wire_size
from graph_opt.onnx_util import all_graphs, attr, first_line, subgraphs

log = logging.getLogger(__name__)

# Integer element types that hold shapes and indices, not learned parameters.
_SHAPE_TYPES = {onnx.TensorProto.INT64}


@dataclass
class LayerStats:
    name: str
    op: str
    macs: int | None  # None: symbolic (see macs_symbolic) or unknown
    params: int
    macs_symbolic: str | None = None  # e.g. "8192*seq" when the MACs depend on an unbound dimension


@dataclass
class ModelStats:
    ops: dict[str, int]
    params: int
    weight_bytes: int
    file_bytes: int
    macs: int | None  # None unless every layer's MACs are known
    layers: list[LayerStats] = field(default_factory=list)
    latency_ms: float | None = None
    note: str = ""
    macs_known: int | None = None  # the sum over layers whose MACs are numbers (a lower bound)
    macs_symbolic: str | None = None  # the terms with unbound dimensions, e.g. "8192*seq + 64*seq^2"
    macs_unknown: int = 0  # layers whose shapes could not be inferred
    hint: str | None = None  # the --input-shape arguments that would complete the count
    latency_note: str = ""  # why latency was not measured (inspect)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops), "params": self.params, "weight_bytes": self.weight_bytes,
            "file_bytes": self.file_bytes, "macs": self.macs, "macs_known": self.macs_known,
            "macs_symbolic": self.macs_symbolic, "macs_unknown_layers": self.macs_unknown,
            "input_shape_hint": self.hint, "latency_ms": self.latency_ms, "latency_note": self.latency_note,
            "layers": [dict(l.__dict__) for l in self.layers], "note": self.note,
        }


def _weight_tensors(model: onnx.ModelProto):
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        yield a.t


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every weight tensor (initializers and Constant nodes), shape tensors excluded."""
    return sum(int(np.prod(t.dims)) for t in _weight_tensors(model) if t.data_type not in _SHAPE_TYPES)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for graph in all_graphs(model.graph):
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def bound_model(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, *,
                partial: bool = False) -> onnx.ModelProto:
    """A copy with every graph input fixed to a concrete shape, shapes inferred throughout, for
    its type annotations: the weights of 1 KB or more are references to no file
    (`external_data.weightless_copy`), since shape inference serializes the model it is given and
    parses its result, and reads no weight that large (the values it propagates are shape-sized).
    With `partial`, a dimension that cannot be bound keeps its name (see `data.bind_shapes`)."""
    bound = bind_shapes(model, shapes, partial=partial)
    work = weightless_copy(model)
    for value in (*work.graph.input, *work.graph.output, *work.graph.value_info):
        for d in value.type.tensor_type.shape.dim:  # exporters write -1 for "dynamic": not a size
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
    for value in work.graph.input:
        if value.name in bound:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, bound[value.name]):
                d.Clear()
                if isinstance(size, int):
                    d.dim_value = size
                elif isinstance(size, str):
                    d.dim_param = size
    return onnx.shape_inference.infer_shapes(work, data_prop=True)


Dim = int | str | None


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Weights of one graph by name: initializers and the values of Constant nodes."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Every tensor's inferred shape: ints, names of unbound dimensions, None where unknown
    (including the dimensions shape inference invents, ``unk__N``)."""
    out = {}
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for v in values:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(int(d.dim_value) if d.HasField("dim_value")
                                else (d.dim_param if d.HasField("dim_param") and not d.dim_param.startswith("unk__") else None)
                                for d in t.shape.dim)
    for name, tensor in _constant_tensors(model.graph).items():
        out[name] = tuple(tensor.dims)
    return out


# op type → (index of the data input, index of the weight input) for conv-like ops
_CONV_LIKE = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1)}
_MATMUL_LIKE = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "MatMulNBits": (0, None)}

Term = tuple[int, tuple[str, ...]]  # coefficient · product of named dimensions


def _product(*dims: Dim) -> Term | None:
    coef, names = 1, []
    for d in dims:
        if isinstance(d, int):
            if d <= 0:  # a -1 or 0 left in an annotation is not a size: unknown, never a negative count
                return None
            coef *= d
        elif d:
            names.append(d)
        else:
            return None
    return coef, tuple(sorted(names))


def _term_text(term: Term) -> str:
    coef, names = term
    counts = collections.Counter(names)
    parts = [n if k == 1 else f"{n}^{k}" for n, k in counts.items()]
    return "*".join(([str(coef)] if coef != 1 or not parts else []) + parts)


def _layer_term(node: onnx.NodeProto, inferred: dict[str, tuple[Dim, ...]]) -> Term | None:
    """MACs of one Conv/Gemm/MatMul-like node as a term, None when its shapes are unknown."""
    out = inferred.get(node.output[0]) if node.output else None
    if out is None:
        return None
    if node.op_type in _CONV_LIKE:
        _, w_idx = _CONV_LIKE[node.op_type]
        w = inferred.get(node.input[w_idx]) if len(node.input) > w_idx else None
        if w is None:
            return None
        if node.op_type == "ConvTranspose":
            x = inferred.get(node.input[0])
            return _product(*x, *w[1:]) if x else None
        return _product(*out, *w[1:])
    if node.op_type == "Gemm":
        a = inferred.get(node.input[0])
        if a is None or len(a) != 2:
            return None
        return _product(*out, a[0] if attr(node, "transA", 0) else a[1])
    if node.op_type == "MatMulNBits":
        k = attr(node, "K", None)
        return _product(*out, int(k)) if k else None
    a = inferred.get(node.input[0])
    b = inferred.get(node.input[_MATMUL_LIKE[node.op_type][1]]) if len(node.input) > 1 else None
    k = b[-2] if b and len(b) >= 2 and isinstance(b[-2], int) else a[-1] if a else None  # a weight's K is static
    return _product(*out, k) if k is not None else None


def _layer_rows(model: onnx.ModelProto, inferred: dict[str, tuple[Dim, ...]]) -> list[tuple[LayerStats, Term | None]]:
    """Every Conv/Gemm/MatMul-like node of the main graph with its MACs term."""
    weights = _constant_tensors(model.graph)
    rows = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in _CONV_LIKE and node.op_type not in _MATMUL_LIKE and node.op_type != "Gemm":
            continue
        params = sum(int(np.prod(weights[x].dims)) for x in node.input[1:]
                     if x in weights and weights[x].data_type not in _SHAPE_TYPES)
        term = _layer_term(node, inferred)
        macs = int(term[0]) if term is not None and not term[1] else None
        symbolic = _term_text(term) if term is not None and term[1] else None
        rows.append((LayerStats(node.name or f"{node.op_type}_{i}", node.op_type, macs, params, symbolic), term))
    return rows


def layer_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, *,
               partial: bool = False) -> list[LayerStats]:
    """MACs of every Conv/Gemm/MatMul-like node in the main graph (shapes bound, batch 1 by default).

    Without `partial`, an unbound dynamic dimension raises `DataError` and a layer whose MACs are
    not a number is left out; with it, every such layer is listed, its MACs None and, when they
    depend on unbound dimensions only, `macs_symbolic` set."""
    rows = _layer_rows(model, _shapes(bound_model(model, shapes, partial=partial)))
    return [layer for layer, _ in rows if partial or layer.macs is not None]


def _symbolic_sum(terms: list[Term]) -> str | None:
    grouped: dict[tuple[str, ...], int] = collections.defaultdict(int)
    for coef, names in terms:
        grouped[names] += coef
    return " + ".join(_term_text((c, n)) for n, c in sorted(grouped.items(), key=lambda kv: (len(kv[0]), kv[0]))) or None


def model_stats(model: onnx.ModelProto, *, shapes: dict[str, tuple[int, ...]] | None = None,
                file_bytes: int | None = None) -> ModelStats:
    """Parameters, bytes, op histogram and MACs. MACs are None unless every layer's are known;
    then `macs_known`, `macs_symbolic`, `macs_unknown` and `hint` say what is known and how to
    complete it. Never raises on a valid model: a shape inference failure becomes the note."""
    note = ""
    layers: list[LayerStats] = []
    macs = hint = symbolic = None
    known, unknown = 0, 0
    if shapes:
        bind_shapes(model, shapes, partial=True)  # a bad --input-shape is the user's to fix
    try:
        hint = unbound_hint(model, shapes)
        inferred = _shapes(bound_model(model, shapes, partial=True))
    except Exception as exc:  # a non-tensor input, or shape inference failing: the rest still stands
        note = f"MACs unavailable: {first_line(exc, 200)}"
    else:
        rows = _layer_rows(model, inferred)
        layers = [layer for layer, _ in rows]
        known = sum(layer.macs for layer in layers if layer.macs is not None)
        unknown = sum(1 for _, term in rows if term is None)
        symbolic = _symbolic_sum([term for layer, term in rows if layer.macs_symbolic is not None])
        macs = known if symbolic is None and not unknown else None
        if unknown and hint is None:
            note = f"MACs unknown for {unknown} layer(s): shape inference did not resolve their shapes"
        inner = _subgraph_layer_count(model)
        if inner:  # layers inside If/Loop/Scan bodies are not counted: the total is not known, not 0
            macs = None
            note = (note + "; " if note else "") + f"{inner} layer(s) inside If/Loop/Scan bodies are not counted"
    if file_bytes is None:
        file_bytes = serialized_bytes(model)
    return ModelStats(op_histogram(model), count_params(model), tensor_bytes(model), file_bytes, macs, layers,
                      note=note, macs_known=None if note and not layers else known, macs_symbolic=symbolic,
                      macs_unknown=unknown, hint=hint)


def _subgraph_layer_count(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul-like nodes (and LSTM/GRU/RNN) in the bodies of If/Loop/Scan nodes."""
    ops = {*_CONV_LIKE, *_MATMUL_LIKE, "Gemm", "LSTM", "GRU", "RNN"}
    count = 0
    for node in model.graph.node:
        for body in subgraphs(node):
            count += sum(1 for g in all_graphs(body) for n in g.node if n.op_type in ops)
    return count


def serialized_bytes(model: onnx.ModelProto) -> int:
    """The model's size as a file: its protobuf size, or the weights' bytes when over 2 GB
    (protobuf cannot size it, and the graph beside them is negligible)."""
    return tensor_bytes(model) if needs_external_data(model) else wire_size(model)


# Latency with runs=None: at least MIN_ROUNDS interleaved rounds, at most MAX_ROUNDS, stopping once
# the timed rounds have taken BUDGET_S seconds (a 30 ms model: about 50 rounds of two models).
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = 10, 100, 3.0


def measure_latency(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int | None = 100,
                    warmup: int = 10, threads: int = 1) -> list[float]:
    """Median latency in milliseconds of each model, interleaved in one run (rotating order).

    ``runs=None``: as many rounds as fit in `BUDGET_S` seconds, within [`MIN_ROUNDS`, `MAX_ROUNDS`].
    """
    from graph_opt.runtime import make_session

    sessions = [make_session(m, optimize=True, threads=threads) for m in models]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for s, n in zip(sessions, names):
        try:
            s.run(n, feed)
        except Exception as exc:  # the feed does not fit the model: a one-line error, not a traceback
            first = first_line(exc)
            raise GraphOptError(f"onnxruntime failed to run the model for latency: {first[:300]}") from None
        for _ in range(warmup - 1):
            s.run(n, feed)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    began = time.perf_counter()
    for r in range(MAX_ROUNDS if runs is None else runs):
        if runs is None and r >= MIN_ROUNDS and time.perf_counter() - began >= BUDGET_S:
            break
        rot = order[r % len(order):] + order[:r % len(order)]
        for i in rot:
            start = time.perf_counter_ns()
            sessions[i].run(names[i], feed)
            times[i].append((time.perf_counter_ns() - start) / 1e6)
    return [float(np.median(t)) for t in times]


def largest_layers(stats: ModelStats, k: int = 10) -> list[LayerStats]:
    """The `k` layers with the most MACs; a symbolic layer ranks by its coefficient, an unknown one last."""
    def size(layer: LayerStats) -> int:
        if layer.macs is not None:
            return layer.macs
        head = (layer.macs_symbolic or "").split("*")[0]
        return int(head) if head.isdigit() else 1 if layer.macs_symbolic else -1
    return sorted(stats.layers, key=lambda l: -size(l))[:k]


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers of the main graph as numpy arrays (for tests and reports)."""
    return {t.name: read_array(t) for t in model.graph.initializer}
