"""Sensitivity for the quantize pass: each quantized node's own error, measured in isolation.

Per layer with a quantized weight, a probe: a copy of the layer beside the float one, reading
its planned QDQ input, dequantized weight and bias (`_probe_graph`). Per activation with its own
scale, its planned QuantizeLinear → DequantizeLinear. Every SNR is two sums, Σ ref² and
Σ (ref − candidate)², computed inside onnxruntime (ReduceSumSquare, float32) on
``sensitivity_samples`` samples, so two scalars per pair leave the session:
``SNR = 10·log10(Σ ref² / Σ (ref − candidate)²)`` dB (inf without error). A node's SNR combines
its parts (layer, or inputs, and output) by adding their noise-to-signal ratios.

`split_sensitive`: below ``sensitivity_snr_db`` ('auto': 25 dB for 8-bit weights, 30 dB for int8
weights on a 7-bit grid, 10 dB for int4, none for ternary/binary) a node is kept float, or with
``sensitive='weight_only'`` a layer whose weight-only probe (float input and bias) holds the
threshold keeps its quantized weight and runs on float activations. The session runs with
onnxruntime's basic optimizations only (a few samples: the layout changes' reordered weight copies
cost memory and win no time), none for a model whose weights are kept on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from graph_opt.data import Dataset, batch_size_for
from graph_opt.external_data import has_disk_weights
from graph_opt.intermediates import Capture
from graph_opt.onnx_util import Namer
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._qplan import TensorQuant
from graph_opt.passes.quantize.emit import dq_weight, param_inits
from graph_opt.passes.quantize.layers import Layer
from graph_opt.passes.quantize.placement import Placement
from graph_opt.runtime import make_session, run_batches

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize


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
    cap = Capture(model)  # the probes are added to its copy, and moved next to their producers with the sums
    g = cap.model.graph
    namer = Namer(g)
    probe_of: dict[int, tuple[str, str]] = {}  # layer idx -> (float output, probe output)
    wo_of: dict[int, str] = {}                  # static layer idx -> weight-only probe output
    qdq_done: dict[str, str] = {}

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
    reducers: dict[str, list[str]] = {}
    diffs: dict[str, str] = {}
    for key, (ref, cand) in pairs.items():
        diffs[key] = namer(f"{cand}_error")
        g.node.append(helper.make_node("Sub", [ref, cand], [diffs[key]]))
        reducers.setdefault(ref, ["sumsq", "size"])
        reducers[diffs[key]] = ["sumsq"]
    cap.reduce(reducers)
    outputs = {key: (cap.reduced[ref]["sumsq"], cap.reduced[diffs[key]]["sumsq"]) for key, (ref, _) in pairs.items()}
    sizes = list(dict.fromkeys(cap.reduced[ref]["size"] for ref, _ in pairs.values()))
    return cap.model, cap.weights, _Probes(outputs, sizes, measured)


def measure(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], weights: dict[int, TensorQuant],
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

    for _feed, outs in run_batches(session, names, sub, batch_size or batch_size_for(model, 0), "sensitivity",
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


def _probe(g: onnx.GraphProto, namer: Namer, ix: GraphIndex, idx: int, inputs: list[str]) -> str:
    """A copy of layer `idx` reading `inputs`, appended to `g`; returns its output name."""
    node = ix.nodes[idx]
    out = namer(f"{node.output[0]}_probe")
    probe = helper.make_node(node.op_type, inputs, [out], name=namer(f"{ix.labels[idx]}_probe"))
    probe.attribute.extend(node.attribute)
    g.node.append(probe)
    return out


def split_sensitive(sens: dict[int, dict[str, float]], threshold: float, sensitive: str
                    ) -> tuple[dict[int, str], dict[int, str]]:
    """The nodes below `threshold`: those kept float and, with ``sensitive='weight_only'``, the
    layers that keep a quantized weight on float activations, each with its reason."""
    forced: dict[int, str] = {}
    weight_only: dict[int, str] = {}
    for idx, values in sens.items():
        if values["snr_db"] >= threshold:
            continue
        detail = ", ".join(f"{k} {v}" for k, v in values.items() if k != "snr_db")
        if sensitive == "weight_only" and values.get("weight_only_snr_db", -math.inf) >= threshold:
            weight_only[idx] = (f"weight-only: quantized activations too lossy (SNR {values['snr_db']:.1f} dB "
                                f"< {threshold:g} dB; {detail})")
        else:
            forced[idx] = f"sensitive: SNR {values['snr_db']:.1f} dB < {threshold:g} dB ({detail})"
    return forced, weight_only
