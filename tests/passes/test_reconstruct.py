"""reconstruct: refits recover the teacher exactly when the student can express it (pruned
channels that were linear combinations of kept ones; a perturbed last low-rank factor), the
calibration error never increases (per layer and end to end, on random models and compressions),
bias correction removes the mean shift it targets, every output is valid, skips carry reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, assert_valid, run, small_cnn, wide_cnn
from onnx import numpy_helper

from graph_opt.data import Dataset, random_dataset
from graph_opt.intermediates import stream
from graph_opt.pass_base import PassContext, PassReport
from graph_opt.passes.factorize_conv import FactorizeConv
from graph_opt.passes.factorize_gemm import FactorizeGemm
from graph_opt.passes.fold_batchnorm import FoldBatchnorm
from graph_opt.passes.prune_channels import PruneChannels
from graph_opt.passes.quantize import Quantize
from graph_opt.passes.reconstruct import Reconstruct
from graph_opt.pipeline import Pipeline
from graph_opt.registry import parse_spec


def compress(model, passes, data):
    """Run `passes` in order as a pipeline would (history of the accepted ones); (student, ctx, last result)."""
    ctx = PassContext(data=data, original=model)
    current, result = model, None
    for p in passes:
        result = p(current, ctx)
        if result.modified:
            assert_valid(result.model)
            ctx.history.append(result.report)
            current = result.model
    return current, ctx, result


def rel(ref, out):
    return float(np.max(np.abs(ref - out)) / max(1e-12, float(np.max(np.abs(ref)))))


def output_rel(teacher, student, data):
    return max(rel(t, s) for t, s in zip(run(teacher, data.inputs), run(student, data.inputs)))


def output_mse(teacher, student, data):
    return float(np.mean([np.mean((t.astype(np.float64) - s) ** 2)
                          for t, s in zip(run(teacher, data.inputs), run(student, data.inputs))]))


def layer_errors(teacher, student, data, entry):
    """(MSE, per-channel mean error, teacher mean square) of one refit layer, measured on `data`."""
    (_, tv), = stream(teacher, data, [entry["target"]])
    (_, sv), = stream(student, data, [entry["tensor"]])
    t, s = tv[entry["target"]].astype(np.float64), sv[entry["tensor"]].astype(np.float64)
    axis = -1 if entry["op"] == "MatMul" else 1
    if "teacher_channels" in entry:
        t = np.take(t, entry["teacher_channels"], axis=axis)
    e = np.moveaxis(t - s, axis, -1).reshape(-1, t.shape[axis])
    return float(np.mean(e ** 2)), e.mean(axis=0), float(np.mean(t ** 2))


def skips(result):
    return {s.node: s.reason for s in result.report.skipped}


def replace_initializer(model, name, value):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return out
    raise KeyError(name)


def whole(data):
    """One batch of everything (stream yields batches; tests here use ≤ 32 samples or say so)."""
    return Dataset(dict(data.inputs))


# ------------------------------------------------------------------------------ exact recovery


def linear_prune_teacher(seed=0):
    """conv1 (no bias): channels 5–7 are small linear combinations of channels 0–4 → conv2 → Relu."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, 8, 8])
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    mix = 0.1 * rng.standard_normal((3, 5))
    w1[5:] = np.einsum("dk,k...->d...", mix, w1[:5])
    h = g.node("Conv", [x, g.const("conv1.w", w1)], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.node("Relu", [g.conv(h, 8, 6, name="conv2")], ["y"])
    g.output("y", ["N", 6, 8, 8])
    return g.build()


def test_pruned_channels_that_were_combinations_of_kept_ones_are_recovered_exactly():
    teacher = linear_prune_teacher()
    data = random_dataset(teacher, 48, seed=1)
    pruned, ctx, result = compress(teacher, [PruneChannels(ratio=0.375, round_to=1, keep_first_last=False)], data)
    group = next(e for e in result.report.rewritten if "pruned_channels" in e)
    assert group["pruned_channels"] == [5, 6, 7]
    assert output_rel(teacher, pruned, data) > 1e-2  # vacuity: pruning alone loses them
    before = pruned.SerializeToString()
    out = Reconstruct(ridge=0.0)(pruned, ctx)
    assert pruned.SerializeToString() == before
    assert out.modified and [e["node"] for e in out.report.rewritten] == ["conv2"]
    entry = out.report.rewritten[0]
    assert entry["method"] == "lstsq" and entry["compression"] == ["prune"] and entry["mse_after"] < 1e-9
    assert_valid(out.model)
    conv2 = next(n for n in out.model.graph.node if n.name == "conv2")
    old = next(n for n in pruned.graph.node if n.name == "conv2")
    assert conv2.input[1] != old.input[1] and conv2.input[2] != old.input[2]  # fresh initializers
    assert {old.input[1], old.input[2]}.isdisjoint(t.name for t in out.model.graph.initializer)  # no dead weights
    held_out = random_dataset(teacher, 16, seed=7)
    assert output_rel(teacher, out.model, held_out) < 1e-4
    # the default ridge stays close too
    assert output_rel(teacher, Reconstruct()(pruned, ctx).model, held_out) < 1e-2


def low_rank(m, n, r, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def gemm_layer(form):
    """One layer whose weight has rank 4, in each form factorize_gemm handles."""
    g = GraphBuilder(seed=3)
    w = low_rank(32, 24, 4)  # K×N
    if form in ("gemm", "gemm_transB"):
        x = g.input("x", ["N", 32])
        wt = w.T if form == "gemm_transB" else w
        g.node("Gemm", [x, g.const("fc.w", wt), g.weight("fc.b", (24,))], ["y"], name="fc",
               transB=int(form == "gemm_transB"), alpha=0.5, beta=2.0)
        g.output("y", ["N", 24])
    elif form == "matmul_3d":
        x = g.input("x", ["B", 5, 32])
        h = g.node("MatMul", [x, g.const("fc.w", w)], name="fc")
        g.node("Add", [h, g.weight("fc.b", (24,))], ["y"])
        g.output("y", ["B", 5, 24])
    elif form == "matmul_left":
        x = g.input("x", ["B", 32, 6])
        g.node("MatMul", [g.const("fc.w", w.T.copy()), x], ["y"], name="fc")
        g.output("y", ["B", 24, 6])
    else:  # conv1x1
        x = g.input("x", ["N", 32, 4, 4])
        g.node("Conv", [x, g.const("fc.w", w.T.reshape(24, 32, 1, 1).copy()), g.weight("fc.b", (24,))], ["y"],
               name="fc", kernel_shape=[1, 1], strides=[2, 2])
        g.output("y", ["N", 24, 2, 2])
    return g.build()


def tucker_layer(method):
    """A 3×3 conv whose kernel is exactly low rank for `method` (Tucker-2 ranks 4×4 / spatial SVD rank 2)."""
    rng = np.random.default_rng(5)
    o = i = 16
    if method == "tucker2":
        core = rng.standard_normal((4, 4, 3, 3))
        k = np.einsum("ar,bs,rsyx->abyx", rng.standard_normal((o, 4)), rng.standard_normal((i, 4)), core)
    else:
        m = rng.standard_normal((i * 3, 2)) @ rng.standard_normal((2, o * 3))  # M[(i,y),(o,x)]
        k = m.reshape(i, 3, o, 3).transpose(2, 0, 1, 3)
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", i, 9, 9])
    g.node("Conv", [x, g.const("c.w", (k / 4).astype(np.float32)), g.weight("c.b", (o,))], ["y"], name="c",
           kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[2, 1])
    g.output("y", ["N", o, 5, 9])
    return g.build()


LOWRANK_CASES = [
    ("gemm", lambda: gemm_layer("gemm"), FactorizeGemm(rank=4, latency_gate=False)),
    ("gemm_transB", lambda: gemm_layer("gemm_transB"), FactorizeGemm(rank=4, latency_gate=False)),
    ("matmul_3d", lambda: gemm_layer("matmul_3d"), FactorizeGemm(rank=4, latency_gate=False)),
    ("matmul_left", lambda: gemm_layer("matmul_left"), FactorizeGemm(rank=4, latency_gate=False)),
    ("conv1x1", lambda: gemm_layer("conv1x1"), FactorizeGemm(rank=4, latency_gate=False)),
    ("tucker2", lambda: tucker_layer("tucker2"), FactorizeConv(method="tucker2", rank=4, latency_gate=False)),
    ("spatial_svd", lambda: tucker_layer("spatial_svd"),
     FactorizeConv(method="spatial_svd", rank=2, latency_gate=False)),
]


@pytest.mark.parametrize("name,build,factorize", LOWRANK_CASES, ids=[c[0] for c in LOWRANK_CASES])
def test_a_perturbed_last_factor_is_restored_exactly(name, build, factorize):
    teacher = build()
    data = random_dataset(teacher, 32, seed=2)
    student, ctx, result = compress(teacher, [factorize], data)
    entry = result.report.rewritten[0]
    assert output_rel(teacher, student, data) < 1e-4  # exact at the weight's rank
    last = next(n for n in student.graph.node if n.name == entry["new_nodes"][-1])
    weight = next(i for i in last.input if i.endswith(".weight"))
    w = numpy_helper.to_array(next(t for t in student.graph.initializer if t.name == weight))
    noisy = w + 0.3 * np.std(w) * np.random.default_rng(0).standard_normal(w.shape)
    student = replace_initializer(student, weight, noisy)
    assert output_rel(teacher, student, data) > 1e-2  # vacuity
    out = Reconstruct(ridge=0.0)(student, ctx)
    assert [e["node"] for e in out.report.rewritten] == [entry["new_nodes"][-1]], out.report.skipped
    assert out.report.rewritten[0]["compression"] == ["lowrank"]
    assert_valid(out.model)
    assert output_rel(teacher, out.model, random_dataset(teacher, 8, seed=9)) < 1e-4
    # the same layer is found without the history, by its factor name
    alone = Reconstruct(ridge=0.0)(student, PassContext(data=data, original=teacher))
    assert [e["node"] for e in alone.report.rewritten] == [entry["new_nodes"][-1]]


# ------------------------------------------------------------------- error never increases


def random_model(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.choice([8, 12, 16]))
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, 8, 8])
    a = g.node("Relu", [g.conv(x, 3, c, name="stem")])
    r = g.conv(g.node("Relu", [g.conv(a, c, c, name="res1")]), c, c, name="res2")
    s = g.node("Relu", [g.node("Add", [a, r])])
    p = g.node("Relu", [g.conv(s, c, c, 1, name="point")])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [p])], axis=1)
    h = g.node("Relu", [g.gemm(f, c, 16, name="fc1")])
    g.node("Identity", [g.gemm(h, 16, 5, name="fc2")], ["y"])
    g.output("y", ["N", 5])
    return g.build()


