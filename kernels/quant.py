"""Affine, binary and ternary quantization of arrays: numbers in, numbers out (numpy only).

Semantics follow ONNX ``QuantizeLinear`` / ``DequantizeLinear`` (opset 21+ for blocks and 4-bit,
opset 25 for 2-bit) bit for bit, so a pass can store what ``quantize`` returns and onnxruntime
will dequantize it to exactly what ``dequantize`` returns here:

- quantize:   ``q = saturate(round_half_even(x / s) + z)``, the division in float32;
- dequantize: ``x̂ = (q − z) · s``, the product in float32.

Integer types and their saturation ranges (``DTYPE_RANGES``): int8 [−128, 127], uint8 [0, 255],
int4 [−8, 7], uint4 [0, 15], int2 [−2, 1], uint2 [0, 3]. Codes are held unpacked, one per byte
(``np.int8`` for the signed types, ``np.uint8`` for the unsigned ones); ``pack_int4`` /
``pack_int2`` give the bytes ONNX stores for INT4/UINT4 and INT2/UINT2 tensors.

Granularity is given by the scale's shape, exactly as in ONNX (``QuantParams``):

- per tensor: ``axis=None, block_size=None``, scale is a 0-d array;
- per axis:   ``axis=a, block_size=None``, scale is 1-D of length ``x.shape[a]``;
- blocked:    ``axis=a, block_size=B``, scale has ``x``'s shape except ``ceil(x.shape[a] / B)``
  on axis ``a``; element ``i`` along ``a`` uses scale index ``i // B`` (the last block may be short).

Choosing parameters (``compute_params``), with ``[qmin, qmax]`` the dtype range and ``L`` levels:

- the real range is always widened to include 0, so 0.0 quantizes to ``z`` and comes back exactly
  (zero padding, ReLU zeros and pruned weights stay exactly zero);
- symmetric: a *narrow* grid with the same number of steps on both sides of zero,
  ``k = L/2 − 1`` steps (127 for 8 bits, 7 for 4 bits, 1 for 2 bits), ``s = max|x| / k``. Signed
  types use ``z = 0`` (so the code −2^(b−1) is never produced). **Unsigned types use
  ``z = 2^(b−1)``** (128 for uint8, as onnxruntime does), and the top code ``2^b − 1`` is then
  ``z + k``: both ``±max|x|`` are representable;
- asymmetric: ``s = (hi − lo) / (qmax − qmin)``, ``z = round_half_even(qmin − lo / s)`` clipped to
  the range. Rounding ``z`` shifts the grid by at most ``s/2``, so every value of ``[lo, hi]`` is
  still within ``s/2`` of a grid point;
- a scale is never zero: an all-zero tensor/channel/block gets ``min_scale`` (default 1e-12, tiny
  but far from float32 underflow so products with other scales stay normal). Zeros still
  round-trip exactly because ``0 / s = 0`` for any ``s > 0``; a scale raised to ``min_scale``
  never causes saturation, only a coarser grid where the data is below ``min_scale`` anyway.
- Non-finite data (NaN, ±inf) is refused with ``ValueError``: a quantization range cannot
  contain it, and the caller (a pass) should skip such a tensor with that reason.

Error bound: for every ``x`` inside the calibrated range, ``|dequantize(quantize(x)) − x| ≤ s/2``
(up to float32 rounding of the division, a few ulp). Values outside saturate.

Rounding that follows the data (``gptq_quantize``, GPTQ / Optimal Brain Quantization): the grid
(``QuantParams``) is kept, but the codes of a matrix weight are chosen one input column at a
time, each column's rounding error spread over the columns not yet quantized through the inverse
of ``H = E[x xᵀ]`` (the layer's input second moment, damped by ``damp·mean(diag H)``), which
greedily minimizes the layer's output error ``E‖x(W − Ŵ)‖²`` instead of each weight's own error.
With ``H`` a multiple of the identity it is round-to-nearest exactly.

Binary and ternary weights (stored as int2 codes with a per-channel scale, ``dtype='int2'``):

- ``binary_weights``: ``w_b = α·sign(w)``, ``α = mean|w|`` per output channel, ``sign(0) = +1``;
- ``ternary_weights`` (TWN): ``Δ = 0.7·mean|w|`` per output channel, code ``sign(w)`` where
  ``|w| > Δ`` else 0, ``α`` = mean of ``|w|`` over the weights above Δ (the L2-optimal single
  magnitude for that support).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DTYPE_RANGES",
    "MIN_SCALE",
    "QuantDType",
    "QuantParams",
    "binary_weights",
    "blockwise_params",
    "chained_target",
    "compute_params",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "pack_int2",
    "pack_int4",
    "qrange",
    "quantize",
    "storage_dtype",
    "symmetric_steps",
    "ternary_weights",
    "unpack_int2",
    "unpack_int4",
]

QuantDType = Literal["int8", "uint8", "int4", "uint4", "int2", "uint2"]

DTYPE_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int2": (-2, 1),
    "uint2": (0, 3),
}

MIN_SCALE = 1e-12


def qrange(dtype: str) -> tuple[int, int]:
    """``(qmin, qmax)``: the saturation range of an integer quantized type."""
    try:
        return DTYPE_RANGES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown quantized dtype {dtype!r}; expected one of {sorted(DTYPE_RANGES)}"
        ) from None


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds unpacked codes and zero points of ``dtype``."""
    qmin, _ = qrange(dtype)
    return np.dtype(np.int8) if qmin < 0 else np.dtype(np.uint8)


