"""Importance scores and pruning masks: numbers in, numbers out (numpy only).

Scores (higher = more important):

- ``channel_norms(w, axis, p)``: the L1 (``p=1``) or L2 (``p=2``) norm of every slice of ``w``
  along ``axis`` (a filter of a Conv weight ``[O, I/g, kh, kw]`` with ``axis=0``, a column of a
  ``[K, N]`` MatMul weight with ``axis=1``). ``channel_sumsq`` gives the squared L2 norms, which
  add up when several layers share a channel (the L2 norm of the union is ``√Σ``).
- ``bn_gamma_scores(γ)``: ``|γ|`` of a BatchNormalization (network slimming: BN computes
  ``γ (x − μ)/√(σ² + ε) + β``, so a small ``|γ|`` marks a channel that carries little signal).
- ``ActivationStats``: streaming per-channel statistics of activations fed batch by batch
  (nothing but three running sums per channel is kept): ``mean_abs`` = mean ``|a|``, and ``apoz``
  = average percentage of zeros, the share of elements with ``|a| ≤ zero_tol`` (0 by default:
  exact zeros, as a ReLU emits them). ``importance()`` turns either into a score
  (``mean_abs``, or ``1 − apoz``).

Masks (``True`` = keep the weight):

- ``magnitude_mask(w, sparsity)``: zero exactly ``round(sparsity · w.size)`` weights, those of
  smallest ``|w|``; ties are broken by flat index (a stable sort), so the result is deterministic.
  Weights that are already zero are the smallest and count toward the target.
- ``global_magnitude_masks(ws, sparsity)``: one ranking over the weights of all layers together,
  ``round(sparsity · Σ size)`` zeros in total; layers with small weights lose more of them.
- ``nm_mask(w, n, m, axis)``: N:M sparsity (2:4 for sparse tensor cores): in every run of ``m``
  consecutive weights along ``axis`` (the reduction axis), keep the ``n`` of largest ``|w|``.
  ``w.shape[axis]`` must be a multiple of ``m`` (``ValueError`` otherwise).

Channel selection: ``select_channels(scores, ratio, scope=...)`` picks the channels to prune in
every group: ``floor(ratio · n)`` per group of ``n`` channels (``scope='layer'``), or
``floor(ratio · Σ n)`` in total over all groups ranked together (``scope='global'``; scores are
first divided by their group's mean so that layers of different scale compare), always keeping at
least ``min_keep`` channels per group and never choosing a channel marked not ``eligible``;
``round_to`` rounds every group's kept count up to a multiple (hardware-friendly widths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike


def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis = axis % ndim
    return tuple(a for a in range(ndim) if a != axis)


def channel_sumsq(w: ArrayLike, axis: int = 0) -> np.ndarray:
    """Σ w² over every slice along `axis` (float64)."""
    w = np.asarray(w, dtype=np.float64)
    return np.sum(w * w, axis=_other_axes(w.ndim, axis)) if w.ndim > 1 else w * w


def channel_norms(w: ArrayLike, axis: int = 0, p: Literal[1, 2] = 1) -> np.ndarray:
    """L1 (`p=1`) or L2 (`p=2`) norm of every slice of `w` along `axis` (float64)."""
    w = np.asarray(w, dtype=np.float64)
    if p == 1:
        return np.sum(np.abs(w), axis=_other_axes(w.ndim, axis)) if w.ndim > 1 else np.abs(w)
    if p == 2:
        return np.sqrt(channel_sumsq(w, axis))
    raise ValueError(f"p must be 1 or 2, got {p}")


def bn_gamma_scores(gamma: ArrayLike) -> np.ndarray:
    """|γ| per channel."""
    return np.abs(np.asarray(gamma, dtype=np.float64).reshape(-1))


class ActivationStats:
    """Per-channel mean |a| and APoZ, accumulated batch by batch (constant memory)."""

    def __init__(self, channels: int, *, zero_tol: float = 0.0):
        if channels <= 0:
            raise ValueError("channels must be positive")
        self.channels = channels
        self.zero_tol = float(zero_tol)
        self.abs_sum = np.zeros(channels, np.float64)
        self.zeros = np.zeros(channels, np.int64)
        self.count = 0  # elements seen per channel

    def update(self, batch: ArrayLike, axis: int, keep: np.ndarray | None = None) -> None:
        """Add one batch whose channels lie on `axis`; `keep` (bool per position: the other axes in
        C order) counts only the positions where it is True."""
        a = np.asarray(batch)
        if a.shape[axis] != self.channels:
            raise ValueError(f"batch has {a.shape[axis]} channels on axis {axis}, expected {self.channels}")
        flat = np.moveaxis(a, axis, 0).reshape(self.channels, -1)
        if keep is not None:
            if keep.shape != (flat.shape[1],):
                raise ValueError(f"keep has shape {keep.shape}, expected ({flat.shape[1]},): one per position")
            flat = flat[:, keep]
        mag = np.abs(flat.astype(np.float64, copy=False))
        self.abs_sum += mag.sum(axis=1)
        self.zeros += np.count_nonzero(mag <= self.zero_tol, axis=1)
        self.count += flat.shape[1]

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def apoz(self) -> np.ndarray:
        return self.zeros / max(self.count, 1)

    def importance(self, stat: Literal["mean_abs", "apoz"] = "mean_abs") -> np.ndarray:
        if self.count == 0:
            raise ValueError("no activations were fed")
        if stat == "mean_abs":
            return self.mean_abs
        if stat == "apoz":
            return 1.0 - self.apoz
        raise ValueError(f"unknown statistic {stat!r}")


def _check_fraction(x: float, name: str) -> None:
    if not (0.0 <= x <= 1.0) or math.isnan(x):
        raise ValueError(f"{name} must lie in [0, 1], got {x}")


def sparsity(w: ArrayLike) -> float:
    """Share of exact zeros."""
    w = np.asarray(w)
    return float(np.count_nonzero(w == 0) / w.size) if w.size else 0.0


def magnitude_mask(w: ArrayLike, target: float) -> np.ndarray:
    """Keep-mask zeroing the round(target · size) smallest |w| (ties: lower flat index first)."""
    _check_fraction(target, "sparsity")
    w = np.asarray(w)
    k = int(round(target * w.size))
    keep = np.ones(w.size, bool)
    if k:
        order = np.argsort(np.abs(w.astype(np.float64).ravel()), kind="stable")
        keep[order[:k]] = False
    return keep.reshape(w.shape)


def global_magnitude_masks(weights: Sequence[ArrayLike], target: float) -> list[np.ndarray]:
    """Keep-masks for several tensors ranked together: round(target · Σ size) zeros in total."""
    _check_fraction(target, "sparsity")
    arrays = [np.asarray(w) for w in weights]
    if not arrays:
        return []
    flat = np.concatenate([np.abs(a.astype(np.float64).ravel()) for a in arrays])
    k = int(round(target * flat.size))
    keep = np.ones(flat.size, bool)
    if k:
        keep[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for a in arrays:
        out.append(keep[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def nm_mask(w: ArrayLike, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with N:M sparsity: n largest |w| of every m consecutive weights along `axis`."""
    if not (0 < n <= m):
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    w = np.asarray(w)
    axis = axis % w.ndim
    size = w.shape[axis]
    if size % m:
        raise ValueError(f"axis {axis} has {size} elements, not a multiple of {m}")
    moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, -1)
    runs = moved.reshape(*moved.shape[:-1], size // m, m)
    # Stable sort of −|w|: the n largest, ties resolved toward the lower index.
    order = np.argsort(-runs, axis=-1, kind="stable")
    keep_runs = np.zeros(runs.shape, bool)
    np.put_along_axis(keep_runs, order[..., :n], True, axis=-1)
    return np.moveaxis(keep_runs.reshape(moved.shape), -1, axis)


def select_channels(scores: Sequence[ArrayLike], ratio: float, *, scope: Literal["layer", "global"] = "layer",
                    eligible: Sequence[ArrayLike] | None = None, min_keep: int = 1,
                    round_to: int = 1) -> list[np.ndarray]:
    """Boolean masks, True = prune, one per group of channel scores (lowest scores pruned first).

    `layer`: floor(ratio · n) per group. `global`: floor(ratio · Σ n) over all groups together,
    each group's scores divided by its mean first. A group keeps at least `min_keep` channels and
    ineligible channels are never chosen, so fewer channels may be pruned than asked for. With
    `round_to` > 1 the kept count of every group is then rounded *up* to a multiple of it (or to
    the whole group) by sparing its highest-scored chosen channels: never more pruned than asked.
    """
    _check_fraction(ratio, "ratio")
    if min_keep < 0:
        raise ValueError("min_keep must be >= 0")
    if round_to < 1:
        raise ValueError("round_to must be >= 1")
    masks = _select(scores, ratio, scope, eligible, min_keep)
    if round_to > 1:
        for s, mask in zip(scores, masks):
            s = np.asarray(s, dtype=np.float64).reshape(-1)
            kept = mask.size - int(mask.sum())
            spare = min(mask.size, -(-kept // round_to) * round_to) - kept
            if spare > 0:
                chosen = np.flatnonzero(mask)
                mask[chosen[np.argsort(-s[chosen], kind="stable")[:spare]]] = False
    return masks


def _select(scores, ratio, scope, eligible, min_keep) -> list[np.ndarray]:
    groups = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    ok = [np.ones(g.size, bool) if eligible is None else np.asarray(e, bool).reshape(-1)
          for g, e in zip(groups, eligible if eligible is not None else groups)]
    for g, e in zip(groups, ok):
        if g.size != e.size:
            raise ValueError("eligible masks must match the score arrays")
    masks = [np.zeros(g.size, bool) for g in groups]
    if scope == "layer":
        for g, e, mask in zip(groups, ok, masks):
            want = min(int(math.floor(ratio * g.size + 1e-9)), max(g.size - min_keep, 0))
            candidates = np.flatnonzero(e)
            order = candidates[np.argsort(g[candidates], kind="stable")]
            mask[order[:want]] = True
        return masks
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    total = sum(g.size for g in groups)
    want = int(math.floor(ratio * total + 1e-9))
    entries = []
    for gi, (g, e) in enumerate(zip(groups, ok)):
        mean = float(np.mean(np.abs(g))) if g.size else 0.0
        norm = g / mean if mean > 0 else g
        entries.extend((float(norm[c]), gi, c) for c in np.flatnonzero(e))
    entries.sort()
    room = [max(g.size - min_keep, 0) for g in groups]
    taken = 0
    for _, gi, c in entries:
        if taken >= want:
            break
        if room[gi] > 0:
            masks[gi][c] = True
            room[gi] -= 1
            taken += 1
    return masks