COMPRESSIONS = {
    "factorize_conv": [FactorizeConv(rank_ratio=0.5, latency_gate=False, align=0, exclude=("stem",))],
    "factorize_gemm": [FactorizeGemm(rank_ratio=0.5, latency_gate=False, align=0)],
    "prune": [PruneChannels(ratio=0.3, round_to=1, keep_first_last=False, fold="approximate")],
    "quantize_int4": [Quantize(weights="int4", sensitivity_snr_db=None)],
    "prune_quantize": [PruneChannels(ratio=0.3, round_to=1, fold="approximate"), Quantize(sensitivity_snr_db=None)],
    "factorize_quantize": [FactorizeConv(rank_ratio=0.5, latency_gate=False, align=0, exclude=("stem",)),
                           Quantize(sensitivity_snr_db=None)],
}


def test_calibration_error_never_increases():
    """Random widths, weights and compressions; each case names its seed (replay with it)."""
    fired = 0
    seeds = range(12)
    for seed in seeds:
        kind = list(COMPRESSIONS)[seed % len(COMPRESSIONS)]
        case = f"seed={seed} {kind}"
        teacher = random_model(seed)
        data = random_dataset(teacher, 32, seed=seed)
        student, ctx, _ = compress(teacher, COMPRESSIONS[kind], data)
        out = Reconstruct()(student, ctx)
        assert output_mse(teacher, out.model, data) <= output_mse(teacher, student, data) * (1 + 1e-6), case
        if not out.modified:  # every refit rolled back by the end-to-end check: the input comes back
            assert out.model.SerializeToString() == student.SerializeToString(), case
            assert all("rolled back" in s.reason or "does not lower" in s.reason for s in out.report.skipped), case
            continue
        fired += 1
        assert_valid(out.model)
        for entry in out.report.rewritten:
            assert entry["mse_after"] < entry["mse_before"], (case, entry)
            mse, _, power = layer_errors(teacher, out.model, data, entry)
            # the refit's error measured in the final model is the one it predicted from its statistics
            assert mse == pytest.approx(entry["mse_after"], rel=1e-3, abs=1e-7 * power), (case, entry["node"])
    assert fired >= len(seeds) - 2, fired


