"""Tests of the quantization kernel: the s/2 round-trip bound, exact grid points, scale layouts,
bit-exact agreement with onnxruntime's QuantizeLinear/DequantizeLinear, the ONNX INT4/INT2
packing, and the binary/ternary (TWN) weight fits."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graph_opt.kernels import quant as q

FUZZ = settings(derandomize=True, max_examples=60, deadline=None, print_blob=True)
DTYPES = list(q.DTYPE_RANGES)


def broadcast_scale(p: q.QuantParams, shape: tuple[int, ...]) -> np.ndarray:
    """Scale of every element, built independently of the kernel's own broadcasting."""
    s = p.scale.astype(np.float64)
    if p.axis is None:
        return np.full(shape, float(s))
    a = p.axis % len(shape)
    if p.block_size is None:
        view = [1] * len(shape)
        view[a] = shape[a]
        return np.broadcast_to(s.reshape(view), shape)
    idx = [slice(None)] * len(shape)
    idx[a] = np.arange(shape[a]) // p.block_size
    return s[tuple(idx)]


# --------------------------------------------------------------------------- ranges, layouts


def test_dtype_ranges_match_onnx_saturation():
    assert q.DTYPE_RANGES == {
        "int8": (-128, 127),
        "uint8": (0, 255),
        "int4": (-8, 7),
        "uint4": (0, 15),
        "int2": (-2, 1),
        "uint2": (0, 3),
    }
    assert [q.symmetric_steps(d) for d in ("int8", "uint8", "int4", "uint4", "int2")] == [
        127,
        127,
        7,
        7,
        1,
    ]
    with pytest.raises(ValueError, match="unknown quantized dtype"):
        q.qrange("int3")


def test_scale_shapes_per_tensor_axis_block():
    x = np.random.default_rng(0).standard_normal((5, 7, 3)).astype(np.float32)
    p = q.compute_params(x, "int8")
    assert p.scale.shape == () and p.zero_point.shape == () and p.granularity == "tensor"
    p = q.compute_params(x, "int8", axis=1)
    assert p.scale.shape == (7,) and p.zero_point.shape == (7,) and p.axis == 1
    p = q.compute_params(x, "int4", axis=-2, block_size=3)  # 7 -> ceil(7/3) = 3 blocks
    assert p.scale.shape == (5, 3, 3) and p.axis == 1 and p.block_size == 3
    assert p.scale.dtype == np.float32 and p.zero_point.dtype == np.int8
    assert q.compute_params(x, "uint4", symmetric=False).zero_point.dtype == np.uint8
    # The last, short block (element 6) has its own scale from that element alone.
    np.testing.assert_allclose(p.scale[:, 2, :], np.abs(x[:, 6, :]) / 7, rtol=1e-6)


def test_blockwise_params_for_matmul_weight():
    w = np.random.default_rng(1).standard_normal((100, 6)).astype(np.float32)  # (K, N)
    p = q.blockwise_params(w, 32, 0)
    assert p.dtype == "int4" and p.scale.shape == (4, 6) and np.all(p.zero_point == 0)
    np.testing.assert_allclose(p.scale[1], np.abs(w[32:64]).max(axis=0) / 7, rtol=1e-6)
    err = np.abs(q.fake_quantize(w, p) - w)
    assert np.all(err <= broadcast_scale(p, w.shape) / 2 * (1 + 1e-5))


