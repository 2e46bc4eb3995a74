"""Channel dependency analysis: which channels of which layers must be pruned together.

The analysis walks the graph once in topological order and tags every tensor that carries
prunable channels with a `Chan`: the axis the channels lie on and, for every index along that
axis, an *atom* id. Every Conv / Gemm / MatMul with a constant weight is a *producer*: it mints
one atom per output channel. Ops then move atoms around or tie them:

- elementwise activations (Relu, Clip, Sigmoid, HardSwish, Gelu, …), BatchNormalization, PRelu,
  pooling, Pad on other axes, Reduce* over other axes, Cast/Identity/Dropout: pass atoms through;
- Add / Sub / Mul / Div / Max / Min / Pow / Sum with two channel-carrying operands *tie* their atoms
  position by position (a residual Add; the x·gate Mul of an SE block; x·Sigmoid(x) of SiLU);
  a constant operand that is per-channel is sliced along with them;
- Concat on the channel axis concatenates atom lists (channel ranges map to the inputs);
  Split / Slice on it cut them (their size and start/end constants are rewritten on removal);
- a depthwise Conv (group = C_in, C_out = m·C_in) repeats each atom m times;
- Flatten / Reshape / Squeeze / Unsqueeze / Transpose move the channel axis; a Reshape or
  Flatten that merges the channel axis with its neighbours maps channel c to its block of
  features (Flatten → Gemm); a Reshape that splits the channel axis cannot be mapped;
- a Conv (group 1) / Gemm / MatMul *consumes* the atoms: they index its weight's input axis.

Atoms tied together form a *channel* (one unit of pruning); producers whose atoms get tied form a
*group* (e.g. every conv feeding one residual stream). A group is frozen, with the reason, when
one of its channels reaches a graph output, an op the analysis does not understand, a grouped
conv, a MatMul of two runtime tensors, a Reshape it cannot map, a constant shared with another
node, a subgraph, or a runtime tensor that spans the channel axis.

Along the way every position also carries the constant a channel emits once its producers'
filters are zero (their bias, pushed through BN, activations, residual sums, …), `nan` when that
value depends on the input, plus a flag when it is only exact away from zero-padded borders.
The pruning pass folds that constant into the consumers' biases.

Nothing here edits the graph: the analysis is a plan (`Analysis`, `_groups_plan`) that the pass
applies. The walk itself is `_groups_walk` (bookkeeping, layers, per-channel ops) and
`_groups_layout` (ops that move, cut or join the channel axis).
"""

from __future__ import annotations

import fnmatch
import math

import onnx_graphsurgeon as gs

from graph_opt.passes._graph import LAYER_OPS, constant, node_label
from graph_opt.passes._groups_plan import Analysis, Chan, Edit, FoldSite, Group, Producer, Slice
from graph_opt.passes._groups_walk import Walker


def analyze(graph: gs.Graph, shapes: dict[str, tuple[int | None, ...]]) -> Analysis:
    """Channel groups of a (topologically sorted) graph; pure, the graph is not edited."""
    return Walker(graph, shapes).run()


def fold_problems(an: Analysis, *, exact: bool) -> dict[int, str]:
    """Channels (class roots) that cannot be removed with their constant folded, and why.

    With `exact`, a nonzero constant meeting zero padding (in a consumer Conv or upstream) is a
    problem; otherwise only a constant that depends on the input is.
    """
    out: dict[int, str] = {}
    for site in an.folds:
        roots = an.class_root[site.chan.atoms]
        label = node_label(site.node)
        for j, root in enumerate(roots.tolist()):
            if root in out:
                continue
            v = float(site.chan.value[j])
            if not math.isfinite(v):
                out[root] = f"the value it leaves at {label} depends on the input, nothing to fold"
            elif exact and site.chan.approx[j]:
                out[root] = (f"its constant passes zero padding (depthwise conv, Pad or AveragePool) before {label} "
                             "(fold=approximate allows it)")
            elif exact and site.padded and v != 0.0:
                out[root] = f"its constant {v:.3g} meets the zero padding of {label} (fold=approximate allows it)"
    return out


def selected(node: gs.Node, op_types: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Layer selection of the pruning passes: op type, then fnmatch patterns on the node name."""
    name = node.name or ""
    if node.op not in op_types:
        return False
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def is_layer(node: gs.Node) -> bool:
    """Conv/Gemm/MatMul (or ConvTranspose) with a constant weight operand."""
    return node.op in (*LAYER_OPS, "ConvTranspose") and any(constant(t) is not None for t in node.inputs[:2])


def boundary_layers(graph: gs.Graph) -> tuple[set[int], set[int]]:
    """ids of the first layers (no other layer upstream on any path) and the last (none downstream).

    "Any path" matters: in a residual network a skip connection reaches every block from the
    input without crossing a layer, yet only the stem is the first layer. Nodes are visited in
    graph order, which ONNX requires to be topological.
    """
    first: set[int] = set()
    last: set[int] = set()
    after_layer: set[int] = set()  # tensors with a layer upstream (or produced by one)
    for node in graph.nodes:
        upstream = any(id(t) in after_layer for t in node.inputs)
        if is_layer(node) and not upstream:
            first.add(id(node))
        if upstream or is_layer(node):
            after_layer.update(id(t) for t in node.outputs)
    before_layer: set[int] = set()  # tensors with a layer downstream (or read by one)
    for node in reversed(graph.nodes):
        downstream = any(id(t) in before_layer for t in node.outputs)
        if is_layer(node) and not downstream:
            last.add(id(node))
        if downstream or is_layer(node):
            before_layer.update(id(t) for t in node.inputs)
    return first, last


__all__ = ["Analysis", "Chan", "Edit", "FoldSite", "Group", "Producer", "Slice",
           "analyze", "boundary_layers", "fold_problems", "is_layer", "selected"]
