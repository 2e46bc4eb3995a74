"""quantize: store weights as integers and run activations in int8, as onnxruntime fuses QDQ.

Before / after (static activations, the default when calibration data is given)::

    x → Conv(W, b) → Relu → MaxPool → Gemm(W2, b2) → y
    x → Q → DQ → Conv(DQ(Wq), DQ(bq)) → Relu → Q → DQ → MaxPool → Q → DQ → Gemm(DQ(W2q), DQ(b2q)) → y

onnxruntime (optimizations on) fuses each group into one integer kernel (QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat, QLinearAdd/Concat/pooling, MatMulNBits for blocked int4).

Plan, then apply: `make_plan` decides every tensor's dtype, scale, zero point, axis and block (and
each activation's calibrated range) as a `passes._qplan.QuantPlan` (JSON; the report carries it);
`apply_plan` inserts the nodes in one step. A weight's DequantizeLinear writes the weight's old
name, the float weight is removed, and the file really shrinks.

Numerics (`graph_opt.kernels.quant`): ``q = saturate(round(x/s) + z)``, ``x̂ = (q − z)·s``.
- Weights ``int8|uint8|int4``: symmetric, per output channel (Conv axis 0; Gemm 0 if transB else
  1; MatMul the last axis) or per tensor; a batched MatMul weight with quantized activations is
  per tensor (onnxruntime's fused kernels reject per-column scales there). ``block_size`` > 0:
  blocks along the reduction axis; int4 MatMul/Gemm default to blocks of 128 (weight-only).
  ``reduce_range``: 7-bit int8 weights with quantized activations; ``'auto'`` (default) when the
  ``target`` CPU (``host``, or a name of `graph_opt.target.NAMED`) is x86 without int8 dot
  products, whose u8×s8 kernels saturate (docs/design.md, fact 6). The report names the target.
- ``rounding=gptq``: the codes of 2-D Gemm/MatMul weights follow the data (GPTQ,
  `kernels.quant.gptq_quantize`): each input column's rounding error is spread over the columns
  not yet rounded through the inverse of the layer's input second moment, measured on the float
  model's activations (not chained through the quantized layers). Same grid, same file.
- ``ternary`` (TWN: ``Δ = 0.7·mean|w|``, codes ``sign(w)·[|w| > Δ]``, ``α = mean(|w| : |w| > Δ)``)
  and ``binary`` (``sign(w)``, ``α = mean|w|``): int2 codes with α per channel as the scale.
- Activations ``uint8|int8``: one asymmetric per-tensor scale from the calibrated range
  (``calibration``: minmax, percentile, entropy, mse; `graph_opt.kernels.calib`); the range
  contains 0, and [0, max] puts the zero point at qmin so a Relu/Clip before the Q can go.
  Clipping methods keep the value every feature reaches in every sample (per-feature floor) on
  tensors read only linearly (`_LINEAR_READERS`), so a transformer's outlier dimensions survive.
- Bias of a quantized layer: int32 with ``s_b = s_x·s_w``, zero point 0; kept float when it would
  overflow, for Gemm with alpha/beta ≠ 1, or a C that is not one value per output column.

Calibration is one streaming pass (at most ``max_samples``; batches sized by memory, each dropped
after it updates the observers) over a weightless copy run by onnxruntime. minmax reduces each
observed tensor to scalars inside onnxruntime and derives ranges through monotone and
data-movement ops; histogram methods observe in a second thread. Only tensors a placement can ask
for are observed.

Placement: Conv/Gemm/MatMul (``op_types``) with a constant float32 weight get weight, bias and
input QDQ, and an output QDQ after an absorbed Relu/Clip (a Gemm/MatMul output only when a
quantized node reads it). Data-movement ops (MaxPool, Reshape, Flatten, Transpose, Split, Slice,
Gather, nearest Resize …) share their input's scale; Add, Mul, Concat and pooling get their own.
Kept float, with the reason: a Concat whose input ranges differ by more than
``CONCAT_RANGE_RATIO`` (one scale would erase the small input); a Conv on a graph input with
fewer than ``MIN_INT8_REDUCTION`` products per output, or whose input channels per group are not
a multiple of ``INT8_CHANNEL_PACK`` (docs/design.md, fact 5); ``exclude``/``keep_float`` patterns;
a layer whose isolated SNR (input + weight + output quantization, measured on
``sensitivity_samples`` inside onnxruntime) is below ``sensitivity_snr_db`` ('auto': 25 dB for
8-bit, 10 dB for int4; or weight-only with ``sensitive='weight_only'``). BatchNormalization after
a Conv/Gemm is folded first when activations are quantized. ``min_snr_db``: after planning, the
fewest least robust layers are kept float until the whole model holds the floor
(`graph_opt/budget.py`).

Weight-only (DQ(weight) → float op): ``activations=none``; int4/ternary/binary or blocked weights;
static activations requested without data (with a note). Opset: per-channel DQ needs 13, int4 and
blocks 21, int2 25; a lower model is upgraded (opset bump when no used op changed, else
``onnx.version_converter``, then checked to load), and the report says so.

Skipped, with the reason: op types not in ``op_types``; weights not constant, not float32,
non-finite, shared (an If/Loop/Scan body read counts) or 1-D; MatMul with the constant on the
left or two activation operands; already quantized layers and quantized ops (never twice); layers
inside subgraphs; unobserved or non-float activations; sensitive layers; mismatched Concats; a
model whose opset cannot be upgraded.

Lossy, bounded per element: a weight by s/2 (ternary/binary: |w − α·code|, large by design), an
activation inside its range by s_x/2 (outside it saturates), a bias by s_x·s_w/2. Weights already
on the grid come back exactly with ``activations=none``. Measured fidelity, speed and cost:
benchmarks/RESULTS.md, "Quantization" (`bench_quantize.py`, `profile_quantize.py`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Container, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.budget import exact_pattern, hold_floor, name_nodes
from graph_opt.data import Dataset, batch_size_for, random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.kernels.calib import HistogramObserver, MinMaxObserver
from graph_opt.kernels.quant import compute_params
from graph_opt.model_io import copy_model, detached, has_disk_weights
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._fold import apply_folds, find_folds
from graph_opt.passes._graph import GraphIndex, Namer, all_nodes, infer_shapes
from graph_opt.passes._qplan import NodeDecision, QuantPlan, TensorQuant
from graph_opt.passes.quantize.layers import (
    INT8_CHANNEL_PACK,
    MIN_INT8_REDUCTION,
    Layer,
    excluded,
    float_on_input,
    match_layers,
    matching_pattern,
    node_attr,
    opset_of,
    rematch_layers,
)
from graph_opt.passes.quantize.weights import INT4_AUTO_BLOCK, attach_hessians, block_for, weights_and_biases
from graph_opt.passes.quantize.emit import apply_plan, dq_weight, param_inits, report_plan
from graph_opt.passes.quantize.ops import ABSORBED_OPS, LAYER_OPS, OWN_OPS, QUANTIZED_OPS, SHARED_OPS
from graph_opt.progress import progress
from graph_opt.target import NAMED as NAMED_TARGETS
from graph_opt.target import resolve as resolve_target
from graph_opt.verify import Reference, make_session, release_memory

log = logging.getLogger(__name__)

# One shared output scale cannot serve Concat inputs whose ranges differ by more than this.
CONCAT_RANGE_RATIO = 10.0
AUTO_SNR_DB = {"int8": 25.0, "uint8": 25.0, "int4": 10.0, "ternary": None, "binary": None}
# Automatic batches of the calibration and sensitivity runs: about this many bytes of requested
# outputs per batch (every observed tensor is an output), at most STREAM_MAX_BATCH samples.
STREAM_BUDGET_BYTES = 64 << 20
STREAM_MAX_BATCH = 64
# Sessions that reduce inside onnxruntime (minmax calibration, sensitivity) return scalars, but
# onnxruntime's own buffers still grow with the batch: a few samples per run amortize the cost
# of a run, more only hold memory, unless the weights each run reads outweigh the batch.
REDUCE_BATCH = 4


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
    reduce_range: bool | Literal["auto"] = "auto"
    target: str = "host"
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
    rounding: Literal["nearest", "gptq"] = "nearest"

    def __post_init__(self) -> None:
        if self.target != "host" and self.target not in NAMED_TARGETS:
            raise ValueError(f"unknown target {self.target!r} (known: host, {', '.join(NAMED_TARGETS)})")
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

    @property
    def weights_reduced(self) -> bool:
        """int8 weights on a 7-bit grid: asked for, or ('auto') when the target's u8×s8 kernels saturate."""
        return resolve_target(self.target).reduce_range if self.reduce_range == "auto" else bool(self.reduce_range)

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        # `model` is the caller's (edits_input is False): the plan only reads it, and apply_plan,
        # apply_folds and the floor's runs each write a copy.
        if self.min_snr_db is not None:
            return self._run_with_floor(copy_model(model), report, ctx)
        if self.weights == "int8" and self.activations != "none":
            report.note(f"target {resolve_target(self.target).describe()}: int8 weights on a "
                        + ("7-bit grid (reduce_range)" if self.weights_reduced else "full 8-bit grid"))
        private = False
        if self.activations != "none" and any(n.op_type == "BatchNormalization" for n in model.graph.node):
            # A BatchNormalization between a Conv/Gemm and its output QDQ would run in float
            # between int8 layers, slower than the fp32 model; folding is exact.
            ix = GraphIndex(model)
            folds, _ = find_folds(ix)
            if folds:
                report.note(f"folded {len(folds)} BatchNormalization into their Conv/Gemm first "
                            "(exact), so the layer outputs stay int8")
                model, private = apply_folds(model, ix, folds), True
        plan, work = make_plan(model, ctx.data, self)
        for d in plan.nodes:
            if d.action != "quantize":
                report.skip(d.node, d.reason)
        if plan.empty:
            return model if private else copy_model(model)
        out = apply_plan(work, plan)
        report_plan(plan, report, model, out)
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
        axes_input = opset_of(model) >= 18  # ReduceMax/ReduceMin take axes as an input from opset 18
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
            feed = {k: v[start:stop] for k, v in data.inputs.items()}
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
class Placement:
    acts: dict[str, TensorQuant] = field(default_factory=dict)
    decisions: dict[int, NodeDecision] = field(default_factory=dict)
    static: set[int] = field(default_factory=set)  # layers whose activation input is quantized