@FUZZ
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    symmetric=st.booleans(),
    mode=st.sampled_from(["tensor", "axis", "block"]),
    offset=st.floats(-3, 3),
    magnitude=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_round_trip_error_at_most_half_scale(
    seed, shape, dtype, symmetric, mode, offset, magnitude
):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal(shape) + offset) * magnitude).astype(np.float32)
    axis = None if mode == "tensor" else int(rng.integers(-len(shape), len(shape)))
    block = int(rng.integers(1, 4)) if mode == "block" else None
    p = q.compute_params(x, dtype, symmetric=symmetric, axis=axis, block_size=block)
    codes = q.quantize(x, p)
    qmin, qmax = q.qrange(dtype)
    assert codes.dtype == q.storage_dtype(dtype) and codes.min() >= qmin and codes.max() <= qmax
    err = np.abs(q.dequantize(codes, p).astype(np.float64) - x)
    s = broadcast_scale(p, x.shape)
    # s/2 plus a few float32 ulps for the division and product.
    assert np.all(err <= s / 2 + 4 * np.spacing(np.abs(x).astype(np.float32)) + 1e-30)
    # 0.0 is always exactly representable.
    assert np.all(q.fake_quantize(np.zeros_like(x), p) == 0.0)


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES), symmetric=st.booleans())
def test_values_on_the_grid_come_back_exact(seed, dtype, symmetric):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 9)).astype(np.float32) * float(rng.uniform(0.01, 100))
    p = q.compute_params(x, dtype, symmetric=symmetric, axis=0)
    qmin, qmax = q.qrange(dtype)
    codes = rng.integers(qmin, qmax + 1, size=x.shape).astype(q.storage_dtype(dtype))
    grid = q.dequantize(codes, p)
    np.testing.assert_array_equal(q.quantize(grid, p), codes)
    np.testing.assert_array_equal(q.dequantize(q.quantize(grid, p), p), grid)


def test_symmetric_zero_points_and_both_ends_representable():
    x = np.array([-3.0, 0.5, 2.0], dtype=np.float32)
    for dtype, z, k in [
        ("int8", 0, 127),
        ("uint8", 128, 127),
        ("int4", 0, 7),
        ("uint4", 8, 7),
        ("int2", 0, 1),
    ]:
        p = q.compute_params(x, dtype)
        assert int(p.zero_point) == z and p.symmetric
        assert float(p.scale) == pytest.approx(3.0 / k, rel=1e-6)
        codes = q.quantize(np.array([-3.0, 3.0], np.float32), p)
        assert codes.tolist() == [z - k, z + k]
        np.testing.assert_allclose(q.dequantize(codes, p), [-3.0, 3.0], rtol=1e-6)


def test_asymmetric_range_always_includes_zero():
    x = np.array([2.0, 5.0, 10.0], dtype=np.float32)  # all positive: range widened to [0, 10]
    p = q.compute_params(x, "uint8", symmetric=False)
    assert int(p.zero_point) == 0 and float(p.scale) == pytest.approx(10.0 / 255, rel=1e-6)
    p = q.compute_params(-x, "int8", symmetric=False)  # all negative: [-10, 0]
    assert int(p.zero_point) == 127
    p = q.compute_params((np.float32(-1.0), np.float32(3.0)), "uint8", symmetric=False)
    assert int(p.zero_point) == round(255 / 4) and q.fake_quantize(np.float32(0.0), p) == 0.0
    assert q.compute_params((-1.0, 3.0), "int8").scale == np.float32(3.0 / 127)


def test_range_tuple_gives_the_same_params_as_the_data():
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    for symmetric in (True, False):
        ranges = [((x.min(), x.max()), {}), ((x.min(1), x.max(1)), {"axis": 0})]
        blocks = x.reshape(3, 2, 4)
        ranges.append(((blocks.min(2), blocks.max(2)), {"axis": 1, "block_size": 4}))
        for rng_pair, kw in ranges:
            a = q.compute_params(rng_pair, "int8", symmetric=symmetric, **kw)
            b = q.compute_params(x, "int8", symmetric=symmetric, **kw)
            np.testing.assert_array_equal(a.scale, b.scale)
            np.testing.assert_array_equal(a.zero_point, b.zero_point)
    with pytest.raises(ValueError, match="lo > hi"):
        q.compute_params((1.0, -1.0), "int8")
    with pytest.raises(ValueError, match="per-tensor range"):
        q.compute_params((np.zeros(2), np.ones(2)), "int8")


