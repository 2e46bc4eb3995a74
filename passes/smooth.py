"""smooth: move the per-feature outliers of a MatMul/Gemm input into its weights (SmoothQuant).

Before / after (a LayerNorm whose output feeds the Q, K and V projections)::

    x → LayerNormalization(γ, β) → h ─┬→ MatMul(Wq)      x → LayerNormalization(γ/s, β/s) → h' ─┬→ MatMul(diag(s)·Wq)
                                       ├→ MatMul(Wk)                                              ├→ MatMul(diag(s)·Wk)
                                       └→ MatMul(Wv)                                              └→ MatMul(diag(s)·Wv)

A layer ``Y = X·W`` is unchanged by ``X' = X·diag(1/s)``, ``W' = diag(s)·W``. With
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (`kernels.smooth`; ``max|X_j|`` over the calibration data,
``max|W_j|`` over every layer reading X) the activation's outlier features shrink and the
weights' rows grow, so that int8 quantization after this pass (one scale per activation
tensor, one per weight column) loses less on both sides. ``alpha`` sets the split (default
chosen by `benchmarks/bench_smooth.py`).

Exact in float (the output changes by float32 rounding only) because 1/s is folded into what
writes X, and every reader of X's values is a layer that takes s:

- LayerNormalization over the last axis with constant scale (and bias): γ' = γ/s, β' = β/s;
- a decomposed LayerNorm as exporters write it, ``Add(Mul(n, γ), β)`` (or ``Mul(n, γ)``) with
  constant γ, β along the last axis and the Mul read by the Add only: the same;
- ``Mul(a, Mul(b, c))`` with c constant and the inner Mul read by the outer one only (an exported
  GELU ends so): c' = c/s;
- a MatMul/Gemm with a constant weight (and a constant bias, as Gemm's C or a following Add):
  its output columns are divided by s;
- the readers: MatMul with X on the left and a constant 2-D weight, Gemm with transA = 0 and a
  constant B, each weight read by that node only; Shape and Size read no values.

A producer's vector constant that other nodes read too (exporters share one 0.5 between every
GELU) is copied for the producer; the replaced constants that nothing reads any more are removed.

``unfoldable=mul`` also rewrites what cannot be folded, at the cost of one elementwise Mul per
tensor (reported): when X's producer cannot absorb 1/s, ``Mul(X, 1/s)`` feeds the layers; when
other nodes read X too (a post-LN transformer's residual Add reads the LayerNorm output), the
producer writes X' and ``Mul(X', s)`` gives those readers X back under its old name.

``op_types`` limits the readers that take s (``MatMul``: a transformer's projections, not a
CNN's Gemm head). ``min_spread``: a tensor is only smoothed when its largest feature range is at
least that many times the median one (`kernels.smooth.spread`): without outliers there is
nothing to move. ``scope=transformer`` smooths only a model with attention (a MatMul of two
computed operands, and a Softmax: `passes._smooth.has_attention`), where the outlier features
SmoothQuant is for live; a CNN's classifier MatMul or Gemm head is left alone.

Per-feature extremes come from one streaming onnxruntime pass over at most ``max_samples``
calibration samples (`graph_opt.intermediates`: `PerFeature` max and min of each tensor reduced
inside the session); without data, seeded random inputs stand in (and the report says so).

Skipped, with the reason: a layer's weight not constant, not float32, not 2-D or shared; X not
float32 or of unknown width; the producer is not one of the above (unless ``unfoldable=mul``),
its constants not along the last axis; X read by other nodes or a graph output (unless
``unfoldable=mul``); the model has no attention (``scope=transformer``); X never observed, or
its extremes not finite; X's spread under ``min_spread``. The mechanism (matching, statistics, rewrite) is `passes._smooth`, which
`quantize`'s ``smooth`` option calls too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx

from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._smooth import Settings, smooth


@dataclass(frozen=True, kw_only=True)
class Smooth(Settings, Pass):
    """Migrate activation outliers of MatMul/Gemm inputs into the weights (SmoothQuant; exact in float).
    Its options are `passes._smooth.Settings` (quantize:smooth= fills them too)."""

    name: ClassVar[str] = "smooth"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.min_spread >= 1.0:
            raise ValueError(f"min_spread must be >= 1 (1: every tensor), got {self.min_spread}")
        if self.max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: onnxruntime's default, one per core)")
        if self.scope not in ("all", "transformer"):
            raise ValueError(f"scope must be all or transformer, got {self.scope!r}")
        if not self.op_types or set(self.op_types) - {"MatMul", "Gemm"}:
            raise ValueError(f"op_types must be among MatMul, Gemm, got {', '.join(self.op_types) or 'none'}")

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        return smooth(model, report, ctx, self)