def symmetric_steps(dtype: str) -> int:
    """Grid steps on each side of zero for symmetric quantization (127, 7 or 1)."""
    qmin, qmax = qrange(dtype)
    return (qmax - qmin + 1) // 2 - 1


def _symmetric_zero_point(dtype: str) -> int:
    qmin, qmax = qrange(dtype)
    # Signed: 0. Unsigned: the middle code 2^(b-1) (128 for uint8), so z + k == qmax - 0 and
    # z - k == 1: the grid is the signed narrow grid shifted up.
    return 0 if qmin < 0 else (qmax + 1) // 2


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale and zero point of one quantized tensor, laid out as the ONNX scale input.

    ``scale`` is float32 and strictly positive; ``zero_point`` has the same shape and holds
    codes in ``storage_dtype(dtype)``. ``axis`` is ``None`` for per-tensor; ``block_size`` is
    ``None`` unless blocked. Both arrays are copied and made read-only.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        qmin, qmax = qrange(self.dtype)
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point)
        if zp.shape != scale.shape:
            raise ValueError(f"zero_point shape {zp.shape} differs from scale shape {scale.shape}")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError("scale must be finite and strictly positive")
        if zp.size and (zp.min() < qmin or zp.max() > qmax):
            raise ValueError(f"zero_point outside the {self.dtype} range [{qmin}, {qmax}]")
        if self.axis is None:
            if self.block_size is not None:
                raise ValueError("block_size needs an axis")
            if scale.size != 1:
                raise ValueError(f"per-tensor scale must have one element, got shape {scale.shape}")
            scale, zp = scale.reshape(()), zp.reshape(())
        elif self.block_size is None:
            if scale.ndim != 1:
                raise ValueError(f"per-axis scale must be 1-D, got shape {scale.shape}")
        elif int(self.block_size) < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        object.__setattr__(self, "scale", _readonly(scale))
        object.__setattr__(self, "zero_point", _readonly(zp.astype(storage_dtype(self.dtype))))

    @property
    def granularity(self) -> Literal["tensor", "axis", "block"]:
        """'tensor', 'axis' or 'block'."""
        if self.axis is None:
            return "tensor"
        return "axis" if self.block_size is None else "block"

    @property
    def symmetric(self) -> bool:
        """True when every zero point is the symmetric one (0, or 2^(b-1) for unsigned)."""
        return bool(np.all(self.zero_point.astype(np.int32) == _symmetric_zero_point(self.dtype)))


# --------------------------------------------------------------------------- parameters


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D tensor")
    return axis % ndim


