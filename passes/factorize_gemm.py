"""factorize_gemm: split a layer with a constant weight matrix into two thinner ones by truncated SVD.

Before:  x → Gemm/MatMul(W) → y                       (W is m×n, a constant)
After:   x → Gemm/MatMul(U_r Σ_r^½) → Gemm/MatMul(Σ_r^½ V_rᵀ) → y

Math: W = U Σ Vᵀ, keep rank r: W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ). The spectral-norm error of the weight
is exactly σ_{r+1} (Eckart–Young), reported as `weight_spectral_error` next to the Frobenius
`weight_rel_error`; exact (up to float rounding) when σ_{r+1} = 0, i.e. at the weight's rank.
It saves parameters and MACs only when r·(m + n) < m·n.

Data-aware (``data=whitened``; the default ``auto`` when calibration data was given, not for
seeded random inputs): the factors minimize the layer's **output** error on the calibration
inputs instead of the weight error. With ``C = E[x xᵀ]`` of the layer's input (streamed in
float64, every position a sample) and ``C + λI = RᵀR``, ``E‖x(W − Ŵ)‖² = ‖R(W − Ŵ)‖²_F``, so the
best rank-r ``Ŵ`` truncates the SVD of ``R W`` and maps back with ``R⁻¹``
(`kernels.lowrank.whitened_svd_factors`). Exact at full rank; the same as plain SVD on white
inputs; the rewrite reports ``output_rel_error``, the predicted relative output error on that
data, and ``energy=``/``rank=auto`` weigh the whitened spectrum (output energy), not the
weight's. ``data=plain`` truncates the weights. ``row_mask=`` (default ``auto``; an input name,
or ``none``): ``C`` counts only the positions a 0/1 mask input keeps, e.g. the real tokens of
padded sentences (`graph_opt.row_mask`: how ``auto`` finds one, and which tensors it applies to);
the note names the mask and each rewrite's ``row_mask`` says whether it applied to that layer.

Forms handled (each factor is the same op as the original, so batching and broadcasting rules are
unchanged; the last factor writes the original output tensor and carries the bias):

- Gemm ``Y = α·op(A)·op(B) + β·C`` with B constant: W = op(B) (K×N). First ``Gemm(A, L;
  transA, α)``, then ``Gemm(·, R, C; β)``; C (any broadcastable shape) is kept as it was.
- MatMul with the constant on the right, activation of any rank (``[batch, seq, hidden] ×
  [hidden, out]``): ``MatMul(MatMul(x, L), R)``.
- MatMul with the constant on the left (``W·X``, X ``[..., K, N]``): ``MatMul(L, MatMul(R, X))``.
- Conv 1×1 (any number of spatial dims, group 1): ``W[O, I, 1…]`` is an O×I matrix; first a 1×1
  conv (I→r) with the original strides/pads/auto_pad, then a 1×1 conv (r→O) with the bias.
  Zero padding commutes with a bias-free 1×1 conv, so this is exact too.

Rank selection (one rule): ``rank=`` (absolute), ``rank_ratio=`` (of
min(m, n)), ``energy=`` (share of Σσ² kept), ``params_ratio=``/``macs_ratio=`` (per-layer budget,
both may be given), ``rank=auto`` (Empirical VBMF). **Default: ``macs_ratio=0.5``** with ranks
aligned to 16 and the latency gate on, so that a plain ``factorize_gemm`` only rewrites layers
that get faster on onnxruntime CPU (docs/design.md, facts 2-3): large products with many rows run at about
their MAC ratio. ``align`` rounds a target rank (ratio/energy/auto) up to a multiple of 16 and a
budget rank down to one (up to 16 when below it), keeping the rewrite only if it still saves;
an explicit ``rank=`` is never changed.

Shapes for MACs and rows come from the model with every input bound to batch 1 (dynamic non-batch
dims from the calibration data when given). When they cannot be inferred, ``macs_ratio`` and the
latency gate cannot judge a layer: it is skipped with that reason; with ``latency_gate=false``
and a rank rule that needs no MACs, the layer is rewritten and only parameters are compared.

Skipped, with the reason in the report: weight not a constant (or only A of a Gemm constant);
both MatMul operands constant; a weight shared with another node; a weight that is not 2-D or
not float, empty or not finite (NaN/inf); k×k convs (``factorize_conv`` handles them); grouped 1×1 convs; layers not selected by
``include``/``exclude`` or below ``min_params``/``min_macs``; no saving at the chosen rank; a weight
error above ``max_weight_error``; and, with ``latency_gate`` (default on): one row per sample
(classifier heads, bandwidth-bound), a product under 64 on either side, a MAC ratio above 0.8;
before opset 11 (where Gemm's C is required) a Gemm with transA, alpha ≠ 1 or no C (there the
first factor is a MatMul, the same product on a 2-D A).
Nodes inside subgraphs (If/Loop/Scan bodies) are not visited; each such node is reported as a skip.

Each rewrite is reported with ``op, method, shape, rank, rule, macs_before, macs_after,
params_before, params_after`` (weights only, biases excluded; MACs per sample, None when unknown),
``weight_rel_error, weight_spectral_error, new_nodes`` (names in order, ``<name>/svd_0``,
``<name>/svd_1``) and ``output`` (the original output tensor, written by the last new node).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.kernels.lowrank import svd_factors, whitened_svd_factors
from graph_opt.kernels.rank import matmul_costs, rank_for_budget, svd_costs, vbmf_rank
from graph_opt.onnx_util import attr, opset_version
from graph_opt.pass_base import PassContext, PassReport
from graph_opt.passes._graph import GraphIndex, constant, used_once
from graph_opt.passes._lowrank import (
    GATE_MIN_MATMUL_DIM,
    LowRankPass,
    Plan,
    RankProblem,
    Step,
    energy_rank,
    float_dtype_reason,
    prod,
)
from graph_opt.row_mask import RowMask


CANDIDATES = ("Gemm", "MatMul", "Conv")


@dataclass(frozen=True, kw_only=True)
class FactorizeGemm(LowRankPass):
    """Split Gemm/MatMul/1×1-Conv weights into two thinner layers by truncated SVD (lossy)."""

    name: ClassVar[str] = "factorize_gemm"
    supported_ops: ClassVar[tuple[str, ...]] = CANDIDATES
    op_types: tuple[str, ...] = CANDIDATES

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        legacy_gemm = opset_version(model) < 11
        grams, mask = self.statistics(model, ctx, report, _stat_requests(model, self.op_types))
        return self.rewrite_layers(model, report, ctx, lambda node, shapes, label: self._match(node, shapes, label,
                                                                                               legacy_gemm, grams, mask))

    def _match(self, node: gs.Node, shapes: dict, label: str, legacy_gemm: bool = False,
               grams: dict | None = None, mask: RowMask | None = None) -> Plan | str:
        """The rewrite of one node, decided without touching the graph, or why there is none."""
        reason = self.name_filter(label)
        if reason:
            return reason
        if node.op == "Gemm":
            site = _gemm_site(node, shapes, legacy_gemm)
        else:
            site = {"MatMul": _matmul_site, "Conv": _pointwise_conv_site}[node.op](node, shapes)
        if isinstance(site, str):
            return site
        m, n = site.matrix.shape
        macs_known = site.rows is not None
        rows = site.rows or 1  # a stand-in when unknown: only parameters are compared then
        reference = matmul_costs(m, n, rows)
        reason = self.size_filter(reference, macs_known) or self.shape_requirement(macs_known)
        if reason:
            return reason
        if self.latency_gate:
            if site.rows == 1:
                return "latency gate: one row per sample (a classifier head is bandwidth-bound; factorizing does not pay)"
            if min(m, n) < GATE_MIN_MATMUL_DIM:
                return f"latency gate: {m}×{n} product, under {GATE_MIN_MATMUL_DIM} on one side (too small to gain)"
        matrix = site.matrix.astype(np.float64)
        gram = (grams or {}).get((site.act.name, site.feature_axis))
        if gram is not None and gram.shape[0] != (m if site.side == "rows" else n):
            gram = None
        if gram is None:
            spectrum = functools.cache(lambda: np.linalg.svd(matrix, compute_uv=False))
        else:  # the output energy per rank: what energy= and rank=auto should weigh
            spectrum = functools.cache(lambda: whitened_svd_factors(matrix, gram, 1, side=site.side).singular_values)

        def cost(ranks):
            return svd_costs(m, n, ranks[0], rows)

        full = min(m, n)
        problem = RankProblem(
            full=(full,), ratio_base=(full,), cost=cost, reference=reference, macs_known=macs_known,
            budget=lambda p, mr: (rank_for_budget(lambda r: cost((r,)), reference, full, params_ratio=p, macs_ratio=mr),),
            energy=lambda e: (energy_rank(spectrum(), e),),
            auto=lambda: (vbmf_rank(spectrum(), shape=(m, n)),),
        )
        choice = self.decide(problem)
        if isinstance(choice, str):
            return choice
        r = choice.ranks[0]
        factors = svd_factors(matrix, r) if gram is None else whitened_svd_factors(matrix, gram, r, side=site.side)
        if self.max_weight_error is not None and factors.rel_error > self.max_weight_error:
            return f"weight error {factors.rel_error:.3g} at rank {r} > max_weight_error={self.max_weight_error}"
        dtype = site.dtype
        steps = site.steps(factors.left.astype(dtype), factors.right.astype(dtype))
        details = {
            "op": node.op, "method": "svd" if gram is None else "whitened svd", "form": site.form, "shape": list(site.weight_shape), "rank": r,
            "rule": choice.rule,
            "macs_before": reference.macs if macs_known else None,
            "macs_after": choice.cost.macs if macs_known else None,
            "params_before": reference.params, "params_after": choice.cost.params,
            "weight_rel_error": factors.rel_error, "weight_spectral_error": factors.spectral_error,
        }
        if factors.output_rel_error is not None:
            details["output_rel_error"] = factors.output_rel_error
        if gram is not None and mask is not None:
            details["row_mask"] = mask.name if mask.fits(shapes.get(site.act.name), site.feature_axis) else None
        return Plan(node, site.act, steps, site.tail, "svd", details)


@dataclass
class _Site:
    """A layer seen as one matrix product with `matrix` (m×n ≈ L(m×r)·R(r×n))."""

    form: str
    matrix: np.ndarray
    dtype: np.dtype
    weight_shape: tuple[int, ...]
    act: gs.Tensor
    rows: int | None  # rows of the product per sample; None when the shape is unknown
    steps: Callable[[np.ndarray, np.ndarray], list[Step]]  # (L, R) → the replacement chain
    tail: list[gs.Tensor]
    feature_axis: int = -1  # the axis of `act` the weight contracts (its input features)
    side: str = "rows"      # "rows": y = x·matrix; "cols": y = matrix·x


def _weight_reason(tensor: gs.Tensor, w: np.ndarray | None, what: str = "weight", matrix: bool = True) -> str | None:
    if w is None:
        return f"{what} {tensor.name!r} is not a constant"
    if not used_once(tensor):
        return f"{what} {tensor.name!r} is shared with another node"
    if matrix and w.ndim != 2:
        return f"{what} has {w.ndim} dims (only 2-D weights are factorized)"
    return float_dtype_reason(w)


def _gemm_site(node: gs.Node, shapes: dict, legacy: bool = False) -> _Site | str:
    """`legacy`: opset < 11, where Gemm's C is required, so a C-less first factor is a MatMul."""
    a, b = node.inputs[0], node.inputs[1]
    wb = constant(b)
    if wb is None and constant(a) is not None:
        return "only A is constant (a Gemm with a constant A and a variable B is not factorized)"
    reason = _weight_reason(b, wb, "B")
    if reason:
        return reason
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    matrix = wb.T if trans_b else wb  # K×N: Y = α·op(A)·matrix + β·C
    act = shapes.get(a.name)
    rows = None if act is None or len(act) != 2 else act[1] if trans_a else act[0]
    tail = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
    if legacy and (trans_a or alpha != 1.0 or not tail):
        return "Gemm before opset 11 requires C and the first factor has none (only transA=0, alpha=1 Gemms with C are factorized there, the first factor as MatMul)"

    def steps(left, right):
        if legacy:  # Gemm(A, L) without C is invalid before opset 11; A is 2-D, so MatMul is the same product
            return [Step("MatMul", left), Step("Gemm", right, {"beta": beta} if beta != 1.0 else {})]
        first = {"transA": trans_a} if trans_a else {}
        if alpha != 1.0:
            first["alpha"] = alpha
        second = {"beta": beta} if tail and beta != 1.0 else {}
        return [Step("Gemm", left, first), Step("Gemm", right, second)]

    return _Site("Gemm", matrix, wb.dtype, wb.shape, a, rows, steps, tail, feature_axis=0 if trans_a else 1)


