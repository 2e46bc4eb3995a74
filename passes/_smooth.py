"""The mechanism of the `smooth` pass (SmoothQuant scale migration; its spec is the docstring of
passes/smooth.py), shared with `quantize`'s ``smooth`` option: `find_groups` / `match` decide each
tensor (pure), `feature_extremes` measures per-feature ranges in one streaming onnxruntime pass,
`apply` rewrites, `smooth` does all three for one model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.data import Dataset, batch_size_for, random_dataset
from graph_opt.external_data import disk_tensor, on_disk
from graph_opt.intermediates import PerFeature, with_outputs
from graph_opt.kernels.smooth import migration_scales, row_max, spread
from graph_opt.onnx_util import Namer, attr
from graph_opt.pass_base import PassContext, PassReport
from graph_opt.passes._graph import GraphIndex, subgraph_reads
from graph_opt.runtime import make_session, run_batches

log = logging.getLogger(__name__)

_DEFAULT = ("", "ai.onnx")
# Readers that use a tensor's shape only: they never see the scaled values.
_SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Layer:
    """One reader of X that takes s: its node, and its weight with the axis of X's features."""

    node: int
    weight: str
    axis: int


@dataclass(frozen=True)
class Producer:
    """How 1/s is folded into what writes X: the constants to divide, each along its last axis
    (``kind`` 'layernorm', 'affine') or along the output axis of a layer weight (``kind`` 'layer')."""

    kind: Literal["layernorm", "affine", "layer"]
    node: int                          # the node writing X
    constants: tuple[tuple[int, str, int], ...]  # (node reading it, constant, axis of X's features; -1: the last)


