"""The channel analysis walk (see `passes/_groups.py` for what it finds): one pass over the nodes
in topological order tagging every tensor that carries prunable channels with a `Chan`. Here:
the bookkeeping (atoms, the union-find of channels and groups, freezing with reasons), the layers
(Conv / Gemm / MatMul mint and consume channels) and the per-channel ops (activations, Clip,
BatchNormalization, elementwise binaries, pooling, Reduce*, Pad), with the constant each channel
emits once its producers' filters are zero. Layout ops are in `_groups_layout`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.passes._graph import constant, node_label, subgraph_nodes, used_once
from graph_opt.passes._groups_layout import LayoutOps
from graph_opt.passes._groups_plan import Analysis, Chan, Edit, FoldSite, Group, Producer, Slice, find_root

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


class Walker(LayoutOps):
    """One walk of the graph; `run` returns the `Analysis`."""

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
        for root in {find_root(self.grp, int(a)) for a in np.unique(atoms)}:
            lst = self.reasons.setdefault(root, [])
            if reason not in lst:
                lst.append(reason)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = find_root(self.cls, x), find_root(self.cls, y)
            if rx != ry:
                self.cls[max(rx, ry)] = min(rx, ry)
            gx, gy = find_root(self.grp, x), find_root(self.grp, y)
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

    def attr_or_input(self, node: gs.Node, ins: list[Chan | None], name: str, what: str) -> tuple[bool, Any]:
        """(ok, value) of attribute `name`, or of the constant second input that replaced it in later
        opsets; ok False (the channels frozen) when that input is computed at run time."""
        if len(node.inputs) > 1 and node.inputs[1].name:
            value = constant(node.inputs[1])
            if value is None:
                self.unknown(node, ins, f"the {what} of {node_label(node)} are computed at run time")
                return False, None
            return True, value
        return True, node.attrs.get(name)

    def layer_weight(self, node: gs.Node, ins: list[Chan | None]) -> np.ndarray | None:
        """The constant weight (input 1) of a Conv/Gemm, else None; channels that reach its weight or
        bias are frozen."""
        for c in ins[1:]:
            if c is not None:
                self.freeze(c.atoms, f"{node_label(node)} takes them as its weight or bias")
        return constant(node.inputs[1]) if len(node.inputs) > 1 else None

    def first_only(self, node: gs.Node, ins: list[Chan | None], role: str) -> Chan | None:
        """The channels of `node`'s first input, or None when it has none or another input carries
        channels too (those are then frozen: `node` takes them as `role`)."""
        x = ins[0]
        if x is None or any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{node_label(node)} takes them as {role}")
            return None
        return x

    # ---------------------------------------------------------------- the walk
    def run(self) -> Analysis:
        for node in self.graph.nodes:
            ins = [self.chans.get(t.name) if isinstance(t, gs.Variable) and t.name else None for t in node.inputs]
            for name in {t.name for inner in subgraph_nodes(node) for t in inner.inputs}:
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
        class_root = np.array([find_root(self.cls, a) for a in range(n)], np.int64)
        group_root = np.array([find_root(self.grp, a) for a in range(n)], np.int64)
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
        w = self.layer_weight(node, ins)
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
        w = self.layer_weight(node, ins)
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
        x = self.first_only(node, ins, "a parameter")
        if x is None:
            return
        label = node_label(node)
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
        x = self.first_only(node, ins, "a bound")
        if x is None:
            return
        label = node_label(node)
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
        x = self.first_only(node, ins, "its axes")
        if x is None:
            return
        label = node_label(node)
        ok, axes = self.attr_or_input(node, ins, "axes", "axes")
        if not ok:
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
        x = self.first_only(node, ins, "a parameter")
        if x is None:
            return
        label = node_label(node)
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