def test_all_zero_channel_gets_a_tiny_positive_scale_and_round_trips():
    w = np.zeros((3, 4), np.float32)
    w[1] = [0.5, -1.0, 0.25, 0.0]
    for symmetric in (True, False):
        p = q.compute_params(w, "int8", symmetric=symmetric, axis=0)
        assert np.all(p.scale > 0) and p.scale[0] == np.float32(q.MIN_SCALE)
        out = q.fake_quantize(w, p)
        assert np.all(out[[0, 2]] == 0.0) and out[1, 3] == 0.0
        assert np.abs(out[1] - w[1]).max() <= float(p.scale[1]) / 2
    p = q.compute_params(np.zeros(5, np.float32), "int4", axis=0, block_size=2)
    assert np.all(p.scale == np.float32(q.MIN_SCALE))
    assert np.all(q.fake_quantize(np.zeros(5, np.float32), p) == 0.0)


def test_rounds_half_to_even_and_saturates():
    p = q.QuantParams(scale=np.float32(0.5), zero_point=np.int8(0), dtype="int8")
    x = np.array(
        [0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 1e6, -1e6, np.inf, -np.inf, np.nan], np.float32
    )
    assert q.quantize(x, p).tolist() == [0, 2, 2, 0, -2, -2, 127, -128, 127, -128, 0]
    pu = q.QuantParams(scale=np.float32(0.5), zero_point=np.uint8(10), dtype="uint4")
    assert q.quantize(np.array([-10.0, 0.75, 10.0], np.float32), pu).tolist() == [0, 12, 15]


def test_refuses_non_finite_data_and_bad_params():
    with pytest.raises(ValueError, match="non-finite"):
        q.compute_params(np.array([1.0, np.nan]), "int8")
    with pytest.raises(ValueError, match="finite"):
        q.compute_params((-np.inf, 1.0), "int8")
    with pytest.raises(ValueError, match="strictly positive"):
        q.QuantParams(scale=np.float32(0.0), zero_point=np.int8(0), dtype="int8")
    with pytest.raises(ValueError, match="zero_point outside"):
        q.QuantParams(scale=np.float32(1.0), zero_point=np.int8(5), dtype="int2")
    with pytest.raises(ValueError, match="per-axis scale"):
        q.quantize(np.zeros((2, 3)), q.compute_params(np.ones((2, 4)), "int8", axis=1))
    with pytest.raises(ValueError, match="blocked scale"):
        q.quantize(
            np.zeros((2, 9)), q.compute_params(np.ones((2, 4)), "int8", axis=1, block_size=2)
        )
    with pytest.raises(ValueError, match="axis"):
        q.compute_params(np.ones((2, 3)), "int8", axis=2)


def test_params_are_frozen_and_read_only():
    scale = np.array([1.0, 2.0], np.float32)
    p = q.QuantParams(scale=scale, zero_point=np.zeros(2, np.int8), dtype="int8", axis=0)
    scale[0] = 5.0  # the caller's array is copied
    assert p.scale[0] == 1.0
    with pytest.raises(ValueError):
        p.scale[0] = 3.0
    with pytest.raises(AttributeError):
        p.dtype = "uint8"  # type: ignore[misc]


# --------------------------------------------------------------------------- onnxruntime parity


