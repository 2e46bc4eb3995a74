"""quantize: store weights as integers and run activations in int8, as onnxruntime fuses QDQ.

Before::

    x → Conv(W, b) → Relu → MaxPool → Flatten → Gemm(W2, b2) → y

After (static activations, the default when calibration data is given)::

    x → Q → DQ ─┐                                    (activation: uint8, own scale)
    Wq → DQ ────┼→ Conv → Relu → Q → DQ → MaxPool → Q → DQ → Flatten → Q → DQ ─┐
    bq → DQ ────┘     (Relu absorbed: one range [0, max] after it)    (shared scale)
                                                       W2q → DQ, b2q → DQ ─┴→ Gemm → y

onnxruntime (graph optimizations on) turns each such group into one integer kernel:
QLinearConv, QGemm, QLinearMatMul or MatMulIntegerToFloat, int8 MaxPool/Flatten/Reshape,
QLinearAdd/QLinearMul/QLinearConcat/QLinearGlobalAveragePool/QLinearAveragePool.

Plan, then apply
----------------
`make_plan` decides everything first — per tensor: dtype, scale, zero point, axis, block size,
and for activations the calibrated range (`passes._qplan.QuantPlan`, JSON-serializable; the report
carries it compactly) — and one step (`apply_plan`) inserts the nodes. Float weights are removed
from the model: the DequantizeLinear of a weight outputs the weight's old name, so the layer is
untouched and the file really shrinks.

Numerics (all from `graph_opt.kernels.quant`): ``q = saturate(round(x/s) + z)``, ``x̂ = (q − z)·s``.

- Weights, ``weights=int8|uint8|int4``: symmetric by default (``s = max|w|/k``, k = 127/7 steps),
  per output channel (``per_channel``) on the axis that indexes the layer's outputs — Conv: 0;
  Gemm: 0 if transB=1 else 1; MatMul ``x @ W`` with W of shape [..., K, N]: the last axis — or per
  tensor. Exception: a batched (3-D+) MatMul weight with quantized activations is per tensor,
  because onnxruntime's fused kernels reject a per-column scale on it at run time (the model
  loads, then the first run fails). Blocks (``block_size`` > 0) run along the reduction axis
  (MatMul and Gemm transB=0: 0, Gemm transB=1: 1, Conv: 1) with one scale per block per output
  channel. ``weights=int4`` on
  MatMul/Gemm uses blocks of 128 unless ``block_size`` says otherwise (0: per channel): the
  weight-only transformer recipe, DQ(int4, blocked, axis 0) → MatMul, which onnxruntime fuses
  into MatMulNBits.
- ``weights=ternary`` (TWN): per output channel ``Δ = 0.7·mean|w|``, codes ``sign(w)·[|w| > Δ]``,
  ``α = mean(|w| : |w| > Δ)``; ``weights=binary``: codes ``sign(w)``, ``α = mean|w|``. Both are
  stored as int2 codes with α as the DequantizeLinear scale, so the dequantized weight is exactly
  ``α·code`` (α in float32); ``per_channel`` does not apply (α is always per channel).
- Activations (static, ``activations=uint8|int8``): one asymmetric per-tensor scale from the range
  calibrated on ``ctx.data`` (``calibration``: minmax, percentile, entropy (KL) or mse, see
  `graph_opt.kernels.calib`). The range always contains 0, and a one-sided range [0, max] puts
  the zero point at qmin, which is what lets onnxruntime drop a Relu/Clip in front of the Q.
- Bias of a layer whose input and weight are quantized (int8/uint8, not blocked): int32 with
  ``s_b = s_x·s_w`` (per channel when the weight is), zero point 0 — the layout QLinearConv/QGemm
  take. Kept in float (the layer then runs as DQ → float op) when it would overflow int32, when
  Gemm has alpha ≠ 1 or beta ≠ 1, or when C is not one value per output column.
- ``reduce_range`` (default on): with quantized activations, int8 weights use a 7-bit grid
  (±63). Measured on an AVX2 CPU without VNNI (onnxruntime 1.32): full-range s8 weights with u8
  activations saturate inside the u8×s8 kernels (vpmaddubsw) — errors of up to 221 output steps
  in QLinearConv and 188 in QLinearMatMul that the verification harness (optimizations off) never
  sees; with 7-bit weights ≤ 1 step, at the same latency. uint8 weights (u8×u8) do not saturate.

Calibration is one streaming pass over the data (at most ``max_samples`` samples), batch by
batch; each batch updates one observer per tensor and is dropped, so memory is bounded by one
batch. The tensors are those the placement can ask a range for: a dry run of the placement on
stand-in ranges (every candidate calibrated, every Concat on one scale) asks for a superset of what
the real one asks, and the rest (a Gemm/MatMul output nothing quantized reads, an Add with no
quantized input) is not observed at all; the report's note gives both counts (bench_quantize's
MiniLM: most of its candidate tensors are skipped). The calibration model is a weightless copy of the model (onnxruntime gets the
weights as arrays, `verify.make_session`) with onnxruntime's graph optimizations on (float
kernels only; nothing observed is fused away): faster convolutions, whose results differ from the
unoptimized run in the last bits only. A minmax scale then moves in its last bits; a histogram
method's threshold can move more, because the KL minimum is flat (bench_quantize's fidelity
tables are what to read for the effect).

- minmax: the copy computes each tensor's ReduceMin, ReduceMax and Size itself, so three scalars
  per tensor leave onnxruntime instead of the tensor. A tensor whose range follows from observed
  ones is not reduced at all: ``[f(min), f(max)]`` of its input for a never-decreasing
  elementwise op (Relu, LeakyRelu, Clip with constant bounds, Sigmoid, Tanh), the input's own for
  an op that only moves values (Reshape, Flatten, Transpose …), the union of its inputs' for a
  Concat (a YOLOv8n's Sigmoid outputs and most of its Concats). Exact, but for Sigmoid and Tanh,
  which onnxruntime approximates: their derived bounds are the exact function's, and differ from
  onnxruntime's values by its approximation's error.
  onnxruntime skips a NaN that is not the first value it reduces, and its vectorized max can then
  miss values next to it, where MinMaxObserver keeps the min/max of the finite values: a batch
  whose reductions, or the sums of the model's float outputs, are not finite has every tensor
  fetched whole and observed exactly (the derived ranges come from the other batches).
- percentile, entropy, mse: the copy exposes every candidate tensor as an output and
  HistogramObserver takes them in numpy, in a second thread: one batch is observed while
  onnxruntime computes the next (each observer still sees its batches in order). numpy's bincount
  holds the GIL, so when observing the first batch takes longer than computing it again (a
  detector's many large activations; not a MiniLM's few), onnxruntime gets one core less for the
  rest of the pass. The
  ranges the placement asks for are then searched on every core at once (`_Ranges.prefetch`).
  A histogram pools every channel of a tensor, so by itself it cannot tell rare spikes from a
  feature that is large on every input: a MiniLM's hidden states have a few such outlier
  dimensions, which percentile and entropy clipped (bench_quantize: embedding cosine 0.972
  without the floor below, 0.993 with it). So a tensor
  whose readers all use its values linearly or only move them (Conv/Gemm/MatMul, Add, Concat,
  pooling, Relu, the data-movement ops; `_LINEAR_READERS`) is observed per feature too: the
  clipped range is widened to the value every feature reaches in every sample
  (`kernels.calib`, "per-feature floor"; the feature axis is the channel axis of NCHW tensors
  and the last of [batch, …, features] ones, `_feature_axes`). Those per-sample, per-feature
  maxima and minima are reduced inside onnxruntime, next to the tensor's producer (Flatten or
  Reshape, then ReduceMax/ReduceMin; ONNX shape inference gives the rank), so the observer only
  folds two small arrays; a tensor of rank 2 or of unknown rank is reduced by numpy. A tensor
  read by a nonlinearity (a SiLU's Sigmoid and Mul, GELU) is not: those bend the values first
  and flatten the far side of most channels, where a wider range would only cost resolution.

Batch size (``batch_size``; None: automatic) is set by memory, not a fixed count: one sample is
run first, then batches whose observed tensors take about ``STREAM_BUDGET_BYTES`` (64 MB; at most
64 samples) as outputs — a YOLOv8n at 320×320 exposes ~50 MB of activations per sample, so a batch
of 8 held ~0.4 GB of outputs plus onnxruntime's own buffers. Sessions that reduce inside
onnxruntime (minmax, sensitivity) return only scalars, but onnxruntime's own buffers grow with the
batch and can outgrow the reduced tensors' bytes: they get half the budget, and take
``REDUCE_BATCH`` (4) samples per run, or more while the batch's tensors take fewer bytes than the
weights (each run reads every weight once: a ResNet on small images). 4 rather than 8: on
bench_quantize's MobileNet (0.7 MB of weights) the smaller batches lowered the quantizer's peak
memory at the same wall time.
``threads``: onnxruntime intra-op threads of the calibration and sensitivity runs (default 0:
one per core, as ``quantize_static`` does; verification elsewhere in graph-opt stays at 1). The
thread count changes only how the work is split: the plan is the same bit for bit at 1 and 0
threads (tests/passes/test_quantize.py, on a small CNN). 1 is the choice when the machine is
shared. For minmax, streaming equals one big batch exactly (the
histogram methods are also batch-invariant, see `kernels.calib`). minmax is the default because
it never clips: on bench_quantize's YOLOv8n, percentile and mse keep the top detection's class
on 0.88 and 0.84 of the images against minmax's 0.94 and entropy's 0.97 (67 images, one is
0.015; the per-feature floor changes none of them), and on the CNNs and MiniLM the clipping
methods match minmax — worth trying per model (benchmarks/results/bench_quantize.md).

Placement (what gets a QDQ)
---------------------------
- Conv/Gemm/MatMul (``op_types``) with a constant float32 weight: weight and bias as above; the
  activation input gets a Q/DQ; the output gets one — after a Relu/Clip that is its only reader
  (the activation is absorbed into the output range) — except that a Gemm/MatMul output is
  quantized only when a quantized node reads it (otherwise onnxruntime runs QGemm /
  MatMulIntegerToFloat with a float output, more accurate and as fast).
- MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Split, Slice, Gather, DepthToSpace
  and a nearest-mode Resize on a quantized tensor: each output shares the input's scale and zero
  point (exact: these ops only move or select values), so onnxruntime drops the pairs and runs
  them in int8 (a YOLOv8n's C2f blocks Split every first conv's output:
  a float Split there cost a DequantizeLinear and two QuantizeLinear per block).
- Add, Mul (two non-constant inputs), Concat, AveragePool, GlobalAveragePool with a quantized input:
  each input and the output get their own scales (QLinearAdd, QLinearConcat, …).
- A tensor produced inside the quantized region is read through its DequantizeLinear by every
  reader (the producer's output is renamed, the DQ takes the original name, so graph outputs keep
  their names); a float tensor quantized for a quantized reader keeps its float value for the
  other readers.
- Never: a Concat whose calibrated input ranges differ by more than ``CONCAT_RANGE_RATIO`` (10×)
  — one output scale would erase the small-range input (a detector concatenating box pixels 0–640
  with class probabilities 0–1); the Concat, and the graph output it feeds, stay float, and each
  input keeps its own scale.
- ``exclude``: fnmatch patterns on op types or node names, never quantized. ``keep_float``:
  patterns on node or tensor names kept in full precision (a matching tensor never gets a QDQ).
- A Conv reading a graph input with fewer than ``MIN_INT8_REDUCTION`` (16) products per output
  (Cin/group·kh·kw; a 3×3 stem on a one-channel image: 9) stays float: the integer kernel saves
  nothing on so short a reduction and the input would need its own QuantizeLinear. Measured on the
  built-in example CNN (52k parameters, 300 interleaved runs, twice): int8 everywhere 1.05–1.08×
  fp32 latency, with the stem float 0.96–0.99×. So does one whose input channels per group are not
  a multiple of ``INT8_CHANNEL_PACK`` (4; an RGB stem): onnxruntime's fast int8 convolution takes
  input channels in fours, and its generic kernel ran YOLOv8n's stem at twice the float time.
- BatchNormalization after a Conv/Gemm is folded first (exact, reported) when activations are
  quantized, so the layer's output stays int8 instead of a float BN between int8 layers.
- Sensitivity (``sensitivity_snr_db``, needs data): every quantized layer is measured in
  isolation on the first ``sensitivity_samples`` (16) calibration samples in one more streaming
  pass — an SNR is a ratio of sums over every element of a tensor, so a few samples give it to
  well under 1 dB (YOLOv8n, entropy: 16 vs all 64 samples moved no layer by more than 1 dB, and
  flipped one layer at 19–20 dB; MiniLM: ≤ 0.1 dB) at a fraction of the cost — a copy of the layer reading the
  float model's own input through the planned QDQ and dequantized weight, against the float
  output (SNR of input + weight quantization), combined with the SNR of quantizing its output
  tensor (noise powers add; every SNR is two sums, Σ ref² and Σ (ref − candidate)², computed
  inside onnxruntime with ReduceSumSquare so that only scalars leave the session, the copy
  running with onnxruntime's basic optimizations (constant folding) and the QDQ pairs kept as the
  float ops they define); with
  ``sensitive='weight_only'`` a second copy with the float input
  and bias gives the weight-only SNR (not measured otherwise: nothing would read it). A layer below the threshold stays float entirely (``sensitive='float'``, the default:
  onnxruntime dequantizes a weight-only Conv/MatMul at run time, slower than float in a one-off
  measurement on a MiniLM projection), or, with ``sensitive='weight_only'``, runs weight-only when that SNR
  clears the threshold (smaller file, float activations); Add/Concat/pooling below it stay float; the placement is
  then redone. The report gives each layer's SNRs. ``'auto'``: 25 dB for int8/uint8 weights,
  10 dB for int4, off for ternary/binary (whose weight error is far larger by design).
  Why 25 and not 20 dB: each layer's SNR is measured alone, but the noise of a deep network's
  layers accumulates, and noise entering early passes through everything after it. On YOLOv8n
  (nudenet, minmax) every layer measured 24–36 dB, so at 20 dB nothing stayed float and the
  top detection's class agreed with fp32 on 0.72 of the images; at 25 dB the five layers at
  24–25 dB (the second conv and its SiLU, two convs of the first C2f block, one class-head conv)
  stay float: 0.94 (optimizations off) / 0.955 (as deployed); 28 dB gave 0.955 / 0.955 but
  cost MiniLM 12 of its 36 MatMuls (at 25 dB: 2; the CNNs of bench_quantize have no layer
  below 28 dB).

Mixed precision under a floor (``min_snr_db``, the machinery of ``graph_opt/budget.py``): the
model is quantized as planned, run on the calibration data against the pass's input, and when its
output SNR (worst output) is below the floor the least robust layers (lowest measured SNR first)
are kept in float, as few as hold it: bisection on their number, each candidate checked end to
end. The report says how many were kept and the SNR before and after.

Weight-only modes (float activations, DQ(weight) → float op): ``activations=none``; weights
int4/ternary/binary or blocked (onnxruntime has no integer conv/gemm kernel for them); and, with
a note, static activations requested without calibration data (``ctx.data`` is None).

Opset: per-channel DequantizeLinear needs opset 13, int4 and blocks 21, int2 25. A model below
the need is upgraded first — by bumping the opset import when no op it uses changed between the
two versions, else with ``onnx.version_converter`` (then checked to load in onnxruntime) — and the
report says which. The IR version is raised to the one the new opset requires.

Skipped, with the reason in the report: layer op types not in ``op_types``; excluded or
keep_float nodes; weights that are not constants, not float32, contain NaN/inf, are shared with
another node (a read inside an If/Loop/Scan body counts), or are 1-D (matrix-vector MatMul);
MatMul with the constant on the left or with two activation operands (attention scores: left
float); layers already quantized (an input from
DequantizeLinear or an output into QuantizeLinear), and quantized ops themselves
(QuantizeLinear/DequantizeLinear/QLinear*/MatMulInteger/ConvInteger/MatMulNBits/QGemm …): never
quantized twice; Conv/Gemm/MatMul inside If/Loop/Scan subgraphs (not quantized, said so);
activation tensors that are not float32 or were never observed; sensitive layers (SNR below the
threshold); Concats with mismatched ranges; a model whose opset cannot be upgraded.

Lossy, bounded per element: a weight moves by at most s/2 (s its channel's/block's scale; for
ternary/binary the error is |w − α·code|, by design large); an activation inside its calibrated
range by at most s_x/2 (values outside saturate: percentile/entropy/mse clip on purpose); biases
by s_x·s_w/2. Weights already on the grid (w = s·k, |k| ≤ 127) with ``activations=none`` come
back exactly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.budget import exact_pattern, hold_floor, name_nodes
from graph_opt.data import Dataset, batch_size_for, random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.kernels.calib import HistogramObserver, MinMaxObserver
from graph_opt.kernels.quant import (
    MIN_SCALE,
    QuantParams,
    binary_weights,
    blockwise_params,
    compute_params,
    pack_int2,
    pack_int4,
    quantize,
    symmetric_steps,
    ternary_weights,
)
from graph_opt.model_io import copy_model, detached, has_disk_weights, subgraphs
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._graph import GraphIndex, Namer, all_nodes, infer_shapes
from graph_opt.passes._qplan import NodeDecision, QuantPlan, TensorQuant
from graph_opt.passes.fold_batchnorm import FoldBatchnorm
from graph_opt.progress import progress
from graph_opt.stats import serialized_bytes
from graph_opt.verify import Reference, make_session, release_memory

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Ops that only move or select values: the outputs share the input's scale (ORT drops the QDQ).
# Resize only in its default nearest mode (the others interpolate).
SHARED_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather",
              "Resize", "DepthToSpace")
# Ops with an integer kernel in onnxruntime taking per-input scales and an output scale.
OWN_OPS = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
ABSORBED_OPS = ("Relu", "Clip")
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "MatMulNBits", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
    "QLinearReduceMean", "QLinearConvTranspose", "QEmbedLayerNormalization", "DequantizeBFP", "QuantizeBFP",
})
# One shared output scale cannot serve Concat inputs whose ranges differ by more than this.
CONCAT_RANGE_RATIO = 10.0
AUTO_SNR_DB = {"int8": 25.0, "uint8": 25.0, "int4": 10.0, "ternary": None, "binary": None}
INT4_AUTO_BLOCK = 128
# Automatic batches of the calibration and sensitivity runs: about this many bytes of requested
# outputs per batch (every observed tensor is an output), at most STREAM_MAX_BATCH samples.
STREAM_BUDGET_BYTES = 64 << 20
STREAM_MAX_BATCH = 64
# Sessions that reduce inside onnxruntime (minmax calibration, sensitivity) return scalars, but
# onnxruntime's own buffers still grow with the batch: a few samples per run amortize the cost
# of a run, more only hold memory, unless the weights each run reads outweigh the batch.
REDUCE_BATCH = 4
# A Conv on the graph input with fewer products per output than this, or with input channels per
# group not a multiple of INT8_CHANNEL_PACK, stays float (see `_float_on_input`).
MIN_INT8_REDUCTION = 16
INT8_CHANNEL_PACK = 4
_INT32_MAX = 2**31 - 1
_ONNX_DTYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4,
                "uint4": TensorProto.UINT4, "int2": TensorProto.INT2, "uint2": TensorProto.UINT2,
                "int32": TensorProto.INT32}


@dataclass(frozen=True, kw_only=True)
class Quantize(Pass):
    """Quantize weights (int8/uint8/int4/ternary/binary) and activations (static QDQ, ORT-fusable)."""

    name: ClassVar[str] = "quantize"
    edits_input: ClassVar[bool] = False
    weights: Literal["int8", "uint8", "int4", "ternary", "binary"] = "int8"
    activations: Literal["uint8", "int8", "none"] = "uint8"
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    symmetric: bool = True
    block_size: int | None = None
    reduce_range: bool = True
    op_types: tuple[str, ...] = LAYER_OPS
    exclude: tuple[str, ...] = ()
    keep_float: tuple[str, ...] = ()
    sensitivity_snr_db: float | Literal["auto"] | None = "auto"
    sensitive: Literal["float", "weight_only"] = "float"
    sensitivity_samples: int = 16
    max_samples: int = 256
    batch_size: int | None = None
    min_snr_db: float | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        bad = [op for op in self.op_types if op not in LAYER_OPS]
        if bad:
            raise ValueError(f"op_types may only name {', '.join(LAYER_OPS)} (got {', '.join(bad)}); "
                             "Add/Concat/pooling follow the quantized layers automatically, use exclude to stop them")
        if self.block_size is not None and self.block_size < 0:
            raise ValueError("block_size must be >= 0 (0: never blocked, None: automatic)")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (0, 100]")
        if self.max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        if self.sensitivity_samples < 1:
            raise ValueError("sensitivity_samples must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 (None: sized automatically)")
        if self.min_snr_db is not None and not math.isfinite(self.min_snr_db):
            raise ValueError(f"min_snr_db must be a finite number of dB, got {self.min_snr_db}")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: onnxruntime's default, one per core)")

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        # `model` is the caller's (edits_input is False): the plan only reads it, and apply_plan,
        # FoldBatchnorm and the floor's runs each write a copy.
        if self.min_snr_db is not None:
            return self._run_with_floor(copy_model(model), report, ctx)
        private = False
        if self.activations != "none" and any(n.op_type == "BatchNormalization" for n in model.graph.node):
            # A BatchNormalization between a Conv/Gemm and its output QDQ would run in float
            # between int8 layers (MobileNet ran 1.8x slower than fp32 in the first bench_quantize run); folding is exact.
            folded = FoldBatchnorm()(model, ctx)
            if folded.modified:
                report.note(f"folded {len(folded.report.rewritten)} BatchNormalization into their Conv/Gemm first "
                            "(exact), so the layer outputs stay int8")
                model, private = folded.model, True
        plan, work = make_plan(model, ctx.data, self)
        for d in plan.nodes:
            if d.action != "quantize":
                report.skip(d.node, d.reason)
        if plan.empty:
            return model if private else copy_model(model)
        out = apply_plan(work, plan)
        _report(plan, report, model, out)
        return out

    def _run_with_floor(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        """Mixed precision: quantize as planned, then keep the fewest least robust layers (their
        measured SNR, lowest first) in float until the model's SNR on the calibration data holds
        `min_snr_db` (graph_opt.budget.hold_floor)."""
        name_nodes(model)  # keep_float selects layers by node name
        runs: dict[int, PassReport] = {}

        def rebuild(kept: tuple[str, ...]) -> onnx.ModelProto:
            keep = self.keep_float + tuple(exact_pattern(n) for n in kept)
            result = dataclasses.replace(self, min_snr_db=None, keep_float=keep)(model, ctx)
            runs[id(result.model)] = result.report
            return result.model

        first = rebuild(())
        layers = [e for e in runs[id(first)].rewritten if e.get("weight")]
        order = [e["node"] for e in sorted(layers, key=lambda e: (e.get("snr_db") is None, e.get("snr_db") or 0.0))]
        if order:
            data = ctx.data.take(self.max_samples) if ctx.data is not None else random_dataset(model, 16, seed=ctx.seed)
            if ctx.data is None:
                report.note("min_snr_db: no calibration data; the floor is checked on seeded random inputs")
            out = hold_floor(Reference(model, data), first, order, rebuild, self.min_snr_db, report)
        else:
            out = first
        chosen = runs[id(out)]
        report.rewritten.extend(chosen.rewritten)
        report.skipped.extend(chosen.skipped)
        report.notes[:0] = chosen.notes
        return out if chosen.rewritten else model

    def plan(self, model: onnx.ModelProto, data: Dataset | None = None, *, batch_size: int | None = None) -> QuantPlan:
        """The plan this pass would apply to `model` (for inspection; nothing is rewritten)."""
        return make_plan(model, data, self, batch_size=batch_size)[0]

    # -- derived settings

    def threshold_db(self) -> float | None:
        if self.sensitivity_snr_db == "auto":
            return AUTO_SNR_DB[self.weights]
        return self.sensitivity_snr_db

    def required_opset(self) -> int:
        if self.weights in ("ternary", "binary"):
            return 25
        if self.weights == "int4" or (self.block_size or 0) > 0:
            return 21
        return 13 if self.per_channel else 10  # DequantizeLinear's axis attribute came with opset 13


def _matches(patterns: Iterable[str], *names: str) -> str | None:
    for p in patterns:
        for n in names:
            if n and fnmatch.fnmatchcase(n, p):
                return p
    return None


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


# =============================================================================== layers


@dataclass
class _Layer:
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

    @property
    def wv(self) -> np.ndarray:
        return self.weight() if callable(self.weight) else self.weight


def _match_layer(ix: GraphIndex, idx: int) -> _Layer | str:
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
        trans_b = _attr(node, "transB", 0)
        axis, red = (0, 1) if trans_b else (1, 0)
    else:
        if wv.ndim < 2:
            return "1-D weight (matrix-vector product)"
        axis, red = wv.ndim - 1, wv.ndim - 2
    # a weight kept on disk is read again when needed: a model over 2 GB never has all of them in memory
    layer = _Layer(idx, ix.labels[idx], op, x, w, functools.partial(ix.const, w) if ix.on_disk(w) else wv, axis, red)
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
        elif op == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0):
            layer.bias_float = "Gemm alpha or beta is not 1"
        else:
            layer.bv = bv
    return layer


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_layers(node: onnx.NodeProto) -> int:
    return sum(n.op_type in LAYER_OPS for sub in subgraphs(node) for n in all_nodes(sub))


# =============================================================================== weights


def _block_for(layer: _Layer, opts: Quantize) -> int:
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


def _quantize_weight(layer: _Layer, opts: Quantize, static: bool) -> TensorQuant:
    w = layer.wv
    shape = tuple(int(d) for d in w.shape)
    if opts.weights in ("ternary", "binary"):
        codes, p = (ternary_weights if opts.weights == "ternary" else binary_weights)(w, layer.axis)
        return TensorQuant.from_params(layer.w, "weight", p, scheme=opts.weights, shape=shape, codes=codes)
    dtype = opts.weights
    block = _block_for(layer, opts)
    if block > 0:
        p = blockwise_params(w, block, layer.red_axis, dtype, symmetric=opts.symmetric)
    else:
        axis = layer.axis if opts.per_channel else None
        if static and layer.op == "MatMul" and w.ndim > 2:
            # A 1-D per-column scale on a batched weight makes onnxruntime's fused MatMulIntegerToFloat /
            # QLinearMatMul fail at run time (its B zero point must be per [.., 1, N] slice): per tensor.
            axis = None
        if static and dtype == "int8" and opts.reduce_range:
            p = _reduced_params(w, axis, opts.symmetric)
        else:
            p = compute_params(w, dtype, symmetric=opts.symmetric, axis=axis)
    return TensorQuant.from_params(layer.w, "weight", p, shape=shape, codes=quantize(w, p))


def _quantize_bias(layer: _Layer, x_scale: np.ndarray, wq: TensorQuant) -> TensorQuant | str:
    """int32 bias with scale s_x·s_w (per channel when the weight is), or why it stays float."""
    s = (np.float32(x_scale) * wq.scale).astype(np.float32)
    s = np.maximum(s, np.float32(MIN_SCALE))
    bv = layer.bv.astype(np.float64)
    flat = bv.reshape(-1)
    codes = np.rint(flat / (s.astype(np.float64) if s.ndim else float(s)))
    if np.any(np.abs(codes) > _INT32_MAX):
        return "bias / (s_x·s_w) overflows int32"
    axis = None if s.ndim == 0 else bv.ndim - 1
    return TensorQuant(layer.b, "bias", "int32", s, np.zeros(s.shape, np.int32), axis=axis, scheme="bias",
                       shape=tuple(int(d) for d in bv.shape), codes=codes.astype(np.int32).reshape(bv.shape))


# =============================================================================== calibration


def calibrate(model: onnx.ModelProto, data: Dataset, tensors: list[str], method: str, *,
              batch_size: int | None = None, max_samples: int | None = None, threads: int = 1,
              feature_axis: Callable[[str, int], int | None] | None = None) -> dict[str, MinMaxObserver]:
    """One streaming pass over `data`: one observer per float32 tensor in `tensors`.

    minmax reduces inside onnxruntime (`_calibrate_minmax`); the other methods expose the
    tensors as extra outputs of a private copy of `model`, and each batch updates the observers
    and is dropped (see 'Calibration' in the module docstring). Tensors that turn out not to be
    float32 are left out. Without `batch_size` the batch is sized to the memory the tensors take
    as outputs (see `_stream`). ``feature_axis(tensor, rank)``: the axis whose features the
    histogram observer of `tensor` keeps a floor for (`kernels.calib`), or None.
    """
    if max_samples is not None:
        data = data.take(max_samples)
    if method == "minmax":
        try:
            return _calibrate_minmax(model, data, list(dict.fromkeys(tensors)), batch_size, threads)
        except GraphOptError:
            pass  # a tensor onnxruntime cannot reduce (its type, its rank): expose the tensors instead
    inputs = set(data.inputs)
    wanted = [t for t in dict.fromkeys(tensors) if t not in inputs]
    inside = _inside_features(model, wanted, feature_axis) if method != "minmax" else {}
    session, reduced = _exposing(model, wanted, threads, inside)
    fetch = wanted + [x for pair in reduced.values() for x in pair]

    def make(t: str, v: np.ndarray) -> MinMaxObserver:
        if method == "minmax":
            return MinMaxObserver()
        axis = inside[t][0] if t in inside else feature_axis(t, v.ndim) if feature_axis else None
        return HistogramObserver(feature_axis=axis)
    observers: dict[str, MinMaxObserver] = {}
    dropped: set[str] = set()

    def observe(feed: dict[str, np.ndarray], outs: list[np.ndarray]) -> None:
        values = dict(zip(fetch, outs))
        values.update({t: feed[t] for t in tensors if t in inputs})
        for t in tensors:
            v = values.pop(t, None)
            if t in dropped or v is None:
                continue
            if np.asarray(v).dtype != np.float32:
                dropped.add(t)
                observers.pop(t, None)
                continue
            if t not in observers:
                observers[t] = make(t, v)
            if t in reduced:  # (samples·features,) or (samples, features), as reduced by onnxruntime
                extremes = tuple(values[x].reshape(v.shape[0], -1) for x in reduced[t])
                observers[t].update(v, feature_extremes=extremes)
            else:
                observers[t].update(v)

    # One batch is observed (numpy) while onnxruntime computes the next: the batches still reach
    # each observer in order, so the result is the same as in sequence. numpy's bincount holds the
    # GIL, so the observer needs a core of its own when it is the slower side: the first batch is
    # observed in sequence and timed against a second (warm) run of it, and when observing took
    # longer, the rest runs on a session with one thread less (by default, threads=0, only).
    runner = _Swappable(session)
    del session
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for k, (feed, outs) in enumerate(_stream(runner, fetch, data, batch_size or batch_size_for(model, 0),
                                                 "calibrate")):
            if k == 0:
                start = time.perf_counter()
                observe(feed, outs)
                observe_s = time.perf_counter() - start
                if not threads and _cores(0) > 1:
                    start = time.perf_counter()
                    runner.run(fetch, feed)
                    if observe_s > time.perf_counter() - start:
                        runner.session = None  # one session at a time: each holds the weights
                        release_memory()
                        runner.session, again = _exposing(model, wanted, _cores(0) - 1, inside)
                        assert again == reduced  # the same names: the copy is built the same way
                continue
            if pending is not None:
                pending.result()
            pending = pool.submit(observe, feed, outs)
            del outs
        if pending is not None:
            pending.result()
    return {t: o for t, o in observers.items() if o.count}


class _Swappable:
    """An onnxruntime session that can be replaced between two runs of `_stream`."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(names, feed)


