"""Small graphsurgeon helpers shared by the passes (matching, naming, constant access)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.model_io import peek


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


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The only node reading `tensor`, when it is not also a graph output."""
    if len(tensor.outputs) != 1 or is_graph_output(graph, tensor):
        return None
    return tensor.outputs[0]


def used_once(tensor: gs.Tensor) -> bool:
    """True when exactly one node input slot reads this tensor (weights shared by nodes fail)."""
    return sum(1 for node in tensor.outputs for t in node.inputs if t is tensor) == 1


class Namer:
    """Fresh, unique tensor/node names derived from a base (never reuses an existing name).

    Built from a graphsurgeon graph, from an onnx GraphProto (for passes that edit the ModelProto
    directly: every node, tensor, initializer, input and output name of its main graph), or from
    the set of names already taken.
    """

    def __init__(self, graph_or_names: gs.Graph | onnx.GraphProto | set[str]):
        if isinstance(graph_or_names, gs.Graph):
            self.taken = set(graph_or_names.tensors().keys()) | {n.name for n in graph_or_names.nodes}
        elif isinstance(graph_or_names, onnx.GraphProto):
            g = graph_or_names
            self.taken = ({t for n in g.node for t in (*n.input, *n.output, n.name)}
                          | {t.name for t in (*g.initializer, *g.input, *g.output)})
        else:
            self.taken = set(graph_or_names)

    def __call__(self, base: str) -> str:
        base = base or "t"
        if base not in self.taken:
            self.taken.add(base)
            return base
        for i in itertools.count(1):
            name = f"{base}_{i}"
            if name not in self.taken:
                self.taken.add(name)
                return name
        raise AssertionError("unreachable")


def node_label(node: gs.Node, index: int | None = None) -> str:
    """A name for reports, also for nodes exported without one."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op}({out})"


def subgraph_nodes(node: gs.Node):
    """Every node inside the subgraphs of `node` (If branches, Loop/Scan bodies), nested ones too."""
    for value in node.attrs.values():
        for sub in value if isinstance(value, list) else [value]:
            if isinstance(sub, gs.Graph):
                for inner in sub.nodes:
                    yield inner
                    yield from subgraph_nodes(inner)


def report_subgraphs(graph: gs.Graph, report, ops) -> None:
    """Skip, with the reason, every control-flow node whose subgraphs hold nodes of `ops`: the passes
    rewrite the main graph only, and weights in there must not be ignored silently."""
    for node in graph.nodes:
        inner = [n for n in subgraph_nodes(node) if n.op in ops]
        if inner:
            names = ", ".join(node_label(n) for n in inner[:3]) + (", …" if len(inner) > 3 else "")
            report.skip(node_label(node), f"{len(inner)} {'/'.join(sorted({n.op for n in inner}))} inside its "
                                          f"subgraphs ({names}) left as they are: passes rewrite the main graph only")
