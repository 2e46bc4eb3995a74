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

Nothing here edits the graph: the analysis is a plan (`Analysis`) that the pass applies.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.passes._graph import LAYER_OPS, constant, node_label, used_once

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v) if v.size else v


def _softplus(v: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, v)


def _selu(v: np.ndarray, a: dict) -> np.ndarray:
    alpha, gamma = a.get("alpha", 1.6732632423543772), a.get("gamma", 1.0507009873554805)
    return gamma * np.where(v > 0, v, alpha * (np.exp(np.minimum(v, 0)) - 1))


def _celu(v: np.ndarray, alpha: float) -> np.ndarray:
    return np.maximum(v, 0) + np.minimum(0, alpha * (np.exp(np.minimum(v, 0) / alpha) - 1))


def _gelu(v: np.ndarray, a: dict) -> np.ndarray:
    if a.get("approximate", "none") == "tanh":
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    return 0.5 * v * (1 + _erf(v / math.sqrt(2)))


# op → f(value, attrs): the constant a constant channel becomes (elementwise, so exact).
UNARY = {
    "Relu": lambda v, a: np.maximum(v, 0),
    "LeakyRelu": lambda v, a: np.where(v >= 0, v, a.get("alpha", 0.01) * v),
    "Sigmoid": lambda v, a: 1 / (1 + np.exp(-v)),
    "Tanh": lambda v, a: np.tanh(v),
    "HardSigmoid": lambda v, a: np.clip(a.get("alpha", 0.2) * v + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda v, a: v * np.clip(v / 6 + 0.5, 0, 1),
    "Elu": lambda v, a: np.where(v > 0, v, a.get("alpha", 1.0) * (np.exp(np.minimum(v, 0)) - 1)),
    "Celu": lambda v, a: _celu(v, a.get("alpha", 1.0)),
    "Selu": _selu,
    "Gelu": _gelu,
    "Softplus": lambda v, a: _softplus(v),
    "Softsign": lambda v, a: v / (1 + np.abs(v)),
    "Mish": lambda v, a: v * np.tanh(_softplus(v)),
    "ThresholdedRelu": lambda v, a: np.where(v > a.get("alpha", 1.0), v, 0.0),
    "Identity": lambda v, a: v,
    "Dropout": lambda v, a: v,
    "Cast": lambda v, a: v,
    "Neg": lambda v, a: -v,
    "Abs": lambda v, a: np.abs(v),
    "Erf": lambda v, a: _erf(v),
    "Exp": lambda v, a: np.exp(v),
    "Sqrt": lambda v, a: np.sqrt(v),
    "Reciprocal": lambda v, a: 1 / v,
    "Floor": lambda v, a: np.floor(v),
    "Ceil": lambda v, a: np.ceil(v),
    "Round": lambda v, a: np.round(v),
    "Sign": lambda v, a: np.sign(v),
}

BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
REDUCES = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")


@dataclass
class Chan:
    """Channels of one tensor: their axis, an atom id per index, and each one's dead value."""

    axis: int
    rank: int
    atoms: np.ndarray        # int64, one per index along `axis`
    value: np.ndarray        # float64: constant at this index when its channel is dead (nan: not constant)
    approx: np.ndarray       # bool: that constant is exact only away from zero-padded borders

    def take(self, index) -> Chan:
        return Chan(self.axis, self.rank, self.atoms[index], self.value[index], self.approx[index])

    def moved(self, axis: int, rank: int) -> Chan:
        return Chan(axis, rank, self.atoms, self.value, self.approx)

    def expand(self, inner: int, outer: int, axis: int, rank: int) -> Chan:
        """Each index repeated `inner` times, the whole list `outer` times (axis merged with others)."""
        def f(a):
            return np.tile(np.repeat(a, inner), outer)
        return Chan(axis, rank, f(self.atoms), f(self.value), f(self.approx))


@dataclass
class Producer:
    """A layer minting channels: its output channels lie on `weight_axis` of its weight."""

    node: gs.Node
    weight_axis: int
    atoms: np.ndarray
    reason: str | None = None  # why its channels cannot be pruned


@dataclass
class Slice:
    """Constant input `index` of `node` is indexed by `atoms` along `axis`: drop dead indices."""

    node: gs.Node
    index: int
    axis: int
    atoms: np.ndarray


@dataclass
class FoldSite:
    """A layer reading channels (its weight's `weight_axis` is indexed by `chan.atoms`)."""

    node: gs.Node
    chan: Chan
    weight_axis: int
    padded: bool  # Conv with zero padding: a constant input is not constant at the borders


@dataclass
class Edit:
    """A shape-bearing attribute or constant to recompute once dead channels are known.

    kind: 'group' (depthwise group count = kept input channels), 'split' (sizes of the channel
    axis pieces), 'slice' (start/end on the channel axis), 'reshape' (target size of `axis`).
    """

    kind: str
    node: gs.Node
    atoms: np.ndarray
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Producers whose channels are tied, the channels (class roots) and why it is frozen."""

    root: int
    producers: list[Producer]
    classes: np.ndarray
    reasons: list[str]

    @property
    def label(self) -> str:
        names = [node_label(p.node) for p in self.producers]
        if len(names) == 1:
            return names[0]
        more = ", …" if len(names) > 4 else ""
        return f"{names[0]} (+{len(names) - 1}: {', '.join(names[1:4])}{more})"


@dataclass
class Analysis:
    groups: list[Group]
    producers: list[Producer]
    chans: dict[str, Chan]
    slices: list[Slice]
    folds: list[FoldSite]
    edits: list[Edit]
    bns: list[tuple[gs.Node, Chan]]
    class_root: np.ndarray   # atom → its channel (class root)
    group_root: np.ndarray   # atom → its group root

    def classes_of(self, atoms: np.ndarray) -> np.ndarray:
        return self.class_root[atoms]

    def dead_mask(self, atoms: np.ndarray, dead: set[int] | np.ndarray) -> np.ndarray:
        dead_arr = np.fromiter(dead, np.int64) if isinstance(dead, set) else np.asarray(dead, np.int64)
        return np.isin(self.class_root[atoms], dead_arr)

    def groups_touching(self, atoms: np.ndarray) -> set[int]:
        return set(np.unique(self.group_root[atoms]).tolist())


def analyze(graph: gs.Graph, shapes: dict[str, tuple[int | None, ...]]) -> Analysis:
    """Channel groups of a (topologically sorted) graph; pure, the graph is not edited."""
    return _Walker(graph, shapes).run()


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


def _find(parent: list[int], a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def _pads(node: gs.Node) -> bool:
    """True when the node zero-pads its input (explicit pads or SAME auto-padding with a kernel > 1)."""
    if any(int(p) for p in node.attrs.get("pads", []) or []):
        return True
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        kernel = node.attrs.get("kernel_shape")
        if kernel is None and len(node.inputs) > 1 and constant(node.inputs[1]) is not None:
            kernel = constant(node.inputs[1]).shape[2:]
        return kernel is None or any(int(k) > 1 for k in kernel)
    return False


class _Walker:
    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int | None, ...]]):
        self.graph = graph
        self.shapes = shapes
        self.cls: list[int] = []
        self.grp: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.producers: list[Producer] = []
        self.chans: dict[str, Chan] = {}
        self.slices: list[Slice] = []
        self.folds: list[FoldSite] = []
        self.edits: list[Edit] = []
        self.bns: list[tuple[gs.Node, Chan]] = []

    # ---------------------------------------------------------------- atoms, channels, groups
    def new_atoms(self, n: int, frozen: str | None = None) -> np.ndarray:
        start = len(self.cls)
        self.cls.extend(range(start, start + n))
        self.grp.extend([start] * n)
        if frozen:
            self.reasons[start] = [frozen]
        return np.arange(start, start + n, dtype=np.int64)

    def freeze(self, atoms: np.ndarray, reason: str) -> None:
        for root in {_find(self.grp, int(a)) for a in np.unique(atoms)}:
            lst = self.reasons.setdefault(root, [])
            if reason not in lst:
                lst.append(reason)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = _find(self.cls, x), _find(self.cls, y)
            if rx != ry:
                self.cls[max(rx, ry)] = min(rx, ry)
            gx, gy = _find(self.grp, x), _find(self.grp, y)
            if gx != gy:
                lo, hi = min(gx, gy), max(gx, gy)
                self.grp[hi] = lo
                moved = self.reasons.pop(hi, [])
                if moved:
                    lst = self.reasons.setdefault(lo, [])
                    lst.extend(r for r in moved if r not in lst)

    def shape_of(self, t: gs.Tensor) -> tuple[int | None, ...] | None:
        c = constant(t)
        if c is not None:
            return tuple(c.shape)
        s = self.shapes.get(t.name)
        if s is None and getattr(t, "shape", None) is not None:
            s = tuple(d if isinstance(d, int) and d >= 0 else None for d in t.shape)
        return s

    def rank_of(self, t: gs.Tensor) -> int | None:
        s = self.shape_of(t)
        return None if s is None else len(s)

    def set(self, t: gs.Tensor, chan: Chan) -> None:
        if t.name:
            self.chans[t.name] = chan

    def unknown(self, node: gs.Node, ins: list[Chan | None], reason: str) -> None:
        for c in ins:
            if c is not None:
                self.freeze(c.atoms, reason)

    # ---------------------------------------------------------------- the walk
    def run(self) -> Analysis:
        for node in self.graph.nodes:
            ins = [self.chans.get(t.name) if isinstance(t, gs.Variable) and t.name else None for t in node.inputs]
            for name in _subgraph_reads(node):
                if name in self.chans:
                    self.freeze(self.chans[name].atoms, f"read inside a subgraph of {node_label(node)}")
            label = node_label(node)
            if node.domain not in (None, "", "ai.onnx"):
                self.unknown(node, ins, f"custom op {node.domain}.{node.op} ({label}) reads them")
            elif node.op == "Conv":
                self.conv(node, ins)
            elif node.op == "Gemm":
                self.gemm(node, ins)
            elif node.op == "MatMul":
                self.matmul(node, ins)
            elif all(c is None for c in ins):
                continue
            elif hasattr(self, "op_" + node.op):
                getattr(self, "op_" + node.op)(node, ins)
            elif node.op in UNARY:
                self.unary(node, ins)
            elif node.op in BINARY:
                self.binary(node, ins)
            elif node.op in POOLS:
                self.pool(node, ins)
            elif node.op in REDUCES:
                self.reduce(node, ins)
            else:
                self.unknown(node, ins, f"op {node.op} ({label}) is not understood by the channel analysis")
        for t in self.graph.outputs:
            if t.name in self.chans:
                self.freeze(self.chans[t.name].atoms, f"its channels reach the graph output {t.name!r}")
        return self.result()

    def result(self) -> Analysis:
        n = len(self.cls)
        class_root = np.array([_find(self.cls, a) for a in range(n)], np.int64)
        group_root = np.array([_find(self.grp, a) for a in range(n)], np.int64)
        groups: dict[int, Group] = {}
        for p in self.producers:
            if not p.atoms.size:
                continue
            root = int(group_root[p.atoms[0]])
            if root not in groups:
                groups[root] = Group(root, [], np.zeros(0, np.int64), list(self.reasons.get(root, [])))
            groups[root].producers.append(p)
        for g in groups.values():
            seen: dict[int, None] = {}
            for p in g.producers:
                for c in class_root[p.atoms].tolist():
                    seen.setdefault(c, None)
            g.classes = np.fromiter(seen, np.int64, len(seen))
        return Analysis(list(groups.values()), self.producers, self.chans, self.slices, self.folds, self.edits,
                        self.bns, class_root, group_root)

    # ---------------------------------------------------------------- layers
    def produce(self, node: gs.Node, n: int, weight_axis: int, reason: str | None) -> np.ndarray:
        atoms = self.new_atoms(n, reason)
        self.producers.append(Producer(node, weight_axis, atoms, reason))
        return atoms

    def private_bias(self, node: gs.Node, index: int) -> str | None:
        """None when input `index` is absent or a constant only this node reads, else why not."""
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        t = node.inputs[index]
        if constant(t) is None:
            return f"the bias of {node_label(node)} is computed at run time"
        if not used_once(t):
            return f"the bias of {node_label(node)} is shared with another node"
        return None

    def conv(self, node: gs.Node, ins: list[Chan | None]) -> None:
        label = node_label(node)
        x = ins[0]
        for c in ins[1:]:
            if c is not None:
                self.freeze(c.atoms, f"{label} takes them as its weight or bias")
        w = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.dtype.kind != "f":
            if x is not None:
                self.freeze(x.atoms, f"the weight of {label} is not a constant")
            return
        group = int(node.attrs.get("group", 1))
        cout, cin = int(w.shape[0]), int(w.shape[1]) * group
        rank = w.ndim
        shared = None if used_once(node.inputs[1]) else f"the weight of {label} is shared with another node"
        bias_problem = self.private_bias(node, 2)
        b = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        bias = np.zeros(cout) if b is None else b.astype(np.float64).reshape(-1)
        padded = _pads(node)
        if group > 1 and group == cin and cout % cin == 0:
            mult = cout // cin
            if x is None:
                atoms = self.produce(node, cout, 0, f"{label} is a depthwise conv on channels that are not prunable")
                self.set(node.outputs[0], Chan(1, rank, atoms, bias, np.zeros(cout, bool)))
                return
            if x.axis != 1 or len(x.atoms) != cin:
                self.freeze(x.atoms, f"{label} reads them on another axis")
                return
            problem = shared or bias_problem
            if problem:
                self.freeze(x.atoms, problem)
            out = x.expand(mult, 1, 1, rank)
            v_in = out.value
            wsum = w.astype(np.float64).reshape(cout, -1).sum(axis=1)
            with np.errstate(all="ignore"):
                out.value = v_in * wsum + bias
            out.approx = out.approx | (padded & (v_in != 0))
            self.slices.append(Slice(node, 1, 0, out.atoms))
            if b is not None:
                self.slices.append(Slice(node, 2, 0, out.atoms))
            self.edits.append(Edit("group", node, x.atoms))
            self.set(node.outputs[0], out)
            return
        if group != 1:
            if x is not None:
                self.freeze(x.atoms, f"{label} is a grouped conv (group={group}) that ties its channels in groups")
            atoms = self.produce(node, cout, 0, f"{label} is a grouped conv (group={group})")
            self.set(node.outputs[0], Chan(1, rank, atoms, bias, np.zeros(cout, bool)))
            return
        if x is not None:
            if x.axis != 1 or len(x.atoms) != cin:
                self.freeze(x.atoms, f"{label} reads them on another axis")
            elif shared or bias_problem:
                self.freeze(x.atoms, shared or bias_problem)
            else:
                self.folds.append(FoldSite(node, x, 1, padded))
                self.slices.append(Slice(node, 1, 1, x.atoms))
        atoms = self.produce(node, cout, 0, shared or bias_problem)
        self.slices.append(Slice(node, 1, 0, atoms))
        if b is not None:
            self.slices.append(Slice(node, 2, 0, atoms))
        self.set(node.outputs[0], Chan(1, rank, atoms, bias, np.zeros(cout, bool)))

    def gemm(self, node: gs.Node, ins: list[Chan | None]) -> None:
        label = node_label(node)
        a = ins[0]
        for c in ins[1:]:
            if c is not None:
                self.freeze(c.atoms, f"{label} takes them as its weight or bias")
        w = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            if a is not None:
                self.freeze(a.atoms, f"the weight of {label} is not a constant matrix")
            return
        trans_b = int(node.attrs.get("transB", 0))
        k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        shared = None if used_once(node.inputs[1]) else f"the weight of {label} is shared with another node"
        bias_problem = self.private_bias(node, 2)
        if a is not None:
            if int(node.attrs.get("transA", 0)) or a.axis != 1 or a.rank != 2 or len(a.atoms) != k:
                self.freeze(a.atoms, f"{label} reads them on another axis")
            elif shared or bias_problem:
                self.freeze(a.atoms, shared or bias_problem)
            else:
                self.folds.append(FoldSite(node, a, in_axis, False))
                self.slices.append(Slice(node, 1, in_axis, a.atoms))
        value = np.zeros(n)
        c = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        atoms = self.produce(node, n, out_axis, shared or bias_problem)
        self.slices.append(Slice(node, 1, out_axis, atoms))
        if c is not None:
            beta = float(node.attrs.get("beta", 1.0))
            if c.ndim >= 1 and c.shape[-1] == n and n > 1:
                self.slices.append(Slice(node, 2, c.ndim - 1, atoms))
                rows = c.astype(np.float64).reshape(-1, n)
                value = beta * rows[0] if np.all(rows == rows[0]) else np.full(n, np.nan)
            elif c.size == 1:
                value = np.full(n, beta * float(c.ravel()[0]))
            else:
                value = np.full(n, np.nan)
        self.set(node.outputs[0], Chan(1, 2, atoms, value, np.zeros(n, bool)))

    def matmul(self, node: gs.Node, ins: list[Chan | None]) -> None:
        label = node_label(node)
        a, b = ins[0], ins[1]
        if b is not None:
            self.freeze(b.atoms, f"{label} reads them as its right-hand operand")
        w = constant(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            if a is not None:
                why = "multiplies two runtime tensors" if w is None else "has a batched or non-float weight"
                self.freeze(a.atoms, f"{label} {why}")
            return
        k, n = w.shape
        shared = None if used_once(node.inputs[1]) else f"the weight of {label} is shared with another node"
        if a is not None:
            if a.axis != a.rank - 1 or len(a.atoms) != k:
                self.freeze(a.atoms, f"{label} reads them on another axis")
            elif shared:
                self.freeze(a.atoms, shared)
            else:
                self.folds.append(FoldSite(node, a, 0, False))
                self.slices.append(Slice(node, 1, 0, a.atoms))
        rank = a.rank if a is not None else self.rank_of(node.inputs[0])
        if rank is None or rank < 1:
            return
        atoms = self.produce(node, n, 1, shared)
        self.slices.append(Slice(node, 1, 1, atoms))
        self.set(node.outputs[0], Chan(rank - 1, rank, atoms, np.zeros(n), np.zeros(n, bool)))

    # ---------------------------------------------------------------- per-channel pass-through
    def unary(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{label} takes them as a parameter")
            return
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            self.unknown(node, ins, f"the mask of {label} is used")
            return
        if node.op == "Cast" and int(node.attrs.get("to", 0)) not in _FLOAT_TYPES:
            self.unknown(node, ins, f"{label} casts them to a non-float type")
            return
        with np.errstate(all="ignore"):
            value = UNARY[node.op](x.value, node.attrs)
        self.set(node.outputs[0], Chan(x.axis, x.rank, x.atoms, np.asarray(value, np.float64), x.approx))

    def op_Clip(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{label} takes them as a bound")
            return
        lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
        for i, name in ((1, "min"), (2, "max")):
            if len(node.inputs) > i and node.inputs[i].name:
                v = constant(node.inputs[i])
                if v is None:
                    self.unknown(node, ins, f"the {name} of {label} is computed at run time")
                    return
                lo, hi = (float(v), hi) if i == 1 else (lo, float(v))
        self.set(node.outputs[0], Chan(x.axis, x.rank, x.atoms, np.clip(x.value, lo, hi), x.approx))

    def op_BatchNormalization(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        params = [constant(t) for t in node.inputs[1:5]]
        if x is None or any(c is not None for c in ins[1:]) or len(params) != 4 or any(p is None for p in params):
            self.unknown(node, ins, f"the parameters of {label} are not constants")
            return
        if node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o.name]) != 1:
            self.unknown(node, ins, f"{label} is in training mode")
            return
        n = len(x.atoms)
        if x.axis != 1 or any(p.size != n for p in params):
            self.unknown(node, ins, f"{label} normalizes another axis")
            return
        for t in node.inputs[1:5]:
            if not used_once(t):
                self.freeze(x.atoms, f"a parameter of {label} is shared with another node")
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps = float(node.attrs.get("epsilon", 1e-5))
        for i in range(1, 5):
            self.slices.append(Slice(node, i, 0, x.atoms))
        self.bns.append((node, x))
        with np.errstate(all="ignore"):
            value = gamma * (x.value - mean) / np.sqrt(var + eps) + beta
        self.set(node.outputs[0], Chan(x.axis, x.rank, x.atoms, value, x.approx))

    def binary(self, node: gs.Node, ins: list[Chan | None]) -> None:
        label = node_label(node)
        op = node.op
        out_rank = self.rank_of(node.outputs[0])
        ranks = []
        for t, c in zip(node.inputs, ins):
            r = c.rank if c is not None else self.rank_of(t)
            if r is None:
                self.unknown(node, ins, f"the shape of an operand of {label} is unknown")
                return
            ranks.append(r)
        rank = out_rank if out_rank is not None else max(ranks)
        chans = [(i, c) for i, c in enumerate(ins) if c is not None]
        axes = {c.axis + rank - c.rank for _, c in chans}
        lengths = {len(c.atoms) for _, c in chans}
        if len(axes) != 1 or len(lengths) != 1:
            self.unknown(node, ins, f"{label} combines channels lying on different axes")
            return
        axis, n = axes.pop(), lengths.pop()
        first = chans[0][1]
        for _, c in chans[1:]:
            self.unify(first.atoms, c.atoms)
        values: list[np.ndarray | None] = []
        approx = np.zeros(n, bool)
        for i, t in enumerate(node.inputs):
            if ins[i] is not None:
                values.append(ins[i].value)
                approx |= ins[i].approx
                continue
            shape = self.shape_of(t)
            k = constant(t)
            pos = axis - (rank - len(shape))
            size = shape[pos] if 0 <= pos < len(shape) else 1
            rest_one = all(d == 1 for j, d in enumerate(shape) if j != pos)
            if k is not None and size == n and n > 1:
                if not used_once(t):
                    self.freeze(first.atoms, f"a constant of {label} is shared with another node")
                self.slices.append(Slice(node, i, pos, first.atoms))
                per = np.moveaxis(k.astype(np.float64), pos, 0).reshape(n, -1)
                values.append(per[:, 0] if rest_one or np.all(per == per[:, :1]) else np.full(n, np.nan))
            elif k is not None and size == 1:
                flat = k.astype(np.float64).ravel()
                values.append(np.full(n, flat[0]) if flat.size and np.all(flat == flat[0]) else np.full(n, np.nan))
            elif k is None and size == 1:
                values.append(None)  # a runtime tensor broadcast over the channels
            else:
                what = "constant" if k is not None else "runtime tensor"
                self.unknown(node, ins, f"a {what} operand {t.name!r} of {label} spans the channel axis")
                return
        with np.errstate(all="ignore"):
            value = _combine(op, values, n)
        self.set(node.outputs[0], Chan(axis, rank, first.atoms, value, approx))

    def pool(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or x.axis != 1:
            self.unknown(node, ins, f"{label} pools them on another axis")
            return
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            self.unknown(node, ins, f"the indices output of {label} is used")
            return
        approx = x.approx
        if node.op == "AveragePool" and int(node.attrs.get("count_include_pad", 0)) and _pads(node):
            approx = approx | (x.value != 0)
        rank = self.rank_of(node.outputs[0]) or x.rank
        self.set(node.outputs[0], Chan(1, rank, x.atoms, x.value, approx))

    def reduce(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{label} takes them as its axes")
            return
        axes = node.attrs.get("axes")
        if len(node.inputs) > 1 and node.inputs[1].name:
            axes = constant(node.inputs[1])
            if axes is None:
                self.unknown(node, ins, f"the axes of {label} are computed at run time")
                return
        if axes is None or len(axes) == 0:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                self.set(node.outputs[0], x)
                return
            axes = list(range(x.rank))
        axes = sorted({int(a) % x.rank for a in np.asarray(axes).ravel()})
        if x.axis in axes:
            self.unknown(node, ins, f"{label} reduces over the channel axis")
            return
        value = x.value
        if node.op == "ReduceSum":
            shape = self.shape_of(node.inputs[0])
            dims = [shape[a] for a in axes] if shape is not None else [None]
            count = math.prod(dims) if all(d is not None for d in dims) else None
            value = np.where(x.value == 0, 0.0, np.nan) if count is None else x.value * count
        keep = int(node.attrs.get("keepdims", 1))
        axis = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
        rank = x.rank if keep else x.rank - len(axes)
        self.set(node.outputs[0], Chan(axis, rank, x.atoms, value, x.approx))

    def op_Pad(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{label} takes them as a parameter")
            return
        if len(node.inputs) > 1 and node.inputs[1].name:
            pads = constant(node.inputs[1])
        else:
            pads = node.attrs.get("pads")
        cval = node.attrs.get("value", 0.0)
        if len(node.inputs) > 2 and node.inputs[2].name:
            cv = constant(node.inputs[2])
            cval = None if cv is None else float(np.asarray(cv).ravel()[0])
        if pads is None or cval is None:
            self.unknown(node, ins, f"the pads of {label} are computed at run time")
            return
        pads = np.asarray(pads, np.int64).ravel()
        axes = list(range(x.rank))
        if len(node.inputs) > 3 and node.inputs[3].name:
            ax = constant(node.inputs[3])
            if ax is None:
                self.unknown(node, ins, f"the axes of {label} are computed at run time")
                return
            axes = [int(a) % x.rank for a in np.asarray(ax).ravel()]
        half = len(pads) // 2
        per_axis = {a: (int(pads[i]), int(pads[i + half])) for i, a in enumerate(axes)}
        if per_axis.get(x.axis, (0, 0)) != (0, 0):
            self.unknown(node, ins, f"{label} pads the channel axis")
            return
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        approx = x.approx
        if mode == "constant" and any(p for pair in per_axis.values() for p in pair):
            approx = approx | (x.value != cval)
        self.set(node.outputs[0], Chan(x.axis, x.rank, x.atoms, x.value, approx))

    # ---------------------------------------------------------------- layout
    def op_Concat(self, node: gs.Node, ins: list[Chan | None]) -> None:
        label = node_label(node)
        rank = next(c.rank for c in ins if c is not None)
        axis = int(node.attrs.get("axis", 0)) % rank
        chans = [c for c in ins if c is not None]
        if all(c.axis == axis for c in chans):
            parts = []
            for t, c in zip(node.inputs, ins):
                if c is not None:
                    parts.append(c)
                    continue
                shape = self.shape_of(t)
                size = shape[axis] if shape is not None and len(shape) == rank else None
                if size is None:
                    self.unknown(node, ins, f"an input of {label} has an unknown size on the channel axis")
                    return
                atoms = self.new_atoms(size, f"concatenated in {label} with channels that are not prunable")
                parts.append(Chan(axis, rank, atoms, np.full(size, np.nan), np.zeros(size, bool)))
            self.set(node.outputs[0], Chan(axis, rank, np.concatenate([p.atoms for p in parts]),
                                           np.concatenate([p.value for p in parts]),
                                           np.concatenate([p.approx for p in parts])))
            return
        if len(chans) != len(node.inputs) or len({(c.axis, len(c.atoms)) for c in chans}) != 1:
            self.unknown(node, ins, f"{label} joins them with tensors that are not channel-aligned")
            return
        first = chans[0]
        for c in chans[1:]:
            self.unify(first.atoms, c.atoms)
        same = np.all([c.value == first.value for c in chans], axis=0)
        value = np.where(same, first.value, np.nan)
        approx = np.any([c.approx for c in chans], axis=0)
        self.set(node.outputs[0], Chan(first.axis, rank, first.atoms, value, approx))

    def op_Split(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{label} takes them as split sizes")
            return
        axis = int(node.attrs.get("axis", 0)) % x.rank
        outs = node.outputs
        if axis != x.axis:
            for o in outs:
                self.set(o, x)
            return
        n = len(x.atoms)
        sizes = node.attrs.get("split")
        if len(node.inputs) > 1 and node.inputs[1].name:
            sizes = constant(node.inputs[1])
            if sizes is None:
                self.unknown(node, ins, f"the split sizes of {label} are computed at run time")
                return
        if sizes is None:
            parts = int(node.attrs.get("num_outputs", len(outs)))
            step = -(-n // parts)
            sizes = [min(step, n - i * step) for i in range(parts)]
        sizes = [int(s) for s in np.asarray(sizes).ravel()]
        if sum(sizes) != n or len(sizes) != len(outs):
            self.unknown(node, ins, f"the split sizes of {label} do not match its channels")
            return
        start = 0
        for o, s in zip(outs, sizes):
            self.set(o, x.take(slice(start, start + s)))
            start += s
        self.edits.append(Edit("split", node, x.atoms, {"sizes": sizes}))

    def op_Slice(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{label} takes them as slice bounds")
            return
        if len(node.inputs) < 3:
            self.unknown(node, ins, f"{label} uses the opset-1 attribute form")
            return
        given = [i < len(node.inputs) and bool(node.inputs[i].name) for i in range(1, 5)]
        starts, ends, axes, steps = (constant(node.inputs[i]) if g else None for i, g in zip(range(1, 5), given))
        if any(g and v is None for g, v in zip(given, (starts, ends, axes, steps))):
            self.unknown(node, ins, f"the bounds of {label} are computed at run time")
            return
        starts, ends = np.asarray(starts).ravel(), np.asarray(ends).ravel()
        axes = list(range(len(starts))) if axes is None else [int(a) % x.rank for a in np.asarray(axes).ravel()]
        steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).ravel()
        if x.axis not in axes:
            self.set(node.outputs[0], x)
            return
        pos = axes.index(x.axis)
        if int(steps[pos]) != 1:
            self.unknown(node, ins, f"{label} slices the channel axis with a step other than 1")
            return
        n = len(x.atoms)
        s, e = int(starts[pos]), int(ends[pos])
        s = min(max(s + n if s < 0 else s, 0), n)
        e = min(max(e + n if e < 0 else e, 0), n)
        e = max(e, s)
        self.set(node.outputs[0], x.take(slice(s, e)))
        self.edits.append(Edit("slice", node, x.atoms, {"pos": pos, "start": s, "end": e}))

    def op_Flatten(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        shape = self.shape_of(node.inputs[0])
        axis = int(node.attrs.get("axis", 1))
        axis = axis + x.rank if axis < 0 else axis  # Flatten's axis lies in [-r, r]
        if axis > x.axis:
            self.unknown(node, ins, f"{label} merges the channel axis into its leading dimension")
            return
        dims = None if shape is None else shape[axis:]
        if dims is None or any(d is None for d in dims):
            self.unknown(node, ins, f"{label} flattens dimensions of unknown size")
            return
        inner = math.prod(shape[x.axis + 1:])
        outer = math.prod(shape[axis:x.axis])
        self.set(node.outputs[0], x.expand(inner, outer, 1, 2))

    def op_Reshape(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if ins[1] is not None:
            self.unknown(node, ins, f"{label} takes them as its target shape")
            return
        target = constant(node.inputs[1])
        if target is None:
            self.unknown(node, ins, f"the target shape of {label} is computed at run time; cannot map the channels")
            return
        target = np.asarray(target, np.int64).ravel()
        if int(node.attrs.get("allowzero", 0)) and np.any(target == 0):
            self.unknown(node, ins, f"{label} uses allowzero")
            return
        s_in = self.shape_of(node.inputs[0])
        s_out = self.shape_of(node.outputs[0])
        if s_in is not None and (s_out is None or len(s_out) != len(target)):
            s_out = _reshape_shape(s_in, target)
        mapping = None if s_in is None or s_out is None else _map_axis(s_in, s_out, x.axis)
        if mapping is None:
            self.unknown(node, ins, f"{label} reshapes {_fmt(s_in)} → {_fmt(s_out)}, which splits the channel axis: "
                                    "cannot map it")
            return
        j, p, m = mapping
        exact_axis = j == x.axis and p == m == x.axis
        copies = [i for i, t in enumerate(target.tolist()) if t == 0]
        if (x.axis in copies or j in copies) and not exact_axis:
            self.unknown(node, ins, f"{label} copies a dimension (0 in its target) that the channels change")
            return
        inner = math.prod(s_in[x.axis + 1:m + 1])
        outer = math.prod(s_in[p:x.axis])
        out = x.expand(inner, outer, j, len(s_out))
        self.set(node.outputs[0], out)
        if target[j] > 0:
            self.edits.append(Edit("reshape", node, out.atoms, {"axis": j}))

    def op_Transpose(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        perm = list(node.attrs.get("perm", list(range(x.rank))[::-1]))
        self.set(node.outputs[0], x.moved(perm.index(x.axis), x.rank))

    def op_Unsqueeze(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        ok, axes = self._axes(node, ins)
        if not ok:
            return
        if axes is None:
            self.unknown(node, ins, f"{node_label(node)} has no axes")
            return
        rank = x.rank + len(axes)
        axes = {int(a) % rank for a in axes}
        kept = [i for i in range(rank) if i not in axes]
        self.set(node.outputs[0], x.moved(kept[x.axis], rank))

    def op_Squeeze(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        ok, axes = self._axes(node, ins)
        if not ok:
            return
        if axes is None:
            shape = self.shape_of(node.inputs[0])
            if shape is None or any(d is None for d in shape):
                self.unknown(node, ins, f"{label} squeezes dimensions of unknown size")
                return
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = {int(a) % x.rank for a in axes}
        if x.axis in axes:
            self.unknown(node, ins, f"{label} squeezes the channel axis away")
            return
        self.set(node.outputs[0], x.moved(x.axis - sum(1 for a in axes if a < x.axis), x.rank - len(axes)))

    def _axes(self, node: gs.Node, ins: list[Chan | None]) -> tuple[bool, list[int] | None]:
        """(ok, axes) from the axes input or attribute; ok False once the channels are frozen."""
        if any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{node_label(node)} takes them as its axes")
            return False, None
        if len(node.inputs) > 1 and node.inputs[1].name:
            axes = constant(node.inputs[1])
            if axes is None:
                self.unknown(node, ins, f"the axes of {node_label(node)} are computed at run time")
                return False, None
            return True, [int(a) for a in np.asarray(axes).ravel()]
        axes = node.attrs.get("axes")
        return True, None if axes is None else [int(a) for a in axes]


def _combine(op: str, values: list[np.ndarray | None], n: int) -> np.ndarray:
    """The constant an elementwise op outputs from constant operands (None: a runtime operand)."""
    if any(v is None for v in values):
        known = [v for v in values if v is not None]
        if op == "Mul":
            zero = np.any([v == 0 for v in known], axis=0)
            return np.where(zero, 0.0, np.nan)
        if op == "Div" and values[0] is not None:
            return np.where(values[0] == 0, 0.0, np.nan)
        return np.full(n, np.nan)
    if op in ("Add", "Sum"):
        return np.sum(values, axis=0)
    if op == "Mean":
        return np.mean(values, axis=0)
    if op == "Sub":
        return values[0] - values[1]
    if op == "Mul":
        return np.prod(values, axis=0)
    if op == "Div":
        return values[0] / values[1]
    if op == "Max":
        return np.max(values, axis=0)
    if op == "Min":
        return np.min(values, axis=0)
    if op == "Pow":
        return np.power(values[0], values[1])
    if op == "PRelu":
        return np.where(values[0] < 0, values[0] * values[1], values[0])
    raise AssertionError(op)


def _reshape_shape(s_in, target) -> tuple[int | None, ...] | None:
    """The output shape of Reshape(target) from a partly known input shape (None dims unknown)."""
    out: list[int | None] = [s_in[i] if t == 0 and i < len(s_in) else int(t) for i, t in enumerate(target.tolist())]
    if -1 in out:
        known_in = [d for d in s_in if d is not None]
        if len(known_in) != len(s_in):
            out[out.index(-1)] = None
        else:
            rest = math.prod(d for d in out if d not in (-1, None))
            out[out.index(-1)] = math.prod(known_in) // rest if rest else None
    return tuple(out)


def _suffix(shape, start: int) -> int | None:
    dims = shape[start:]
    return None if any(d is None for d in dims) else math.prod(dims)


def _map_axis(s_in, s_out, k: int) -> tuple[int, int, int] | None:
    """(j, p, m): output axis j holds exactly input axes p..m (p ≤ k ≤ m), else None.

    Found from suffix products, so unknown leading dims (batch, sequence) do not matter.
    """
    for p in range(k, -1, -1):
        full = _suffix(s_in, p)
        if full is None:
            return None
        for m in range(k, len(s_in)):
            tail = _suffix(s_in, m + 1)
            for j in range(len(s_out)):
                if _suffix(s_out, j) == full and _suffix(s_out, j + 1) == tail:
                    return j, p, m
    return None


def _fmt(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _subgraph_reads(node: gs.Node) -> set[str]:
    names: set[str] = set()
    for value in node.attrs.values():
        for sub in value if isinstance(value, list) else [value]:
            if isinstance(sub, gs.Graph):
                for n in sub.nodes:
                    names.update(t.name for t in n.inputs)
                    names.update(_subgraph_reads(n))
    return names