def _calibrate_minmax(model: onnx.ModelProto, data: Dataset, tensors: list[str], batch_size: int | None,
                      threads: int) -> dict[str, MinMaxObserver]:
    """minmax calibration with the reductions inside onnxruntime: ReduceMin, ReduceMax and Size
    per tensor, so three scalars per tensor and batch leave the session instead of the tensor.
    A tensor whose range follows from observed ones (a Relu or Sigmoid output, a Reshape, a
    Concat: `_minmax_derivations`) is not reduced at all; its range is derived at the end.

    onnxruntime drops a NaN that is not the first value it reduces (and a vectorized max can then
    miss values around it), while `MinMaxObserver` keeps the min/max of the finite values. So each
    batch also sums every float graph output (a NaN or inf in the model reaches them); a batch
    with a non-finite sum or reduction has every tensor fetched whole and observed exactly, and
    only the other batches' extremes are derived from.
    """
    derived = _minmax_derivations(model, tensors)
    work, weights = detached(model)
    weight_bytes = sum(int(a.nbytes) for a in weights.values())
    g = work.graph
    namer = Namer(g)
    reduced: dict[str, tuple[str, str, str]] = {}
    for t in tensors:
        if t in derived:
            continue
        lo, hi, n = namer(f"{t}_calib_min"), namer(f"{t}_calib_max"), namer(f"{t}_calib_size")
        g.node.extend([helper.make_node("ReduceMin", [t], [lo], keepdims=0),
                       helper.make_node("ReduceMax", [t], [hi], keepdims=0),
                       helper.make_node("Size", [t], [n])])
        reduced[t] = (lo, hi, n)
    guards = []
    for o in model.graph.output:
        if o.type.tensor_type.elem_type == TensorProto.FLOAT:
            guards.append(namer(f"{o.name}_calib_sum"))
            g.node.append(helper.make_node("ReduceSum", [o.name], [guards[-1]], keepdims=0))
    _place_after_producers(g, len(model.graph.node))
    names = [*(x for r in reduced.values() for x in r), *guards]
    g.output.extend(onnx.ValueInfoProto(name=x) for x in names)
    session = make_session(work, optimize=True, threads=threads, arena=False, weights=weights)
    del work, g, weights
    exposing = None  # the session exposing the tensors themselves, made on first need
    clean = {t: MinMaxObserver() for t in reduced}     # from the batches with finite reductions
    exact = {t: MinMaxObserver() for t in tensors}     # from the others, observed whole
    dropped: set[str] = set()

    def batch_bytes(outs: list[np.ndarray]) -> float:
        # The bytes the reduced tensors would take as outputs (onnxruntime's buffers grow with them).
        values = dict(zip(names, outs))
        return sum(int(values[n]) * values[lo].itemsize for lo, _, n in reduced.values())

    for feed, outs in _stream(session, names, data, batch_size or batch_size_for(model, 0), "calibrate",
                              batch_bytes=batch_bytes, weight_bytes=weight_bytes):
        values = dict(zip(names, outs))
        extremes: dict[str, tuple[float, float, int]] = {}
        poisoned = any(not math.isfinite(float(values[s])) for s in guards)
        for t, (lo_name, hi_name, n_name) in reduced.items():
            if poisoned:
                break
            lo, hi, n = values[lo_name], values[hi_name], int(values[n_name])
            if lo.dtype != np.float32:
                dropped.add(t)
            elif n:
                extremes[t] = (float(lo), float(hi), n)
                poisoned = not (math.isfinite(extremes[t][0]) and math.isfinite(extremes[t][1]))
        if not poisoned:
            for t, (lo, hi, n) in extremes.items():
                clean[t].update_extremes(lo, hi, n)
            continue
        inner = [t for t in tensors if t not in feed]
        if exposing is None:
            exposing, _ = _exposing(model, inner, threads)
        fetched = dict(zip(inner, exposing.run(inner, feed) if inner else []))
        for t in tensors:
            value = feed[t] if t in feed else fetched[t]
            if value.dtype != np.float32:
                dropped.add(t)
            else:
                exact[t].update(value)
        del values, outs, fetched
    for t, (sources, f) in derived.items():  # graph order: a source is ready before its readers
        if any(s in dropped for s in sources):
            dropped.add(t)
        elif f is None:
            clean[t] = functools.reduce(MinMaxObserver.merge, (clean[s] for s in sources), MinMaxObserver())
        else:
            clean[t] = clean[sources[0]].mapped(f)
    observers = {t: clean[t].merge(exact[t]) if t in clean else exact[t] for t in tensors}
    return {t: o for t, o in observers.items() if o.count and t not in dropped}


