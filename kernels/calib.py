"""Streaming activation-range observers for calibration: numbers in, numbers out (numpy only).

An observer is fed one batch at a time (``update``) and keeps a fixed amount of state, so
calibration never holds every intermediate tensor. ``range(method=...)`` gives a real range
``(lo, hi)`` for ``quant.compute_params`` (which widens it to include 0); ``merge`` combines two.

``MinMaxObserver``: the running min and max, exactly the batch result.

``HistogramObserver``: the running min/max and a fixed-size histogram on a power-of-two grid
anchored at zero. ``2N`` bins (``N = bins_per_side``, default 4096) of width ``w = 2^e`` cover
``[−N·w, N·w)``, ``e`` the smallest integer with ``max|x| < N·2^e``. When a batch exceeds the
range, ``e`` grows by ``k`` and each ``2^k`` adjacent bins merge into one; since
``floor(floor(x/w)/2^k) = floor(x/(w·2^k))`` and ``x / 2^e`` is exact in floating point, the
histogram after any sequence of batches (or ``merge``) is bit-identical to that of the
concatenated data, and so is every derived range. Resolution: ``[0, max|x|]`` spans N/2 to N
bins; thresholds are resolved to one bin ``w ≤ 2·max|x|/N``. Zero is a bin edge, so the |x|
histogram folds the two halves exactly. Non-finite values are skipped (``n_nonfinite``); exact
zeros are counted apart (``n_zero``): representable whatever the range, entropy and mse leave them
out (the spike of zeros after a ReLU would drag the threshold down); percentile counts them.

Range methods (``symmetric=True`` works on |x| and clips the observed ``[min, max]`` to
``[−T, T]``; ``symmetric=False`` works on signed values):

- ``minmax``: the observed min and max.
- ``percentile``: ``T`` is the ``p``-th percentile of |x| (linear inside a bin). Asymmetric: the
  ``100 − p`` % tail mass is split evenly between the tails, or put on the populated side of
  one-sided data.
- ``entropy`` (the KL criterion of TensorRT's int8 calibration, implemented from the idea): for
  each candidate edge ``T = i·w``, ``i ≥ M`` (``M`` levels on the side: 128 for symmetric int8),
  ``P`` is the |x| histogram up to ``T`` with the mass beyond it added to the last bin (clipping);
  ``Q`` merges the bins below ``T`` into ``M`` groups, each group's mass spread evenly over its
  non-empty bins (quantizing), mixed with a ``1e−8`` share of uniform mass so that clipped mass
  where ``Q`` is empty costs a finite penalty. The ``T`` minimizing ``KL(P‖Q)`` wins (ties: the
  larger). Every edge is scored in O(M) from prefix sums (a float32 screen, then float64 for
  those within the screen's error bound of its best: the float64 choice). Asymmetric: each side
  on its own with ``L/2`` levels, or ``L`` for one-sided data.
- ``mse``: the expected squared error of quantize→dequantize over the histogram (each bin's mass
  at its centre): ``Δ²/12`` inside ``[lo, hi]`` (``Δ = T/k``, ``k = L/2 − 1`` symmetric;
  ``(hi − lo)/(L − 1)`` asymmetric), the squared distance to the clip point outside, nothing for
  exact zeros. Symmetric: every edge is tried. Asymmetric: a grid of at most 256×256 edge pairs,
  then every pair between the best one's grid neighbours (local: a multi-modal objective's global
  optimum could be missed). With a share ``f`` of the data at ``A`` the optimum is about
  ``T = A·f / (f + 1/(12k²))``: MSE clips far below ``A`` only when ``f ≪ 1/(12k²)``.

Precision of the histogram methods: one bin ``w`` (percentile: plus the data's sampling noise).

Per-feature floor (``feature_axis``): a pooled histogram cannot tell rare spikes from a feature
that is large on every input (a transformer's outlier dimensions), which clipping would distort on
every sample. The observer then also keeps per feature ``c`` the smallest per-sample maximum
``top_c = min_s max x[s, c, …]`` and the largest per-sample minimum ``bottom_c`` (axis 0 indexes
samples; exact under streaming and merging), and widens each clipped range to
``[min(lo, min_c bottom_c), max(hi, max_c top_c)]``. A NaN leaves that sample out for that
feature; the floor never exceeds the observed finite ``[min, max]``; a feature axis whose length
changes between batches drops the floor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from .quant import qrange, symmetric_steps

__all__ = ["HistogramObserver", "MinMaxObserver", "RangeMethod"]

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]

_CHUNK = 1 << 20  # elements per step inside update(): bounds temporary memory per batch
_MSE_GRID = 256  # per side, for the asymmetric 2-D search
_KL_BLOCK = 1 << 18  # candidates × groups per step of the KL search
_STARTS_TABLE = 1 << 21  # entries (int64) of one cached table of group starts: 16 MB at most
_KL_SMOOTHING = 1e-8  # share of uniform mass mixed into Q so that KL stays finite


def _finite_chunks(x: ArrayLike) -> Iterator[tuple[np.ndarray, int, float, float]]:
    """Yield 1-D chunks of the finite values of ``x``, the count of the others, and the chunk's
    min and max: float32 views of float32 data (min, max, zero tests and ``x·2^-e`` are exact in
    float32 too), float64 copies of anything else."""
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise ValueError(f"cannot observe an array of dtype {a.dtype}")
    flat = a.reshape(-1)
    work = np.float32 if a.dtype == np.float32 else np.float64
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK].astype(work, copy=False)
        if not chunk.size:
            continue
        # NaN propagates through min/max and ±inf shows in them: two finite extremes mean every
        # value is finite, without a separate isfinite pass.
        lo, hi = float(chunk.min()), float(chunk.max())
        if math.isfinite(lo) and math.isfinite(hi):
            yield chunk, 0, lo, hi
            continue
        finite = np.isfinite(chunk)
        kept = chunk[finite]
        bad = int(chunk.size - kept.size)
        if kept.size:
            yield kept, bad, float(kept.min()), float(kept.max())
        else:
            yield kept, bad, math.inf, -math.inf


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def _group_starts(m: int, i: np.ndarray) -> np.ndarray:
    """Row per candidate ``i``: the first bin of each of the ``m`` groups of ``i`` kept bins and
    the end, ``(g·i) // m`` for g = 0..m. Contiguous candidates read a view of a cached table
    (rows up to a power of two, at most `_STARTS_TABLE` entries; the usual int8/uint8 searches
    share two or three of them) instead of recomputing the product for every histogram."""
    first, last = int(i[0]), int(i[-1])
    rows = 1 << last.bit_length()
    if last - first + 1 == i.size and rows * (m + 1) <= _STARTS_TABLE:
        return _starts_table(m, rows)[first : first + i.size]
    return _starts_rows(m, i)


def _starts_rows(m: int, i: np.ndarray) -> np.ndarray:
    starts = np.multiply.outer(np.asarray(i, dtype=np.int64), np.arange(m + 1, dtype=np.int64))
    if m & (m - 1) == 0:  # a shift when m = 2^k
        starts >>= m.bit_length() - 1
    else:
        starts //= m
    return starts


@functools.lru_cache(maxsize=4)
def _starts_table(m: int, rows: int) -> np.ndarray:
    table = _starts_rows(m, np.arange(rows))
    table.flags.writeable = False
    return table


class _KLScores:
    """KL(P‖Q) of the candidates of one |x| histogram ``h`` with ``m`` quantized levels, see
    `HistogramObserver._kl_threshold`. ``exact=True``: float64, the reference arithmetic.
    ``exact=False``: the group terms (Σ_g mass_g·log q_g, all but O(1) of the work per candidate)
    in float32, at most ``screen_error`` away from the float64 score."""

    def __init__(self, h: np.ndarray, m: int) -> None:
        self.h, self.m = h, m
        n = h.size
        self.mass = np.concatenate([[0.0], np.cumsum(h)])
        self.nonempty = np.concatenate([[0.0], np.cumsum((h > 0).astype(np.float64))])
        self.hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
        self.total = self.mass[-1]
        # Error bound of the float32 group terms, per unit of mass: every q lies in
        # [ε/n, 1 + ε], so |log q| <= L; the float32 q carries a few roundings (relative 2^-24
        # each: ~6e-8 in log q), log adds ~1 ulp of |log q|, the product one more, and the
        # float64 sum of mass-weighted terms adds nothing that matters. 8 ulps of L + 8e-7 is
        # a generous cover of all of it; the result is divided by the total mass like the score.
        big = math.log(n / _KL_SMOOTHING) + 1.0
        self.screen_error = 8.0 * big * 2.0**-23 + 8e-7

    def __call__(self, candidates: np.ndarray, *, exact: bool) -> np.ndarray:
        m, h, mass, total = self.m, self.h, self.mass, self.total
        kl = np.empty(candidates.size)
        ftype = np.float64 if exact else np.float32
        # Blocks of candidates keep the (candidates × levels) temporaries to a few MB.
        block = max(1, _KL_BLOCK // (m + 1))
        for b0 in range(0, candidates.size, block):
            i = candidates[b0 : b0 + block]
            tail = total - mass[i]  # clipped mass, piled onto bin i-1 of the reference P
            last = h[i - 1]
            # sum P log P with P in counts: the untouched bins, plus the last bin with the tail.
            plogp = self.hlogh[i - 1] + _xlogx(last + tail)
            # Groups of the quantized Q: bins [starts[g], starts[g+1]) for g < m, starts[m] = i.
            starts = _group_starts(m, i)
            g_mass = np.diff(mass[starts], axis=1)
            g_nonempty = np.diff(self.nonempty[starts], axis=1)
            # An empty group has no mass: give it one "bin" so that Q is finite there (its term is
            # 0·log(uniform) = 0), instead of masking 0/0 afterwards.
            np.maximum(g_nonempty, 1.0, out=g_nonempty)
            kept = mass[i]  # Q's mass: the kept bins only
            uniform = _KL_SMOOTHING / i
            if not exact:
                g_mass = g_mass.astype(ftype)
                g_nonempty = g_nonempty.astype(ftype)
            # Q on a non-empty bin of group g, mixed with uniform mass over the i bins so that
            # clipped mass landing in an empty bin costs a finite, logarithmic penalty. The same
            # operations in the same order as written out: (1-ε)·mass / nonempty / kept + uniform.
            q_bin = g_mass * ftype(1.0 - _KL_SMOOTHING)
            q_bin /= g_nonempty
            with np.errstate(divide="ignore", invalid="ignore"):
                q_bin /= kept.astype(ftype)[:, None]
            q_bin += uniform.astype(ftype)[:, None]
            q_last = np.where(last > 0, q_bin[:, -1], uniform)
            with np.errstate(divide="ignore", invalid="ignore"):
                np.log(q_bin, out=q_bin)
                q_bin *= g_mass
            plogq = q_bin.sum(axis=1, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                plogq += tail * np.log(q_last.astype(np.float64))
                kl[b0 : b0 + block] = np.where(kept > 0, (plogp - plogq) / total - math.log(total), np.inf)
        return kl


class MinMaxObserver:
    """Running min and max of the finite values seen; exact under streaming and merging."""

    def __init__(self) -> None:
        self.min: float = math.inf
        self.max: float = -math.inf
        self.count: int = 0
        self.n_nonfinite: int = 0

    def update(self, x: ArrayLike) -> None:
        """Observe one batch (any shape)."""
        a = np.asarray(x)
        if a.dtype.kind == "f" and a.size:
            # Fast path: NaN propagates through min/max and ±inf shows in them, so two finite
            # extremes mean every value is finite (exact: float min/max never round).
            lo, hi = float(a.min()), float(a.max())
            if math.isfinite(lo) and math.isfinite(hi):
                self.min, self.max = min(self.min, lo), max(self.max, hi)
                self.count += int(a.size)
                return
        for chunk, bad, lo, hi in _finite_chunks(a):
            self.n_nonfinite += bad
            if chunk.size:
                self.min, self.max = min(self.min, lo), max(self.max, hi)
                self.count += int(chunk.size)

    def update_extremes(self, lo: float, hi: float, count: int) -> None:
        """Observe a batch given only its min, max and size, all values finite (computed elsewhere,
        e.g. inside the model): the same state as ``update`` on the batch itself (min/max are exact)."""
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("update_extremes needs finite extremes; pass the batch to update() instead")
        if count:
            self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
            self.count += int(count)

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        """Fold ``other`` into this observer (in place) and return it."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.n_nonfinite += other.n_nonfinite
        return self

    def mapped(self, f: Callable[[float], float]) -> MinMaxObserver:
        """The observer of ``f(x)`` for every x seen, for an ``f`` that never decreases (ReLU, clip,
        sigmoid …): its min and max are ``f(min)`` and ``f(max)``, with no pass over the values."""
        out = MinMaxObserver()
        if self.count:
            lo, hi = float(f(self.min)), float(f(self.max))
            if not lo <= hi:
                raise ValueError(f"f decreases on [{self.min}, {self.max}]: f(min) = {lo} > f(max) = {hi}")
            out.update_extremes(lo, hi, self.count)
        return out

    def range(self, method: RangeMethod = "minmax", **_: object) -> tuple[float, float]:
        """The observed ``(min, max)``; only ``method='minmax'`` is available here."""
        if method != "minmax":
            raise ValueError(f"MinMaxObserver only supports method='minmax', not {method!r}")
        if self.count == 0:
            raise ValueError("observer has seen no finite value")
        return self.min, self.max


