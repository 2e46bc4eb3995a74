"""Low-rank factorizations of weight matrices and conv kernels: numbers in, numbers out.

This is the one module that calls tensorly. Every call runs under an explicit numpy backend
(``tensorly.backend_context("numpy")``, so importing us never changes another caller's global
backend), with a fixed ``random_state`` and explicit iteration count and tolerance. Results are
unpacked into our own frozen dataclasses. All returned arrays are **float64** (the computation
precision) and read-only; a pass casts them to the initializer dtype it writes.

Factorizations (K is a conv kernel ``O×I×kh×kw``, W a matrix ``m×n``):

- ``svd_factors(W, r)``: ``W ≈ left @ right``, ``left = U_r Σ_r^½`` (m×r), ``right = Σ_r^½ V_rᵀ``
  (r×n). Exact at ``r = min(m, n)``; otherwise the spectral-norm error is exactly ``σ_{r+1}``
  (Eckart–Young). Leading batch dims are allowed (batched MatMul): each slice is factorized on its
  own and the reported spectral error is the largest over the slices, which is the spectral norm
  of the block-diagonal error operator.
- ``whitened_svd_factors(W, gram, r, side=)``: the rank-r ``W ≈ left @ right`` that minimizes the
  **output** error on inputs with second moment ``gram = E[x xᵀ]`` rather than the weight error:
  ``side="rows"`` for ``y = x W`` (x indexes W's rows), ``"cols"`` for ``y = W x``. With
  ``gram + λI = Rᵀ R`` (eigendecomposition, ``λ = ridge·tr(gram)/k``), ``E‖x(W − Ŵ)‖² = ‖R(W − Ŵ)‖²_F``,
  so the optimum truncates the SVD of ``R W`` and maps back with ``R⁻¹`` (Eckart–Young in the
  whitened space; ASVD / SVD-LLM). Exact at full rank whatever ``gram`` is; equal to
  ``svd_factors`` when ``gram`` is a multiple of the identity. ``singular_values`` are those of
  ``R W`` (the output energy per rank), ``output_rel_error`` the predicted relative output error.
- ``whitened_tucker2(K, gram, r_out, r_in)``: Tucker-2 weighted by the input channels' second
  moment (pixels treated as uncorrelated): ``tucker2`` of ``K ×₂ R``, the first factor mapped
  back by ``R⁻¹``. Exact at full ranks.
- ``patch_tucker2(K, patch_gram, r_out, r_in)``: Tucker-2 fitted to the conv's **output** on inputs
  whose im2col patches have second moment ``patch_gram`` (neighbouring pixels correlated, as they
  are in images and sequences). The first factor is `whitened_tucker2`'s (input channels weighted
  by the tap-averaged channel moment); given it, the core and the last factor are the exact
  optimum: a reduced-rank regression of the conv's response on the first factor's patches
  (``M = W Σ Bᵀ (B Σ Bᵀ)⁻¹``, then the top ``r_out`` principal directions of the fitted response
  ``M B Σ Bᵀ Mᵀ``). Never worse than `whitened_tucker2` on that data; exact at full ranks.
- ``tucker2(K, r_out, r_in)``: Tucker on the two channel modes, ``K ≈ core ×₁ last ×₂ firstᵀ``.
  The conv becomes 1×1 (I→r_in, weight ``first``) → kh×kw core (r_in→r_out, the original stride,
  pads, dilation) → 1×1 (r_out→O, weight ``last``, carries the bias). HOSVD initialisation then
  HOOI iterations; exact at full ranks ``(O, I)``. HOOI reaches a local optimum, not necessarily
  the global one.
- ``cp_conv(K, R)``: CP (CANDECOMP/PARAFAC) by ALS, ``K ≈ Σ_r λ_r a_r ∘ b_r ∘ c_r ∘ d_r``. The conv
  becomes 1×1 (I→R) → depthwise kh×1 → depthwise 1×kw → 1×1 (R→O), with λ folded into the last
  1×1. **CP is never guaranteed exact**: the CP rank of a 4-D kernel can exceed every one of its
  dimensions, finding it is NP-hard, a best rank-R approximation may not even exist (degenerate
  tensors), and ALS is a local method that may converge slowly or stall. The achieved relative
  error is returned; a pass must gate on it.
- ``spatial_svd(K, R)``: ``K[o,i,y,x]`` arranged as ``M[(i,y),(o,x)]`` of shape
  ``(I·kh)×(O·kw)``, truncated SVD. The conv becomes a kh×1 conv (I→R, vertical stride/pads/
  dilation) then a 1×kw conv (R→O, horizontal stride/pads/dilation, carries the bias). Exact at
  ``R = min(I·kh, O·kw)``; spectral error of M is ``σ_{R+1}``.

Every factor set has ``reconstruct()`` (also ``reconstruct(factors)``) giving back the dense
weight, and ``rel_error = ‖K − K̂‖_F / ‖K‖_F`` (0 for an all-zero input).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import numpy as np

__all__ = [
    "CpFactors",
    "FactorizationError",
    "SpatialSvdFactors",
    "SvdFactors",
    "Tucker2Factors",
    "cp_conv",
    "patch_tucker2",
    "reconstruct",
    "relative_error",
    "spatial_svd",
    "svd_factors",
    "tucker2",
    "whitened_svd_factors",
    "whitened_tucker2",
]

_BACKEND = "numpy"


def __getattr__(name: str):
    """``tl``, ``parafac`` and ``partial_tucker``: tensorly and its two decompositions, imported on
    first use (importing tensorly pulls in scipy.optimize, a fraction of a second that every process
    loading the pass registry would pay). Module attributes, so that tests can replace them."""
    if name not in ("tl", "parafac", "partial_tucker"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import tensorly
    from tensorly.decomposition import parafac, partial_tucker

    for key, value in (("tl", tensorly), ("parafac", parafac), ("partial_tucker", partial_tucker)):
        globals().setdefault(key, value)  # one replaced by a test stays replaced
    return globals()[name]


def _tensorly(decomposition: str):
    """tensorly and one of its decompositions, as this module's attributes hold them now."""
    if "tl" not in globals() or decomposition not in globals():
        __getattr__(decomposition)
    return globals()["tl"], globals()[decomposition]


