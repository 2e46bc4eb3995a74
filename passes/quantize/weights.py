"""Weights and biases of the quantize pass: the integer codes and their parameters, per layer.

Numerics (`graph_opt.kernels.quant`): ``q = saturate(round(x/s) + z)``, ``x̂ = (q − z)·s``.

- Weights ``int8|uint8|int4``: symmetric, per output channel (Conv axis 0; Gemm 0 if transB else
  1; MatMul the last axis) or per tensor; a batched MatMul weight with quantized activations is
  per tensor (onnxruntime's fused kernels reject per-column scales there). ``block_size`` > 0:
  blocks along the reduction axis; int4 MatMul/Gemm default to blocks of `INT4_AUTO_BLOCK`
  (weight-only).
- ``reduce_range`` (int8 weights with quantized activations): a 7-bit grid, codes within
  [-64, 63], the int8 parameters of a range widened so that the step doubles.
- ``rounding=gptq`` (``auto``: for unblocked 8-bit weights with data): the codes of 2-D
  Gemm/MatMul weights and of 1×1 Convs of one group (a Gemm over the channels at every
  position; the second moment over channels, axis 1) follow the data
  (`kernels.quant.gptq_quantize`): each input column's rounding error is spread over the columns
  not yet rounded through the inverse of the layer's input second moment, measured on the float
  model's activations, or with ``chain`` on the model quantized before the layer (`chain`: the
  second moment of the input it really gets, and ``layer.aim``, the weight that also corrects the
  error in that input, within `AIM_STEPS` grid steps of the weight, rounded instead of it). Same grid, codes inside the
  limits nearest rounding can reach (`_code_limits`). Block-wise weights (int4) are solved by
  `gptq.solve_blocked` instead: per-block scales chosen as the feedback proceeds (the grid then
  differs from nearest rounding's), streamed one layer input at a time.
- ``ternary`` (TWN: ``Δ = 0.7·mean|w|``, codes ``sign(w)·[|w| > Δ]``, ``α = mean(|w| : |w| > Δ)``)
  and ``binary`` (``sign(w)``, ``α = mean|w|``): int2 codes with α per channel as the scale.
- Bias of a layer with a quantized input: int32 with ``s_b = s_x·s_w``, zero point 0; kept float
  when a code would overflow int32 (and for the reasons `layers.match_layer` records); with
  ``bias_correction``, less the expected output shift of the rounded weight (`bias`).

Error per element: a weight by s/2 (ternary/binary: |w − α·code|, large by design), a bias by
s_x·s_w/2. A weight already on the grid comes back exactly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx

from graph_opt.data import Dataset
from graph_opt.intermediates import second_moments
from graph_opt.kernels.quant import (
    MIN_SCALE,
    QuantParams,
    binary_weights,
    blockwise_params,
    compute_params,
    gptq_quantize,
    qrange,
    quantize,
    symmetric_steps,
    ternary_weights,
)
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._qplan import TensorQuant
from graph_opt.passes.quantize.gptq import solve_blocked
from graph_opt.onnx_util import attr
from graph_opt.passes.quantize.bias import corrected
from graph_opt.passes.quantize.layers import Layer

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize
    from graph_opt.passes.quantize.placement import Placement


INT4_AUTO_BLOCK = 128
_INT32_MAX = 2**31 - 1


def block_for(layer: Layer, opts: Quantize) -> int:
    if opts.block_size is not None:
        return opts.block_size
    if opts.weights == "int4" and layer.op in ("MatMul", "Gemm"):
        return INT4_AUTO_BLOCK
    return 0


def _reduced_params(w: np.ndarray, axis: int | None, symmetric: bool) -> QuantParams:
    """int8 params on a 7-bit grid (codes within [-64, 63]): the int8 params of a range widened so
    that the grid step doubles (see `reduce_range` in the module docstring)."""
    others = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    lo = np.minimum(np.min(w, axis=others), 0.0).astype(np.float64)
    hi = np.maximum(np.max(w, axis=others), 0.0).astype(np.float64)
    if symmetric:
        amax = np.maximum(-lo, hi) * (symmetric_steps("int8") / 63.0)
        lo, hi = -amax, amax
    else:
        pad = (hi - lo) * (64.0 / 127.0)
        lo, hi = lo - pad, hi + pad
    return compute_params((lo, hi), "int8", symmetric=symmetric, axis=axis)


def _quantize_weight(layer: Layer, opts: Quantize, static: bool) -> TensorQuant:
    w = layer.wv
    shape = tuple(int(d) for d in w.shape)
    if opts.weights in ("ternary", "binary"):
        codes, p = (ternary_weights if opts.weights == "ternary" else binary_weights)(w, layer.axis)
        return TensorQuant.from_params(layer.w, "weight", p, scheme=opts.weights, shape=shape, codes=codes)
    dtype = opts.weights
    block = block_for(layer, opts)
    if block > 0:
        p = blockwise_params(w, block, layer.red_axis, dtype, symmetric=opts.symmetric)
    else:
        axis = layer.axis if opts.per_channel else None
        if static and layer.op == "MatMul" and w.ndim > 2:
            # A 1-D per-column scale on a batched weight makes onnxruntime's fused MatMulIntegerToFloat /
            # QLinearMatMul fail at run time (its B zero point must be per [.., 1, N] slice): per tensor.
            axis = None
        if static and dtype == "int8" and opts.weights_reduced:
            p = _reduced_params(w, axis, opts.symmetric)
        else:
            p = compute_params(w, dtype, symmetric=opts.symmetric, axis=axis)
    if block > 0 and layer.gptq is not None:  # solved against the data with its own block scales
        codes, p = layer.gptq
        return TensorQuant.from_params(layer.w, "weight", p, shape=shape, codes=codes)
    codes = quantize(w, p)
    if layer.hessian is not None and (w.ndim == 2 or _pointwise(layer)):
        reduced = static and dtype == "int8" and opts.weights_reduced and block == 0
        limits = _code_limits(dtype, opts.symmetric, reduced)
        aim = w if layer.aim is None else _bounded_aim(w, layer.aim, p)  # chained: also corrects its input's error
        if w.ndim == 2:
            codes = gptq_quantize(aim, p, layer.hessian, layer.red_axis, limits=limits)
        else:  # a 1×1 Conv is a Gemm over its channels at every position: (out, in) and back
            flat = aim.reshape(w.shape[0], w.shape[1])
            pf = p if p.axis is None else dataclasses.replace(p, axis=0)
            codes = gptq_quantize(flat, pf, layer.hessian, 1, limits=limits).reshape(w.shape)
    return TensorQuant.from_params(layer.w, "weight", p, shape=shape, codes=codes)


# How far, in grid steps, a chained aim may move a weight before it is rounded (`chain`). The
# correction is a least-squares fit of the layer's output, weighted by energy like every output
# MSE: unbounded, it moved some of YOLOv8n's weights by 30% and cost top-class agreement that the
# bounded one keeps (benchmarks/RESULTS.md, "Chained GPTQ rounding").
AIM_STEPS = 1.0


def _bounded_aim(w: np.ndarray, aim: np.ndarray, p: QuantParams) -> np.ndarray:
    """The chained aim clipped to within `AIM_STEPS` grid steps of the weight, per element."""
    s = np.asarray(p.scale, dtype=np.float32)
    if p.axis is not None and s.ndim == 1:
        s = np.expand_dims(s, tuple(i for i in range(w.ndim) if i != p.axis))
    return np.clip(aim, w - AIM_STEPS * s, w + AIM_STEPS * s)


def _code_limits(dtype: str, symmetric: bool, reduced: bool) -> tuple[int, int]:
    """The codes nearest rounding can produce on the grid: GPTQ's feedback stays inside them."""
    if reduced:
        return (-63, 63) if symmetric else (-64, 63)
    lo, hi = qrange(dtype)
    if not symmetric:
        return lo, hi
    k = symmetric_steps(dtype)
    zero = 0 if lo < 0 else (hi + 1) // 2
    return zero - k, zero + k