def _stat_requests(model: onnx.ModelProto, op_types: tuple[str, ...]) -> set[tuple[str, int]]:
    """(activation, feature axis) of every main-graph candidate with a constant weight, in the
    convention of the `_Site` builders (a superset: the match may still skip the layer)."""
    ix = GraphIndex(model)
    out = set()
    for n in ix.nodes:
        if n.op_type not in op_types or len(n.input) < 2:
            continue
        a, b = n.input[0], n.input[1]
        if n.op_type == "Gemm" and ix.is_const(b) and not ix.is_const(a):
            out.add((a, 0 if attr(n, "transA", 0) else 1))
        elif n.op_type == "MatMul" and ix.is_const(a) != ix.is_const(b):
            out.add((a, -1) if ix.is_const(b) else (b, -2))
        elif n.op_type == "Conv" and b in ix.inits and all(d == 1 for d in ix.inits[b].dims[2:]):
            out.add((a, 1))
    return out


def _matmul_site(node: gs.Node, shapes: dict) -> _Site | str:
    a, b = node.inputs[0], node.inputs[1]
    wa, wb = constant(a), constant(b)
    if wa is not None and wb is not None:
        return "both operands are constants (nothing to factorize at run time)"
    if wa is None and wb is None:
        return "weight is not a constant (neither operand is)"
    if wb is not None:  # x[..., K] @ W[K, N] = (x @ L) @ R
        reason = _weight_reason(b, wb)
        if reason:
            return reason
        act = shapes.get(a.name)
        rows = prod(act[:-1]) if act else None

        def steps(left, right):
            return [Step("MatMul", left), Step("MatMul", right)]

        return _Site("MatMul", wb, wb.dtype, wb.shape, a, rows, steps, [])
    # W[M, K] @ X[..., K, N] = L @ (R @ X)
    reason = _weight_reason(a, wa)
    if reason:
        return reason
    act = shapes.get(b.name)
    rows = prod(act) // wa.shape[1] if act else None

    def steps_left(left, right):
        return [Step("MatMul", right, weight_first=True), Step("MatMul", left, weight_first=True)]

    return _Site("MatMul (weight on the left)", wa, wa.dtype, wa.shape, b, rows, steps_left, [], feature_axis=-2,
                 side="cols")


