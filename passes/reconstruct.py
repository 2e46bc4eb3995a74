"""reconstruct: refit compressed layers so that their outputs match the teacher's (closed form).

The original model is the teacher, the compressed model the student. For every layer an earlier
pass compressed, the calibration data (``ctx.data``) is streamed through both; the layer is refit by
ridge least squares to reproduce the teacher's output from what the *student* really feeds it.
The graph keeps its shape: only weights and biases change (new initializers with fresh names; a
Conv/Gemm without a bias may get one)::

    x → 1×1 (I→R₂) → k×k core (R₂→R₁) → 1×1 (R₁→O, b) → y      before (after factorize_conv)
    x → 1×1 (I→R₂) → k×k core (R₂→R₁) → 1×1 (R₁→O, b*) → y     after: last factor refit on data

What is refit: after ``factorize_gemm``/``factorize_conv`` the *last factor* (it writes the original
layer's output tensor); after ``prune_channels`` each *consumer* of pruned channels (the next
Conv/Gemm/MatMul, through activations, BN, pooling, residual Adds, Flatten/Reshape and depthwise
convs), against the teacher's output restricted to its kept channels when its own outputs were
pruned too (channel maps: `_reconstruct_layers`); after ``quantize`` the bias only (**bias
correction**, δ_c = E[y_teacher − y_student]_c; an int32 bias is re-quantized on its grid, weights
stay as quantized). ``bias_only=True`` bias-corrects every layer. So refit before quantizing and
correct after: ``prune_channels → reconstruct → quantize → reconstruct``. Layers are taken in
topological order, each measured on the student as already updated by the refits before it, so it
compensates everything upstream (docs/design.md, "errors are chained"); the target is always the
teacher's tensor. Compressed layers come from ``ctx.history``, or, without one, are recognized in
the model (factor names ``<orig>/svd_i`` …, weights written by a DequantizeLinear, an input width
that differs from the teacher's layer; mode=zero pruning only from the history).

Math: a layer is a product over rows (Gemm/MatMul rows; a Conv row is an output pixel with its
input patch, im2col, one problem per group). With X the student's rows, Y_t the teacher's, W₀, b₀
the current weights and R = Y_t − (X W₀ + b₀)::

    min_{Δ, δ} ‖R − X Δ − δ‖² + λ‖Δ‖²,   λ = ridge · mean diag(C),  C = centred XᵀX,
    W = W₀ + Δ,  b = b₀ + δ          (the ridge pulls towards the current weights)

without an intercept when there is no bias to move (a MatMul without a bias Add, a Gemm whose C is
not per column); bias correction is X empty, δ = mean(R). XᵀX, XᵀR, ΣX, ΣR, ΣR² are accumulated
over the batches (`graph_opt.kernels.lstsq`), so memory is O(d·(d + m)), never O(samples);
``max_samples`` keeps a seeded random subset of rows per batch (deterministic: ``ctx.seed`` and the
layer's label).

Rows that do not count: ``row_mask=`` (default ``auto``; a graph input name, or ``none``) names a
0/1 input over the leading dims of the layers' outputs, e.g. the attention mask of padded
sentences (`graph_opt.row_mask`: how ``auto`` finds one). Rows at positions where it is 0 are left
out of the sums (the bias correction's mean too) and of the end-to-end check (for outputs it
applies to); where its shape does not match a layer's positions every row counts. The refit then
fits the positions whose outputs the model uses instead of spending its degrees of freedom on
padding.

Error bound: the calibration error of each layer (over the rows that count) never increases. Its squared error before and
after (with the weights as stored: float32, or an int32 bias on its grid) are known exactly from
the statistics; a refit is kept only when it lowers it by more than MIN_GAIN. Finally the model's
outputs are compared with the teacher's on the calibration data; if the refits made them worse,
only the best prefix of them is kept.

Report: per layer ``method`` (lstsq / bias_correction), ``compression``, ``op``, ``tensor`` (the
student's) and ``target`` (the teacher's), ``samples``, ``rows``, ``rows_masked`` (left out by the
row mask), ``mse_before``, ``mse_after``, ``ridge``, ``lambda``, ``bias`` (float, float (created),
int32 (re-quantized), none) and ``teacher_channels`` when the target is a subset of the teacher's
channels; a note with the end-to-end output MSE before and after, and one naming the row mask and
the share of positions it keeps.

Skipped, with the reason: no calibration data or no teacher (the whole model); a compression not in
``targets``; a layer no longer in the model; not a Conv/Gemm/MatMul with a constant float weight
(2-D for MatMul, not empty); an inner low-rank factor; a target tensor not in the teacher; shapes
that differ beyond output channels matched to the teacher's; no bias to correct (including a
quantized layer without one: a float bias would stop onnxruntime's integer kernel); a shared bias;
no calibration rows; NaN or inf in the captures; a layer that already matches to float precision
(error below FLOAT_MATCH of the target's power); a refit that does not lower the error; refits
undone by the end-to-end check. Nodes inside subgraphs (If/Loop bodies) are not visited.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx

from graph_opt.data import Dataset, paired_batch_size
from graph_opt.intermediates import stream
from graph_opt.kernels.lstsq import LstsqAccumulator, MeanErrorAccumulator
from graph_opt.model_io import copy_model
from graph_opt.onnx_util import drop_unused_initializers
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._reconstruct_layers import find_layers, output_map
from graph_opt.passes._reconstruct_sites import Edit, Site, Writer, match_site, set_prefix
from graph_opt.progress import progress
from graph_opt.row_mask import AUTO, RowMask, resolve as resolve_row_mask

log = logging.getLogger(__name__)

Target = Literal["lowrank", "prune", "quant"]
TARGETS: tuple[Target, ...] = ("lowrank", "prune", "quant")
# A refit must lower the calibration SSE by more than this share to be kept (float noise).
MIN_GAIN = 1e-4
# A layer whose squared error is below this share of the target's power (SNR > 100 dB) is left alone.
FLOAT_MATCH = 1e-10
# Rows × features gathered at a time (bounds the im2col buffer of one chunk).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, kw_only=True)
class Reconstruct(Pass):
    """Refit compressed layers to the teacher's outputs on calibration data (least squares, bias correction)."""

    name: ClassVar[str] = "reconstruct"
    needs_data: ClassVar[bool] = True

    ridge: float = 1e-4
    max_samples: int | None = None
    targets: tuple[Target, ...] = TARGETS
    bias_only: bool = False
    row_mask: str | None = AUTO

    def __post_init__(self) -> None:
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a finite number ≥ 0, got {self.ridge!r}")
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or self.max_samples < 1):
            raise ValueError(f"max_samples must be ≥ 1 (or None for every row), got {self.max_samples!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"targets {', '.join(map(str, bad))} unknown (choose from {', '.join(TARGETS)})")

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        if ctx.data is None or len(ctx.data) == 0:
            report.skip("model", "no calibration data (ctx.data is None): nothing to fit the teacher's outputs on")
            return model
        if ctx.original is None:
            report.skip("model", "no teacher (ctx.original is None): nothing to reconstruct towards")
            return model
        mask, why = resolve_row_mask(self.row_mask, ctx.original, ctx.data)
        for note in (why, mask and mask.describe()):
            if note:
                report.note(note)
        initial = copy_model(model)
        student, teacher = GraphIndex(model), GraphIndex(ctx.original)
        todo = []
        for node, kinds in find_layers(student, teacher, ctx.history, report):
            chosen = sorted(k for k in kinds if k in self.targets)
            if not chosen:
                report.skip(student.label(node), f"compressed by {'/'.join(sorted(kinds))}, not in targets "
                                                  f"({', '.join(self.targets) or 'none'})")
                continue
            todo.append((node, chosen))
        if not todo:
            return model
        bs, writer = paired_batch_size(ctx.original, model), Writer(student)
        applied: list[tuple[dict, list[Edit]]] = []
        # Channel maps by teacher tensor: found before the weights they read change, or by an earlier reconstruct.
        maps: dict[str, np.ndarray | None] = {
            e["target"]: np.asarray(e["teacher_channels"], np.int64)
            for r in ctx.history if r.pass_name == self.name for e in r.rewritten if "teacher_channels" in e}
        for node, kinds in progress(todo, total=len(todo), desc="reconstruct"):
            label = student.label(node)
            site = match_site(student, teacher, node, kinds, self.bias_only)
            outcome = site if isinstance(site, str) else self._refit(student, teacher, writer, site, ctx, bs, maps, mask)
            if isinstance(outcome, str):
                report.skip(label, outcome)
                continue
            edits = outcome.pop("_edits")
            report.rewrite(label, **outcome)
            applied.append((report.rewritten[-1], edits))
        if not applied:
            return model
        kept = self._end_to_end(model, initial, applied, report, ctx, bs, mask)
        if kept == 0:
            return initial
        dead = ({e.old for _, edits in applied[:kept] for e in edits}
                | {e.new for _, edits in applied[kept:] for e in edits})
        drop_unused_initializers(model, {n for n in dead if n})
        return model

    def _end_to_end(self, model: onnx.ModelProto, initial: onnx.ModelProto, applied: list[tuple[dict, list[Edit]]],
                    report: PassReport, ctx: PassContext, bs: int, mask: RowMask | None) -> int:
        """How many refits (in order) to keep: all, unless the model's outputs got further from the
        teacher's on the calibration data; then the prefix with the smallest output error."""
        base = _output_error(ctx.original, initial, ctx.data, bs, mask)
        final = _output_error(ctx.original, model, ctx.data, bs, mask)
        if base is None or final is None:
            report.note("end-to-end check skipped: the model's outputs do not match the teacher's in name and shape")
            return len(applied)
        report.note(f"end-to-end output MSE on the calibration data: {base:.6g} → {final:.6g}")
        if final <= base * (1 + 1e-6):
            return len(applied)
        best_k, best = 0, base
        for k in range(len(applied) - 1, 0, -1):
            set_prefix(applied, k)
            error = _output_error(ctx.original, model, ctx.data, bs, mask)
            if error < best:
                best_k, best = k, error
        set_prefix(applied, best_k)
        for entry, _ in applied[best_k:]:
            report.rewritten.remove(entry)
            report.skip(entry["node"], f"rolled back by the end-to-end check: with every refit the output MSE on the "
                                       f"calibration data grew ({base:.6g} → {final:.6g}); the first {best_k} "
                                       f"refit(s) give {best:.6g}")
        report.note(f"end-to-end check: kept the first {best_k} of {len(applied)} refits")
        return best_k

    # ------------------------------------------------------------------------------------- refit
    def _refit(self, student: GraphIndex, teacher: GraphIndex, writer: Writer, site: Site, ctx: PassContext,
               bs: int, maps: dict, mask: RowMask | None) -> dict | str:
        """Stream teacher and student over the data, solve, keep the better; a dict (rewritten) or a reason."""
        cap = self._capture(student, teacher, site, ctx, bs, maps, mask)
        if isinstance(cap, str):
            return cap
        acc, lstsq, sol = cap.acc, site.method == "lstsq", None
        per = acc.rows * (site.groups * site.m)
        sse_before = acc.sse()
        if not (math.isfinite(sse_before) and math.isfinite(cap.power)):  # the solvers cannot take NaN/inf
            return "NaN or inf in the teacher's or the student's tensors on the calibration data: nothing to fit"
        if sse_before <= FLOAT_MATCH * cap.power:
            return f"already matches the teacher to float precision (MSE {sse_before / per:.3g}): nothing to refit"
        if lstsq:
            sol = acc.solve(self.ridge)
            new_w, w_delta = site.weight_update(sol.weight)
            new_b, b_delta = site.bias.update(sol.bias.reshape(-1)) if site.bias.writable else (None, None)
            sse_after = acc.sse(w_delta, None if b_delta is None else b_delta.reshape(site.groups, site.m))
        else:
            new_b, b_delta = site.bias.update(acc.mean())
            sse_after = acc.sse(b_delta)
        mse_before, mse_after = sse_before / per, sse_after / per
        if not sse_after < sse_before * (1 - MIN_GAIN):
            return (f"refit does not lower the calibration error (MSE {mse_before:.6g} → {mse_after:.6g}); "
                    "kept the current weights")
        bias_label = site.bias.kind_label()  # before the edits: a created bias is "float (created)"
        edits = [site.store_weight(writer, new_w)] if lstsq else []
        if new_b is not None:
            edits.append(site.bias.store(writer, new_b))
        details = {
            "method": site.method, "compression": site.kinds, "op": site.node.op_type,
            "tensor": site.y_name, "target": site.target,
            "samples": cap.samples, "rows": acc.rows, "rows_masked": cap.masked,
            "mse_before": mse_before, "mse_after": mse_after,
            "ridge": self.ridge if lstsq else None,
            "lambda": float(np.max(sol.lam)) if lstsq else None,
            "bias": bias_label,
            "_edits": edits,
        }
        if cap.out_map is not None:
            details["teacher_channels"] = cap.out_map.tolist()  # the teacher channel of each output channel
        return details

    def _capture(self, student: GraphIndex, teacher: GraphIndex, site: Site, ctx: PassContext, bs: int,
                 maps: dict, mask: RowMask | None) -> _Capture | str:
        """The layer's statistics over the calibration data (teacher's target, student's input and
        output, one batch at a time), or why there are none."""
        lstsq = site.method == "lstsq"
        names = [site.y_name] + ([site.x_name] if lstsq and site.x_name not in student.graph_inputs else [])
        rng = np.random.default_rng([ctx.seed, zlib.crc32(site.label.encode())])
        t_batches = stream(teacher.model, ctx.data, [site.target], batch_size=bs, desc=f"teacher {site.label}")
        s_batches = stream(student.model, ctx.data, names, batch_size=bs, desc=f"student {site.label}")
        cap: _Capture | None = None
        for (feed, t_vals), (_, s_vals) in zip(t_batches, s_batches):
            y_t, y_s = np.asarray(t_vals[site.target]), np.asarray(s_vals[site.y_name])
            if cap is None:
                mapped = output_map(student, teacher, site.node, site.target, site.channel_axis, y_t.shape, y_s.shape,
                                    maps)
                if isinstance(mapped, str):
                    return mapped
                cap = _Capture(LstsqAccumulator(site.d, site.m, groups=site.groups, intercept=site.bias.writable)
                               if lstsq else MeanErrorAccumulator(site.groups * site.m), mapped)
            if cap.out_map is not None:
                y_t = np.take(y_t, cap.out_map, axis=site.channel_axis)
            if y_t.shape != y_s.shape:
                return (f"shapes differ: the teacher's {site.target!r} is {list(y_t.shape)}, "
                        f"the student's {list(y_s.shape)}")
            cap.samples += len(next(iter(feed.values())))
            keep = mask.keep(feed, y_s.shape, site.channel_axis) if mask is not None else None
            rows = None if keep is None else np.flatnonzero(keep)
            if keep is not None:
                cap.masked += int(len(keep) - len(rows))
            if lstsq:
                x = np.asarray(s_vals[site.x_name] if site.x_name in s_vals else feed[site.x_name])
                self._add_rows(cap, site, x, y_t, y_s, rng, rows)
            else:
                target = np.asarray(site.out_rows(y_t, rows), np.float64)
                cap.power += float(np.sum(target * target))
                cap.acc.update(target - site.out_rows(y_s, rows))
        if cap is None or cap.acc.rows == 0:
            return "no calibration rows reached the layer" + (f" (row mask {mask.name!r})" if cap and cap.masked else "")
        return cap

    def _add_rows(self, cap: _Capture, site: Site, x: np.ndarray, y_t: np.ndarray, y_s: np.ndarray,
                  rng: np.random.Generator, rows: np.ndarray | None = None) -> None:
        """One batch's rows into the statistics: all of them (or those in `rows`, the row mask's) or
        a seeded subset of ``max_samples`` of them, gathered in chunks that bound the im2col buffer."""
        total = site.count(y_s.shape)
        chosen = rows
        if self.max_samples is not None and (total if rows is None else len(rows)) > self.max_samples:
            pick = rng.choice(total if rows is None else len(rows), self.max_samples, replace=False)
            chosen = np.sort(pick if rows is None else rows[pick])
        for idx in _chunks(total, chosen, max(1, _CHUNK_ELEMENTS // max(1, site.groups * site.d))):
            target = np.asarray(site.out_rows(y_t, idx), np.float64)
            cap.power += float(np.sum(target * target))
            cap.acc.update(site.in_rows(x, idx), target - site.out_rows(y_s, idx))


@dataclass
class _Capture:
    """A layer's statistics over the calibration data: the accumulator, the teacher channel of each
    output channel (None: the same channels), the samples seen and Σ y_t² over the rows used."""

    acc: LstsqAccumulator | MeanErrorAccumulator
    out_map: np.ndarray | None
    samples: int = 0
    power: float = 0.0
    masked: int = 0  # rows the row mask left out


def _chunks(total: int, chosen: np.ndarray | None, size: int) -> Iterator[np.ndarray]:
    rows = np.arange(total) if chosen is None else chosen
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _output_error(teacher: onnx.ModelProto, model: onnx.ModelProto, data: Dataset, bs: int,
                  mask: RowMask | None = None) -> float | None:
    """Mean squared error of the graph outputs against the teacher's (None when they do not match);
    with `mask`, over the positions it keeps of the outputs it applies to (features on the last axis)."""
    names = [o.name for o in teacher.graph.output]
    if not names or {o.name for o in model.graph.output} != set(names):
        return None
    total, count = 0.0, 0
    batches = zip(stream(teacher, data, names, batch_size=bs, desc="teacher outputs"),
                  stream(model, data, names, batch_size=bs, desc="student outputs"))
    for (feed, tv), (_, sv) in batches:
        for n in names:
            t, s = np.asarray(tv[n], np.float64), np.asarray(sv[n], np.float64)
            if t.shape != s.shape:
                return None
            keep = mask.keep(feed, t.shape, -1) if mask is not None and t.ndim > 1 else None
            if keep is not None:
                t, s = t.reshape(len(keep), -1)[keep], s.reshape(len(keep), -1)[keep]
            total += float(np.sum((t - s) ** 2))
            count += t.size
    return total / max(count, 1)


__all__ = ["Reconstruct"]