def conv_chain(seed=0):
    """conv-BN-relu ×3 (8 → 12 → 12 → 8 channels): the middle conv both reads and writes pruned channels."""
    g = GraphBuilder(seed=seed)
    h = g.input("x", ["N", 3, 8, 8])
    for i, (cin, cout) in enumerate([(3, 12), (12, 12), (12, 8)]):
        h = g.node("Relu", [g.bn(g.conv(h, cin, cout, name=f"c{i}"), cout)])
    g.node("Identity", [h], ["y"])
    g.output("y", ["N", 8, 8, 8])
    return g.build()


def test_output_channels_of_a_pruned_consumer_are_matched_to_the_teachers():
    teacher = conv_chain()
    data = random_dataset(teacher, 32, seed=4)
    prune = PruneChannels(ratio=0.25, round_to=1, keep_first_last=False, fold="approximate")
    student, ctx, result = compress(teacher, [FoldBatchnorm(), prune], data)
    pruned = {e["producers"][0]: e["pruned_channels"] for e in result.report.rewritten if "pruned_channels" in e}
    assert set(pruned) == {"c0", "c1"}
    out = Reconstruct()(student, ctx)
    entries = {e["node"]: e for e in out.report.rewritten}
    assert set(entries) == {"c1", "c2"}
    # c1's filters (rescaled by the folded BN) are matched to the teacher's c1 filters it kept
    assert entries["c1"]["teacher_channels"] == [c for c in range(12) if c not in pruned["c1"]]
    assert "teacher_channels" not in entries["c2"]
    assert output_mse(teacher, out.model, data) < 0.5 * output_mse(teacher, student, data)
    # after quantizing, the refit filters no longer match: the map comes from the earlier report
    ctx.history.append(out.report)
    quantized = Quantize(sensitivity_snr_db=None)(out.model, ctx)
    ctx.history.append(quantized.report)
    again = Reconstruct()(quantized.model, ctx)
    corrected = {e["node"]: e for e in again.report.rewritten}
    assert corrected["c1"]["method"] == "bias_correction"
    assert corrected["c1"]["teacher_channels"] == entries["c1"]["teacher_channels"]


