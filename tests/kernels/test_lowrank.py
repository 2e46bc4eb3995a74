"""Property tests of the low-rank kernels: exactness at full rank, the SVD error bound, error
shrinking with rank, conv-level equivalence of the factor layouts, determinism."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from graph_opt.kernels import lowrank as lr
from hypothesis import given, settings
from hypothesis import strategies as st

KERNELS_DIR = Path(lr.__file__).resolve().parent
FUZZ = settings(derandomize=True, max_examples=25, deadline=None, print_blob=True)


def conv2d(x: np.ndarray, w: np.ndarray, groups: int = 1) -> np.ndarray:
    """Reference NCHW convolution (cross-correlation, 'valid', stride 1), float64."""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * groups and o % groups == 0
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n,c,H',W',kh,kw
    win = win.reshape(n, groups, cg, *win.shape[2:])
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    y = np.einsum("ngchwyx,gocyx->ngohw", win, wg)
    return y.reshape(n, o, *y.shape[3:])


def non_increasing(values: list[float], slack: float = 1e-12) -> bool:
    return bool(np.all(np.diff(values) <= slack))


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# Truncated SVD


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (1, 4), (3, 9, 4)])
def test_svd_full_rank_reconstructs(shape):
    w = rng_for(0).standard_normal(shape).astype(np.float32)
    f = lr.svd_factors(w, min(shape[-2:]))
    assert f.spectral_error == 0.0
    assert f.left.dtype == np.float64 and f.right.dtype == np.float64
    # Exact "in float32 terms": factors cast to float32 still reconstruct within 1e-5.
    approx = f.left.astype(np.float32) @ f.right.astype(np.float32)
    assert lr.relative_error(w, approx) < 1e-5
    assert f.rel_error < 1e-12


def test_svd_spectral_error_is_next_singular_value():
    rng = rng_for(1)
    w = rng.standard_normal((40, 25))
    s = np.linalg.svd(w, compute_uv=False)
    for r in (1, 5, 24):
        f = lr.svd_factors(w, r)
        assert f.left.shape == (40, r) and f.right.shape == (r, 25)
        assert f.spectral_error == pytest.approx(s[r], rel=1e-12)
        assert np.linalg.norm(w - f.left @ f.right, 2) == pytest.approx(s[r], rel=1e-10)
        assert f.rel_error == pytest.approx(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)), rel=1e-9)


def test_svd_splits_singular_values_evenly():
    w = rng_for(2).standard_normal((12, 9))
    f = lr.svd_factors(w, 4)
    sigma = np.diag(f.singular_values[:4])
    # left = U Σ^½ and right = Σ^½ Vᵀ  ⇒  leftᵀ left = Σ = right rightᵀ.
    np.testing.assert_allclose(f.left.T @ f.left, sigma, atol=1e-12)
    np.testing.assert_allclose(f.right @ f.right.T, sigma, atol=1e-12)


def test_svd_as_two_matmuls_matches_original_layer():
    rng = rng_for(3)
    w = rng.standard_normal((16, 10))
    x = rng.standard_normal((5, 16))
    f = lr.svd_factors(w, 10)
    np.testing.assert_allclose((x @ f.left) @ f.right, x @ w, atol=1e-12)


def test_svd_batched_spectral_error_is_worst_slice():
    w = rng_for(4).standard_normal((3, 8, 6))
    f = lr.svd_factors(w, 2)
    s = np.linalg.svd(w, compute_uv=False)
    assert f.left.shape == (3, 8, 2) and f.right.shape == (3, 2, 6)
    assert f.spectral_error == pytest.approx(s[:, 2].max(), rel=1e-12)
    worst = max(np.linalg.norm(w[b] - f.left[b] @ f.right[b], 2) for b in range(3))
    assert worst == pytest.approx(s[:, 2].max(), rel=1e-10)


@pytest.mark.parametrize("rank", [0, 7, -1, 2.5, True])
def test_svd_rejects_bad_rank(rank):
    with pytest.raises(ValueError):
        lr.svd_factors(np.ones((6, 4)), rank)


def test_svd_rejects_non_finite():
    w = np.ones((3, 3))
    w[1, 1] = np.nan
    with pytest.raises(ValueError):
        lr.svd_factors(w, 1)


@FUZZ
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_svd_error_non_increasing_in_rank(m, n, seed):
    w = rng_for(seed).standard_normal((m, n))
    fs = [lr.svd_factors(w, r) for r in range(1, min(m, n) + 1)]
    rel = [f.rel_error for f in fs]
    spec = [f.spectral_error for f in fs]
    assert non_increasing(rel), rel
    assert non_increasing(spec), spec
    assert rel[-1] < 1e-12 and spec[-1] == 0.0


# --------------------------------------------------------------------------------------------
# Tucker-2


def test_tucker2_full_rank_reconstructs_and_is_the_same_conv():
    rng = rng_for(5)
    k = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    f = lr.tucker2(k, 6, 4)
    assert f.first.shape == (4, 4) and f.core.shape == (6, 4, 3, 3) and f.last.shape == (6, 6)
    assert f.first_weight.shape == (4, 4, 1, 1) and f.last_weight.shape == (6, 6, 1, 1)
    assert f.ranks == (6, 4)
    assert f.rel_error < 1e-12
    cast = [a.astype(np.float32) for a in (f.last, f.core, f.first)]
    approx = np.einsum("oa,abyx,bi->oiyx", *cast)
    assert lr.relative_error(k, approx) < 1e-5
    # The three-conv chain computes the original conv.
    x = rng.standard_normal((2, 4, 7, 6))
    y = conv2d(conv2d(conv2d(x, f.first_weight), f.core), f.last_weight)
    np.testing.assert_allclose(y, conv2d(x, k.astype(np.float64)), atol=1e-10)


def test_tucker2_truncated_shapes_and_conv_chain():
    rng = rng_for(6)
    k = rng.standard_normal((8, 5, 3, 2))
    f = lr.tucker2(k, 3, 2)
    assert f.first_weight.shape == (2, 5, 1, 1)
    assert f.core.shape == (3, 2, 3, 2)
    assert f.last_weight.shape == (8, 3, 1, 1)
    x = rng.standard_normal((1, 5, 6, 6))
    y = conv2d(conv2d(conv2d(x, f.first_weight), f.core), f.last_weight)
    np.testing.assert_allclose(y, conv2d(x, f.reconstruct()), atol=1e-10)
    assert f.rel_error == pytest.approx(lr.relative_error(k, f.reconstruct()), rel=1e-12)


def test_tucker2_recovers_exact_low_tucker_rank():
    rng = rng_for(7)
    core = rng.standard_normal((3, 2, 3, 3))
    a, b = rng.standard_normal((10, 3)), rng.standard_normal((7, 2))
    k = np.einsum("abyx,oa,ib->oiyx", core, a, b)
    assert lr.tucker2(k, 3, 2).rel_error < 1e-10
    assert lr.tucker2(k, 2, 2).rel_error > 1e-3  # vacuity guard: a smaller rank really loses


def test_tucker2_hooi_not_worse_than_hosvd():
    k = rng_for(8).standard_normal((12, 10, 3, 3))
    hosvd = lr.tucker2(k, 4, 3, n_iter=0).rel_error
    hooi = lr.tucker2(k, 4, 3).rel_error
    assert 0.0 < hooi <= hosvd + 1e-12


@FUZZ
@given(
    o=st.integers(1, 6),
    i=st.integers(1, 6),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_tucker2_error_non_increasing_in_rank(o, i, kh, kw, seed):
    k = rng_for(seed).standard_normal((o, i, kh, kw))
    err = {(a, b): lr.tucker2(k, a, b).rel_error for a in range(1, o + 1) for b in range(1, i + 1)}
    for (a, b), e in err.items():
        if a < o:
            assert err[(a + 1, b)] <= e + 1e-9, (a, b, err)
        if b < i:
            assert err[(a, b + 1)] <= e + 1e-9, (a, b, err)
    assert err[(o, i)] < 1e-10


@pytest.mark.parametrize("ranks", [(0, 1), (1, 0), (5, 1), (1, 4)])
def test_tucker2_rejects_bad_ranks(ranks):
    with pytest.raises(ValueError):
        lr.tucker2(np.ones((4, 3, 3, 3)), *ranks)


def test_tucker2_zero_kernel():
    f = lr.tucker2(np.zeros((4, 3, 3, 3)), 2, 2)
    assert f.rel_error == 0.0 and not np.any(f.reconstruct())


# --------------------------------------------------------------------------------------------
# CP


def known_cp_kernel(seed: int, shape=(16, 8, 3, 3), rank=4) -> np.ndarray:
    rng = rng_for(seed)
    a = [rng.standard_normal((d, rank)) for d in shape]
    return np.einsum("or,ir,yr,xr->oiyx", *a)


def test_cp_recovers_known_low_rank_kernel():
    # A CP-rank-4 kernel with generic factors is essentially unique (Kruskal: k-ranks 4+4+3+3
    # ≥ 2·4+3), and ALS from the SVD init converges to it. Bound: rel error < 1e-6.
    k = known_cp_kernel(9)
    f = lr.cp_conv(k, 4)
    assert f.rel_error < 1e-6, f.rel_error
    assert f.iterations >= 1 and f.rank == 4
    np.testing.assert_allclose(np.linalg.norm(f.pointwise_in, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(f.vertical, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(f.horizontal, axis=1), 1.0, rtol=1e-12)
    cast = [
        a.astype(np.float32) for a in (f.pointwise_out, f.pointwise_in, f.vertical, f.horizontal)
    ]
    assert lr.relative_error(k, np.einsum("or,ri,ry,rx->oiyx", *cast)) < 1e-5


def test_cp_four_conv_chain_is_the_same_conv():
    rng = rng_for(10)
    k = known_cp_kernel(10, shape=(6, 5, 3, 2), rank=3)
    f = lr.cp_conv(k, 3)
    assert f.pointwise_in_weight.shape == (3, 5, 1, 1)
    assert f.vertical_weight.shape == (3, 1, 3, 1)
    assert f.horizontal_weight.shape == (3, 1, 1, 2)
    assert f.pointwise_out_weight.shape == (6, 3, 1, 1)
    x = rng.standard_normal((2, 5, 7, 6))
    y = conv2d(x, f.pointwise_in_weight)
    y = conv2d(y, f.vertical_weight, groups=3)
    y = conv2d(y, f.horizontal_weight, groups=3)
    y = conv2d(y, f.pointwise_out_weight)
    np.testing.assert_allclose(y, conv2d(x, f.reconstruct()), atol=1e-10)
    np.testing.assert_allclose(y, conv2d(x, k), atol=1e-5 * np.abs(y).max())


def test_cp_rank_above_mode_sizes_runs_quietly(recwarn):
    k = rng_for(11).standard_normal((4, 3, 2, 2))
    f = lr.cp_conv(k, 6, n_iter=50)
    assert np.isfinite(f.rel_error) and f.rel_error < 1.0
    assert not [w for w in recwarn if "n_eigenvecs" in str(w.message)]


def test_cp_zero_kernel_and_bad_rank():
    assert lr.cp_conv(np.zeros((3, 2, 3, 3)), 2).rel_error == 0.0
    with pytest.raises(ValueError):
        lr.cp_conv(np.ones((3, 2, 3, 3)), 0)


# --------------------------------------------------------------------------------------------
# Spatial SVD


def test_spatial_svd_full_rank_is_the_same_conv():
    rng = rng_for(12)
    k = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    full = min(3 * 3, 5 * 2)
    f = lr.spatial_svd(k, full)
    assert f.vertical.shape == (full, 3, 3, 1) and f.horizontal.shape == (5, full, 1, 2)
    assert f.spectral_error == 0.0 and f.rel_error < 1e-12
    approx = np.einsum(
        "riy,orx->oiyx",
        f.vertical[..., 0].astype(np.float32),
        f.horizontal[:, :, 0, :].astype(np.float32),
    )
    assert lr.relative_error(k, approx) < 1e-5
    x = rng.standard_normal((2, 3, 6, 7))
    y = conv2d(conv2d(x, f.vertical), f.horizontal)
    np.testing.assert_allclose(y, conv2d(x, k.astype(np.float64)), atol=1e-10)


def test_spatial_svd_spectral_error_of_the_arranged_matrix():
    k = rng_for(13).standard_normal((6, 4, 3, 3))
    m = k.transpose(1, 2, 0, 3).reshape(12, 18)
    s = np.linalg.svd(m, compute_uv=False)
    f = lr.spatial_svd(k, 5)
    assert f.spectral_error == pytest.approx(s[5], rel=1e-12)
    assert np.linalg.norm(m - f.reconstruct().transpose(1, 2, 0, 3).reshape(12, 18), 2) == (
        pytest.approx(s[5], rel=1e-10)
    )


def test_spatial_svd_separable_kernel_is_rank_one():
    rng = rng_for(14)
    # K[o,i,y,x] = a[i,y] b[o,x] is rank one in the (i,y)×(o,x) arrangement.
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    k = np.einsum("iy,ox->oiyx", a, b)
    assert lr.spatial_svd(k, 1).rel_error < 1e-12


@FUZZ
@given(
    o=st.integers(1, 5),
    i=st.integers(1, 5),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_spatial_svd_error_non_increasing_in_rank(o, i, kh, kw, seed):
    k = rng_for(seed).standard_normal((o, i, kh, kw))
    full = min(i * kh, o * kw)
    errs = [lr.spatial_svd(k, r).rel_error for r in range(1, full + 1)]
    assert non_increasing(errs), errs
    assert errs[-1] < 1e-12


# --------------------------------------------------------------------------------------------
# Cross-cutting contracts


def test_deterministic_same_input_same_output():
    k = rng_for(15).standard_normal((8, 6, 3, 3))
    runs = [
        (lambda: lr.svd_factors(k.reshape(8, -1), 4), ("left", "right", "singular_values")),
        (lambda: lr.tucker2(k, 4, 3, seed=1), ("first", "core", "last")),
        (
            lambda: lr.cp_conv(k, 5, seed=1, n_iter=40),
            ("pointwise_in", "vertical", "horizontal", "pointwise_out"),
        ),
        (lambda: lr.spatial_svd(k, 6), ("vertical", "horizontal", "singular_values")),
    ]
    for make, names in runs:
        a, b = make(), make()
        for name in names:
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.rel_error == b.rel_error


def test_inputs_untouched_and_outputs_read_only():
    k = rng_for(16).standard_normal((4, 3, 3, 3))
    before = k.copy()
    factors = [
        lr.svd_factors(k.reshape(4, -1), 2),
        lr.tucker2(k, 2, 2),
        lr.cp_conv(k, 2, n_iter=20),
        lr.spatial_svd(k, 2),
    ]
    assert np.array_equal(k, before)
    for f in factors:
        out = lr.reconstruct(f)
        assert out.dtype == np.float64
        first = next(v for v in vars(f).values() if isinstance(v, np.ndarray))
        with pytest.raises(ValueError):
            first[...] = 0.0


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots


def test_kernels_import_only_numpy_and_tensorly():
    stdlib = {"math", "dataclasses", "typing", "collections", "warnings", "__future__"}
    assert imported_roots(KERNELS_DIR / "lowrank.py") <= stdlib | {"numpy", "tensorly"}
    # tensorly stays behind lowrank.py: rank selection is plain numpy.
    assert imported_roots(KERNELS_DIR / "rank.py") <= stdlib | {"numpy"}


# --- whitened (data-aware) SVD ---------------------------------------------------------------

def _correlated_inputs(k: int, n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 6.0)[None, :]  # a few strong directions
    return rng.standard_normal((n, k)) @ mix.T


def _output_error(x, w, approx):
    return np.linalg.norm(x @ w - x @ approx) / np.linalg.norm(x @ w)


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 40))
    x = _correlated_inputs(48)
    gram = x.T @ x / len(x)
    gains = []
    for r in (2, 8, 16, 32):
        white = lr.whitened_svd_factors(w, gram, r, ridge=1e-12)  # the ridge moves the optimum a little
        plain = lr.svd_factors(w, r)
        e_white, e_plain = _output_error(x, w, white.reconstruct()), _output_error(x, w, plain.reconstruct())
        assert e_white <= e_plain + 1e-12  # optimal in the output norm: never worse
        assert white.output_rel_error == pytest.approx(e_white, rel=1e-4, abs=1e-9)  # predicted = measured (up to the ridge)
        gains.append(e_plain / max(e_white, 1e-300))
    assert max(gains) > 3.0  # and far better where the inputs are correlated


def test_whitened_svd_equals_plain_svd_on_white_inputs():
    w = np.random.default_rng(2).standard_normal((30, 20))
    for r in (1, 5, 20):
        white = lr.whitened_svd_factors(w, 4.0 * np.eye(30), r)
        np.testing.assert_allclose(white.reconstruct(), lr.svd_factors(w, r).reconstruct(), atol=1e-10)


def test_whitened_svd_is_exact_at_full_rank_even_on_rank_deficient_inputs():
    w = np.random.default_rng(3).standard_normal((24, 16))
    x = _correlated_inputs(24)
    x[:, 5:] = 0.0  # the data never excites 19 of the 24 input directions
    gram = x.T @ x / len(x)
    full = lr.whitened_svd_factors(w, gram, 16)
    assert np.all(np.isfinite(full.left)) and np.all(np.isfinite(full.right))
    np.testing.assert_allclose(full.reconstruct(), w, atol=1e-8)
    low = lr.whitened_svd_factors(w, gram, 5)  # rank of the data: the output is reproduced
    assert _output_error(x, w, low.reconstruct()) < 1e-6


def test_whitened_svd_columns_side_is_the_transposed_problem():
    w = np.random.default_rng(4).standard_normal((20, 36))   # y = w @ x, x has 36 features
    x = _correlated_inputs(36)
    gram = x.T @ x / len(x)
    cols = lr.whitened_svd_factors(w, gram, 6, side="cols")
    rows = lr.whitened_svd_factors(w.T, gram, 6, side="rows")
    np.testing.assert_allclose(cols.reconstruct(), rows.reconstruct().T, atol=1e-10)
    assert cols.left.shape == (20, 6) and cols.right.shape == (6, 36)
    assert cols.rel_error == pytest.approx(lr.relative_error(w, cols.reconstruct()))


def test_whitened_svd_rejects_bad_arguments():
    w = np.ones((4, 3))
    with pytest.raises(ValueError, match="gram must be 4×4"):
        lr.whitened_svd_factors(w, np.eye(3), 2)
    with pytest.raises(ValueError, match="side"):
        lr.whitened_svd_factors(w, np.eye(4), 2, side="left")
    with pytest.raises(ValueError, match="rank"):
        lr.whitened_svd_factors(w, np.eye(4), 4)


def test_whitened_tucker2_beats_tucker2_on_correlated_channels():
    rng = np.random.default_rng(5)
    k = rng.standard_normal((24, 32, 3, 3))
    mix = rng.standard_normal((32, 32)) * np.exp(-np.arange(32) / 4.0)[None, :]
    x = np.einsum("ij,njhw->nihw", mix, rng.standard_normal((40, 32, 9, 9)))  # channels correlated
    chans = np.moveaxis(x, 1, -1).reshape(-1, 32)
    gram = chans.T @ chans / len(chans)
    ref = conv2d(x, k)
    err = {}
    for name, f in (("white", lr.whitened_tucker2(k, gram, 12, 8)), ("plain", lr.tucker2(k, 12, 8))):
        err[name] = np.linalg.norm(conv2d(x, f.reconstruct()) - ref) / np.linalg.norm(ref)
    assert err["white"] < 0.5 * err["plain"], err
    full = lr.whitened_tucker2(k, gram, 24, 32)
    np.testing.assert_allclose(full.reconstruct(), k, atol=1e-8)
    np.testing.assert_allclose(lr.whitened_tucker2(k, 2.0 * np.eye(32), 12, 8).reconstruct(),
                               lr.tucker2(k, 12, 8).reconstruct(), atol=1e-8)


def _smooth_images(rng, n, c, hw):
    """Feature maps whose neighbouring pixels are correlated (a 3×3 box blur of noise), as in images."""
    x = rng.standard_normal((n, c, hw + 2, hw + 2))
    return sum(x[:, :, dy:dy + hw, dx:dx + hw] for dy in range(3) for dx in range(3)) / 3.0


def _patch_gram(x, kh, kw):
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n,c,H',W',kh,kw
    rows = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)  # channel major, tap minor
    return rows.T @ rows / len(rows)


def test_patch_tucker2_beats_whitened_tucker2_on_correlated_pixels():
    rng = np.random.default_rng(7)
    k = rng.standard_normal((24, 16, 3, 3))
    x = _smooth_images(rng, 30, 16, 10)
    ref = conv2d(x, k)
    chans = np.moveaxis(x, 1, -1).reshape(-1, 16)
    white = lr.whitened_tucker2(k, chans.T @ chans / len(chans), 8, 6)
    patch = lr.patch_tucker2(k, _patch_gram(x, 3, 3), 8, 6)
    assert patch.ranks == white.ranks == (8, 6)
    err = {name: np.linalg.norm(conv2d(x, f.reconstruct()) - ref) / np.linalg.norm(ref)
           for name, f in (("white", white), ("patch", patch))}
    assert err["patch"] < 0.97 * err["white"], err  # a random kernel: a modest but sure gain
    full = lr.patch_tucker2(k, _patch_gram(x, 3, 3), 24, 16)
    np.testing.assert_allclose(full.reconstruct(), k, atol=1e-6)
    with pytest.raises(ValueError, match="patch_gram"):
        lr.patch_tucker2(k, np.eye(16), 8, 6)
