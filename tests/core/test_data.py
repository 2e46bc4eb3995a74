import numpy as np
import pytest
from builders import GraphBuilder, embedding_model, fixed_batch_model, scalar_input_model, small_cnn, state_model

import graph_opt
from graph_opt.data import Dataset, batch_layout, bind_shapes, index_bound, load_data, parse_shape_spec, random_dataset
from graph_opt.errors import DataError


def _two_input_model():
    g = GraphBuilder()
    a = g.input("ids", ["N", "seq"], np.int64)
    m = g.input("attention_mask", ["N", "seq"], np.int64)
    g.output(g.node("Add", [a, m], ["y"]), ["N", "seq"], np.int64)
    return g.build()


def test_npz_file_and_directory(tmp_path):
    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16))  # float64: cast to the model's float32
    np.savez(tmp_path / "a.npz", x=x[:4], labels=np.arange(4))
    data = load_data(tmp_path / "a.npz", model)
    assert data.inputs["x"].dtype == np.float32 and len(data) == 4 and list(data.labels) == [0, 1, 2, 3]
    d = tmp_path / "dir"
    d.mkdir()
    np.savez(d / "0.npz", x=x[:2])
    np.savez(d / "1.npz", x=x[2:])
    assert len(load_data(d, model)) == 6


def test_single_input_accepts_any_array_name(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 3, 16, 16), np.float32))
    assert load_data(tmp_path / "a.npz", small_cnn()).inputs["x"].shape == (2, 3, 16, 16)


def test_calibration_data_reader():
    class Reader:
        def __init__(self):
            self.items = [{"x": np.ones((1, 3, 16, 16), np.float32) * i} for i in range(3)]

        def get_next(self):
            return self.items.pop(0) if self.items else None

    data = load_data(Reader(), small_cnn())
    assert len(data) == 3 and data.inputs["x"][2].max() == 2


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((2, 3, 16, 16)), "z": np.zeros(2)}, "no data for model input 'x'"),
    ({"x": np.zeros((2, 3, 8, 8))}, "model expects"),
    ({"x": np.zeros((2, 3, 16))}, "rank 4"),
    ({"x": np.zeros((2, 3, 16, 16)), "labels": np.zeros(5)}, "5 labels for 2 samples"),
    ({"x": np.zeros((2, 3, 16, 16), np.int32)}, "model expects float32"),
])
def test_mismatched_data(tmp_path, arrays, message):
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(tmp_path / "a.npz", small_cnn())


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot read"):
        load_data(tmp_path / "bad.npz", small_cnn())
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "missing.npz", small_cnn())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npz files"):
        load_data(tmp_path / "empty", small_cnn())


def test_shape_specs_and_binding():
    assert parse_shape_spec("input=1x3x224x224") == ("input", (1, 3, 224, 224))
    for bad in ["input", "input=1xAx3", "=1x2", "x=0x3"]:
        with pytest.raises(DataError):
            parse_shape_spec(bad)
    model = _two_input_model()
    with pytest.raises(DataError, match=r"bind it with --input-shape ids=1xSEQ$"):
        bind_shapes(model)
    with pytest.raises(DataError, match="no model input named 'nope'"):
        bind_shapes(model, {"nope": (1, 2)})
    with pytest.raises(DataError, match="rank 2"):
        bind_shapes(model, {"ids": (1, 2, 3)})
    shapes = bind_shapes(model, {"ids": (2, 7), "attention_mask": (2, 7)})
    assert shapes == {"ids": (2, 7), "attention_mask": (2, 7)}


def test_random_data_is_seeded_and_follows_conventions():
    model = _two_input_model()
    shapes = {"ids": (1, 5), "attention_mask": (1, 5)}
    a = random_dataset(model, 3, shapes=shapes, seed=1)
    b = random_dataset(model, 3, shapes=shapes, seed=1)
    assert a.inputs["ids"].shape == (3, 5) and np.array_equal(a.inputs["ids"], b.inputs["ids"])
    assert np.all(a.inputs["attention_mask"] == 1)
    assert not np.array_equal(a.inputs["ids"], random_dataset(model, 3, shapes=shapes, seed=2).inputs["ids"])


def test_dataset_batches():
    data = Dataset({"x": np.arange(10)})
    assert [len(b["x"]) for b in data.batches(4)] == [4, 4, 2]


# ---- inputs as real exports have them ----

