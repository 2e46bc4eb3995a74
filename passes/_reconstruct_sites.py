"""A layer as a least-squares problem over rows, and the edits that store its refit (for `reconstruct`).

`match_site` decides, without touching the graph, how one layer is refit: which tensors are its
input and output, its weight as a matrix [groups, d, m] and where its bias lives (a float
initializer, an int32 one behind a DequantizeLinear, or none yet), or why it is skipped. A `Site`
turns captured tensors into rows (im2col for Conv; rows of Gemm/MatMul) and a solved change back
into a weight; `Bias.update` keeps the change on the stored grid (the dtype, or the int32 grid of a
quantized bias) so the error a refit reports is that of the weights as stored. Edits create new
initializers with fresh names (`Writer`) and re-point one node input each (`Edit`), so that the
pass can undo any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graph_opt.kernels.lstsq import conv_rows, conv_weight_from_matrix, conv_weight_matrix, im2col
from graph_opt.external_data import disk_tensor, has_disk_weights, read_array
from graph_opt.onnx_util import Namer, attr
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._lowrank import FACTOR_NAME
from graph_opt.passes._reconstruct_layers import bias_add, layer_output, teacher_name, weight_input

_INT32 = np.iinfo(np.int32)


class Writer:
    """New initializers in the indexed model, with fresh names (weights are never edited in place)."""

    def __init__(self, g: GraphIndex):
        self.g = g
        self.namer = Namer(g.model.graph)
        self.disk = has_disk_weights(g.model)

    def add(self, base: str, value: np.ndarray) -> str:
        name = self.namer(base)
        if self.disk and value.nbytes >= 1024:  # a model over 2 GB: the refit weights go to disk too
            tensor = disk_tensor(value, name)
        else:
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.g.add_initializer(tensor)
        return name


# ============================================================================================ sites


@dataclass
class Edit:
    """One re-pointed input: ``node.input[slot]`` was `old` ("" = absent) and becomes `new`."""

    node: onnx.NodeProto
    slot: int
    old: str
    new: str

    def set(self, applied: bool) -> None:
        while len(self.node.input) <= self.slot:
            self.node.input.append("")
        self.node.input[self.slot] = self.new if applied else self.old
        while len(self.node.input) and not self.node.input[-1]:  # an absent optional input at the end
            del self.node.input[len(self.node.input) - 1]


def set_prefix(applied: list[tuple[dict, list[Edit]]], k: int) -> None:
    """The model with the first k refits applied and the others undone."""
    for i, (_, edits) in enumerate(applied):
        for edit in edits:
            edit.set(i < k)


@dataclass
class Bias:
    """Where a layer's bias lives and how to change it (effective bias = scale · stored value)."""

    node: onnx.NodeProto | None  # the node whose input holds the bias (the layer, or the bias Add)
    slot: int  # that input's index (may be one past the end: a bias to be created)
    channels: int
    scale: float = 1.0  # Gemm: beta
    current: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dtype: np.dtype = np.dtype(np.float32)
    quant: tuple[onnx.NodeProto, np.ndarray, np.ndarray, np.ndarray] | None = None  # DQ, codes, scale, zp
    reason: str = ""  # why there is no writable bias

    @property
    def writable(self) -> bool:
        return self.node is not None

    def kind_label(self) -> str:
        if self.node is None:
            return "none"
        if self.quant is not None:
            return "int32 (re-quantized)"
        exists = self.slot < len(self.node.input) and bool(self.node.input[self.slot])
        return "float" if exists else "float (created)"

    def update(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value to store, effective change it really makes), for a wanted change `delta` [channels]."""
        want = self.current + np.asarray(delta, np.float64).reshape(self.channels)
        if self.quant is not None:
            _, codes, s, zp = self.quant
            safe = np.where(s > 0, s, 1.0)
            q = np.where(s > 0, np.clip(np.round(want / safe) + zp, _INT32.min, _INT32.max), codes).astype(np.int32)
            real = (q.astype(np.float64) - zp) * s
            return q, real - self.current
        stored = (want / self.scale).astype(self.dtype)
        return stored, stored.astype(np.float64) * self.scale - self.current

    def store(self, w: Writer, value: np.ndarray) -> Edit:
        """Write the new bias (a fresh initializer) and point the reader at it."""
        if self.quant is not None:
            dq = self.quant[0]
            edit = Edit(dq, 0, dq.input[0], w.add(f"{dq.input[0]}_corrected", value.astype(np.int32)))
        else:
            old = self.node.input[self.slot] if self.slot < len(self.node.input) else ""
            base = old or f"{self.node.name or self.node.output[0]}.bias"
            edit = Edit(self.node, self.slot, old, w.add(f"{base}_refit", value))
        edit.set(True)
        return edit


@dataclass
class Site:
    """One layer seen as rows: y_rows [R, G, m] = x_rows [R, G, d] @ matrix [G, d, m] + bias."""

    node: onnx.NodeProto
    label: str
    kinds: list[str]
    method: str
    x_name: str
    y_name: str
    target: str
    channel_axis: int
    groups: int
    d: int
    m: int
    bias: Bias
    matrix: np.ndarray | None  # current weights [G, d, m] (lstsq only)
    weight_name: str = ""
    weight_dtype: np.dtype = np.dtype(np.float32)
    weight_shape: tuple[int, ...] = ()

    # op-specific views (the subclasses below)
    def count(self, y_shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def in_rows(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def out_rows(self, y: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def to_weight(self, matrix: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def from_weight(self, weight: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def weight_update(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weight to store, the change of the matrix it really makes after the cast)."""
        stored = self.to_weight(self.matrix + delta).astype(self.weight_dtype)
        return stored, self.from_weight(stored.astype(np.float64)) - self.matrix

    def store_weight(self, w: Writer, value: np.ndarray) -> Edit:
        slot = list(self.node.input).index(self.weight_name)
        edit = Edit(self.node, slot, self.weight_name, w.add(f"{self.weight_name}_refit", value))
        edit.set(True)
        return edit


