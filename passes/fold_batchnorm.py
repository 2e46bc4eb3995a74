"""fold_batchnorm: fold a BatchNormalization that follows a Conv or Gemm into that layer's weights.

Before:  x → Conv(W, b) → BatchNormalization(γ, β, μ, σ²) → y
After:   x → Conv(W', b') → y

BatchNormalization (inference) computes y = γ·(x − μ)/√(σ² + ε) + β per channel. With
s = γ/√(σ² + ε) the producer's output channel c is scaled and shifted:
W'[c] = s[c]·W[c] and b'[c] = s[c]·(b[c] − μ[c]) + β[c]. Exact up to float rounding.

Conv: output channels are axis 0 of W (grouped and depthwise convs included).
Gemm: Y = α·A·op(B) + β_g·C; output channels are the columns of Y, i.e. rows of B when transB=1
and columns when transB=0; C becomes b' and β_g becomes 1.

Skipped, with the reason in the report: BN in training mode or with extra outputs; non-constant
BN parameters or producer weights; a weight or bias shared with another node; a producer output
read by anything besides the BN (or a graph output); a Gemm bias C that is not per-column;
BN producers other than Conv and Gemm; an If/Loop/Scan whose subgraphs hold BatchNormalizations
(subgraphs are not rewritten).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.model_io import to_graph, to_model
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._graph import Namer, constant, node_label, report_subgraphs, sole_consumer, used_once


@dataclass(frozen=True, kw_only=True)
class FoldBatchnorm(Pass):
    """Fold BatchNormalization after Conv/Gemm into the layer's weights (exact)."""

    name: ClassVar[str] = "fold_batchnorm"

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        graph = to_graph(model)
        report_subgraphs(graph, report, ("BatchNormalization",))
        namer = Namer(graph)
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            match = _match(graph, bn)
            if isinstance(match, str):
                report.skip(node_label(bn), match)
                continue
            producer, w, b, scale, shift = match
            _apply(graph, namer, producer, bn, w, b, scale, shift)
            report.rewrite(node_label(bn), into=node_label(producer), channels=int(scale.size))
        if not report.rewritten:
            return model
        graph.cleanup().toposort()
        return to_model(graph, model)


def _match(graph: gs.Graph, bn: gs.Node):
    """(producer, W, b, scale, shift) when the fold is valid, else the reason it is not."""
    if bn.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode"
    if len([o for o in bn.outputs if o.name]) != 1:
        return "BatchNormalization with running-statistics outputs"
    params = [constant(t) for t in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "BatchNormalization parameters are not constants"
    gamma, beta, mean, var = (p.astype(np.float64).ravel() for p in params)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    x = bn.inputs[0]
    if len(x.inputs) != 1:
        return "input is a graph input, not a layer output"
    producer = x.inputs[0]
    if producer.op not in ("Conv", "Gemm"):
        return f"producer is {producer.op}, not Conv or Gemm"
    if sole_consumer(graph, x) is not bn:
        return f"output of {node_label(producer)} is also read elsewhere"
    w = constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
    if w is None:
        return f"weight of {node_label(producer)} is not a constant"
    if not used_once(producer.inputs[1]):
        return f"weight of {node_label(producer)} is shared with another node"
    has_bias = len(producer.inputs) > 2 and producer.inputs[2].name != ""
    b = constant(producer.inputs[2]) if has_bias else None
    if has_bias and (b is None or not used_once(producer.inputs[2])):
        return f"bias of {node_label(producer)} is not a private constant"
    channels = w.shape[0] if producer.op == "Conv" else (w.shape[0] if producer.attrs.get("transB", 0) else w.shape[-1])
    if producer.op == "Gemm" and w.ndim != 2:
        return "Gemm weight is not 2-D"
    if gamma.size != channels:
        return f"BatchNormalization has {gamma.size} channels, {node_label(producer)} produces {channels}"
    if b is not None:
        if producer.op == "Gemm":
            if b.size not in (1, channels) or (b.ndim == 2 and b.shape[0] != 1):
                return "Gemm bias C is not per-column"
            b = np.broadcast_to(b.reshape(-1), (channels,)) * float(producer.attrs.get("beta", 1.0))
        b = b.astype(np.float64).reshape(-1)
    else:
        b = np.zeros(channels)
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    return producer, w, b, scale, shift


def _apply(graph, namer, producer, bn, w, b, scale, shift) -> None:
    dtype = w.dtype
    if producer.op == "Conv":
        new_w = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif producer.attrs.get("transB", 0):
        new_w = w.astype(np.float64) * scale[:, None]
    else:
        new_w = w.astype(np.float64) * scale[None, :]
    new_b = b * scale + shift
    base = node_label(producer)
    w_t = gs.Constant(namer(f"{base}.weight_bnfold"), new_w.astype(dtype))
    b_t = gs.Constant(namer(f"{base}.bias_bnfold"), new_b.astype(dtype))
    producer.inputs = [producer.inputs[0], w_t, b_t]
    if producer.op == "Gemm":
        producer.attrs["beta"] = 1.0
    # The producer now writes the BN's output tensor; the BN and its old output disappear.
    out = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    producer.outputs = [out]