def test_the_end_to_end_check_keeps_the_best_prefix_of_refits(monkeypatch):
    import graph_opt.passes.reconstruct as rec

    teacher = two_convs()
    data = offset_data(teacher, 16, 0)
    student, ctx, _ = compress(teacher, [Quantize(weights="int4", sensitivity_snr_db=None)], data)
    scripted = iter([1.0, 2.0, 0.5])  # before, with both refits, with the first only
    monkeypatch.setattr(rec, "_output_error", lambda *a, **k: next(scripted))
    out = Reconstruct()(student, ctx)
    assert [e["node"] for e in out.report.rewritten] == ["c1"]
    assert "rolled back by the end-to-end check" in skips(out)["c2"]
    assert_valid(out.model)
    conv = lambda m, n: next(x for x in m.graph.node if x.name == n)  # noqa: E731
    assert conv(out.model, "c2").input[2] == conv(student, "c2").input[2]
    assert conv(out.model, "c1").input[2] != conv(student, "c1").input[2]
    names = {t.name for t in out.model.graph.initializer}
    used = {i for n in out.model.graph.node for i in n.input}
    assert names <= used  # neither the replaced nor the rolled-back biases are left behind


# ------------------------------------------------------------------------------ bias correction


def offset_data(model, n, seed, offset=1.0):
    d = random_dataset(model, n, seed=seed)
    return Dataset({k: v + np.float32(offset) for k, v in d.inputs.items()})


