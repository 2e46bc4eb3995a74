import numpy as np
import onnx
import pytest
from builders import small_cnn
from onnx import numpy_helper

from graph_opt import metrics, verify
from graph_opt.data import Dataset, random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.intermediates import PerFeature, divergence, feature_distances, first_divergence, stream, with_outputs
from graph_opt.runtime import make_session, run_batches


def _scaled(model, name, factor):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, name))
    return out


def test_first_divergence_points_at_the_damaged_layer():
    model = small_cnn()
    damaged = _scaled(model, "conv6.w", 1.3)  # the second conv: everything before it is intact
    layers = divergence(model, damaged, random_dataset(model, 6))
    by_name = {l.tensor: l for l in layers}
    assert by_name["relu5_out"].snr_db == float("inf")  # before the damage: identical
    first = first_divergence(layers, 30.0)
    assert first is not None and first.tensor == "conv6_out" and first.producer == "conv6"
    assert [l.tensor for l in layers][-1] == "logits"


def test_stream_yields_requested_tensors_per_batch():
    model = small_cnn()
    data = random_dataset(model, 5)
    shapes = [vals["relu5_out"].shape for _, vals in stream(model, data, ["relu5_out"], batch_size=2)]
    assert shapes == [(2, 16, 16, 16), (2, 16, 16, 16), (1, 16, 16, 16)]
    with pytest.raises(GraphOptError, match="no tensor named 'nope'"):
        next(stream(model, data, ["nope"]))


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax/ReduceMin take their axes as an input from 18
def test_reducers_give_inside_onnxruntime_what_numpy_computes_from_the_tensor(opset):
    model = small_cnn()
    model.opset_import[0].version = opset
    nodes = [n.SerializeToString() for n in model.graph.node]
    assert not any(n.op_type.startswith("Reduce") for n in model.graph.node)  # vacuity
    t = "relu5_out"  # (N, 16, 16, 16)
    reducers = ("min", "max", "sum", "sumsq", "size", PerFeature("max", 1, 16), PerFeature("min", 1, 16),
                PerFeature("max", 3, 16))
    cap = with_outputs(model, [t], reducers={t: reducers})
    assert [n.SerializeToString() for n in model.graph.node] == nodes  # the input model is untouched
    assert cap.names == [t, *(cap.reduced[t][r] for r in reducers)]
    # Every reduction sits right after the tensor's producer (the shared Flatten/Reshape first).
    order = [n.op_type for n in cap.model.graph.node]
    at = next(i for i, n in enumerate(cap.model.graph.node) if t in n.output)
    assert order[at + 1:at + 11] == ["ReduceMin", "ReduceMax", "ReduceSum", "ReduceSumSquare", "Size", "Flatten",
                                     "ReduceMax", "ReduceMin", "Reshape", "ReduceMax"]
    feed = {"x": np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)}
    got = dict(zip(cap.names, make_session(cap.model, weights=cap.weights).run(cap.names, feed)))
    x = got[t].astype(np.float64)
    out = {r: got[cap.reduced[t][r]] for r in reducers}
    assert (out["min"], out["max"], int(out["size"])) == (got[t].min(), got[t].max(), x.size)
    assert out["sum"] == pytest.approx(x.sum(), rel=1e-5) and out["sumsq"] == pytest.approx((x * x).sum(), rel=1e-5)
    np.testing.assert_array_equal(out[PerFeature("max", 1, 16)], got[t].max(axis=(2, 3)).ravel())
    np.testing.assert_array_equal(out[PerFeature("min", 1, 16)], got[t].min(axis=(2, 3)).ravel())
    np.testing.assert_array_equal(out[PerFeature("max", 3, 16)], got[t].max(axis=(1, 2)))
    with pytest.raises(GraphOptError, match="no tensor named 'nope' in the model"):
        with_outputs(model, [], reducers={"nope": ("min",)})


def test_stream_with_a_byte_budget_sizes_its_batches_by_the_tensors_bytes():
    model = small_cnn()
    data = random_dataset(model, 10, seed=2)
    per_sample = 16 * 16 * 16 * 4  # relu5_out, float32
    batches = list(stream(model, data, ["relu5_out"], budget_bytes=3 * per_sample))
    assert [len(feed["x"]) for feed, _ in batches] == [1, 3, 3, 3]  # one sample first, then the budget's
    whole = next(stream(model, data, ["relu5_out"], batch_size=10))[1]["relu5_out"]
    assert len(list(stream(model, data, ["relu5_out"]))) == 1  # without a budget: batches of 32
    np.testing.assert_allclose(np.concatenate([v["relu5_out"] for _, v in batches]), whole, rtol=1e-5, atol=1e-6)


def test_a_failing_run_is_one_line_naming_the_data_and_the_step():
    class Failing:
        def run(self, names, feed):
            raise RuntimeError("bad input\nstack trace")

    data = Dataset({"x": np.zeros((4, 2), np.float32)}, None, "calib.npz")
    with pytest.raises(GraphOptError, match=r"^onnxruntime failed to run the model on calib.npz \(probe\): bad input$"):
        next(run_batches(Failing(), ["y"], data, 2, "probe"))


