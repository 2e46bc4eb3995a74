"""Which layers an earlier pass compressed, where the teacher computes the same tensor, and which
teacher channels a pruned layer's outputs are (for `reconstruct`; nothing here edits a graph).

Layers are found from the pass history, or, without one, recognized in the model (factor names,
weights written by a DequantizeLinear, an input width that differs from the teacher's layer). A
weight is a constant or a DequantizeLinear of initializers (`GraphIndex.dequantized`).

Channel maps: each student filter is matched to the teacher filter it was sliced from (|cosine|
≥ MAP_MIN_COSINE over the kept input channels, in increasing order, so a per-channel scale such as
a folded BatchNorm or weight quantization does not hide it); the kept input channels are traced back
through channel-wise ops and depthwise convs, and a layer whose channels pass through anything else
cannot be mapped (a skip reason). Maps are memoized by the teacher tensor: found before the
weights they read are refit, or taken from an earlier reconstruct's report, since refit filters no
longer match the teacher's.
"""

from __future__ import annotations

import re

import numpy as np
import onnx

from graph_opt.onnx_util import attr
from graph_opt.pass_base import PassReport
from graph_opt.passes._graph import LAYER_OPS, GraphIndex
from graph_opt.passes._lowrank import FACTOR_NAME

LOWRANK_PASSES = ("factorize_gemm", "factorize_conv")
PRUNE_PASSES = ("prune_channels",)
QUANT_PASSES = ("quantize",)