# Ops whose output range follows from their input's, for minmax (see `_minmax_derivations`).
_SAME_VALUES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})


def _sigmoid(x: float) -> float:
    return float(np.float32(0.5 * (1.0 + math.tanh(0.5 * x))))


def _tanh(x: float) -> float:
    return float(np.float32(math.tanh(x)))


def _minmax_derivations(model: onnx.ModelProto, tensors: Collection[str]
                        ) -> dict[str, tuple[list[str], Callable[[float], float] | None]]:
    """The tensors of `tensors` whose minmax range follows from other tensors of `tensors`, in
    graph order: ``{tensor: (sources, f)}``, the range being ``[f(min), f(max)]`` of its one
    source for a never-decreasing elementwise ``f`` (Relu, LeakyRelu, Clip with constant bounds,
    Sigmoid, Tanh; ``f`` is the identity for ops that only move values: Reshape, Flatten …), or
    the union of its sources' (``f`` None: a Concat). Those need no reduction of their own.

    Exact for every op but Sigmoid and Tanh, which onnxruntime computes with its own
    approximations: there the derived bound is the exact function's, and can differ from the one
    a reduction gives by that approximation's error.
    """
    ix = GraphIndex(model)
    known = set(tensors)
    out: dict[str, tuple[list[str], Callable[[float], float] | None]] = {}
    for node in ix.nodes:
        if node.domain not in ("", "ai.onnx") or not node.output or node.output[0] not in known:
            continue
        t, op = node.output[0], node.op_type
        data = [x for x in node.input[: None if op == "Concat" else 1] if x]
        if not data or not all(x in known and x != t for x in data):
            continue
        f: Callable[[float], float] | None
        if op == "Concat":
            f = None
        elif op in _SAME_VALUES:
            f = float
        elif op == "Relu":
            f = functools.partial(max, 0.0)
        elif op == "LeakyRelu":
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
            if alpha < 0:
                continue
            f = functools.partial(_leaky_relu, float(np.float32(alpha)))
        elif op == "Clip":
            bounds = _clip_bounds(ix, node)
            if bounds is None:
                continue
            f = functools.partial(_clip, *bounds)
        elif op == "Sigmoid":
            f = _sigmoid
        elif op == "Tanh":
            f = _tanh
        else:
            continue
        out[t] = (data, f)
    return out