def two_convs(seed=0):
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 4, 8, 8])
    h = g.node("Relu", [g.conv(x, 4, 8, name="c1")])
    g.node("Relu", [g.conv(h, 8, 8, name="c2")], ["y"])
    g.output("y", ["N", 8, 8, 8])
    return g.build()


@pytest.mark.parametrize("quantize", [Quantize(weights="int4", sensitivity_snr_db=None),
                                      Quantize(sensitivity_snr_db=None)], ids=["int4_float_bias", "int8_int32_bias"])
def test_bias_correction_removes_the_mean_shift(quantize):
    teacher = two_convs()
    data = offset_data(teacher, 32, 0)
    student, ctx, _ = compress(teacher, [quantize], data)
    out = Reconstruct()(student, ctx)
    entries = out.report.rewritten
    assert [e["node"] for e in entries] == ["c1", "c2"] and all(e["method"] == "bias_correction" for e in entries)
    assert_valid(out.model)
    int32 = entries[0]["bias"].startswith("int32")
    assert entries[0]["bias"] == ("int32 (re-quantized)" if int32 else "float")
    _, mean_before, _ = layer_errors(teacher, student, data, entries[0])
    for entry in entries:
        _, mean_after, power = layer_errors(teacher, out.model, data, entry)
        if int32:  # the bias moves on its grid s_x·s_w: the mean shift is left below half a step
            step = _bias_step(out.model, entry["node"])
            assert np.all(np.abs(mean_after) <= 0.5 * step + 1e-6 * np.sqrt(power)), entry["node"]
        else:
            assert np.max(np.abs(mean_after)) < 1e-5 * np.sqrt(power), entry["node"]
    _, mean_c1, _ = layer_errors(teacher, out.model, data, entries[0])
    assert np.max(np.abs(mean_before)) > 10 * np.max(np.abs(mean_c1))  # vacuity: there was a shift
    # the bias-correction accumulators saw every calibration row
    assert entries[0]["rows"] == 32 * 64 and entries[0]["samples"] == 32


def _bias_step(model, node_name):
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = next(n for n in model.graph.node if node.input[2] in n.output)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == dq.input[1]))


def test_bias_only_shifts_biases_and_keeps_the_weights():
    teacher = linear_prune_teacher()
    data = random_dataset(teacher, 24, seed=1)
    pruned, ctx, _ = compress(teacher, [PruneChannels(ratio=0.375, round_to=1, keep_first_last=False)], data)
    out = Reconstruct(bias_only=True)(pruned, ctx)
    (entry,) = out.report.rewritten
    assert entry["method"] == "bias_correction" and entry["ridge"] is None
    conv2 = lambda m: next(n for n in m.graph.node if n.name == "conv2")  # noqa: E731
    assert conv2(out.model).input[1] == conv2(pruned).input[1] and conv2(out.model).input[2] != conv2(pruned).input[2]
    assert np.max(np.abs(layer_errors(teacher, out.model, data, entry)[1])) < 1e-4


# ---------------------------------------------------------------------- pipeline and contract


