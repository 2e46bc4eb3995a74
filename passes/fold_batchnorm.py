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

The pass edits the ModelProto directly: its output copies each weight it keeps once and holds
only the folded layers' new weights besides (quantize folds first, and its memory is measured).
A folded weight of a model whose weights are kept on disk goes to disk too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx

from graph_opt.model_io import copy_model
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._fold import apply_folds, find_folds
from graph_opt.passes._graph import GraphIndex, report_subgraphs


@dataclass(frozen=True, kw_only=True)
class FoldBatchnorm(Pass):
    """Fold BatchNormalization after Conv/Gemm into the layer's weights (exact)."""

    name: ClassVar[str] = "fold_batchnorm"
    edits_input: ClassVar[bool] = False  # `run` only reads the model: its result is a new one

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        ix = GraphIndex(model)
        report_subgraphs(ix, report, ("BatchNormalization",))
        folds, skipped = find_folds(ix)
        for label, why in skipped:
            report.skip(label, why)
        for f in folds:
            report.rewrite(ix.labels[f.bn], into=ix.labels[f.producer], channels=int(f.scale.size))
        if not folds:
            return copy_model(model)
        return apply_folds(model, ix, folds)