def _leaky_relu(alpha: float, x: float) -> float:
    return x if x >= 0 else float(np.float32(alpha) * np.float32(x))


def _clip(lo: float, hi: float, x: float) -> float:
    return min(max(x, lo), hi)


def _clip_bounds(ix: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """A Clip's (min, max) when both are constant (absent: unbounded), else None."""
    lo, hi = -math.inf, math.inf
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        elif a.name == "max":
            hi = a.f
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            value = ix.const(node.input[slot])
            if value is None or value.size != 1:
                return None
            if slot == 1:
                lo = float(value.reshape(()))
            else:
                hi = float(value.reshape(()))
    return (lo, hi) if lo <= hi else None


def _cores(threads: int) -> int:
    """The threads to use for `threads` (0: one per core this process may run on)."""
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _exposing(model: onnx.ModelProto, tensors: list[str], threads: int,
              features: Mapping[str, tuple[int, int | None]] | None = None):
    """A session of `model` with every tensor in `tensors` also a graph output, and the names of
    the extra outputs that give, per tensor in `features` (``{tensor: (axis, features)}``, see
    `_inside_features`), its per-sample, per-feature max and min: onnxruntime reduces them next
    to the tensor's producer, on its own threads, instead of numpy in the observer's."""
    work, weights = detached(model)
    g = work.graph
    present = {o.name for o in g.output}
    g.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
    reduced: dict[str, tuple[str, str]] = {}
    if features:
        namer = Namer(g)
        n_model = len(g.node)
        axes_input = _opset(model) >= 18  # ReduceMax/ReduceMin take axes as an input from opset 18
        axes_const = namer("feature_reduce_axes")
        if axes_input:
            g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes_const))
        for t, (axis, size) in features.items():
            rows = namer(f"{t}_per_feature")
            if axis == 1:  # (N, C, …) → (N·C, …): the max of each row is one sample's one channel
                g.node.append(helper.make_node("Flatten", [t], [rows], axis=2))
            else:  # (N, …, C) → (N, M, C): the middle axes merged
                shape = namer(f"{t}_per_feature_shape")
                g.initializer.append(numpy_helper.from_array(np.array([0, -1, size], np.int64), shape))
                g.node.append(helper.make_node("Reshape", [t, shape], [rows]))
            pair = namer(f"{t}_feature_max"), namer(f"{t}_feature_min")
            for op, out in zip(("ReduceMax", "ReduceMin"), pair):
                if axes_input:
                    g.node.append(helper.make_node(op, [rows, axes_const], [out], keepdims=0))
                else:
                    g.node.append(helper.make_node(op, [rows], [out], axes=[1], keepdims=0))
            reduced[t] = pair
        _place_after_producers(g, n_model)
        g.output.extend(onnx.ValueInfoProto(name=x) for pair in reduced.values() for x in pair)
    return make_session(work, optimize=True, threads=threads, arena=False, weights=weights), reduced


