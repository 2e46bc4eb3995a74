"""The CLI inside a pipeline: Markdown summaries for review, a second runtime, compare -o."""

import importlib.util
import json

import onnx
import pytest
from builders import run_cli as _run

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the optional openvino extra is not installed")


def test_report_md_is_written_for_a_passing_and_a_failing_run(tmp_path, model_path, capsys):
    md = tmp_path / "summary.md"
    code, out, err = _run(capsys, "optimize", model_path, "-o", tmp_path / "out.onnx", "--pass", "fold_batchnorm",
                          "--tolerance", "cosine=0.999", "--report-md", md, "--no-latency")
    assert code == 0, err
    text = md.read_text()
    assert "passed (exit 0)" in text and "| + fold_batchnorm |" in text and "- `cosine` >= 0.999:" in text
    assert "data:image/png;base64," in text  # matplotlib is a test dependency
    failing = tmp_path / "failing.md"
    code, _, _ = _run(capsys, "optimize", model_path, "-o", tmp_path / "x.onnx", "--pass", "quantize:weights=binary",
                      "--tolerance", "cosine=0.9999999", "--no-rollback", "--report-md", failing, "--no-latency")
    assert code == 1 and not (tmp_path / "x.onnx").exists()
    assert "FAILED (exit 1)" in failing.read_text() and "**broken**" in failing.read_text()


def test_report_md_in_a_missing_directory_is_one_line(tmp_path, model_path, capsys):
    code, _, err = _run(capsys, "optimize", model_path, "-o", tmp_path / "out.onnx", "--no-latency",
                        "--report-md", tmp_path / "nope" / "s.md")
    assert code == 2 and err.count("\n") == 1 and "--report-md" in err


def test_compare_accepts_dash_o(tmp_path, model_path, capsys):
    code, out, err = _run(capsys, "compare", model_path, "--order", "fold_batchnorm", "-o", tmp_path / "cmp",
                          "--no-latency")
    assert code == 0, err
    assert (tmp_path / "cmp" / "compare.json").is_file() and (tmp_path / "cmp" / "compare.md").is_file()


@needs_openvino
def test_verify_and_optimize_under_openvino(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, "optimize", model_path, "-o", out, "--pass", "quantize",
                             "--verify-runtime", "openvino", "--latency-runs", "5")
    assert code == 0, err
    report = json.loads((tmp_path / "out.json").read_text())
    ov = report["runtimes"]["openvino"]
    assert ov["steps"] and all(s["loads"] for s in ov["steps"])
    assert ov["parity"]["outputs"][0]["cosine"] > 0.99 and ov["latency_ratio"] > 0
    assert "under openvino:" in stdout
    code, stdout, err = _run(capsys, "verify", model_path, out, "--runtime", "openvino", "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["runtime"] == "openvino" and doc["latency_ratio"] > 0
    assert doc["outputs"][0]["cosine"] > 0.99
    assert onnx.load(str(out)).graph.node  # the model written is the onnxruntime-verified one