class FactorizationError(RuntimeError):
    """A decomposition produced unusable factors (e.g. non-finite values from a diverging ALS)."""


class _Frozen:
    """Mixin: after construction, make every array field read-only so factors are never edited
    in place by a caller that forgot to copy (a pass must create fresh initializers)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False


@dataclass(frozen=True, eq=False)
class SvdFactors(_Frozen):
    """``w ≈ left @ right`` (float64).

    left: ``(..., m, r)`` = U_r Σ_r^½; right: ``(..., r, n)`` = Σ_r^½ V_rᵀ.
    singular_values: the full spectrum ``(..., min(m, n))``, descending.
    spectral_error: ``σ_{r+1}`` (max over batch slices), 0.0 at full rank.
    rel_error: Frobenius ``‖w − left@right‖ / ‖w‖`` over the whole array.
    output_rel_error: for whitened factors, the predicted ``‖R(w − ŵ)‖ / ‖R w‖`` on the data the
    second moment came from (None for plain SVD, where it equals nothing measurable).
    """

    left: np.ndarray
    right: np.ndarray
    singular_values: np.ndarray
    spectral_error: float
    rel_error: float
    output_rel_error: float | None = None

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    def reconstruct(self) -> np.ndarray:
        return self.left @ self.right


@dataclass(frozen=True, eq=False)
class Tucker2Factors(_Frozen):
    """Tucker-2 factors of a conv kernel ``O×I×kh×kw`` (float64).

    first: ``r_in×I``, the first 1×1 conv (I→r_in) as a matrix; ``first_weight`` is the 4-D one.
    core: ``r_out×r_in×kh×kw``, the core conv weight.
    last: ``O×r_out``, the last 1×1 conv (r_out→O) as a matrix; ``last_weight`` is the 4-D one.
    rel_error: Frobenius relative reconstruction error.
    """

    first: np.ndarray
    core: np.ndarray
    last: np.ndarray
    rel_error: float

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return int(self.core.shape[0]), int(self.core.shape[1])

    @property
    def first_weight(self) -> np.ndarray:
        """Conv weight ``r_in×I×1×1``."""
        return self.first[:, :, None, None]

    @property
    def last_weight(self) -> np.ndarray:
        """Conv weight ``O×r_out×1×1``."""
        return self.last[:, :, None, None]

    def reconstruct(self) -> np.ndarray:
        return np.einsum("oa,abyx,bi->oiyx", self.last, self.core, self.first, optimize=True)


@dataclass(frozen=True, eq=False)
class CpFactors(_Frozen):
    """CP factors of a conv kernel ``O×I×kh×kw`` (float64), λ folded into ``pointwise_out``.

    pointwise_in: ``R×I`` (1×1 conv I→R); vertical: ``R×kh`` (depthwise kh×1);
    horizontal: ``R×kw`` (depthwise 1×kw); pointwise_out: ``O×R`` (1×1 conv R→O).
    The first three have unit-norm rows, so intermediate activations keep the input's scale.
    ``*_weight`` properties give the 4-D conv weights (depthwise ones for ``group=R``).
    rel_error: Frobenius relative reconstruction error. iterations: ALS sweeps run.
    """

    pointwise_in: np.ndarray
    vertical: np.ndarray
    horizontal: np.ndarray
    pointwise_out: np.ndarray
    rel_error: float
    iterations: int

    @property
    def rank(self) -> int:
        return int(self.pointwise_in.shape[0])

    @property
    def pointwise_in_weight(self) -> np.ndarray:
        """``R×I×1×1``."""
        return self.pointwise_in[:, :, None, None]

    @property
    def vertical_weight(self) -> np.ndarray:
        """``R×1×kh×1`` (depthwise, group=R)."""
        return self.vertical[:, None, :, None]

    @property
    def horizontal_weight(self) -> np.ndarray:
        """``R×1×1×kw`` (depthwise, group=R)."""
        return self.horizontal[:, None, None, :]

    @property
    def pointwise_out_weight(self) -> np.ndarray:
        """``O×R×1×1``."""
        return self.pointwise_out[:, :, None, None]

    def reconstruct(self) -> np.ndarray:
        return np.einsum(
            "or,ri,ry,rx->oiyx",
            self.pointwise_out,
            self.pointwise_in,
            self.vertical,
            self.horizontal,
            optimize=True,
        )


@dataclass(frozen=True, eq=False)
class SpatialSvdFactors(_Frozen):
    """Spatial SVD factors of a conv kernel ``O×I×kh×kw`` (float64).

    vertical: ``R×I×kh×1`` conv weight (I→R); horizontal: ``O×R×1×kw`` conv weight (R→O).
    singular_values: full spectrum of ``M[(i,y),(o,x)]``, length ``min(I·kh, O·kw)``.
    spectral_error: ``σ_{R+1}`` of M (0.0 at full rank). rel_error: Frobenius relative error.
    """

    vertical: np.ndarray
    horizontal: np.ndarray
    singular_values: np.ndarray
    spectral_error: float
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[0])

    def reconstruct(self) -> np.ndarray:
        return np.einsum(
            "riy,orx->oiyx", self.vertical[..., 0], self.horizontal[:, :, 0, :], optimize=True
        )


Factors = SvdFactors | Tucker2Factors | CpFactors | SpatialSvdFactors


def reconstruct(factors: Factors) -> np.ndarray:
    """Dense weight (float64) from any factor set of this module."""
    return factors.reconstruct()


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """``‖reference − approx‖_F / ‖reference‖_F`` in float64; 0.0 when both are zero."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = ref - np.asarray(approx, dtype=np.float64)
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(diff))
    if norm == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / norm


