import numpy as np
import onnx
import pytest
from builders import small_cnn
from onnx import numpy_helper

from graph_opt import metrics, verify
from graph_opt.data import random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.intermediates import divergence, feature_distances, first_divergence, stream


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
