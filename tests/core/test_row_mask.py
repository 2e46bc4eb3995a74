"""graph_opt.row_mask: which input is a mask over positions (auto or named), and which positions of
a tensor it keeps."""

import numpy as np
import pytest
from builders import embedding_model, ffn_model, masked_pool_model, padded_data
from onnx import numpy_helper

from graph_opt.data import Dataset, random_dataset
from graph_opt.errors import DataError
from graph_opt.row_mask import RowMask, resolve


def calib(seed=0):
    return Dataset(padded_data(16, seed=seed), source="calib")


def test_auto_finds_the_attention_mask_that_pools_the_outputs():
    mask, note = resolve("auto", masked_pool_model(), calib())
    assert note is None and mask is not None
    assert mask.name == "attention_mask" and mask.how.startswith("auto")
    values = calib().inputs["attention_mask"]
    assert (mask.kept, mask.total) == (int(values.sum()), values.size) and 0 < mask.kept < mask.total
    assert mask.sample_shape == (1, 16)


def test_auto_skips_ids_and_type_ids_read_as_indices():
    model = embedding_model()
    rng = np.random.default_rng(0)
    n, seq = 8, 6
    lengths = rng.integers(2, seq + 1, n)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    data = Dataset({"input_ids": mask.copy(),  # the same values: only the graph tells them apart
                    "attention_mask": mask, "token_type_ids": np.zeros((n, seq), np.int64)}, source="calib")
    found, _ = resolve("auto", model, data)
    assert found is not None and found.name == "attention_mask"


def test_no_mask_without_zeros_or_without_a_mask_input():
    model = masked_pool_model()
    ones = dict(calib().inputs, attention_mask=np.ones((16, 16), np.int64))
    assert resolve("auto", model, Dataset(ones, source="calib")) == (None, None)
    assert resolve("auto", model, random_dataset(model, 4, shapes={"x": (4, 16, 32), "attention_mask": (4, 16)}))[0] \
        is None
    model = ffn_model(act="Relu")
    assert resolve("auto", model, Dataset({"x": np.ones((2, 3, 8), np.float32)}, source="calib")) == (None, None)
    assert resolve(None, masked_pool_model(), calib()) == (None, None)
    assert resolve("none", masked_pool_model(), calib()) == (None, None)


def test_a_named_mask_is_checked():
    model = masked_pool_model()
    mask, _ = resolve("attention_mask", model, calib())
    assert mask.name == "attention_mask" and mask.how == "given"
    with pytest.raises(DataError, match="no input of that name"):
        resolve("mask", model, calib())
    with pytest.raises(DataError, match="other than 0 and 1"):
        resolve("attention_mask", model, Dataset(dict(calib().inputs, attention_mask=calib().inputs["attention_mask"] * 2),
                                                 source="calib"))
    empty = calib().inputs["attention_mask"].copy()
    empty[3] = 0
    with pytest.raises(DataError, match="0 everywhere in some sample"):
        resolve("attention_mask", model, Dataset(dict(calib().inputs, attention_mask=empty), source="calib"))


def test_positions_a_mask_keeps():
    m = np.array([[1, 1, 0], [1, 0, 0]])
    mask = RowMask("m", (1, 3), 3, 6, "given")
    feed = {"m": m}
    # [N, S, H], features last: one flag per (sample, position)
    np.testing.assert_array_equal(mask.keep(feed, (2, 3, 5), -1), m.reshape(-1).astype(bool))
    # [N, C, S], channels on axis 1: positions are (N, S) again
    np.testing.assert_array_equal(mask.keep(feed, (2, 7, 3), 1), m.reshape(-1).astype(bool))
    # [N, S, K, H]: broadcast over the trailing position axis
    np.testing.assert_array_equal(mask.keep(feed, (2, 3, 4, 5), -1), np.repeat(m.reshape(-1), 4).astype(bool))
    # attention scores [N, heads, S, S] and pooled [N, H]: the mask does not apply
    assert mask.keep(feed, (2, 4, 3, 3), -1) is None
    assert mask.keep(feed, (2, 5), -1) is None
    assert mask.fits((1, 3, 5), -1) and not mask.fits((1, 5), -1) and not mask.fits(None, -1)


def test_cli_names_a_missing_mask_in_one_line(tmp_path, capsys):
    import onnx
    from builders import run_cli

    model, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(masked_pool_model(), model)
    np.savez(data, **padded_data(8))
    code, _, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "out.onnx", "--data", data, "--no-latency",
                           "--pass", "reconstruct:row_mask=mask")
    assert code == 2 and "row_mask='mask'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.onnx").exists()


def test_second_moments_count_only_the_kept_positions():
    from graph_opt.intermediates import second_moments

    model, data = masked_pool_model(), calib()
    mask, _ = resolve("auto", model, data)
    hidden = model.graph.node[1].output[0]  # fc1 + b1: the Relu's input, [N, S, 64]
    requests = {("x", -1), (hidden, -1)}
    grams = second_moments(model, data, requests, mask)
    keep = data.inputs["attention_mask"].reshape(-1) == 1
    x = data.inputs["x"].reshape(-1, 32).astype(np.float64)[keep]
    np.testing.assert_allclose(grams[("x", -1)], x.T @ x / len(x), rtol=1e-10)
    w1 = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w1")
    b1 = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "b1")
    h = (data.inputs["x"].reshape(-1, 32) @ w1 + b1).astype(np.float64)[keep]
    np.testing.assert_allclose(grams[(hidden, -1)], h.T @ h / len(h), rtol=1e-4, atol=1e-6 * np.abs(h).max() ** 2)
    unmasked = second_moments(model, data, requests)
    assert not np.allclose(unmasked[("x", -1)], grams[("x", -1)], rtol=0.1)  # vacuity: padding changes it