def _as_float64(a: np.ndarray, ndim: int | None, what: str) -> np.ndarray:
    arr = np.array(a, dtype=np.float64, copy=True)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} has non-finite values")
    return arr


def _check_rank(rank: int, upper: int, what: str) -> int:
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= upper:
        raise ValueError(f"{what} must be an integer in [1, {upper}], got {rank!r}")
    return int(rank)


def svd_factors(w: np.ndarray, rank: int) -> SvdFactors:
    """Truncated SVD ``w ≈ left @ right`` with the singular values split evenly (Σ^½ each side).

    ``w`` is ``(..., m, n)``; ``1 ≤ rank ≤ min(m, n)``. numpy's LAPACK SVD in float64; the sign of
    each singular pair is fixed (largest-magnitude entry of each left vector positive) so results
    do not depend on LAPACK's sign choice.
    """
    a = _as_float64(w, None, "w")
    if a.ndim < 2:
        raise ValueError(f"w must be at least 2-D, got shape {a.shape}")
    k = min(a.shape[-2:])
    rank = _check_rank(rank, k, "rank")
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    u, vt = _fix_signs(u, vt)
    root = np.sqrt(s[..., :rank])
    left = u[..., :, :rank] * root[..., None, :]
    right = root[..., :, None] * vt[..., :rank, :]
    spectral = float(np.max(s[..., rank])) if rank < k else 0.0
    factors = SvdFactors(
        left=np.ascontiguousarray(left),
        right=np.ascontiguousarray(right),
        singular_values=s,
        spectral_error=spectral,
        rel_error=0.0,
    )
    # Measured, not taken from the tail of the spectrum, so it also reflects rounding.
    return _with_error(factors, a)