def _place(ix: GraphIndex, layers: dict[int, Layer], candidates: set[int], ranges: Mapping[str, tuple[float, float]],
           opts: Quantize, forced_float: dict[int, str], unasked: Container[str] = frozenset()) -> Placement:
    """Decide which activation tensors get a QDQ (see 'Placement' in the module docstring).

    `unasked`: tensors left out of calibration because no placement could use them (see
    `make_plan`); a Gemm/MatMul output among them is reported as the float output it is."""
    pl = Placement()
    region: set[str] = set()               # tensors whose producer is quantized: every reader reads DQ
    pending: dict[str, tuple[int, str | None]] = {}  # Gemm/MatMul outputs quantized only if read quantized
    readers: dict[str, list[str]] = {}     # float-produced tensors: the quantized readers (labels)

    def keep(t: str) -> bool:
        return matching_pattern(opts.keep_float, t) is not None

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
        if (r is not None and ix.nodes[r].op_type in ABSORBED_OPS and not excluded(ix, r, opts)
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
        if excluded(ix, idx, opts) or idx in forced_float or node.domain not in ("", "ai.onnx"):
            continue
        data_inputs = [t for t in node.input if t and not ix.is_const(t)]
        if op in SHARED_OPS:
            if not node.input or node.input[0] not in data_inputs or not quantized(node.input[0]):
                continue
            src, outs = node.input[0], [o for o in node.output if o]
            if not outs or (len(outs) > 1 and op != "Split") or any(keep(o) for o in outs):
                continue  # (a MaxPool's second output holds int64 indices)
            if op == "Resize" and node_attr(node, "mode", b"nearest") != b"nearest":
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


def _probe_graph(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], weights: dict[int, TensorQuant],
                 biases: dict[int, TensorQuant], pl: Placement, opts: Quantize
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
            s, z = param_inits(g, namer, t, pl.acts[t])
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
        w = dq_weight(g, namer, wq, namer(f"{layer.w}_probe"))
        ins = [x, w]
        if layer.b is not None:
            ins.append(dq_weight(g, namer, biases[idx], namer(f"{layer.b}_probe")) if idx in biases else layer.b)
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


def _sensitivity(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], weights: dict[int, TensorQuant],
                 biases: dict[int, TensorQuant], pl: Placement, data: Dataset, opts: Quantize,
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
    decisions, layers, n_qdq = match_layers(ix, opts)
    notes: list[str] = []
    if n_qdq:
        decisions.append(NodeDecision(f"QuantizeLinear/DequantizeLinear ×{n_qdq}", "QDQ", "skip",
                                      "already quantized: existing QDQ nodes are left as they are"))
    current = opset_of(model)
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
        layers = rematch_layers(ix, opts)

    if opts.rounding == "gptq":
        attach_hessians(model, ix, layers, data, notes)

    # Which layers may run with quantized activations.
    wants_static = opts.activations != "none"
    static_kind = opts.weights in ("int8", "uint8")
    candidates = {i for i, lay in layers.items() if block_for(lay, opts) == 0} if static_kind else set()
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
        why = float_on_input(ix, layers[idx])
        if why:
            forced[idx] = why
    if wants_static and candidates:
        # Calibrate only what the placement can ask for: a dry run on stand-in ranges, where
        # every candidate tensor is calibrated and every Concat takes one scale, asks for a
        # superset of what the real placement asks (often a small share of the candidates).
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
    weights, biases = weights_and_biases(layers, pl, opts, quantized)

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
            weights, biases = weights_and_biases(layers, pl, opts, quantized)
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


def _calibration_tensors(ix: GraphIndex, layers: dict[int, Layer], candidates: set[int]) -> list[str]:
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
    current = opset_of(model)
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
