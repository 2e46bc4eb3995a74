"""An ONNX graph as a trainable torch module, for `distill` (needs the optional torch extra).

`TorchGraph(model)` holds every float initializer as a tensor (those in `trainable` as
`nn.Parameter`s) and runs the main graph's nodes in order with torch ops, so gradients reach the
weights. It covers the ops compressed CNNs, MLPs and transformer encoders are made of (the
`OPS` table); any other op, a node with a subgraph, or an attribute outside what the table
implements raises `UntrainableError` naming it, before any training. `TorchGraph.check` compares
the module with onnxruntime on real inputs: a conversion that does not reproduce the graph is
refused, never trained on.

Weights come back with `state()`: name → numpy array of each trainable initializer, ready to be
written into the same graph (same nodes, same names).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from graph_opt.errors import GraphOptError
from graph_opt.onnx_util import subgraphs

# Ops whose inputs other than the first are weights a compressed model trains.
LAYER_WEIGHTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "Add": (0, 1),
                 "Mul": (0, 1), "BatchNormalization": (1, 2), "LayerNormalization": (1, 2)}


class UntrainableError(GraphOptError):
    """The student graph holds something the torch conversion does not implement exactly."""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int] | None, nd: int) -> list[int]:
    """ONNX pads [b1, b2, …, e1, e2, …] → F.pad order (last axis first: e.g. [w0, w1, h0, h1])."""
    pads = list(pads or [0] * 2 * nd)
    out: list[int] = []
    for axis in reversed(range(nd)):
        out += [pads[axis], pads[axis + nd]]
    return out


def _auto_pad(a: dict, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    nd = len(kernel)
    if mode in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * nd))
    if mode == "VALID":
        return [0] * 2 * nd
    begin, end = [], []
    for i in range(nd):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _conv(n, a, x, w, b=None):
    nd = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    pads = _auto_pad(a, x, kernel, strides, dilations)
    x = F.pad(x, _pads(pads, nd)) if any(pads) else x
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, stride=strides, dilation=dilations, groups=int(a.get("group", 1)))


def _gemm(n, a, x, w, c=None):
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = float(a.get("alpha", 1.0)) * (x @ w)
    return y if c is None else y + float(a.get("beta", 1.0)) * c


def _pool(kind):
    def run(n, a, x):
        nd = x.dim() - 2
        kernel = list(a["kernel_shape"])
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        if int(a.get("ceil_mode", 0)):
            raise UntrainableError(f"{n.op_type} {n.name!r}: ceil_mode=1 is not converted")
        pads = _auto_pad(a, x, kernel, strides, dil)
        if kind == "max":
            x = F.pad(x, _pads(pads, nd), value=-math.inf) if any(pads) else x
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, kernel, strides, dilation=dil)
        if any(d != 1 for d in dil):
            raise UntrainableError(f"AveragePool {n.name!r}: dilations are not converted")
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        if not any(pads):
            return fn(x, kernel, strides)
        if int(a.get("count_include_pad", 0)):
            return fn(F.pad(x, _pads(pads, nd)), kernel, strides)
        ones = F.pad(torch.ones_like(x[:1, :1]), _pads(pads, nd))
        return fn(F.pad(x, _pads(pads, nd)), kernel, strides) / fn(ones, kernel, strides)
    return run


def _batchnorm(n, a, x, scale, bias, mean, var):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + float(a.get("epsilon", 1e-5)))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _layernorm(n, a, x, scale, bias=None):
    axis = int(a.get("axis", -1)) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(a.get("epsilon", 1e-5))) * scale
    return y if bias is None else y + bias


def _reshape(n, a, x, shape):
    target = [int(v) for v in shape.tolist()]
    if not int(a.get("allowzero", 0)):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _flatten(n, a, x):
    axis = int(a.get("axis", 1)) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _clip(n, a, x, lo=None, hi=None):
    lo = lo if lo is not None else a.get("min")
    hi = hi if hi is not None else a.get("max")
    return torch.clamp(x, min=lo, max=hi)


def _axes(n, a, inputs, index=1):
    if len(inputs) > index and inputs[index] is not None:
        return [int(v) for v in inputs[index].tolist()]
    return a.get("axes")


def _reduce_mean(n, a, x, axes=None):
    dims = _axes(n, a, [x, axes]) or list(range(x.dim()))
    return x.mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))


def _slice(n, a, x, starts, ends, axes=None, steps=None):
    axes = [int(v) for v in axes.tolist()] if axes is not None else list(range(len(starts)))
    steps = [int(v) for v in steps.tolist()] if steps is not None else [1] * len(axes)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts.tolist(), ends.tolist(), axes, steps):
        if st < 1:
            raise UntrainableError(f"Slice {n.name!r}: negative steps are not converted")
        size = x.shape[ax]
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[ax] = slice(s, e, st)
    return x[tuple(index)]


def _split(n, a, x, split=None):
    axis = int(a.get("axis", 0))
    if split is not None:
        sizes = [int(v) for v in split.tolist()]
    elif "split" in a:
        sizes = list(a["split"])
    else:
        parts = len(n.output)
        sizes = [math.ceil(x.shape[axis] / parts)] * parts
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, sizes, dim=axis))


def _reduce(kind):
    def run(n, a, x, axes=None):
        dims = _axes(n, a, [x, axes])
        if not dims:
            if int(a.get("noop_with_empty_axes", 0)):
                return x
            dims = list(range(x.dim()))
        keep = bool(a.get("keepdims", 1))
        if kind == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if kind == "max":
            return x.amax(dim=dims, keepdim=keep)
        if kind == "min":
            return x.amin(dim=dims, keepdim=keep)
        return torch.sqrt((x * x).sum(dim=dims, keepdim=keep))
    return run


def _fold(op, xs):
    """A variadic elementwise op (Max, Min) as pairwise broadcasting calls."""
    out = xs[0]
    for x in xs[1:]:
        out = op(out, x)
    return out


def _shape(n, a, x):
    dims = list(x.shape)
    start, end = int(a.get("start", 0)), a.get("end")
    return torch.tensor(dims[start:None if end is None else int(end)], dtype=torch.int64)


def _constant_of_shape(n, a, shape):
    value = a.get("value")
    fill = torch.from_numpy(np.array(numpy_helper.to_array(value), copy=True).reshape(-1)) if value is not None else (
        torch.zeros(1, dtype=torch.float32))
    return fill.expand(*[int(v) for v in shape.tolist()]).clone()


def _cumsum(n, a, x, axis):
    if int(a.get("exclusive", 0)) or int(a.get("reverse", 0)):
        raise UntrainableError(f"CumSum {n.name!r}: exclusive/reverse are not converted")
    return torch.cumsum(x, dim=int(axis.reshape(-1)[0]), dtype=x.dtype)


def _cast(n, a, x):
    to = int(a["to"])
    if to not in _DTYPES:
        raise UntrainableError(f"Cast {n.name!r}: to {onnx.TensorProto.DataType.Name(to)} is not converted")
    return x.to(_DTYPES[to])


def _expand(n, a, x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(int(v) for v in shape.tolist()))
    return x.expand(*target)


def _div(n, a, x, y):
    if torch.is_floating_point(x):
        return x / y
    return torch.div(x, y, rounding_mode="trunc")  # ONNX integer Div truncates


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
           onnx.TensorProto.BOOL: torch.bool}


def _softmax(n, a, x):
    return torch.softmax(x, dim=int(a.get("axis", -1)))


def _gather(n, a, x, idx):
    axis = int(a.get("axis", 0)) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))  # a 0-d index gives a 0-d result


def _pad(n, a, x, pads=None, value=None, axes=None):
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or axes is not None:
        raise UntrainableError(f"Pad {n.name!r}: only constant padding over every axis is converted")
    pads = [int(v) for v in (pads.tolist() if pads is not None else a.get("pads"))]
    v = float(value.item()) if value is not None and value.numel() else float(a.get("value", 0.0))
    return F.pad(x, _pads(pads, x.dim()), value=v)


def _unsqueeze(n, a, x, axes=None):
    out = x
    for ax in sorted(int(v) % (x.dim() + len(_axes(n, a, [x, axes]))) for v in _axes(n, a, [x, axes])):
        out = out.unsqueeze(ax)
    return out


def _squeeze(n, a, x, axes=None):
    dims = _axes(n, a, [x, axes])
    return x.squeeze() if dims is None else x.squeeze(tuple(d % x.dim() for d in dims))


OPS: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm,
    "MatMul": lambda n, a, x, y: x @ y,
    "Add": lambda n, a, x, y: x + y, "Sub": lambda n, a, x, y: x - y,
    "Mul": lambda n, a, x, y: x * y, "Div": _div,
    "Pow": lambda n, a, x, y: x ** y, "Sqrt": lambda n, a, x: torch.sqrt(x), "Neg": lambda n, a, x: -x,
    "Relu": lambda n, a, x: torch.relu(x), "Sigmoid": lambda n, a, x: torch.sigmoid(x),
    "Tanh": lambda n, a, x: torch.tanh(x), "Erf": lambda n, a, x: torch.erf(x), "Exp": lambda n, a, x: torch.exp(x),
    "LeakyRelu": lambda n, a, x: F.leaky_relu(x, float(a.get("alpha", 0.01))),
    "HardSigmoid": lambda n, a, x: torch.clamp(float(a.get("alpha", 0.2)) * x + float(a.get("beta", 0.5)), 0.0, 1.0),
    "HardSwish": lambda n, a, x: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),
    "Clip": _clip, "Softmax": _softmax,
    "Identity": lambda n, a, x: x, "Dropout": lambda n, a, x, *rest: x,
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda n, a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, a, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": _flatten, "Reshape": _reshape,
    "Transpose": lambda n, a, x: x.permute(*(a.get("perm") or reversed(range(x.dim())))),
    "Concat": lambda n, a, *xs: torch.cat(xs, dim=int(a["axis"])),
    "Split": _split, "Slice": _slice, "Gather": _gather, "Pad": _pad,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "ReduceMean": _reduce_mean,
    "ReduceSum": _reduce("sum"), "ReduceL2": _reduce("l2"), "ReduceMax": _reduce("max"), "ReduceMin": _reduce("min"),
    "Max": lambda n, a, *xs: _fold(torch.maximum, xs), "Min": lambda n, a, *xs: _fold(torch.minimum, xs),
    "Reciprocal": lambda n, a, x: torch.reciprocal(x),
    "Equal": lambda n, a, x, y: torch.eq(x, y), "Greater": lambda n, a, x, y: torch.gt(x, y),
    "Less": lambda n, a, x, y: torch.lt(x, y), "Not": lambda n, a, x: torch.logical_not(x),
    "Where": lambda n, a, c, x, y: torch.where(c, x, y),
    "Shape": _shape, "ConstantOfShape": _constant_of_shape, "CumSum": _cumsum, "Cast": _cast, "Expand": _expand,
}
# Inputs that must be constants for the conversion (shapes, axes, indices of data-movement ops).
# A Reshape/Expand/ConstantOfShape target may be computed at run time (Shape → Gather → Concat, as
# exporters write them): those chains are integer ops on shapes and run here as they do in onnxruntime.
CONSTANT_INPUTS = {"Slice": (1, 2, 3, 4), "Split": (1,), "Pad": (1, 2, 3), "Unsqueeze": (1,),
                   "Squeeze": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceL2": (1,), "ReduceMax": (1,),
                   "ReduceMin": (1,), "CumSum": (1,),
                   "Clip": (1, 2)}


class TorchGraph(torch.nn.Module):
    """The main graph of `model` as a torch module: ``forward(**inputs) -> {name: tensor}``."""

    def __init__(self, model: onnx.ModelProto, trainable: set[str] | None = None, keep: tuple[str, ...] = ()):
        super().__init__()
        graph = model.graph
        self.nodes = list(graph.node)
        self.inputs = [i.name for i in graph.input]
        self.outputs = [o.name for o in graph.output]
        self.keep = tuple(keep)
        consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self._check(consts)
        trainable = trainable if trainable is not None else self.layer_weights(model)
        self.params = torch.nn.ParameterDict()
        self.fixed: dict[str, torch.Tensor] = {}
        self.keys: dict[str, str] = {}
        for name, value in consts.items():
            tensor = torch.from_numpy(np.array(value, copy=True))
            if name in trainable and np.issubdtype(value.dtype, np.floating):
                key = f"p{len(self.keys)}"
                self.keys[name] = key
                self.params[key] = torch.nn.Parameter(tensor)
            else:
                self.fixed[name] = tensor

    @staticmethod
    def layer_weights(model: onnx.ModelProto) -> set[str]:
        """Float initializers that layers (Conv, Gemm, MatMul, normalizations, bias Adds) read.
        A single-element constant is not a layer's weight (GELU's 0.5, an attention scale, a mask
        value; often one tensor shared by every layer after `simplify` merges duplicates): it stays fixed."""
        inits = {t.name for t in model.graph.initializer
                 if t.data_type in (onnx.TensorProto.FLOAT,) and int(np.prod(t.dims)) > 1}
        out = set()
        for n in model.graph.node:
            for i in LAYER_WEIGHTS.get(n.op_type, ()):
                if i < len(n.input) and n.input[i] in inits:
                    out.add(n.input[i])
        return out

    def _check(self, consts: dict[str, np.ndarray]) -> None:
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            if node.op_type not in OPS:
                raise UntrainableError(f"op {node.op_type} (node {node.name!r}) cannot be trained: the torch "
                                       "conversion does not implement it")
            if node.domain not in ("", "ai.onnx"):
                raise UntrainableError(f"node {node.name!r} is in domain {node.domain!r}: not converted")
            if subgraphs(node):
                raise UntrainableError(f"node {node.name!r} has a subgraph: not converted")
            for i in CONSTANT_INPUTS.get(node.op_type, ()):
                if i < len(node.input) and node.input[i] and node.input[i] not in consts:
                    raise UntrainableError(f"{node.op_type} {node.name!r}: input {i} must be a constant to be converted")

    def value(self, name: str) -> torch.Tensor:
        return self.params[self.keys[name]] if name in self.keys else self.fixed[name]

    def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        env = self.run(range(len(self.nodes)), dict(feeds))
        return {k: env[k] for k in (*self.outputs, *self.keep) if k in env}

    def run(self, indices, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the nodes at `indices` (in graph order) on `env` (tensor name → value), adding their outputs."""
        for index in indices:
            node = self.nodes[index]
            if node.op_type == "Constant":
                continue
            args = [None if not i else (env[i] if i in env else self.value(i)) for i in node.input]
            while args and args[-1] is None:
                args.pop()
            out = OPS[node.op_type](node, _attrs(node), *args)
            outs = out if isinstance(out, tuple) else (out,)
            for name, v in zip(node.output, outs):
                if name:
                    env[name] = v
        return env

    def state(self) -> dict[str, np.ndarray]:
        return {name: self.params[key].detach().cpu().numpy() for name, key in self.keys.items()}

    def check(self, feed: dict[str, np.ndarray], expected: list[np.ndarray], *, rtol: float = 1e-3) -> None:
        """Refuse a conversion that does not reproduce onnxruntime's outputs on `feed`."""
        with torch.no_grad():
            got = self(**{k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()})
        for name, ref in zip(self.outputs, expected):
            out = got[name].cpu().numpy()
            scale = max(float(np.max(np.abs(ref))), 1e-6)
            err = float(np.max(np.abs(out.astype(np.float64) - ref))) / scale if ref.size else 0.0
            if out.shape != ref.shape or not err <= rtol:
                raise UntrainableError(f"the torch conversion does not reproduce output {name!r} "
                                       f"(max relative difference {err:.2g} > {rtol:g}); not trained")
