"""Bias correction of the quantize pass (``bias_correction=True``): the output shift of weight rounding, removed.

A layer ``y = W·x + b`` with weights rounded to ``Wq`` computes ``y + (Wq − W)·x``. Over the
data, its expected output moves by ``E[(Wq − W)·x] = (Wq − W)·E[x]``, the same on every sample:
rounding that leans one way in a channel (few weights, a coarse grid) shifts that channel's
mean, and the layers after it see a biased input (Nagel et al. 2019, section 4.3, empirical
variant). The correction subtracts that shift from the bias before it is quantized:

    b' = b − (Wq − W)·E[x]

per output channel, with ``E[x]`` the mean of each input channel on the calibration data (its
first `MEAN_SAMPLES` samples), from the float model (one streaming run, reduced inside
onnxruntime: `graph_opt.intermediates.channel_means`).

- Conv: ``Δb[o] = Σ_{j,k} (Wq − W)[o, j, k] · f[k] · E[x[g(o)·I/g + j]]`` (j the input channel
  within the group of o, k the kernel taps), where ``f[k]`` is the share of output positions at
  which tap k reads inside the input rather than the zero padding (from the input's spatial size,
  pads, strides and dilations; 1 for every tap of an unpadded conv). The correction is then exact
  for the output's mean over all positions when each channel's mean is the same at every
  position; it is the border taps' share too small in the interior and too large at the border
  otherwise (on small feature maps, where most taps of a 5×5 kernel can fall on padding, this
  matters: without ``f`` the correction is too large there).
- Gemm (``transA`` 0, ``alpha`` and ``beta`` 1): ``Δb[n] = Σ_k (Wq − W)[k, n] · E[x[k]]`` (rows of
  B per ``transB``).
- Only layers whose activations are quantized (their bias becomes int32) are corrected; a layer
  without a bias gets one (`with_zero_biases`, zeros before the correction) when the option is on
  and calibration data is given (one the plan then keeps float or weight-only keeps its float
  zero bias: the same function). MatMul (its bias is a separate Add) is not corrected.

Exact elsewhere: a layer whose weights are on the grid has ``Wq = W`` and keeps its bias.

Off by default: the shift is that of the weights alone, measured on the float model's inputs;
the quantized model's layers also see rounded, clipped inputs, whose mean error this does not
correct (``reconstruct`` corrects biases along the chain, on the quantized model). Measured:
benchmarks/RESULTS.md, "Cross-layer equalization and bias correction" (`bench_equalize.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from graph_opt.data import Dataset
from graph_opt.intermediates import ChannelMean, channel_means
from graph_opt.kernels.quant import dequantize
from graph_opt.model_io import copy_model
from graph_opt.onnx_util import Namer, attr
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._qplan import TensorQuant
from graph_opt.passes.quantize.layers import Layer

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize

# The samples the channel means are taken over (at most): a mean over every position of this many
# samples is stable, and the run costs what a calibration run over them costs.
MEAN_SAMPLES = 64


def _correctable(ix: GraphIndex, idx: int) -> bool:
    node = ix.nodes[idx]
    if node.op_type == "Gemm":
        return not any(attr(node, a, d) != d for a, d in (("transA", 0), ("alpha", 1.0), ("beta", 1.0)))
    return node.op_type == "Conv"


def with_zero_biases(model: onnx.ModelProto, opts: Quantize) -> onnx.ModelProto:
    """`model`, or a copy where each Conv/Gemm of ``op_types`` with a private float32 constant
    weight and no bias reads a new zero bias (the same function), so that a correction has a bias
    to go to."""
    ix = GraphIndex(model)
    todo: list[tuple[int, int]] = []
    for idx, node in enumerate(ix.nodes):
        if node.op_type not in ("Conv", "Gemm") or node.op_type not in opts.op_types or len(node.input) < 2:
            continue
        if len(node.input) > 2 and node.input[2]:
            continue
        w = node.input[1]
        if (w not in ix.inits or ix.const_dtype(w) != TensorProto.FLOAT or len(ix.readers(w)) != 1
                or not _correctable(ix, idx)):
            continue
        dims = tuple(ix.inits[w].dims)
        if node.op_type == "Conv" and len(dims) >= 3:
            todo.append((idx, dims[0]))
        elif node.op_type == "Gemm" and len(dims) == 2:
            todo.append((idx, dims[0] if attr(node, "transB", 0) else dims[1]))
    if not todo:
        return model
    out = copy_model(model)
    namer = Namer(out.graph)
    for idx, n in todo:
        node = out.graph.node[idx]
        name = namer(f"{ix.labels[idx]}.bias_correction")
        out.graph.initializer.append(numpy_helper.from_array(np.zeros(n, np.float32), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return out


def attach_means(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], candidates: set[int],
                 data: Dataset | None, opts: Quantize, notes: list[str]) -> None:
    """Attach the mean of each input channel (``layer.input_mean``) to the Conv/Gemm candidates
    for quantized activations whose bias can become int32, from one streaming run over `data`."""
    if data is None:
        notes.append("bias_correction without calibration data: biases not corrected")
        return
    wanted = {idx: lay for idx, lay in layers.items()
              if idx in candidates and lay.bv is not None and lay.op in ("Conv", "Gemm") and _correctable(ix, idx)}
    channels = {}
    for lay in wanted.values():
        w = lay.wv
        c = w.shape[1] * int(attr(ix.nodes[lay.idx], "group", 1)) if lay.op == "Conv" else w.shape[lay.red_axis]
        channels[lay.x] = c
    n = min(len(data), opts.max_samples, MEAN_SAMPLES)
    means = channel_means(model, data.take(n), channels, threads=opts.threads)
    for lay in wanted.values():
        m = means.get(lay.x)
        if m is None:
            continue
        if lay.op == "Gemm":
            lay.input_mean = m.mean
            continue
        f = tap_shares(ix.nodes[lay.idx], m, lay.wv.shape[2:])
        if f is not None:
            lay.input_mean = m.mean.reshape((-1,) + (1,) * f.ndim) * f
    done = sum(lay.input_mean is not None for lay in wanted.values())
    notes.append(f"bias_correction: input channel means of {done} layers from {n} samples; biases corrected "
                 "by (Wq − W)·E[x] where the layer's activations are quantized")


def _shares_1d(size: int, k: int, stride: int, dilation: int, before: int, after: int) -> np.ndarray:
    """Per tap of a 1-D kernel: the share of output positions at which it reads inside the input."""
    span = (k - 1) * dilation + 1
    out = (size + before + after - span) // stride + 1
    if out < 1:
        return np.zeros(k)
    starts = np.arange(out) * stride - before
    idx = starts[:, None] + np.arange(k)[None, :] * dilation
    return ((idx >= 0) & (idx < size)).mean(axis=0)


def tap_shares(node: onnx.NodeProto, m: ChannelMean, kernel: tuple[int, ...]) -> np.ndarray | None:
    """The share of output positions at which each tap of a Conv reads inside its input (shape
    `kernel`), from the input's spatial size and the Conv's pads, strides, dilations and
    auto_pad; None when the input's positions do not match the kernel's rank."""
    spatial = m.shape[2:]
    n = len(kernel)
    if len(spatial) != n:
        return None
    strides = list(attr(node, "strides", [1] * n))
    dilations = list(attr(node, "dilations", [1] * n))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    pads = list(attr(node, "pads", [0] * 2 * n))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for d in range(n):
            total = max((-(-spatial[d] // strides[d]) - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1
                        - spatial[d], 0)
            small = total // 2
            pads[d], pads[d + n] = (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    elif auto == "VALID":
        pads = [0] * 2 * n
    f = np.ones(())
    for d in range(n):
        f = np.multiply.outer(f, _shares_1d(spatial[d], kernel[d], strides[d], dilations[d], pads[d], pads[d + n]))
    return f


def shift(layer: Layer, wq: TensorQuant) -> np.ndarray | None:
    """``(Wq − W)·E[x]`` per output channel (float64), or None without the input means."""
    if layer.input_mean is None or wq.codes is None or wq.scheme != "affine":
        return None
    w = layer.wv.astype(np.float64)
    dw = dequantize(wq.codes, wq.params()).astype(np.float64) - w
    m = layer.input_mean
    if layer.op == "Conv":  # m: E[x] per input channel and tap, the tap's share of positions applied
        o, per = dw.shape[0], dw.shape[1]
        groups = m.shape[0] // per
        dw = dw.reshape(groups, o // groups, per, -1)
        return np.einsum("gojk,gjk->go", dw, m.reshape(groups, per, -1)).reshape(o)
    return np.tensordot(dw, m, axes=([layer.red_axis], [0]))


def corrected(layer: Layer, wq: TensorQuant) -> np.ndarray:
    """The layer's float bias less the expected shift of its rounded weights (the bias as it is
    without input means)."""
    delta = shift(layer, wq)
    if delta is None:
        return layer.bv
    return (layer.bv.astype(np.float64) - delta.reshape(layer.bv.shape)).astype(np.float32)