def _exact(result):
    """The default recipe ran end to end, exactly, with latency measured on a feed the model takes."""
    assert result.passed and result.final_parity.cosine > 0.99999
    assert result.baseline.stats.latency_ms > 0 and all(s.stats.latency_ms > 0 for s in result.steps)


def test_scalar_input_is_shared_by_every_run(tmp_path):
    model = scalar_input_model()
    assert [d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim] == []  # really 0-d
    data = random_dataset(model, 5)
    assert data.inputs["gain"].shape == () and data.inputs["x"].shape == (5, 8) and len(data) == 5
    assert [f["gain"].shape for f in data.batches(2)] == [(), (), ()]
    assert [len(f["x"]) for f in data.batches(2)] == [2, 2, 1]
    np.savez(tmp_path / "d.npz", x=np.ones((3, 8)), gain=np.float64(2.0))
    loaded = load_data(tmp_path / "d.npz", model)
    assert len(loaded) == 3 and loaded.inputs["gain"].dtype == np.float32 and loaded.take(2).inputs["gain"] == 2
    _exact(graph_opt.optimize(model, data=loaded, latency_runs=3))


def test_batch_fixed_at_two(tmp_path):
    model = fixed_batch_model(2)
    assert batch_layout(model).fixed == 2
    data = random_dataset(model, 3)
    assert len(data) == 6 and data.sample(0)["x"].shape == (2, 3, 8, 8)  # a run takes exactly 2 samples
    assert [len(f["x"]) for f in data.batches(32)] == [2, 2, 2]
    _exact(graph_opt.optimize(model, latency_runs=3))
    np.savez(tmp_path / "five.npz", x=np.ones((5, 3, 8, 8)), labels=np.arange(5))
    five = load_data(tmp_path / "five.npz", model)
    assert len(five) == 4 and len(five.labels) == 4  # whole runs only
    np.savez(tmp_path / "one.npz", x=np.ones((1, 3, 8, 8)))
    with pytest.raises(DataError, match="exactly 2 per run"):
        load_data(tmp_path / "one.npz", model)


def test_state_with_batch_on_axis_1(tmp_path):
    model = state_model()
    assert batch_layout(model).axes == {"x": 0, "state": 1, "sr": None}
    data = random_dataset(model, 4)
    assert data.inputs["state"].shape == (2, 4, 8) and data.inputs["sr"].shape == ()
    assert data.inputs["sr"] == 16000  # a sample rate, not a random integer
    feeds = list(data.batches(3))
    assert [f["state"].shape for f in feeds] == [(2, 3, 8), (2, 1, 8)] and [len(f["x"]) for f in feeds] == [3, 1]
    assert data.sample(0)["state"].shape == (2, 1, 8)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 16)), state=rng.standard_normal((2, 6, 8)), sr=np.int64(8000))
    loaded = load_data(tmp_path / "d.npz", model)
    assert len(loaded) == 6 and loaded.take(2).inputs["state"].shape == (2, 2, 8)
    _exact(graph_opt.optimize(model, data=loaded, latency_runs=3))
    np.savez(tmp_path / "bad.npz", x=rng.standard_normal((6, 16)), state=rng.standard_normal((2, 5, 8)), sr=np.int64(8000))
    with pytest.raises(DataError, match="disagree on the number of samples"):
        load_data(tmp_path / "bad.npz", model)


def test_reader_and_directory_stack_on_the_batch_axis(tmp_path):
    model = state_model()
    feeds = [{"x": np.ones((1, 16), np.float32) * i, "state": np.ones((2, 1, 8), np.float32) * i,
              "sr": np.array(16000, np.int64)} for i in range(3)]

    class Reader:
        def get_next(self):
            return feeds.pop(0) if feeds else None

    uneven = [dict(feeds[0]), {"x": feeds[1]["x"], "state": feeds[1]["state"]}]

    class Uneven:
        def get_next(self):
            return uneven.pop(0) if uneven else None

    with pytest.raises(DataError, match="sample 1 has arrays"):
        load_data(Uneven(), model)
    data = load_data(Reader(), model)
    assert data.inputs["state"].shape == (2, 3, 8) and data.inputs["state"][0, 2, 0] == 2 and data.inputs["sr"].shape == ()
    (tmp_path / "d").mkdir()
    for i in range(2):
        np.savez(tmp_path / "d" / f"{i}.npz", x=np.zeros((2, 16)), state=np.zeros((2, 2, 8)), sr=np.int64(16000))
    assert load_data(tmp_path / "d", model).inputs["state"].shape == (2, 4, 8)