def attach_hessians(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], data: Dataset | None,
              notes: list[str], opts: Quantize, moments=second_moments) -> None:
    """rounding=gptq: attach each 2-D Gemm/MatMul weight's input second moment, from the float
    model's activations on the calibration data (``chain`` replaces them later, `chain.rechain`).
    Block-wise weights are solved here, one input at a time (`gptq.solve_blocked`: codes and
    per-block scales on ``layer.gptq``), so no second moment is held for them."""
    blocked = {i: lay for i, lay in layers.items() if block_for(lay, opts) > 0}
    if blocked:
        solve_blocked(model, ix, blocked, data, opts, lambda lay: block_for(lay, opts),
                      _code_limits(opts.weights, opts.symmetric, False), notes)
    layers = {i: lay for i, lay in layers.items() if i not in blocked}
    if not layers:
        return
    if data is None:
        notes.append("rounding=gptq without calibration data: weights rounded to nearest")
        return
    requests = {}
    for idx, layer in layers.items():
        if layer.op in ("Gemm", "MatMul") and layer.wv.ndim == 2:
            trans_a = attr(ix.nodes[idx], "transA", 0) if layer.op == "Gemm" else 0
            requests[idx] = (layer.x, 0 if trans_a else -1)
        elif _pointwise(layer, ix.nodes[idx]):
            requests[idx] = (layer.x, 1)
    grams = moments(model, data, set(requests.values()))  # `second_moments`, or a plan's shared ones
    done = 0
    for idx, key in requests.items():
        h = grams.get(key)
        if h is not None and h.shape[0] == layers[idx].wv.shape[layers[idx].red_axis]:
            layers[idx].hessian = h
            done += 1
    notes.append(f"rounding=gptq: {done} of {len(layers)} layers' weights rounded against their input statistics "
                 f"on {len(data)} samples (Gemm/MatMul with 2-D weights, 1×1 Convs of one group; the rest to nearest)")


