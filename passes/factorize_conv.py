"""factorize_conv: replace a k×k Conv by a chain of cheaper convs (Tucker-2, CP or spatial SVD).

Before:  x → Conv(K: O×I×kh×kw, b; stride, pads, dilations) → y

After, by ``method``:

- ``tucker2`` (default): ``K ≈ G ×₁ A⁽¹⁾ ×₂ A⁽²⁾`` on the two channel modes.
  1×1 (I→R₂) → kh×kw core (R₂→R₁, the original strides/pads/dilations/auto_pad) → 1×1 (R₁→O, b).
  Zero padding commutes with a bias-free 1×1 conv, so the chain is the same conv whenever the
  factors reconstruct K: exact at full ranks (O, I) and at a kernel's multilinear rank. HOSVD
  initialisation then HOOI (a local optimum). Conv1d and Conv3d too (only the channel modes are
  decomposed; the core keeps the kernel's spatial shape).
- ``cp``: ``K ≈ Σ_r λ_r a_r ∘ b_r ∘ c_r ∘ d_r`` by ALS.
  1×1 (I→R) → depthwise kh×1 (vertical stride/pads/dilation) → depthwise 1×kw (horizontal ones)
  → 1×1 (R→O, λ and b). **Never guaranteed exact, at any rank** (ALS is local, a best rank-R fit
  may not exist): each layer is gated on its achieved relative weight error,
  ``max_weight_error`` (0.5 for CP when not given). 2-D convs only.
- ``spatial_svd``: ``K[o,i,y,x]`` as ``M[(i,y),(o,x)]`` ((I·kh)×(O·kw)), truncated SVD.
  kh×1 conv (I→R, vertical stride/pads/dilation) → 1×kw conv (R→O, horizontal ones, b).
  Exact at R = rank(M); the spectral error of M is σ_{R+1} (``weight_spectral_error``).
  2-D convs only.

Data-aware Tucker-2 (``data=whitened``; the default ``auto`` when calibration data was given, not
for seeded random inputs): with ``C = E[x xᵀ]`` of the input channels (every pixel a sample,
streamed once in float64) and ``C + λI = RᵀR``, treating pixels as uncorrelated the output error
is ``‖(K − K̂) ×₂ R‖``: Tucker-2 of ``K ×₂ R``, the first 1×1 mapped back by ``R⁻¹``
(`kernels.lowrank.whitened_tucker2`; per group with the group's block of C). Neighbouring pixels
are not uncorrelated in images or sequences, so where the im2col patches' second moment ``Σ``
(``(I/G·kh·kw)²`` per group, `intermediates.patch_moments`, every output pixel a sample) is
available, the core and the last factor are then fitted to the conv's output exactly: for the
first factor's patches ``z = B p`` the best map is ``M = E[y zᵀ] E[z zᵀ]⁻¹`` and the best rank-R₁
output factor the top principal directions of ``M z`` (reduced-rank regression;
`kernels.lowrank.patch_tucker2`), never worse on that data than the channel-only factors
(``fit``: ``patches``, else ``channels``: a row mask in force, an unnamed node, patches wider than
4608). Exact at full ranks; the rewrite reports ``whitened tucker2``. CP and spatial SVD truncate
the kernel.

Grouped convs (≥ 2 input channels per group) are factorized per group, one rank for all groups,
every factor conv grouped: exact when each group's factors are. ``auto_pad`` is copied to the
factor convs that carry the kernel's spatial axes (its padding is decided per axis; the others
have kernel 1 and stride 1, hence no padding).

Rank selection (one rule): ``rank=`` (absolute; Tucker-2 uses it for both ranks, capped at O/G
and I/G), ``rank_ratio=`` (of each full rank: (O/G, I/G) for Tucker-2, min(I·kh, O·kw) per group
for spatial SVD, the break-even rank for CP), ``energy=`` (Σσ² share of each unfolding for Tucker-2,
of M for spatial SVD; the largest over groups), ``params_ratio=``/``macs_ratio=`` (per-layer
budget; Tucker-2 ranks stay proportional to (O, I)), ``rank=auto`` (Empirical VBMF on the
unfoldings, Kim et al. 2016; on M for spatial SVD). CP takes neither ``energy`` nor ``auto``.
**Default: ``macs_ratio=0.5``**, ranks aligned to 16, latency gate on: ranks off a multiple of 16
break onnxruntime's blocked layout (docs/design.md, facts 2-3). ``align`` rounds a target rank up
to a multiple of 16, a budget rank down (up to 16 below it), kept only when it still saves; an
explicit ``rank=`` is never changed.

Shapes for MACs come from the model with every input bound to batch 1 (dynamic non-batch dims from
the calibration data when given). A layer whose shapes cannot be inferred is skipped when
``macs_ratio`` or the latency gate needs them; with ``latency_gate=false`` and a rank rule that
needs no MACs it is rewritten and only parameters are compared (MACs reported as None).

Skipped, with the reason in the report: weight not a constant, shared with another node, not
float, empty or not finite (NaN/inf); depthwise and 1×1 convs; CP/spatial SVD on a conv that is not 2-D; layers not selected by
``include``/``exclude`` or below ``min_params``/``min_macs``; no rank within the budget; no saving
at the chosen ranks; a weight error above ``max_weight_error``; a decomposition that failed (non-
finite factors); and, with ``latency_gate`` (default on): stems (≤ 3 input channels), fewer than 32
channels per group on either side, a MAC ratio above 0.8. Nodes inside subgraphs are not visited (each If/Loop/Scan holding a Conv is reported as a skip).

Each rewrite is reported with ``op, method, shape, group, rank`` (``[R₁, R₂]`` = [r_out, r_in]
for Tucker-2), ``rule, macs_before, macs_after, params_before, params_after`` (weights only,
biases excluded; MACs per sample), ``weight_rel_error`` (Frobenius, relative),
``weight_spectral_error`` (spatial SVD), ``new_nodes`` (``<name>/<method>_0``, …, in order) and
``output`` (the original output tensor, written by the last new node).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graph_opt.kernels.lowrank import (
    FactorizationError,
    cp_conv,
    patch_tucker2,
    relative_error,
    spatial_svd,
    tucker2,
    whitened_tucker2,
)
from graph_opt.kernels.rank import (
    Cost,
    conv_costs,
    cp_costs,
    max_saving_rank,
    rank_for_budget,
    spatial_svd_costs,
    tucker2_costs,
    tucker2_ranks_for_budget,
    tucker2_vbmf_ranks,
    vbmf_rank,
)
from graph_opt.passes._graph import constant, used_once
from graph_opt.passes._lowrank import (
    GATE_MIN_CONV_CHANNELS,
    GATE_STEM_CHANNELS,
    LowRankPass,
    Plan,
    RankProblem,
    Ranks,
    Step,
    energy_rank,
    float_dtype_reason,
    group_max,
    prod,
)

from graph_opt.intermediates import PatchRequest, patch_moments
from graph_opt.pass_base import PassContext, PassReport

# CP-ALS can stall far from a good fit; without an explicit limit, a CP layer whose weight error
# exceeds this is skipped.
CP_DEFAULT_MAX_WEIGHT_ERROR = 0.5
# No natural upper rank for CP (it may exceed every dimension); "no saving" bounds it instead.
_CP_RANK_CAP = 1 << 30


@dataclass(frozen=True, kw_only=True)
class FactorizeConv(LowRankPass):
    """Replace k×k Convs by Tucker-2, CP or spatial-SVD conv chains (lossy; exact at full rank except CP)."""

    name: ClassVar[str] = "factorize_conv"
    supported_ops: ClassVar[tuple[str, ...]] = ("Conv",)
    method: Literal["tucker2", "cp", "spatial_svd"] = "tucker2"
    op_types: tuple[str, ...] = ("Conv",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "cp" and self.energy is not None:
            raise ValueError("energy= is not defined for method=cp (CP has no spectrum); "
                             "use rank=, rank_ratio=, params_ratio= or macs_ratio=")
        if self.method == "cp" and self.rank == "auto":
            raise ValueError("rank=auto is not defined for method=cp; use method=tucker2 or spatial_svd, "
                             "or rank=, rank_ratio=, params_ratio=, macs_ratio=")

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        grams, patches = {}, {}
        if self.method == "tucker2":  # CP and spatial SVD truncate the kernel itself
            grams, mask = self.statistics(model, ctx, report, _stat_requests(model))
            if grams and mask is None:  # a row mask selects tokens, not pixels: channel statistics only
                patches = patch_moments(model, ctx.data, _patch_requests(model, self.latency_gate))
                if patches:
                    report.note(f"data-aware: the core and last factor of {len(patches)} convs fit their output "
                                "on the input patches' second moment")
        return self.rewrite_layers(model, report, ctx, lambda node, shapes, label: self._match(
            node, shapes, label, ctx.seed, grams, patches))

    @property
    def weight_error_limit(self) -> float | None:
        if self.max_weight_error is not None:
            return self.max_weight_error
        return CP_DEFAULT_MAX_WEIGHT_ERROR if self.method == "cp" else None

    def _match(self, node: gs.Node, shapes: dict, label: str, seed: int, grams: dict | None = None,
               patches: dict | None = None) -> Plan | str:
        """The rewrite of one conv, decided without touching the graph, or why there is none."""
        reason = self.name_filter(label)
        if reason:
            return reason
        layer = _conv_layer(node, shapes, self.method)
        if isinstance(layer, str):
            return layer
        gram = (grams or {}).get((node.inputs[0].name, 1))
        if gram is not None and gram.shape[0] == layer.i:
            layer = dataclasses.replace(layer, gram=gram)
            patch = (patches or {}).get(node.name)
            d = layer.ig * prod(layer.kernel)
            if patch is not None and patch.shape == (layer.groups, d, d):
                layer = dataclasses.replace(layer, patch_gram=patch)
        reason = self.size_filter(layer.reference, layer.macs_known) or self.shape_requirement(layer.macs_known)
        if reason:
            return reason
        if self.latency_gate:
            if layer.i <= GATE_STEM_CHANNELS:
                return f"latency gate: stem conv with {layer.i} input channels (no time to gain, large fidelity loss)"
            if min(layer.ig, layer.og) < GATE_MIN_CONV_CHANNELS:
                per = " per group" if layer.groups > 1 else ""
                return (f"latency gate: {layer.ig}→{layer.og} channels{per}, under {GATE_MIN_CONV_CHANNELS} "
                        "on one side (onnxruntime's blocked layout leaves little to gain)")
        problem = {"tucker2": _tucker2_problem, "cp": _cp_problem, "spatial_svd": _spatial_problem}[self.method](layer)
        if isinstance(problem, str):
            return problem
        choice = self.decide(problem)
        if isinstance(choice, str):
            return choice
        try:
            made = _FACTORIZE[self.method](layer, choice.ranks, seed, node.attrs)
        except FactorizationError as exc:
            return f"{self.method} decomposition failed: {exc}"
        steps, rel_error, extra = made
        limit = self.weight_error_limit
        if limit is not None and rel_error > limit:
            return (f"weight error {rel_error:.3g} at rank {'x'.join(map(str, choice.ranks))} > "
                    f"max_weight_error={limit}")
        ranks = choice.ranks
        details = {
            "op": node.op, "method": self.method if layer.gram is None else f"whitened {self.method}",
            **({"fit": "patches" if layer.patch_gram is not None else "channels"} if layer.gram is not None else {}),
            "shape": list(layer.w.shape), "group": layer.groups,
            "rank": list(ranks) if len(ranks) > 1 else ranks[0], "rule": choice.rule,
            "macs_before": layer.reference.macs if layer.macs_known else None,
            "macs_after": choice.cost.macs if layer.macs_known else None,
            "params_before": layer.reference.params, "params_after": choice.cost.params,
            "weight_rel_error": rel_error, **extra,
        }
        return Plan(node, node.inputs[0], steps, layer.tail, self.method, details)


@dataclass
class _ConvLayer:
    """A matched conv: weight, channel counts, groups, spatial sizes (stand-ins when unknown)."""

    w: np.ndarray
    groups: int
    o: int
    i: int
    og: int
    ig: int
    kernel: tuple[int, ...]
    out_hw: tuple[int, int]  # 2-D convs: (h, w); other ranks: (pixels, 1)
    in_hw: tuple[int, int]
    macs_known: bool
    reference: Cost
    tail: list[gs.Tensor]
    gram: np.ndarray | None = None  # E[x xᵀ] of the input channels (data-aware Tucker-2)
    patch_gram: np.ndarray | None = None  # E[p pᵀ] of the im2col patches, [groups, d, d]

    @functools.cached_property
    def group_kernels(self) -> list[np.ndarray]:
        w = self.w.astype(np.float64)
        return [w[g * self.og:(g + 1) * self.og] for g in range(self.groups)]

    def scaled(self, c: Cost) -> Cost:
        return Cost(c.params * self.groups, c.macs * self.groups)


def _conv_layer(node: gs.Node, shapes: dict, method: str) -> _ConvLayer | str:
    if len(node.inputs) < 2:
        return "Conv without a weight input"
    w_t = node.inputs[1]
    w = constant(w_t)
    if w is None:
        return f"weight {w_t.name!r} is not a constant"
    if not used_once(w_t):
        return f"weight {w_t.name!r} is shared with another node"
    reason = float_dtype_reason(w)
    if reason:
        return reason
    if w.ndim < 3:
        return f"conv weight has {w.ndim} dims"
    kernel = tuple(int(k) for k in w.shape[2:])
    if all(k == 1 for k in kernel):
        return "1×1 conv: factorize_gemm factorizes it (SVD into two 1×1 convs)"
    groups = int(node.attrs.get("group", 1))
    o, ig = int(w.shape[0]), int(w.shape[1])
    if ig == 1:
        return "depthwise conv (one input channel per group): nothing to factorize"
    if groups < 1 or o % groups:
        return f"group={groups} does not divide {o} output channels"
    if method != "tucker2" and len(kernel) != 2:
        return f"method={method} needs a 2-D conv (this one has {len(kernel)} spatial dims); method=tucker2 handles it"
    x_shape, y_shape = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    macs_known = x_shape is not None and y_shape is not None and len(x_shape) == len(y_shape) == w.ndim
    if not macs_known:
        out_hw = in_hw = (1, 1)  # stand-ins: MACs then equal params and are not compared
    elif len(kernel) == 2:
        out_hw, in_hw = tuple(y_shape[2:]), tuple(x_shape[2:])
    else:
        out_hw, in_hw = (prod(y_shape[2:]), 1), (prod(x_shape[2:]), 1)
    kprod = prod(kernel)
    reference = conv_costs(o, ig * groups, kprod, 1, (out_hw[0] * out_hw[1], 1), groups=groups)
    tail = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
    return _ConvLayer(w, groups, o, ig * groups, o // groups, ig, kernel, out_hw, in_hw, macs_known, reference, tail)


# ---------------------------------------------------------------------------------------------
# Rank problems, one per method


def _tucker2_problem(layer: _ConvLayer) -> RankProblem:
    og, ig, kprod = layer.og, layer.ig, prod(layer.kernel)
    out_px, in_px = (layer.out_hw[0] * layer.out_hw[1], 1), (layer.in_hw[0] * layer.in_hw[1], 1)

    def cost(ranks: Ranks) -> Cost:
        return layer.scaled(tucker2_costs(og, ig, kprod, 1, ranks[0], ranks[1], out_px, in_px))

    def budget(p, m):
        return tucker2_ranks_for_budget(og, ig, kprod, 1, out_px, in_hw=in_px, params_ratio=p, macs_ratio=m)

    def energy(e):
        return group_max([(energy_rank(_sv(k.reshape(og, -1)), e),
                           energy_rank(_sv(k.swapaxes(0, 1).reshape(ig, -1)), e)) for k in layer.group_kernels])

    def auto():
        return group_max([tucker2_vbmf_ranks(_as4d(k)) for k in layer.group_kernels])

    full = (og, ig)
    return RankProblem(full, full, cost, layer.reference, layer.macs_known, budget, energy, auto)


def _spatial_problem(layer: _ConvLayer) -> RankProblem:
    og, ig, (kh, kw) = layer.og, layer.ig, layer.kernel
    full = min(ig * kh, og * kw)

    def cost(ranks: Ranks) -> Cost:
        return layer.scaled(spatial_svd_costs(og, ig, kh, kw, ranks[0], layer.out_hw, layer.in_hw))

    spectra = functools.cache(lambda: [_sv(_arranged(k)) for k in layer.group_kernels])
    return RankProblem(
        (full,), (full,), cost, layer.reference, layer.macs_known,
        budget=lambda p, m: (rank_for_budget(lambda r: cost((r,)), layer.reference, full, params_ratio=p, macs_ratio=m),),
        energy=lambda e: (max(energy_rank(s, e) for s in spectra()),),
        auto=lambda: (max(vbmf_rank(s, shape=(ig * kh, og * kw)) for s in spectra()),),
    )


def _cp_problem(layer: _ConvLayer) -> RankProblem | str:
    og, ig, (kh, kw) = layer.og, layer.ig, layer.kernel

    def cost(ranks: Ranks) -> Cost:
        return layer.scaled(cp_costs(og, ig, kh, kw, ranks[0], layer.out_hw, layer.in_hw))

    upper = og * ig * kh * kw // (og + ig + kh + kw) + 1  # parameters alone break even below this
    break_even = max_saving_rank(lambda r: cost((r,)), layer.reference, upper)
    if break_even < 1:
        return "no CP rank saves parameters and MACs on this layer"
    return RankProblem(
        (_CP_RANK_CAP,), (break_even,), cost, layer.reference, layer.macs_known,
        budget=lambda p, m: (rank_for_budget(lambda r: cost((r,)), layer.reference, break_even, params_ratio=p, macs_ratio=m),),
    )


def _sv(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix, compute_uv=False)


def _as4d(k: np.ndarray) -> np.ndarray:
    """Any conv kernel as O×I×a×b (Tucker-2 only touches the channel modes)."""
    return k.reshape(k.shape[0], k.shape[1], -1, k.shape[-1])


def _arranged(k: np.ndarray) -> np.ndarray:
    """``M[(i,y),(o,x)]`` of a 2-D kernel (spatial SVD's matrix)."""
    o, i, kh, kw = k.shape
    return k.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


# ---------------------------------------------------------------------------------------------
# Factorizations → replacement chains


def _group_attr(attrs: dict[str, Any], groups: int) -> dict[str, Any]:
    if groups != 1:
        attrs["group"] = groups
    return attrs


def _axis_attrs(attrs: dict[str, Any], axis: int, kernel: int) -> dict[str, Any]:
    """Attributes of a conv that keeps only spatial axis `axis` (0: vertical, 1: horizontal) of
    the original's stride/dilation/padding; the other axis has kernel 1, stride 1, no padding."""
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    shape = [kernel, 1] if axis == 0 else [1, kernel]
    out: dict[str, Any] = {
        "kernel_shape": shape,
        "strides": [strides[0], 1] if axis == 0 else [1, strides[1]],
        "dilations": [dilations[0], 1] if axis == 0 else [1, dilations[1]],
    }
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad != "NOTSET":
        out["auto_pad"] = auto_pad  # decided per axis from that axis alone: same pads as before
    elif "pads" in attrs:
        top, left, bottom, right = attrs["pads"]
        out["pads"] = [top, 0, bottom, 0] if axis == 0 else [0, left, 0, right]
    return out


def _tucker2_steps(layer: _ConvLayer, ranks: Ranks, seed: int, attrs: dict):
    r_out, r_in = ranks
    ones = [1] * len(layer.kernel)
    firsts, cores, lasts, recon = [], [], [], []
    for g, k in enumerate(layer.group_kernels):
        if layer.gram is None:
            f = tucker2(_as4d(k), r_out, r_in, seed=seed)
        elif layer.patch_gram is not None:
            f = patch_tucker2(_as4d(k), layer.patch_gram[g], r_out, r_in, seed=seed)
        else:  # group g reads input channels g·ig … (g+1)·ig
            block = layer.gram[g * layer.ig:(g + 1) * layer.ig, g * layer.ig:(g + 1) * layer.ig]
            f = whitened_tucker2(_as4d(k), block, r_out, r_in, seed=seed)
        firsts.append(f.first)
        cores.append(f.core.reshape(r_out, r_in, *layer.kernel))
        lasts.append(f.last)
        recon.append(f.reconstruct().reshape(k.shape))
    dt = layer.w.dtype
    core_attrs = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    core_attrs["kernel_shape"] = list(layer.kernel)
    steps = [
        Step("Conv", np.concatenate(firsts).reshape(-1, layer.ig, *ones).astype(dt),
             _group_attr({"kernel_shape": ones}, layer.groups)),
        Step("Conv", np.concatenate(cores).astype(dt), _group_attr(core_attrs, layer.groups)),
        Step("Conv", np.concatenate(lasts).reshape(layer.o, r_out, *ones).astype(dt),
             _group_attr({"kernel_shape": ones}, layer.groups)),
    ]
    return steps, relative_error(layer.w, np.concatenate(recon)), {}


def _spatial_steps(layer: _ConvLayer, ranks: Ranks, seed: int, attrs: dict):
    (r,), (kh, kw) = ranks, layer.kernel
    parts = [spatial_svd(k, r) for k in layer.group_kernels]
    dt = layer.w.dtype
    steps = [
        Step("Conv", np.concatenate([f.vertical for f in parts]).astype(dt),
             _group_attr(_axis_attrs(attrs, 0, kh), layer.groups)),
        Step("Conv", np.concatenate([f.horizontal for f in parts]).astype(dt),
             _group_attr(_axis_attrs(attrs, 1, kw), layer.groups)),
    ]
    recon = np.concatenate([f.reconstruct() for f in parts])
    return steps, relative_error(layer.w, recon), {"weight_spectral_error": max(f.spectral_error for f in parts)}


def _cp_steps(layer: _ConvLayer, ranks: Ranks, seed: int, attrs: dict):
    (r,), (kh, kw) = ranks, layer.kernel
    parts = [cp_conv(k, r, seed=seed) for k in layer.group_kernels]
    dt = layer.w.dtype
    g = layer.groups
    steps = [
        Step("Conv", np.concatenate([f.pointwise_in_weight for f in parts]).astype(dt),
             _group_attr({"kernel_shape": [1, 1]}, g)),
        Step("Conv", np.concatenate([f.vertical_weight for f in parts]).astype(dt),
             _group_attr(_axis_attrs(attrs, 0, kh), g * r)),
        Step("Conv", np.concatenate([f.horizontal_weight for f in parts]).astype(dt),
             _group_attr(_axis_attrs(attrs, 1, kw), g * r)),
        Step("Conv", np.concatenate([f.pointwise_out_weight for f in parts]).astype(dt),
             _group_attr({"kernel_shape": [1, 1]}, g)),
    ]
    recon = np.concatenate([f.reconstruct() for f in parts])
    return steps, relative_error(layer.w, recon), {"cp_iterations": max(f.iterations for f in parts)}


def _stat_requests(model: onnx.ModelProto) -> set[tuple[str, int]]:
    """(input, channel axis) of every main-graph Conv with a constant k×k weight."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {(n.input[0], 1) for n in model.graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and len(dims.get(n.input[1], ())) >= 3
            and any(d != 1 for d in dims[n.input[1]][2:])}


def _patch_requests(model: onnx.ModelProto, latency_gate: bool) -> dict[str, PatchRequest]:
    """node name → the patches of every main-graph k×k Conv with a constant weight (stems left out
    under the latency gate: never factorized there)."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        w = dims.get(n.input[1], ()) if n.op_type == "Conv" and len(n.input) > 1 else ()
        if len(w) < 3 or all(d == 1 for d in w[2:]) or w[1] == 1 or not n.name:
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        groups = int(a.get("group", 1))
        if latency_gate and w[1] * groups <= GATE_STEM_CHANNELS:
            continue
        auto_pad = a.get("auto_pad", b"NOTSET")
        out[n.name] = PatchRequest(n.input[0], tuple(int(d) for d in w[2:]),
                                   tuple(a["strides"]) if a.get("strides") else None,
                                   tuple(a["pads"]) if a.get("pads") else None,
                                   tuple(a["dilations"]) if a.get("dilations") else None, groups,
                                   auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)
    return out


_FACTORIZE = {"tucker2": _tucker2_steps, "cp": _cp_steps, "spatial_svd": _spatial_steps}
