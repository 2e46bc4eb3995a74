"""cleanup: remove dead nodes and unused initializers, then sort nodes topologically.

A graph already in a valid order keeps it (graphsurgeon's sort is not stable: it would reorder
independent nodes and make a no-op look like a rewrite).

Dead means nothing reachable from a graph output reads it. Graph inputs and outputs are kept
as they are (removing an unused input would change the model's interface). Exact: the
computation from inputs to outputs is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from graph_opt.gs_convert import to_graph, to_model
from graph_opt.pass_base import Pass, PassContext, PassReport


@dataclass(frozen=True, kw_only=True)
class Cleanup(Pass):
    """Remove dead nodes and unused initializers; topologically sort (exact)."""

    name: ClassVar[str] = "cleanup"

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        graph = to_graph(model)
        labels = {id(n): n.name or f"{n.op}({n.outputs[0].name if n.outputs else '?'})" for n in graph.nodes}
        before = [id(n) for n in graph.nodes]
        graph.cleanup(remove_unused_graph_inputs=False)
        if not _is_sorted(graph):  # graphsurgeon's sort is not stable: keep a valid order as it is
            graph.toposort()
        after = [id(n) for n in graph.nodes]
        kept = set(after)
        for node_id in before:
            if node_id not in kept:
                report.rewrite(labels[node_id], action="removed dead node")
        out = to_model(graph, model)
        used = {t.name for t in out.graph.initializer}
        for init in model.graph.initializer:
            if init.name not in used:
                report.rewrite(init.name, action="removed unused initializer")
        if [i for i in before if i in kept] != after:
            report.rewrite("graph", action="sorted nodes topologically")
        return out if report.rewritten else model


def _is_sorted(graph: gs.Graph) -> bool:
    """True when every node comes after the producers of its inputs (main graph)."""
    seen: set[int] = set()
    for node in graph.nodes:
        for tensor in node.inputs:
            if any(id(p) not in seen for p in tensor.inputs):
                return False
        seen.add(id(node))
    return True