def _run(nodes, inits, x: np.ndarray, out_type: int, opset: int) -> np.ndarray:
    in_type = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", in_type, list(x.shape))],
        [helper.make_tensor_value_info("y", out_type, list(x.shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _attrs(p: q.QuantParams) -> dict:
    attrs = {} if p.axis is None else {"axis": p.axis}
    if p.block_size is not None:
        attrs["block_size"] = p.block_size
    return attrs


def _packed_initializer(name: str, codes: np.ndarray, dtype: str) -> onnx.TensorProto:
    """An INT4/UINT4/INT2/UINT2 initializer whose raw bytes come from our own packing."""
    kind = {
        "int4": TensorProto.INT4,
        "uint4": TensorProto.UINT4,
        "int2": TensorProto.INT2,
        "uint2": TensorProto.UINT2,
    }[dtype]
    t = onnx.TensorProto()
    t.name, t.data_type = name, kind
    t.dims.extend(codes.shape)
    t.raw_data = (q.pack_int4(codes) if "4" in dtype else q.pack_int2(codes)).tobytes()
    return t


def _tie_heavy_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian data plus exact half-integers of a power-of-two step to exercise ties-to-even."""
    x = rng.standard_normal(shape).astype(np.float32) * 3
    ties = (rng.integers(-300, 300, size=shape) + 0.5) * 2.0**-4
    return np.where(rng.random(shape) < 0.3, ties, x).astype(np.float32)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 1, 0])
def test_matches_onnxruntime_8bit(dtype, symmetric, axis):
    rng = np.random.default_rng(7)
    x = _tie_heavy_input(rng, (6, 5, 4))
    calib = x * 0.8  # a narrower calibration range, so some values saturate
    p = q.compute_params(calib, dtype, symmetric=symmetric, axis=axis)
    zp = numpy_helper.from_array(p.zero_point, "z")
    s = numpy_helper.from_array(p.scale, "s")
    qtype = helper.np_dtype_to_tensor_dtype(p.zero_point.dtype)
    got = _run(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **_attrs(p))],
        [s, zp],
        x,
        qtype,
        21,
    )
    codes = q.quantize(x, p)
    assert got.dtype == codes.dtype
    np.testing.assert_array_equal(got, codes)
    # DequantizeLinear on the codes as a graph input.
    deq = _run(
        [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], **_attrs(p))],
        [s, zp],
        codes,
        TensorProto.FLOAT,
        21,
    )
    np.testing.assert_array_equal(deq, q.dequantize(codes, p))
    # Per-tensor with a power-of-two scale: every tie input is an exact tie.
    p2 = q.QuantParams(
        scale=np.float32(2.0**-3), zero_point=np.asarray(p.zero_point.flat[0]), dtype=dtype
    )
    got = _run(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        [numpy_helper.from_array(p2.scale, "s"), numpy_helper.from_array(p2.zero_point, "z")],
        x,
        qtype,
        21,
    )
    np.testing.assert_array_equal(got, q.quantize(x, p2))


@pytest.mark.parametrize("dtype,symmetric", [("int4", True), ("int4", False), ("uint4", False)])
def test_matches_onnxruntime_int4_blocked(dtype, symmetric):
    rng = np.random.default_rng(11)
    w = _tie_heavy_input(rng, (10, 6))  # (K, N), K = 10 not a multiple of the block
    p = q.blockwise_params(w * 0.9, 4, 0, dtype, symmetric=symmetric)
    s = numpy_helper.from_array(p.scale, "s")
    zp = _packed_initializer("z", p.zero_point, dtype)
    # onnxruntime cannot hand 4-bit tensors to numpy: cast the codes to int8 inside the graph.
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=0, block_size=4),
        helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT8),
    ]
    codes = q.quantize(w, p)
    np.testing.assert_array_equal(
        _run(nodes, [s, zp], w, TensorProto.INT8, 21), codes.astype(np.int8)
    )
    # DequantizeLinear of a constant whose bytes are our pack_int4 output.
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["d"], axis=0, block_size=4),
        helper.make_node("Add", ["d", "x"], ["y"]),
    ]
    got = _run(
        nodes,
        [_packed_initializer("w", codes, dtype), s, zp],
        np.zeros_like(w),
        TensorProto.FLOAT,
        21,
    )
    np.testing.assert_array_equal(got, q.dequantize(codes, p))


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_onnxruntime_dequantizes_our_packed_int2_weights(kind):
    w = np.random.default_rng(3).standard_normal((5, 7)).astype(np.float32)
    codes, p = (q.ternary_weights if kind == "ternary" else q.binary_weights)(w, axis=0)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["d"], axis=0),
        helper.make_node("Add", ["d", "x"], ["y"]),
    ]
    inits = [
        _packed_initializer("w", codes, "int2"),
        numpy_helper.from_array(p.scale, "s"),
        _packed_initializer("z", p.zero_point, "int2"),
    ]
    got = _run(nodes, inits, np.zeros_like(w), TensorProto.FLOAT, 25)
    np.testing.assert_array_equal(got, q.dequantize(codes, p))


# --------------------------------------------------------------------------- packing


@FUZZ
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 37),
    bits=st.sampled_from([2, 4]),
    signed=st.booleans(),
)
def test_packing_round_trips_and_matches_onnx(seed, n, bits, signed):
    rng = np.random.default_rng(seed)
    name = ("int" if signed else "uint") + str(bits)
    qmin, qmax = q.qrange(name)
    codes = rng.integers(qmin, qmax + 1, size=n).astype(np.int8 if signed else np.uint8)
    pack, unpack = (q.pack_int4, q.unpack_int4) if bits == 4 else (q.pack_int2, q.unpack_int2)
    packed = pack(codes)
    assert packed.dtype == np.uint8 and packed.size == -(-n // (8 // bits))
    back = unpack(packed, n, signed=signed)
    assert back.dtype == codes.dtype
    np.testing.assert_array_equal(back, codes)
    # onnx's own serialization of the same values (via ml_dtypes) gives the same bytes.
    ref = numpy_helper.from_array(codes.astype(getattr(ml_dtypes, name)), "t")
    assert ref.raw_data == packed.tobytes()
    np.testing.assert_array_equal(
        numpy_helper.to_array(ref).astype(np.int16),
        unpack(np.frombuffer(ref.raw_data, np.uint8), n, signed=signed),
    )


def test_packing_order_first_element_in_low_bits():
    assert q.pack_int4([1, 2, 3]).tolist() == [0x21, 0x03]
    assert q.pack_int4([-1, 7]).tolist() == [0x7F]
    assert q.pack_int2([1, 0, -1, -2, 1]).tolist() == [0b10_11_00_01, 0b01]
    assert q.unpack_int4(np.array([0x21, 0x03], np.uint8), (3,)).tolist() == [1, 2, 3]
    assert q.unpack_int2(q.pack_int2(np.ones((2, 3), np.int8)), (2, 3)).shape == (2, 3)


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        q.pack_int4([16])
    with pytest.raises(ValueError, match="outside"):
        q.pack_int2([-3])
    with pytest.raises(ValueError, match="integers"):
        q.pack_int4([0.5])
    with pytest.raises(ValueError, match="bytes"):
        q.unpack_int4(np.zeros(3, np.uint8), 7)


# --------------------------------------------------------------------------- binary / ternary


def test_ternary_weights_follow_twn():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 2, 2)).astype(np.float32) * rng.uniform(
        0.1, 3, size=(6, 1, 1, 1)
    ).astype(np.float32)
    codes, p = q.ternary_weights(w, axis=0)
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 0, 1}
    assert p.dtype == "int2" and p.axis == 0 and p.scale.shape == (6,) and np.all(p.zero_point == 0)
    for c in range(6):
        a = np.abs(w[c].astype(np.float64))
        delta = 0.7 * a.mean()
        keep = a > delta
        np.testing.assert_array_equal(codes[c], np.sign(w[c]) * keep)
        assert p.scale[c] == pytest.approx(a[keep].mean(), rel=1e-6)
        # alpha is the least-squares magnitude for that support: nudging it only hurts.
        errs = [
            np.sum((w[c] - alpha * codes[c]) ** 2)
            for alpha in p.scale[c] * np.array([1.0, 1.01, 0.99])
        ]
        assert errs[0] <= min(errs[1:])
    np.testing.assert_allclose(q.dequantize(codes, p), p.scale.reshape(6, 1, 1, 1) * codes, rtol=0)


def test_ternary_other_axis_and_zero_channel():
    w = np.array([[0.0, 2.0, -0.1], [0.0, -2.0, 0.1]], np.float32)  # channels along axis 1
    codes, p = q.ternary_weights(w, axis=1)
    assert p.axis == 1 and p.scale.shape == (3,)
    assert codes[:, 0].tolist() == [0, 0] and p.scale[0] == np.float32(q.MIN_SCALE)
    assert codes[:, 1].tolist() == [1, -1] and p.scale[1] == 2.0
    assert np.all(q.dequantize(codes, p)[:, 0] == 0.0)


def test_binary_weights_are_alpha_sign():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    w[2, 3] = 0.0
    codes, p = q.binary_weights(w, axis=0)
    assert set(np.unique(codes)) == {-1, 1} and codes[2, 3] == 1  # sign(0) -> +1
    np.testing.assert_allclose(p.scale, np.abs(w).mean(axis=1), rtol=1e-6)
    assert p.dtype == "int2" and np.all(p.zero_point == 0)
    np.testing.assert_allclose(
        q.dequantize(codes, p), p.scale[:, None] * np.where(w >= 0, 1, -1), rtol=0
    )
    codes_t, p_t = q.binary_weights(w.T, axis=1)
    np.testing.assert_array_equal(codes_t, codes.T)
    np.testing.assert_array_equal(p_t.scale, p.scale)


def test_binary_ternary_refuse_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        q.ternary_weights(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="non-finite"):
        q.binary_weights(np.array([[np.nan, 1.0]]))


# --------------------------------------------------------------------------- hygiene


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_quant_and_calib_import_only_numpy():
    here = Path(q.__file__).resolve().parent
    for name in ("quant.py", "calib.py"):
        assert _imported_roots(here / name) <= set(sys.stdlib_module_names) | {"numpy"}, name


def test_inputs_untouched_and_deterministic():
    x = np.random.default_rng(9).standard_normal((8, 5)).astype(np.float32)
    x0 = x.copy()
    p1 = q.compute_params(x, "int4", axis=0, block_size=3, symmetric=False)
    p2 = q.compute_params(x, "int4", axis=0, block_size=3, symmetric=False)
    np.testing.assert_array_equal(p1.scale, p2.scale)
    np.testing.assert_array_equal(q.quantize(x, p1), q.quantize(x, p2))
    q.ternary_weights(x)
    q.binary_weights(x)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int4"])
def test_per_tensor_fake_quantize_fast_path_equals_quantize_dequantize(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 33)) * 4).astype(np.float32)
    x[0, :5] = [np.nan, np.inf, -np.inf, 1e30, -1e30]
    x[1, :4] = [0.5, 1.5, -0.5, 2.5]  # ties: half to even after the division
    for params in (q.compute_params((-3.0, 5.0), dtype, symmetric=False),
                   q.compute_params((-4.0, 4.0), dtype, symmetric=True),
                   q.QuantParams(np.float32(1.0), np.array(0, q.storage_dtype(dtype)), dtype)):
        fast = q.fake_quantize(x, params)
        slow = q.dequantize(q.quantize(x, params), params)
        assert fast.dtype == np.float32 and fast.shape == x.shape
        assert np.array_equal(fast, slow)
        assert fast[0, 0] == 0.0  # NaN has no code: the zero point, i.e. 0.0
    assert q.fake_quantize(np.float64(0.3), params).shape == ()


# --- GPTQ rounding -----------------------------------------------------------------------------

def _correlated(n, k, seed=0):
    mix = np.random.default_rng(100).standard_normal((k, k)) * np.exp(-np.arange(k) / 10.0)[None, :]
    return np.random.default_rng(seed).standard_normal((n, k)) @ mix.T


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["x@W", "x@W.T"])
def test_gptq_rounding_lowers_the_output_error(dtype, layout):
    k, n = 96, 48
    w = (np.random.default_rng(1).standard_normal((k, n)) * 0.1).astype(np.float32)
    x, held = _correlated(3000, k), _correlated(1000, k, seed=1)
    h = x.T @ x / len(x)
    stored, in_axis, axis = (w, 0, 1) if layout == "x@W" else (w.T.copy(), 1, 0)
    p = q.compute_params(stored, dtype, symmetric=True, axis=axis)
    limits = (-q.symmetric_steps(dtype), q.symmetric_steps(dtype))
    codes = q.gptq_quantize(stored, p, h, in_axis, limits=limits)
    assert codes.dtype == q.quantize(stored, p).dtype and codes.min() >= limits[0] and codes.max() <= limits[1]

    def err(codes):
        deq = q.dequantize(codes, p)
        approx = deq if layout == "x@W" else deq.T
        return np.linalg.norm(held @ w - held @ approx) / np.linalg.norm(held @ w)

    assert err(codes) < 0.6 * err(q.quantize(stored, p))  # on inputs it never saw


def test_gptq_on_white_inputs_is_nearest_rounding():
    w = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    for params in (q.compute_params(w, "int8", axis=1), q.compute_params(w, "int4", symmetric=False, axis=None),
                   q.blockwise_params(w, 16, axis=0, dtype="int4")):
        assert np.array_equal(q.gptq_quantize(w, params, 3.0 * np.eye(40), 0), q.quantize(w, params))


def test_gptq_keeps_nearest_rounding_for_unexcited_inputs_and_checks_shapes():
    w = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    p = q.compute_params(w, "int8", axis=1)
    h = np.zeros((16, 16))
    assert np.array_equal(q.gptq_quantize(w, p, h, 0), q.quantize(w, p))  # no data: nothing to follow
    with pytest.raises(ValueError, match="hessian must be 16×16"):
        q.gptq_quantize(w, p, np.eye(8), 0)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_chained_target_is_the_weight_when_the_input_is_unchanged(in_axis):
    x = _correlated(2000, 24)
    w = np.random.default_rng(4).standard_normal((24, 10) if in_axis == 0 else (10, 24)).astype(np.float32)
    h = x.T @ x / len(x)
    np.testing.assert_allclose(q.chained_target(w, h, h, in_axis), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_chained_target_corrects_the_error_already_in_the_input(in_axis):
    """x̂ = x + e (an upstream layer's error, correlated with x): W x is matched better by W' x̂
    than by W x̂, on inputs never seen; undamped, W' is the least-squares fit."""
    k, n = 32, 12
    rng = np.random.default_rng(5)
    distort = np.eye(k) + 0.1 * rng.standard_normal((k, k))
    x, held = _correlated(4000, k), _correlated(1000, k, seed=1)
    xq, held_q = x @ distort.T, held @ distort.T
    rows = rng.standard_normal((n, k)).astype(np.float32)  # (outputs, inputs)
    w = rows.T if in_axis == 0 else rows
    h, c = xq.T @ xq / len(x), x.T @ xq / len(x)
    aim = q.chained_target(w, c, h, in_axis, damp=0.0)
    aim_rows = aim.T if in_axis == 0 else aim
    assert aim.shape == w.shape and aim.dtype == np.float32

    def err(m):
        return np.linalg.norm(held @ rows.T - held_q @ m.T) / np.linalg.norm(held @ rows.T)

    assert err(aim_rows) < 0.1 * err(rows)
    lstsq = np.linalg.lstsq(xq, x @ rows.T, rcond=None)[0].T
    np.testing.assert_allclose(aim_rows, lstsq, rtol=1e-3, atol=1e-3)
    # heavy damping pulls the aim back to the weight; unexcited inputs keep theirs
    np.testing.assert_allclose(q.chained_target(w, c, h, in_axis, damp=1e6), w, rtol=1e-3, atol=1e-4)
    h[3, :] = h[:, 3] = c[3, :] = c[:, 3] = 0.0
    kept = q.chained_target(w, c, h, in_axis)
    np.testing.assert_array_equal(np.take(kept, 3, axis=in_axis), np.take(w, 3, axis=in_axis))
    with pytest.raises(ValueError, match="must be 32×32"):
        q.chained_target(w, c[:8, :8], h, in_axis)


# ----------------------------------------------------------------------------- block-wise GPTQ


def _mixed_inputs(k: int, rows: int = 4096, seed: int = 0) -> np.ndarray:
    """Inputs whose features are strongly correlated (a random mixing of white noise)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * (2.0 / np.sqrt(k)) + np.eye(k)
    return (rng.standard_normal((rows, k)) @ mix).astype(np.float32)


def test_inverse_cholesky_upper_factors_the_damped_inverse():
    x = _mixed_inputs(300, rows=2000)
    h = x.T.astype(np.float64) @ x / len(x)
    h[7, :] = h[:, 7] = 0.0  # a feature the data never excites
    u = q.inverse_cholesky_upper(h, damp=0.01)
    assert np.allclose(u, np.triu(u))
    fixed = h.copy()
    fixed[7, 7] = 1.0
    fixed[np.diag_indices(300)] += 0.01 * np.mean(np.diag(fixed))
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(fixed), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_gptq_blockwise_on_white_inputs_is_nearest_rounding_on_the_same_grid(in_axis):
    w = np.random.default_rng(3).standard_normal((96, 40) if in_axis == 0 else (40, 96)).astype(np.float32)
    codes, p = q.gptq_blockwise(w, np.eye(96), in_axis, 32, damp=0.0)
    ref = q.blockwise_params(w, 32, in_axis, "int4")
    np.testing.assert_array_equal(p.scale, ref.scale)
    np.testing.assert_array_equal(p.zero_point, ref.zero_point)
    np.testing.assert_array_equal(codes, q.quantize(w, ref))
    assert p.block_size == 32 and p.axis == in_axis and codes.dtype == np.int8


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_blockwise_beats_nearest_rounding_on_correlated_inputs(symmetric):
    k, n = 256, 48
    x = _mixed_inputs(k)
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    codes, p = q.gptq_blockwise(w, h, 0, 64, symmetric=symmetric)
    ref = q.blockwise_params(w, 64, 0, "int4", symmetric=symmetric)
    err_gptq = np.linalg.norm(x @ w - x @ q.dequantize(codes, p))
    err_rtn = np.linalg.norm(x @ w - x @ q.dequantize(q.quantize(w, ref), ref))
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    lo, hi = (-7, 7) if symmetric else (-8, 7)
    assert codes.min() >= lo and codes.max() <= hi
    # the block scales were chosen as GPTQ went: not the float weight's (blocks after the first moved)
    assert not np.array_equal(p.scale, ref.scale)
    np.testing.assert_array_equal(p.scale[0], q.blockwise_params(w[:64], 64, 0, "int4", symmetric=symmetric).scale[0])


def test_gptq_blockwise_window_lies_between_nearest_and_full():
    k, n = 512, 32
    x = _mixed_inputs(k, seed=2)
    w = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)

    def err(codes, p):
        return np.linalg.norm(x @ w - x @ q.dequantize(codes, p))

    full = err(*q.gptq_blockwise(w, h, 0, 64))
    windowed = err(*q.gptq_blockwise(w, h, 0, 64, window=128))
    ref = q.blockwise_params(w, 64, 0, "int4")
    rtn = err(q.quantize(w, ref), ref)
    assert full < windowed < rtn, (full, windowed, rtn)
    with pytest.raises(ValueError, match="multiple of block_size"):
        q.gptq_blockwise(w, h, 0, 64, window=96)
    with pytest.raises(ValueError, match="hessian must be"):
        q.gptq_blockwise(w, h[:10, :10], 0, 64)
