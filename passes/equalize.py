"""equalize: cross-layer equalization of Conv/Gemm chains, so that per-tensor int8 ranges fit every channel.

Before / after (a pair; ``f`` positively homogeneous, see below)::

    x → Conv(W1, b1) → f → Conv(W2, b2) → y
    x → Conv(W1/s, b1/s) → f → Conv(W2·s, b2) → y          (s > 0 per middle channel)

The same function, since ``f(z/s) = f(z)/s`` channel by channel. Output channel c of the first
layer is divided by ``s_c = sqrt(r1_c / r2_c)`` and every weight of the second that reads channel
c multiplied by it (``r1_c``: the range of the first layer's output channel, ``r2_c``: of the
second layer's weights on that input channel), so both become ``sqrt(r1_c·r2_c)``: a depthwise
conv whose channels span decades (common after BatchNorm folding) gets even channel ranges, and
so does the tensor between the layers (Nagel et al. 2019, "Data-Free Quantization", section
4.1). A layer in a chain (second of one pair, first of the next) is rebalanced by both: the pairs
are swept until the scales settle (`kernels.equalize.equalize`). Node counts do not change.

Pairs: Conv → Conv (depthwise and grouped convs included: input channel c of a grouped conv is
read by its group's output channels only) and Gemm → Gemm (``transA`` 0 on the second; rows or
columns of B per ``transB``; a first layer's C per column), through any number of
``Identity``, ``Relu``, ``LeakyRelu``, ``PRelu`` (any slope shape: it commutes with a positive
scale), ``Clip`` with min 0 and no max, ``MaxPool``, ``AveragePool``, ``GlobalAveragePool``,
``GlobalMaxPool``.

``Clip(0, c)`` (ReLU6) is not positively homogeneous: scaling its input moves where it saturates
per channel, and Clip takes one bound for all channels. ``clip="skip"`` (default) leaves such a
pair as it is, with the reason; ``clip="relu"`` replaces the Clip by Relu and equalizes (lossy,
like AIMET's ReLU6 → ReLU replacement: exact only where the calibration data never reaches c;
each replaced Clip is reported as lossy). Exact (float rounding aside) with ``clip="skip"``.

Skipped, with the reason: a BatchNormalization between the layers (run ``fold_batchnorm`` first;
``simplify`` does); an op between them that is not positively homogeneous (Clip(0, c), HardSwish,
Sigmoid, …); a branch point (a tensor between the layers read by another node, or a model output:
scaling it would change that reader); a weight or bias that is not a float32 constant, is shared
with another node or is not finite; a Gemm C that is not one value per column, a second Gemm
with ``transA``; channel counts that do not match. High-bias absorption (the paper's section 4.2)
is not done: it is exact only where the data bounds each pre-activation below, which a pass
without a proof over all inputs cannot promise.

Not run by ``quantize``: with per-channel int8 weights the weights' own spread costs little, and
the middle tensor's range moves by the scales in ways the weights alone do not predict; whether
it helps is model by model (benchmarks/RESULTS.md, "Cross-layer equalization and bias
correction", `bench_equalize.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.external_data import disk_tensor, on_disk
from graph_opt.kernels.equalize import EqLayer, equalize, range_spread
from graph_opt.model_io import copy_model
from graph_opt.onnx_util import Namer, attr
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._graph import GraphIndex, report_subgraphs

_DEFAULT = ("", "ai.onnx")
# f(s·z) = s·f(z) for s > 0, channel by channel: scaling commutes with them.
HOMOGENEOUS = ("Identity", "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
               "GlobalMaxPool")
# Elementwise maps that are not: named as the reason a pair is left alone.
_NOT_HOMOGENEOUS = ("HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus",
                    "Softsign", "Mish", "Swish", "ThresholdedRelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt")


@dataclass
class _Side:
    """A layer's weight and bias as the kernel wants them, and how to write them back."""

    idx: int
    weight: str
    bias: str | None
    layer: EqLayer
    transposed: bool  # a Gemm B stored (K, N): the kernel's (O, I) is its transpose


@dataclass
class _Pair:
    first: int
    second: int
    clips: list[int]  # Clip(0, c) nodes between them replaced by Relu (clip="relu")