class HistogramObserver(MinMaxObserver):
    """Running min/max plus a zero-anchored power-of-two histogram (see the module docstring)."""

    def __init__(self, bins_per_side: int = 4096, *, feature_axis: int | None = None) -> None:
        super().__init__()
        n = int(bins_per_side)
        if n < 2 or n & (n - 1) or n > 1 << 22:
            raise ValueError(f"bins_per_side must be a power of two in [2, 2^22], got {bins_per_side}")
        self.bins_per_side = n
        # None while every value seen is exactly 0 (they sit in bin 0 = [0, w) for any w).
        self.exponent: int | None = None
        self.counts = np.zeros(2 * n, dtype=np.int64)
        # Exact zeros (padding, ReLU) sit in bin 0 but are exactly representable at any range,
        # so entropy and mse leave them out: they carry no information about the threshold.
        self.n_zero = 0
        # Per-feature floor (module docstring): None until a batch is seen; `feature_axis` None
        # (or an unusable axis) keeps it off.
        self.feature_axis = feature_axis
        self.feature_top: np.ndarray | None = None
        self.feature_bottom: np.ndarray | None = None

    def update_extremes(self, lo: float, hi: float, count: int) -> None:
        """Not available: a histogram needs the values themselves."""
        raise TypeError("HistogramObserver needs the values: use update()")

    # -- state

    @property
    def bin_width(self) -> float:
        """Current bin width ``2^e`` (0.0 while only zeros were seen)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy of ``(counts, edges)``: ``2N`` signed bins and their ``2N + 1`` edges."""
        n = self.bins_per_side
        return self.counts.copy(), np.arange(-n, n + 1, dtype=np.float64) * self.bin_width

    def _exponent_for(self, amax: float) -> int:
        # Smallest e with amax < N * 2^e; frexp gives amax/N = m * 2^e with 0.5 <= m < 1.
        e = math.frexp(amax / self.bins_per_side)[1]
        while math.ldexp(self.bins_per_side, e) <= amax:  # guard against rounding in amax/N
            e += 1
        return e

    def _regrid(self, counts: np.ndarray, e_from: int | None, e_to: int) -> np.ndarray:
        """Counts on grid ``e_from`` re-expressed on the coarser grid ``e_to`` (exact merge)."""
        if e_from is None or e_from == e_to:
            return counts
        n = self.bins_per_side
        # Integer floor division by 2^shift is exact for negative bins too; past 2^62 every
        # bin maps to -1 or 0 anyway, so the shift can be capped.
        shift = min(e_to - e_from, 62)
        new_index = np.floor_divide(np.arange(-n, n, dtype=np.int64), np.int64(1) << shift) + n
        out = np.zeros_like(counts)
        np.add.at(out, new_index, counts)
        return out

    def update(self, x: ArrayLike, *, feature_extremes: tuple[ArrayLike, ArrayLike] | None = None) -> None:
        """Observe one batch (any shape; with ``feature_axis``, axis 0 indexes the samples).

        ``feature_extremes``: the batch's per-sample, per-feature max and min, each of shape
        (samples, features), computed elsewhere (inside the model, where the tensor is at hand);
        without it they are computed here from ``x`` along ``feature_axis``."""
        n = self.bins_per_side
        if self.feature_axis is not None:
            if feature_extremes is None:
                self._observe_features(np.asarray(x))
            else:
                top, bottom = (np.asarray(v) for v in feature_extremes)
                if top.ndim != 2 or top.shape != bottom.shape:
                    raise ValueError(f"feature_extremes must be two (samples, features) arrays, got "
                                     f"{top.shape} and {bottom.shape}")
                if top.shape[0]:
                    self._fold_features(np.fmin.reduce(top, axis=0).astype(np.float64),
                                        np.fmax.reduce(bottom, axis=0).astype(np.float64))
        for chunk, bad, lo, hi in _finite_chunks(x):
            self.n_nonfinite += bad
            if not chunk.size:
                continue
            self.min, self.max = min(self.min, lo), max(self.max, hi)
            self.count += int(chunk.size)
            self.n_zero += int(np.count_nonzero(chunk == 0))
            amax = max(-self.min, self.max)
            if amax > 0:
                e = self._exponent_for(amax)
                if self.exponent is None or e > self.exponent:
                    self.counts = self._regrid(self.counts, self.exponent, e)
                    self.exponent = e
            if self.exponent is None:  # all zeros so far
                self.counts[n] += chunk.size
                continue
            # x * 2^-e is exact, floor gives the bin; |x| < N*2^e keeps it in [-N, N-1]. A product
            # by a normal power of two is the same as ldexp and much faster.
            e = self.exponent
            if -100 <= e <= 100:
                v = chunk * chunk.dtype.type(math.ldexp(1.0, -e))
            else:
                v = np.ldexp(chunk, -e)
            np.floor(v, out=v)
            if e > 0 and lo < 0:
                # A negative value so tiny that x * 2^-e underflows to -0.0 still belongs to bin -1
                # (only a down-scale, e > 0, can underflow).
                v[(v == 0) & (chunk < 0)] = -1.0
            # The shift to [0, 2N) is exact in the float type (integers of at most 24 bits), and
            # cheaper there than on the wider integer copy.
            v += v.dtype.type(n)
            self.counts += np.bincount(v.astype(np.intp), minlength=2 * n)

    def _observe_features(self, a: np.ndarray) -> None:
        """Fold one batch's per-sample, per-feature extremes into ``feature_top``/``feature_bottom``."""
        if a.ndim < 2 or not -a.ndim <= self.feature_axis < a.ndim or self.feature_axis % a.ndim == 0:
            self._drop_features()
            return
        if not a.shape[0] or a.dtype.kind != "f":
            return
        axis = self.feature_axis % a.ndim
        rest = tuple(k for k in range(1, a.ndim) if k != axis)
        # (samples, features); a NaN shows in its sample's entry, which fmin/fmax then skip.
        top = np.fmin.reduce(a.max(axis=rest) if rest else a, axis=0).astype(np.float64)
        bottom = np.fmax.reduce(a.min(axis=rest) if rest else a, axis=0).astype(np.float64)
        self._fold_features(top, bottom)

    def _fold_features(self, top: np.ndarray | None, bottom: np.ndarray | None) -> None:
        if top is None or self.feature_axis is None:
            return
        if self.feature_top is None:
            self.feature_top, self.feature_bottom = top.copy(), bottom.copy()
        elif self.feature_top.shape != top.shape:
            self._drop_features()
        else:
            np.fmin(self.feature_top, top, out=self.feature_top)
            np.fmax(self.feature_bottom, bottom, out=self.feature_bottom)

    def _drop_features(self) -> None:
        self.feature_axis = None
        self.feature_top = self.feature_bottom = None

    def _feature_floor(self) -> tuple[float, float] | None:
        """``(min_c bottom_c, max_c top_c)`` inside the observed finite range, or None."""
        if self.feature_top is None or np.isnan(self.feature_top).all():
            return None
        top = min(float(np.nanmax(self.feature_top)), self.max)
        bottom = max(float(np.nanmin(self.feature_bottom)), self.min)
        return bottom, top

    def merge(self, other: MinMaxObserver) -> HistogramObserver:
        """Fold another HistogramObserver with the same ``bins_per_side`` into this one."""
        if not isinstance(other, HistogramObserver) or other.bins_per_side != self.bins_per_side:
            raise ValueError("can only merge a HistogramObserver with the same bins_per_side")
        if self.feature_axis != other.feature_axis:
            self._drop_features()
        elif self.feature_top is None:
            self.feature_top = None if other.feature_top is None else other.feature_top.copy()
            self.feature_bottom = None if other.feature_bottom is None else other.feature_bottom.copy()
        else:
            self._fold_features(other.feature_top, other.feature_bottom)
        exps = [e for e in (self.exponent, other.exponent) if e is not None]
        e = max(exps) if exps else None
        if e is not None:
            self.counts = self._regrid(self.counts, self.exponent, e) + self._regrid(
                other.counts, other.exponent, e
            )
        else:
            self.counts = self.counts + other.counts
        self.exponent = e
        self.n_zero += other.n_zero
        super().merge(other)
        return self

    # -- ranges

    def range(
        self,
        method: RangeMethod = "minmax",
        *,
        percentile: float = 99.99,
        symmetric: bool = True,
        dtype: str = "int8",
    ) -> tuple[float, float]:
        """Real range ``(lo, hi)`` by ``method``; ``dtype`` sets the levels for entropy/mse."""
        if self.count == 0:
            raise ValueError("observer has seen no finite value")
        if method == "minmax" or self.exponent is None:  # all-zero data: nothing to clip
            if method not in ("minmax", "percentile", "entropy", "mse"):
                raise ValueError(f"unknown range method {method!r}")
            return self.min, self.max
        qmin, qmax = qrange(dtype)
        levels = qmax - qmin + 1
        if method == "percentile":
            if not 0.0 < percentile <= 100.0:
                raise ValueError(f"percentile must be in (0, 100], got {percentile}")
            clipped = self._percentile_range(percentile, symmetric)
        elif method == "entropy":
            if symmetric:
                clipped = self._clip_symmetric(self._kl_threshold(self._folded(False), levels // 2))
            else:
                clipped = self._entropy_asymmetric(levels)
        elif method == "mse":
            if symmetric:
                clipped = self._clip_symmetric(self._mse_symmetric(symmetric_steps(dtype)))
            else:
                clipped = self._mse_asymmetric(levels - 1)
        else:
            raise ValueError(f"unknown range method {method!r}")
        floor = self._feature_floor()
        if floor is None:
            return clipped
        lo, hi = clipped
        if symmetric:
            return self._clip_symmetric(max(-lo, hi, -floor[0], floor[1]))
        return min(lo, floor[0]), max(hi, floor[1])

    def _clip_symmetric(self, t: float) -> tuple[float, float]:
        return max(self.min, -t), min(self.max, t)

    def _halves(self, with_zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """|x| histograms of the positive side and of the negative side, bin j = [j·w, (j+1)·w)."""
        n = self.bins_per_side
        pos = self.counts[n:].copy()
        if not with_zeros:
            pos[0] -= self.n_zero
        # Negative bin -j-1 holds x in [-(j+1)w, -jw), i.e. |x| in (jw, (j+1)w]: fold onto bin j.
        return pos, self.counts[:n][::-1].copy()

    def _folded(self, with_zeros: bool = True) -> np.ndarray:
        pos, neg = self._halves(with_zeros)
        return pos + neg

    def _trim(self, h: np.ndarray) -> np.ndarray:
        nz = np.flatnonzero(h)
        return h[: nz[-1] + 1] if nz.size else h[:0]

    # percentile

    def _upper_quantile(self, h: np.ndarray, tail: float) -> float:
        """Point of an |x|-style histogram (bins from 0) with mass ``tail`` above it."""
        cum = np.cumsum(h, dtype=np.float64)
        target = cum[-1] - tail
        if target <= 0:
            return 0.0
        j = int(np.searchsorted(cum, target, side="left"))
        before = cum[j - 1] if j else 0.0
        frac = (target - before) / h[j] if h[j] else 0.0
        return (j + frac) * self.bin_width

    def _percentile_range(self, p: float, symmetric: bool) -> tuple[float, float]:
        tail = (100.0 - p) / 100.0 * self.count
        if symmetric:
            return self._clip_symmetric(self._upper_quantile(self._folded(), tail))
        pos, neg = self._halves()
        if self.min >= 0 or self.max <= 0:  # one-sided: the whole tail on the populated side
            tail_pos = tail if self.max > 0 else 0.0
            tail_neg = tail - tail_pos
        else:
            tail_pos = tail_neg = tail / 2
        hi = min(self.max, self._upper_quantile(pos, tail_pos)) if self.max > 0 else self.max
        lo = max(self.min, -self._upper_quantile(neg, tail_neg)) if self.min < 0 else self.min
        return lo, hi

    # entropy

    def _kl_threshold(self, hist: np.ndarray, levels: int) -> float:
        """Threshold minimizing KL(P‖Q) for an |x| histogram quantized to ``levels`` levels.

        Every candidate ``i`` (bins kept) from ``levels`` to ``n`` is scored at once from prefix
        sums: Q is constant over the non-empty bins of each group, so KL needs only the group
        masses and non-empty counts, O(levels) per candidate instead of O(n).

        Two rounds, with the same answer as scoring every candidate in float64: a float32 screen
        scores all of them (the group terms, the bulk of the work), then only the candidates
        within twice the screen's error bound of its minimum are scored again in float64, and
        the winner is picked among those. A candidate outside that window is worse than the
        float64 minimum by more than the tie tolerance, so it could not have won.
        """
        h = self._trim(hist).astype(np.float64)
        width = self.bin_width
        n = h.size
        m = levels
        if n <= m:  # the grid is already finer than the histogram: clipping cannot help
            return n * width
        candidates = np.arange(m, n + 1)  # how many bins are kept
        scores = _KLScores(h, m)
        rough = scores(candidates, exact=False)
        finite = np.isfinite(rough)
        if finite.any():
            lo = rough[finite].min()
            near = candidates[rough <= lo + 2.0 * scores.screen_error + 1e-12]
        else:
            near = candidates
        kl = scores(near, exact=True)
        # Ties (within rounding) keep the larger threshold: clip no more than needed.
        best = near[np.flatnonzero(kl <= kl.min() + 1e-12)[-1]]
        return float(best) * width

    def _entropy_asymmetric(self, levels: int) -> tuple[float, float]:
        pos, neg = self._halves(with_zeros=False)
        if self.min >= 0:
            return self.min, min(self.max, self._kl_threshold(pos, levels))
        if self.max <= 0:
            return max(self.min, -self._kl_threshold(neg, levels)), self.max
        half = levels // 2
        return (
            max(self.min, -self._kl_threshold(neg, half)),
            min(self.max, self._kl_threshold(pos, half)),
        )

    # mse

    @staticmethod
    def _clip_costs(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For an |x| histogram in bin units (centres j + 0.5), clipping at edge t = 0..n:
        the squared clip error sum_{j>=t} h_j (c_j - t)^2 and the clipped count sum_{j>=t} h_j."""
        n = h.size
        c = np.arange(n, dtype=np.float64) + 0.5

        def suffix(v: np.ndarray) -> np.ndarray:
            return np.concatenate([np.cumsum(v[::-1])[::-1], [0.0]])

        s0, s1, s2 = suffix(h), suffix(h * c), suffix(h * c * c)
        t = np.arange(n + 1, dtype=np.float64)
        cost = np.maximum(s2 - 2.0 * t * s1 + t * t * s0, 0.0)
        return cost, s0

    def _mse_symmetric(self, steps: int) -> float:
        h = self._trim(self._folded(False)).astype(np.float64)
        w = self.bin_width
        cost, clipped = self._clip_costs(h)
        t = np.arange(h.size + 1, dtype=np.float64)
        inside = h.sum() - clipped
        mse = cost + inside * (t / steps) ** 2 / 12.0  # in bin units squared
        mse[0] = math.inf  # T = 0 is not a scale
        k = int(np.argmin(mse))
        return k * w

    def _mse_asymmetric(self, steps: int) -> tuple[float, float]:
        pos, neg = self._halves(with_zeros=False)
        hp = self._trim(pos).astype(np.float64) if self.max > 0 else np.zeros(0)
        hn = self._trim(neg).astype(np.float64) if self.min < 0 else np.zeros(0)
        cost_p, out_p = self._clip_costs(hp)
        cost_n, out_n = self._clip_costs(hn)
        total = hp.sum() + hn.sum()
        tp = np.arange(hp.size + 1, dtype=np.float64)
        tn = np.arange(hn.size + 1, dtype=np.float64)

        def score(i_n: np.ndarray, i_p: np.ndarray) -> np.ndarray:
            """MSE (bin units) of the range [-tn[i_n], tp[i_p]] for an outer grid of indices."""
            a, b = i_n[:, None], i_p[None, :]
            width = tn[a] + tp[b]
            inside = total - out_n[a] - out_p[b]
            m = cost_n[a] + cost_p[b] + inside * (width / steps) ** 2 / 12.0
            return np.where(width > 0, m, math.inf)

        def grid(size: int) -> np.ndarray:
            return np.unique(
                np.linspace(0, size, min(size + 1, _MSE_GRID)).round().astype(np.int64)
            )

        gn, gp = grid(hn.size), grid(hp.size)
        s = score(gn, gp)
        a, b = np.unravel_index(int(np.argmin(s)), s.shape)
        bn, bp = int(gn[a]), int(gp[b])
        # Refine at full resolution between the neighbouring coarse candidates.
        rn = np.arange(int(gn[max(a - 1, 0)]), int(gn[min(a + 1, gn.size - 1)]) + 1)
        rp = np.arange(int(gp[max(b - 1, 0)]), int(gp[min(b + 1, gp.size - 1)]) + 1)
        s = score(rn, rp)
        a, b = np.unravel_index(int(np.argmin(s)), s.shape)
        bn, bp = int(rn[a]), int(rp[b])
        w = self.bin_width
        lo = max(self.min, -bn * w) if self.min < 0 else self.min
        hi = min(self.max, bp * w) if self.max > 0 else self.max
        return lo, hi
