"""Model statistics: op histogram, parameters, bytes, MACs per layer, onnxruntime latency.

MACs come from shapes inferred with every input bound to a concrete shape (batch 1 unless told):
Conv/ConvTranspose: out_elements · (C_in / group) · kh · kw; Gemm: M·N·K; MatMul: out_elements · K
(quantized forms QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, MatMulNBits count alike).

Latency follows the measured facts in FINDINGS: sessions with every graph optimization on (as
deployed), spinning stopped after each run, explicit threads, warm-up, and when several models
are compared, runs interleaved with a rotating order and the median taken per model, in one run.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graph_opt.data import bind_shapes
from graph_opt.errors import GraphOptError
from graph_opt.model_io import all_graphs, needs_external_data, read_array, tensor_bytes, weightless_copy, wire_size

log = logging.getLogger(__name__)

# Integer element types that hold shapes and indices, not learned parameters.
_SHAPE_TYPES = {onnx.TensorProto.INT64}


@dataclass
class LayerStats:
    name: str
    op: str
    macs: int
    params: int


@dataclass
class ModelStats:
    ops: dict[str, int]
    params: int
    weight_bytes: int
    file_bytes: int
    macs: int | None
    layers: list[LayerStats] = field(default_factory=list)
    latency_ms: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops), "params": self.params, "weight_bytes": self.weight_bytes,
            "file_bytes": self.file_bytes, "macs": self.macs, "latency_ms": self.latency_ms,
            "layers": [l.__dict__ for l in self.layers], "note": self.note,
        }


def _weight_tensors(model: onnx.ModelProto):
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every weight tensor (initializers and Constant nodes), shape tensors excluded."""
    return sum(int(np.prod(t.dims)) for t in _weight_tensors(model) if t.data_type not in _SHAPE_TYPES)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for graph in all_graphs(model.graph):
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def bound_model(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy with every graph input fixed to a concrete shape, shapes inferred throughout."""
    bound = bind_shapes(model, shapes)
    if needs_external_data(model):  # shape inference serializes the model: over 2 GB, without the weights
        work = weightless_copy(model)
    else:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    for value in work.graph.input:
        if value.name in bound:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, bound[value.name]):
                d.Clear()
                d.dim_value = size
    return onnx.shape_inference.infer_shapes(work, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for v in values:
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[v.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = tuple(attr.t.dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# op type → (index of the data input, index of the weight input) for conv-like ops
_CONV_LIKE = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1)}
_MATMUL_LIKE = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "MatMulNBits": (0, None)}


def layer_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None) -> list[LayerStats]:
    """MACs of every Conv/Gemm/MatMul-like node in the main graph (shapes bound, batch 1 by default)."""
    inferred = _shapes(bound_model(model, shapes))
    params = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    layers = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        out = inferred.get(node.output[0]) if node.output else None
        macs = None
        weight_params = sum(params.get(x, 0) for x in node.input[1:])
        if node.op_type in _CONV_LIKE and out is not None:
            _, w_idx = _CONV_LIKE[node.op_type]
            w = inferred.get(node.input[w_idx]) if len(node.input) > w_idx else None
            if w is not None:
                if node.op_type == "ConvTranspose":
                    x = inferred.get(node.input[0])
                    macs = int(np.prod(x)) * int(np.prod(w[1:])) if x else None
                else:
                    macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm" and out is not None:
            a = inferred.get(node.input[0])
            if a is not None:
                k = a[0] if _attr(node, "transA", 0) else a[1]
                macs = int(np.prod(out)) * int(k)
        elif node.op_type in _MATMUL_LIKE and out is not None:
            a = inferred.get(node.input[0])
            if node.op_type == "MatMulNBits":
                k = _attr(node, "K", None)
                macs = int(np.prod(out)) * int(k) if k else None
            elif a is not None:
                macs = int(np.prod(out)) * int(a[-1])
        if macs is not None:
            layers.append(LayerStats(name, node.op_type, macs, weight_params))
    return layers


def model_stats(model: onnx.ModelProto, *, shapes: dict[str, tuple[int, ...]] | None = None,
                file_bytes: int | None = None) -> ModelStats:
    """Parameters, bytes, op histogram and MACs (MACs None when shapes cannot be inferred)."""
    note = ""
    try:
        layers = layer_macs(model, shapes)
        macs = sum(l.macs for l in layers)
    except Exception as exc:  # shape inference can fail on exotic models; the rest still stands
        layers, macs = [], None
        note = f"MACs unavailable: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
    if file_bytes is None:
        file_bytes = serialized_bytes(model)
    return ModelStats(op_histogram(model), count_params(model), tensor_bytes(model), file_bytes, macs, layers, note=note)


def serialized_bytes(model: onnx.ModelProto) -> int:
    """The model's size as a file: its protobuf size, or the weights' bytes when over 2 GB
    (protobuf cannot size it, and the graph beside them is negligible)."""
    return tensor_bytes(model) if needs_external_data(model) else wire_size(model)


def measure_latency(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int = 100,
                    warmup: int = 10, threads: int = 1) -> list[float]:
    """Median latency in milliseconds of each model, interleaved in one run (rotating order)."""
    from graph_opt.verify import make_session

    sessions = [make_session(m, optimize=True, threads=threads) for m in models]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    for s, n in zip(sessions, names):
        try:
            s.run(n, feed)
        except Exception as exc:  # the feed does not fit the model: a one-line error, not a traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GraphOptError(f"onnxruntime failed to run the model for latency: {first[:300]}") from None
        for _ in range(warmup - 1):
            s.run(n, feed)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(runs):
        rot = order[r % len(order):] + order[:r % len(order)]
        for i in rot:
            start = time.perf_counter_ns()
            sessions[i].run(names[i], feed)
            times[i].append((time.perf_counter_ns() - start) / 1e6)
    return [float(np.median(t)) for t in times]


def largest_layers(stats: ModelStats, k: int = 10) -> list[LayerStats]:
    return sorted(stats.layers, key=lambda l: -l.macs)[:k]


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers of the main graph as numpy arrays (for tests and reports)."""
    return {t.name: read_array(t) for t in model.graph.initializer}