@dataclass(frozen=True, kw_only=True)
class Equalize(Pass):
    """Cross-layer equalization of Conv/Gemm chains through Relu-like ops (exact; per-channel ranges evened)."""

    name: ClassVar[str] = "equalize"
    edits_input: ClassVar[bool] = False
    clip: Literal["skip", "relu"] = "skip"
    max_sweeps: int = 100

    def __post_init__(self) -> None:
        if self.max_sweeps < 1:
            raise ValueError("max_sweeps must be >= 1")

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        ix = GraphIndex(model)
        report_subgraphs(ix, report, ("Conv", "Gemm"))
        pairs = find_pairs(ix, self.clip, report)
        firsts = {p.first for p in pairs}
        sides: dict[int, _Side] = {}
        kept: list[_Pair] = []
        for p in pairs:
            got = [sides.get(i) or _side(ix, i, first=i in firsts) for i in (p.first, p.second)]
            bad = next((g for g in got if isinstance(g, str)), None)
            if bad is None and got[0].layer.out_channels != got[1].layer.in_channels:
                bad = (f"{got[0].layer.out_channels} output channels feed {got[1].layer.in_channels} "
                       "input channels")
            if bad is not None:
                report.skip(ix.labels[p.first], f"not equalized with {ix.labels[p.second]}: {bad}")
                continue
            for g in got:
                sides[g.idx] = g
            kept.append(p)
        if not kept:
            return copy_model(model)
        order = sorted(sides)
        pos = {idx: k for k, idx in enumerate(order)}
        before = {idx: sides[idx].layer for idx in order}
        result = equalize([sides[i].layer for i in order], [(pos[p.first], pos[p.second]) for p in kept],
                          max_sweeps=self.max_sweeps)
        for p, s in zip(kept, result.scales):
            a, b = pos[p.first], pos[p.second]
            details = {"into": ix.labels[p.second], "channels": int(s.size),
                           "scale_min": float(s.min()), "scale_max": float(s.max()),
                           "spread_before": range_spread(before[p.first].output_ranges()),
                           "spread_after": range_spread(result.layers[a].output_ranges()),
                           "second_spread_before": range_spread(before[p.second].input_ranges()),
                           "second_spread_after": range_spread(result.layers[b].input_ranges())}
            if p.clips:
                details["lossy"] = "Clip(0, c) replaced by Relu: " + ", ".join(ix.labels[c] for c in p.clips)
            report.rewrite(ix.labels[p.first], **details)
        report.note(f"{len(kept)} pairs over {len(order)} layers equalized in {result.sweeps} sweeps"
                    + ("" if result.converged else f" (not converged within max_sweeps={self.max_sweeps})"))
        new = {idx: result.layers[pos[idx]] for idx in order}
        clips = {c for p in kept for c in p.clips}
        return _apply(model, ix, sides, new, clips)


def find_pairs(ix: GraphIndex, clip: str, report: PassReport | None = None) -> list[_Pair]:
    """Every (first, second) layer pair of the main graph joined by positively homogeneous ops
    (pure: nothing is edited); `report` receives the skips of the pairs that are not."""
    pairs = []
    for idx, node in enumerate(ix.nodes):
        if node.op_type not in ("Conv", "Gemm") or node.domain not in _DEFAULT or not node.output:
            continue
        found = _follow(ix, idx, clip)
        if isinstance(found, str):
            if report is not None:
                report.skip(ix.labels[idx], found)
        elif found is not None:
            pairs.append(found)
    return pairs


def _follow(ix: GraphIndex, idx: int, clip: str) -> _Pair | str | None:
    """The pair starting at layer `idx`, the reason there is none, or None when its output does
    not lead into another layer through per-channel ops at all."""
    first = ix.nodes[idx]
    t = first.output[0]
    clips: list[int] = []
    while True:
        if t in ix.graph_outputs:
            return None if t == first.output[0] else f"branch point: {t!r} is a model output"
        readers = ix.readers(t)
        if not readers:
            return None
        if len(readers) > 1:
            if not any(ix.nodes[r].op_type in ("Conv", "Gemm") or ix.nodes[r].op_type in HOMOGENEOUS
                       for r, _ in readers):
                return None
            return f"branch point: {t!r} is read by {len(readers)} nodes (scaling it would change the others)"
        r, slot = readers[0]
        node = ix.nodes[r]
        op = node.op_type
        if node.domain not in _DEFAULT:
            return None
        if op in ("Conv", "Gemm") and slot == 0:
            if first.op_type != op:
                return None
            if op == "Gemm" and attr(node, "transA", 0):
                return f"next layer {ix.labels[r]} is a Gemm with transA"
            return _Pair(idx, r, clips)
        if slot != 0:
            return None
        if op == "BatchNormalization":
            return f"BatchNormalization {ix.labels[r]} follows: run fold_batchnorm first (simplify does)"
        if op == "Clip":
            lo, hi = _clip_bounds(ix, node)
            if lo is None or lo != 0.0 or hi is None:
                return f"Clip {ix.labels[r]} with computed bounds is not positively homogeneous"
            if np.isfinite(hi):
                if clip != "relu":
                    return (f"Clip {ix.labels[r]} (0, {hi:g}) is not positively homogeneous: scaling moves where "
                            "it saturates (clip=relu replaces it by Relu, lossy)")
                clips.append(r)
        elif op in _NOT_HOMOGENEOUS:
            return f"{op} {ix.labels[r]} follows: not positively homogeneous (f(s·z) != s·f(z))"
        elif op not in HOMOGENEOUS or (op == "MaxPool" and len(node.output) > 1 and node.output[1]):
            return None
        t = node.output[0]


