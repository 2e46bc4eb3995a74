import os
import sys

# Shared model builders live next to this file; make `import builders` work from any test folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("GRAPH_OPT_PROGRESS", "0")

# Sensitivity curves (graph_opt/budget.py) are cached on disk: never in the user's home from a test.
import tempfile

os.environ["GRAPH_OPT_CACHE"] = tempfile.mkdtemp(prefix="graph-opt-test-cache-")


import pytest  # noqa: E402


@pytest.fixture
def model_path(tmp_path):
    """A small CNN saved as tmp_path/model.onnx (the CLI tests' input)."""
    from builders import small_cnn

    from graph_opt.model_io import save_model

    return save_model(small_cnn(), tmp_path / "model.onnx")


@pytest.fixture(autouse=True)
def _no_latency_gate(monkeypatch):
    """quantize's latency gate (prefer='speed' on the host) times this CPU: tests never depend on
    timing, so its profiler reports nothing (every layer stays as planned) unless a test injects
    fake timings of its own (tests/passes/test_quantize_speed.py)."""
    from graph_opt.passes.quantize import speed

    monkeypatch.setattr(speed, "profile_timer", lambda feed, runs, threads=1: lambda f, q: ([], []))
    # and the whole-model check finds the last int8 form timed the fastest (the planned one when
    # nothing was kept float)
    monkeypatch.setattr(speed, "latency_timer", lambda feed, runs, threads=1: _descending)


def _descending(models):
    return [1.0 / (i + 1) for i in range(len(models))]