def whitened_svd_factors(w: np.ndarray, gram: np.ndarray, rank: int, *, side: str = "rows",
                         ridge: float = 1e-6) -> SvdFactors:
    """Output-optimal rank-``rank`` factors of a 2-D ``w`` for inputs of second moment ``gram``.

    ``side="rows"``: ``y = x @ w`` and ``gram`` is ``m×m``; ``side="cols"``: ``y = w @ x`` and
    ``gram`` is ``n×n``. ``ridge`` (relative to the mean eigenvalue) keeps directions the data
    never excites from blowing up ``R⁻¹``; everything runs in float64. Returns `SvdFactors` with
    the whitened spectrum, the weight errors of the result, and ``output_rel_error``.
    """
    if side not in ("rows", "cols"):
        raise ValueError(f"side must be 'rows' or 'cols', got {side!r}")
    a = _as_float64(w, 2, "w")
    if side == "cols":
        t = whitened_svd_factors(a.T, gram, rank, side="rows", ridge=ridge)
        return _with_error(SvdFactors(left=np.ascontiguousarray(t.right.T), right=np.ascontiguousarray(t.left.T),
                                      singular_values=t.singular_values, spectral_error=0.0, rel_error=0.0,
                                      output_rel_error=t.output_rel_error), a, spectral=True)
    k = a.shape[0]
    rank = _check_rank(rank, min(a.shape), "rank")
    root, inverse = _whitener(gram, k, ridge)
    u, s, vt = np.linalg.svd(root @ a, full_matrices=False)
    u, vt = _fix_signs(u, vt)
    half = np.sqrt(s[:rank])
    left = inverse @ (u[:, :rank] * half[None, :])   # R⁻¹ U_r Σ_r^½
    right = half[:, None] * vt[:rank, :]
    energy = float(np.sum(s ** 2))
    output_rel = float(np.sqrt(np.sum(s[rank:] ** 2) / energy)) if energy > 0 else 0.0
    factors = SvdFactors(left=np.ascontiguousarray(left), right=np.ascontiguousarray(right), singular_values=s,
                         spectral_error=0.0, rel_error=0.0, output_rel_error=output_rel)
    return _with_error(factors, a, spectral=True)


