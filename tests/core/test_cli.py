import json

import numpy as np
import onnx
import pytest
from builders import run_cli as _run, constant_node_model, conv_bn_gemm_model, embedding_model, fixed_batch_model, gemm_bn_model, small_cnn, state_model, symbolic_model, unknown_domain_model

from graph_opt.cli import main
from graph_opt.data import bind_shapes
from graph_opt.errors import DataError
from graph_opt.model_io import save_model


def test_optimize_writes_model_and_report(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", out, "--pass", "fold_batchnorm", "--pass", "cleanup",
                             "--tolerance", "max_abs=1e-4", "--latency-runs", "3")
    assert code == 0, err
    assert "fold_batchnorm" in stdout and "latency" in stdout
    optimized = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in optimized.graph.node)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["passed"] and report["steps"][0]["report"]["rewritten"]
    assert report["steps"][0]["parity"]["outputs"][0]["max_abs"] < 1e-4


def test_optimize_json_prints_one_object(tmp_path, model_path, capsys):
    code, stdout, _ = _run(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--json", "--no-latency",
                           "--report", tmp_path / "r.json")
    assert code == 0
    doc = json.loads(stdout)
    assert [s["name"] for s in doc["steps"]] == ["simplify", "fold_batchnorm", "cleanup"]
    assert (tmp_path / "r.json").is_file()


def test_recipe(tmp_path, model_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- fold_batchnorm\n- cleanup\n")
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--recipe", recipe, "--no-latency")
    assert code == 0, err


def test_no_rollback_failure_exits_1_and_writes_nothing(tmp_path, model_path, capsys):
    out = tmp_path / "o.onnx"
    # fold_batchnorm is exact to ~1e-6, so a zero max_abs tolerance cannot hold
    code, _, err = _run(capsys, "optimize", model_path, "-o", out, "--tolerance", "max_abs=0", "--no-rollback", "--no-latency")
    assert code == 1 and "verification failed" in err
    assert not out.exists() and not (tmp_path / "o.json").exists()


def test_verify_exit_codes(tmp_path, model_path, capsys):
    other = save_model(gemm_bn_model(), tmp_path / "other.onnx")
    code, stdout, _ = _run(capsys, "verify", model_path, model_path, "--tolerance", "cosine=0.9999", "--json")
    assert code == 0 and json.loads(stdout)["passed"]
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    np.save(tmp_path / "labels.npy", np.arange(4))
    folded = tmp_path / "f.onnx"
    assert main(["optimize", str(model_path), "-o", str(folded), "--no-latency"]) == 0
    capsys.readouterr()
    code, stdout, _ = _run(capsys, "verify", model_path, folded, "--data", tmp_path / "d.npz", "--labels",
                           tmp_path / "labels.npy", "--tolerance", "max_abs=0")
    assert code == 1 and "FAILED" in stdout and "accuracy" in stdout
    code, _, err = _run(capsys, "verify", model_path, other)
    assert code == 2 and err.count("\n") == 1


def test_inspect_and_passes(model_path, capsys):
    code, stdout, _ = _run(capsys, "inspect", model_path, "--json", "--runs", "3")
    doc = json.loads(stdout)
    assert code == 0 and doc["ops"]["Conv"] == 4 and doc["macs"] > 0 and doc["latency_ms"] > 0
    code, stdout, _ = _run(capsys, "inspect", model_path, "--no-latency")
    assert code == 0 and "largest layers" in stdout
    code, stdout, _ = _run(capsys, "passes", "--json")
    assert code == 0 and {p["name"] for p in json.loads(stdout)} >= {"fold_batchnorm", "cleanup"}


def _corrupt(tmp_path, model_path):
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(300))
    data = model_path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "ext").mkdir()
    save_model(small_cnn(), tmp_path / "ext" / "m.onnx", external_data=True)
    (tmp_path / "ext" / "m.onnx.data").unlink()


