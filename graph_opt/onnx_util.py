"""Small ONNX utilities every layer uses: node attributes, the default-domain opset, the graphs
nested in If/Loop/Scan nodes (on an onnx GraphProto and on a graphsurgeon Graph), and the one-line
text of an exception for user-facing errors."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import onnx
import onnx_graphsurgeon as gs


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute `name` of `node`, or `default` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def opset_version(model: onnx.ModelProto) -> int:
    """The model's version of the default ("" / "ai.onnx") operator set (1 when none is declared)."""
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


def drop_unused_initializers(model: onnx.ModelProto, names: set[str] | None = None) -> int:
    """Remove the main graph's initializers that no node of any graph (subgraphs included) reads
    and no graph outputs: those in `names`, or, without `names`, every one that is not also a
    graph input (an input with a default is part of the interface). Edits `model`; returns how
    many were removed."""
    graphs = list(all_graphs(model.graph))
    used = {x for g in graphs for n in g.node for x in n.input} | {o.name for g in graphs for o in g.output}
    if names is None:
        names = {t.name for t in model.graph.initializer} - {i.name for i in model.graph.input}
    dead = {n for n in names if n not in used}
    if not dead:
        return 0
    keep = [t for t in model.graph.initializer if t.name not in dead]
    removed = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in dead]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return removed


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs `node` holds in its attributes (If branches, Loop and Scan bodies)."""
    return [g for a in node.attribute
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes, at any depth."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def gs_node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphsurgeon graphs `node` holds in its attributes (If branches, Loop and Scan bodies)."""
    return [sub for value in node.attrs.values()
            for sub in (value if isinstance(value, list) else [value]) if isinstance(sub, gs.Graph)]


def gs_subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Every graphsurgeon graph nested in `graph`'s nodes, at any depth (not `graph` itself)."""
    for node in graph.nodes:
        for sub in gs_node_subgraphs(node):
            yield sub
            yield from gs_subgraphs(sub)


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