def _whitener(gram: np.ndarray, k: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(R, R⁻¹)`` with ``RᵀR = gram + λI``, ``λ = ridge·tr(gram)/k`` (from the eigendecomposition,
    so a rank-deficient ``gram`` is fine)."""
    g = _as_float64(gram, 2, "gram")
    if g.shape != (k, k):
        raise ValueError(f"gram must be {k}×{k} for this weight, got {g.shape}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    evals, q = np.linalg.eigh((g + g.T) / 2.0)
    floor = max(ridge * float(np.trace(g)) / k, np.finfo(np.float64).tiny)
    root = np.sqrt(np.maximum(evals, 0.0) + floor)
    return root[:, None] * q.T, q / root[None, :]


def whitened_tucker2(kernel: np.ndarray, gram: np.ndarray, rank_out: int, rank_in: int, seed: int = 0, *,
                     ridge: float = 1e-6, n_iter: int = 50) -> Tucker2Factors:
    """Tucker-2 that weighs the kernel's input channels by the data: ``gram = E[x xᵀ]`` of the
    conv's input channels (every pixel a sample). Treating pixels as uncorrelated, the output
    error is ``‖(K − K̂) ×₂ R‖`` with ``RᵀR = gram + λI``, so `tucker2` runs on ``K ×₂ R`` and the
    first factor maps back (``first = first′ R⁻ᵀ``). Exact at full ranks; `tucker2` itself on
    white inputs. ``rel_error`` is the kernel's own."""
    k = _as_float64(kernel, 4, "kernel")
    root, inverse = _whitener(gram, k.shape[1], ridge)
    white = tucker2(np.einsum("ji,oiyx->ojyx", root, k), rank_out, rank_in, seed, n_iter=n_iter)
    factors = Tucker2Factors(first=np.ascontiguousarray(white.first @ inverse.T), core=white.core,
                             last=white.last, rel_error=0.0)
    return _with_error(factors, k)


def patch_tucker2(kernel: np.ndarray, patch_gram: np.ndarray, rank_out: int, rank_in: int, seed: int = 0, *,
                  ridge: float = 1e-6, n_iter: int = 50) -> Tucker2Factors:
    """Tucker-2 whose core and last factor minimize the output error on the data (module docstring).

    ``kernel`` is ``O×I×kh×kw``; ``patch_gram`` is ``E[p pᵀ]`` of its input patches, ``(I·taps)²``
    with the channel major and the tap minor (the order of `kernels.lstsq.im2col`). ``ridge``
    (relative to the mean eigenvalue) keeps directions the data never excites finite. Returns
    `Tucker2Factors`; ``rel_error`` is the kernel's own (the output error is what is minimized)."""
    k = _as_float64(kernel, 4, "kernel")
    o, i = k.shape[:2]
    taps = int(np.prod(k.shape[2:]))
    sigma = _as_float64(patch_gram, 2, "patch_gram")
    if sigma.shape != (i * taps, i * taps):
        raise ValueError(f"patch_gram must be {i * taps}×{i * taps} for this kernel, got {sigma.shape}")
    sigma = (sigma + sigma.T) / 2.0
    rank_out = _check_rank(rank_out, o, "rank_out")
    channel = np.einsum("itjt->ij", sigma.reshape(i, taps, i, taps)) / taps
    first = whitened_tucker2(k, channel, rank_out, rank_in, seed, ridge=ridge, n_iter=n_iter).first  # r_in×I
    r_in = first.shape[0]
    b = np.kron(first, np.eye(taps))                      # (r_in·taps)×(I·taps): patches of the first factor
    w = k.reshape(o, i * taps)
    # The ridge is added to the data's moment (as in `_whitener`): directions the data never excites
    # keep the kernel's own response instead of being fitted to nothing.
    sigma = sigma + max(ridge * float(np.trace(sigma)) / len(sigma), np.finfo(np.float64).tiny) * np.eye(len(sigma))
    cross = w @ sigma @ b.T                               # E[y zᵀ]
    sz = b @ sigma @ b.T                                  # E[z zᵀ]
    evals, q = np.linalg.eigh((sz + sz.T) / 2.0)
    keep = evals > evals.max() * 1e-13
    m = cross @ (q[:, keep] / evals[keep]) @ q[:, keep].T  # O×(r_in·taps): the best unconstrained map
    fitted = m @ sz @ m.T
    _, u = np.linalg.eigh((fitted + fitted.T) / 2.0)
    last = np.ascontiguousarray(u[:, ::-1][:, :rank_out])  # top principal directions of the response
    core = (last.T @ m).reshape(rank_out, r_in, *k.shape[2:])
    factors = Tucker2Factors(first=np.ascontiguousarray(first), core=np.ascontiguousarray(core), last=last,
                             rel_error=0.0)
    return _with_error(factors, k)


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argmax(np.abs(u), axis=-2)[..., None, :]
    sign = np.sign(np.take_along_axis(u, idx, axis=-2))
    sign[sign == 0] = 1.0
    return u * sign, vt * np.swapaxes(sign, -1, -2)


def tucker2(
    kernel: np.ndarray,
    rank_out: int,
    rank_in: int,
    seed: int = 0,
    *,
    n_iter: int = 50,
    tol: float = 1e-7,
) -> Tucker2Factors:
    """Tucker-2 of a conv kernel on its channel modes (tensorly ``partial_tucker``, modes [0, 1]).

    HOSVD initialisation (deterministic), then up to ``n_iter`` HOOI sweeps, stopping when the
    relative error changes by less than ``tol``; ``n_iter=0`` returns the truncated HOSVD. Exact at
    ``rank_out = O, rank_in = I``. ``seed`` feeds tensorly's ``random_state``, which only matters
    when a rank exceeds the rank of an unfolding (e.g. ``rank_out > r_in·kh·kw``): tensorly then
    completes that factor with random orthonormal columns.
    """
    k = _as_float64(kernel, 4, "kernel")
    o, i = k.shape[:2]
    rank_out = _check_rank(rank_out, o, "rank_out")
    rank_in = _check_rank(rank_in, i, "rank_in")
    if not np.any(k):
        # Zero kernel: any orthonormal factors reconstruct it; skip the iteration (0/0 errors).
        return Tucker2Factors(
            first=np.eye(rank_in, i),
            core=np.zeros((rank_out, rank_in) + k.shape[2:]),
            last=np.eye(o, rank_out),
            rel_error=0.0,
        )
    tl, partial_tucker = _tensorly("partial_tucker")
    with tl.backend_context(_BACKEND), warnings.catch_warnings():
        # A rank above the rank of an unfolding makes tensorly warn, truncate that SVD and
        # complete the factor with orthonormal columns drawn from random_state (= seed).
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        result = partial_tucker(
            k,
            rank=[rank_out, rank_in],
            modes=[0, 1],
            n_iter_max=int(n_iter),
            init="svd",
            tol=float(tol),
            random_state=int(seed),
        )
    # Recent tensorly returns ((core, factors), errors); older releases (core, factors).
    head, tail = result
    core, (a_out, a_in) = (head, tail) if isinstance(head, np.ndarray) else head
    factors = Tucker2Factors(
        first=np.ascontiguousarray(np.asarray(a_in, dtype=np.float64).T),
        core=np.ascontiguousarray(np.asarray(core, dtype=np.float64)),
        last=np.ascontiguousarray(np.asarray(a_out, dtype=np.float64)),
        rel_error=0.0,
    )
    # tensorly's own error estimate is sqrt(‖K‖² − ‖core‖²), which loses precision near 0;
    # measure the real one.
    return _with_error(factors, k)


def cp_conv(
    kernel: np.ndarray,
    rank: int,
    seed: int = 0,
    *,
    n_iter: int = 500,
    tol: float = 1e-10,
) -> CpFactors:
    """CP decomposition of a conv kernel by ALS (tensorly ``parafac``) for the 4-conv CP layout.

    ``init='svd'`` (leading singular vectors of each unfolding; columns beyond a mode's size are
    drawn from ``seed``), up to ``n_iter`` sweeps, stopping when the relative error changes by less
    than ``tol``. Not exact in general, at any rank (see the module docstring): check
    ``rel_error``. Raises ``FactorizationError`` if ALS hit a singular system or produced
    non-finite factors.
    """
    k = _as_float64(kernel, 4, "kernel")
    o, i, kh, kw = k.shape
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if not np.any(k):
        return CpFactors(
            pointwise_in=np.zeros((rank, i)),
            vertical=np.zeros((rank, kh)),
            horizontal=np.zeros((rank, kw)),
            pointwise_out=np.zeros((o, rank)),
            rel_error=0.0,
            iterations=0,
        )
    tl, parafac = _tensorly("parafac")
    with tl.backend_context(_BACKEND), warnings.catch_warnings():
        # When R exceeds a mode's size, tensorly warns that it truncates that mode's SVD and
        # fills the remaining columns from random_state: expected here, not news to the caller.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        try:
            cp, errors = parafac(
                k,
                rank=rank,
                n_iter_max=int(n_iter),
                init="svd",
                tol=float(tol),
                random_state=int(seed),
                normalize_factors=True,
                return_errors=True,
            )
        except np.linalg.LinAlgError as exc:
            # An ALS step solves with the Gram matrix of the other factors, singular when a
            # factor loses rank (a kernel with dead channels, a rank above a mode's size).
            raise FactorizationError(f"CP-ALS at rank {rank} failed: {exc}") from None
    weights, mats = cp
    a_out, a_in, a_y, a_x = (np.asarray(a, dtype=np.float64) for a in mats)
    scale = np.asarray(weights, dtype=np.float64).copy()
    # Unit-norm columns for the first three convs, every scale (λ included) into the last 1×1,
    # so intermediate activations keep the input's magnitude. tensorly's own normalisation
    # does not leave all factors unit-norm on return, hence done here.
    unit = []
    for a in (a_in, a_y, a_x):
        norms = np.linalg.norm(a, axis=0)
        safe = np.where(norms > 0.0, norms, 1.0)
        unit.append(a / safe)
        scale = scale * norms
    factors = CpFactors(
        pointwise_in=np.ascontiguousarray(unit[0].T),
        vertical=np.ascontiguousarray(unit[1].T),
        horizontal=np.ascontiguousarray(unit[2].T),
        pointwise_out=np.ascontiguousarray(a_out * scale[None, :]),
        rel_error=0.0,
        iterations=len(errors),
    )
    for f in (factors.pointwise_in, factors.vertical, factors.horizontal, factors.pointwise_out):
        if not np.all(np.isfinite(f)):
            raise FactorizationError(f"CP-ALS at rank {rank} produced non-finite factors")
    return _with_error(factors, k)


def spatial_svd(kernel: np.ndarray, rank: int) -> SpatialSvdFactors:
    """Spatial SVD of a conv kernel: kh×1 conv (I→R) then 1×kw conv (R→O).

    ``1 ≤ rank ≤ min(I·kh, O·kw)``; exact at the upper bound.
    """
    k = _as_float64(kernel, 4, "kernel")
    o, i, kh, kw = k.shape
    rank = _check_rank(rank, min(i * kh, o * kw), "rank")
    m = k.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
    f = svd_factors(m, rank)
    vertical = f.left.reshape(i, kh, rank).transpose(2, 0, 1)[..., None]
    horizontal = f.right.reshape(rank, o, kw).transpose(1, 0, 2)[:, :, None, :]
    return SpatialSvdFactors(
        vertical=np.ascontiguousarray(vertical),
        horizontal=np.ascontiguousarray(horizontal),
        singular_values=np.array(f.singular_values),
        spectral_error=f.spectral_error,
        rel_error=f.rel_error,
    )


def _with_error(factors: Factors, reference: np.ndarray, spectral: bool = False) -> Factors:
    # Frozen dataclass: rebuild rather than mutate. `spectral`: also the weight's spectral-norm
    # error, measured (for factors that are not a truncation of the weight's own SVD).
    values = {f.name: getattr(factors, f.name) for f in fields(factors)}
    values["rel_error"] = relative_error(reference, factors.reconstruct())
    if spectral:
        values["spectral_error"] = float(np.linalg.norm(reference - factors.reconstruct(), 2))
    return type(factors)(**values)