def _inside_features(model: onnx.ModelProto, tensors: list[str],
                     feature_axis: Callable[[str, int], int | None] | None) -> dict[str, tuple[int, int | None]]:
    """``{tensor: (feature axis, number of features)}`` for the tensors whose per-sample,
    per-feature extremes onnxruntime can compute (`_exposing`): rank from ONNX shape inference
    (`_graph.infer_shapes`) at least 3, feature axis 1 (any rank) or the last one (when its length
    is static). The others (rank 2 or unknown: nothing to reduce, or no safe graph for it) are
    reduced by the observer from the tensor itself."""
    if feature_axis is None or not tensors:
        return {}
    dims = infer_shapes(model)
    out: dict[str, tuple[int, int | None]] = {}
    for t in tensors:
        shape = dims.get(t)
        if shape is None or len(shape) < 3:
            continue
        axis = feature_axis(t, len(shape))
        if axis is None:
            continue
        axis %= len(shape)
        if axis == 1:
            out[t] = (1, shape[1])
        elif axis == len(shape) - 1 and shape[-1]:
            out[t] = (axis, shape[-1])
    return out


def _stream(session, names: list[str], data: Dataset, batch_size: int, desc: str, *, batch_bytes=None,
            weight_bytes: int | None = None):
    """Run `session` over `data` batch by batch, yielding ``(feed, outputs)``.

    ``batch_size`` 0 means automatic: the first run takes one sample, and the rest go in batches
    whose requested outputs take about `STREAM_BUDGET_BYTES` (at most `STREAM_MAX_BATCH` samples;
    ``batch_bytes(outputs)`` overrides how a batch's memory is counted). A session that reduces
    inside onnxruntime gives ``weight_bytes``, the bytes of its model's weights: its batches take
    half the budget, and stop at `REDUCE_BATCH` samples or at as many as the weights outweigh.
    A calibration model exposes every observed tensor at once, so one batch of a detector at
    320×320 holds ~50 MB per sample: the budget, not a fixed batch of 8, bounds the peak memory.
    """
    def run():
        n = len(data)
        start, bs = 0, batch_size or 1
        while start < n:
            stop = min(start + bs, n)
            feed = data.slice(start, stop)  # each input cut on its own batch axis
            try:
                outs = session.run(names, feed) if names else []
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise GraphOptError(f"onnxruntime failed during {desc}: {first[:300]}") from None
            if not batch_size and start == 0:
                size = batch_bytes(outs) if batch_bytes else sum(int(np.asarray(o).nbytes) for o in outs)
                per_sample = max(size / (stop - start), 1.0)
                if weight_bytes is None:
                    bs = min(STREAM_MAX_BATCH, STREAM_BUDGET_BYTES // per_sample)
                else:
                    bs = min(STREAM_MAX_BATCH, STREAM_BUDGET_BYTES // 2 // per_sample,
                             max(REDUCE_BATCH, weight_bytes // per_sample))
                bs = int(max(1, bs))
            yield feed, outs
            del outs
            start = stop

    yield from progress(run(), desc=desc)


class _RangeMap(Mapping[str, tuple[float, float]]):
    """Ranges of the tensors in `names`, each derived on first use by `value` (a Mapping for `_place`)."""

    def __init__(self, names: Collection[str], value: Callable[[str], tuple[float, float]]):
        self._names, self._value = names, value
        self._done: dict[str, tuple[float, float]] = {}

    def __getitem__(self, t: str) -> tuple[float, float]:
        if t not in self._done:
            if t not in self._names:
                raise KeyError(t)
            self._done[t] = self._value(t)
        return self._done[t]

    def __contains__(self, t: object) -> bool:
        return t in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _Ranges(_RangeMap):
    """The calibrated range of each observed tensor, derived from its observer on first use: the
    placement asks only for the tensors that may get a QDQ (a Conv output whose Relu is absorbed
    never does), and a histogram method's search is the costly part."""

    def __init__(self, observers: dict[str, MinMaxObserver], opts: Quantize) -> None:
        super().__init__(observers, lambda t: _range(observers[t], opts))
        self._observers, self._opts = observers, opts

    def prefetch(self, place: Callable[[Mapping[str, tuple[float, float]]], object]) -> None:
        """Derive at once, on every core, the ranges that `place` asks for.

        `place` runs first on the observed min/max (cheap); the tensors it asked for are the
        ones the real placement will ask for, except perhaps a Concat's, whose decision depends
        on the ranges: those are derived on first use as before. Each search is independent
        and numpy releases the GIL inside it, so the result is the same as one by one."""
        observers = self._observers
        dry = _Asking(observers, lambda t: (observers[t].min, observers[t].max))
        place(dry)
        todo = [t for t in dry.asked if t not in self._done]
        workers = min(_cores(self._opts.threads), len(todo))
        if workers < 2:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for t, r in zip(todo, pool.map(self._value, todo)):
                self._done[t] = r


class _Asking(_RangeMap):
    """Stand-in ranges for a dry run of `_place`: `asked` records, in order, the tensors the
    placement asked for."""

    def __init__(self, names: Collection[str], value: Callable[[str], tuple[float, float]]):
        super().__init__(names, value)
        self.asked: dict[str, None] = {}

    def __getitem__(self, t: str) -> tuple[float, float]:
        value = super().__getitem__(t)
        self.asked[t] = None
        return value


# Readers that use a tensor's values linearly, or only move them (Shape reads none): a clipped
# feature would reach them as it is. Anything else (Sigmoid, a SiLU's Mul, GELU, Softmax …) bends
# the values first, and saturates the far side of most features anyway.
_LINEAR_READERS = frozenset({*LAYER_OPS, *SHARED_OPS, "Add", "Sub", "Concat", "AveragePool", "GlobalAveragePool",
                             "Relu", "Identity", "Shape", "Size"})


def _feature_axes(ix: GraphIndex) -> Callable[[str, int], int | None]:
    """For a histogram method: the axis of a tensor's features (channels), whose per-feature floor
    keeps a clipped range from cutting a feature that is large on every sample (`kernels.calib`),
    or None. Only for tensors whose every reader is linear (`_LINEAR_READERS`). The axis is 1 for
    rank 4 and up (NCHW …), and for a rank-3 tensor next to a Conv (N, C, L); else the last
    ([batch, features], [batch, sequence, features])."""
    def axis(t: str, ndim: int) -> int | None:
        reads = ix.readers(t)
        if ndim < 2 or not reads or any(slot < 0 for _, slot in reads):  # slot -1: inside an If/Loop body
            return None
        readers = [ix.nodes[i] for i, _ in reads]
        if any(n.op_type not in _LINEAR_READERS for n in readers):
            return None
        if ndim >= 4:
            return 1
        conv = ix.producer_op(t) == "Conv" or any(n.op_type == "Conv" for n in readers)
        return 1 if ndim == 3 and conv else ndim - 1
    return axis


def _range(obs: MinMaxObserver, opts: Quantize) -> tuple[float, float]:
    if isinstance(obs, HistogramObserver):
        return obs.range(opts.calibration, percentile=opts.percentile, symmetric=False, dtype=opts.activations)
    return obs.range("minmax")


# =============================================================================== placement


@dataclass
class _Placement:
    acts: dict[str, TensorQuant] = field(default_factory=dict)
    decisions: dict[int, NodeDecision] = field(default_factory=dict)
    static: set[int] = field(default_factory=set)  # layers whose activation input is quantized


def _place(ix: GraphIndex, layers: dict[int, _Layer], candidates: set[int], ranges: Mapping[str, tuple[float, float]],
           opts: Quantize, forced_float: dict[int, str], unasked: Container[str] = frozenset()) -> _Placement:
    """Decide which activation tensors get a QDQ (see 'Placement' in the module docstring).

    `unasked`: tensors left out of calibration because no placement could use them (see
    `make_plan`); a Gemm/MatMul output among them is reported as the float output it is."""
    pl = _Placement()
    region: set[str] = set()               # tensors whose producer is quantized: every reader reads DQ
    pending: dict[str, tuple[int, str | None]] = {}  # Gemm/MatMul outputs quantized only if read quantized
    readers: dict[str, list[str]] = {}     # float-produced tensors: the quantized readers (labels)

    def keep(t: str) -> bool:
        return _matches(opts.keep_float, t) is not None

    def own(t: str) -> TensorQuant:
        if t not in pl.acts:
            lo, hi = ranges[t]
            p = compute_params((lo, hi), opts.activations, symmetric=False)
            pl.acts[t] = TensorQuant.from_params(t, "activation", p, method=opts.calibration, range=(lo, hi))
        return pl.acts[t]

    def materialize(t: str) -> None:
        if t in pending:
            idx, absorbed = pending.pop(t)
            own(t)
            region.add(t)
            pl.decisions[idx].output, pl.decisions[idx].absorbed = t, absorbed

    def quantized(t: str) -> bool:
        return t in region or t in pending

    def usable(t: str) -> bool:
        return quantized(t) or (t in ranges and not keep(t))

    def use(t: str, idx: int) -> None:
        materialize(t)
        if t not in region:
            own(t)
            readers.setdefault(t, []).append(ix.labels[idx])

    def span(t: str) -> float | None:
        r = ranges.get(t) or (pl.acts[t].range if t in pl.acts else None)
        return None if r is None else max(abs(r[0]), abs(r[1]))

    def chain_output(idx: int) -> tuple[str | None, str | None, str]:
        """(tensor quantized after node idx, the Relu/Clip absorbed, why none)."""
        y = ix.nodes[idx].output[0]
        r = ix.sole_reader(y)
        t, absorbed = y, None
        if (r is not None and ix.nodes[r].op_type in ABSORBED_OPS and not _excluded(ix, r, opts)
                and r not in forced_float):
            t, absorbed = ix.nodes[r].output[0], ix.labels[r]
        if keep(t):
            return None, None, f"output {t!r} kept float (keep_float)"
        if t not in ranges:
            if t in unasked and ix.nodes[idx].op_type in ("Gemm", "MatMul"):
                return None, None, _FLOAT_OUTPUT
            return None, None, f"output {t!r} is not a float32 tensor seen in calibration"
        return t, absorbed, ""

    for idx, node in enumerate(ix.nodes):
        op, label = node.op_type, ix.labels[idx]
        if idx in layers:
            if idx in forced_float:
                continue
            layer = layers[idx]
            d = pl.decisions[idx] = NodeDecision(label, op, "quantize", weight=layer.w)
            if idx not in candidates:
                d.reason = "weight-only"
                continue
            if not usable(layer.x):
                d.reason = f"weight-only: input {layer.x!r} is kept float or not a float32 tensor seen in calibration"
                continue
            use(layer.x, idx)
            d.inputs = [layer.x]
            pl.static.add(idx)
            t, absorbed, why = chain_output(idx)
            if t is None:
                d.reason = why
            elif op in ("Gemm", "MatMul"):
                pending[t] = (idx, absorbed)
            else:
                own(t)
                region.add(t)
                d.output, d.absorbed = t, absorbed
            continue
        if _excluded(ix, idx, opts) or idx in forced_float or node.domain not in ("", "ai.onnx"):
            continue
        data_inputs = [t for t in node.input if t and not ix.is_const(t)]
        if op in SHARED_OPS:
            if not node.input or node.input[0] not in data_inputs or not quantized(node.input[0]):
                continue
            src, outs = node.input[0], [o for o in node.output if o]
            if not outs or (len(outs) > 1 and op != "Split") or any(keep(o) for o in outs):
                continue  # (a MaxPool's second output holds int64 indices)
            if op == "Resize" and _attr(node, "mode", b"nearest") != b"nearest":
                continue
            materialize(src)
            base = pl.acts[src]
            for out in outs:
                pl.acts[out] = TensorQuant(out, "activation", base.dtype, base.scale, base.zero_point, scheme="shared",
                                           shared_with=base.shared_with or src, method=base.method, range=base.range)
                region.add(out)
            pl.decisions[idx] = NodeDecision(label, op, "quantize", "shares its input's scale (int8 data movement)",
                                             inputs=[src], output=outs[0])
            continue
        if op not in OWN_OPS or not any(quantized(t) for t in data_inputs):
            continue
        if op in ("Add", "Mul") and len(data_inputs) != 2:
            continue
        if op in ("AveragePool", "GlobalAveragePool") and data_inputs != [node.input[0]]:
            continue
        if not all(usable(t) for t in data_inputs):
            continue
        if op == "Concat":
            spans = [a for a in (span(t) for t in data_inputs) if a]
            if spans and max(spans) / min(spans) > CONCAT_RANGE_RATIO:
                pl.decisions[idx] = NodeDecision(
                    label, op, "float",
                    f"input ranges differ by {max(spans) / min(spans):.0f}x (max |x| from {min(spans):.3g} to "
                    f"{max(spans):.3g}): one output scale would erase the small-range input; the Concat and its "
                    "output stay float, each input keeps its own scale")
                continue
        t, absorbed, why = chain_output(idx)
        if t is None:
            pl.decisions[idx] = NodeDecision(label, op, "float", why)
            continue
        for inp in data_inputs:
            use(inp, idx)
        own(t)
        region.add(t)
        pl.decisions[idx] = NodeDecision(label, op, "quantize", "own output scale", inputs=list(data_inputs),
                                         output=t, absorbed=absorbed)
    for t, (idx, _) in pending.items():
        pl.decisions[idx].reason = _FLOAT_OUTPUT
    for t, q in pl.acts.items():
        q.consumers = None if t in region else readers.get(t, [])
    return pl


_FLOAT_OUTPUT = ("float output: nothing quantized reads it (onnxruntime fuses the float-output form: QGemm / "
                 "MatMulIntegerToFloat)")


def _excluded(ix: GraphIndex, idx: int, opts: Quantize) -> str | None:
    node = ix.nodes[idx]
    return (_matches(opts.exclude, node.op_type, node.name, ix.labels[idx])
            or _matches(opts.keep_float, node.name, ix.labels[idx]))


# =============================================================================== sensitivity


@dataclass
class _Probes:
    """What `_probe_graph` added: per SNR key ('layer:idx', 'weight_only:idx', 'tensor:name') the
    outputs holding Σ ref² and Σ (ref − candidate)², and the Size outputs of the reference tensors."""

    sums: dict[str, tuple[str, str]]
    sizes: list[str]
    measured: list[str]  # the activations whose own QDQ is measured ('tensor:' keys)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys([o for pair in self.sums.values() for o in pair] + self.sizes))


def _probe_graph(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, _Layer], weights: dict[int, TensorQuant],
                 biases: dict[int, TensorQuant], pl: _Placement, opts: Quantize
                 ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], _Probes]:
    """`model` (weightless, `detached`, with its arrays) plus, per quantized layer, a probe: a copy
    of the layer reading its planned QDQ input, weight and bias, beside the float layer."""
    work, arrays = detached(model)
    g = work.graph
    namer = Namer(g)
    probe_of: dict[int, tuple[str, str]] = {}  # layer idx -> (float output, probe output)
    wo_of: dict[int, str] = {}                  # static layer idx -> weight-only probe output
    qdq_done: dict[str, str] = {}
    n_model = len(g.node)

    def qdq(t: str) -> str:
        """`t` through the planned QuantizeLinear → DequantizeLinear (one pair per tensor)."""
        if t not in qdq_done:
            s, z = _param_inits(g, namer, t, pl.acts[t])
            q, dq = namer(f"{t}_probe_q"), namer(f"{t}_probe_dq")
            g.node.extend([helper.make_node("QuantizeLinear", [t, s, z], [q]),
                           helper.make_node("DequantizeLinear", [q, s, z], [dq])])
            qdq_done[t] = dq
        return qdq_done[t]

    for idx, wq in weights.items():
        layer = layers[idx]
        node = ix.nodes[idx]
        x = layer.x
        if idx in pl.static and layer.x in pl.acts:
            x = qdq(x)
        w = _dq_weight(g, namer, wq, namer(f"{layer.w}_probe"))
        ins = [x, w]
        if layer.b is not None:
            ins.append(_dq_weight(g, namer, biases[idx], namer(f"{layer.b}_probe")) if idx in biases else layer.b)
        probe_of[idx] = (node.output[0], _probe(g, namer, ix, idx, ins))
        if x != layer.x and opts.sensitive == "weight_only":  # the fallback's SNR: float input and bias
            wo_of[idx] = _probe(g, namer, ix, idx, [layer.x, w] + ([layer.b] if layer.b else []))
    measured = [t for t, q in pl.acts.items() if q.scheme != "shared"]
    # Every SNR is two sums, Σ ref² and Σ (ref − candidate)², computed inside onnxruntime
    # (ReduceSumSquare, float32): two scalars per pair leave the session instead of two copies
    # of every tensor. The candidate of a tensor is its planned QDQ, the same arithmetic as
    # `kernels.quant.fake_quantize` (float32 division, ties to even, saturation).
    pairs = {f"layer:{idx}": yp for idx, yp in probe_of.items()}
    pairs.update({f"weight_only:{idx}": (probe_of[idx][0], p) for idx, p in wo_of.items()})
    pairs.update({f"tensor:{t}": (t, qdq(t)) for t in measured})
    sums: dict[str, str] = {}  # tensor -> its ReduceSumSquare output
    sizes: dict[str, str] = {}  # reference tensor -> its Size output (to size the batches)

    def sum_sq(t: str) -> str:
        if t not in sums:
            sums[t] = namer(f"{t}_sumsq")
            g.node.append(helper.make_node("ReduceSumSquare", [t], [sums[t]], keepdims=0))
        return sums[t]

    outputs: dict[str, tuple[str, str]] = {}
    for key, (ref, cand) in pairs.items():
        diff = namer(f"{cand}_error")
        g.node.append(helper.make_node("Sub", [ref, cand], [diff]))
        outputs[key] = (sum_sq(ref), sum_sq(diff))
        if ref not in sizes:
            sizes[ref] = namer(f"{ref}_size")
            g.node.append(helper.make_node("Size", [ref], [sizes[ref]]))
    _place_after_producers(g, n_model)
    probes = _Probes(outputs, list(sizes.values()), measured)
    g.output.extend(onnx.ValueInfoProto(name=t) for t in probes.names)
    return work, arrays, probes


def _sensitivity(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, _Layer], weights: dict[int, TensorQuant],
                 biases: dict[int, TensorQuant], pl: _Placement, data: Dataset, opts: Quantize,
                 batch_size: int | None) -> dict[int, dict[str, float]]:
    """Per quantized node: SNR (dB) of its own quantization, measured in isolation on `data`."""
    work, arrays, probes = _probe_graph(model, ix, layers, weights, biases, pl, opts)
    weight_bytes = sum(int(a.nbytes) for a in arrays.values())
    # Basic optimizations only: the session runs on a few samples, where the layout changes' reordered
    # copies of the weights cost memory and win no time. Even those constant-fold each probe's
    # DequantizeLinear of a constant weight into a float copy of it: for weights kept on disk (a model
    # over 2 GB) that is a second copy of them all, so that model runs unoptimized.
    session = make_session(work, optimize="basic" if not has_disk_weights(work) else False, fuse_qdq=False,
                           threads=opts.threads, arena=False, weights=arrays)
    del work, arrays
    sub = data.take(min(opts.max_samples, opts.sensitivity_samples))
    outputs, names, measured = probes.sums, probes.names, probes.measured
    acc = {key: [0.0, 0.0] for key in outputs}
    size_names = set(probes.sizes)

    def batch_bytes(outs: list[np.ndarray]) -> float:
        # What the reference and the candidate tensors of one batch take (float32).
        return 2 * 4 * sum(int(v) for n, v in zip(names, outs) if n in size_names)

    for _feed, outs in _stream(session, names, sub, batch_size or batch_size_for(model, 0), "sensitivity",
                               batch_bytes=batch_bytes, weight_bytes=weight_bytes):
        values = dict(zip(names, outs))
        for key, (ref2, err2) in outputs.items():
            acc[key][0] += float(values[ref2])
            acc[key][1] += float(values[err2])

    def snr(key: str) -> float:
        ref, noise = acc.get(key, (0.0, 0.0))
        if noise <= 0.0:
            return math.inf
        return 10.0 * math.log10(ref / noise) if ref > 0 else -math.inf

    def combine(*values: float) -> float:
        total = sum(10.0 ** (-v / 10.0) for v in values if v != math.inf)
        return math.inf if total == 0 else -10.0 * math.log10(total)

    out: dict[int, dict[str, float]] = {}
    for idx, d in pl.decisions.items():
        if d.action != "quantize" or (d.output in pl.acts and pl.acts[d.output].scheme == "shared"):
            continue  # shared-scale ops add no error of their own
        parts: dict[str, float] = {}
        if f"layer:{idx}" in outputs:
            parts["layer_snr_db"] = snr(f"layer:{idx}")
        elif d.inputs:
            parts["input_snr_db"] = combine(*(snr(f"tensor:{t}") for t in d.inputs if t in measured))
        if d.output and d.output in measured:
            parts["output_snr_db"] = snr(f"tensor:{d.output}")
        if not parts:
            continue
        parts["snr_db"] = combine(*parts.values())
        if f"weight_only:{idx}" in outputs:
            parts["weight_only_snr_db"] = snr(f"weight_only:{idx}")
        out[idx] = {k: round(v, 2) if math.isfinite(v) else v for k, v in parts.items()}
    return out


