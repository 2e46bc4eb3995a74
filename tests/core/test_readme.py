"""README.md's promises, executed: the quick-start command, the Python example, the CI command."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _bash_blocks() if b.strip().endswith("pytest"))
    assert test_command.endswith("pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text()


def _graph_opt() -> list[str]:
    script = Path(sys.executable).with_name("graph-opt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "graph_opt"]


@pytest.mark.slow
def test_quick_start_command(tmp_path):
    quick = _bash_blocks()[0].strip()
    install, _, command = quick.partition(" && ")
    assert install == "pip install ."
    argv = shlex.split(command.replace("/tmp/out.onnx", str(tmp_path / "out.onnx")))
    assert argv[:3] == ["graph-opt", "optimize", "--example"]
    proc = subprocess.run(_graph_opt() + argv[1:], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "simplify" in proc.stdout and "fold_batchnorm" in proc.stdout
    assert all(name in proc.stdout for name in ("prune_channels", "factorize_conv", "quantize", "reconstruct"))
    assert (tmp_path / "out.onnx").stat().st_size > 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["passed"]
    final = report["steps"][-1]["parity"]
    assert final["accuracy_candidate"] >= 0.97 and final["samples"] == 500


def test_python_example(tmp_path, monkeypatch):
    from graph_opt import example

    block = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    shutil.copy(example.example_model_path(), tmp_path / "model.onnx")
    shutil.copy(example.example_dir() / example.CALIB_FILE, tmp_path / "calib.npz")
    shutil.copy(example.example_dir() / example.TEST_FILE, tmp_path / "test.npz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["result"].final_parity.cosine > 0.999
    assert namespace["report"].passed and namespace["stats"].macs > 0
    assert (tmp_path / "model.opt.onnx").is_file()


@pytest.mark.slow
def test_compressing_recipe_command(tmp_path):
    block = next(b for b in _bash_blocks() if "/tmp/small.onnx" in b)
    argv = shlex.split(block.replace("\\\n", " ").replace("/tmp/small.onnx", str(tmp_path / "small.onnx")))
    proc = subprocess.run(_graph_opt() + argv[1:] + ["--no-latency"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "small.json").read_text())
    assert all(step["accepted"] for step in report["steps"])
    final = report["steps"][-1]
    assert final["stats"]["macs"] <= 0.6 * report["original"]["stats"]["macs"]  # the target of the budget
    assert final["parity"]["accuracy_candidate"] >= 0.98
