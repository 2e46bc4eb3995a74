import numpy as np
import pytest
from builders import GraphBuilder, small_cnn

from graph_opt.data import Dataset, bind_shapes, load_data, parse_shape_spec, random_dataset
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
    with pytest.raises(DataError, match="bind it with --input-shape ids=NxN"):
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