# Ops whose output channel c depends only on input channel c (the channel maps pass through).
CHANNELWISE_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu", "Selu",
    "Softplus", "Mish", "Erf", "Identity", "Dropout", "BatchNormalization", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean",
    "QuantizeLinear", "DequantizeLinear", "Cast", "Neg", "Abs", "Sqrt", "Exp", "Pow",
    # Layout ops that flatten channel-major (channel c → features c·P … c·P + P − 1); any other layout
    # fails the filter match that follows, so the map is never used unchecked.
    "Flatten", "Reshape", "Squeeze", "Unsqueeze",
})
# Teacher ops between a layer and the tensor it is compared at that rescale/shift channels only.
_AFFINE_OPS = frozenset({"BatchNormalization", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear", "Add"})
# Cosine a student filter must reach against the teacher filter it was sliced from.
MAP_MIN_COSINE = 0.999


def is_weight(g: GraphIndex, name: str) -> bool:
    """A constant, or a DequantizeLinear of initializers (a quantized weight)."""
    return g.const(name) is not None or g.dequantized(name) is not None


def find_node(g: GraphIndex, label: str) -> onnx.NodeProto | None:
    """A node by the label a report gave it; ``Op(output)`` also finds a node whose output quantize
    has since renamed (the report named the tensor before its Q → DQ pair)."""
    idx = g.find(label)
    if idx is not None:
        return g.nodes[idx]
    m = re.fullmatch(r"(\w+)\((.*)\)", label)
    if m:
        op, out = m.groups()
        return next((n for n in g.nodes if n.op_type == op and n.output and _requantized(g, n.output[0]) == out), None)
    return None


def _sole_reader(g: GraphIndex, name: str) -> onnx.NodeProto | None:
    idx = g.sole_reader(name)
    return None if idx is None else g.nodes[idx]


def _requantized(g: GraphIndex, name: str) -> str | None:
    """The name a Q → DQ pair after `name` gives it back (quantize renames a producer's output)."""
    q = _sole_reader(g, name)
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] != name:
        return None
    dq = _sole_reader(g, q.output[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return dq.output[0]


def teacher_name(student: GraphIndex, teacher: GraphIndex, name: str) -> str | None:
    if teacher.has_tensor(name):
        return name
    again = _requantized(student, name)
    return again if again is not None and teacher.has_tensor(again) else None


# ======================================================================================= candidates


def _is_layer(node: onnx.NodeProto) -> bool:
    return node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx")


def find_layers(student: GraphIndex, teacher: GraphIndex, history: list[PassReport],
                 report: PassReport) -> list[tuple[onnx.NodeProto, set[str]]]:
    """(student node, compression kinds) in topological order, from the history or the model."""
    kinds: dict[int, set[str]] = {}
    nodes: dict[int, onnx.NodeProto] = {}

    def add(node: onnx.NodeProto, kind: str) -> None:
        nodes[id(node)] = node
        kinds.setdefault(id(node), set()).add(kind)

    relevant = [r for r in history if r.pass_name in LOWRANK_PASSES + PRUNE_PASSES + QUANT_PASSES]
    if relevant:
        for r in relevant:
            if r.pass_name in LOWRANK_PASSES:
                for e in r.rewritten:
                    new_nodes = e.get("new_nodes") or []
                    if not new_nodes:
                        continue
                    node = find_node(student, new_nodes[-1])
                    if node is None:
                        report.skip(e["node"], f"its last factor {new_nodes[-1]!r} is no longer in the model")
                    else:
                        add(node, "lowrank")
            elif r.pass_name in PRUNE_PASSES:
                producers = list(dict.fromkeys(p for e in r.rewritten for p in e.get("producers", [])))
                for label in producers:
                    node = find_node(student, label)
                    if node is None:
                        report.skip(label, "pruned producer is no longer in the model; its consumers are not known")
                        continue
                    for consumer in _next_layers(student, node):
                        add(consumer, "prune")
            else:
                for e in r.rewritten:
                    if e.get("op") in LAYER_OPS and e.get("weight"):
                        node = find_node(student, e["node"])
                        if node is None:
                            report.skip(e["node"], "quantized layer is no longer in the model")
                        else:
                            add(node, "quant")
    else:
        _recognize(student, teacher, add)
    return sorted(((nodes[k], kinds[k]) for k in nodes), key=lambda p: student.index(p[0]))


def _recognize(student: GraphIndex, teacher: GraphIndex, add) -> None:
    """No history: factor nodes by name, quantized weights by their DequantizeLinear, pruned
    consumers by an input dimension that differs from the teacher's layer."""
    last: dict[str, tuple[int, onnx.NodeProto]] = {}
    for node in student.nodes:
        if not _is_layer(node):
            continue
        m = FACTOR_NAME.search(node.name)
        if m:
            base, index = node.name[:m.start()], int(node.name.rsplit("_", 1)[1])
            if base not in last or index > last[base][0]:
                last[base] = (index, node)
            continue
        w = weight_input(student, node)
        if isinstance(w, str):
            continue
        if student.producer_op(w[0]) == "DequantizeLinear":
            add(node, "quant")
        t_node = _teacher_layer(student, teacher, node)
        if t_node is not None and _in_features(student, node) != _in_features(teacher, t_node):
            add(node, "prune")
    for _, node in last.values():
        add(node, "lowrank")
        w = weight_input(student, node)
        if not isinstance(w, str) and student.producer_op(w[0]) == "DequantizeLinear":
            add(node, "quant")


def _next_layers(g: GraphIndex, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The Conv/Gemm/MatMul layers that read `node`'s output channels next (through any other op;
    through depthwise convs, which carry the channels on)."""
    found: list[onnx.NodeProto] = []
    seen: set[int] = {id(node)}
    stack = [o for o in node.output if o]
    while stack:
        name = stack.pop()
        for c in (g.nodes[idx] for idx, _ in g.readers(name)):
            if id(c) in seen:
                continue
            seen.add(id(c))
            if _is_layer(c):
                found.append(c)
                if _depthwise(g, c):
                    stack.extend(o for o in c.output if o)
            else:
                stack.extend(o for o in c.output if o)
    return found


def _depthwise(g: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    group = attr(node, "group", 1)
    w = weight_input(g, node)
    return group > 1 and not isinstance(w, str) and w[1].shape[1] == 1


def weight_input(g: GraphIndex, node: onnx.NodeProto) -> tuple[str, np.ndarray, bool, int] | str:
    """(weight tensor, value, quantized, input slot) of a layer, or why it has none."""
    if node.op_type not in LAYER_OPS:
        return f"layer kind {node.op_type} not supported (Conv, Gemm, MatMul only)"
    slots = [1] if node.op_type in ("Conv", "Gemm") else [1, 0]
    if node.op_type == "MatMul":
        consts = [s for s in (0, 1) if len(node.input) > s and is_weight(g, node.input[s])]
        if len(consts) != 1:
            return ("MatMul of two activations (no weight to refit)" if not consts
                    else "both MatMul operands are constants")
        slots = consts
    if node.op_type == "Gemm" and is_weight(g, node.input[0]) and not is_weight(g, node.input[1]):
        return "Gemm with a constant A and a variable B is not supported"
    slot = slots[0]
    if len(node.input) <= slot or not node.input[slot]:
        return "layer without a weight input"
    name = node.input[slot]
    value = g.const(name)
    quantized = False
    if value is None:
        value = g.dequantized(name)
        quantized = value is not None
    if value is None:
        return f"weight {name!r} is not a constant"
    if value.dtype not in (np.float16, np.float32, np.float64):
        return f"weight {name!r} has dtype {value.dtype}, not float"
    return name, value, quantized, slot


def _in_features(g: GraphIndex, node: onnx.NodeProto) -> int | None:
    w = weight_input(g, node)
    if isinstance(w, str):
        return None
    _, value, _, slot = w
    if node.op_type == "Conv":
        return int(value.shape[1]) * int(attr(node, "group", 1))
    if node.op_type == "Gemm":
        return int(value.shape[1] if attr(node, "transB", 0) else value.shape[0])
    return int(value.shape[-2] if slot == 1 else value.shape[-1])


def _teacher_layer(student: GraphIndex, teacher: GraphIndex, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The teacher's layer that writes (up to BN/bias Add/QDQ) the tensor the student layer is compared at."""
    out = layer_output(student, node)
    name = teacher_name(student, teacher, out)
    while name is not None:
        p = teacher.producer_node(name)
        if p is None:
            return None
        if _is_layer(p):
            return p if not isinstance(weight_input(teacher, p), str) else None
        if p.op_type not in _AFFINE_OPS:
            return None
        if p.op_type == "Add" and not any(is_weight(teacher, i) for i in p.input):
            return None
        name = next((i for i in p.input if i and not is_weight(teacher, i)), None)
    return None


def layer_output(g: GraphIndex, node: onnx.NodeProto) -> str:
    """The tensor a layer is compared at: its output, or that of the bias Add after a MatMul."""
    add = bias_add(g, node)
    return add.output[0] if add is not None else node.output[0]


def bias_add(g: GraphIndex, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Add of a per-column constant right after a MatMul (weight on the right), if any."""
    if node.op_type != "MatMul" or not node.output:
        return None
    w = weight_input(g, node)
    if isinstance(w, str) or w[3] != 1 or w[1].ndim != 2:
        return None
    add = _sole_reader(g, node.output[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    c = g.const(other)
    n = w[1].shape[1]
    if c is None or c.dtype.kind != "f" or (c.size not in (1, n)) or (c.ndim and c.shape[-1] != c.size):
        return None
    return add


# =================================================================================== channel maps


class _Unmappable(Exception):
    pass


def output_map(student: GraphIndex, teacher: GraphIndex, node: onnx.NodeProto, target: str, channel_axis: int,
               t_shape, s_shape, memo: dict) -> np.ndarray | None | str:
    """Teacher channel of each output channel of layer `node` (None: the same channels), or why
    unknown; `target` is the teacher's tensor of shape `t_shape`, its channels on `channel_axis`."""
    axis = channel_axis % len(t_shape) if len(t_shape) else 0
    if len(t_shape) != len(s_shape) or any(a != b for i, (a, b) in enumerate(zip(t_shape, s_shape)) if i != axis):
        return f"shapes differ: the teacher's {target!r} is {list(t_shape)}, the student's {list(s_shape)}"
    if t_shape[axis] == s_shape[axis]:
        return None
    try:
        mapping = _layer_map(student, teacher, node, memo)
    except _Unmappable as exc:
        return (f"output channels differ ({s_shape[axis]} in the student, {t_shape[axis]} in the teacher) "
                f"and cannot be matched: {exc}")
    if mapping is None or len(mapping) != s_shape[axis] or mapping.max() >= t_shape[axis]:
        return f"output channels differ ({s_shape[axis]} vs {t_shape[axis]}) and the filter match is inconsistent"
    return mapping


def _tensor_map(student: GraphIndex, teacher: GraphIndex, name: str, memo: dict) -> np.ndarray | None:
    """Teacher channel indices of a student tensor's channels (None: identical), traced back to a layer."""
    p = student.producer_node(name)
    if p is None:
        return None
    if _is_layer(p) and not isinstance(weight_input(student, p), str):
        return _layer_map(student, teacher, p, memo)
    if p.op_type in CHANNELWISE_OPS:
        src = next((i for i in p.input if i and not is_weight(student, i)), None)
        if src is None:
            raise _Unmappable(f"{student.label(p)} has no variable input")
        return _tensor_map(student, teacher, src, memo)
    raise _Unmappable(f"the channels pass through {p.op_type} ({student.label(p)})")


def _layer_map(student: GraphIndex, teacher: GraphIndex, node: onnx.NodeProto, memo: dict) -> np.ndarray | None:
    """Teacher channel of each output channel of a student layer (memo: by the teacher tensor's name)."""
    key = teacher_name(student, teacher, layer_output(student, node))
    if key in memo:
        return memo[key]
    t_node = _teacher_layer(student, teacher, node)
    if t_node is None:
        raise _Unmappable(f"no teacher layer writes {layer_output(student, node)!r}")
    s_rows, s_group = _filter_rows(student, node)
    t_rows, t_group = _filter_rows(teacher, t_node)
    if len(s_rows) == len(t_rows):
        memo[key] = None
        return None
    if s_group > 1 or t_group > 1:
        mult = len(s_rows) // s_group  # depthwise: output channel c·mult + j reads input channel c
        if _depthwise(student, node) and _depthwise(teacher, t_node) and len(t_rows) // t_group == mult:
            inputs = _tensor_map(student, teacher, node.input[0], memo)
            if inputs is None:
                raise _Unmappable(f"{student.label(node)} has the teacher's inputs but not its outputs")
            mapping = (inputs[:, None] * mult + np.arange(mult)).reshape(-1)
            memo[key] = mapping
            return mapping
        raise _Unmappable(f"{student.label(node)} is a grouped conv")
    cols = _tensor_map(student, teacher, _activation_input(student, node), memo)
    if cols is not None:
        width = s_rows.shape[1]
        if width != len(cols):
            if width % len(cols):
                raise _Unmappable(f"{width} input features of {student.label(node)} are not a multiple of "
                                  f"{len(cols)} channels")
            per = width // len(cols)  # Flatten of C×P: channel c owns features c·P … c·P + P − 1
            cols = (cols[:, None] * per + np.arange(per)).reshape(-1)
        if cols.max(initial=-1) >= t_rows.shape[1]:
            raise _Unmappable("input channel map exceeds the teacher's inputs")
        t_rows = t_rows[:, cols]
    elif s_rows.shape[1] != t_rows.shape[1]:
        raise _Unmappable(f"{student.label(node)} has {s_rows.shape[1]} input features, the teacher {t_rows.shape[1]}")
    mapping = _match_filters(s_rows.reshape(len(s_rows), -1), t_rows.reshape(len(t_rows), -1))
    if mapping is None:
        raise _Unmappable(f"the filters of {student.label(node)} are not (rescaled) slices of the teacher's")
    memo[key] = mapping
    return mapping


def _activation_input(g: GraphIndex, node: onnx.NodeProto) -> str:
    w = weight_input(g, node)
    return node.input[1 - w[3]] if node.op_type == "MatMul" else node.input[0]


def _filter_rows(g: GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray, int]:
    """Weights as [outputs, input features, taps] (a filter per output channel) and the group count."""
    w = weight_input(g, node)
    if isinstance(w, str):
        raise _Unmappable(w)
    _, value, _, slot = w
    value = np.asarray(value, np.float64)
    if node.op_type == "Conv":
        return value.reshape(value.shape[0], value.shape[1], -1), int(attr(node, "group", 1))
    if node.op_type == "Gemm":
        rows = value if attr(node, "transB", 0) else value.T
    else:
        rows = value.T if slot == 1 else value
    return rows[:, :, None], 1


def _match_filters(s: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """Increasing teacher rows, one per student row, maximizing Σ|cos|; None unless every |cos| ≥ threshold."""
    ns = np.linalg.norm(s, axis=1, keepdims=True)
    nt = np.linalg.norm(t, axis=1, keepdims=True)
    if np.any(ns == 0):
        return None
    sim = np.abs((s / ns) @ np.where(nt > 0, t / np.where(nt > 0, nt, 1), 0).T)  # [S, T]
    n_s, n_t = sim.shape
    if n_s > n_t:
        return None
    # best[j]: best total for the rows so far using teacher rows < j; arg[i][j]: where row i went.
    best = np.zeros(n_t + 1)
    args = np.zeros((n_s, n_t + 1), np.int64)
    for i in range(n_s):
        cand = best[:-1] + sim[i]
        cand[:i] = -np.inf  # rows before i need i teacher rows
        running = np.maximum.accumulate(cand)
        # Where the running maximum was reached (the earliest row on ties).
        is_new = np.concatenate([[True], cand[1:] > running[:-1]])
        pos = np.maximum.accumulate(np.where(is_new, np.arange(n_t), 0))
        best = np.concatenate([[-np.inf], running])
        args[i, 1:] = pos
    chosen = np.zeros(n_s, np.int64)
    end = n_t
    for i in range(n_s - 1, -1, -1):
        chosen[i] = args[i, end]
        end = chosen[i]
    if np.any(sim[np.arange(n_s), chosen] < MAP_MIN_COSINE):
        return None
    return chosen