@dataclass
class _ConvSite(Site):
    attrs: dict = field(default_factory=dict)  # kernel, strides, dilations, pads, auto_pad

    def count(self, y_shape):
        return int(y_shape[0]) * math.prod(int(v) for v in y_shape[2:])

    def in_rows(self, x, idx):
        a = self.attrs
        return im2col(x, a["kernel"], strides=a["strides"], pads=a["pads"], dilations=a["dilations"],
                      groups=self.groups, auto_pad=a["auto_pad"], rows=idx)

    def out_rows(self, y, idx):
        return conv_rows(y, self.groups, idx)

    def to_weight(self, matrix):
        return conv_weight_from_matrix(matrix, self.weight_shape)

    def from_weight(self, weight):
        return conv_weight_matrix(weight, self.groups)


@dataclass
class _GemmSite(Site):
    alpha: float = 1.0
    trans_a: bool = False
    trans_b: bool = False

    def count(self, y_shape):
        return int(y_shape[0])

    def in_rows(self, x, idx):
        rows = x.T if self.trans_a else x
        return (rows if idx is None else rows[idx])[:, None, :]

    def out_rows(self, y, idx):
        return (y if idx is None else y[idx])[:, None, :]

    def to_weight(self, matrix):
        b = matrix[0] / self.alpha
        return b.T if self.trans_b else b

    def from_weight(self, weight):
        return (self.alpha * (weight.T if self.trans_b else weight))[None]


@dataclass
class _MatMulSite(Site):
    left: bool = False  # the weight is the left operand: y = W @ X

    def count(self, y_shape):
        return math.prod(int(v) for v in y_shape) // self.m

    def _flat(self, a):
        return (np.swapaxes(a, -1, -2) if self.left else a).reshape(-1, a.shape[-2] if self.left else a.shape[-1])

    def in_rows(self, x, idx):
        rows = self._flat(x)
        return (rows if idx is None else rows[idx])[:, None, :]

    def out_rows(self, y, idx):
        rows = self._flat(y)
        return (rows if idx is None else rows[idx])[:, None, :]

    def to_weight(self, matrix):
        return matrix[0].T if self.left else matrix[0]

    def from_weight(self, weight):
        return (weight.T if self.left else weight)[None]


