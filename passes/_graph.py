"""Small helpers shared by the passes: matching, naming and constant access on graphsurgeon graphs,
and `GraphIndex`, the same on an onnx GraphProto for passes that edit the ModelProto directly."""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graph_opt.external_data import on_disk, read_array, weightless_copy
from graph_opt.gs_convert import peek
from graph_opt.onnx_util import attr, gs_node_subgraphs, subgraphs
from graph_opt.runtime import make_session

log = logging.getLogger(__name__)


# The layers every pass works on: a constant weight times the input.
LAYER_OPS = ("Conv", "Gemm", "MatMul")


def check_op_types(options: Any, hint: str = "") -> None:
    """ValueError when the option `op_types` names an op outside LAYER_OPS."""
    bad = sorted(set(getattr(options, "op_types", ())) - set(LAYER_OPS))
    if bad:
        raise ValueError(f"op_types must be among {', '.join(LAYER_OPS)}, got {', '.join(bad)}{hint}")


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(peek(tensor))
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity" and tensor.inputs[0].inputs:
        # Exporters deduplicate equal weights through Identity nodes (torch does for tied BN biases).
        return constant(tensor.inputs[0].inputs[0])
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def used_once(tensor: gs.Tensor) -> bool:
    """True when exactly one node input slot reads this tensor (weights shared by nodes fail)."""
    return sum(1 for node in tensor.outputs for t in node.inputs if t is tensor) == 1