def _clip_bounds(ix: GraphIndex, node: onnx.NodeProto) -> tuple[float | None, float | None]:
    """(min, max) of a Clip (−inf / inf when absent); None for a bound that is not a constant."""
    if len(node.input) == 1 and any(a.name in ("min", "max") for a in node.attribute):  # opset < 11
        return float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))
    bounds: list[float | None] = []
    for k, default in ((1, -np.inf), (2, np.inf)):
        name = node.input[k] if len(node.input) > k else ""
        if not name:
            bounds.append(default)
            continue
        v = ix.const(name)
        bounds.append(None if v is None or v.size != 1 else float(v.reshape(-1)[0]))
    return bounds[0], bounds[1]


def _private_float(ix: GraphIndex, name: str, what: str) -> np.ndarray | str:
    value = ix.const(name)
    if value is None:
        return f"{what} is not a constant"
    if ix.const_dtype(name) != TensorProto.FLOAT:
        return f"{what} is not float32"
    if len(ix.readers(name)) != 1 or name in ix.graph_outputs:
        return f"{what} {name!r} is shared with another node"
    if not np.all(np.isfinite(value)):
        return f"{what} contains NaN or inf"
    return value


def _side(ix: GraphIndex, idx: int, *, first: bool) -> _Side | str:
    """Layer `idx` in the kernel's layout, or why it cannot be rescaled."""
    node = ix.nodes[idx]
    if len(node.input) < 2:
        return f"{ix.labels[idx]} has no weight"
    w = _private_float(ix, node.input[1], f"weight of {ix.labels[idx]}")
    if isinstance(w, str):
        return w
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    b = None
    gemm = node.op_type == "Gemm"
    if gemm:
        if w.ndim != 2:
            return f"weight of {ix.labels[idx]} is not 2-D"
        transposed = not attr(node, "transB", 0)
        canon = w.T if transposed else w
        groups = 1
    else:
        if w.ndim < 3:
            return f"Conv weight of {ix.labels[idx]} has rank {w.ndim}"
        transposed, canon, groups = False, w, int(attr(node, "group", 1))
    if first and b_name is not None:
        b = _private_float(ix, b_name, f"bias of {ix.labels[idx]}")
        if isinstance(b, str):
            return b
        n = canon.shape[0]
        if b.size != n or (b.ndim == 2 and b.shape[0] != 1) or b.ndim > 2:
            return f"bias of {ix.labels[idx]} of shape {b.shape} is not one value per output channel"
    try:
        layer = EqLayer(canon, groups, None if b is None else b.reshape(-1))
    except ValueError as exc:
        return f"{ix.labels[idx]}: {exc}"
    return _Side(idx, node.input[1], b_name if b is not None else None, layer, transposed)


def _apply(model: onnx.ModelProto, ix: GraphIndex, sides: dict[int, _Side], new: dict[int, EqLayer],
           clips: set[int]) -> onnx.ModelProto:
    """A copy of `model` with the rescaled weights under fresh names (the old ones dropped) and the
    replaced Clips as Relu."""
    g = model.graph
    namer = Namer(g)
    to_disk = any(on_disk(t) for t in g.initializer)
    replaced: dict[str, tuple[str, np.ndarray]] = {}
    for idx, side in sides.items():
        lay = new[idx]
        w = lay.weight.T if side.transposed else lay.weight
        old_w = ix.const(side.weight)
        replaced[side.weight] = (namer(f"{ix.labels[idx]}.weight_eq"), w.astype(np.float32).reshape(old_w.shape))
        if side.bias is not None:
            old_b = ix.const(side.bias)
            replaced[side.bias] = (namer(f"{ix.labels[idx]}.bias_eq"), lay.bias.astype(np.float32).reshape(old_b.shape))
    out = copy_model(model, without=set(replaced), nodes=False)
    for idx, node in enumerate(ix.nodes):
        if idx in clips:
            out.graph.node.append(helper.make_node("Relu", [node.input[0]], list(node.output), name=node.name))
            continue
        copy = out.graph.node.add()
        copy.CopyFrom(node)
        if idx in sides:
            for k, name in enumerate(copy.input):
                if name in replaced:
                    copy.input[k] = replaced[name][0]
    for new_name, value in replaced.values():
        out.graph.initializer.append(disk_tensor(value, new_name) if to_disk and value.nbytes >= 1024
                                     else numpy_helper.from_array(value, new_name))
    gone = set(replaced)
    for field in (out.graph.input, out.graph.value_info):
        keep = [v for v in field if v.name not in gone]
        if len(keep) != len(field):
            del field[:]
            field.extend(keep)
    if model.ir_version < 4:
        out.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
                               for n, v in replaced.values())
    return out