def _pointwise(layer: Layer, node: onnx.NodeProto | None = None) -> bool:
    """A 1×1 Conv of one group: every output position is a Gemm over the input channels (so its
    GPTQ statistic is E[x xᵀ] over the channels, axis 1, at every position)."""
    w = layer.wv
    if layer.op != "Conv" or w.ndim < 3 or any(int(d) != 1 for d in w.shape[2:]):
        return False
    return node is None or attr(node, "group", 1) == 1


def _quantize_bias(layer: Layer, x_scale: np.ndarray, wq: TensorQuant) -> TensorQuant | str:
    """int32 bias with scale s_x·s_w (per channel when the weight is), or why it stays float;
    with ``bias_correction``, of the bias less its rounded weight's expected shift (`bias`)."""
    s = (np.float32(x_scale) * wq.scale).astype(np.float32)
    s = np.maximum(s, np.float32(MIN_SCALE))
    bv = corrected(layer, wq).astype(np.float64)
    flat = bv.reshape(-1)
    codes = np.rint(flat / (s.astype(np.float64) if s.ndim else float(s)))
    if np.any(np.abs(codes) > _INT32_MAX):
        return "bias / (s_x·s_w) overflows int32"
    axis = None if s.ndim == 0 else bv.ndim - 1
    return TensorQuant(layer.b, "bias", "int32", s, np.zeros(s.shape, np.int32), axis=axis, scheme="bias",
                       shape=tuple(int(d) for d in bv.shape), codes=codes.astype(np.int32).reshape(bv.shape))


def weights_and_biases(layers: dict[int, Layer], pl: Placement, opts: Quantize,
                        done: dict[tuple[int, bool], TensorQuant] | None = None):
    """The quantized weight and bias of each placed layer; `done` keeps the weights across calls
    (a weight depends only on its layer and on whether the layer's input is quantized)."""
    done = {} if done is None else done
    weights: dict[int, TensorQuant] = {}
    biases: dict[int, TensorQuant] = {}
    for idx, layer in layers.items():
        if idx not in pl.decisions:
            continue
        static = idx in pl.static
        if (idx, static) not in done:
            done[idx, static] = _quantize_weight(layer, opts, static)
        wq = weights[idx] = done[idx, static]
        if static and layer.bv is not None and wq.block_size is None:
            bq = _quantize_bias(layer, pl.acts[layer.x].scale, wq)
            if isinstance(bq, str):
                layer.bias_float = bq
            else:
                biases[idx] = bq
    return weights, biases
