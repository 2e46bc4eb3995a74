"""Layer matching for the quantize pass (pure: nothing here edits the graph).

A layer is a Conv, Gemm or MatMul (``op_types``) whose weight is a constant float32 tensor read
by that node alone. `match_layer` returns the `Layer` (weight, its output-channel and reduction
axes, the bias when it can become int32, else why not) or the reason the node is skipped:
already quantized (an input from DequantizeLinear, an output into QuantizeLinear); no weight
input; MatMul with the constant on the left, two activation operands or two constants; weight
not a constant, not float32, non-finite, shared, 1-D (MatMul) or of the wrong rank; input a
constant. `match_layers` walks the main graph and adds the node-level skips: quantized ops,
control-flow nodes whose subgraphs hold layers, op types outside ``op_types`` and
``exclude``/``keep_float`` patterns.

`float_on_input` keeps a Conv on a graph input float where int8 cannot pay (see its docstring).
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto

from graph_opt.onnx_util import attr, subgraphs
from graph_opt.passes._graph import LAYER_OPS, GraphIndex, all_nodes
from graph_opt.passes._qplan import NodeDecision
from graph_opt.passes.quantize.ops import QUANTIZED_OPS

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize


# A Conv on the graph input with fewer products per output than this, or with input channels per
# group not a multiple of INT8_CHANNEL_PACK, stays float (see `float_on_input`).
MIN_INT8_REDUCTION = 16
INT8_CHANNEL_PACK = 4


def matching_pattern(patterns: Iterable[str], *names: str) -> str | None:
    """The first of `patterns` (fnmatch, case-sensitive) that one of `names` matches, else None."""
    for p in patterns:
        for n in names:
            if n and fnmatch.fnmatchcase(n, p):
                return p
    return None


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports (1 when it imports none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


@dataclass
class Layer:
    """A Conv/Gemm/MatMul with a constant weight that the pass can quantize."""

    idx: int
    label: str
    op: str
    x: str
    w: str
    weight: np.ndarray | Callable[[], np.ndarray]  # the array, or how to read it (a weight kept on disk)
    axis: int          # output-channel axis of the weight
    red_axis: int      # reduction axis (blocks run along it)
    b: str | None = None
    bv: np.ndarray | None = None
    bias_float: str = ""  # why the bias cannot become int32 ('' when it can)
    hessian: np.ndarray | None = None  # E[x xᵀ] of the input features (rounding=gptq)
    aim: np.ndarray | None = None  # the weight GPTQ's codes aim at when not the weight itself (`chain`)
    input_mean: np.ndarray | None = None  # E[x] per input channel, (Cin, *kernel) for a Conv (bias_correction)
    gptq: tuple[np.ndarray, Any] | None = None  # block-wise codes and QuantParams solved by GPTQ

    @property
    def wv(self) -> np.ndarray:
        return self.weight() if callable(self.weight) else self.weight


def match_layer(ix: GraphIndex, idx: int) -> Layer | str:
    """The layer when quantizable, else the reason it is not (pure: no edits)."""
    node = ix.nodes[idx]
    op = node.op_type
    ins = list(node.input)
    for name in ins:
        if ix.producer_op(name) == "DequantizeLinear":
            return f"already quantized: input {name!r} comes from DequantizeLinear (never quantized twice)"
    for out in node.output:
        if any(ix.nodes[r].op_type == "QuantizeLinear" for r, _ in ix.readers(out)):
            return "already quantized: its output feeds QuantizeLinear (never quantized twice)"
    if len(ins) < 2:
        return f"{op} without a weight input"
    x, w = ins[0], ins[1]
    if op == "MatMul":
        xc, wc = ix.is_const(x), ix.is_const(w)
        if xc and not wc:
            return "the constant is the left operand (W @ x); only x @ W is quantized"
        if not xc and not wc:
            return "both operands are activations (e.g. attention scores); kept float"
        if xc and wc:
            return "both operands are constants"
    elif not ix.is_const(w):
        return "weight is not a constant"
    if ix.is_const(x):
        return "input is a constant"
    if ix.const_dtype(w) != TensorProto.FLOAT:
        return f"weight is {TensorProto.DataType.Name(ix.const_dtype(w) or 0)}, only FLOAT weights are quantized"
    wv = ix.const(w)
    if wv is None:
        return "weight is not a constant"
    if not np.all(np.isfinite(wv)):
        return "weight contains NaN or inf"
    if len(ix.readers(w)) != 1:
        return f"weight {w!r} is shared with another node"
    if op == "Conv":
        if wv.ndim < 3:
            return f"Conv weight has rank {wv.ndim}"
        axis, red = 0, 1
    elif op == "Gemm":
        if wv.ndim != 2:
            return "Gemm weight is not 2-D"
        trans_b = attr(node, "transB", 0)
        axis, red = (0, 1) if trans_b else (1, 0)
    else:
        if wv.ndim < 2:
            return "1-D weight (matrix-vector product)"
        axis, red = wv.ndim - 1, wv.ndim - 2
    # a weight kept on disk is read again when needed: a model over 2 GB never has all of them in memory
    layer = Layer(idx, ix.labels[idx], op, x, w, functools.partial(ix.const, w) if ix.on_disk(w) else wv, axis, red)
    bias = ins[2] if op in ("Conv", "Gemm") and len(ins) > 2 and ins[2] else None
    if bias is not None:
        layer.b = bias
        n_out = wv.shape[axis]
        bv = ix.const(bias)
        if bv is None or ix.const_dtype(bias) != TensorProto.FLOAT:
            layer.bias_float = "bias is not a float constant"
        elif len(ix.readers(bias)) != 1:
            layer.bias_float = "bias is shared with another node"
        elif not np.all(np.isfinite(bv)):
            layer.bias_float = "bias contains NaN or inf"
        elif op == "Conv" and bv.shape != (n_out,):
            layer.bias_float = f"bias shape {bv.shape} is not ({n_out},)"
        elif op == "Gemm" and (bv.shape not in ((n_out,), (1, n_out))):
            layer.bias_float = f"Gemm C of shape {bv.shape} is not one value per output column"
        elif op == "Gemm" and (attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0):
            layer.bias_float = "Gemm alpha or beta is not 1"
        else:
            layer.bv = bv
    return layer


def _subgraph_layers(node: onnx.NodeProto) -> int:
    """How many layers the subgraphs of a control-flow node hold (those stay float)."""
    return sum(n.op_type in LAYER_OPS for sub in subgraphs(node) for n in all_nodes(sub))


def excluded(ix: GraphIndex, idx: int, opts: Quantize) -> str | None:
    """The ``exclude``/``keep_float`` pattern node `idx` matches (op type, name or label), else None."""
    node = ix.nodes[idx]
    return (matching_pattern(opts.exclude, node.op_type, node.name, ix.labels[idx])
            or matching_pattern(opts.keep_float, node.name, ix.labels[idx]))


def float_on_input(ix: GraphIndex, layer: Layer) -> str:
    """Why a Conv reading a graph input stays float ('' when it does not). Its input is float
    anyway, so float costs no QDQ there, while int8 needs the input's own QuantizeLinear and:

    - with a reduction of fewer than `MIN_INT8_REDUCTION` products per output (a 3×3 stem on one
      channel: 9) gains nothing on the arithmetic;
    - with input channels per group that are not a multiple of `INT8_CHANNEL_PACK` (an RGB image's
      3) misses onnxruntime's fast symmetric int8 convolution, which packs input channels in fours
      (MLAS ``MlasConvSymPackWSize``), and runs its generic int8 kernel, slower than float
      (docs/design.md, fact 5). A depthwise Conv (one input channel per group) has a fast kernel
      of its own.
    """
    if layer.op != "Conv" or layer.x not in ix.graph_inputs:
        return ""
    shape = layer.wv.shape
    k = int(np.prod(shape[1:]))
    if k < MIN_INT8_REDUCTION:
        return (f"float: reduction of {k} < {MIN_INT8_REDUCTION} products per output on the graph input "
                "(int8 gains nothing there and the input would need its own QuantizeLinear)")
    depthwise = shape[1] == 1 and attr(ix.nodes[layer.idx], "group", 1) > 1
    if shape[1] % INT8_CHANNEL_PACK and not depthwise:
        return (f"float: {shape[1]} input channels per group on the graph input, not a multiple of "
                f"{INT8_CHANNEL_PACK} (onnxruntime's fast int8 convolution takes them in fours; its generic "
                "kernel is slower than float there, and the input would need its own QuantizeLinear)")
    return ""


def match_layers(ix: GraphIndex, opts: Quantize) -> tuple[list[NodeDecision], dict[int, Layer], int]:
    """The quantizable layers of the main graph by node index, the decisions of the nodes skipped
    (with the reason), and the number of QuantizeLinear/DequantizeLinear nodes already there."""
    decisions: list[NodeDecision] = []
    layers: dict[int, Layer] = {}
    n_qdq = 0
    for idx, node in enumerate(ix.nodes):
        op, label = node.op_type, ix.labels[idx]
        if op in ("QuantizeLinear", "DequantizeLinear"):
            n_qdq += 1
            continue
        if op in QUANTIZED_OPS or op.startswith("QLinear"):
            decisions.append(NodeDecision(label, op, "skip", f"already quantized ({op}); never quantized twice"))
            continue
        inner = _subgraph_layers(node)
        if inner:
            decisions.append(NodeDecision(label, op, "skip", f"{inner} Conv/Gemm/MatMul inside its subgraphs left "
                                                           "in float (subgraphs are not quantized)"))
            continue
        if op not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if op not in opts.op_types:
            decisions.append(NodeDecision(label, op, "skip", f"op type {op} not in op_types"))
            continue
        pattern = excluded(ix, idx, opts)
        if pattern:
            decisions.append(NodeDecision(label, op, "float", f"matches exclude/keep_float pattern {pattern!r}"))
            continue
        match = match_layer(ix, idx)
        if isinstance(match, str):
            decisions.append(NodeDecision(label, op, "skip", match))
            continue
        layers[idx] = match
    return decisions, layers, n_qdq


def rematch_layers(ix: GraphIndex, opts: Quantize) -> dict[int, Layer]:
    """The layers of a model whose opset was upgraded (its node indices and decisions otherwise
    those `match_layers` gave before the upgrade)."""
    layers: dict[int, Layer] = {}
    for idx in range(len(ix.nodes)):
        if ix.nodes[idx].op_type in opts.op_types and not excluded(ix, idx, opts):
            match = match_layer(ix, idx)
            if not isinstance(match, str):
                layers[idx] = match
    return layers