def node_label(node: gs.Node, index: int | None = None) -> str:
    """A name for reports, also for nodes exported without one."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op}({out})"


def subgraph_nodes(node: gs.Node):
    """Every node inside the subgraphs of `node` (If branches, Loop/Scan bodies), nested ones too."""
    for sub in gs_node_subgraphs(node):
        for inner in sub.nodes:
            yield inner
            yield from subgraph_nodes(inner)


def report_subgraphs(graph: gs.Graph | GraphIndex, report, ops) -> None:
    """Skip, with the reason, every control-flow node whose subgraphs hold nodes of `ops`: the passes
    rewrite the main graph only, and weights in there must not be ignored silently."""
    if isinstance(graph, GraphIndex):
        found = [(graph.labels[idx], [(n.op_type, n.name or f"{n.op_type}({n.output[0] if n.output else '?'})")
                                      for n in _inner_nodes(node) if n.op_type in ops])
                 for idx, node in enumerate(graph.nodes)]
    else:
        found = [(node_label(node), [(n.op, node_label(n)) for n in subgraph_nodes(node) if n.op in ops])
                 for node in graph.nodes]
    for label, inner in found:
        if inner:
            names = ", ".join(name for _, name in inner[:3]) + (", …" if len(inner) > 3 else "")
            report.skip(label, f"{len(inner)} {'/'.join(sorted({op for op, _ in inner}))} inside its "
                               f"subgraphs ({names}) left as they are: passes rewrite the main graph only")


def _inner_nodes(node: onnx.NodeProto):
    """Every node inside the subgraphs of `node`, nested ones too."""
    for sub in subgraphs(node):
        yield from all_nodes(sub)


class GraphIndex:
    """Producers, consumers, constants and unique labels of a model's main graph.

    Read-only, with one exception for passes that refit weights in the model they index:
    `add_initializer` appends a new initializer and indexes it (re-pointing a node's input to it
    is the caller's edit; producers and consumers stay as they were when the index was built).
    """

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        self._position = {id(node): idx for idx, node in enumerate(self.nodes)}
        for idx, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = idx
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((idx, slot))
            for name in subgraph_reads(node):  # an If/Loop/Scan body reading it from the outer scope
                self.consumers.setdefault(name, []).append((idx, -1))
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.name] = counts.get(node.name, 0) + 1
        self.labels = [n.name if n.name and counts[n.name] == 1 else f"{n.op_type}({n.output[0] if n.output else idx})"
                       for idx, n in enumerate(self.nodes)]
        self.by_name = {n.name: idx for idx, n in enumerate(self.nodes) if n.name and counts[n.name] == 1}
        self._const: dict[str, np.ndarray | None] = {}
        self._dequantized: dict[str, np.ndarray | None] = {}

    def index(self, node: onnx.NodeProto) -> int:
        """The position of `node` (one of `nodes`, by identity) in the graph."""
        return self._position[id(node)]

    def label(self, node: onnx.NodeProto) -> str:
        return self.labels[self.index(node)]

    def find(self, label: str) -> int | None:
        """The node a report labelled: by its unique name, or ``Op(output)`` (first output)."""
        if label in self.by_name:
            return self.by_name[label]
        m = re.fullmatch(r"(\w+)\((.*)\)", label)
        if m:
            op, out = m.groups()
            return next((i for i, n in enumerate(self.nodes) if n.op_type == op and n.output[:1] == [out]), None)
        return None

    def has_tensor(self, name: str) -> bool:
        """True for a tensor a node writes or a graph input (initializers aside)."""
        return name in self.producer or name in self.graph_inputs

    def producer_node(self, name: str) -> onnx.NodeProto | None:
        idx = self.producer.get(name)
        return None if idx is None else self.nodes[idx]

    def const(self, name: str, *, cache: bool = True) -> np.ndarray | None:
        """Value of an initializer or Constant-node output, else None. Cached unless kept on disk or
        ``cache=False`` (a weight read once, to be replaced: the index would hold a copy of it)."""
        if not name:
            return None
        if name not in self._const:
            value = None
            if name in self.inits:
                value = read_array(self.inits[name])
            elif name in self.producer:
                node = self.nodes[self.producer[name]]
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    for a in node.attribute:
                        if a.name == "value":
                            value = numpy_helper.to_array(a.t)
            if cache and not self.on_disk(name):
                self._const[name] = value
            return value
        return self._const[name]

    def on_disk(self, name: str) -> bool:
        return name in self.inits and on_disk(self.inits[name])

    def const_dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        if name in self.producer:
            node = self.nodes[self.producer[name]]
            for a in node.attribute:
                if node.op_type == "Constant" and a.name == "value":
                    return a.t.data_type
        return None

    def is_const(self, name: str) -> bool:
        return name in self.inits or (name in self.producer and self.nodes[self.producer[name]].op_type == "Constant")

    def readers(self, name: str) -> list[tuple[int, int]]:
        return self.consumers.get(name, [])

    def sole_reader(self, name: str) -> int | None:
        """The only node reading `name` (through one input slot), when it is not a graph output."""
        readers = self.readers(name)
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0][0]

    def producer_op(self, name: str) -> str | None:
        idx = self.producer.get(name)
        return None if idx is None else self.nodes[idx].op_type

    def dequantized(self, name: str) -> np.ndarray | None:
        """The value of `name` when a DequantizeLinear of initializers writes it (a quantized weight),
        evaluated by onnxruntime on that node alone; None otherwise or when it cannot be evaluated."""
        if name not in self._dequantized:
            self._dequantized[name] = self._dequantize(name)
        return self._dequantized[name]

    def _dequantize(self, name: str) -> np.ndarray | None:
        node = self.producer_node(name)
        if node is None or node.op_type != "DequantizeLinear" or not all(not i or i in self.inits for i in node.input):
            return None
        inits = [self.inits[i] for i in node.input if i]
        out_type = attr(node, "output_dtype", 0) or self.inits[node.input[1]].data_type  # the scale's type
        graph = onnx.helper.make_graph([node], "dq", [], [onnx.helper.make_tensor_value_info(name, out_type, None)],
                                       inits)
        mini = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
        mini.ir_version = self.model.ir_version
        try:
            return make_session(mini).run([name], {})[0]
        except Exception as exc:  # noqa: BLE001 - an exotic DequantizeLinear: the weight is unknown
            log.debug("cannot evaluate %s: %s", name, exc)
            return None

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        """Append `tensor` (a fresh name) to the model's initializers and index it."""
        self.model.graph.initializer.append(tensor)
        self.inits[tensor.name] = self.model.graph.initializer[-1]


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read by the nodes inside `node`'s subgraphs (outer-scope captures among them)."""
    return {n for inner in _inner_nodes(node) for n in inner.input if n}


def all_nodes(graph: onnx.GraphProto):
    """Every node of `graph`, each followed by the nodes of its subgraphs, at any depth."""
    for node in graph.node:
        yield node
        yield from _inner_nodes(node)


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Static dims (None where unknown) of every tensor onnx shape inference can reach.

    Inference runs on a weightless copy (`external_data.weightless_copy`): dims and types are all it
    reads of the weights, and the whole model would be serialized into it and copied back out
    (over 2 GB protobuf cannot serialize it at all)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), data_prop=True)
    except Exception:  # noqa: BLE001 - inference fails on some exotic models; callers then know less
        inferred = model
    out: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.HasField("shape"):
            out[v.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out
