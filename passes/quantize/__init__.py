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

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx
from onnx import helper

from graph_opt.budget import exact_pattern, hold_floor, name_nodes
from graph_opt.data import Dataset, random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.model_io import copy_model
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._fold import apply_folds, find_folds
from graph_opt.passes._graph import GraphIndex, all_nodes
from graph_opt.passes._qplan import NodeDecision, QuantPlan, TensorQuant
from graph_opt.passes.quantize.layers import (
    INT8_CHANNEL_PACK,
    MIN_INT8_REDUCTION,
    float_on_input,
    match_layers,
    opset_of,
    rematch_layers,
)
from graph_opt.passes.quantize.weights import INT4_AUTO_BLOCK, attach_hessians, block_for, weights_and_biases
from graph_opt.passes.quantize import calibration
from graph_opt.passes.quantize import sensitivity
from graph_opt.passes.quantize.emit import apply_plan, report_plan
from graph_opt.passes.quantize.placement import CONCAT_RANGE_RATIO, calibration_tensors, place
from graph_opt.passes.quantize.ops import ABSORBED_OPS, LAYER_OPS, OWN_OPS, QUANTIZED_OPS, SHARED_OPS
from graph_opt.target import NAMED as NAMED_TARGETS
from graph_opt.target import resolve as resolve_target
from graph_opt.verify import Reference, make_session, release_memory

log = logging.getLogger(__name__)

AUTO_SNR_DB = {"int8": 25.0, "uint8": 25.0, "int4": 10.0, "ternary": None, "binary": None}


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


# =============================================================================== placement


# =============================================================================== sensitivity


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
        tensors = calibration_tensors(ix, layers, candidates)
        dry = calibration._Asking(set(tensors), lambda t: (-1.0, 1.0))
        place(ix, layers, candidates, dry, opts, forced)
        unasked = frozenset(tensors) - dry.asked.keys()
        tensors = [t for t in tensors if t in dry.asked]
        try:
            observers = calibration.calibrate(model, data, tensors, opts.calibration, batch_size=batch_size,
                                  max_samples=opts.max_samples, threads=opts.threads,
                                  feature_axis=calibration._feature_axes(ix))
        except GraphOptError as exc:
            notes.append(f"calibration failed, activations left in float (weight-only): {exc}")
            observers, candidates, forced = {}, set(), {}
        release_memory()
        ranges = calibration.Ranges(observers, opts)
        n = min(len(data), opts.max_samples)
        notes.append(f"activations {opts.activations} per tensor, asymmetric, ranges by {opts.calibration} "
                     f"over {n} samples ({len(ranges)} tensors observed in one streaming pass; "
                     f"{len(unasked)} other candidate tensors skipped: no placement could use them)")

    if isinstance(ranges, calibration.Ranges) and opts.calibration != "minmax":  # minmax ranges cost nothing
        ranges.prefetch(lambda r: place(ix, layers, candidates, r, opts, forced, unasked))
    pl = place(ix, layers, candidates, ranges, opts, forced, unasked)
    quantized: dict[tuple[int, bool], TensorQuant] = {}
    weights, biases = weights_and_biases(layers, pl, opts, quantized)

    threshold = opts.threshold_db()
    sens: dict[int, dict[str, float]] = {}
    if threshold is not None and data is not None and weights:
        try:
            sens = sensitivity.measure(model, ix, layers, weights, biases, pl, data, opts, batch_size)
        except GraphOptError as exc:  # the probe model does not load or run (e.g. a custom op onnxruntime lacks)
            notes.append(f"sensitivity not measured ({exc}); every planned node is quantized")
        release_memory()
        sensitive, weight_only = sensitivity.split_sensitive(sens, threshold, opts.sensitive)
        forced.update(sensitive)
        if forced or weight_only:
            pl = place(ix, layers, candidates - set(weight_only), ranges, opts, forced, unasked)
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