@pytest.mark.parametrize("through", [True, False])
def test_random_ids_stay_within_the_embedding_table(through):
    model = embedding_model(rows=7, through=through)
    assert index_bound(model, "input_ids") == 7 and index_bound(model, "token_type_ids") == 2
    data = random_dataset(model, 64, shapes={"input_ids": (1, 5)})  # seq bound on one input binds all three
    ids = data.inputs["input_ids"]
    assert ids.shape == (64, 5) and ids.min() >= 0 and ids.max() < 7 and len(np.unique(ids)) == 7
    assert np.all(data.inputs["attention_mask"] == 1) and np.all(data.inputs["token_type_ids"] == 0)
    _exact(graph_opt.optimize(model, shapes={"input_ids": (1, 5)}, latency_runs=3))


def test_plain_dataset_gets_the_models_layout():
    model = state_model()
    plain = Dataset({"x": np.ones((3, 16), np.float32), "state": np.ones((2, 3, 8), np.float32),
                     "sr": np.array(16000, np.int64)})
    report = graph_opt.verify(model, model, data=plain.with_labels(None))
    assert report.samples == 3 and report.cosine > 0.99999


def test_scalar_integer_defaults_to_a_valid_index():
    g = GraphBuilder(opset=17)
    x = g.input("x", ["N", 4])
    picked = g.node("Gather", [g.bn(g.gemm(x, 4, 4, name="fc"), 4), g.input("k", [], np.int64)], axis=1)
    g.node("Identity", [picked], ["y"])
    g.output("y", ["N"])
    model = g.build()
    assert index_bound(model, "k") is None  # vacuity: the table is computed, so no bound from it
    data = random_dataset(model, 4)
    assert data.inputs["k"].shape == () and data.inputs["k"] == 0
    _exact(graph_opt.optimize(model, latency_runs=3))


def test_random_data_failure_names_the_way_out():
    g = GraphBuilder(opset=17)
    g.node("Expand", [g.input("x", [1, 3, 1]), g.input("shape", [2], np.int64)], ["y"])
    g.output("y", ["A", "B", "C"])
    with pytest.raises(graph_opt.errors.GraphOptError, match="give real ones with --data"):
        graph_opt.optimize(g.build(), latency=False)


def test_unnamed_state_batch_axis_is_taken_from_the_data(tmp_path):
    """silero-vad style: input [?, 16] and state [2, ?, 8] with unnamed dims: the specs cannot say
    where the state batches, the data can (its axis 1 has the input's sample count)."""
    import onnx

    from builders import state_model
    from graph_opt.data import load_data

    model = state_model()
    for value in model.graph.input:  # drop the dims' names, as exporters often do
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
    n = 6
    arrays = {"x": np.ones((n, 16), np.float32), "state": np.arange(2 * n * 8, dtype=np.float32).reshape(2, n, 8),
              "sr": np.array(16000, np.int64)}
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_data(tmp_path / "d.npz", model)
    assert data.axes["state"] == 1 and len(data) == n
    first = data.sample(0)
    assert first["state"].shape == (2, 1, 8) and np.array_equal(first["state"], arrays["state"][:, :1])
    onnx.checker.check_model(model)


def test_batch_size_within_bounds_the_inputs_of_a_run(monkeypatch):
    from graph_opt import data as data_mod
    from graph_opt.data import batch_size_within
    from graph_opt.verify import Reference

    model = small_cnn()  # [N, 3, 16, 16] float32: 3 KB per sample
    data = random_dataset(model, 40)
    assert batch_size_within(data, model) == 32  # small samples: the usual 32
    monkeypatch.setattr(data_mod, "RUN_INPUT_BYTES", 3 * 16 * 16 * 4 * 5)  # five samples' inputs
    assert batch_size_within(data, model) == 5
    monkeypatch.setattr(data_mod, "RUN_INPUT_BYTES", 1)
    assert batch_size_within(data, model) == 1  # at least one
    fixed = fixed_batch_model()
    assert batch_size_within(random_dataset(fixed, 8), fixed) == batch_layout(fixed).fixed  # a static batch wins
    monkeypatch.setattr(data_mod, "RUN_INPUT_BYTES", 3 * 16 * 16 * 4 * 5)
    ref = Reference(model, data)
    assert ref.batch_size == 5 and len(ref.outputs["logits"]) == 40
    assert ref.compare(model).snr_db == float("inf")