def _place_after_producers(g: onnx.GraphProto, n_model: int) -> None:
    """Move each node appended after the first `n_model` (already in a valid order among
    themselves) to just after the last producer of its inputs, so that onnxruntime can consume
    a tensor (and free it) soon after it is made, not only at the end of the graph."""
    nodes = list(g.node)
    slot: dict[str, int] = {}  # tensor -> index of the model node it follows (-1: before all)
    for k, n in enumerate(nodes[:n_model]):
        for o in n.output:
            slot[o] = k
    after: dict[int, list[onnx.NodeProto]] = {}
    for n in nodes[n_model:]:
        k = max((slot.get(t, -1) for t in n.input if t), default=-1)
        after.setdefault(k, []).append(n)
        for o in n.output:
            slot[o] = k
    del g.node[:]
    g.node.extend(after.get(-1, ()))
    for k, n in enumerate(nodes[:n_model]):
        g.node.append(n)
        g.node.extend(after.get(k, ()))


def _probe(g: onnx.GraphProto, namer: Namer, ix: GraphIndex, idx: int, inputs: list[str]) -> str:
    """A copy of layer `idx` reading `inputs`, appended to `g`; returns its output name."""
    node = ix.nodes[idx]
    out = namer(f"{node.output[0]}_probe")
    probe = helper.make_node(node.op_type, inputs, [out], name=namer(f"{ix.labels[idx]}_probe"))
    probe.attribute.extend(node.attribute)
    g.node.append(probe)
    return out