def test_pipeline_reconstruct_improves_output_snr_over_factorizing_alone():
    model = wide_cnn(32)
    calib, verify = random_dataset(model, 64, seed=0), random_dataset(model, 32, seed=1)
    base = [FoldBatchnorm(), FactorizeConv(macs_ratio=0.5)]
    without = Pipeline(base, verify_data=verify, calib_data=calib, latency=False).run(model)
    with_rec = Pipeline([*base, Reconstruct()], verify_data=verify, calib_data=calib, latency=False).run(model)
    factorized = with_rec.steps[1].report
    assert with_rec.steps[1].modified and len(factorized.rewritten) == 2  # res1, res2 (stem gated)
    step = with_rec.steps[2]
    assert step.modified and step.accepted, step.reason
    assert {e["node"] for e in step.report.rewritten} == {e["new_nodes"][-1] for e in factorized.rewritten}
    snr = lambda r: min(o.snr_db for o in r.final_parity.outputs)  # noqa: E731
    assert snr(with_rec) > snr(without) + 3, (snr(with_rec), snr(without))


def test_modified_is_honest_and_the_input_is_never_mutated():
    model = small_cnn()
    data = random_dataset(model, 8)
    before = model.SerializeToString()
    for ctx in (None, PassContext(data=data), PassContext(original=model), PassContext(data=data, original=model)):
        result = Reconstruct()(model, ctx)
        assert not result.modified and result.model.SerializeToString() == before
    assert model.SerializeToString() == before


def test_skip_reasons_without_data_or_teacher():
    model = small_cnn()
    assert "no calibration data" in skips(Reconstruct()(model, PassContext(original=model)))["model"]
    assert "no teacher" in skips(Reconstruct()(model, PassContext(data=random_dataset(model, 4))))["model"]


def mlp_teacher(hidden_name="h"):
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", 32])
    h = g.node("Gemm", [x, g.const("fc.w", low_rank(24, 32, 4)), g.weight("fc.b", (24,))], [hidden_name], name="fc",
               transB=1)
    g.node("Relu", [h], ["y"])
    g.output("y", ["N", 24])
    return g.build()


def test_skip_reasons_per_layer():
    teacher = mlp_teacher()
    data = random_dataset(teacher, 16)
    student, ctx, _ = compress(teacher, [FactorizeGemm(rank=2, latency_gate=False)], data)
    last = "fc/svd_1"
    assert "not in targets" in skips(Reconstruct(targets=("quant",))(student, ctx))[last]
    other = PassContext(data=data, original=mlp_teacher("h2"), history=ctx.history)
    assert "target tensor 'h' not found in the teacher" in skips(Reconstruct()(student, other))[last]
    g = GraphBuilder(seed=4)  # the teacher's 'h' has another shape
    h = g.node("Gemm", [g.input("x", ["N", 32]), g.weight("fc.w", (24, 32))], ["g"], name="fc", transB=1)
    h = g.node("Unsqueeze", [h, g.const("axes", np.array([2], np.int64))], ["h"])
    g.node("Relu", [g.node("Squeeze", [h, "axes"])], ["y"])
    g.output("y", ["N", 24])
    reason = skips(Reconstruct()(student, PassContext(data=data, original=g.build(), history=ctx.history)))[last]
    assert reason.startswith("shapes differ")
    fake = PassReport("factorize_gemm", {}, rewritten=[{"node": "fc", "new_nodes": ["relu_x"], "output": "y"}])
    g = GraphBuilder()
    g.output(g.node("Relu", [g.input("x", ["N", 4])], ["y"], name="relu_x"), ["N", 4])
    relu = g.build()
    reason = skips(Reconstruct()(relu, PassContext(data=random_dataset(relu, 4), original=relu, history=[fake])))
    assert reason["relu_x"] == "layer kind Relu not supported (Conv, Gemm, MatMul only)"
    # the refit of a refit gains nothing: kept, and said so
    once = Reconstruct()(student, ctx)
    twice = Reconstruct()(once.model, ctx)
    assert not twice.modified and "does not lower the calibration error" in skips(twice)[last]