@pytest.mark.parametrize("argv, message", [
    (["optimize", "{tmp}/missing.onnx", "-o", "{tmp}/o.onnx"], "model file not found"),
    (["optimize", "{tmp}/random.onnx", "-o", "{tmp}/o.onnx"], "not a valid ONNX model"),
    (["optimize", "{tmp}/truncated.onnx", "-o", "{tmp}/o.onnx"], "not a valid ONNX model"),
    (["optimize", "{tmp}/ext/m.onnx", "-o", "{tmp}/o.onnx"], "external data file missing"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "nope"], "unknown pass 'nope'"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "cleanup:bogus=1"], "has no option 'bogus'"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--input-shape", "x=1xAx16"], "bad --input-shape"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--input-shape", "nope=1x3x16x16"], "no model input named 'nope'"),
    (["optimize", "{model}", "-o", "{model}"], "refusing to overwrite the input model"),
    (["optimize", "{model}", "-o", "{tmp}/no/dir/o.onnx"], "output directory does not exist"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--tolerance", "speed=3"], "bad --tolerance"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--data", "{tmp}/nothing.npz"], "data path not found"),
    (["optimize", "-o", "{tmp}/o.onnx"], "give either MODEL or --example"),
    (["optimize", "{model}"], "required: -o/--output"),
    (["verify", "{model}"], "required"),
    (["inspect", "{tmp}/random.onnx"], "not a valid ONNX model"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_are_one_line_exit_2_nothing_written(tmp_path, model_path, capsys, argv, message):
    _corrupt(tmp_path, model_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = [a.format(tmp=tmp_path, model=model_path) for a in argv]
    code, stdout, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("graph-opt: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err and stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_closed_stdout_pipe_is_not_a_traceback():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "graph_opt", "passes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # like `graph-opt passes | head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err


def test_verify_layers_binds_the_dims_given_by_input_shape(tmp_path, capsys):
    model = symbolic_model()  # every input dim symbolic: the per-layer shapes need --input-shape
    path = save_model(model, tmp_path / "m.onnx")
    shapes = ("--input-shape", "x=2x3x8x8", "--input-shape", "t=2x5x16")
    code, stdout, err = _run(capsys, "verify", path, path, "--layers", *shapes)
    assert code == 0, err + stdout
    rows = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    assert {"c2_out", "ffn1_out", "ffn2_out", "z"} <= rows  # a per-layer row for both inputs' branches
    assert "first divergence (SNR < 30 dB): none" in stdout


# ---- inspect shows what it can; inputs as real exports have them ----

def test_inspect_with_dynamic_dims_reports_what_is_known(tmp_path, capsys):
    model = symbolic_model()
    with pytest.raises(DataError):  # vacuity: these dims cannot be bound without the user
        bind_shapes(model)
    path = save_model(model, tmp_path / "m.onnx")
    code, stdout, err = _run(capsys, "inspect", path, "--json", "--runs", "3")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["params"] == (8 * 27 + 8) + (8 * 8 + 8) + 2 * 4 * 8 + 2 * 16 * 32 and doc["ops"]["Conv"] == 2
    assert doc["macs"] is None and doc["latency_ms"] is None and "--input-shape" in doc["latency_note"]
    layers = {l["name"]: l for l in doc["layers"]}
    assert layers["ffn1"]["macs"] is None and layers["ffn1"]["macs_symbolic"] == "512*S"  # [1, S, 16] x [16, 32]
    assert layers["ffn2"]["macs_symbolic"] == "512*S" and doc["macs_symbolic"] == "1024*S"
    assert layers["c1"]["macs"] is None and layers["c1"]["macs_symbolic"] is None  # unknown, not 0
    assert doc["input_shape_hint"] == "--input-shape x=1xCxHxW --input-shape t=1xSxD"
    code, stdout, _ = _run(capsys, "inspect", path, "--no-latency")
    assert code == 0 and "1.02k·S" in stdout and "unknown" in stdout
    assert "complete the count with --input-shape x=1xCxHxW --input-shape t=1xSxD" in stdout
    code, stdout, _ = _run(capsys, "inspect", path, "--json", "--runs", "3",
                           "--input-shape", "x=1x3x8x8", "--input-shape", "t=1x4x16")
    doc = json.loads(stdout)
    assert code == 0 and doc["macs"] == 8 * 64 * 27 + 8 * 64 * 8 + 2 * 4 * 16 * 32 and doc["latency_ms"] > 0
    assert doc["input_shape_hint"] is None


def test_inspect_counts_constant_node_weights(tmp_path, capsys):
    model = constant_node_model()
    assert not model.graph.initializer  # vacuity: every weight is a Constant node
    reference = json.loads(_run(capsys, "inspect", save_model(conv_bn_gemm_model(), tmp_path / "r.onnx"),
                                "--json", "--no-latency")[1])
    code, stdout, _ = _run(capsys, "inspect", save_model(model, tmp_path / "m.onnx"), "--json", "--no-latency")
    doc = json.loads(stdout)
    assert code == 0 and all(l["params"] > 0 for l in doc["layers"])
    assert [(l["name"], l["params"], l["macs"]) for l in doc["layers"]] == \
        [(l["name"], l["params"], l["macs"]) for l in reference["layers"]]
    assert doc["macs"] == reference["macs"] > 0


def test_inspect_a_model_onnxruntime_cannot_run(tmp_path, capsys):
    code, stdout, err = _run(capsys, "inspect", save_model(unknown_domain_model(), tmp_path / "m.onnx"), "--runs", "3")
    assert code == 0, err
    assert "latency not measured: onnxruntime cannot load the model" in stdout and "Conv" in stdout


@pytest.mark.parametrize("build, extra", [
    (fixed_batch_model, []),                                    # batch fixed at 2: latency was fed 1 sample
    (state_model, []),                                          # state [2, batch, 8] and a 0-d sample rate
    (embedding_model, ["--input-shape", "input_ids=1x6"]),      # int64 ids into a 7-row table
])
def test_optimize_real_inputs_end_to_end(tmp_path, capsys, build, extra):
    path = save_model(build(), tmp_path / "m.onnx")
    code, stdout, err = _run(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--latency-runs", "3", "--json", *extra)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["passed"] and doc["original"]["stats"]["latency_ms"] > 0
    assert all(s["accepted"] and s["parity"]["outputs"][0]["cosine"] > 0.99999 for s in doc["steps"] if s["modified"])
    assert any(s["modified"] for s in doc["steps"])  # fold_batchnorm really rewrote something


def test_optimize_state_model_with_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((5, 16)), state=rng.standard_normal((2, 5, 8)), sr=np.int64(8000))
    path = save_model(state_model(), tmp_path / "m.onnx")
    code, stdout, err = _run(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--data", tmp_path / "d.npz",
                             "--no-latency", "--json")
    assert code == 0, err
    assert json.loads(stdout)["original"]["parity"]["samples"] == 5


def test_inspect_a_model_with_a_sequence_input(tmp_path, capsys):
    from onnx import TensorProto, helper

    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("SequenceAt", ["xs", "zero"], ["x"]), helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "seq", [seq], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    code, stdout, err = _run(capsys, "inspect", save_model(model, tmp_path / "m.onnx"), "--json", "--runs", "3")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["ops"] == {"Relu": 1, "SequenceAt": 1} and "not a tensor" in doc["latency_note"]