def _pointwise_conv_site(node: gs.Node, shapes: dict) -> _Site | str:
    if len(node.inputs) < 2:
        return "Conv without a weight input"
    w_t = node.inputs[1]
    w = constant(w_t)
    reason = _weight_reason(w_t, w, "weight", matrix=False)
    if reason:
        return reason
    if w.ndim < 3:
        return f"conv weight has {w.ndim} dims"
    kernel = w.shape[2:]
    if any(k != 1 for k in kernel):
        return f"{'×'.join(map(str, kernel))} conv: factorize_conv handles it (only 1×1 convs here)"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        return f"grouped 1×1 conv (group={group}) is not factorized"
    o, i = w.shape[:2]
    nd = len(kernel)
    ones = [1] * nd
    out = shapes.get(node.outputs[0].name)
    rows = prod(out[2:]) if out else None  # output pixels: y = W·x at each of them
    tail = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
    first_attrs = {k: v for k, v in node.attrs.items() if k != "group"}
    first_attrs["kernel_shape"] = ones

    def steps(left, right):  # W (O×I) ≈ left (O×r) · right (r×I): right runs first
        r = right.shape[0]
        return [Step("Conv", right.reshape(r, i, *ones), dict(first_attrs)),
                Step("Conv", left.reshape(o, r, *ones), {"kernel_shape": ones})]

    return _Site("1×1 Conv", w.reshape(o, i), w.dtype, w.shape, node.inputs[0], rows, steps, tail, feature_axis=1,
                 side="cols")