def test_bias_correction_needs_a_bias_and_attention_matmuls_are_not_layers():
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 6, 8])
    h = g.node("MatMul", [x, g.weight("w", (8, 8))], name="proj")
    g.node("MatMul", [h, g.node("Transpose", [h], perm=[0, 2, 1])], ["y"], name="scores")
    g.output("y", ["N", 6, 6])
    model = g.build()
    history = [PassReport("quantize", {}, rewritten=[{"node": "proj", "op": "MatMul", "weight": {"dtype": "int8"}},
                                                      {"node": "scores", "op": "MatMul", "weight": {"dtype": "int8"}}])]
    ctx = PassContext(data=random_dataset(model, 4), original=model, history=history)
    reasons = skips(Reconstruct(bias_only=True)(model, ctx))
    assert reasons["proj"] == "no bias to correct: a MatMul without a bias Add after it"
    assert reasons["scores"] == "MatMul of two activations (no weight to refit)"


def test_max_samples_bounds_rows_deterministically():
    teacher = linear_prune_teacher()
    data = random_dataset(teacher, 40, seed=3)
    pruned, ctx, _ = compress(teacher, [PruneChannels(ratio=0.375, round_to=1, keep_first_last=False)], data)
    a = Reconstruct(max_samples=100)(pruned, ctx)
    b = Reconstruct(max_samples=100)(pruned, ctx)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    (entry,) = a.report.rewritten
    assert entry["rows"] == 200 and entry["samples"] == 40  # 2 batches of 32 + 8 samples, 100 rows each
    assert output_rel(teacher, a.model, data) < 1e-3


def test_spec_and_options():
    p = parse_spec("reconstruct:ridge=0.01,targets=lowrank,prune,max_samples=5000,bias_only=true")
    assert p == Reconstruct(ridge=0.01, targets=("lowrank", "prune"), max_samples=5000, bias_only=True)
    for bad in ({"ridge": -1.0}, {"max_samples": 0}, {"targets": ("lowrank", "distill")}):
        with pytest.raises(ValueError):
            Reconstruct(**bad)


def test_replaced_weights_read_inside_a_subgraph_are_kept():
    """drop_unused_initializers drops an initializer nothing reads, but keeps one an If branch reads
    (and, asked for no names, one that is also a graph input)."""
    from builders import control_flow_model
    from onnx import helper

    from graph_opt.onnx_util import drop_unused_initializers

    model = control_flow_model("If")
    for name in ("outer_w", "dead_w", "dead_input"):
        model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), name))
    model.graph.input.append(helper.make_tensor_value_info("dead_input", onnx.TensorProto.FLOAT, [4]))
    branch = next(n for n in model.graph.node if n.op_type == "If").attribute[0].g
    branch.node.append(helper.make_node("Identity", ["outer_w"], ["outer_w_copy"]))
    every = onnx.ModelProto()
    every.CopyFrom(model)
    assert drop_unused_initializers(model, {"outer_w", "dead_w"}) == 1
    names = {t.name for t in model.graph.initializer}
    assert "outer_w" in names and "dead_w" not in names
    assert drop_unused_initializers(every) == 1
    names = {t.name for t in every.graph.initializer}
    assert {"outer_w", "dead_input"} <= names and "dead_w" not in names


def test_a_student_whose_batch_simplify_bound_is_refit_and_compared_on_its_own_batches():
    """`--input-shape x=1,…` on a model whose folding needs the batch: simplify binds the batch
    to 1, and the teacher/student passes (reconstruct, layer divergence) then run both models on
    batches of 1 instead of failing on the student."""
    from onnx import TensorProto, helper

    import graph_opt
    from graph_opt.data import random_dataset

    model = small_cnn()
    model.graph.node[0].input[0] = "x_scaled"
    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    model.graph.node.insert(0, helper.make_node("Shape", ["x"], ["x_shape"]))
    model.graph.node.insert(1, helper.make_node("ConstantOfShape", ["x_shape"], ["x_ones"], value=ones))
    model.graph.node.insert(2, helper.make_node("Mul", ["x", "x_ones"], ["x_scaled"]))
    data = random_dataset(model, 8, seed=0)
    result = graph_opt.optimize(model, ["prune_channels:ratio=0.5,keep_first_last=false", "reconstruct"], data=data,
                                shapes={"x": (1, 3, 16, 16)}, latency=False)
    simplify, prune, refit = result.steps
    assert simplify.accepted and result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert prune.accepted and prune.modified, prune.reason
    assert refit.modified and refit.report.rewritten, refit.report.skipped
    assert refit.accepted and refit.parity.snr_db > prune.parity.snr_db
    report = graph_opt.verify(model, result.model, data=data, layers=True)
    assert report.layers and report.outputs[0].shape == (8, 10)