def test_feature_distance_matches_definition():
    model = small_cnn()
    damaged = _scaled(model, "conv6.w", 1.3)
    data = random_dataset(model, 4)
    got = feature_distances(model, damaged, data, [("bn8_out", "bn8_out")])["bn8_out"]
    a = next(stream(model, data, ["bn8_out"], batch_size=4))[1]["bn8_out"]
    b = next(stream(damaged, data, ["bn8_out"], batch_size=4))[1]["bn8_out"]
    assert got == pytest.approx(metrics.feature_distance(a, b)) and got > 0
    assert feature_distances(model, model, data, [("bn8_out", "bn8_out")])["bn8_out"] == 0


def test_relation_distance():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((8, 5))
    assert metrics.relation_distance(f, f) == 0
    assert metrics.relation_distance(f, 3 * f) == pytest.approx(0)  # scale-free: relations, not values
    assert metrics.relation_distance(f, rng.standard_normal((8, 5))) > 0.05


def test_verify_api_reports_layers_and_features():
    model = small_cnn()
    damaged = _scaled(model, "head.w", 1.2)
    report = verify(model, damaged, layers=True, features=["relu21_out"], n_random=4)
    assert report.layers[-1].tensor == "logits" and report.features["relu21_out"] == 0
    assert report.outputs[0].relation is not None and report.to_dict()["layers"]


def test_feature_matched_by_position_when_a_rewrite_renamed_it():
    model = small_cnn()
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for node in renamed.graph.node:  # rename relu10's output, as a rewrite might
        node.input[:] = ["renamed" if x == "relu10_out" else x for x in node.input]
        node.output[:] = ["renamed" if x == "relu10_out" else x for x in node.output]
    data = random_dataset(model, 3)
    got = feature_distances(model, renamed, data, [("relu10_out", "relu10_out")])
    assert got == {"relu10_out=renamed": 0.0}


def test_second_moments_same_sum_whether_batches_are_multiplied_alone_or_gathered(monkeypatch):
    from graph_opt import intermediates

    model = small_cnn()
    data = random_dataset(model, 40, seed=3)  # batches of 32 and 8
    hidden = "relu5_out"  # [N, 16, 16, 16]
    requests = {(hidden, 1), ("x", -1)}
    h = np.concatenate([v[hidden] for _, v in stream(model, data, [hidden])])
    h = np.moveaxis(h, 1, -1).reshape(-1, 16).astype(np.float64)
    x = data.inputs["x"].reshape(-1, data.inputs["x"].shape[-1]).astype(np.float64)
    direct = {(hidden, 1): h.T @ h, ("x", -1): x.T @ x}
    counts = {(hidden, 1): 40 * 16 * 16, ("x", -1): x.shape[0]}
    results = []
    for rows in (1, 10**9):  # each batch alone; everything gathered into one product
        monkeypatch.setattr(intermediates, "GRAM_ROWS", rows)
        intermediates._GRAM_MEMO.clear()
        results.append(intermediates.second_moments(model, data, requests))
    for got in results:
        for k, total in direct.items():
            np.testing.assert_allclose(got[k], total / counts[k], rtol=1e-12, atol=1e-12 * np.abs(total).max())


def test_second_moments_serve_a_subset_of_the_last_request_without_running(monkeypatch):
    from graph_opt import intermediates

    model = small_cnn()
    data = random_dataset(model, 6)
    both = intermediates.second_moments(model, data, {("relu5_out", 1), ("x", 1)})

    def no_run(*args, **kwargs):
        raise AssertionError("streamed again")

    monkeypatch.setattr(intermediates, "stream", no_run)
    one = intermediates.second_moments(model, data, {("relu5_out", 1)})
    assert set(one) == {("relu5_out", 1)} and one[("relu5_out", 1)] is both[("relu5_out", 1)]
    with pytest.raises(AssertionError, match="streamed again"):  # a tensor not asked for before: a new run
        intermediates.second_moments(model, data, {("relu5_out", 1), ("conv6_out", 1)})


def test_second_moments_in_float32_blocks_match_float64_within_its_rounding():
    from graph_opt import intermediates

    model = small_cnn()
    data = random_dataset(model, 40, seed=5)
    requests = {("relu5_out", 1), ("x", -1)}
    exact = intermediates.second_moments(model, data, requests)
    fast = intermediates.second_moments(model, data, requests, product=np.float32)
    assert fast is not exact and set(fast) == set(exact)  # the memo keys the product's dtype
    for k, h in exact.items():
        assert fast[k].dtype == np.float64
        err = np.abs(fast[k] - h).max() / np.abs(h).max()
        assert 0 < err < 1e-5, (k, err)  # float32 rounding: present, and far below GPTQ's 1% damping
