import json

import numpy as np
import onnx
import pytest
from builders import run_cli as _run, gemm_bn_model, small_cnn

from graph_opt.cli import main
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