# =============================================================================== the plan


def make_plan(model: onnx.ModelProto, data: Dataset | None, opts: Quantize, *,
              batch_size: int | None = None) -> tuple[QuantPlan, onnx.ModelProto]:
    """Decide everything (pure with respect to `model`): the plan and the model it applies to.

    The returned model is `model` itself, or a copy upgraded to the opset the plan needs.
    """
    batch_size = batch_size or opts.batch_size
    ix = GraphIndex(model)
    decisions: list[NodeDecision] = []
    layers: dict[int, _Layer] = {}
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
        pattern = _excluded(ix, idx, opts)
        if pattern:
            decisions.append(NodeDecision(label, op, "float", f"matches exclude/keep_float pattern {pattern!r}"))
            continue
        match = _match_layer(ix, idx)
        if isinstance(match, str):
            decisions.append(NodeDecision(label, op, "skip", match))
            continue
        layers[idx] = match
    notes: list[str] = []
    if n_qdq:
        decisions.append(NodeDecision(f"QuantizeLinear/DequantizeLinear ×{n_qdq}", "QDQ", "skip",
                                      "already quantized: existing QDQ nodes are left as they are"))
    current = _opset(model)
    target = max(current, opts.required_opset())
    plan = QuantPlan(opset=target, nodes=decisions, notes=notes)
    if not layers:
        return plan, model

    if target > current:
        upgraded = _upgrade_opset(model, target)
        if isinstance(upgraded, str):
            plan.nodes = decisions + [NodeDecision(ix.labels[i], layers[i].op, "skip", upgraded) for i in layers]
            return plan, model
        model, how = upgraded
        notes.append(f"opset upgraded {current} → {target} ({how}); IR version {model.ir_version}")
        ix = GraphIndex(model)
        layers = {}
        for idx in range(len(ix.nodes)):
            if ix.nodes[idx].op_type in opts.op_types and not _excluded(ix, idx, opts):
                match = _match_layer(ix, idx)
                if not isinstance(match, str):
                    layers[idx] = match

    # Which layers may run with quantized activations.
    wants_static = opts.activations != "none"
    static_kind = opts.weights in ("int8", "uint8")
    candidates = {i for i, lay in layers.items() if _block_for(lay, opts) == 0} if static_kind else set()
    if wants_static and not static_kind:
        notes.append(f"weights={opts.weights}: onnxruntime has no integer conv/gemm kernel for these weights, "
                     "so activations stay float (weight-only)")
    elif wants_static and len(candidates) < len(layers):
        notes.append("blocked weights are weight-only (activations stay float for those layers)")
    if wants_static and static_kind and opts.activations == "int8" and opts.weights == "uint8":
        notes.append("int8 activations with uint8 weights: onnxruntime has no fused kernel for this pair "
                     "(the QDQ graph stays correct but runs in float); prefer uint8 activations")
    ranges: Mapping[str, tuple[float, float]] = {}
    unasked: frozenset[str] = frozenset()
    if wants_static and candidates and data is None:
        notes.append("no calibration data: activations left in float, weights quantized (weight-only); "
                     "pass data to quantize activations")
        candidates = set()
    forced: dict[int, str] = {}
    for idx in sorted(candidates):
        why = _float_on_input(ix, layers[idx])
        if why:
            forced[idx] = why
    if wants_static and candidates:
        # Calibrate only what the placement can ask for: a dry run on stand-in ranges, where
        # every candidate tensor is calibrated and every Concat takes one scale, asks for a
        # superset of what the real placement asks (bench_quantize's MiniLM: 24 of its 230
        # candidate tensors).
        tensors = _calibration_tensors(ix, layers, candidates)
        dry = _Asking(set(tensors), lambda t: (-1.0, 1.0))
        _place(ix, layers, candidates, dry, opts, forced)
        unasked = frozenset(tensors) - dry.asked.keys()
        tensors = [t for t in tensors if t in dry.asked]
        try:
            observers = calibrate(model, data, tensors, opts.calibration, batch_size=batch_size,
                                  max_samples=opts.max_samples, threads=opts.threads,
                                  feature_axis=_feature_axes(ix))
        except GraphOptError as exc:
            notes.append(f"calibration failed, activations left in float (weight-only): {exc}")
            observers, candidates, forced = {}, set(), {}
        release_memory()
        ranges = _Ranges(observers, opts)
        n = min(len(data), opts.max_samples)
        notes.append(f"activations {opts.activations} per tensor, asymmetric, ranges by {opts.calibration} "
                     f"over {n} samples ({len(ranges)} tensors observed in one streaming pass; "
                     f"{len(unasked)} other candidate tensors skipped: no placement could use them)")

    if isinstance(ranges, _Ranges) and opts.calibration != "minmax":  # minmax ranges cost nothing
        ranges.prefetch(lambda r: _place(ix, layers, candidates, r, opts, forced, unasked))
    pl = _place(ix, layers, candidates, ranges, opts, forced, unasked)
    quantized: dict[tuple[int, bool], TensorQuant] = {}
    weights, biases = _weights_and_biases(layers, pl, opts, quantized)

    threshold = opts.threshold_db()
    sens: dict[int, dict[str, float]] = {}
    if threshold is not None and data is not None and weights:
        try:
            sens = _sensitivity(model, ix, layers, weights, biases, pl, data, opts, batch_size)
        except GraphOptError as exc:  # the probe model does not load or run (e.g. a custom op onnxruntime lacks)
            notes.append(f"sensitivity not measured ({exc}); every planned node is quantized")
        release_memory()
        weight_only: dict[int, str] = {}
        for idx, values in sens.items():
            if values["snr_db"] >= threshold:
                continue
            detail = ", ".join(f"{k} {v}" for k, v in values.items() if k != "snr_db")
            if opts.sensitive == "weight_only" and values.get("weight_only_snr_db", -math.inf) >= threshold:
                weight_only[idx] = (f"weight-only: quantized activations too lossy (SNR {values['snr_db']:.1f} dB "
                                    f"< {threshold:g} dB; {detail})")
            else:
                forced[idx] = f"sensitive: SNR {values['snr_db']:.1f} dB < {threshold:g} dB ({detail})"
        if forced or weight_only:
            pl = _place(ix, layers, candidates - set(weight_only), ranges, opts, forced, unasked)
            weights, biases = _weights_and_biases(layers, pl, opts, quantized)
        for idx, values in sens.items():
            if idx in pl.decisions and idx not in forced:
                pl.decisions[idx].sensitivity = values
                if idx in weight_only:
                    pl.decisions[idx].reason = weight_only[idx]
        notes.append(f"sensitivity threshold {threshold:g} dB: {len(forced)} of {len(sens)} nodes kept float, "
                     f"{len(weight_only)} layers weight-only")

    for idx in sorted(set(pl.decisions) | set(forced)):
        if idx in forced:
            decisions.append(NodeDecision(ix.labels[idx], ix.nodes[idx].op_type, "float", forced[idx],
                                          sensitivity=sens.get(idx)))
        else:
            d = pl.decisions[idx]
            if idx in biases:
                d.bias = biases[idx].tensor
            decisions.append(d)
    for tq in [*weights.values(), *biases.values(), *pl.acts.values()]:
        plan.add(tq)
    for idx, lay in layers.items():
        if idx in forced or idx not in pl.static or lay.b is None or idx in biases:
            continue
        reason = lay.bias_float or "bias kept float"
        d = pl.decisions.get(idx)
        if d is not None:
            d.reason = (d.reason + "; " if d.reason else "") + f"bias float: {reason}"
    return plan, model


