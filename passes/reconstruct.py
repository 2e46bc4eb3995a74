"""reconstruct: refit compressed layers so that their outputs match the teacher's (closed form).

The original model is the teacher, the compressed model the student. For every layer an earlier
pass compressed, the pass streams the calibration data (``ctx.data``) through both, captures the
teacher's output of that layer and the *student's* input to it, and refits the layer by ridge
least squares so that it reproduces the teacher's output from what the student really feeds it.

Before (after ``factorize_conv``)::

    x → 1×1 (I→R₂) → k×k core (R₂→R₁) → 1×1 (R₁→O, b) → y          (y drifted from the teacher's)
After::

    x → 1×1 (I→R₂) → k×k core (R₂→R₁) → 1×1 (R₁→O, b*) → y         (last factor refit on data)

The graph keeps its shape: only weights and biases change (new initializers with fresh names; a
Conv/Gemm without a bias may get one). Feature distillation solved in closed form.

What is refit, per compression
------------------------------
- ``lowrank`` (after ``factorize_gemm`` / ``factorize_conv``): the *last factor* (it writes the
  original layer's output tensor, so the target is the teacher's tensor of that name) and its
  bias, from the student's input to that factor.
- ``prune`` (after ``prune_channels``): each *consumer* of pruned channels — the next Conv/Gemm/
  MatMul after a pruned producer, walking through activations, BN, pooling, residual Adds,
  Flatten/Reshape/Concat, and through depthwise convs (which carry the channels on) — is refit
  from the channels that are left (He et al. 2017; ThiNet). When the consumer's own output
  channels were pruned too, the target is the teacher's output restricted to the kept channels;
  which ones those are is read off the weights: each student filter is matched to the teacher
  filter it was sliced from (|cosine| ≥ 0.999 over the kept input channels, in order, so a
  per-channel scale such as a folded BatchNorm or weight quantization does not hide it). The
  kept input channels are traced back through elementwise ops, BN, pooling, Flatten/Reshape and
  depthwise convs; through Concat/Split/Slice they are not, and such a layer is skipped. A map
  found once is reused by later runs (from the history), when the refit filters no longer match.
- ``quant`` (after ``quantize``): **bias correction**. Quantized weights shift each output
  channel's mean; the bias is moved by ``δ_c = E[y_teacher − y_student]_c`` measured on the
  calibration data with the student's own (quantized, already corrected) inputs. An int32 bias
  (``DequantizeLinear`` with scale ``s_x·s_w``) is re-quantized on the same grid, a float bias is
  shifted; weights stay as quantized. A quantized layer is always bias-corrected, never refit
  (its weights would need re-quantizing).
- ``bias_only=True``: every layer gets bias correction only.

Quantized weights are never refit, so refit before quantizing and correct after:
``prune_channels → reconstruct → quantize → reconstruct``.

Errors are chained (docs/design.md, fact 4: bias correction measured per layer in isolation
over-corrects deep nets): layers are processed in topological order, and each is measured on
the student as already updated by the refits before it, so a layer compensates the error of
everything upstream. The target is always the teacher's tensor.

Math
----
A layer is a matrix product over rows: Gemm/MatMul rows are the samples (``[batch, seq,
hidden]`` flattened to rows; a weight-on-the-left MatMul transposes its last two axes); a Conv
row is one output pixel holding its input patch (im2col: strides, pads or auto_pad, dilations,
groups — a grouped conv is one problem per group; a 1×1 conv is a matmul over pixels). With X
the student's rows, Y_t the teacher's, W₀, b₀ the current weights and R = Y_t − (X W₀ + b₀) the
residual (taken from the student's own output), the refit solves for the *change*:

    min_{Δ, δ} ‖R − X Δ − δ‖² + λ‖Δ‖²,   λ = ridge · mean diag(C),  C = centred XᵀX,
    Δ = (C + λI)⁻¹ Xᵀ(R − R̄) (centred),  W = W₀ + Δ,  b = b₀ + δ

so the ridge pulls towards the current weights, not towards zero. A MatMul without a bias
(no ``Add`` of a per-column constant after it) and a Gemm whose C is not per column are refit
without an intercept. Bias correction is the same with X empty: δ = mean(R).

Streaming: `graph_opt.kernels.lstsq` accumulates XᵀX, XᵀR, ΣX, ΣR, ΣR² over the calibration
batches (one layer at a time; two onnxruntime runs per layer, teacher and student), so memory is
O(d·(d + m)) for d inputs per row and m outputs, never O(samples). ``max_samples`` keeps that many
rows per batch (a seeded random subset of the pixels/rows) to bound the time of big convs; XᵀX has
the same size either way. Deterministic: the subset depends only on ``ctx.seed`` and the layer.

Guarantee: calibration error never increases
--------------------------------------------
Both the current weights' squared error (ΣR²) and the refit's (from the accumulated statistics,
evaluated with the weights as they are stored — float32, or an int32 bias on its grid) are known
exactly; the refit is kept only when it is lower, otherwise the layer keeps its weights and is
reported as a skip. Each layer's error on the calibration data (on the sampled rows, with
``max_samples``) thus never grows. As a last check the model's outputs are compared with the
teacher's on the calibration data; if the refits made them worse, all of them are rolled back.

Which layers were compressed
----------------------------
From ``ctx.history`` (reports of the accepted passes before this one in a pipeline): the
``new_nodes``/``output`` of ``factorize_gemm``/``factorize_conv``, the group ``producers`` of
``prune_channels``, the quantized layers of ``quantize``. When the history holds no report of
those passes (the pass run on its own on an already compressed model), layers are recognized
from the model: factor nodes by their names (``<orig>/svd_i``, ``/tucker2_i``, ``/cp_i``,
``/spatial_svd_i``: the highest i is the last factor), quantized layers by a weight that is the
output of a ``DequantizeLinear``, and pruning consumers by a weight whose input dimension differs
from that of the teacher's layer writing the same tensor (mode=zero pruning keeps every shape, so
it is only recognized from the history).

Report: per refit layer ``method`` (lstsq / bias_correction), ``compression`` (lowrank, prune,
quant), ``op``, ``tensor`` (the student tensor fitted) and ``target`` (the teacher's), ``samples``
(calibration samples), ``rows``, ``mse_before``, ``mse_after`` (per element, on the calibration
rows), ``ridge`` (relative) and ``lambda`` (absolute, the largest over groups), ``bias`` (float,
float (created), int32 (re-quantized), none); ``teacher_channels`` (the teacher channel of each
output channel) when the target is a subset of the teacher's channels; and a note with the
end-to-end output MSE before and after.

Skipped, with the reason in the report: no calibration data (everything; nothing else is
looked at); no teacher (``ctx.original`` is None); a compression kind not in ``targets``; a
layer that is no longer in the model; a layer kind not supported (not Conv/Gemm/MatMul, or a
MatMul of two activations); a weight that is not a constant, not float, empty, or not 2-D (MatMul);
a target tensor not found in the teacher; shapes that differ (beyond output channels that can
be matched to the teacher's); output channels that cannot be matched; no bias to correct
(bias correction of a MatMul without bias Add, of a Gemm whose C is not per column, or of a
quantized layer with integer activations but no bias: a float bias would stop onnxruntime from
fusing it); a bias shared with another node; no calibration rows; NaN or inf in the captured
tensors; a layer that already matches
the teacher to float precision (SNR above 100 dB); a refit that does not lower the error by at
least 0.01 %; refits undone by the end-to-end check. Nodes inside subgraphs (If/Loop bodies)
are not visited.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_opt.data import Dataset, batch_size_for
from graph_opt.intermediates import stream
from graph_opt.onnx_util import all_graphs, attr
from graph_opt.model_io import copy_model, disk_tensor, has_disk_weights, on_disk, read_array
from graph_opt.kernels.lstsq import (
    LstsqAccumulator,
    MeanErrorAccumulator,
    conv_rows,
    conv_weight_from_matrix,
    conv_weight_matrix,
    im2col,
)
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._graph import LAYER_OPS, Namer
from graph_opt.passes._lowrank import FACTOR_NAME
from graph_opt.progress import progress
from graph_opt.runtime import make_session

log = logging.getLogger(__name__)

Target = Literal["lowrank", "prune", "quant"]
TARGETS: tuple[Target, ...] = ("lowrank", "prune", "quant")
LOWRANK_PASSES = ("factorize_gemm", "factorize_conv")
PRUNE_PASSES = ("prune_channels",)
QUANT_PASSES = ("quantize",)
# Ops whose output channel c depends only on input channel c (the channel maps pass through).
CHANNELWISE_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu", "Selu",
    "Softplus", "Mish", "Erf", "Identity", "Dropout", "BatchNormalization", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean",
    "QuantizeLinear", "DequantizeLinear", "Cast", "Neg", "Abs", "Sqrt", "Exp", "Pow",
    # Layout ops that flatten channel-major (channel c → features c·P … c·P + P − 1); any other layout
    # fails the filter match that follows, so the map is never used unchecked.
    "Flatten", "Reshape", "Squeeze", "Unsqueeze",
})
# Teacher ops between a layer and the tensor it is compared at that rescale/shift channels only.
_AFFINE_OPS = frozenset({"BatchNormalization", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear", "Add"})
# A refit must lower the calibration SSE by more than this share to be kept (float noise).
MIN_GAIN = 1e-4
# A layer whose squared error is below this share of the target's power (SNR > 100 dB) is left alone.
FLOAT_MATCH = 1e-10
# Cosine a student filter must reach against the teacher filter it was sliced from.
MAP_MIN_COSINE = 0.999
# Rows × features gathered at a time (bounds the im2col buffer of one chunk).
_CHUNK_ELEMENTS = 1 << 22
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True, kw_only=True)
class Reconstruct(Pass):
    """Refit compressed layers to the teacher's outputs on calibration data (least squares, bias correction)."""

    name: ClassVar[str] = "reconstruct"
    needs_data: ClassVar[bool] = True

    ridge: float = 1e-4
    max_samples: int | None = None
    targets: tuple[Target, ...] = TARGETS
    bias_only: bool = False

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
        initial = copy_model(model)
        student, teacher = _Graph(model), _Graph(ctx.original)
        layers = _find_layers(student, teacher, ctx.history, report)
        todo = []
        for node, kinds in layers:
            chosen = sorted(k for k in kinds if k in self.targets)
            if not chosen:
                report.skip(student.label(node), f"compressed by {'/'.join(sorted(kinds))}, not in targets "
                                                  f"({', '.join(self.targets) or 'none'})")
                continue
            todo.append((node, chosen))
        if not todo:
            return model
        bs = batch_size_for(ctx.original)
        applied: list[tuple[dict, list[_Edit]]] = []
        # Channel maps by teacher tensor: found before the weights they read change, or by an earlier reconstruct.
        maps: dict[str, np.ndarray | None] = {
            e["target"]: np.asarray(e["teacher_channels"], np.int64)
            for r in ctx.history if r.pass_name == self.name for e in r.rewritten if "teacher_channels" in e}
        for node, kinds in progress(todo, total=len(todo), desc="reconstruct"):
            label = student.label(node)
            site = _match(student, teacher, node, kinds, self.bias_only)
            if isinstance(site, str):
                report.skip(label, site)
                continue
            outcome = self._refit(student, teacher, site, ctx, bs, maps)
            if isinstance(outcome, str):
                report.skip(label, outcome)
                continue
            edits = outcome.pop("_edits")
            report.rewrite(label, **outcome)
            applied.append((report.rewritten[-1], edits))
        if not applied:
            return model
        kept = self._end_to_end(student.model, initial, applied, report, ctx, bs)
        if kept == 0:
            return initial
        dead = ({e.old for _, edits in applied[:kept] for e in edits}
                | {e.new for _, edits in applied[kept:] for e in edits})
        _drop_unused(student.model, {n for n in dead if n})
        return student.model

    def _end_to_end(self, model: onnx.ModelProto, initial: onnx.ModelProto, applied: list[tuple[dict, list[_Edit]]],
                    report: PassReport, ctx: PassContext, bs: int) -> int:
        """How many refits (in order) to keep: all, unless the model's outputs got further from the
        teacher's on the calibration data; then the prefix with the smallest output error."""
        base = _output_error(ctx.original, initial, ctx.data, bs)
        final = _output_error(ctx.original, model, ctx.data, bs)
        if base is None or final is None:
            report.note("end-to-end check skipped: the model's outputs do not match the teacher's in name and shape")
            return len(applied)
        report.note(f"end-to-end output MSE on the calibration data: {base:.6g} → {final:.6g}")
        if final <= base * (1 + 1e-6):
            return len(applied)
        best_k, best = 0, base
        for k in range(len(applied) - 1, 0, -1):
            _set_prefix(applied, k)
            error = _output_error(ctx.original, model, ctx.data, bs)
            if error < best:
                best_k, best = k, error
        _set_prefix(applied, best_k)
        for entry, _ in applied[best_k:]:
            report.rewritten.remove(entry)
            report.skip(entry["node"], f"rolled back by the end-to-end check: with every refit the output MSE on the "
                                       f"calibration data grew ({base:.6g} → {final:.6g}); the first {best_k} "
                                       f"refit(s) give {best:.6g}")
        report.note(f"end-to-end check: kept the first {best_k} of {len(applied)} refits")
        return best_k

    # ------------------------------------------------------------------------------------- refit
    def _refit(self, student: _Graph, teacher: _Graph, site: _Site, ctx: PassContext, bs: int,
               maps: dict) -> dict | str:
        """Stream teacher and student over the data, solve, keep the better; a dict (rewritten) or a reason."""
        lstsq = site.method == "lstsq"
        names = [site.y_name] + ([site.x_name] if lstsq and site.x_name not in student.graph_inputs else [])
        rng = np.random.default_rng([ctx.seed, zlib.crc32(site.label.encode())])
        data: Dataset = ctx.data
        t_batches = stream(teacher.model, data, [site.target], batch_size=bs, desc=f"teacher {site.label}")
        s_batches = stream(student.model, data, names, batch_size=bs, desc=f"student {site.label}")
        acc: LstsqAccumulator | MeanErrorAccumulator | None = None
        out_map: np.ndarray | None = None
        samples, power = 0, 0.0  # power: Σ y_t² over the rows used
        for (feed, t_vals), (_, s_vals) in zip(t_batches, s_batches):
            y_t, y_s = np.asarray(t_vals[site.target]), np.asarray(s_vals[site.y_name])
            if acc is None:
                mapped = _output_map(student, teacher, site, y_t.shape, y_s.shape, maps)
                if isinstance(mapped, str):
                    return mapped
                out_map = mapped
                acc = (LstsqAccumulator(site.d, site.m, groups=site.groups, intercept=site.bias.writable)
                       if lstsq else MeanErrorAccumulator(site.groups * site.m))
            if out_map is not None:
                y_t = np.take(y_t, out_map, axis=site.channel_axis)
            if y_t.shape != y_s.shape:
                return (f"shapes differ: the teacher's {site.target!r} is {list(y_t.shape)}, "
                        f"the student's {list(y_s.shape)}")
            samples += len(next(iter(feed.values())))
            total = site.count(y_s.shape)
            if not lstsq:
                target = np.asarray(site.out_rows(y_t, None), np.float64)
                power += float(np.sum(target * target))
                acc.update(target - site.out_rows(y_s, None))
                continue
            x = np.asarray(s_vals[site.x_name] if site.x_name in s_vals else feed[site.x_name])
            chosen = None
            if self.max_samples is not None and total > self.max_samples:
                chosen = np.sort(rng.choice(total, self.max_samples, replace=False))
            for idx in _chunks(total, chosen, max(1, _CHUNK_ELEMENTS // max(1, site.groups * site.d))):
                target = np.asarray(site.out_rows(y_t, idx), np.float64)
                power += float(np.sum(target * target))
                acc.update(site.in_rows(x, idx), target - site.out_rows(y_s, idx))
        if acc is None or acc.rows == 0:
            return "no calibration rows reached the layer"
        channels = site.groups * site.m
        sse_before = acc.sse()
        if not (math.isfinite(sse_before) and math.isfinite(power)):  # the solvers cannot take NaN/inf
            return "NaN or inf in the teacher's or the student's tensors on the calibration data: nothing to fit"
        if sse_before <= FLOAT_MATCH * power:
            return (f"already matches the teacher to float precision (MSE {sse_before / (acc.rows * channels):.3g}): "
                    "nothing to refit")
        if lstsq:
            sol = acc.solve(self.ridge)
            new_w, w_delta = site.weight_update(sol.weight)
            new_b, b_delta = site.bias.update(sol.bias.reshape(-1)) if site.bias.writable else (None, None)
            sse_after = acc.sse(w_delta, None if b_delta is None else b_delta.reshape(site.groups, site.m))
        else:
            new_b, b_delta = site.bias.update(acc.mean())
            sse_after = acc.sse(b_delta)
        per = acc.rows * channels
        mse_before, mse_after = sse_before / per, sse_after / per
        if not sse_after < sse_before * (1 - MIN_GAIN):
            return (f"refit does not lower the calibration error (MSE {mse_before:.6g} → {mse_after:.6g}); "
                    "kept the current weights")
        bias_label = site.bias.kind_label()
        edits = []
        if lstsq:
            edits.append(site.store_weight(student, new_w))
        if new_b is not None:
            edits.append(site.bias.store(student, new_b))
        details = {
            "method": site.method, "compression": site.kinds, "op": site.node.op_type,
            "tensor": site.y_name, "target": site.target,
            "samples": samples, "rows": acc.rows, "mse_before": mse_before, "mse_after": mse_after,
            "ridge": self.ridge if lstsq else None,
            "lambda": float(np.max(sol.lam)) if lstsq else None,
            "bias": bias_label,
            "_edits": edits,
        }
        if out_map is not None:
            details["teacher_channels"] = out_map.tolist()  # the teacher channel of each output channel
        return details


# ============================================================================================ graph


class _Graph:
    """Producers, consumers, constants and labels of a model's main graph (node protos by reference)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model  # the pass's private copy: the student's edits go here
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input if i.name not in self.inits}
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.position: dict[int, int] = {}
        for i, node in enumerate(self.nodes):
            self.position[id(node)] = i
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.tensors = set(self.producer) | self.graph_inputs
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.name] = counts.get(node.name, 0) + 1
        self._unique = {n for n, c in counts.items() if n and c == 1}
        self.by_name = {n.name: n for n in self.nodes if n.name in self._unique}
        self._namer = Namer({t for n in self.nodes for t in (*n.input, *n.output, n.name)} | set(self.inits) |
                            {i.name for i in g.input} | self.graph_outputs)
        self._dq_cache: dict[str, np.ndarray | None] = {}
        self._const_cache: dict[str, np.ndarray | None] = {}
        self.disk = has_disk_weights(model)

    def label(self, node: onnx.NodeProto) -> str:
        if node.name in self._unique:
            return node.name
        return f"{node.op_type}({node.output[0] if node.output else '?'})"

    def fresh(self, base: str) -> str:
        return self._namer(base)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        """A new initializer with a fresh name (weights are never edited in place)."""
        name = self.fresh(base)
        if self.disk and value.nbytes >= 1024:  # a model over 2 GB: the refit weights go to disk too
            tensor = disk_tensor(value, name)
        else:
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def const(self, name: str) -> np.ndarray | None:
        """An initializer's or Constant node's value, else None (read once; never modified)."""
        if name not in self._const_cache:
            value = None
            if name in self.inits:
                value = read_array(self.inits[name])
            elif name in self.producer and self.producer[name].op_type == "Constant":
                value = next((numpy_helper.to_array(a.t) for a in self.producer[name].attribute if a.name == "value"),
                             None)
            if name not in self.inits or not on_disk(self.inits[name]):  # a weight on disk is read again
                self._const_cache[name] = value
            return value
        return self._const_cache[name]

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None or self.dequantized(name) is not None

    def dequantized(self, name: str) -> np.ndarray | None:
        """The value of a DequantizeLinear of constants (a quantized weight), evaluated by onnxruntime."""
        if name in self._dq_cache:
            return self._dq_cache[name]
        node = self.producer.get(name)
        value = None
        if node is not None and node.op_type == "DequantizeLinear" and all(
                not i or i in self.inits for i in node.input):
            inits = [self.inits[i] for i in node.input if i]
            out_type = attr(node, "output_dtype", 0) or self.inits[node.input[1]].data_type  # the scale's type
            graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(name, out_type, None)], inits)
            mini = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            mini.ir_version = self.model.ir_version
            try:
                value = make_session(mini).run([name], {})[0]
            except Exception as exc:  # an exotic DequantizeLinear: treat the weight as unknown
                log.debug("cannot evaluate %s: %s", name, exc)
        self._dq_cache[name] = value
        return value

    def find(self, label: str) -> onnx.NodeProto | None:
        """A node by the label a report gave it: its name, or ``Op(output)``."""
        if label in self.by_name:
            return self.by_name[label]
        m = re.fullmatch(r"(\w+)\((.*)\)", label)
        if m:
            op, out = m.groups()
            for node in self.nodes:
                if node.op_type == op and node.output and out in (node.output[0], _requantized(self, node.output[0])):
                    return node
        return None

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]


def _requantized(g: _Graph, name: str) -> str | None:
    """The name a Q → DQ pair after `name` gives it back (quantize renames a producer's output)."""
    q = g.sole_consumer(name)
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] != name:
        return None
    dq = g.sole_consumer(q.output[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return dq.output[0]


def _teacher_name(student: _Graph, teacher: _Graph, name: str) -> str | None:
    if name in teacher.tensors:
        return name
    again = _requantized(student, name)
    return again if again in teacher.tensors else None


def _drop_unused(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the initializers this pass replaced once nothing reads them (subgraphs included)."""
    graphs = list(all_graphs(model.graph))
    used = {x for g in graphs for n in g.node for x in n.input} | {o.name for g in graphs for o in g.output}
    dead = {n for n in names if n not in used}
    if not dead:
        return
    keep = [t for t in model.graph.initializer if t.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in dead]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


# ======================================================================================= candidates


def _is_layer(node: onnx.NodeProto) -> bool:
    return node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx")


def _find_layers(student: _Graph, teacher: _Graph, history: list[PassReport],
                 report: PassReport) -> list[tuple[onnx.NodeProto, set[str]]]:
    """(student node, compression kinds) in topological order, from the history or the model."""
    kinds: dict[int, set[str]] = {}
    nodes: dict[int, onnx.NodeProto] = {}

    def add(node: onnx.NodeProto, kind: str) -> None:
        nodes[id(node)] = node
        kinds.setdefault(id(node), set()).add(kind)

    relevant = [r for r in history if r.pass_name in LOWRANK_PASSES + PRUNE_PASSES + QUANT_PASSES]
    if relevant:
        for r in relevant:
            if r.pass_name in LOWRANK_PASSES:
                for e in r.rewritten:
                    new_nodes = e.get("new_nodes") or []
                    if not new_nodes:
                        continue
                    node = student.find(new_nodes[-1])
                    if node is None:
                        report.skip(e["node"], f"its last factor {new_nodes[-1]!r} is no longer in the model")
                    else:
                        add(node, "lowrank")
            elif r.pass_name in PRUNE_PASSES:
                producers = list(dict.fromkeys(p for e in r.rewritten for p in e.get("producers", [])))
                for label in producers:
                    node = student.find(label)
                    if node is None:
                        report.skip(label, "pruned producer is no longer in the model; its consumers are not known")
                        continue
                    for consumer in _next_layers(student, node):
                        add(consumer, "prune")
            else:
                for e in r.rewritten:
                    if e.get("op") in LAYER_OPS and e.get("weight"):
                        node = student.find(e["node"])
                        if node is None:
                            report.skip(e["node"], "quantized layer is no longer in the model")
                        else:
                            add(node, "quant")
    else:
        _recognize(student, teacher, add)
    return sorted(((nodes[k], kinds[k]) for k in nodes), key=lambda p: student.position[id(p[0])])


def _recognize(student: _Graph, teacher: _Graph, add) -> None:
    """No history: factor nodes by name, quantized weights by their DequantizeLinear, pruned
    consumers by an input dimension that differs from the teacher's layer."""
    last: dict[str, tuple[int, onnx.NodeProto]] = {}
    for node in student.nodes:
        if not _is_layer(node):
            continue
        m = FACTOR_NAME.search(node.name)
        if m:
            base, index = node.name[:m.start()], int(node.name.rsplit("_", 1)[1])
            if base not in last or index > last[base][0]:
                last[base] = (index, node)
            continue
        w = _weight_input(student, node)
        if isinstance(w, str):
            continue
        if student.producer.get(w[0]) is not None and student.producer[w[0]].op_type == "DequantizeLinear":
            add(node, "quant")
        t_node = _teacher_layer(student, teacher, node)
        if t_node is not None and _in_features(student, node) != _in_features(teacher, t_node):
            add(node, "prune")
    for _, node in last.values():
        add(node, "lowrank")
        w = _weight_input(student, node)
        if not isinstance(w, str) and student.producer.get(w[0]) is not None and \
                student.producer[w[0]].op_type == "DequantizeLinear":
            add(node, "quant")


def _next_layers(g: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The Conv/Gemm/MatMul layers that read `node`'s output channels next (through any other op;
    through depthwise convs, which carry the channels on)."""
    found: list[onnx.NodeProto] = []
    seen: set[int] = {id(node)}
    stack = [o for o in node.output if o]
    while stack:
        name = stack.pop()
        for c in g.consumers.get(name, []):
            if id(c) in seen:
                continue
            seen.add(id(c))
            if _is_layer(c):
                found.append(c)
                if _depthwise(g, c):
                    stack.extend(o for o in c.output if o)
            else:
                stack.extend(o for o in c.output if o)
    return found


def _depthwise(g: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    group = attr(node, "group", 1)
    w = _weight_input(g, node)
    return group > 1 and not isinstance(w, str) and w[1].shape[1] == 1


def _weight_input(g: _Graph, node: onnx.NodeProto) -> tuple[str, np.ndarray, bool, int] | str:
    """(weight tensor, value, quantized, input slot) of a layer, or why it has none."""
    if node.op_type not in LAYER_OPS:
        return f"layer kind {node.op_type} not supported (Conv, Gemm, MatMul only)"
    slots = [1] if node.op_type in ("Conv", "Gemm") else [1, 0]
    if node.op_type == "MatMul":
        consts = [s for s in (0, 1) if len(node.input) > s and g.is_const(node.input[s])]
        if len(consts) != 1:
            return ("MatMul of two activations (no weight to refit)" if not consts
                    else "both MatMul operands are constants")
        slots = consts
    if node.op_type == "Gemm" and g.is_const(node.input[0]) and not g.is_const(node.input[1]):
        return "Gemm with a constant A and a variable B is not supported"
    slot = slots[0]
    if len(node.input) <= slot or not node.input[slot]:
        return "layer without a weight input"
    name = node.input[slot]
    value = g.const(name)
    quantized = False
    if value is None:
        value = g.dequantized(name)
        quantized = value is not None
    if value is None:
        return f"weight {name!r} is not a constant"
    if value.dtype not in (np.float16, np.float32, np.float64):
        return f"weight {name!r} has dtype {value.dtype}, not float"
    return name, value, quantized, slot


def _in_features(g: _Graph, node: onnx.NodeProto) -> int | None:
    w = _weight_input(g, node)
    if isinstance(w, str):
        return None
    _, value, _, slot = w
    if node.op_type == "Conv":
        return int(value.shape[1]) * int(attr(node, "group", 1))
    if node.op_type == "Gemm":
        return int(value.shape[1] if attr(node, "transB", 0) else value.shape[0])
    return int(value.shape[-2] if slot == 1 else value.shape[-1])


def _teacher_layer(student: _Graph, teacher: _Graph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The teacher's layer that writes (up to BN/bias Add/QDQ) the tensor the student layer is compared at."""
    out = _layer_output(student, node)
    name = _teacher_name(student, teacher, out)
    while name is not None:
        p = teacher.producer.get(name)
        if p is None:
            return None
        if _is_layer(p):
            return p if not isinstance(_weight_input(teacher, p), str) else None
        if p.op_type not in _AFFINE_OPS:
            return None
        if p.op_type == "Add" and not any(teacher.is_const(i) for i in p.input):
            return None
        name = next((i for i in p.input if i and not teacher.is_const(i)), None)
    return None


def _layer_output(g: _Graph, node: onnx.NodeProto) -> str:
    """The tensor a layer is compared at: its output, or that of the bias Add after a MatMul."""
    add = _bias_add(g, node)
    return add.output[0] if add is not None else node.output[0]


def _bias_add(g: _Graph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Add of a per-column constant right after a MatMul (weight on the right), if any."""
    if node.op_type != "MatMul" or not node.output:
        return None
    w = _weight_input(g, node)
    if isinstance(w, str) or w[3] != 1 or w[1].ndim != 2:
        return None
    add = g.sole_consumer(node.output[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    c = g.const(other)
    n = w[1].shape[1]
    if c is None or c.dtype.kind != "f" or (c.size not in (1, n)) or (c.ndim and c.shape[-1] != c.size):
        return None
    return add


# ============================================================================================ sites


@dataclass
class _Edit:
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


def _set_prefix(applied: list[tuple[dict, list[_Edit]]], k: int) -> None:
    """The model with the first k refits applied and the others undone."""
    for i, (_, edits) in enumerate(applied):
        for edit in edits:
            edit.set(i < k)


@dataclass
class _Bias:
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

    def store(self, g: _Graph, value: np.ndarray) -> _Edit:
        """Write the new bias (a fresh initializer) and point the reader at it."""
        if self.quant is not None:
            dq = self.quant[0]
            edit = _Edit(dq, 0, dq.input[0], g.add_initializer(f"{dq.input[0]}_corrected", value.astype(np.int32)))
        else:
            old = self.node.input[self.slot] if self.slot < len(self.node.input) else ""
            base = old or f"{self.node.name or self.node.output[0]}.bias"
            edit = _Edit(self.node, self.slot, old, g.add_initializer(f"{base}_refit", value))
        edit.set(True)
        return edit


@dataclass
class _Site:
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
    bias: _Bias
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

    def store_weight(self, g: _Graph, value: np.ndarray) -> _Edit:
        slot = list(self.node.input).index(self.weight_name)
        edit = _Edit(self.node, slot, self.weight_name, g.add_initializer(f"{self.weight_name}_refit", value))
        edit.set(True)
        return edit


@dataclass
class _ConvSite(_Site):
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
class _GemmSite(_Site):
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
class _MatMulSite(_Site):
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


def _match(student: _Graph, teacher: _Graph, node: onnx.NodeProto, kinds: list[str], bias_only: bool) -> _Site | str:
    """How to refit one layer (decided without touching the graph), or why it is skipped."""
    label = student.label(node)
    w = _weight_input(student, node)
    if isinstance(w, str):
        return w
    w_name, w_value, quantized, slot = w
    if w_value.size == 0:
        return f"weight of shape {list(w_value.shape)} is empty (zero-sized): nothing to refit"
    if node.op_type == "MatMul" and w_value.ndim != 2:
        return f"MatMul weight has {w_value.ndim} dims (only 2-D weights are refit)"
    method = "bias_correction" if (bias_only or quantized) else "lstsq"
    y_name = _layer_output(student, node)
    target = _teacher_name(student, teacher, y_name)
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


def _conv_gemm_bias(g: _Graph, node: onnx.NodeProto, channels: int, beta: float, quantized: bool,
                    dtype: np.dtype) -> _Bias:
    """The bias input (index 2) of a Conv or Gemm: float, int32 via DequantizeLinear, or to be created."""
    has = len(node.input) > 2 and bool(node.input[2])
    if node.op_type == "Gemm" and beta == 0.0:
        return _Bias(None, 2, channels, reason="Gemm with beta=0 ignores C")
    if not has:
        if quantized and g.producer.get(node.input[0]) is not None and \
                g.producer[node.input[0]].op_type == "DequantizeLinear":
            return _Bias(None, 2, channels, reason="a quantized layer without a bias (a float bias would stop "
                                                   "onnxruntime from fusing it into an integer kernel)")
        return _Bias(node, 2, channels, scale=beta if node.op_type == "Gemm" else 1.0, current=np.zeros(channels),
                     dtype=np.dtype(dtype))
    name = node.input[2]
    readers = sum(1 for n in g.consumers.get(name, []) for i in n.input if i == name)
    value = g.const(name)
    if value is not None:
        if value.dtype.kind != "f":
            return _Bias(None, 2, channels, reason=f"bias dtype {value.dtype} is not float")
        if value.size not in (1, channels) or (value.ndim and value.shape[-1] != value.size):
            return _Bias(None, 2, channels, reason=f"C of shape {list(value.shape)} is not one value per output column")
        current = np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (channels,)) * beta
        return _Bias(node, 2, channels, scale=beta, current=np.array(current), dtype=value.dtype)
    dq = g.producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear" and all(not i or i in g.inits for i in dq.input):
        if readers != 1 or name in g.graph_outputs:
            return _Bias(None, 2, channels, reason=f"bias {name!r} is shared with another node")
        codes = read_array(g.inits[dq.input[0]])
        s = read_array(g.inits[dq.input[1]]).astype(np.float64)
        zp = (read_array(g.inits[dq.input[2]]).astype(np.float64)
              if len(dq.input) > 2 and dq.input[2] else np.zeros_like(s))
        if codes.dtype != np.int32 or codes.size != channels or s.size not in (1, channels):
            return _Bias(None, 2, channels, reason=f"quantized bias {name!r} is not an int32 vector per channel")
        s, zp = np.broadcast_to(s.reshape(-1), (channels,)), np.broadcast_to(zp.reshape(-1), (channels,))
        current = (codes.reshape(-1).astype(np.float64) - zp) * s * beta
        if beta != 1.0:
            return _Bias(None, 2, channels, reason="a quantized C with beta ≠ 1")
        return _Bias(node, 2, channels, current=current, quant=(dq, codes.reshape(-1), np.array(s), np.array(zp)))
    return _Bias(None, 2, channels, reason=f"bias {name!r} is not a constant")


def _matmul_bias(g: _Graph, node: onnx.NodeProto, channels: int) -> _Bias:
    add = _bias_add(g, node)
    if add is None:
        return _Bias(None, 0, channels, reason="a MatMul without a bias Add after it")
    slot = 1 if add.input[0] == node.output[0] else 0
    value = g.const(add.input[slot])
    current = np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (channels,))
    return _Bias(add, slot, channels, current=np.array(current), dtype=value.dtype)


# =================================================================================== channel maps


class _Unmappable(Exception):
    pass


def _output_map(student: _Graph, teacher: _Graph, site: _Site, t_shape, s_shape, memo: dict) -> np.ndarray | None | str:
    """Teacher channel of each student output channel (None: the same channels), or why unknown."""
    axis = site.channel_axis % len(t_shape) if len(t_shape) else 0
    if len(t_shape) != len(s_shape) or any(a != b for i, (a, b) in enumerate(zip(t_shape, s_shape)) if i != axis):
        return f"shapes differ: the teacher's {site.target!r} is {list(t_shape)}, the student's {list(s_shape)}"
    if t_shape[axis] == s_shape[axis]:
        return None
    try:
        mapping = _layer_map(student, teacher, site.node, memo)
    except _Unmappable as exc:
        return (f"output channels differ ({s_shape[axis]} in the student, {t_shape[axis]} in the teacher) "
                f"and cannot be matched: {exc}")
    if mapping is None or len(mapping) != s_shape[axis] or mapping.max() >= t_shape[axis]:
        return f"output channels differ ({s_shape[axis]} vs {t_shape[axis]}) and the filter match is inconsistent"
    return mapping


def _tensor_map(student: _Graph, teacher: _Graph, name: str, memo: dict) -> np.ndarray | None:
    """Teacher channel indices of a student tensor's channels (None: identical), traced back to a layer."""
    p = student.producer.get(name)
    if p is None:
        return None
    if _is_layer(p) and not isinstance(_weight_input(student, p), str):
        return _layer_map(student, teacher, p, memo)
    if p.op_type in CHANNELWISE_OPS:
        src = next((i for i in p.input if i and not student.is_const(i)), None)
        if src is None:
            raise _Unmappable(f"{student.label(p)} has no variable input")
        return _tensor_map(student, teacher, src, memo)
    raise _Unmappable(f"the channels pass through {p.op_type} ({student.label(p)})")


def _layer_map(student: _Graph, teacher: _Graph, node: onnx.NodeProto, memo: dict) -> np.ndarray | None:
    """Teacher channel of each output channel of a student layer (memo: by the teacher tensor's name)."""
    key = _teacher_name(student, teacher, _layer_output(student, node))
    if key in memo:
        return memo[key]
    t_node = _teacher_layer(student, teacher, node)
    if t_node is None:
        raise _Unmappable(f"no teacher layer writes {_layer_output(student, node)!r}")
    s_rows, s_group = _filter_rows(student, node)
    t_rows, t_group = _filter_rows(teacher, t_node)
    if len(s_rows) == len(t_rows):
        memo[key] = None
        return None
    if s_group > 1 or t_group > 1:
        mult = len(s_rows) // s_group  # depthwise: output channel c·mult + j reads input channel c
        if _depthwise(student, node) and _depthwise(teacher, t_node) and len(t_rows) // t_group == mult:
            inputs = _tensor_map(student, teacher, node.input[0], memo)
            if inputs is None:
                raise _Unmappable(f"{student.label(node)} has the teacher's inputs but not its outputs")
            mapping = (inputs[:, None] * mult + np.arange(mult)).reshape(-1)
            memo[key] = mapping
            return mapping
        raise _Unmappable(f"{student.label(node)} is a grouped conv")
    cols = _tensor_map(student, teacher, _activation_input(student, node), memo)
    if cols is not None:
        width = s_rows.shape[1]
        if width != len(cols):
            if width % len(cols):
                raise _Unmappable(f"{width} input features of {student.label(node)} are not a multiple of "
                                  f"{len(cols)} channels")
            per = width // len(cols)  # Flatten of C×P: channel c owns features c·P … c·P + P − 1
            cols = (cols[:, None] * per + np.arange(per)).reshape(-1)
        if cols.max(initial=-1) >= t_rows.shape[1]:
            raise _Unmappable("input channel map exceeds the teacher's inputs")
        t_rows = t_rows[:, cols]
    elif s_rows.shape[1] != t_rows.shape[1]:
        raise _Unmappable(f"{student.label(node)} has {s_rows.shape[1]} input features, the teacher {t_rows.shape[1]}")
    mapping = _match_filters(s_rows.reshape(len(s_rows), -1), t_rows.reshape(len(t_rows), -1))
    if mapping is None:
        raise _Unmappable(f"the filters of {student.label(node)} are not (rescaled) slices of the teacher's")
    memo[key] = mapping
    return mapping


def _activation_input(g: _Graph, node: onnx.NodeProto) -> str:
    w = _weight_input(g, node)
    return node.input[1 - w[3]] if node.op_type == "MatMul" else node.input[0]


def _filter_rows(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray, int]:
    """Weights as [outputs, input features, taps] (a filter per output channel) and the group count."""
    w = _weight_input(g, node)
    if isinstance(w, str):
        raise _Unmappable(w)
    _, value, _, slot = w
    value = np.asarray(value, np.float64)
    if node.op_type == "Conv":
        return value.reshape(value.shape[0], value.shape[1], -1), int(attr(node, "group", 1))
    if node.op_type == "Gemm":
        rows = value if attr(node, "transB", 0) else value.T
    else:
        rows = value.T if slot == 1 else value
    return rows[:, :, None], 1


def _match_filters(s: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """Increasing teacher rows, one per student row, maximizing Σ|cos|; None unless every |cos| ≥ threshold."""
    ns = np.linalg.norm(s, axis=1, keepdims=True)
    nt = np.linalg.norm(t, axis=1, keepdims=True)
    if np.any(ns == 0):
        return None
    sim = np.abs((s / ns) @ np.where(nt > 0, t / np.where(nt > 0, nt, 1), 0).T)  # [S, T]
    n_s, n_t = sim.shape
    if n_s > n_t:
        return None
    # best[j]: best total for the rows so far using teacher rows < j; arg[i][j]: where row i went.
    best = np.zeros(n_t + 1)
    args = np.zeros((n_s, n_t + 1), np.int64)
    for i in range(n_s):
        cand = best[:-1] + sim[i]
        cand[:i] = -np.inf  # rows before i need i teacher rows
        running = np.maximum.accumulate(cand)
        # Where the running maximum was reached (the earliest row on ties).
        is_new = np.concatenate([[True], cand[1:] > running[:-1]])
        pos = np.maximum.accumulate(np.where(is_new, np.arange(n_t), 0))
        best = np.concatenate([[-np.inf], running])
        args[i, 1:] = pos
    chosen = np.zeros(n_s, np.int64)
    end = n_t
    for i in range(n_s - 1, -1, -1):
        chosen[i] = args[i, end]
        end = chosen[i]
    if np.any(sim[np.arange(n_s), chosen] < MAP_MIN_COSINE):
        return None
    return chosen


# ============================================================================================ helpers


def _chunks(total: int, chosen: np.ndarray | None, size: int) -> Iterator[np.ndarray]:
    rows = np.arange(total) if chosen is None else chosen
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _output_error(teacher: onnx.ModelProto, model: onnx.ModelProto, data: Dataset, bs: int) -> float | None:
    """Mean squared error of the graph outputs against the teacher's (None when they do not match)."""
    names = [o.name for o in teacher.graph.output]
    if not names or {o.name for o in model.graph.output} != set(names):
        return None
    total, count = 0.0, 0
    batches = zip(stream(teacher, data, names, batch_size=bs, desc="teacher outputs"),
                  stream(model, data, names, batch_size=bs, desc="student outputs"))
    for (_, tv), (_, sv) in batches:
        for n in names:
            t, s = np.asarray(tv[n], np.float64), np.asarray(sv[n], np.float64)
            if t.shape != s.shape:
                return None
            total += float(np.sum((t - s) ** 2))
            count += t.size
    return total / max(count, 1)


__all__ = ["Reconstruct"]
