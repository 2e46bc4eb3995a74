"""quantize: store weights as integers and run activations in int8, as onnxruntime fuses QDQ.

Before / after (static activations, the default when calibration data is given)::

    x → Conv(W, b) → Relu → MaxPool → Gemm(W2, b2) → y
    x → Q → DQ → Conv(DQ(Wq), DQ(bq)) → Relu → Q → DQ → MaxPool → Q → DQ → Gemm(DQ(W2q), DQ(b2q)) → y

onnxruntime (optimizations on) fuses each group into one integer kernel (QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat, QLinearAdd/Concat/pooling, MatMulNBits for blocked int4).

Plan, then apply: `make_plan` decides every tensor's dtype, scale, zero point, axis and block (and
each activation's calibrated range) as a `passes._qplan.QuantPlan` (JSON; the report carries it);
`apply_plan` inserts the nodes in one step. A weight's DequantizeLinear writes the weight's old
name, the float weight is removed, and the file really shrinks. One module per seam:

- `layers`: which Conv/Gemm/MatMul (``op_types``) can be quantized, or why not;
- `weights`: weight and bias codes (int8/uint8/int4 grids, 7-bit ``reduce_range``, GPTQ
  rounding of Gemm/MatMul and 1×1 Conv weights, ternary/binary) and their error bounds;
  ``rounding='auto'`` (default) is GPTQ for unblocked 8-bit and for int4 weights with calibration data;
- `bias`: ``bias_correction``, the expected output shift of rounded weights removed from the bias;
- `gptq`: ``rounding=gptq`` for block-wise (int4) weights, streamed one layer input at a time;
- `chain`: ``chain`` (stages, ``auto`` or ``off``): the unblocked GPTQ layers rounded again, stage
  by stage in depth order, against the inputs they get in the model as planned (weights and
  activations quantized before them), aiming at the weight that corrects the error reaching them;
  ``auto``: `AUTO_CHAIN` stages on a model without attention, off on a transformer
  (`passes._smooth.has_attention`); ``off`` (default): output SNR rose on CNNs, but not the task
  metrics, and YOLOv8n's class agreement fell;
- `calibration`: one streaming onnxruntime pass for the activation ranges (minmax, percentile,
  entropy, mse; per-feature floors);
- `search`: ``calibration='output'`` (default): each activation read only by quantized layers
  takes the fraction of its min/max range with the least per-position error at their outputs;
- `placement`: which activations get a QDQ (layers, shared-scale data movement, own-scale
  Add/Mul/Concat/pooling) and which stay float, with the reason;
- `sensitivity`: each quantized node's own SNR in isolation, against ``sensitivity_snr_db``;
- `speed`: MatMul + bias as Gemm, the target's activation type, and the latency gate;
- `plan`: the order of those decisions, the opset upgrade, weight-only fallbacks;
- `emit`: the nodes written, and the report; ``int4_format='matmulnbits'`` writes a weight-only
  int4 MatMul as one ``com.microsoft.MatMulNBits`` (the same weights, bit for bit), ``'dq'`` as
  DequantizeLinear(int4, block) → MatMul (the default), standard ONNX that onnxruntime fuses into
  the same MatMulNBits kernel at load, that `reconstruct` refits and other runtimes (OpenVINO)
  read; MatMulNBits loads faster and with less memory (benchmarks/RESULTS.md, "Weight-only int4").

``reduce_range='auto'`` (default) puts int8 weights with quantized activations on a 7-bit grid
when the ``target`` CPU (``host``, or a name of `graph_opt.target.NAMED`) is x86 without int8
dot products, whose u8×s8 kernels saturate (docs/design.md, fact 6); the report names the target.
``activations='auto'`` (default) is uint8 on x86 and int8 on ARM (`speed.activation_dtype`).
``prefer='speed'`` (default) with ``target='host'`` keeps float every layer that is not faster in
int8 on this CPU, from one profiled run of the float and the planned int8 model (``gate_runs``
runs each; `speed`, part 3); ``prefer='size'`` keeps every planned layer int8. A named target
cannot be timed: its rules apply and the report says so. With static activations, a MatMul + bias
Add of static shape is written as Gemm first (`speed.gemm_form`, exact), which onnxruntime's
integer kernels take.
BatchNormalization after a Conv/Gemm is folded first (`passes._fold`) when activations are
quantized. ``min_snr_db``: after planning, the fewest least robust layers are kept float until
the whole model holds the floor on the calibration data (`graph_opt/budget.py`; no latency
gate then).
``smooth`` (``auto`` by default; with calibration data, int8/uint8 weights and static
activations): the `smooth` pass runs first (SmoothQuant scale migration, exact in float).
``auto`` (`SMOOTH_AUTO`) runs it on transformers only (a MatMul of two activations and a
Softmax: `passes._smooth.has_attention`) and there moves the outlier features of the MatMul
inputs (the projections) into the weights, one Mul per tensor where they cannot be folded; on
any other model it does nothing and streams nothing. A number runs it with that ``alpha`` on every model; ``off`` never.

Skipped, with the reason: op types not in ``op_types``; weights not constant, not float32,
non-finite, shared (an If/Loop/Scan body read counts) or 1-D; MatMul with the constant on the
left or two activation operands; already quantized layers and quantized ops (never twice); layers
inside subgraphs; unobserved or non-float activations; sensitive layers; mismatched Concats; a
model whose opset cannot be upgraded; layers not faster in int8 on this CPU (``prefer='speed'``).

Lossy, bounded per element: a weight by s/2 (ternary/binary: |w − α·code|, large by design), an
activation inside its range by s_x/2 (outside it saturates), a bias by s_x·s_w/2. Weights already
on the grid come back exactly with ``activations=none``. Measured fidelity, speed and cost:
benchmarks/RESULTS.md, "Quantization" (`bench_quantize.py`, `profile_quantize.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx

from graph_opt.budget import exact_pattern, hold_floor, name_nodes
from graph_opt.data import Dataset, random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.model_io import copy_model
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._fold import apply_folds, find_folds
from graph_opt.passes._graph import LAYER_OPS, GraphIndex, check_op_types
from graph_opt.passes._qplan import QuantPlan
from graph_opt.passes.quantize import speed
from graph_opt.passes.quantize.calibration import calibrate
from graph_opt.passes.quantize.emit import apply_plan, report_plan
from graph_opt.passes.quantize.layers import INT8_CHANNEL_PACK, MIN_INT8_REDUCTION
from graph_opt.passes.quantize.ops import ABSORBED_OPS, OWN_OPS, QUANTIZED_OPS, SHARED_OPS
from graph_opt.passes.quantize.placement import CONCAT_RANGE_RATIO
from graph_opt.passes.quantize.plan import make_plan, shared_calibration
from graph_opt.passes.quantize.weights import INT4_AUTO_BLOCK
from graph_opt.passes._smooth import Settings as SmoothSettings
from graph_opt.passes._smooth import smooth
from graph_opt.target import NAMED as NAMED_TARGETS
from graph_opt.target import resolve as resolve_target
from graph_opt.verify import Reference

__all__ = [
    "ABSORBED_OPS", "AUTO_SNR_DB", "CONCAT_RANGE_RATIO", "INT4_AUTO_BLOCK", "INT8_CHANNEL_PACK", "LAYER_OPS",
    "MIN_INT8_REDUCTION", "OWN_OPS", "QUANTIZED_OPS", "SHARED_OPS", "Quantize", "apply_plan", "calibrate",
    "make_plan",
]

log = logging.getLogger(__name__)

# ``smooth=auto``: the smooth pass's settings chosen on the MiniLM exports, alpha through the CLI
# (benchmarks/RESULTS.md, "Quantization vs onnxruntime, NNCF and AIMET-ONNX"). Only on transformers
# (`passes._smooth.has_attention`): nothing was measured to gain on a CNN.
SMOOTH_AUTO = {"alpha": 0.6, "unfoldable": "mul", "op_types": ("MatMul",), "scope": "transformer"}
# ``chain=auto``: stages of chained GPTQ on models without attention; off on transformers, where
# it lost output SNR at twice the cost. Not the default: on YOLOv8n through the default
# prefer=speed it cost top-class agreement below 0.95 (benchmarks/RESULTS.md, "Chained GPTQ rounding").
AUTO_CHAIN = 4
AUTO_SNR_DB = {"int8": 25.0, "uint8": 25.0, "int4": 10.0, "ternary": None, "binary": None}
# Added to the int8 threshold when the weights are on a 7-bit grid (``reduce_range``): every
# quantized layer then carries about 6 dB more weight noise, so the error that adds up over the
# layers kept int8 is larger for the same per-node verdicts. Measured on an AVX2 CPU (docs/design.md,
# fact 7; bench_quantize.py, probe_quantize.py): at 25 dB YOLOv8n's top-class agreement was 0.925
# and MiniLM's output SNR 22.6 dB; at 30 dB 0.955 and 27.0 dB, each keeping a few more layers float.
REDUCED_GRID_SNR_DB = 5.0


@dataclass(frozen=True, kw_only=True)
class Quantize(Pass):
    """Quantize weights (int8/uint8/int4/ternary/binary) and activations (static QDQ, ORT-fusable)."""

    name: ClassVar[str] = "quantize"
    edits_input: ClassVar[bool] = False
    weights: Literal["int8", "uint8", "int4", "ternary", "binary"] = "int8"
    activations: Literal["auto", "uint8", "int8", "none"] = "auto"
    calibration: Literal["output", "minmax", "percentile", "entropy", "mse"] = "output"
    percentile: float = 99.99
    per_channel: bool = True
    symmetric: bool = True
    block_size: int | None = None
    reduce_range: bool | Literal["auto"] = "auto"
    target: str = "host"
    prefer: Literal["speed", "size"] = "speed"
    gate_runs: int = 20
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
    rounding: Literal["auto", "nearest", "gptq"] = "auto"
    chain: int | Literal["auto", "off"] = "off"
    bias_correction: bool = False
    smooth: float | Literal["off", "auto"] = "auto"
    int4_format: Literal["matmulnbits", "dq"] = "dq"

    def __post_init__(self) -> None:
        if self.target != "host" and self.target not in NAMED_TARGETS:
            raise ValueError(f"unknown target {self.target!r} (known: host, {', '.join(NAMED_TARGETS)})")
        if self.gate_runs < 1:
            raise ValueError("gate_runs must be >= 1")
        check_op_types(self, "; Add/Concat/pooling follow the quantized layers automatically, use exclude to stop them")
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
        if not isinstance(self.chain, str) and self.chain < 1:
            raise ValueError(f"chain must be off, auto or a number of stages >= 1, got {self.chain}")
        if not isinstance(self.smooth, str) and not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smooth must be off, auto or an alpha in [0, 1], got {self.smooth}")

    @property
    def activation_dtype(self) -> str:
        """'uint8', 'int8' or 'none': ``activations``, or ('auto') the target's (`speed.activation_dtype`)."""
        if self.activations == "auto":
            return speed.activation_dtype(resolve_target(self.target))
        return self.activations

    def rounding_for(self, has_data: bool) -> str:
        """'gptq' or 'nearest': ``rounding``, or ('auto') GPTQ when calibration data is given for
        unblocked 8-bit weights and for int4 (per channel, or block-wise by the streamed solver),
        nearest otherwise (`weights`)."""
        if self.rounding != "auto":
            return self.rounding
        unblocked = self.block_size in (None, 0)
        if has_data and (self.weights == "int4" or (unblocked and self.weights in ("int8", "uint8"))):
            return "gptq"
        return "nearest"

    def chain_stages(self) -> int:
        """GPTQ's chained stages (`chain`): 0 unchained (``off``), else ``chain`` or ('auto') `AUTO_CHAIN`
        (``auto`` is off on a transformer: `plan.make_plan` checks the model)."""
        if self.chain == "off":
            return 0
        return AUTO_CHAIN if self.chain == "auto" else int(self.chain)

    @property
    def weights_reduced(self) -> bool:
        """int8 weights on a 7-bit grid: asked for, or ('auto') when the target's u8×s8 kernels saturate."""
        return resolve_target(self.target).reduce_range if self.reduce_range == "auto" else bool(self.reduce_range)

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        # The latency gate's and the floor's plans reuse the first plan's calibration (plan.shared_calibration).
        with shared_calibration():
            return self._run(model, report, ctx)

    def _run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        # `model` is the caller's (edits_input is False): the plan only reads it, and apply_plan,
        # apply_folds and the floor's runs each write a copy.
        if (self.smooth != "off" and self.activations != "none" and self.weights in ("int8", "uint8")
                and ctx.data is not None):  # smoothing helps int8 activations; it costs weight-only int4
            settings = SMOOTH_AUTO if self.smooth == "auto" else {**SMOOTH_AUTO, "alpha": float(self.smooth),
                                                                  "scope": "all"}
            sub = PassReport("smooth", settings)
            smoothed = smooth(copy_model(model), sub, ctx,
                              SmoothSettings(**settings, max_samples=self.max_samples, threads=self.threads))
            report.note("smooth: " + ("; ".join(sub.notes) or "nothing to smooth"))
            if sub.rewritten:
                out = dataclasses.replace(self, smooth="off").run(smoothed, report, ctx)
                return out if report.rewritten else copy_model(model)
        if self.min_snr_db is not None:
            return self._run_with_floor(copy_model(model), report, ctx)
        private = False
        folded = ""
        if self.activations != "none" and any(n.op_type == "BatchNormalization" for n in model.graph.node):
            # A BatchNormalization between a Conv/Gemm and its output QDQ would run in float
            # between int8 layers, slower than the fp32 model; folding is exact.
            ix = GraphIndex(model)
            folds, _ = find_folds(ix)
            if folds:
                folded = (f"folded {len(folds)} BatchNormalization into their Conv/Gemm first "
                          "(exact), so the layer outputs stay int8")
                model, private = apply_folds(model, ix, folds), True
        plan, work = make_plan(model, ctx.data, self)
        out = None if plan.empty else apply_plan(work, plan, int4_format=self.int4_format)
        if out is not None and self._gated(ctx):
            gated = self._gate(model, work, plan, out, report, ctx)
            if gated is not None:
                return gated
        if self.weights == "int8" and self.activations != "none":
            report.note(f"target {resolve_target(self.target).describe()}: int8 weights on a "
                        + ("7-bit grid (reduce_range)" if self.weights_reduced else "full 8-bit grid")
                        + f"; activations {self.activation_dtype}")
        if folded:
            report.note(folded)
        if self.prefer == "speed" and self.target != "host" and self.activations != "none":
            report.note(f"prefer=speed for target {self.target}: nothing can be timed for another machine, so no "
                        "layer was gated by latency (the target's rules only: " + "; ".join(
                            speed.target_rules(resolve_target(self.target))) + ")")
        for d in plan.nodes:
            if d.action != "quantize":
                report.skip(d.node, d.reason)
        if out is None:
            return model if private else copy_model(model)
        report_plan(plan, report, model, out)
        return out

    def _gated(self, ctx: PassContext) -> bool:
        return (self.prefer == "speed" and self.target == "host" and self.activations != "none"
                and ctx.data is not None and self.weights in ("int8", "uint8"))

    def _gate(self, model: onnx.ModelProto, work: onnx.ModelProto, plan: QuantPlan, out: onnx.ModelProto,
              report: PassReport, ctx: PassContext) -> onnx.ModelProto | None:
        """Keep float what is not faster in int8 on this CPU (`speed`, part 3). The planned model and
        its float form are profiled once each, kernel by kernel; the layers that do not gain are
        planned again as float (the first plan's calibration and sensitivity verdicts reused). Then
        the float, the planned and the gated models are timed as wholes, interleaved: the fastest
        int8 form is kept when it is `speed.MIN_GAIN` faster than float, else the model stays float
        (a profiler's per-kernel overhead weighs on small kernels, a wall clock does not); the form
        with the slow layers float also has to be `speed.MIN_GAIN` faster than the planned one (its
        extra float islands add quantize/dequantize boundaries, and timings within noise of each
        other are no reason to take them). None: the planned model as it is."""
        keys = speed.layer_keys(plan, work)
        if not keys:
            return None
        feed = ctx.data.laid_out(work).slice(0, 1)
        threads = max(1, self.threads)
        try:
            f_prof, q_prof = speed.profile_timer(feed, self.gate_runs, threads)(work, out)
        except GraphOptError as exc:
            report.note(f"prefer=speed: latency gate not run ({exc}); every planned layer kept as planned")
            return None
        result = speed.decide(keys, f_prof, q_prof)
        note = (f"prefer=speed on {resolve_target(self.target).describe()}: {len(result.keep_float)} of {len(keys)} "
                f"quantized layers not faster in int8 here (profiled {self.gate_runs} runs of the "
                "float and int8 models, alternating)")
        if result.unmatched:
            note += f"; {len(result.unmatched)} layers not found in the profiles, left as planned"
        second, sensitive = None, {}
        if result.keep_float:
            keep = self.keep_float + tuple(exact_pattern(label) for label in result.keep_float)
            replan = dataclasses.replace(self, prefer="size", keep_float=keep)
            # Each node's sensitivity is measured alone, so the first plan's verdicts still hold: the
            # nodes it kept float for it are kept float by name, and nothing is measured again.
            sensitive = {d.node: d.reason for d in plan.nodes if d.action == "float" and d.sensitivity is not None}
            if self.sensitive == "float" and self.threshold_db() is not None:
                replan = dataclasses.replace(replan, sensitivity_snr_db=None,
                                             keep_float=keep + tuple(exact_pattern(label) for label in sensitive))
            else:
                sensitive = {}
            second = replan(model, ctx)
            if not second.report.rewritten:
                second = None
        try:
            times = speed.latency_timer(feed, self.gate_runs, threads)([work, out, *([second.model] if second else [])])
        except GraphOptError as exc:
            report.note(f"prefer=speed: the models could not be timed as wholes ({exc}); kept as planned")
            return None
        timed = (f"{self.gate_runs} interleaved runs: float {times[0]:.3f} ms, planned int8 {times[1]:.3f} ms"
                 + (f", with the slow layers float {times[2]:.3f} ms" if second else ""))
        # The gated form (more float layers, more quantize/dequantize boundaries) must earn its place:
        # it is kept when it beats float and, unless the planned model misses float, the planned one too.
        gain = 1.0 - speed.MIN_GAIN
        planned_ok = times[1] <= gain * times[0]
        if second and times[2] <= gain * times[0] and (not planned_ok or times[2] <= gain * times[1]):
            best = 2
        elif planned_ok:
            best = 1
        else:
            return self._all_float(model, plan, keys, report, note, timed, result.keep_float if second else None)
        if best == 1:
            why = "ran fastest" if not second or times[1] <= times[2] else (
                f"is kept: the form with the slow layers float is not {speed.MIN_GAIN:.0%} faster than it")
            report.note(note + f"; the planned int8 model {why} ({timed}): every planned layer kept int8")
            return None
        report.rewritten.extend(second.report.rewritten)
        report.skipped.extend(s for s in second.report.skipped
                              if s.node not in result.keep_float and s.node not in sensitive)
        for label, why in {**sensitive, **result.keep_float}.items():
            report.skip(label, why)
        report.notes.extend(n for n in second.report.notes if not n.startswith("prefer=size"))
        report.notes.extend(n for n in plan.notes
                            if n.startswith("sensitivity:") or (n.startswith("sensitivity threshold") and sensitive))
        report.note(note + f"; those kept float ({timed})")
        return second.model

    def _all_float(self, model, plan, keys, report: PassReport, note: str, timed: str,
                   reasons: dict[str, str] | None = None) -> onnx.ModelProto:
        """The model unchanged: its int8 forms are not faster as wholes."""
        whole = f"float: no int8 form of the model is faster as a whole on this CPU ({timed})"
        for d in plan.nodes:
            if d.action != "quantize":
                report.skip(d.node, d.reason)
        for k in keys:
            report.skip(k.label, (reasons or {}).get(k.label, whole))
        report.note(note)
        report.note(f"prefer=speed: the model stays float ({whole[len('float: '):]}); prefer=size quantizes it")
        return copy_model(model)

    def _run_with_floor(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        """Mixed precision: quantize as planned, then keep the fewest least robust layers (their
        measured SNR, lowest first) in float until the model's SNR on the calibration data holds
        `min_snr_db` (graph_opt.budget.hold_floor). The latency gate does not run here."""
        name_nodes(model)  # keep_float selects layers by node name
        runs: dict[int, PassReport] = {}

        def rebuild(kept: tuple[str, ...]) -> onnx.ModelProto:
            keep = self.keep_float + tuple(exact_pattern(n) for n in kept)
            # the floor's rebuilds are not timed (one profile per rebuild would multiply the cost)
            result = dataclasses.replace(self, min_snr_db=None, keep_float=keep, prefer="size")(model, ctx)
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

    def threshold_db(self, *, reduced_grid: bool = True) -> float | None:
        """The per-node sensitivity threshold; ``auto``: `AUTO_SNR_DB`, plus `REDUCED_GRID_SNR_DB`
        where int8 weights are on a 7-bit grid (unless `reduced_grid` is False)."""
        if self.sensitivity_snr_db == "auto":
            base = AUTO_SNR_DB[self.weights]
            if reduced_grid and self.weights == "int8" and self.activations != "none" and self.weights_reduced:
                return base + REDUCED_GRID_SNR_DB
            return base
        return self.sensitivity_snr_db

    def required_opset(self) -> int:
        if self.weights in ("ternary", "binary"):
            return 25
        if self.weights == "int4" or (self.block_size or 0) > 0:
            return 21
        return 13 if self.per_channel else 10  # DequantizeLinear's axis attribute came with opset 13
