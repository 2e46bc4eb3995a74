import numpy as np
import onnx
import pytest
from builders import small_cnn
from onnx import numpy_helper

from graph_opt import metrics
from graph_opt.data import random_dataset
from graph_opt.errors import GraphOptError
from graph_opt.runtime import run_model
from graph_opt.verify import check_tolerances, parse_tolerance, verify


def _perturbed(model, name, factor):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, name))
    return out


def test_identical_models_are_exact():
    model = small_cnn()
    report = verify(model, model, random_dataset(model, 16))
    (out,) = report.outputs
    assert out.max_abs == 0 and out.cosine == 1.0 and out.snr_db == float("inf")
    assert out.top1 == 1.0 and out.top5 == 1.0 and abs(out.kd_loss) < 1e-12
    assert report.passed


def test_catches_a_wrong_rewrite():
    model = small_cnn()
    wrong = _perturbed(model, "head.w", 1.05)  # a 5% error in one weight: a subtly wrong rewrite
    data = random_dataset(model, 16)
    report = verify(model, wrong, data, tolerances={"max_abs": 1e-5, "snr_db": 60})
    assert report.max_abs > 1e-3
    assert 20 < report.snr_db < 60
    assert not report.passed and len(report.violations) == 2


def test_accuracy_with_labels():
    model = small_cnn()
    data = random_dataset(model, 20)
    ref = run_model(model, data)["logits"]
    assert ref.shape == (20, 10)
    data.labels = np.argmax(ref, 1)
    data.labels[:5] = (data.labels[:5] + 1) % 10
    report = verify(model, model, data, tolerances={"accuracy": 0.8, "accuracy_drop": 0.0})
    assert report.accuracy_reference == pytest.approx(0.75)
    assert report.accuracy_candidate == pytest.approx(0.75)
    assert report.violations == ["accuracy = 0.75 < 0.8"]


def test_metrics_on_known_values():
    t = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    s = np.array([[1.0, 3.0, 2.0], [3.0, 1.0, 0.0]])
    assert metrics.top1_agreement(t, s) == 0.5
    assert metrics.topk_agreement(t, s, 2) == 1.0
    assert metrics.cosine([1, 0], [0, 1]) == 0.0
    assert metrics.snr_db(np.ones(4), np.ones(4) * 1.1) == pytest.approx(20.0)
    assert metrics.rel_error(np.ones(4), np.ones(4) * 1.1) == pytest.approx(0.1)
    # KD loss: T²·KL, zero for identical logits, positive otherwise, and known for a 2-class case
    assert metrics.kd_loss(t, t) == pytest.approx(0.0, abs=1e-12)
    p = np.array([[0.0, 0.0]])
    q = np.array([[0.0, np.log(3.0)]])  # softmax = [0.25, 0.75]
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert metrics.kd_loss(p, q) == pytest.approx(expected)
    assert metrics.kd_loss(p, q, temperature=2.0) > 0
    ce = -np.log(0.75)
    assert metrics.kd_loss(p, q, alpha=0.0, labels=np.array([1])) == pytest.approx(ce)


def test_tolerance_parsing():
    assert parse_tolerance("cosine=0.99") == ("cosine", 0.99)
    with pytest.raises(GraphOptError, match="METRIC=VALUE"):
        parse_tolerance("bogus=1")
    with pytest.raises(GraphOptError, match="not a number"):
        parse_tolerance("cosine=high")


def test_unmeasurable_tolerance_is_a_violation():
    model = small_cnn()
    report = verify(model, model, random_dataset(model, 4))
    assert check_tolerances(report, {"accuracy_drop": 0.01})[0].startswith("accuracy_drop: not measurable")


def test_kd_loss_with_labels_adds_the_hard_label_term():
    model = small_cnn()
    data = random_dataset(model, 12)
    logits = run_model(model, data)["logits"]
    data.labels = np.argmax(logits, 1)
    wrong = _perturbed(model, "head.w", 1.3)
    soft = verify(model, wrong, data).outputs[0].kd_loss
    mixed = verify(model, wrong, data, kd_alpha=0.5, temperature=2.0).outputs[0].kd_loss
    cand = run_model(wrong, data)["logits"]
    expected = metrics.kd_loss(logits, cand, temperature=2.0, alpha=0.5, labels=data.labels)
    assert mixed == pytest.approx(expected) and soft == pytest.approx(metrics.kd_loss(logits, cand))
    assert mixed != pytest.approx(soft)


def test_sessions_take_the_weights_as_arrays_not_inside_the_serialized_model(monkeypatch):
    """make_session serializes a weightless model and hands the weights over as arrays: the same
    outputs as a session from the whole model's bytes, also with an initializer nothing reads
    (onnxruntime drops those before it would take the array) and with the arrays gone."""
    import gc

    import onnxruntime as ort

    from graph_opt.runtime import make_session, session_options

    model = small_cnn(seed=1)
    unread = numpy_helper.from_array(np.ones((16, 16), np.float32), "unread_weight")
    model.graph.initializer.append(unread)
    data = random_dataset(model, 4, seed=0)
    feed = {k: v for k, v in data.inputs.items()}
    plain = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    sources = []
    real = ort.InferenceSession

    def spy(source, *args, **kwargs):
        sources.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    session = make_session(model)
    gc.collect()  # the handed-over arrays are gone; onnxruntime copied them
    for got, want in zip(session.run(None, feed), plain.run(None, feed)):
        np.testing.assert_array_equal(got, want)
    carried = onnx.load_from_string(sources[0]).graph.initializer
    # Only the unread initializer travels inside the model; every read weight of 1 KB or more is a reference.
    assert [t.name for t in carried if len(t.raw_data) >= 1024] == ["unread_weight"]
    handed = [t.name for t in carried if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(handed) >= 2 and all(len(t.raw_data) >= 1024 for t in model.graph.initializer if t.name in handed)


def test_a_quantized_candidate_runs_with_its_weights_dequantized_once():
    from graph_opt.pass_base import PassContext
    from graph_opt.passes import Quantize
    from graph_opt.runtime import make_session, weights_dequantized
    from graph_opt.verify import Reference, compare_outputs

    model = small_cnn()
    data = random_dataset(model, 6)
    quantized = Quantize(sensitivity_snr_db=None, prefer="size")(model, PassContext(data=data)).model
    shell, weights = weights_dequantized(quantized)
    dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    left = [n for n in shell.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and len(left) < len(dq)  # the weights' DequantizeLinear are gone, the activations' stay
    assert all(n.input[0] not in {t.name for t in quantized.graph.initializer} for n in left)
    folded = run_model(make_session(shell, weights=weights), data)
    as_written = run_model(quantized, data)  # optimizations off: every DequantizeLinear runs
    assert all(np.array_equal(folded[k], as_written[k]) for k in as_written)  # convolutions: bit for bit
    reference = Reference(model, data)
    assert reference.compare(quantized).to_dict() == compare_outputs(reference.outputs, as_written, data_source=data.source).to_dict()
    assert weights_dequantized(model) is None  # nothing to fold
    assert len(quantized.graph.node) > len(shell.graph.node)  # the input model is not touched
