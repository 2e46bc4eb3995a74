"""Scale migration between an activation and the weights that read it (SmoothQuant): numpy only.

A layer ``Y = X·W`` (X: [..., K], W: [K, N]) computes the same with ``X' = X·diag(1/s)`` and
``W' = diag(s)·W`` for any s > 0. Per input feature j, with ``a_j = max|X_j|`` over the calibration
data and ``w_j = max|W_j,:|`` (over every layer that reads X, so that one s serves them all)::

    s_j = a_j^α / w_j^(1−α)

moves part of the activation's per-feature range into the weights: after the migration
``max|X'_j| = a_j^(1−α)·w_j^(1−α)`` and ``max|W'_j| = a_j^α·w_j^α``. α = 0 leaves X alone
(s = 1 where a_j = w_j = 1), α = 1 flattens every feature of X to the same range (1). A feature
whose activation or weight is all zero, or not finite, keeps s_j = 1; s is clipped to
``[1/MAX_SCALE, MAX_SCALE]`` so that neither side leaves the float32 range.
"""

from __future__ import annotations

import numpy as np

# Bounds of a migration scale (and of its reciprocal): far inside float32.
MAX_SCALE = 1e4


def migration_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = act_max_j^α / weight_max_j^(1−α)`` (float64, shape of `act_max`; see the module docstring)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_max, np.float64)
    w = np.asarray(weight_max, np.float64)
    if a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"act_max {a.shape} and weight_max {w.shape} must be vectors of one length")
    usable = np.isfinite(a) & np.isfinite(w) & (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[usable] = a[usable] ** alpha / w[usable] ** (1.0 - alpha)
    return np.clip(s, 1.0 / MAX_SCALE, MAX_SCALE)


def row_max(weight: np.ndarray, axis: int) -> np.ndarray:
    """``max|W|`` of each input feature of a 2-D weight whose input features lie along `axis`."""
    w = np.abs(np.asarray(weight, np.float64))
    return w.max(axis=1 - axis) if w.size else np.zeros(w.shape[axis])


def spread(act_max: np.ndarray) -> float:
    """How far the largest feature stands out: ``max_j a_j / median_j a_j`` (1 for a flat range;
    inf when most features are zero)."""
    a = np.abs(np.asarray(act_max, np.float64))
    if a.size == 0:
        return 1.0
    med = float(np.median(a))
    top = float(a.max())
    if top == 0:
        return 1.0
    return top / med if med > 0 else float("inf")
