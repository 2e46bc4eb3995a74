"""Activation ranges by output-error search (``calibration='output'``, the default).

A min/max range is decided by the one most extreme value of a tensor: a SiLU output whose values
are mostly below 1 but reach 190 on a few pixels gets a step of 0.76, and nearly every value
rounds to 0 or 1 step. Clipping trades that rounding error for a saturation error on the few
large values; which trade is better depends on what reads the tensor, so it is measured there.

Searched: each activation with its own scale (`placement.Placement.acts`, ``scheme != 'shared'``)
whose every quantized reader is a quantized layer, reached directly or through nodes that do not
quantize again (data movement sharing its scale, float ops such as a Sigmoid); its region ends at
those layers' outputs (`_region`). Not searched (the min/max range stays): a tensor read by an
own-scale Add/Mul/Concat or reaching a graph output before a layer, a float layer, a node with
subgraphs, or a region of more than `MAX_REGION` nodes.

For each candidate range ``α·[lo, hi]`` of the observed min/max range (`ALPHAS`, 1 first), one
streaming onnxruntime pass over ``sensitivity_samples`` samples runs a copy of the region reading
the candidate's QuantizeLinear → DequantizeLinear of the tensor, its layers with their planned
dequantized weights and biases, against the float model. The cost is the mean over every output
position of those layers (a pixel's channel vector, a token's features) of the relative error
``Σ_c (y − ŷ)² / Σ_c y²``, summed over the layers. A position counts the same whatever its
energy: an energy-weighted error (an SNR) is decided by the few positions with large values,
and hides a step that rounds the small values of every other position to zero. The candidate
with the least cost is kept (ties keep the wider range).

Every tensor is measured in isolation (other inputs float), like `sensitivity`; the sums are
reduced inside onnxruntime, so a few scalars per candidate and batch leave the session, whose
settings are `sensitivity.measure`'s. The chosen range lies inside the observed one and the
activation's parameters still contain 0 (`kernels.quant.compute_params`): values beyond it
saturate; inside it the error bound of the pass stays s_x/2 per element.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from graph_opt.data import Dataset, batch_size_for
from graph_opt.external_data import has_disk_weights
from graph_opt.intermediates import Capture
from graph_opt.kernels.quant import compute_params
from graph_opt.onnx_util import Namer
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._qplan import TensorQuant
from graph_opt.passes.quantize.emit import dq_weight, param_inits
from graph_opt.passes.quantize.layers import Layer
from graph_opt.passes.quantize.placement import Placement
from graph_opt.passes.quantize.sensitivity import _probe
from graph_opt.runtime import make_session, run_batches

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize

# The energy below which a layer output position counts as zero (its relative error is taken against this).
TINY = 1e-12

# The candidate ranges, as fractions of the observed min/max range (1 first: a tie keeps it).
ALPHAS = (1.0, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3)


def owners(pl: Placement) -> dict[str, str]:
    """Each quantized activation → the own-scale tensor whose parameters it uses (itself, or the
    tensor a data-movement op shares the scale of)."""
    return {t: (q.shared_with or t) if q.scheme == "shared" else t for t, q in pl.acts.items()}


def search_ranges(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], weights: dict[int, TensorQuant],
                  biases: dict[int, TensorQuant], pl: Placement, data: Dataset, opts: Quantize,
                  batch_size: int | None) -> dict[str, tuple[float, float]]:
    """The chosen range of each own-scale activation of `pl` whose best candidate is not its
    observed range (see the module docstring); the others are left out."""
    regions = {t: r for t, q in pl.acts.items() if q.scheme != "shared" and q.range is not None
               and q.range[1] > q.range[0] and (r := _region(ix, layers, pl, t)) is not None}
    if not regions:
        return {}
    cap = Capture(model)
    g = cap.model.graph
    namer = Namer(g)
    dq_w: dict[int, list[str]] = {}

    def layer_params(idx: int) -> list[str]:
        if idx not in dq_w:
            lay = layers[idx]
            ins = [dq_weight(g, namer, weights[idx], namer(f"{lay.w}_search"))]
            if lay.b is not None:
                ins.append(dq_weight(g, namer, biases[idx], namer(f"{lay.b}_search")) if idx in biases else lay.b)
            dq_w[idx] = ins
        return dq_w[idx]

    pairs: dict[tuple[str, int, str], tuple[str, str]] = {}  # (tensor, candidate, end) -> (reference, candidate)
    for t, (nodes, ends) in regions.items():
        base = pl.acts[t]
        lo, hi = base.range
        for k, alpha in enumerate(ALPHAS):
            p = compute_params((lo * alpha, hi * alpha), base.dtype, symmetric=False)
            params = param_inits(g, namer, f"{t}_search{k}", TensorQuant.from_params(t, "activation", p))
            renamed = {t: _qdq(g, namer, t, params)}
            for idx in nodes:  # graph order: every region input is renamed before it is read
                node = ix.nodes[idx]
                if idx in layers and idx in weights and idx in pl.static:
                    renamed[node.output[0]] = _probe(g, namer, ix, idx,
                                                     [renamed.get(layers[idx].x, layers[idx].x), *layer_params(idx)])
                else:
                    outs = _copy(g, namer, node, [renamed.get(x, x) for x in node.input])
                    renamed.update((o, c) for o, c in zip(node.output, outs) if o)
            for end in ends:
                pairs[t, k, end] = (end, renamed[end])
    # Per candidate and layer output: the relative error of every output position (a pixel's channel
    # vector, a token's features), Σ_c (y − ŷ)² / Σ_c y², summed inside onnxruntime, and the count.
    opset = next((i.version for i in cap.model.opset_import if i.domain in ("", "ai.onnx")), 13)
    energy: dict[str, str] = {}
    relative: dict[tuple[str, int, str], str] = {}
    reducers: dict[str, list[str]] = {}
    for key, (ref, cand) in pairs.items():
        axis = 1 if ix.producer_op(ref) in ("Conv", "Gemm") else -1
        if ref not in energy:
            energy[ref] = _at_least(g, namer, _sumsq_along(g, namer, ref, axis, opset), TINY)
            reducers[energy[ref]] = ["size"]
            reducers[ref] = ["size"]
        diff, rel = namer(f"{cand}_error"), namer(f"{cand}_relative_error")
        g.node.extend([helper.make_node("Sub", [ref, cand], [diff]),
                       helper.make_node("Div", [_sumsq_along(g, namer, diff, axis, opset), energy[ref]], [rel])])
        relative[key] = rel
        reducers[rel] = ["sum"]
    cap.reduce(reducers)
    counts = {ref: cap.reduced[e]["size"] for ref, e in energy.items()}
    sizes = [cap.reduced[ref]["size"] for ref in energy]
    sums = {key: cap.reduced[r]["sum"] for key, r in relative.items()}
    names = list(dict.fromkeys([*counts.values(), *sizes, *sums.values()]))
    work, arrays = cap.model, cap.weights
    weight_bytes = sum(int(a.nbytes) for a in arrays.values())
    session = make_session(work, optimize="basic" if not has_disk_weights(work) else False, fuse_qdq=False,
                           threads=opts.threads, arena=False, weights=arrays)
    del work, arrays, cap
    size_names = set(sizes)

    def batch_bytes(outs: list[np.ndarray]) -> float:
        # per layer output: the reference and, one at a time, a candidate and its error (float32)
        return 3 * 4 * sum(int(v) for n, v in zip(names, outs) if n in size_names)

    acc = dict.fromkeys(names, 0.0)
    sub = data.take(min(opts.max_samples, opts.sensitivity_samples))
    for _feed, outs in run_batches(session, names, sub, batch_size or batch_size_for(model, 0), "range search",
                                   batch_bytes=batch_bytes, weight_bytes=weight_bytes):
        for n, v in zip(names, outs):
            acc[n] += float(v)
    cost: dict[str, list[float]] = {t: [0.0] * len(ALPHAS) for t in regions}
    for (t, k, end), (ref, _) in pairs.items():
        cost[t][k] += acc[sums[t, k, end]] / max(acc[counts[ref]], 1.0)
    chosen: dict[str, tuple[float, float]] = {}
    for t, c in cost.items():
        best = min(range(len(ALPHAS)), key=lambda k: (c[k], k))
        if best and math.isfinite(c[best]) and c[best] < c[0]:
            lo, hi = pl.acts[t].range
            chosen[t] = (lo * ALPHAS[best], hi * ALPHAS[best])
    return chosen


# A region longer than this (a tensor read far and wide in float) is not searched: its range stays.
MAX_REGION = 32


def _region(ix: GraphIndex, layers: dict[int, Layer], pl: Placement, t: str) -> tuple[list[int], list[str]] | None:
    """The nodes that read activation `t`'s dequantized value, up to where the values are
    quantized again, in graph order, and the tensors where its error is measured (the ends); None
    when `t` is not searched (nothing quantized reads it, a region longer than `MAX_REGION`, a
    node with subgraphs in it).

    From `t` (its quantized readers only, when some readers read the float tensor): a quantized
    layer ends the walk at its output; a node writing a quantized activation of its own scale ends
    it there; a graph output ends it; any other node (a Sigmoid, a data-movement op sharing `t`'s
    scale, a LayerNorm's arithmetic) is followed to its readers."""
    q = pl.acts[t]
    readers = [i for i, _ in ix.readers(t)]
    if q.consumers is not None:
        readers = [i for i in readers if ix.labels[i] in q.consumers]
    nodes: set[int] = set()
    ends: list[str] = []
    todo = list(readers)
    while todo:
        idx = todo.pop()
        if idx in nodes:
            continue
        node = ix.nodes[idx]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        nodes.add(idx)
        if len(nodes) > MAX_REGION:
            return None
        if idx in layers:
            if idx not in pl.static:
                return None  # a float layer reads it: not a quantized reader (consumers name those)
            ends.append(node.output[0])
            continue
        for o in node.output:
            if not o:
                continue
            if (o in pl.acts and pl.acts[o].scheme != "shared") or o in ix.graph_outputs:
                return None  # a quantized activation of its own, or an output, before a layer: not searched
            else:
                todo.extend(i for i, _ in ix.readers(o))
    if not ends:
        return None
    return sorted(nodes), list(dict.fromkeys(ends))


def _sumsq_along(g: onnx.GraphProto, namer: Namer, x: str, axis: int, opset: int) -> str:
    """ReduceSumSquare of `x` over its feature `axis` (ONNX opset 18 moved the axes to an input)."""
    out = namer(f"{x}_sumsq_{axis}")
    if opset >= 18:
        axes = namer(f"{x}_axes")
        g.initializer.append(onnx.numpy_helper.from_array(np.array([axis], np.int64), axes))
        g.node.append(helper.make_node("ReduceSumSquare", [x, axes], [out], keepdims=0))
    else:
        g.node.append(helper.make_node("ReduceSumSquare", [x], [out], axes=[axis], keepdims=0))
    return out


def _at_least(g: onnx.GraphProto, namer: Namer, x: str, floor: float) -> str:
    """max(x, floor): a position whose reference is all zeros counts its error against `floor`."""
    eps, out = namer(f"{x}_floor"), namer(f"{x}_floored")
    g.initializer.append(onnx.numpy_helper.from_array(np.array(floor, np.float32), eps))
    g.node.append(helper.make_node("Max", [x, eps], [out]))
    return out


def _qdq(g: onnx.GraphProto, namer: Namer, x: str, params: tuple[str, str]) -> str:
    """`x` through QuantizeLinear → DequantizeLinear with the scale and zero point `params`."""
    q, dq = namer(f"{x}_search_q"), namer(f"{x}_search_dq")
    g.node.extend([helper.make_node("QuantizeLinear", [x, *params], [q]),
                   helper.make_node("DequantizeLinear", [q, *params], [dq])])
    return dq


def _copy(g: onnx.GraphProto, namer: Namer, node: onnx.NodeProto, inputs: list[str]) -> list[str]:
    """A copy of `node` reading `inputs`, appended to `g`; returns its outputs' names."""
    outs = [namer(f"{o}_search") if o else "" for o in node.output]
    copy = helper.make_node(node.op_type, inputs, outs, name=namer(f"{node.name or node.op_type}_search"),
                            domain=node.domain or None)
    copy.attribute.extend(node.attribute)
    g.node.append(copy)
    return outs


class Searched(Mapping[str, tuple[float, float]]):
    """`ranges` with the searched ones in place of the observed ones (a Mapping for `placement.place`)."""

    def __init__(self, ranges: Mapping[str, tuple[float, float]], chosen: Mapping[str, tuple[float, float]]):
        self._ranges, self._chosen = ranges, chosen

    def __getitem__(self, t: str) -> tuple[float, float]:
        return self._chosen[t] if t in self._chosen else self._ranges[t]

    def __contains__(self, t: object) -> bool:
        return t in self._ranges

    def __iter__(self):
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)
