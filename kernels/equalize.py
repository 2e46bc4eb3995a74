"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): numbers only.

Two layers with a positively homogeneous map between them (``f(s·z) = s·f(z)`` for s > 0,
elementwise: identity, Relu, LeakyRelu, PRelu, max/average pooling)::

    y = W2 · f(W1 · x + b1) + b2

compute the same function for any per-channel s > 0 of the middle tensor when

    W1' = diag(1/s) · W1,   b1' = b1 / s,   W2' = W2 · diag(s).

The choice of s: with ``r1_c = max|W1[c, …]|`` (the range of output channel c of the first layer)
and ``r2_c = max|W2[…, c, …]|`` (the range of every weight of the second layer that reads channel
c), ``s_c = sqrt(r1_c / r2_c)`` makes both ranges ``sqrt(r1_c · r2_c)``: the per-channel ranges of
each pair become equal, which is what maximises the product of their precisions per tensor
(the paper's section 4.1). A channel where either range is 0, or below `DEAD_RANGE` of its
layer's widest, keeps s = 1. A layer inside a chain (second of one pair and first of the next)
is rebalanced by both pairs: the pairs are swept in turn until every scale of a sweep is within
`tol` of 1 (or `max_sweeps`).

Weights are in the canonical layout ``(O, I/groups, *kernel)`` (a Conv's; a Gemm's is ``(O, I)``
with groups 1): input channel ``c`` of a grouped layer is ``(group c // (I/g), slot c % (I/g))``
and is read by the output channels of that group only. Exact in real arithmetic; the float32
result differs from the original by rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EqLayer:
    """One layer's weight ``(O, I/groups, *kernel)`` and bias ``(O,)`` (or None), in float64."""

    weight: np.ndarray
    groups: int = 1
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, np.float64)
        if self.bias is not None:
            self.bias = np.asarray(self.bias, np.float64).reshape(-1)
        o = self.weight.shape[0]
        if self.weight.ndim < 2 or self.groups < 1 or o % self.groups:
            raise ValueError(f"weight {self.weight.shape} does not split into {self.groups} groups")
        if self.bias is not None and self.bias.shape != (o,):
            raise ValueError(f"bias {self.bias.shape} is not ({o},)")

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def _grouped(self) -> np.ndarray:
        """The weight as (groups, O/g, I/g, rest)."""
        w = self.weight
        g = self.groups
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1)

    def output_ranges(self) -> np.ndarray:
        return np.max(np.abs(self.weight.reshape(self.weight.shape[0], -1)), axis=1)

    def input_ranges(self) -> np.ndarray:
        return np.max(np.abs(self._grouped()), axis=(1, 3)).reshape(-1)

    def scale_outputs(self, inv: np.ndarray) -> None:
        """Output channel c times inv[c] (weight and bias)."""
        self.weight = self.weight * inv.reshape((-1,) + (1,) * (self.weight.ndim - 1))
        if self.bias is not None:
            self.bias = self.bias * inv

    def scale_inputs(self, s: np.ndarray) -> None:
        """Every weight reading input channel c times s[c]."""
        g = self.groups
        grouped = self._grouped() * s.reshape(g, 1, -1, 1)
        self.weight = grouped.reshape(self.weight.shape)


# A channel whose range is below this share of its layer's widest keeps s = 1: its weights are
# (near) zero, and a huge s would blow its bias, and with it the middle tensor's range, up.
DEAD_RANGE = 1e-6


def pair_scales(first: EqLayer, second: EqLayer) -> np.ndarray:
    """``s_c = sqrt(r1_c / r2_c)`` for the tensor between `first` and `second` (1 where a range is
    0 or below `DEAD_RANGE` of its layer's widest)."""
    r1, r2 = first.output_ranges(), second.input_ranges()
    if r1.shape != r2.shape:
        raise ValueError(f"{r1.size} output channels feed {r2.size} input channels")
    s = np.ones_like(r1)
    ok = (r1 > DEAD_RANGE * r1.max(initial=0.0)) & (r2 > DEAD_RANGE * r2.max(initial=0.0)) & (r1 > 0) & (r2 > 0)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return s


@dataclass
class Equalized:
    """The rebalanced layers, the total scale of each pair's middle tensor, and the sweeps taken."""

    layers: list[EqLayer]
    scales: list[np.ndarray] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = True


def equalize(layers: list[EqLayer], pairs: list[tuple[int, int]], *, tol: float = 1e-4,
             max_sweeps: int = 100) -> Equalized:
    """Rebalance `layers` (copies; the inputs are left as they are) over `pairs` (first, second),
    sweeping the pairs in order until no scale of a sweep is farther than `tol` from 1 (relative).

    The middle tensor of pair k is divided by ``scales[k]`` (channel by channel) in the result."""
    out = [EqLayer(lay.weight.copy(), lay.groups, None if lay.bias is None else lay.bias.copy()) for lay in layers]
    total = [np.ones(out[a].out_channels) for a, _ in pairs]
    sweeps, converged = 0, not pairs
    while pairs and sweeps < max_sweeps:
        sweeps += 1
        worst = 0.0
        for k, (a, b) in enumerate(pairs):
            s = pair_scales(out[a], out[b])
            out[a].scale_outputs(1.0 / s)
            out[b].scale_inputs(s)
            total[k] *= s
            worst = max(worst, float(np.max(np.abs(s - 1.0))))
        if worst <= tol:
            converged = True
            break
    return Equalized(out, total, sweeps, converged)


def range_spread(ranges: np.ndarray) -> float:
    """max / min of the non-zero per-channel ranges (1 is perfectly even): what per-tensor
    quantization of the channels pays for (a step set by the widest channel)."""
    r = ranges[ranges > 0]
    return float(r.max() / r.min()) if r.size else 1.0