def match_site(student: GraphIndex, teacher: GraphIndex, node: onnx.NodeProto, kinds: list[str],
               bias_only: bool) -> Site | str:
    """How to refit one layer (decided without touching the graph), or why it is skipped."""
    label = student.label(node)
    w = weight_input(student, node)
    if isinstance(w, str):
        return w
    w_name, w_value, quantized, slot = w
    if w_value.size == 0:
        return f"weight of shape {list(w_value.shape)} is empty (zero-sized): nothing to refit"
    if node.op_type == "MatMul" and w_value.ndim != 2:
        return f"MatMul weight has {w_value.ndim} dims (only 2-D weights are refit)"
    method = "bias_correction" if (bias_only or quantized) else "lstsq"
    y_name = layer_output(student, node)
    target = teacher_name(student, teacher, y_name)
    if target is None:
        m = FACTOR_NAME.search(node.name)
        if m and f"{node.name[:m.start()]}/{m.group(1)}_{int(node.name.rsplit('_', 1)[1]) + 1}" in student.by_name:
            return (f"an inner low-rank factor: its output {y_name!r} has no counterpart in the teacher "
                    "(only the last factor is refit)")
        return f"target tensor {y_name!r} not found in the teacher"
    x_name = node.input[1 - slot] if node.op_type == "MatMul" else node.input[0]
    common = dict(node=node, label=label, kinds=kinds, method=method, x_name=x_name, y_name=y_name, target=target,
                  weight_name=w_name, weight_dtype=w_value.dtype, weight_shape=tuple(w_value.shape))
    value = np.asarray(w_value, np.float64)
    if node.op_type == "Conv":
        group = int(attr(node, "group", 1))
        o = value.shape[0]
        if o % group:
            return f"{o} output channels do not split into {group} groups"
        kernel = list(attr(node, "kernel_shape", list(value.shape[2:])))
        auto_pad = attr(node, "auto_pad", b"NOTSET")
        attrs = {"kernel": kernel, "strides": list(attr(node, "strides", [1] * len(kernel))),
                 "dilations": list(attr(node, "dilations", [1] * len(kernel))),
                 "pads": list(attr(node, "pads", [0] * 2 * len(kernel))),
                 "auto_pad": auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad}
        site = _ConvSite(**common, channel_axis=1, groups=group, d=int(np.prod(value.shape[1:])), m=o // group,
                         bias=_conv_gemm_bias(student, node, o, 1.0, quantized, w_value.dtype),
                         matrix=conv_weight_matrix(value, group), attrs=attrs)
    elif node.op_type == "Gemm":
        trans_b = bool(attr(node, "transB", 0))
        n = value.shape[0] if trans_b else value.shape[1]
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        site = _GemmSite(**common, channel_axis=1, groups=1, d=int(value.size // n), m=int(n),
                         bias=_conv_gemm_bias(student, node, n, beta, quantized, w_value.dtype),
                         matrix=(alpha * (value.T if trans_b else value))[None], alpha=alpha,
                         trans_a=bool(attr(node, "transA", 0)), trans_b=trans_b)
    else:
        left = slot == 0
        m = value.shape[0] if left else value.shape[1]
        site = _MatMulSite(**common, channel_axis=-2 if left else -1, groups=1, d=int(value.size // m), m=int(m),
                           bias=_matmul_bias(student, node, m), matrix=(value.T if left else value)[None], left=left)
    if method == "bias_correction":
        site.matrix = None
        if not site.bias.writable:
            return f"no bias to correct: {site.bias.reason}"
    return site


def _conv_gemm_bias(g: GraphIndex, node: onnx.NodeProto, channels: int, beta: float, quantized: bool,
                    dtype: np.dtype) -> Bias:
    """The bias input (index 2) of a Conv or Gemm: float, int32 via DequantizeLinear, or to be created."""
    has = len(node.input) > 2 and bool(node.input[2])
    if node.op_type == "Gemm" and beta == 0.0:
        return Bias(None, 2, channels, reason="Gemm with beta=0 ignores C")
    if not has:
        if quantized and g.producer_op(node.input[0]) == "DequantizeLinear":
            return Bias(None, 2, channels, reason="a quantized layer without a bias (a float bias would stop "
                                                   "onnxruntime from fusing it into an integer kernel)")
        return Bias(node, 2, channels, scale=beta if node.op_type == "Gemm" else 1.0, current=np.zeros(channels),
                     dtype=np.dtype(dtype))
    name = node.input[2]
    readers = len(g.readers(name))
    value = g.const(name)
    if value is not None:
        if value.dtype.kind != "f":
            return Bias(None, 2, channels, reason=f"bias dtype {value.dtype} is not float")
        if value.size not in (1, channels) or (value.ndim and value.shape[-1] != value.size):
            return Bias(None, 2, channels, reason=f"C of shape {list(value.shape)} is not one value per output column")
        current = np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (channels,)) * beta
        return Bias(node, 2, channels, scale=beta, current=np.array(current), dtype=value.dtype)
    dq = g.producer_node(name)
    if dq is not None and dq.op_type == "DequantizeLinear" and all(not i or i in g.inits for i in dq.input):
        if readers != 1 or name in g.graph_outputs:
            return Bias(None, 2, channels, reason=f"bias {name!r} is shared with another node")
        codes = read_array(g.inits[dq.input[0]])
        s = read_array(g.inits[dq.input[1]]).astype(np.float64)
        zp = (read_array(g.inits[dq.input[2]]).astype(np.float64)
              if len(dq.input) > 2 and dq.input[2] else np.zeros_like(s))
        if codes.dtype != np.int32 or codes.size != channels or s.size not in (1, channels):
            return Bias(None, 2, channels, reason=f"quantized bias {name!r} is not an int32 vector per channel")
        s, zp = np.broadcast_to(s.reshape(-1), (channels,)), np.broadcast_to(zp.reshape(-1), (channels,))
        current = (codes.reshape(-1).astype(np.float64) - zp) * s * beta
        if beta != 1.0:
            return Bias(None, 2, channels, reason="a quantized C with beta ≠ 1")
        return Bias(node, 2, channels, current=current, quant=(dq, codes.reshape(-1), np.array(s), np.array(zp)))
    return Bias(None, 2, channels, reason=f"bias {name!r} is not a constant")


def _matmul_bias(g: GraphIndex, node: onnx.NodeProto, channels: int) -> Bias:
    add = bias_add(g, node)
    if add is None:
        return Bias(None, 0, channels, reason="a MatMul without a bias Add after it")
    slot = 1 if add.input[0] == node.output[0] else 0
    value = g.const(add.input[slot])
    current = np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (channels,))
    return Bias(add, slot, channels, current=np.array(current), dtype=value.dtype)