def _float_on_input(ix: GraphIndex, layer: _Layer) -> str:
    """Why a Conv reading a graph input stays float ('' when it does not). Its input is float
    anyway, so float costs no QDQ there, while int8 needs the input's own QuantizeLinear and:

    - with a reduction of fewer than `MIN_INT8_REDUCTION` products per output (a 3×3 stem on one
      channel: 9) gains nothing on the arithmetic;
    - with input channels per group that are not a multiple of `INT8_CHANNEL_PACK` (an RGB image's
      3) misses onnxruntime's fast symmetric int8 convolution, which packs input channels in fours
      (MLAS ``MlasConvSymPackWSize``), and runs its generic int8 kernel: YOLOv8n's 3→16 3×3 stem
      took 1,015 µs there against 518 µs in float (benchmarks/profile_quantize.py at cc95d9f; that
      run's results are benchmarks/results/profile_quantize.md as committed in d15bca2). A
      depthwise Conv (one input channel per group) has a fast kernel of its own.
    """
    if layer.op != "Conv" or layer.x not in ix.graph_inputs:
        return ""
    shape = layer.wv.shape
    k = int(np.prod(shape[1:]))
    if k < MIN_INT8_REDUCTION:
        return (f"float: reduction of {k} < {MIN_INT8_REDUCTION} products per output on the graph input "
                "(int8 gains nothing there and the input would need its own QuantizeLinear)")
    depthwise = shape[1] == 1 and _attr(ix.nodes[layer.idx], "group", 1) > 1
    if shape[1] % INT8_CHANNEL_PACK and not depthwise:
        return (f"float: {shape[1]} input channels per group on the graph input, not a multiple of "
                f"{INT8_CHANNEL_PACK} (onnxruntime's fast int8 convolution takes them in fours; its generic "
                "kernel is slower than float there, and the input would need its own QuantizeLinear)")
    return ""


def _weights_and_biases(layers: dict[int, _Layer], pl: _Placement, opts: Quantize,
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


def _calibration_tensors(ix: GraphIndex, layers: dict[int, _Layer], candidates: set[int]) -> list[str]:
    out: list[str] = []
    for idx, node in enumerate(ix.nodes):
        op = node.op_type
        if idx in layers:
            if idx in candidates:
                out += [layers[idx].x, node.output[0]]
        elif op in OWN_OPS or op in ABSORBED_OPS:
            out += [t for t in node.input if t and not ix.is_const(t)][: None if op in ("Concat", "Add", "Mul") else 1]
            out += node.output[:1]
    return list(dict.fromkeys(t for t in out if t))


# =============================================================================== opset


def _upgrade_opset(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, str] | str:
    """The model at opset `target` and how it got there, or why it cannot."""
    current = _opset(model)
    ops = {n.op_type for n in all_nodes(model.graph) if n.domain in ("", "ai.onnx")}
    unchanged = True
    for op in ops:
        try:
            unchanged &= onnx.defs.get_schema(op, target).since_version <= current
        except Exception:
            unchanged = False
    if unchanged:
        out = copy_model(model)
        for imp in out.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = target
        how = "opset import bumped: no op of the model changed between the two versions"
    else:
        try:
            out = onnx.version_converter.convert_version(model, target)
            onnx.checker.check_model(out)
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return f"cannot upgrade opset {current} → {target} (needed by weights): {text}"
        how = "onnx.version_converter"
    try:
        min_ir = helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    except Exception:
        min_ir = out.ir_version
    out.ir_version = max(out.ir_version, int(min_ir))
    if how == "onnx.version_converter":
        try:
            make_session(out)
        except GraphOptError as exc:
            return f"opset {current} → {target} by onnx.version_converter gives a model onnxruntime refuses: {exc}"
    return out, how


# =============================================================================== apply


def _int_tensor(name: str, dtype: str, codes: np.ndarray) -> TensorProto:
    codes = np.asarray(codes)
    if dtype in ("int4", "uint4"):
        return helper.make_tensor(name, _ONNX_DTYPES[dtype], codes.shape, pack_int4(codes).tobytes(), raw=True)
    if dtype in ("int2", "uint2"):
        return helper.make_tensor(name, _ONNX_DTYPES[dtype], codes.shape, pack_int2(codes).tobytes(), raw=True)
    np_dtype = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}[dtype]
    return numpy_helper.from_array(codes.astype(np_dtype), name)


def _param_inits(g: onnx.GraphProto, namer: Namer, base: str, tq: TensorQuant) -> tuple[str, str]:
    """Scale and zero-point initializers of `tq` ('' zero point for int32 biases, whose zero point is
    0 by definition; onnxruntime's QGemm fusion needs the weight's zero point present, even at 0)."""
    s = namer(f"{base}_scale")
    g.initializer.append(numpy_helper.from_array(tq.scale.astype(np.float32), s))
    if tq.role == "bias":
        return s, ""
    z = namer(f"{base}_zero_point")
    g.initializer.append(_int_tensor(z, tq.dtype, tq.zero_point))
    return s, z


def _dq_weight(g: onnx.GraphProto, namer: Namer, tq: TensorQuant, out: str) -> str:
    """Add the integer initializer of a weight/bias and its DequantizeLinear writing `out`."""
    q = namer(f"{tq.tensor}_quantized")
    g.initializer.append(_int_tensor(q, tq.dtype, tq.codes))
    s, z = _param_inits(g, namer, tq.tensor, tq)
    attrs = {}
    if tq.axis is not None:
        attrs["axis"] = tq.axis
    if tq.block_size is not None:
        attrs["block_size"] = tq.block_size
    g.node.append(helper.make_node("DequantizeLinear", [q, s] + ([z] if z else []), [out],
                                   name=namer(f"{tq.tensor}_DequantizeLinear"), **attrs))
    return out


def apply_plan(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Insert the plan's QuantizeLinear/DequantizeLinear nodes into a copy of `model`.

    Weights and biases: integer initializer + DequantizeLinear writing the weight's old name (the
    float initializer, or its Constant node, is removed). Activations: Q → DQ after the producer;
    a tensor with ``consumers=None`` keeps its name on the DQ output (the producer's output is
    renamed), otherwise only the listed nodes read the new DQ output.
    """
    if _opset(model) < plan.opset:
        raise ValueError(f"the plan needs opset {plan.opset}, the model has {_opset(model)}")
    ix = GraphIndex(model)
    out = copy_model(model)
    g = out.graph
    namer = Namer(g)
    label_idx = {label: i for i, label in enumerate(ix.labels)}
    old_nodes = list(g.node)
    del g.node[:]

    # Weights and biases: DequantizeLinear nodes first (they read initializers only).
    replaced = {t.tensor for t in plan.tensors.values() if t.role in ("weight", "bias")}
    drop_nodes = {ix.producer[t] for t in replaced if t in ix.producer}
    keep_inits = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    kept_inputs = [i for i in g.input if i.name not in replaced]
    del g.input[:]
    g.input.extend(kept_inputs)
    for tq in plan.tensors.values():
        if tq.role in ("weight", "bias"):
            if tq.codes is None:
                raise ValueError(f"plan entry {tq.tensor!r} has no codes (plans read from JSON cannot be applied)")
            _dq_weight(g, namer, tq, tq.tensor)

    # Activations.
    param_names: dict[str, tuple[str, str]] = {}
    rename: dict[str, str] = {}              # producer output -> new float name
    redirect: dict[tuple[int, str], str] = {}  # (reader node, tensor) -> DQ output
    after: dict[int, list[onnx.NodeProto]] = {}
    acts = [t for t in plan.tensors.values() if t.role == "activation"]
    for tq in sorted(acts, key=lambda q: q.shared_with is not None):
        t = tq.tensor
        if tq.shared_with is not None and tq.shared_with in param_names:
            s, z = param_names[tq.shared_with]
        else:
            s, z = _param_inits(g, namer, t, tq)
        param_names[t] = (s, z)
        q = namer(f"{t}_quantized")
        if tq.consumers is None:
            src = namer(f"{t}_float")
            rename[t] = src
            dq_out = t
        else:
            src = t
            dq_out = namer(f"{t}_dequantized")
            for label in tq.consumers:
                redirect[(label_idx[label], t)] = dq_out
        nodes = [helper.make_node("QuantizeLinear", [src, s, z], [q], name=namer(f"{t}_QuantizeLinear")),
                 helper.make_node("DequantizeLinear", [q, s, z], [dq_out], name=namer(f"{t}_DequantizeLinear"))]
        after.setdefault(ix.producer.get(t, -1), []).extend(nodes)
    g.node.extend(after.get(-1, []))
    for idx, node in enumerate(old_nodes):
        if idx in drop_nodes:
            continue
        for slot, name in enumerate(node.input):
            if (idx, name) in redirect:
                node.input[slot] = redirect[(idx, name)]
        for slot, name in enumerate(node.output):
            if name in rename:
                node.output[slot] = rename[name]
        g.node.append(node)
        g.node.extend(after.get(idx, []))
    return out


# =============================================================================== report


def _report(plan: QuantPlan, report: PassReport, before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    for d in plan.nodes:
        if d.action != "quantize":
            continue
        details: dict[str, object] = {"op": d.op}
        if d.weight:
            w = plan.tensors[d.weight]
            details["weight"] = {"dtype": w.dtype, "scheme": w.scheme, "granularity": w.granularity,
                                 **({"axis": w.axis} if w.axis is not None else {}),
                                 **({"block_size": w.block_size} if w.block_size else {})}
            if d.bias:
                details["bias"] = "int32"
        details["input"] = d.inputs or "float"
        details["output"] = d.output or "float"
        if d.absorbed:
            details["absorbed"] = d.absorbed
        if d.sensitivity:
            details["snr_db"] = d.sensitivity.get("snr_db")
        if d.reason:
            details["note"] = d.reason
        report.rewrite(d.node, **details)
    for note in plan.notes:
        report.note(note)
    before_bytes, after_bytes = serialized_bytes(before), serialized_bytes(after)
    report.note(f"model bytes {before_bytes} → {after_bytes} ({before_bytes / max(after_bytes, 1):.2f}× smaller)")
    report.note("plan: " + plan.to_json(compact=True))