# ------------------------------------------------------------------------------ row mask


def pooled_error(teacher, student, feeds):
    ref, out = run(teacher, feeds)[0], run(student, feeds)[0]
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_masked_rows_refit_what_the_pooled_output_uses():
    """Padding 30x larger than the real positions, in another subspace: an unmasked refit fits the
    padding (and the end-to-end check then undoes it); a masked one fits the real positions."""
    from builders import masked_pool_model, padded_data

    teacher = masked_pool_model()
    calib, held_out = Dataset(padded_data(48, seed=0), source="calib"), padded_data(48, seed=1)
    student, ctx, _ = compress(teacher, [FactorizeGemm(rank=8, latency_gate=False, data="plain")], calib)
    base = pooled_error(teacher, student, held_out)
    out = {}
    for mask in ("auto", None):
        result = Reconstruct(row_mask=mask)(student, PassContext(data=calib, original=teacher,
                                                                 history=list(ctx.history)))
        out[mask] = result
    masked = out["auto"]
    assert masked.modified and len(masked.report.rewritten) == 2, skips(masked)
    assert_valid(masked.model)
    rows = calib.inputs["attention_mask"]
    assert all(e["rows_masked"] == rows.size - rows.sum() and e["rows"] == rows.sum() for e in masked.report.rewritten)
    assert any("row mask 'attention_mask'" in n for n in masked.report.notes)
    err_masked = pooled_error(teacher, masked.model, held_out)
    err_plain = pooled_error(teacher, out[None].model, held_out)
    assert err_masked < 0.6 * base and err_masked < 0.6 * err_plain, (base, err_masked, err_plain)


def test_masked_bias_correction_zeroes_the_mean_error_of_the_real_rows():
    """The mean error of a factorized layer differs between real and padded positions: the masked
    correction removes the real rows' mean error; the unmasked one shifts the bias by the padding's
    (30x larger) mean error, which the end-to-end check then undoes."""
    from builders import masked_pool_model, padded_data

    teacher = masked_pool_model()
    calib = Dataset(padded_data(16, seed=0), source="calib")
    student, ctx, _ = compress(teacher, [FactorizeGemm(rank=8, latency_gate=False, data="plain")], calib)
    real = calib.inputs["attention_mask"].reshape(-1) == 1

    def real_mean_error(model, entry):
        (_, tv), = stream(teacher, calib, [entry["target"]])
        (_, sv), = stream(model, calib, [entry["tensor"]])
        error = (tv[entry["target"]].astype(np.float64) - sv[entry["tensor"]]).reshape(len(real), -1)[real]
        return float(np.abs(error.mean(axis=0)).max()), float(np.abs(error).mean())

    def corrected(mask):
        return Reconstruct(bias_only=True, row_mask=mask)(student, PassContext(data=calib, original=teacher,
                                                                               history=list(ctx.history)))

    masked = corrected("attention_mask")
    assert masked.modified and [e["method"] for e in masked.report.rewritten] == ["bias_correction"] * 2
    assert_valid(masked.model)
    entry = masked.report.rewritten[-1]
    before, scale = real_mean_error(student, entry)
    after, _ = real_mean_error(masked.model, entry)
    assert before > 0.05 * scale  # vacuity: the real rows had a mean error to remove
    assert after < 1e-4 * scale
    unmasked = corrected(None)
    assert not unmasked.modified and any("rolled back by the end-to-end check" in s.reason
                                         for s in unmasked.report.skipped)