@dataclass
class Group:
    """One tensor X and its readers: the decision of `match`, before any number is known."""

    tensor: str
    features: int
    layers: list[Layer]
    producer: Producer | None
    why_not_folded: str = ""           # when producer is None
    rest: list[int] = field(default_factory=list)   # nodes reading X's values that take no s
    rest_labels: list[str] = field(default_factory=list)  # those, and 'a graph output', for reports
    output: bool = False               # X is a graph output

    @property
    def muls(self) -> int:
        """Mul nodes this group costs: one to scale X for the layers, or one to restore X for the rest."""
        return int(self.producer is None or bool(self.rest) or self.output)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The options of the smooth pass (`passes.smooth.Smooth` validates them)."""

    alpha: float = 0.7
    min_spread: float = 1.0
    unfoldable: Literal["skip", "mul"] = "skip"
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    max_samples: int = 256
    threads: int = 0
    scope: Literal["all", "transformer"] = "all"


def smooth(model: onnx.ModelProto, report: PassReport, ctx: PassContext, opts: Settings) -> onnx.ModelProto:
    """Smooth `model` in place (a private copy: the caller's), reporting into `report` (see passes/smooth.py)."""
    ix = GraphIndex(model)
    groups = []
    outside = "" if opts.scope == "all" or has_attention(ix) else (
        "scope=transformer and the model has no attention (a MatMul of two computed operands and a Softmax)")
    for x, found in find_groups(ix, opts.op_types).items():
        why = outside or (found if isinstance(found, str) else _why_not(found, opts))
        if why:
            report.skip(x, why)
        else:
            groups.append(found)
    if outside:
        report.note(f"{outside}: nothing smoothed")
    if not groups:
        return model
    data = ctx.data
    if data is None:
        data = random_dataset(model, 16, seed=ctx.seed)
        report.note("no calibration data: per-feature ranges measured on 16 seeded random inputs")
    extremes = feature_extremes(model, data.take(opts.max_samples), {g.tensor: g.features for g in groups},
                                threads=opts.threads)
    scales: dict[str, np.ndarray] = {}
    chosen = []
    for g in groups:
        a = extremes.get(g.tensor)
        if a is None:
            report.skip(g.tensor, "never observed on the calibration data, or not float32")
            continue
        if not np.all(np.isfinite(a)):
            report.skip(g.tensor, "its per-feature extremes are not finite")
            continue
        before = spread(a)
        if before < opts.min_spread:
            report.skip(g.tensor,
                        f"no outliers: largest feature range {before:.1f}x the median < min_spread {opts.min_spread:g}")
            continue
        w = np.max([row_max(ix.const(layer.weight), layer.axis) for layer in g.layers], axis=0)
        s = migration_scales(a, w, opts.alpha)
        scales[g.tensor] = s
        chosen.append(g)
        report.rewrite(g.tensor, tensor=g.tensor,
                       layers=[ix.labels[layer.node] for layer in g.layers],
                       into=(ix.labels[g.producer.node] if g.producer else "Mul"), muls=g.muls,
                       spread_before=round(before, 2), spread_after=round(spread(a / s), 2),
                       scale_min=float(s.min()), scale_max=float(s.max()))
    if not chosen:
        return model
    muls = sum(g.muls for g in chosen)
    if muls:
        report.note(f"unfoldable=mul: {muls} Mul node(s) added (one elementwise product over each tensor per run)")
    report.note(f"alpha {opts.alpha:g}: {len(chosen)} tensor(s) smoothed, "
                f"{sum(len(g.layers) for g in chosen)} layer weight(s) scaled")
    return apply(model, ix, chosen, scales)


def _why_not(g: Group, opts: Settings) -> str:
    if opts.unfoldable == "mul":
        return ""
    if g.producer is None:
        return f"{g.why_not_folded}: 1/s cannot be folded (unfoldable=mul would add a Mul)"
    if g.rest or g.output:
        return (f"also read by {', '.join(g.rest_labels)}, which would need X unscaled "
                "(unfoldable=mul would add a Mul to restore it)")
    return ""


# ------------------------------------------------------------------------------------------- match


def has_attention(ix: GraphIndex) -> bool:
    """Whether the main graph looks like a transformer: a MatMul whose two operands are both
    computed (attention's Q·Kᵀ or its product with V) and a Softmax. A CNN's layers, heads and
    classifier MatMuls all read a constant weight."""
    def computed(name: str) -> bool:
        return bool(name) and not ix.is_const(name)

    default = [n for n in ix.nodes if n.domain in _DEFAULT]
    return (any(n.op_type == "Softmax" for n in default)
            and any(n.op_type == "MatMul" and len(n.input) == 2 and all(map(computed, n.input)) for n in default))


def find_groups(ix: GraphIndex, op_types: tuple[str, ...] = ("MatMul", "Gemm")) -> dict[str, Group | str]:
    """Every float tensor that a smoothable layer (of `op_types`) reads: its `Group`, or the reason there is none."""
    out: dict[str, Group | str] = {}
    for idx, node in enumerate(ix.nodes):
        if node.op_type not in op_types or node.domain not in _DEFAULT or len(node.input) < 2:
            continue
        x = node.input[0]
        if x in out or ix.is_const(x):
            continue
        if not ix.is_const(node.input[1]):
            continue  # two activations (attention's MatMuls): no weight to take s
        out[x] = match(ix, x, op_types)
    return out


def _layer(ix: GraphIndex, idx: int) -> Layer | str:
    """The node as a reader that takes s, or why it cannot."""
    node = ix.nodes[idx]
    w = node.input[1]
    if not ix.is_const(w):
        return "weight is not a constant"
    if ix.const_dtype(w) != TensorProto.FLOAT:
        return "weight is not float32"
    shape = _const_shape(ix, w)
    if shape is None or len(shape) != 2:
        return "weight is not 2-D"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "Gemm with transA"
        axis = 1 if attr(node, "transB", 0) else 0
    else:
        axis = 0
    if ix.sole_reader(w) != idx:
        return "weight is shared with another node"
    return Layer(idx, w, axis)


def match(ix: GraphIndex, x: str, op_types: tuple[str, ...] = ("MatMul", "Gemm")) -> Group | str:
    """The group of tensor `x`: its layers, how its producer folds 1/s (or why not), its other readers."""
    layers: list[Layer] = []
    rest: list[int] = []
    labels: list[str] = []
    for idx, slot in ix.readers(x):
        node = ix.nodes[idx]
        if slot >= 0 and node.op_type in _SHAPE_READERS and node.domain in _DEFAULT:
            continue
        layer = _layer(ix, idx) if node.op_type in op_types and slot == 0 and node.domain in _DEFAULT else None
        if isinstance(layer, Layer):
            layers.append(layer)
        else:
            rest.append(idx)
            labels.append(ix.labels[idx] + (f" ({layer})" if isinstance(layer, str) else ""))
    if not layers:
        return f"no reader takes s: {', '.join(labels)}"
    widths = {_const_shape(ix, layer.weight)[layer.axis] for layer in layers}
    if len(widths) != 1:
        return f"its layers disagree on its width ({sorted(widths)})"
    features = widths.pop()
    producer = _producer(ix, x, features)
    output = x in ix.graph_outputs
    return Group(x, features, layers, producer if isinstance(producer, Producer) else None,
                 producer if isinstance(producer, str) else "", rest,
                 labels + (["a graph output"] if output else []), output)


def _producer(ix: GraphIndex, x: str, k: int) -> Producer | str:
    """How the node writing `x` absorbs 1/s (`Producer`), or why it cannot."""
    if x not in ix.producer:
        return "a graph input"
    idx = ix.producer[x]
    node = ix.nodes[idx]
    op = node.op_type
    if node.domain not in _DEFAULT:
        return f"producer {op} ({node.domain})"
    if op == "LayerNormalization":
        if node.output[0] != x:
            return "written by LayerNormalization's statistics output"
        consts = [(idx, node.input[i], -1) for i in (1, 2) if len(node.input) > i and node.input[i]]
        why = _vectors(ix, consts, k)
        if why:
            return why
        if _const_shape(ix, node.input[1]) != (k,):  # the scale has the normalized axes' shape
            return "LayerNormalization normalizes more than the last axis"
        return Producer("layernorm", idx, tuple(consts))
    if op in ("Mul", "Add"):
        return _affine(ix, idx, k)
    if op in ("MatMul", "Gemm"):
        return _layer_producer(ix, idx, None, k)
    return f"producer {op}"


def _affine(ix: GraphIndex, idx: int, k: int) -> Producer | str:
    """``Add(Mul(n, γ), β)``, ``Mul(n, γ)``, ``Mul(a, Mul(b, c))``, or ``Add(MatMul(y, W), b)`` (a layer's bias)."""
    node = ix.nodes[idx]
    const = [i for i in node.input if ix.is_const(i)]
    if node.op_type == "Mul" and len(node.input) == 2 and not const:
        return _product(ix, idx, k)
    if len(node.input) != 2 or len(const) != 1:
        return f"producer {node.op_type} without exactly one constant operand"
    other = next(i for i in node.input if i != const[0])
    if node.op_type == "Mul":
        why = _vectors(ix, [(idx, const[0], -1)], k)
        return why or Producer("affine", idx, ((idx, const[0], -1),))
    # Add: the bias of a decomposed LayerNorm (after its Mul) or of a layer
    inner = ix.producer.get(other)
    if inner is None or ix.sole_reader(other) != idx:
        return "producer Add whose other operand is not read by it alone"
    prev = ix.nodes[inner]
    if prev.op_type == "Mul" and prev.domain in _DEFAULT:
        gamma = [i for i in prev.input if ix.is_const(i)]
        if len(gamma) != 1:
            return "producer Add after a Mul without exactly one constant operand"
        consts = [(inner, gamma[0], -1), (idx, const[0], -1)]
        why = _vectors(ix, consts, k)
        return why or Producer("affine", idx, tuple(consts))
    if prev.op_type in ("MatMul", "Gemm") and prev.domain in _DEFAULT:
        return _layer_producer(ix, inner, (idx, const[0]), k)
    return f"producer Add after {prev.op_type}"


def _product(ix: GraphIndex, idx: int, k: int) -> Producer | str:
    """``Mul(a, Mul(b, c))`` with c constant and the inner Mul read by the outer one only: 1/s goes
    into c (an exported GELU, ``x · (0.5 · (1 + erf(x/√2)))``, ends so; c may be shared by every
    GELU of the model: the inner Mul gets its own copy)."""
    for operand in ix.nodes[idx].input:
        inner = ix.producer.get(operand)
        if inner is None or ix.sole_reader(operand) != idx:
            continue
        prev = ix.nodes[inner]
        const = [i for i in prev.input if ix.is_const(i)]
        if (prev.op_type == "Mul" and prev.domain in _DEFAULT and len(prev.input) == 2 and len(const) == 1
                and not _vectors(ix, [(inner, const[0], -1)], k)):
            return Producer("affine", idx, ((inner, const[0], -1),))
    return "producer Mul of two activations, neither a private Mul by a constant"


def _layer_producer(ix: GraphIndex, idx: int, bias: tuple[int, str] | None, k: int) -> Producer | str:
    """A MatMul/Gemm writing X (with `bias`: ``(Add node, constant)`` after it): output columns / s."""
    node = ix.nodes[idx]
    layer = _layer(ix, idx)
    if isinstance(layer, str):
        return f"producer {node.op_type}: {layer}"
    w_axis = 1 - layer.axis  # the output features of its weight
    if _const_shape(ix, layer.weight)[w_axis] != k:
        return f"producer {node.op_type} writes {_const_shape(ix, layer.weight)[w_axis]} features, not {k}"
    consts: list[tuple[int, str, int]] = [(idx, layer.weight, w_axis)]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        consts.append((idx, node.input[2], -1))
    if bias is not None:
        consts.append((bias[0], bias[1], -1))
    why = _vectors(ix, consts[1:], k)
    if why:
        return why
    return Producer("layer", bias[0] if bias else idx, tuple(consts))


def _vectors(ix: GraphIndex, consts: list[tuple[int, str, int]], k: int) -> str:
    """'' when every constant (node reading it, name, axis) is float32, read once by its node, and
    spans X's last axis (length 1 or k there); else why not. One read by other nodes too is fine:
    the node gets a private copy."""
    for idx, name, _ in consts:
        label = ix.nodes[idx].op_type
        if ix.const_dtype(name) != TensorProto.FLOAT:
            return f"producer {label}: a constant is not float32"
        if list(ix.nodes[idx].input).count(name) != 1:
            return f"producer {label}: reads its constant {name!r} twice"
        shape = _const_shape(ix, name)
        if shape is None:
            return f"producer {label}: a constant is not readable"
        if shape and shape[-1] not in (1, k):
            return f"producer {label}: a constant of shape {list(shape)} is not along the last axis"
    return ""


def _const_shape(ix: GraphIndex, name: str) -> tuple[int, ...] | None:
    if name in ix.inits:
        return tuple(ix.inits[name].dims)
    value = ix.const(name)
    return None if value is None else tuple(value.shape)


# ----------------------------------------------------------------------------------- statistics


def feature_extremes(model: onnx.ModelProto, data: Dataset, widths: dict[str, int], *,
                     threads: int = 0) -> dict[str, np.ndarray]:
    """``{tensor: max_j |X_j|}`` over every sample of `data`, for each tensor of `widths` (its
    number of features, on the last axis), streamed: onnxruntime reduces each batch to the
    per-sample, per-feature max and min (`PerFeature`), nothing else leaves the session."""
    reducers = {t: (PerFeature("max", -1, k), PerFeature("min", -1, k), "size") for t, k in widths.items()}
    cap = with_outputs(model, [], reducers=reducers)
    names = [cap.reduced[t][r] for t, rs in reducers.items() for r in rs]
    weight_bytes = sum(int(a.nbytes) for a in cap.weights.values())
    session = make_session(cap.model, optimize=True, threads=threads, arena=False, weights=cap.weights)
    del cap

    def batch_bytes(outs: list[np.ndarray]) -> float:  # the tensors reduced, not the reductions
        return float(sum(int(outs[i]) * 4 for i in range(2, len(outs), 3)))

    acc: dict[str, np.ndarray] = {}
    bad: set[str] = set()  # not float32, or a NaN reached the reductions
    for _, outs in run_batches(session, names, data, batch_size_for(model, 0), "smooth statistics",
                               batch_bytes=batch_bytes, weight_bytes=weight_bytes):
        for i, t in enumerate(reducers):
            hi, lo = (np.asarray(v) for v in outs[3 * i: 3 * i + 2])
            if hi.dtype != np.float32:
                bad.add(t)
            if t in bad or hi.size == 0:
                continue
            a = np.maximum(np.abs(hi), np.abs(lo)).reshape(-1, widths[t]).max(axis=0).astype(np.float64)
            acc[t] = np.maximum(acc[t], a) if t in acc else a  # NaN propagates: the group is then skipped
    return {t: a for t, a in acc.items() if t not in bad}


# ---------------------------------------------------------------------------------------- rewrite


def apply(model: onnx.ModelProto, ix: GraphIndex, groups: list[Group], scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Rewrite `model` (the private copy `ix` indexes) in place: every group's layers take s, its
    producer 1/s (or a Mul does), its other readers get X back from a Mul; new constants get fresh
    names and the replaced ones go."""
    g = model.graph
    namer = Namer(g)
    # Every constant edit as per-axis factors, composed: a layer can read one smoothed tensor and
    # write another (its weight's rows times s, its columns divided by the next s).
    factors: dict[tuple[int, str], list[tuple[int, np.ndarray]]] = {}
    after: dict[int, list[onnx.NodeProto]] = {}   # node index -> Mul nodes to put right after it (-1: first)
    for grp in groups:
        s = scales[grp.tensor]
        for layer in grp.layers:
            factors.setdefault((layer.node, layer.weight), []).append((layer.axis, s))
        x_layers = grp.tensor
        if grp.producer is not None:
            for idx, name, axis in grp.producer.constants:
                factors.setdefault((idx, name), []).append((axis, 1.0 / s))
            if grp.rest or grp.output:  # the producer writes X/s; a Mul restores X for the others
                x_layers = namer(f"{grp.tensor}_smoothed")
                ix.nodes[grp.producer.node].output[0] = x_layers
                after.setdefault(grp.producer.node, []).append(
                    _mul(g, namer, x_layers, s, grp.tensor))
        else:
            x_layers = namer(f"{grp.tensor}_smoothed")
            after.setdefault(ix.producer.get(grp.tensor, -1), []).append(
                _mul(g, namer, grp.tensor, 1.0 / s, x_layers))
        for layer in grp.layers:
            ix.nodes[layer.node].input[0] = x_layers
    to_disk = any(on_disk(t) for t in g.initializer)
    replaced: set[str] = set()
    for (idx, name), edits in factors.items():
        value = np.asarray(ix.const(name, cache=False))
        dtype = value.dtype
        new = value.astype(np.float64)
        for axis, f in edits:
            if new.ndim == 0:
                new = new.reshape(1)
            shape = [1] * new.ndim
            shape[axis] = -1
            new = new * f.reshape(shape)
        new = new.astype(dtype)
        fresh = namer(f"{name}_smooth")
        tensor = disk_tensor(new, fresh) if to_disk and new.nbytes >= 1024 else numpy_helper.from_array(new, fresh)
        g.initializer.append(tensor)
        node = ix.nodes[idx]
        node.input[list(node.input).index(name)] = fresh
        replaced.add(name)
    if after:
        nodes = list(ix.nodes)
        del g.node[:]
        g.node.extend(after.get(-1, ()))
        for idx, node in enumerate(nodes):
            g.node.append(node)
            g.node.extend(after.get(idx, ()))
    _drop_unread(model, replaced)
    return model


def _mul(g: onnx.GraphProto, namer: Namer, x: str, factor: np.ndarray, out: str) -> onnx.NodeProto:
    const = namer(f"{out}_scale")
    g.initializer.append(numpy_helper.from_array(factor.astype(np.float32), const))
    return helper.make_node("Mul", [x, const], [out], name=namer(f"{out}_mul"))


def _drop_unread(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the initializers (and Constant nodes) of `names` that nothing reads any more."""
    g = model.graph
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in g.node:
        read |= subgraph_reads(n)
    gone = {n for n in names if n not in read}
    # Deleted by index, in reverse: re-extending the field would copy every weight kept.
    for field_, key in ((g.initializer, lambda t: t.name), (g.input, lambda v: v.name), (g.value_info, lambda v: v.name),
                        (g.node, lambda n: n.output[0] if n.op_type == "Constant" and n.output else None)):
        for i in reversed([i for i, item in enumerate(field_) if key(item) in gone]):
            del field_[i]