def _reduce_range(
    x: np.ndarray, axis: int | None, block_size: int | None
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Per-granularity (min(x, 0), max(x, 0)) in the ONNX scale layout, and the normalized axis."""
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values (NaN or inf)")
    # initial=0 both includes 0 in every range and makes empty reductions well defined.
    if axis is None:
        return np.min(x, initial=0.0), np.max(x, initial=0.0), None
    if x.ndim == 0:
        raise ValueError("per-axis or blocked quantization needs at least a 1-D tensor")
    a = _normalize_axis(axis, x.ndim)
    if block_size is None:
        others = tuple(i for i in range(x.ndim) if i != a)
        return np.min(x, axis=others, initial=0.0), np.max(x, axis=others, initial=0.0), a
    b = int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    d = x.shape[a]
    nb = -(-d // b)
    if nb * b != d:
        # Zero padding never changes a range that already includes 0.
        pad = [(0, 0)] * x.ndim
        pad[a] = (0, nb * b - d)
        x = np.pad(x, pad)
    blocks = x.reshape(x.shape[:a] + (nb, b) + x.shape[a + 1 :])
    return np.min(blocks, axis=a + 1, initial=0.0), np.max(blocks, axis=a + 1, initial=0.0), a


def _params_from_range(
    lo: np.ndarray, hi: np.ndarray, dtype: str, symmetric: bool, min_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    qmin, qmax = qrange(dtype)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("quantization range must be finite")
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / symmetric_steps(dtype), min_scale).astype(np.float32)
        zp = np.full(scale.shape, _symmetric_zero_point(dtype), dtype=np.int64)
    else:
        scale = np.maximum((hi - lo) / (qmax - qmin), min_scale).astype(np.float32)
        # The zero point uses the float32 scale that will actually be stored.
        zp = np.clip(np.rint(qmin - lo / scale.astype(np.float64)), qmin, qmax).astype(np.int64)
    return scale, zp


def compute_params(
    data: ArrayLike | tuple[ArrayLike, ArrayLike],
    dtype: QuantDType = "int8",
    *,
    symmetric: bool = True,
    axis: int | None = None,
    block_size: int | None = None,
    min_scale: float = MIN_SCALE,
) -> QuantParams:
    """Scale and zero point for ``data`` (an array) or for a given range ``(lo, hi)``.

    A *tuple* is read as ``(lo, hi)``, scalars for per-tensor or arrays already in the scale
    layout (1-D for per-axis, blocked shape for blocks); anything else is the data itself. The
    range is widened to include 0. See the module docstring for the formulas.
    """
    if min_scale <= 0:
        raise ValueError("min_scale must be positive")
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError("a range is a (lo, hi) pair")
        lo, hi = np.asarray(data[0], dtype=np.float64), np.asarray(data[1], dtype=np.float64)
        lo, hi = np.broadcast_arrays(lo, hi)
        if np.any(lo > hi):
            raise ValueError("range has lo > hi")
        a = axis
        if axis is None and lo.size != 1:
            raise ValueError("a per-tensor range must be two scalars")
        if axis is not None and block_size is None and lo.ndim != 1:
            raise ValueError("a per-axis range must be two 1-D arrays")
        if axis is not None and axis < 0 and block_size is not None:
            a = _normalize_axis(axis, lo.ndim)
    else:
        x = np.asarray(data)
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"cannot quantize an array of dtype {x.dtype}")
        lo, hi, a = _reduce_range(x.astype(np.float64, copy=False), axis, block_size)
    scale, zp = _params_from_range(lo, hi, dtype, symmetric, min_scale)
    return QuantParams(scale=scale, zero_point=zp, dtype=dtype, axis=a, block_size=block_size)


def blockwise_params(
    w: ArrayLike,
    block_size: int,
    axis: int,
    dtype: QuantDType = "int4",
    *,
    symmetric: bool = True,
    min_scale: float = MIN_SCALE,
) -> QuantParams:
    """Block-wise params for weight-only quantization (default int4, symmetric).

    For a MatMul ``Y = X @ W`` with ``W`` of shape ``(K, N)``, block along the reduction axis
    (``axis=0``): each output column gets ``ceil(K / block_size)`` scales.
    """
    return compute_params(
        w, dtype, symmetric=symmetric, axis=axis, block_size=block_size, min_scale=min_scale
    )


# --------------------------------------------------------------------------- (de)quantize


def _broadcast(params: QuantParams, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int32) broadcastable against an array of ``shape``."""
    scale = params.scale
    zp = params.zero_point.astype(np.int32)
    if params.axis is None:
        return scale, zp
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("per-axis or blocked params need at least a 1-D tensor")
    a = _normalize_axis(params.axis, ndim)
    d = shape[a]
    if params.block_size is None:
        if scale.shape != (d,):
            raise ValueError(f"per-axis scale has shape {scale.shape}, axis {a} has length {d}")
        view = [1] * ndim
        view[a] = d
        return scale.reshape(view), zp.reshape(view)
    b = int(params.block_size)
    want = shape[:a] + (-(-d // b),) + shape[a + 1 :]
    if scale.shape != want:
        raise ValueError(f"blocked scale has shape {scale.shape}, expected {want} for x {shape}")
    index = np.arange(d) // b
    return np.take(scale, index, axis=a), np.take(zp, index, axis=a)


def quantize(x: ArrayLike, params: QuantParams) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / s) + z)``, codes unpacked one per byte.

    NaN has no integer code; it is mapped to the zero point (i.e. treated as 0.0).
    """
    qmin, qmax = qrange(params.dtype)
    xf = np.asarray(x, dtype=np.float32)
    scale, zp = _broadcast(params, xf.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.rint(xf / scale)  # float32 division then ties-to-even, as onnxruntime does
    v = np.nan_to_num(v, nan=0.0)
    # Clip in float before the integer cast so ±inf and huge values saturate cleanly.
    q = np.clip(v.astype(np.float64) + zp, qmin, qmax)
    return q.astype(storage_dtype(params.dtype))


def dequantize(q: ArrayLike, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q − z) · s`` in float32."""
    qa = np.asarray(q)
    if not np.issubdtype(qa.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {qa.dtype}")
    scale, zp = _broadcast(params, qa.shape)
    return (qa.astype(np.int32) - zp).astype(np.float32) * scale


def fake_quantize(x: ArrayLike, params: QuantParams) -> np.ndarray:
    """``dequantize(quantize(x))``: what the QDQ pair computes at run time.

    Per tensor (one scale) the same arithmetic runs in float32 in place, without the integer
    array: the codes are integers below 2^24, exact in float32, so the result is identical.
    """
    xa = np.asarray(x)
    if params.axis is not None or params.block_size is not None or np.size(params.scale) != 1:
        return dequantize(quantize(xa, params), params)
    qmin, qmax = qrange(params.dtype)
    s = np.float32(np.asarray(params.scale).reshape(()))
    z = float(np.asarray(params.zero_point).reshape(()))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        xf = np.asarray(xa, dtype=np.float32)  # float32 division then ties-to-even, as quantize()
        v = np.divide(xf, s, out=np.empty(xf.shape, np.float32))
        np.rint(v, out=v)
        v += np.float32(z)
        np.clip(v, qmin, qmax, out=v)
    nan = np.isnan(v)
    if nan.any():  # NaN has no code: quantize() maps it to the zero point, i.e. 0.0
        v[nan] = z
    v -= np.float32(z)
    v *= s
    return v


# --------------------------------------------------------------------------- binary / ternary


def _channel_view(w: ArrayLike, axis: int) -> tuple[np.ndarray, int, tuple[int, ...]]:
    wf = np.asarray(w, dtype=np.float64)
    if wf.ndim == 0:
        raise ValueError("binary/ternary weights need at least a 1-D tensor")
    if not np.all(np.isfinite(wf)):
        raise ValueError("cannot quantize non-finite weights (NaN or inf)")
    a = _normalize_axis(axis, wf.ndim)
    others = tuple(i for i in range(wf.ndim) if i != a)
    return wf, a, others


def _int2_channel_params(alpha: np.ndarray, axis: int, min_scale: float) -> QuantParams:
    scale = np.maximum(alpha, min_scale).astype(np.float32)
    return QuantParams(
        scale=scale, zero_point=np.zeros(scale.shape, np.int8), dtype="int2", axis=axis
    )


def binary_weights(
    w: ArrayLike, axis: int = 0, *, min_scale: float = MIN_SCALE
) -> tuple[np.ndarray, QuantParams]:
    """Binary weights ``α·sign(w)`` with ``α = mean|w|`` per channel along ``axis``.

    Returns int8 codes in {−1, +1} (``sign(0) = +1``) and int2 per-axis params, so
    ``dequantize(codes, params) == α·code`` (up to the float32 cast of α).
    """
    wf, a, others = _channel_view(w, axis)
    alpha = np.mean(np.abs(wf), axis=others) if wf.size else np.zeros(wf.shape[a])
    codes = np.where(wf >= 0, 1, -1).astype(np.int8)
    return codes, _int2_channel_params(alpha, a, min_scale)


def ternary_weights(
    w: ArrayLike, axis: int = 0, *, threshold_ratio: float = 0.7, min_scale: float = MIN_SCALE
) -> tuple[np.ndarray, QuantParams]:
    """Ternary weights (TWN) per channel along ``axis``.

    ``Δ = threshold_ratio · mean|w|``; code = ``sign(w)`` where ``|w| > Δ``, else 0;
    ``α = mean(|w| : |w| > Δ)``. Returns int8 codes in {−1, 0, 1} and int2 per-axis params.
    An all-zero channel gets all-zero codes and ``min_scale``.
    """
    wf, a, others = _channel_view(w, axis)
    view = [1] * wf.ndim
    view[a] = wf.shape[a]
    absw = np.abs(wf)
    mean_abs = np.mean(absw, axis=others) if wf.size else np.zeros(wf.shape[a])
    delta = (threshold_ratio * mean_abs).reshape(view)
    keep = absw > delta
    count = np.sum(keep, axis=others)
    total = np.sum(np.where(keep, absw, 0.0), axis=others)
    alpha = total / np.maximum(count, 1)
    codes = (np.sign(wf) * keep).astype(np.int8)
    return codes, _int2_channel_params(alpha, a, min_scale)


# --------------------------------------------------------------------------- packing


def _pack_bits(codes: ArrayLike, bits: int) -> np.ndarray:
    c = np.asarray(codes)
    if c.size and not np.issubdtype(c.dtype, np.integer) and not np.all(c == np.round(c)):
        raise ValueError("codes must be integers")
    c = np.asarray(c, dtype=np.int64).ravel()
    lo, hi = -(1 << (bits - 1)), (1 << bits) - 1  # accept either the signed or the unsigned range
    if c.size and (c.min() < lo or c.max() > hi):
        raise ValueError(f"codes outside [{lo}, {hi}] cannot be stored in {bits} bits")
    per_byte = 8 // bits
    n_bytes = -(-c.size // per_byte)
    fields = np.zeros(n_bytes * per_byte, dtype=np.uint8)  # padding fields are 0
    fields[: c.size] = c & ((1 << bits) - 1)  # two's complement low bits
    fields = fields.reshape(n_bytes, per_byte)
    out = np.zeros(n_bytes, dtype=np.uint8)
    for j in range(per_byte):
        out |= fields[:, j] << np.uint8(bits * j)  # element j of a byte sits at bit bits*j
    return out


def _unpack_bits(
    packed: ArrayLike, count: int | Sequence[int], bits: int, signed: bool
) -> np.ndarray:
    shape = (int(count),) if np.ndim(count) == 0 else tuple(int(d) for d in count)  # type: ignore[arg-type]
    n = math.prod(shape)
    p = np.asarray(packed, dtype=np.uint8).ravel()
    per_byte = 8 // bits
    if p.size != -(-n // per_byte):
        raise ValueError(f"{p.size} bytes cannot hold exactly {n} {bits}-bit codes")
    mask = np.uint8((1 << bits) - 1)
    fields = np.stack([(p >> np.uint8(bits * j)) & mask for j in range(per_byte)], axis=1)
    u = fields.ravel()[:n]
    if not signed:
        return u.astype(np.uint8).reshape(shape)
    half = 1 << (bits - 1)
    return (u.astype(np.int16) - ((u >= half) << bits)).astype(np.int8).reshape(shape)


def pack_int4(codes: ArrayLike) -> np.ndarray:
    """Pack 4-bit codes (int4 or uint4 range) two per byte, as ONNX stores INT4/UINT4.

    The array is flattened in C order; element ``2i`` goes to the low nibble of byte ``i``,
    element ``2i+1`` to the high nibble; an odd count leaves the last high nibble 0.
    """
    return _pack_bits(codes, 4)


def unpack_int4(
    packed: ArrayLike, count: int | Sequence[int], *, signed: bool = True
) -> np.ndarray:
    """Inverse of ``pack_int4``: ``count`` codes (or an array of shape ``count``).

    ``signed=True`` sign-extends to int8 [−8, 7]; ``False`` gives uint8 [0, 15].
    """
    return _unpack_bits(packed, count, 4, signed)


def pack_int2(codes: ArrayLike) -> np.ndarray:
    """Pack 2-bit codes (int2 or uint2 range) four per byte, as ONNX stores INT2/UINT2.

    Flattened in C order; element ``4i + j`` occupies bits ``2j..2j+1`` of byte ``i`` (the first
    element in the lowest bits); missing trailing fields are 0.
    """
    return _pack_bits(codes, 2)


def unpack_int2(
    packed: ArrayLike, count: int | Sequence[int], *, signed: bool = True
) -> np.ndarray:
    """Inverse of ``pack_int2``; ``signed=True`` gives int8 in [−2, 1], else uint8 in [0, 3]."""
    return _unpack_bits(packed, count, 2, signed)


# --------------------------------------------------------------------------- data-aware rounding


def gptq_quantize(w: ArrayLike, params: QuantParams, hessian: ArrayLike, in_axis: int, *, damp: float = 0.01,
                  block: int = 128, limits: tuple[int, int] | None = None) -> np.ndarray:
    """Codes of the 2-D weight ``w`` on the grid of ``params`` (any granularity), chosen column by
    column along ``in_axis`` (the axis the layer contracts with its input) with GPTQ's error
    feedback through ``hessian`` (``E[x xᵀ]`` over the input features). Input features the data
    never excites (zero diagonal) take no feedback and keep nearest rounding. ``limits``: the
    codes allowed (default the dtype's range; a symmetric or 7-bit grid passes its own, since
    the feedback can push a code past the largest one nearest rounding makes). float64 inside."""
    a = np.asarray(w, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"gptq_quantize takes a 2-D weight, got shape {a.shape}")
    in_axis = _normalize_axis(in_axis, 2)
    h = np.array(hessian, dtype=np.float64)
    n = a.shape[in_axis]
    if h.shape != (n, n):
        raise ValueError(f"hessian must be {n}×{n} for the input axis of a {a.shape} weight, got {h.shape}")
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(h)):
        raise ValueError("weight and hessian must be finite")
    qmin, qmax = limits if limits is not None else qrange(params.dtype)
    scale, zp = (np.broadcast_to(v, a.shape).astype(np.float64) for v in _broadcast(params, a.shape))
    if in_axis == 0:  # work on (outputs, inputs)
        a, scale, zp = a.T, scale.T, zp.T
    W = a.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(n)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.empty(W.shape, dtype=np.float64)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        part = W[:, i1:i2].copy()
        errors = np.zeros_like(part)
        hinv = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            q = np.clip(np.rint(part[:, i] / scale[:, col]) + zp[:, col], qmin, qmax)
            codes[:, col] = q
            err = (part[:, i] - (q - zp[:, col]) * scale[:, col]) / hinv[i, i]
            part[:, i:] -= np.outer(err, hinv[i, i:])
            errors[:, i] = err
        W[:, i2:] -= errors @ upper[i1:i2, i2:]
    out = codes.T if in_axis == 0 else codes
    return np.ascontiguousarray(out).astype(storage_dtype(params.dtype))


def chained_target(w: ArrayLike, cross: ArrayLike, hessian: ArrayLike, in_axis: int, *, damp: float = 0.01
                   ) -> np.ndarray:
    """The weight whose rounding against ``hessian`` also corrects the error already in a layer's input.

    A layer computes ``W x`` in the float model and ``Ŵ x̂`` once the layers before it are
    quantized. With ``H = E[x̂ x̂ᵀ]`` (``hessian``) and ``C = E[x x̂ᵀ]`` (``cross``),
    ``E‖W x − Ŵ x̂‖² = E‖(W' − Ŵ) x̂‖² + const`` for ``W' = W C H⁻¹``, so rounding ``W'`` with GPTQ's
    feedback through ``H`` minimizes the error at the layer's output against the float model.
    Damped toward ``W`` (``λ‖Ŵ − W‖²`` added, ``λ = damp · mean(diag H)``):
    ``W' = W (C + λI)(H + λI)⁻¹``, which is ``W`` itself when ``x̂ = x``. Input features the data
    never excites (zero diagonal of ``H``) keep their weights. ``in_axis`` as in `gptq_quantize`;
    the result has ``w``'s shape, float32; float64 inside."""
    a = np.asarray(w, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"chained_target takes a 2-D weight, got shape {a.shape}")
    in_axis = _normalize_axis(in_axis, 2)
    rows = a.T if in_axis == 0 else a  # (outputs, inputs)
    n = rows.shape[1]
    h = np.array(hessian, dtype=np.float64)
    c = np.array(cross, dtype=np.float64)
    if h.shape != (n, n) or c.shape != (n, n):
        raise ValueError(f"hessian and cross must be {n}×{n}, got {h.shape} and {c.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(h)) and np.all(np.isfinite(c))):
        raise ValueError("weight, hessian and cross must be finite")
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    c[dead, :] = 0.0
    c[:, dead] = 0.0
    lam = damp * float(np.mean(np.diag(h))) if np.any(~dead) else 1.0
    h[np.diag_indices(n)] += lam
    c[np.diag_indices(n)] += lam
    h[dead, dead] = c[dead, dead] = 1.0  # a dead feature maps to itself
    # W' = W (C + λI)(H + λI)⁻¹  ⇔  (H + λI) W'ᵀ = (C + λI)ᵀ Wᵀ  (H symmetric)
    out = np.linalg.solve(h, c.T @ rows.T).T
    return np.ascontiguousarray(out.T if in_axis == 0 else out, dtype=np.float32)


def inverse_cholesky_upper(hessian: ArrayLike, *, damp: float = 0.01) -> np.ndarray:
    """The upper-triangular ``U`` with ``(H + λI)⁻¹ = UᵀU``, ``λ = damp · mean(diag H)``, in float64.

    Features the data never excites (zero diagonal) get a unit diagonal first, so ``H`` stays
    positive definite. Computed without forming the inverse: with ``J`` the reversal permutation
    and ``JHJ = LLᵀ`` (Cholesky), ``U = J L⁻¹ J`` (one Cholesky and one triangular inverse,
    about 2n³/3 flops instead of the 4n³/3 of inverting and factorizing again)."""
    h = np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be square, got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian must be finite")
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    n = h.shape[0]
    h[np.diag_indices(n)] += damp * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return _lower_triangular_inverse(lower)[::-1, ::-1].copy()


def _lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """``L⁻¹`` of a lower-triangular ``L`` by 2×2 block recursion (GEMMs; about n³/3 flops):
    ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]]``."""
    n = lower.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    a_inv = _lower_triangular_inverse(lower[:m, :m])
    d_inv = _lower_triangular_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = a_inv
    out[m:, m:] = d_inv
    out[m:, :m] = -(d_inv @ (lower[m:, :m] @ a_inv))
    return out


def gptq_blockwise(w: ArrayLike, hessian: ArrayLike, in_axis: int, block_size: int, dtype: QuantDType = "int4", *,
                   symmetric: bool = True, damp: float = 0.01, limits: tuple[int, int] | None = None,
                   window: int | None = None, min_scale: float = MIN_SCALE) -> tuple[np.ndarray, QuantParams]:
    """Block-wise codes and parameters of the 2-D weight ``w`` chosen by GPTQ (Frantar et al. 2023)
    against ``hessian`` = ``E[x xᵀ]`` over the input features (``in_axis``: the axis the layer
    contracts with its input).

    With ``W`` as (outputs × inputs) and ``U`` upper with ``(H + λI)⁻¹ = UᵀU``
    (`inverse_cholesky_upper`, float64), columns are rounded in input order; each column's
    error ``e = (w − ŵ)/U[i,i]`` is fed back into the columns not yet rounded,
    ``W[:, j] −= e·U[i, j]`` (j > i), which minimizes ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` column by column.
    Grouping as in the paper: a block's scale (and zero point) is computed when its first column
    is reached, from the weights as updated by the feedback so far (`compute_params` semantics,
    so the grid is the one ``DequantizeLinear`` with ``block_size`` reads). Lazy batch updates:
    the feedback stays inside a batch of whole blocks (at least 128 columns) and reaches the
    columns after it as one matrix product per batch; inside the batch, in sub-batches of 16.
    ``U`` is factored in float64; the weights and the feedback are float32, as in the paper's
    implementation (the rounding error they correct is ~2⁻⁴ of a weight, float32's ~2⁻²⁴).

    Returns ``(codes, params)``: codes of ``w``'s shape (storage dtype of ``dtype``) within
    ``limits`` (default: the codes nearest rounding can make on the grid, ±k for a symmetric
    one), params blocked along ``in_axis``. Features with a zero diagonal take no feedback. With
    ``hessian`` the identity and ``damp=0`` the codes are nearest rounding's (no correlation, no
    feedback) on the same grid as `blockwise_params`.

    ``window`` (a multiple of ``block_size``; None: the whole input axis, as in the paper): the
    feedback stays inside consecutive windows of that many input features, each solved exactly
    against its own diagonal block of ``H`` (the features of other windows held fixed). The cost
    falls from ``O(outputs·inputs²)`` to ``O(outputs·inputs·window)`` and the Cholesky from one
    ``inputs³`` to ``inputs/window`` of ``window³``; the error lies between nearest rounding's and
    full GPTQ's (it ignores correlations across windows).
    """
    a = np.asarray(w, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"gptq_blockwise takes a 2-D weight, got shape {a.shape}")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    in_axis = _normalize_axis(in_axis, 2)
    n = a.shape[in_axis]
    h = np.asarray(hessian)
    if h.shape != (n, n):
        raise ValueError(f"hessian must be {n}×{n} for the input axis of a {a.shape} weight, got {h.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("weight must be finite")
    if window is not None and (window < block_size or window % block_size):
        raise ValueError(f"window must be a multiple of block_size {block_size}, got {window}")
    span = n if window is None or window >= n else window
    uppers = [inverse_cholesky_upper(h[j:j + span, j:j + span], damp=damp).astype(np.float32)
              for j in range(0, n, span)]
    if limits is None:
        qmin, qmax = qrange(dtype)
        if symmetric:
            k = symmetric_steps(dtype)
            zero = _symmetric_zero_point(dtype)
            qmin, qmax = zero - k, zero + k
    else:
        qmin, qmax = limits
    # The feedback runs in float32 (as the paper's implementation); U is factored in float64. Work
    # on (inputs, outputs), C order, so that one input feature's weights are contiguous.
    W = np.array(a if in_axis == 0 else a.T, dtype=np.float32, order="C")
    cols = W.shape[1]
    n_blocks = -(-n // block_size)
    scale = np.empty((n_blocks, cols), np.float32)
    zp = np.empty((n_blocks, cols), np.int64)
    zp_f = np.empty((n_blocks, cols), np.float32)
    codes = np.empty(W.shape, dtype=np.float32)
    lazy = block_size * max(1, -(-128 // block_size))
    sub = math.gcd(16, block_size)  # a block starts on a sub-window boundary: its features are up to date
    i1 = 0
    while i1 < n:
        j0 = i1 // span * span  # the window holding this lazy batch: feedback stops at its end
        j1 = min(j0 + span, n)
        i2 = min(i1 + lazy, j1)
        upper = uppers[i1 // span][i1 - j0:, i1 - j0:]  # indexed from feature i1
        part = W[i1:i2]  # a view: updated in place
        width = i2 - i1
        errors = np.zeros((width, cols), np.float32)
        for s1 in range(0, width, sub):
            s2 = min(s1 + sub, width)
            for i in range(s1, s2):
                f = i1 + i
                b = f // block_size
                if f % block_size == 0:
                    grp = W[f:min(f + block_size, n)]  # updated: every earlier feature's feedback is in
                    scale[b], zp[b] = _params_from_range(grp.min(axis=0), grp.max(axis=0), dtype, symmetric, min_scale)
                    zp_f[b] = zp[b]
                q = np.rint(part[i] / scale[b])
                q += zp_f[b]
                np.clip(q, qmin, qmax, out=q)
                codes[f] = q
                err = errors[i]
                np.subtract(q, zp_f[b], out=err)
                err *= scale[b]
                np.subtract(part[i], err, out=err)
                err /= upper[i, i]
                if i + 1 < s2:
                    part[i + 1:s2] -= upper[i, i + 1:s2, None] * err[None, :]
            if s2 < width:
                part[s2:] -= upper[s1:s2, s2:width].T @ errors[s1:s2]
        if i2 < j1:
            W[i2:j1] -= upper[:width, width:j1 - i1].T @ errors
        i1 = i2
    if in_axis == 1:
        codes, scale, zp = codes.T, scale.T, zp.T
    params = QuantParams(scale=np.ascontiguousarray(scale), zero_point=np.ascontiguousarray(zp), dtype=dtype,
                         axis=in_axis, block_size=block_size)
    return np.ascontiguousarray(codes).astype(storage_dtype(dtype)), params
