"""Streaming ridge least squares, im2col for convolutions, bias-correction accumulators (numpy only).

**Least squares.** `LstsqAccumulator` is fed rows ``x`` (features) and ``y`` (targets) one batch
at a time and keeps, per group g (a grouped conv is G independent problems):

    XᵀX (d×d), XᵀY (d×m), ΣX (d), ΣY (m), ΣY² (m), n,

all in float64 and shifted by the first batch's means (which changes nothing mathematically and
keeps the centring below from cancelling digits). Memory is O(G·d·(d + m)), whatever the number
of rows. `solve(ridge)` returns the minimizer of

    Σ_rows ‖y − x·W − b‖² + λ‖W‖²_F,    λ = ridge · mean diag(C),   C = XᵀX − n·μ_x μ_xᵀ

(b unpenalized): ``W = (C + λI)⁻¹ (XᵀY − n·μ_x μ_yᵀ)``, ``b = μ_y − μ_xᵀ W``. λ is relative to the
mean variance of the features, so one `ridge` fits layers of any scale; ``ridge=0`` gives the
minimum-norm least-squares solution (numpy's lstsq on centred data), also when C is singular.
A constant feature has a zero row and column in C, so it gets weight 0 and is carried by b.
`sse(W, b)` is the residual ``Σ‖y − xW − b‖²`` of any weights, computed from the same statistics:
streaming, and independent of the number of rows. Streaming equals one big batch up to float
rounding (sums are associative in exact arithmetic).

**Bias correction.** `MeanErrorAccumulator` keeps, per channel, Σe, Σe² and n of an error
``e = y_teacher − y_student``; shifting the bias by δ changes the squared error to
``Σe² − 2δ·Σe + n·δ²``, minimized by δ = mean(e) (`sse(shift)` evaluates any shift, e.g. one
rounded to an int32 grid).

**im2col.** A convolution is a matrix product over output pixels: every output pixel of every
sample is one row holding the input patch it reads (channels × kernel taps, channel-major, the
layout of the ONNX weight ``W[O, C/G, k…]``), so ``y[row, g] = patch[row, g] @ W_g`` with
``W_g = W[g·O/G:(g+1)·O/G].reshape(O/G, -1).T``. Strides, explicit or automatic padding
(``SAME_UPPER``/``SAME_LOWER``/``VALID``), dilations and groups are honoured; any number of
spatial dims. Patches are gathered from a strided view of the padded input, so asking for a
subset of rows (`rows=`) never materializes the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Rows × features converted to float64 at a time inside `update` (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Least squares


@dataclass(frozen=True)
class LstsqSolution:
    """weight [G, d, m], bias [G, m] (zeros without an intercept), λ per group (absolute)."""

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray


def _as_groups(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[:, None, :]
    if a.ndim != 3:
        raise ValueError(f"{what} must be [rows, features] or [rows, groups, features], got shape {a.shape}")
    return a


class LstsqAccumulator:
    """Streaming sufficient statistics of a (grouped) linear regression ``y ≈ x·W + b``."""

    def __init__(self, n_features: int, n_targets: int, *, groups: int = 1, intercept: bool = True):
        if n_features < 0 or n_targets < 1 or groups < 1:
            raise ValueError("need n_features ≥ 0, n_targets ≥ 1, groups ≥ 1")
        self.d, self.m, self.groups, self.intercept = n_features, n_targets, groups, intercept
        g, d, m = groups, n_features, n_targets
        self.xtx = np.zeros((g, d, d))
        self.xty = np.zeros((g, d, m))
        self.sx = np.zeros((g, d))
        self.sy = np.zeros((g, m))
        self.syy = np.zeros((g, m))
        self.n = 0
        self._shift_x: np.ndarray | None = None
        self._shift_y: np.ndarray | None = None

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows: x [rows, d] or [rows, G, d]; y [rows, m] or [rows, G, m]."""
        x, y = _as_groups(x, "x"), _as_groups(y, "y")
        if x.shape[1:] != (self.groups, self.d) or y.shape[1:] != (self.groups, self.m) or len(x) != len(y):
            raise ValueError(f"expected x [rows, {self.groups}, {self.d}] and y [rows, {self.groups}, {self.m}], "
                             f"got {x.shape} and {y.shape}")
        if len(x) == 0:
            return
        if self._shift_x is None:
            # Without an intercept the raw sums are needed: no shift.
            self._shift_x = x.mean(axis=0, dtype=np.float64) if self.intercept else np.zeros((self.groups, self.d))
            self._shift_y = y.mean(axis=0, dtype=np.float64) if self.intercept else np.zeros((self.groups, self.m))
        step = max(1, _CHUNK_ELEMENTS // max(1, self.groups * (self.d + self.m)))
        for start in range(0, len(x), step):
            xc = np.asarray(x[start:start + step], np.float64) - self._shift_x
            yc = np.asarray(y[start:start + step], np.float64) - self._shift_y
            xg, yg = xc.transpose(1, 0, 2), yc.transpose(1, 0, 2)  # [G, rows, ·]
            xgt = xg.transpose(0, 2, 1)
            self.xtx += xgt @ xg
            self.xty += xgt @ yg
            self.sx += xc.sum(axis=0)
            self.sy += yc.sum(axis=0)
            self.syy += np.einsum("rgm,rgm->gm", yc, yc)
        self.n += len(x)

    @property
    def rows(self) -> int:
        return self.n

    def _centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        if not self.intercept:
            return self.xtx, self.xty, np.zeros_like(mx), np.zeros_like(my)
        cxx = self.xtx - n * mx[:, :, None] * mx[:, None, :]
        cxy = self.xty - n * mx[:, :, None] * my[:, None, :]
        return cxx, cxy, mx, my

    def solve(self, ridge: float = 1e-4) -> LstsqSolution:
        """Ridge solution per group (see the module docstring); ridge=0: minimum-norm least squares."""
        if ridge < 0:
            raise ValueError(f"ridge must be ≥ 0, got {ridge}")
        cxx, cxy, mx, my = self._centred()
        weight = np.zeros((self.groups, self.d, self.m))
        lam = np.zeros(self.groups)
        for g in range(self.groups):
            if self.d == 0:
                continue
            c = (cxx[g] + cxx[g].T) / 2
            scale = float(np.mean(np.diag(c)))
            lam[g] = ridge * scale
            if lam[g] > 0:
                try:
                    chol = np.linalg.cholesky(c + lam[g] * np.eye(self.d))
                    weight[g] = np.linalg.solve(chol.T, np.linalg.solve(chol, cxy[g]))
                    continue
                except np.linalg.LinAlgError:
                    pass
            weight[g] = np.linalg.lstsq(c + lam[g] * np.eye(self.d), cxy[g], rcond=None)[0]
        if not self.intercept or self._shift_x is None:
            return LstsqSolution(weight, np.zeros((self.groups, self.m)), lam)
        # Fitted in shifted coordinates (y' = x'W + b'); back to the original ones.
        bias = my - np.einsum("gd,gdm->gm", mx, weight) + self._shift_y - np.einsum("gd,gdm->gm", self._shift_x, weight)
        return LstsqSolution(weight, bias, lam)

    def sse(self, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> float:
        """Σ_rows ‖y − x·W − b‖² from the statistics (W [G, d, m] or None = 0; b [G, m] or None = 0)."""
        if self.n == 0:
            return 0.0
        w = np.zeros((self.groups, self.d, self.m)) if weight is None else np.asarray(weight, np.float64).reshape(
            self.groups, self.d, self.m)
        b = (np.zeros((self.groups, self.m)) if bias is None
             else np.asarray(bias, np.float64).reshape(self.groups, self.m))
        # In shifted coordinates x' = x − s_x, y' = y − s_y the residual is y' − x'W − b'.
        b = b + np.einsum("gd,gdm->gm", self._shift_x, w) - self._shift_y
        sxw = np.einsum("gd,gdm->gm", self.sx, w)
        total = (self.syy.sum()
                 - 2 * float(np.sum(w * self.xty))
                 - 2 * float(np.sum(b * self.sy))
                 + float(np.sum(w * (self.xtx @ w)))  # tr(Wᵀ XᵀX W), as matrix products
                 + 2 * float(np.sum(b * sxw))
                 + self.n * float(np.sum(b * b)))
        return max(float(total), 0.0)


# ---------------------------------------------------------------------------------------------
# Bias correction


class MeanErrorAccumulator:
    """Per-channel Σe, Σe², n of an error e = y_teacher − y_student (rows × channels)."""

    def __init__(self, channels: int):
        self.channels = channels
        self.se = np.zeros(channels)
        self.see = np.zeros(channels)
        self.n = 0

    def update(self, error: np.ndarray) -> None:
        e = np.asarray(error, np.float64).reshape(-1, self.channels)
        self.se += e.sum(axis=0)
        self.see += np.einsum("rc,rc->c", e, e)
        self.n += len(e)

    @property
    def rows(self) -> int:
        return self.n

    def mean(self) -> np.ndarray:
        """The bias shift that minimizes the squared error: the mean error per channel."""
        return self.se / max(self.n, 1)

    def sse(self, shift: np.ndarray | None = None) -> float:
        """Σ_rows ‖e − shift‖² (shift per channel; None = no shift)."""
        if shift is None:
            return float(self.see.sum())
        s = np.asarray(shift, np.float64).reshape(self.channels)
        return max(float(np.sum(self.see - 2 * s * self.se + self.n * s * s)), 0.0)


# ---------------------------------------------------------------------------------------------
# Convolutions as matrix products


def conv_pads(spatial: Sequence[int], kernel: Sequence[int], *, strides: Sequence[int] | None = None,
              dilations: Sequence[int] | None = None, pads: Sequence[int] | None = None,
              auto_pad: str = "NOTSET") -> list[int]:
    """Explicit pads ``[b₁…b_k, e₁…e_k]`` of a conv, resolving ``auto_pad`` from the input size."""
    k = len(kernel)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, kk, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (kk - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(large if auto_pad == "SAME_LOWER" else small)
            ends.append(small if auto_pad == "SAME_LOWER" else large)
        return begins + ends
    if auto_pad == "VALID":
        return [0] * (2 * k)
    return list(pads) if pads is not None and len(pads) else [0] * (2 * k)


def conv_output_shape(spatial: Sequence[int], kernel: Sequence[int], *, strides: Sequence[int] | None = None,
                      dilations: Sequence[int] | None = None, pads: Sequence[int] | None = None) -> tuple[int, ...]:
    k = len(kernel)
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads = list(pads or [0] * (2 * k))
    return tuple((size + pads[i] + pads[i + k] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i, size in enumerate(spatial))


def _windows(x: np.ndarray, kernel: Sequence[int], strides, dilations, pads) -> np.ndarray:
    """A read-only strided view [N, C, *out, *kernel] of the zero-padded input."""
    k = len(kernel)
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + k]) for i in range(k)]
    xp = np.pad(x, widths) if any(pads) else x
    out = conv_output_shape(x.shape[2:], kernel, strides=strides, dilations=dilations, pads=pads)
    if min(out) < 1:
        raise ValueError(f"conv output would be empty: input {x.shape[2:]}, kernel {tuple(kernel)}, pads {pads}")
    st = xp.strides
    shape = (*xp.shape[:2], *out, *kernel)
    strides_view = (*st[:2], *(st[2 + i] * strides[i] for i in range(k)), *(st[2 + i] * dilations[i] for i in range(k)))
    return np.lib.stride_tricks.as_strided(xp, shape=shape, strides=strides_view, writeable=False)


def im2col(x: np.ndarray, kernel: Sequence[int], *, strides: Sequence[int] | None = None,
           pads: Sequence[int] | None = None, dilations: Sequence[int] | None = None, groups: int = 1,
           auto_pad: str = "NOTSET", rows: np.ndarray | None = None) -> np.ndarray:
    """Patches of a conv input x [N, C, *spatial] as rows [R, groups, (C/groups)·∏kernel].

    Row r is output pixel r in C order of ``[N, *out]``; `rows` selects a subset (any order).
    """
    x = np.asarray(x)
    k = len(kernel)
    if x.ndim != k + 2:
        raise ValueError(f"input of rank {x.ndim} does not match a {k}-D kernel")
    c = x.shape[1]
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads = conv_pads(x.shape[2:], kernel, strides=strides, dilations=dilations, pads=pads, auto_pad=auto_pad)
    win = _windows(x, kernel, strides, dilations, pads)  # [N, C, *out, *k]
    n, out = x.shape[0], win.shape[2:2 + k]
    taps = math.prod(kernel)
    if rows is None:
        perm = (0, *range(2, 2 + k), 1, *range(2 + k, 2 + 2 * k))
        patches = win.transpose(perm).reshape(n * math.prod(out), c * taps)
    else:
        idx = np.unravel_index(np.asarray(rows, np.int64), (n, *out))
        # Advanced indices separated by a slice: the indexed axis comes first → [R, C, *k].
        patches = win[(idx[0], slice(None), *idx[1:])].reshape(len(idx[0]), c * taps)
    return patches.reshape(len(patches), groups, (c // groups) * taps)


def conv_rows(y: np.ndarray, groups: int = 1, rows: np.ndarray | None = None) -> np.ndarray:
    """A conv output y [N, O, *out] as rows [R, groups, O/groups] (the row order of `im2col`)."""
    y = np.asarray(y)
    flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    if rows is not None:
        flat = flat[np.asarray(rows, np.int64)]
    return flat.reshape(len(flat), groups, y.shape[1] // groups)


def conv_weight_matrix(w: np.ndarray, groups: int = 1) -> np.ndarray:
    """Conv weight W [O, C/G, *k] → per-group matrices [G, (C/G)·∏k, O/G] (patch @ matrix = output)."""
    w = np.asarray(w)
    o = w.shape[0]
    return w.reshape(groups, o // groups, -1).transpose(0, 2, 1)


def conv_weight_from_matrix(m: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `conv_weight_matrix` for a weight of `shape`."""
    m = np.asarray(m)
    return m.transpose(0, 2, 1).reshape(tuple(shape))


def conv_via_matmul(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, strides=None, pads=None,
                    dilations=None, groups: int = 1, auto_pad: str = "NOTSET") -> np.ndarray:
    """The convolution computed as im2col rows @ weight matrices (float64; for checks and tests)."""
    x = np.asarray(x, np.float64)
    kernel = w.shape[2:]
    k = len(kernel)
    full_pads = conv_pads(x.shape[2:], kernel, strides=strides, dilations=dilations, pads=pads, auto_pad=auto_pad)
    out = conv_output_shape(x.shape[2:], kernel, strides=strides, dilations=dilations, pads=full_pads)
    patches = im2col(x, kernel, strides=strides, pads=full_pads, dilations=dilations, groups=groups)
    y = np.einsum("rgd,gdo->rgo", patches, conv_weight_matrix(np.asarray(w, np.float64), groups))
    y = y.reshape(x.shape[0], *out, w.shape[0])
    if b is not None:
        y = y + np.asarray(b, np.float64)
    return np.moveaxis(y, -1, 1) if k else y
