"""Rank selection and cost accounting for low-rank factorizations (pure numpy).

Rank choices
- ``rank_for_ratio(full_rank, ratio)``: ``ceil(ratio · full_rank)`` clipped to ``[1, full_rank]``.
- ``rank_for_energy(σ, energy)``: smallest r with ``Σ_{i≤r} σ_i² / Σ σ_i² ≥ energy``.
- ``rank_for_budget(cost, reference, max_rank, params_ratio=, macs_ratio=)``: largest r whose
  factorized cost stays within the given share of the original's parameters and/or MACs;
  ``max_saving_rank`` is the same with "strictly cheaper than the original" as the budget.
  ``tucker2_ranks_for_budget`` does it for Tucker-2's two ranks, kept proportional to O and I.
- ``vbmf(...)`` / ``vbmf_rank(...)``: automatic rank by Empirical Variational Bayesian Matrix
  Factorization, using the analytic global solution of Nakajima, Sugiyama, Babacan & Tomioka,
  "Global analytic solution of fully-observed variational Bayesian matrix factorization", JMLR
  14 (2013), with the noise variance estimated by minimising the free energy (the form restated in
  Nakajima, Tomioka, Sugiyama & Babacan, JMLR 16 (2015)). ``tucker2_vbmf_ranks`` applies it to the
  two channel unfoldings of a conv kernel (the rank rule of Kim et al., ICLR 2016).
- ``round_rank(r, max_rank=, multiple=16)``: onnxruntime's CPU convs use a blocked channel layout
  (16 on AVX-512); ranks off a multiple of 16 lose most of the gain (docs/design.md, fact 2). Round up, but
  only while the result is still within ``max_rank`` (the caller's budget or break-even rank).

Costs
Every ``*_costs`` function returns ``Cost(params, macs)``: weight parameters (biases excluded:
the factorized form carries the same bias on its last layer) and multiply-accumulates for one
sample. Spatial sizes are ``(h, w)``; ``in_hw`` defaults to ``out_hw`` (stride 1, "same" pads).
A 1×1 conv placed before a strided k×k conv runs at the *input* resolution; for CP and spatial
SVD the kh×1 conv carries the vertical stride/pads, so it outputs ``out_h × in_w``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "Cost",
    "VbmfEstimate",
    "conv_costs",
    "cp_costs",
    "matmul_costs",
    "max_saving_rank",
    "rank_for_budget",
    "rank_for_energy",
    "rank_for_ratio",
    "round_rank",
    "spatial_svd_costs",
    "svd_costs",
    "tucker2_costs",
    "tucker2_ranks_for_budget",
    "tucker2_vbmf_ranks",
    "vbmf",
    "vbmf_rank",
]

HW = tuple[int, int]


class Cost(NamedTuple):
    """Weight parameters and MACs (per sample) of a layer or of its factorized replacement."""

    params: int
    macs: int


# ---------------------------------------------------------------------------------------------
# Cost functions


def matmul_costs(m: int, n: int, rows: int = 1) -> Cost:
    """Original ``x(rows×m) @ W(m×n)``."""
    return Cost(m * n, rows * m * n)


def svd_costs(m: int, n: int, r: int, rows: int = 1) -> Cost:
    """``x @ left(m×r) @ right(r×n)``. Saves only when ``r < m·n/(m+n)``."""
    return Cost(r * (m + n), rows * r * (m + n))


def conv_costs(o: int, i: int, kh: int, kw: int, out_hw: HW, groups: int = 1) -> Cost:
    """Original conv ``O×(I/groups)×kh×kw`` producing ``out_hw``."""
    params = o * (i // groups) * kh * kw
    return Cost(params, out_hw[0] * out_hw[1] * params)


def tucker2_costs(
    o: int, i: int, kh: int, kw: int, r_out: int, r_in: int, out_hw: HW, in_hw: HW | None = None
) -> Cost:
    """1×1 (I→r_in, at ``in_hw``) → kh×kw core (r_in→r_out) → 1×1 (r_out→O), both at ``out_hw``."""
    in_hw = out_hw if in_hw is None else in_hw
    p_first, p_core, p_last = i * r_in, r_out * r_in * kh * kw, r_out * o
    out_px, in_px = out_hw[0] * out_hw[1], in_hw[0] * in_hw[1]
    return Cost(p_first + p_core + p_last, in_px * p_first + out_px * (p_core + p_last))


def cp_costs(
    o: int, i: int, kh: int, kw: int, rank: int, out_hw: HW, in_hw: HW | None = None
) -> Cost:
    """1×1 (I→R, at ``in_hw``) → depthwise kh×1 (→ ``out_h×in_w``) → depthwise 1×kw → 1×1 (R→O)."""
    in_hw = out_hw if in_hw is None else in_hw
    (oh, ow), (ih, iw) = out_hw, in_hw
    p1, p2, p3, p4 = i * rank, rank * kh, rank * kw, rank * o
    macs = ih * iw * p1 + oh * iw * p2 + oh * ow * (p3 + p4)
    return Cost(p1 + p2 + p3 + p4, macs)


def spatial_svd_costs(
    o: int, i: int, kh: int, kw: int, rank: int, out_hw: HW, in_hw: HW | None = None
) -> Cost:
    """kh×1 conv (I→R, → ``out_h×in_w``) then 1×kw conv (R→O, → ``out_hw``)."""
    in_hw = out_hw if in_hw is None else in_hw
    (oh, ow), iw = out_hw, in_hw[1]
    p_v, p_h = rank * i * kh, o * rank * kw
    return Cost(p_v + p_h, oh * iw * p_v + oh * ow * p_h)


# ---------------------------------------------------------------------------------------------
# Simple rank rules


def rank_for_ratio(full_rank: int, ratio: float) -> int:
    """``ceil(ratio · full_rank)`` within ``[1, full_rank]``; ``0 < ratio ≤ 1``."""
    if full_rank < 1:
        raise ValueError(f"full_rank must be ≥ 1, got {full_rank}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    # The small slack keeps ratios like 0.3·10 = 3.0000000000000004 from rounding up to 4.
    return int(min(full_rank, max(1, math.ceil(ratio * full_rank - 1e-9))))


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with ``Σ_{i≤r} σ_i² / Σ σ_i² ≥ energy`` (σ sorted descending first).

    ``0 < energy ≤ 1``. Returns 0 for an all-zero spectrum. Shares are compared with a 1e-12
    slack so that ``energy=1`` means "all the energy up to rounding".
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64).ravel()))[::-1]
    total = float(np.sum(s**2))
    if s.size == 0 or total == 0.0:
        return 0
    shares = np.cumsum(s**2) / total
    return int(min(s.size, np.searchsorted(shares, energy - 1e-12, side="left") + 1))


def rank_for_budget(
    cost: Callable[[int], Cost],
    reference: Cost,
    max_rank: int,
    *,
    params_ratio: float | None = None,
    macs_ratio: float | None = None,
) -> int:
    """Largest r in ``[1, max_rank]`` with ``cost(r).params / reference.params ≤ params_ratio``
    and ``cost(r).macs / reference.macs ≤ macs_ratio`` (each only if given). 0 if none fits.

    ``cost`` need not be monotone: every rank is checked, from the top.
    """
    if params_ratio is None and macs_ratio is None:
        raise ValueError("give params_ratio and/or macs_ratio")
    for r in range(int(max_rank), 0, -1):
        if _within(cost(r), reference, params_ratio, macs_ratio):
            return r
    return 0


def max_saving_rank(cost: Callable[[int], Cost], reference: Cost, max_rank: int) -> int:
    """Largest r in ``[1, max_rank]`` whose cost is strictly below the original in both params
    and MACs (the break-even limit). 0 if no rank saves."""
    for r in range(int(max_rank), 0, -1):
        c = cost(r)
        if c.params < reference.params and c.macs < reference.macs:
            return r
    return 0


def _within(c: Cost, ref: Cost, params_ratio: float | None, macs_ratio: float | None) -> bool:
    # Compare the ratio itself (a correctly rounded division), so a budget of 0.29 admits
    # exactly the costs whose share rounds to ≤ 0.29, as a test of c/ref ≤ 0.29 would check.
    if params_ratio is not None and c.params / max(ref.params, 1) > params_ratio:
        return False
    if macs_ratio is not None and c.macs / max(ref.macs, 1) > macs_ratio:
        return False
    return True


def tucker2_ranks_for_budget(
    o: int,
    i: int,
    kh: int,
    kw: int,
    out_hw: HW,
    *,
    in_hw: HW | None = None,
    params_ratio: float | None = None,
    macs_ratio: float | None = None,
) -> tuple[int, int]:
    """Largest Tucker-2 ranks ``(r_out, r_in)``, kept proportional to ``(O, I)``, within the
    budget relative to the original conv. ``(0, 0)`` if none fits."""
    if params_ratio is None and macs_ratio is None:
        raise ValueError("give params_ratio and/or macs_ratio")
    ref = conv_costs(o, i, kh, kw, out_hw)
    big = max(o, i)
    for step in range(big, 0, -1):
        r_out, r_in = -(-step * o // big), -(-step * i // big)  # ceil, so both stay ≥ 1
        c = tucker2_costs(o, i, kh, kw, r_out, r_in, out_hw, in_hw)
        if _within(c, ref, params_ratio, macs_ratio):
            return r_out, r_in
    return 0, 0


def round_rank(r: int, *, max_rank: int, multiple: int = 16) -> int:
    """Round ``r`` up to a multiple of ``multiple`` if that is still ``≤ max_rank``; else ``r``.

    ``max_rank`` is whatever limit the caller must respect: the budget rank or
    ``max_saving_rank`` (rounding up must not turn a saving rewrite into a loss).
    """
    if r < 1 or multiple < 1:
        raise ValueError(f"need r ≥ 1 and multiple ≥ 1, got r={r}, multiple={multiple}")
    up = -(-r // multiple) * multiple
    return up if up <= max_rank else r


# ---------------------------------------------------------------------------------------------
# Empirical VBMF (Nakajima et al. 2013)
#
# Observation V (L×M, L ≤ M after transposing), singular values γ_h, α = L/M. With noise
# variance σ², write x_h = γ_h² / (M σ²). The EVB solution keeps component h iff x_h > x̲, where
#   x̲ = (1 + τ̲)(1 + α/τ̲),   τ̲ > 0 the root of  log(1+τ) + α log(1+τ/α) − τ = 0
# (τ̲ ≈ 2.5129 √α). The free energy, minimised over everything but σ², is up to constants
#   Ω(σ²) = Σ_h ψ0(x_h) + Σ_{x_h > x̲} ψ1(x_h),
#   ψ0(x) = x − log x,   ψ1(x) = log(1+τ) + α log(1+τ/α) − τ,
#   τ(x) = ½ [x − (1+α) + √((x − (1+α))² − 4α)]   (the inverse of x = (1+τ)(1+α/τ)).
# ψ1(x̲) = 0, so Ω is continuous. σ̂² = argmin Ω on [σ̲², σ̄²] with σ̄² = Σγ²/(LM) (everything
# noise) and σ̲² = max(γ_{H̄+1}²/(M x̲), Σ_{h>H̄} γ_h²/(M(L−H̄))), H̄ = ⌈L/(1+α)⌉ − 1 being the
# largest rank EVB can return. We drop −log γ_h² from ψ0 (constant in σ², infinite for γ_h = 0)
# and minimise by a log-spaced grid then golden-section refinement around the best point.


@dataclass(frozen=True)
class VbmfEstimate:
    """EVB rank estimate. noise_variance: σ̂² per matrix entry; threshold: the singular-value
    cut-off ``√(M σ̂² x̲)``; max_rank: H̄, the largest rank EVB can return for this shape."""

    rank: int
    noise_variance: float
    threshold: float
    max_rank: int


def _tau_bar(alpha: float) -> float:
    def g(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    lo, hi = math.sqrt(alpha), 4.0 * math.sqrt(alpha) + 4.0
    while g(hi) > 0.0:  # g is concave, positive then negative: widen until it turns
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if g(mid) > 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def _evb_objective(gamma2: np.ndarray, m: int, alpha: float, xbar: float, s2: np.ndarray):
    """Ω at each candidate σ² in ``s2`` (1-D); ``gamma2`` are the L squared singular values."""
    x = gamma2[:, None] / (m * s2[None, :])
    omega = np.sum(x, axis=0) + gamma2.size * np.log(s2)
    keep = x > xbar
    xk = np.where(keep, x, xbar)  # any value ≥ x̲ keeps the square root real; masked below
    b = xk - (1.0 + alpha)
    tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
    psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
    return omega + np.sum(np.where(keep, psi1, 0.0), axis=0)


def vbmf(
    matrix_or_singular_values: np.ndarray, shape: tuple[int, int] | None = None
) -> VbmfEstimate:
    """Empirical VBMF rank of a matrix (2-D input) or of its full spectrum (1-D, with ``shape``).

    A 1-D input must hold all ``min(shape)`` singular values. Returns rank 0 for pure noise.
    """
    a = np.asarray(matrix_or_singular_values, dtype=np.float64)
    if a.ndim == 2:
        shape = a.shape if shape is None else shape
        if tuple(shape) != a.shape:
            raise ValueError(f"shape {shape} does not match the matrix {a.shape}")
        gamma = np.linalg.svd(a, compute_uv=False)
    elif a.ndim == 1:
        if shape is None:
            raise ValueError("shape is required with singular values")
        gamma = np.sort(np.abs(a))[::-1]
    else:
        raise ValueError(f"expected a matrix or a 1-D spectrum, got shape {a.shape}")
    dim_l, dim_m = sorted(int(d) for d in shape)
    if gamma.size != dim_l:
        raise ValueError(f"need all min(shape)={dim_l} singular values, got {gamma.size}")
    alpha = dim_l / dim_m
    tau_bar = _tau_bar(alpha)
    xbar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    h_bar = math.ceil(dim_l / (1.0 + alpha)) - 1
    gamma2 = gamma**2
    upper = float(np.sum(gamma2)) / (dim_l * dim_m)
    if upper == 0.0 or h_bar < 1:
        return VbmfEstimate(0, upper, math.sqrt(dim_m * upper * xbar), max(h_bar, 0))
    lower = max(
        gamma2[h_bar] / (dim_m * xbar), float(np.sum(gamma2[h_bar:])) / (dim_m * (dim_l - h_bar))
    )
    # An exactly low-rank input has no noise to estimate: search down to a tiny floor instead.
    lower = min(max(lower, upper * 1e-12), upper)

    grid = np.geomspace(lower, upper, 1000) if lower < upper else np.array([upper])
    # Chunk the grid so the L × grid work arrays stay near 8 MB even for large weights.
    step = max(1, (1 << 20) // dim_l)
    values = np.concatenate(
        [
            _evb_objective(gamma2, dim_m, alpha, xbar, grid[j : j + step])
            for j in range(0, grid.size, step)
        ]
    )
    best = int(np.argmin(values))
    s2 = _golden_refine(gamma2, dim_m, alpha, xbar, grid, best)
    rank = int(min(h_bar, np.count_nonzero(gamma2 / (dim_m * s2) > xbar)))
    return VbmfEstimate(rank, s2, math.sqrt(dim_m * s2 * xbar), h_bar)


def _golden_refine(gamma2, m, alpha, xbar, grid: np.ndarray, best: int) -> float:
    # Golden-section search in log σ² between the grid neighbours of the best grid point.
    def f(log_s2: float) -> float:
        return float(_evb_objective(gamma2, m, alpha, xbar, np.array([math.exp(log_s2)]))[0])

    lo = math.log(grid[max(best - 1, 0)])
    hi = math.log(grid[min(best + 1, grid.size - 1)])
    best_x, best_f = math.log(grid[best]), f(math.log(grid[best]))
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = f(d)
    for x, fx in ((c, fc), (d, fd)):
        if fx < best_f:  # never return worse than the grid's best
            best_x, best_f = x, fx
    return math.exp(best_x)


def vbmf_rank(matrix_or_singular_values: np.ndarray, shape: tuple[int, int] | None = None) -> int:
    """Rank chosen by Empirical VBMF (see ``vbmf``); may be 0."""
    return vbmf(matrix_or_singular_values, shape).rank


def tucker2_vbmf_ranks(kernel: np.ndarray) -> tuple[int, int]:
    """``(r_out, r_in)`` by EVBMF on the mode-0 (O × I·kh·kw) and mode-1 (I × O·kh·kw) unfoldings
    of a conv kernel. Either may be 0 (the unfolding looks like noise): the caller decides."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 4:
        raise ValueError(f"kernel must be 4-D, got shape {k.shape}")
    r_out = vbmf_rank(k.reshape(k.shape[0], -1))
    r_in = vbmf_rank(k.transpose(1, 0, 2, 3).reshape(k.shape[1], -1))
    return r_out, r_in
