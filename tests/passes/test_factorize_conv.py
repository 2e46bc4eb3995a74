"""factorize_conv: Tucker-2 and spatial SVD exact on kernels of known low rank (strides, pads,
dilations, auto_pad, bias, groups, 1-D/3-D), CP exact on a known CP-rank kernel and within its
weight error otherwise; rank rules, defaults and skips with reasons."""

import numpy as np
import pytest
from builders import GraphBuilder, assert_valid, op_count, random_input, run, small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st

from graph_opt.errors import SpecError
from graph_opt.kernels.rank import tucker2_ranks_for_budget
from graph_opt.passes.factorize_conv import FactorizeConv
from graph_opt.registry import parse_spec


def tucker_kernel(o, i, kernel, r_out, r_in, groups=1, seed=0):
    """A kernel whose every group has multilinear (channel) ranks (r_out, r_in)."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(groups):
        core = rng.standard_normal((r_out, r_in, *kernel))
        a, b = rng.standard_normal((o // groups, r_out)), rng.standard_normal((i // groups, r_in))
        parts.append(np.einsum("pq...,op,iq->oi...", core, a, b) / np.sqrt(r_out * r_in))
    return np.concatenate(parts).astype(np.float32)


def spatial_kernel(o, i, kh, kw, r, groups=1, seed=0):
    """A kernel whose arranged matrix M[(i,y),(o,x)] has rank r in every group."""
    rng = np.random.default_rng(seed)
    parts = [np.einsum("riy,orx->oiyx", rng.standard_normal((r, i // groups, kh)),
                       rng.standard_normal((o // groups, r, kw))) / np.sqrt(r) for _ in range(groups)]
    return np.concatenate(parts).astype(np.float32)


def cp_kernel(o, i, kh, kw, r, groups=1, seed=0):
    rng = np.random.default_rng(seed)
    parts = [np.einsum("or,ir,yr,xr->oiyx", *(rng.standard_normal((d, r)) for d in (o // groups, i // groups, kh, kw)))
             for _ in range(groups)]
    return np.concatenate(parts).astype(np.float32)


def conv_model(w, spatial, *, bias=True, group=1, name="conv", **attrs):
    g = GraphBuilder()
    o, i = w.shape[0], w.shape[1] * group
    x = g.input("x", ["N", i, *spatial])
    ins = [x, g.const(f"{name}.w", w)] + ([g.weight(f"{name}.b", (o,))] if bias else [])
    g.node("Conv", ins, ["y"], name=name, kernel_shape=list(w.shape[2:]), group=group, **attrs)
    g.output("y", ["N", o, *[f"s{a}" for a in range(len(spatial))]])
    return g.build()


def parity(model, new, shape, seed=1):
    x = random_input(shape, seed=seed)
    ref, out = run(model, {"x": x})[0], run(new, {"x": x})[0]
    return float(np.max(np.abs(ref - out)) / float(np.max(np.abs(ref))))


def fired(result, n_nodes):
    assert result.modified and len(result.report.rewritten) == 1, result.report.skipped
    assert op_count(result.model, "Conv") == n_nodes
    assert_valid(result.model)
    return result.report.rewritten[0]


def skip_reasons(result):
    return {s.node: s.reason for s in result.report.skipped}


ATTRS = [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 0, 2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2], "strides": [1, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [1, 2]},  # onnxruntime refuses dilation with SAME
    {"auto_pad": "VALID"},
]


# --------------------------------------------------------------------------------------------
# Tucker-2


@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: ",".join(a))
@pytest.mark.parametrize("bias", [True, False])
def test_tucker2_exact_at_the_kernels_ranks(attrs, bias):
    w = tucker_kernel(64, 48, (3, 3), 16, 16)
    model = conv_model(w, [11, 10], bias=bias, **attrs)
    assert op_count(model, "Conv") == 1  # vacuity guard
    before = model.SerializeToString()
    result = FactorizeConv(rank=16)(model)
    assert model.SerializeToString() == before
    info = fired(result, 3)
    assert info["rank"] == [16, 16] and info["weight_rel_error"] < 1e-6
    assert info["new_nodes"] == ["conv/tucker2_0", "conv/tucker2_1", "conv/tucker2_2"] and info["output"] == "y"
    assert info["params_after"] == 48 * 16 + 16 * 16 * 9 + 16 * 64
    assert [len(n.input) for n in result.model.graph.node] == [2, 2, 3 if bias else 2]
    assert parity(model, result.model, [2, 48, 11, 10]) < 1e-4


def test_tucker2_grouped_conv_per_group():
    w = tucker_kernel(64, 64, (3, 3), 8, 8, groups=2)
    model = conv_model(w, [8, 8], group=2, pads=[1, 1, 1, 1], strides=[2, 2])
    result = FactorizeConv(rank=8)(model)
    info = fired(result, 3)
    assert info["group"] == 2 and info["rank"] == [8, 8]
    assert info["params_after"] == 2 * (32 * 8 + 8 * 8 * 9 + 8 * 32)
    assert all(a.i == 2 for n in result.model.graph.node for a in n.attribute if a.name == "group")
    assert parity(model, result.model, [2, 64, 8, 8]) < 1e-4


@pytest.mark.parametrize("kernel, spatial, attrs", [
    ((5,), [20], {"strides": [2], "pads": [2, 1]}),
    ((3, 3, 3), [6, 5, 6], {"pads": [1, 1, 1, 1, 1, 1], "dilations": [1, 2, 1]}),
])
def test_tucker2_conv1d_and_conv3d(kernel, spatial, attrs):
    w = tucker_kernel(48, 32, kernel, 8, 8)
    model = conv_model(w, spatial, **attrs)
    info = fired(FactorizeConv(rank=8)(model), 3)
    assert info["weight_rel_error"] < 1e-6 and info["macs_before"] is not None
    assert parity(model, FactorizeConv(rank=8)(model).model, [2, 32, *spatial]) < 1e-4


# --------------------------------------------------------------------------------------------
# Spatial SVD


@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: ",".join(a))
def test_spatial_svd_exact_at_the_kernels_rank(attrs):
    w = spatial_kernel(64, 48, 3, 5, 16)
    model = conv_model(w, [11, 12], **attrs)
    result = FactorizeConv(method="spatial_svd", rank=16)(model)
    info = fired(result, 2)
    assert info["rank"] == 16 and info["weight_spectral_error"] < 1e-5
    kernels = [[a.ints for a in n.attribute if a.name == "kernel_shape"][0] for n in result.model.graph.node]
    assert kernels == [[3, 1], [1, 5]]
    assert parity(model, result.model, [2, 48, 11, 12]) < 1e-4


def test_spatial_svd_grouped_and_its_spectral_error():
    w = spatial_kernel(64, 64, 3, 3, 8, groups=2, seed=4)
    model = conv_model(w, [8, 8], group=2, pads=[1, 1, 1, 1])
    result = FactorizeConv(method="spatial_svd", rank=8)(model)
    fired(result, 2)
    assert parity(model, result.model, [1, 64, 8, 8]) < 1e-4
    # On a random kernel the reported spectral error is σ_{R+1} of the arranged matrix.
    w = np.random.default_rng(5).standard_normal((64, 48, 3, 3)).astype(np.float32)
    info = fired(FactorizeConv(method="spatial_svd", rank=20)(conv_model(w, [8, 8], pads=[1, 1, 1, 1])), 2)
    s = np.linalg.svd(w.astype(np.float64).transpose(1, 2, 0, 3).reshape(48 * 3, 64 * 3), compute_uv=False)
    assert info["weight_spectral_error"] == pytest.approx(s[20], rel=1e-9)


# --------------------------------------------------------------------------------------------
# CP


@pytest.mark.parametrize("groups, attrs", [(1, {"strides": [2, 1], "pads": [1, 0, 2, 1]}),
                                           (2, {"auto_pad": "SAME_UPPER", "strides": [1, 2]})])
def test_cp_exact_on_a_known_cp_rank_kernel(groups, attrs):
    w = cp_kernel(64, 64, 3, 3, 8, groups=groups, seed=2)
    model = conv_model(w, [9, 9], group=groups, **attrs)
    result = FactorizeConv(method="cp", rank=8)(model)
    info = fired(result, 4)
    assert info["rank"] == 8 and info["weight_rel_error"] < 1e-5 and info["cp_iterations"] >= 1
    assert info["new_nodes"] == [f"conv/cp_{k}" for k in range(4)]
    assert parity(model, result.model, [2, 64, 9, 9]) < 1e-4


def test_cp_on_a_generic_kernel_stays_within_its_weight_error():
    # Stated bound: for i.i.d. inputs the output error of a linear layer follows the weight error
    # (E‖ΔK∗x‖² ∝ ‖ΔK‖²; borders make it smaller), so the output's relative L2 error stays
    # within 1.2× the reported relative weight error.
    w = np.random.default_rng(6).standard_normal((32, 32, 3, 3)).astype(np.float32)
    model = conv_model(w, [10, 10], bias=False, pads=[1, 1, 1, 1])
    result = FactorizeConv(method="cp", rank=32, max_weight_error=0.9)(model)
    info = fired(result, 4)
    x = random_input([4, 32, 10, 10])
    ref, out = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1.2 * info["weight_rel_error"]
    # The default CP limit (0.5) refuses this fit: the error is well above it.
    assert info["weight_rel_error"] > 0.5
    reason = skip_reasons(FactorizeConv(method="cp", rank=32)(model))["conv"]
    assert "> max_weight_error=0.5" in reason


@settings(derandomize=True, max_examples=12, deadline=None, print_blob=True)
@given(method=st.sampled_from(["tucker2", "spatial_svd"]), o=st.integers(32, 48), i=st.integers(32, 48),
       kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([3, 5]), r=st.integers(1, 8),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       pads=st.tuples(*[st.integers(0, 2)] * 4), hw=st.tuples(st.integers(9, 12), st.integers(9, 12)),
       seed=st.integers(0, 2**16))
def test_fuzz_random_convs_exact_at_the_kernels_rank(method, o, i, kh, kw, r, stride, dilation, pads, hw, seed):
    w = tucker_kernel(o, i, (kh, kw), r, r, seed=seed) if method == "tucker2" else spatial_kernel(o, i, kh, kw, r, seed=seed)
    model = conv_model(w, list(hw), strides=list(stride), dilations=list(dilation), pads=list(pads))
    result = FactorizeConv(method=method, rank=r, latency_gate=False)(model)
    fired(result, 3 if method == "tucker2" else 2)
    assert parity(model, result.model, [1, i, *hw], seed=seed) < 1e-4


@pytest.mark.parametrize("method", ["tucker2", "spatial_svd"])
def test_output_error_shrinks_as_rank_grows(method):
    w = np.random.default_rng(11).standard_normal((48, 48, 3, 3)).astype(np.float32)
    model = conv_model(w, [8, 8], pads=[1, 1, 1, 1])
    x = random_input([2, 48, 8, 8])
    ref = run(model, {"x": x})[0]
    errors = [float(np.linalg.norm(run(FactorizeConv(method=method, rank=r)(model).model, {"x": x})[0] - ref))
              for r in (4, 8, 16, 24)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


# --------------------------------------------------------------------------------------------
# Rank rules and defaults


@pytest.mark.parametrize("options, expected", [
    ({"rank": 12}, [12, 12]),
    ({"rank": 40, "latency_gate": False}, [40, 32]),  # capped at I (MAC ratio 0.82)
    ({"rank_ratio": 0.5, "align": 0}, [32, 16]),
    ({"rank_ratio": 0.4, "align": 0}, [26, 13]),
    ({"rank_ratio": 0.4}, [32, 16]),  # aligned up
    ({"energy": 1.0, "align": 0}, [8, 4]),  # the planted multilinear ranks
    ({"energy": 1.0}, [16, 16]),
    ({"rank": "auto", "align": 0}, [8, 4]),
])
def test_tucker2_rank_rules(options, expected):
    w = tucker_kernel(64, 32, (3, 3), 8, 4, seed=3)
    model = conv_model(w, [8, 8], pads=[1, 1, 1, 1])
    assert fired(FactorizeConv(**options)(model), 3)["rank"] == expected


def test_budget_rules_and_the_default_on_a_large_conv():
    w = np.random.default_rng(7).standard_normal((64, 64, 3, 3)).astype(np.float32)
    model = conv_model(w, [16, 16], pads=[1, 1, 1, 1])
    budget = tucker2_ranks_for_budget(64, 64, 3, 3, (16, 16), macs_ratio=0.5)
    info = fired(FactorizeConv(macs_ratio=0.5, align=0)(model), 3)
    assert info["rank"] == list(budget)
    default = FactorizeConv()(model)
    info = fired(default, 3)
    assert info["rule"] == "macs_ratio=0.5 (default), aligned to 16"
    assert all(r % 16 == 0 for r in info["rank"]) and info["macs_after"] <= 0.5 * info["macs_before"]
    assert info["params_after"] < info["params_before"]
    info = fired(FactorizeConv(params_ratio=0.25, align=0)(model), 3)
    assert info["params_after"] <= 0.25 * info["params_before"]
    # Spatial SVD and CP follow the same budget (CP on a smaller conv: ALS is the slow part).
    info = fired(FactorizeConv(method="spatial_svd", macs_ratio=0.3, align=0)(model), 2)
    assert info["macs_after"] <= 0.3 * info["macs_before"]
    small = conv_model(w[:32, :32], [8, 8], pads=[1, 1, 1, 1])
    info = fired(FactorizeConv(method="cp", macs_ratio=0.3, align=0, max_weight_error=1.0)(small), 4)
    assert info["macs_after"] <= 0.3 * info["macs_before"]


def test_rank_auto_runs_for_spatial_svd():
    w = spatial_kernel(64, 48, 3, 3, 6, seed=8) + 0.01 * np.random.default_rng(9).standard_normal((64, 48, 3, 3)).astype(np.float32)
    info = fired(FactorizeConv(method="spatial_svd", rank="auto", align=0)(conv_model(w, [8, 8])), 2)
    assert info["rank"] == 6


def test_options_parse_and_reject_what_cp_cannot_do():
    p = parse_spec("factorize_conv:method=cp,rank=16,max_weight_error=0.3,exclude=stem*,layer1.*")
    assert p == FactorizeConv(method="cp", rank=16, max_weight_error=0.3, exclude=("stem*", "layer1.*"))
    with pytest.raises(SpecError, match="energy= is not defined for method=cp"):
        parse_spec("factorize_conv:method=cp,energy=0.9")
    with pytest.raises(SpecError, match="rank=auto is not defined for method=cp"):
        parse_spec("factorize_conv:method=cp,rank=auto")
    with pytest.raises(SpecError, match="one rank rule"):
        parse_spec("factorize_conv:rank_ratio=0.5,macs_ratio=0.5")
    with pytest.raises(SpecError, match="is not one of"):
        parse_spec("factorize_conv:method=svd")


# --------------------------------------------------------------------------------------------
# Skips, with reasons


def test_latency_gate_on_the_small_cnn_skips_with_reasons():
    model = small_cnn()
    assert op_count(model, "Conv") == 4
    result = FactorizeConv()(model)
    assert not result.modified and result.model.SerializeToString() == model.SerializeToString()
    reasons = list(skip_reasons(result).values())
    assert "latency gate: stem conv with 3 input channels" in reasons[0]
    assert "16→16 channels, under 32" in reasons[1] and "16→16 channels, under 32" in reasons[2]
    assert "depthwise conv" in reasons[3]
    # The gate, not a matching failure, held the 16-channel convs back.
    ungated = FactorizeConv(latency_gate=False, align=0)(model)
    assert len(ungated.report.rewritten) == 3
    assert_valid(ungated.model)


def test_latency_gate_on_a_high_mac_ratio_and_no_saving():
    w = np.random.default_rng(0).standard_normal((32, 32, 3, 3)).astype(np.float32)
    model = conv_model(w, [8, 8], pads=[1, 1, 1, 1])
    reason = skip_reasons(FactorizeConv(rank=28)(model))["conv"]
    assert "latency gate: MAC ratio 0.96 > 0.8" in reason
    assert FactorizeConv(rank=28, latency_gate=False)(model).modified
    reason = skip_reasons(FactorizeConv(rank=32, latency_gate=False)(model))["conv"]
    assert "no saving at rank 32x32" in reason


def test_structural_skips():
    g = GraphBuilder()
    x = g.input("x", ["N", 32, 8, 8])
    w = g.weight("shared.w", (32, 32, 3, 3))
    a = g.node("Conv", [x, w], name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b = g.node("Conv", [a, w], name="b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    c = g.node("Conv", [b, g.weight("dw.w", (32, 1, 3, 3))], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=32)
    d = g.node("Conv", [c, g.weight("pw.w", (32, 32, 1, 1))], name="pw", kernel_shape=[1, 1])
    g.node("Conv", [d, g.input("k", [32, 32, 3, 3])], ["y"], name="dyn", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output("y", ["N", 32, 8, 8])
    result = FactorizeConv(rank=8)(g.build())
    reasons = skip_reasons(result)
    assert not result.modified
    assert "shared with another node" in reasons["a"] and "shared with another node" in reasons["b"]
    assert "depthwise conv" in reasons["dw"]
    assert "1×1 conv: factorize_gemm factorizes it" in reasons["pw"]
    assert "not a constant" in reasons["dyn"]


def test_spatial_svd_and_cp_skip_non_2d_convs():
    model = conv_model(tucker_kernel(48, 32, (5,), 8, 8), [20], pads=[2, 2])
    for method in ("spatial_svd", "cp"):
        reason = skip_reasons(FactorizeConv(method=method, rank=8)(model))["conv"]
        assert f"method={method} needs a 2-D conv" in reason


def test_layer_selection():
    model = conv_model(tucker_kernel(64, 48, (3, 3), 16, 16), [8, 8], name="layer1.conv", pads=[1, 1, 1, 1])
    assert "no include pattern" in skip_reasons(FactorizeConv(rank=16, include=("layer2.*",))(model))["layer1.conv"]
    assert FactorizeConv(rank=16, include=("layer1.*",))(model).modified
    assert "exclude pattern" in skip_reasons(FactorizeConv(rank=16, exclude=("*.conv",))(model))["layer1.conv"]
    assert "min_params" in skip_reasons(FactorizeConv(rank=16, min_params=50_000)(model))["layer1.conv"]
    assert "min_macs" in skip_reasons(FactorizeConv(rank=16, min_macs=10**8)(model))["layer1.conv"]


# --------------------------------------------------------------------------------------------
# Data-aware Tucker-2


def _correlated_images(n, c, hw=8, seed=0):
    """Samples of one distribution whose channels share a few directions (as real feature maps)."""
    mix = np.random.default_rng(100).standard_normal((c, c)) * np.exp(-np.arange(c) / 4.0)[None, :]
    x = np.random.default_rng(seed).standard_normal((n, c, hw, hw))
    return np.einsum("ij,njhw->nihw", mix, x).astype(np.float32)


@pytest.mark.parametrize("groups", [1, 2])
def test_whitened_tucker2_lowers_the_output_error_on_correlated_channels(groups):
    from graph_opt.data import Dataset
    from graph_opt.pass_base import PassContext

    o, i = 64, 64
    w = (np.random.default_rng(3).standard_normal((o, i // groups, 3, 3)) / 12).astype(np.float32)
    g = GraphBuilder()
    g.input("x", ["N", i, 8, 8])
    g.node("Conv", ["x", g.const("c.w", w)], ["y"], name="c", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups)
    g.output("y", ["N", o, 8, 8])
    model = g.build()
    ctx = PassContext(data=Dataset({"x": _correlated_images(48, i)}, None, "calib.npz"))
    options = dict(rank=16, latency_gate=False)
    white = FactorizeConv(**options)(model, ctx)
    plain = FactorizeConv(data="plain", **options)(model, ctx)
    assert white.report.rewritten[0]["method"] == "whitened tucker2", white.report.skipped
    assert plain.report.rewritten[0]["method"] == "tucker2"
    assert op_count(white.model, "Conv") == 3
    assert_valid(white.model)
    test = {"x": _correlated_images(16, i, seed=1)}  # held out
    ref = run(model, test)[0]
    err = {k: np.linalg.norm(run(r.model, test)[0] - ref) / np.linalg.norm(ref) for k, r in (("white", white),
                                                                                               ("plain", plain))}
    assert err["white"] < 0.7 * err["plain"], err
    full = FactorizeConv(rank_ratio=1.0, latency_gate=False, require_saving=False, align=0)(model, ctx)
    assert full.report.rewritten[0]["method"] == "whitened tucker2"
    feed = {"x": random_input([2, i, 8, 8])}  # exact at full rank on any input, not just the data's
    np.testing.assert_allclose(run(full.model, feed)[0], run(model, feed)[0], rtol=1e-3, atol=1e-4)


def _smooth_images(n, c, hw=10, seed=0):
    """Feature maps whose neighbouring pixels are correlated (a 3×3 box blur of noise), channels mixed."""
    x = np.random.default_rng(seed).standard_normal((n, c, hw + 2, hw + 2))
    x = sum(x[:, :, dy:dy + hw, dx:dx + hw] for dy in range(3) for dx in range(3)) / 3.0
    mix = np.random.default_rng(101).standard_normal((c, c)) * np.exp(-np.arange(c) / 8.0)[None, :]
    return np.einsum("ij,njhw->nihw", mix, x).astype(np.float32)


def test_whitened_tucker2_fits_core_and_last_factor_on_correlated_pixels(monkeypatch):
    """With the patches' second moment the core and the last factor are the output-optimal ones:
    lower output error than the channel-only factors on held-out data of the same distribution."""
    import graph_opt.passes.factorize_conv as fc

    from graph_opt.data import Dataset
    from graph_opt.pass_base import PassContext

    o, i = 64, 48
    w = (np.random.default_rng(4).standard_normal((o, i, 3, 3)) / 12).astype(np.float32)
    g = GraphBuilder()
    g.input("x", ["N", i, 10, 10])
    g.node("Conv", ["x", g.const("c.w", w)], ["y"], name="c", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output("y", ["N", o, 10, 10])
    model = g.build()
    ctx = PassContext(data=Dataset({"x": _smooth_images(40, i)}, None, "calib.npz"))
    options = {"rank": 16, "latency_gate": False}
    patches = FactorizeConv(**options)(model, ctx)
    monkeypatch.setattr(fc, "patch_moments", lambda *a, **k: {})
    channels = FactorizeConv(**options)(model, ctx)
    monkeypatch.undo()
    assert [e["fit"] for e in patches.report.rewritten] == ["patches"], patches.report.skipped
    assert [e["fit"] for e in channels.report.rewritten] == ["channels"]
    assert op_count(patches.model, "Conv") == 3
    assert_valid(patches.model)
    test = {"x": _smooth_images(16, i, seed=1)}  # held out
    ref = run(model, test)[0]
    err = {k: np.linalg.norm(run(r.model, test)[0] - ref) / np.linalg.norm(ref)
           for k, r in (("patches", patches), ("channels", channels))}
    assert err["patches"] < 0.9 * err["channels"], err
    full = FactorizeConv(rank_ratio=1.0, latency_gate=False, require_saving=False, align=0)(model, ctx)
    assert full.report.rewritten[0]["fit"] == "patches"
    feed = {"x": random_input([2, i, 10, 10])}  # exact at full rank on any input
    np.testing.assert_allclose(run(full.model, feed)[0], run(model, feed)[0], rtol=1e-3, atol=1e-4)
