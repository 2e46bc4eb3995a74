"""graph-opt compare: orderings, shared prefixes, backends, Pareto fronts, files and CLI errors."""

import itertools
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from builders import residual_model, run_cli as _run, small_cnn

import graph_opt
from graph_opt.compare import Comparer, NamedPipeline, cli_pipelines, named_pipelines, parse_ordering
from graph_opt.data import random_dataset
from graph_opt.errors import GraphOptError, PassError, SpecError
from graph_opt.pass_base import Pass
from graph_opt.pipeline import Pipeline
from graph_opt.plot import pareto_front
from graph_opt.registry import parse_spec

CALLS: Counter = Counter()


@dataclass(frozen=True, kw_only=True)
class Tally(Pass):
    """Counts its runs; an exact rewrite (a doc string) that records the history it was given."""

    name: ClassVar[str] = "tally"
    tag: str = "a"

    def run(self, model, report, ctx):
        CALLS[self.tag] += 1
        model.doc_string += self.tag
        report.rewrite("model", tag=self.tag, history=[r.options["tag"] for r in ctx.history])
        return model


def _strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _comparer(pipelines, model, **kw):
    kw.setdefault("latency", False)
    return Comparer(named_pipelines(pipelines), verify_data=random_dataset(model, 8), **kw)


# ---- what to compare ----

def test_orderings_split_on_spaces_and_options_keep_their_commas():
    passes = parse_ordering("prune_channels:mode=zero,ratio=0.25  quantize:op_types=Conv,Gemm cleanup")
    assert [p.spec() for p in passes] == ["prune_channels:ratio=0.25,mode=zero", "quantize:op_types=Conv,Gemm", "cleanup"]
    with pytest.raises(SpecError, match="separate the passes of an ordering with spaces: 'fold_batchnorm cleanup'"):
        parse_ordering("fold_batchnorm,cleanup")
    with pytest.raises(SpecError, match="empty ordering"):
        parse_ordering("   ")
    with pytest.raises(SpecError, match="a one-pass pipeline is"):
        named_pipelines([parse_spec("cleanup")])


def test_orders_then_permutations_in_a_stable_order_recipes_named_after_their_file(tmp_path):
    recipe = tmp_path / "exact.yaml"
    recipe.write_text("- fold_batchnorm\n- cleanup\n")
    pipes = cli_pipelines(recipes=[str(recipe)], orders=["cleanup prune_weights"],
                          permuted=["fold_batchnorm prune_weights cleanup"])
    assert [p.name for p in pipes] == ["exact", "P1", *(f"P{i}" for i in range(2, 8))]
    expected = [" ".join(o) for o in itertools.permutations(["fold_batchnorm", "prune_weights", "cleanup"])]
    assert [p.ordering for p in pipes[2:]] == expected
    assert pipes[0].ordering == "fold_batchnorm cleanup" and pipes[1].ordering == "cleanup prune_weights"
    again = cli_pipelines(orders=["fold_batchnorm cleanup", "fold_batchnorm  cleanup"])  # the same ordering twice
    assert [p.name for p in again] == ["P1"]


# ---- shared prefixes ----

def test_shared_prefixes_run_once_and_carry_their_history():
    CALLS.clear()
    model = small_cnn()
    orderings = [list(o) for o in itertools.permutations([Tally(tag="a"), Tally(tag="b"), Tally(tag="c")])]
    comparison = _comparer(orderings, model).run(model)
    assert len(comparison.results) == 6
    assert [p.ordering for p in comparison.pipelines][:2] == ["tally tally:tag=b tally:tag=c", "tally tally:tag=c tally:tag=b"]
    # 3 first steps + 6 second + 6 third = 15 runs, not 18: each tag 5 times
    assert comparison.pass_runs == 15 and comparison.steps_without_sharing == 18
    assert CALLS == {"a": 5, "b": 5, "c": 5}
    p1, p2 = comparison.results[:2]
    assert p1.steps[0] is p2.steps[0] and p1.steps[1] is not p2.steps[1]
    for pipe, result in zip(comparison.pipelines, comparison.results):
        tags = [p.tag for p in pipe.passes]
        assert [s.report.rewritten[0]["history"] for s in result.steps] == [tags[:i] for i in range(3)]
        assert result.model.doc_string == "".join(tags)
    assert "shared" in comparison.table()


def test_one_pipeline_records_exactly_what_pipeline_run_records():
    model = small_cnn()
    specs = ["fold_batchnorm", "cleanup", "prune_weights:sparsity=0.9", "prune_channels:mode=zero,ratio=0.25"]
    data = random_dataset(model, 8)
    tolerances = {"cosine": 0.9}
    expected = Pipeline([parse_spec(s) for s in specs], verify_data=data, tolerances=tolerances, latency=False).run(model)
    comparison = Comparer([NamedPipeline("P1", [parse_spec(s) for s in specs])], verify_data=data,
                          tolerances=tolerances, latency=False).run(model)
    got = comparison.results[0]
    statuses = [(s.modified, s.accepted) for s in got.steps]
    assert statuses == [(True, True), (False, True), (True, False), (True, True)]  # no change and a rollback covered
    assert _strip_seconds(got.to_dict()) == _strip_seconds(expected.to_dict())
    assert got.model.SerializeToString() == expected.model.SerializeToString()
    assert got.steps[1].stats is got.steps[0].stats and got.steps[2].model is got.steps[1].model


# ---- backends ----

ORDERS = ["fold_batchnorm prune_weights:sparsity=0.6 cleanup", "fold_batchnorm prune_channels:mode=zero quantize:activations=none",
          "prune_weights:sparsity=0.6 fold_batchnorm", "prune_channels:mode=zero quantize:activations=none"]


def _same_results(a, b):
    assert _strip_seconds(a.to_dict()) == _strip_seconds(b.to_dict())
    assert a.table(timings=False) == b.table(timings=False)
    for ra, rb in zip(a.results, b.results):
        assert ra.model.SerializeToString() == rb.model.SerializeToString()


def test_parallel_processes_give_the_sequential_results():
    model = small_cnn()
    sequential = _comparer(ORDERS, model, tolerances={"cosine": 0.95}).run(model)
    parallel = _comparer(ORDERS, model, tolerances={"cosine": 0.95}, jobs=2).run(model)
    assert sequential.pass_runs == 9  # fb, fb>pw, fb>pw>cleanup, fb>pc, fb>pc>q, pw, pw>fb, pc, pc>q
    assert any(not s.accepted for r in sequential.results for s in r.steps)  # a rollback crossed the process boundary
    _same_results(sequential, parallel)


def test_ray_backend_gives_the_sequential_results():
    pytest.importorskip("ray")
    model = small_cnn()
    sequential = _comparer(ORDERS[:2], model).run(model)
    distributed = _comparer(ORDERS[:2], model, jobs=2, backend="ray").run(model)
    _same_results(sequential, distributed)


def test_latency_of_every_distinct_model_measured_together_once():
    model = small_cnn()
    # "cleanup fold_batchnorm" and "fold_batchnorm cleanup" end in the same model: timed once, same number
    comparison = graph_opt.compare(model, {"x": "fold_batchnorm cleanup", "y": ["cleanup", "fold_batchnorm"]},
                                   latency_runs=3)
    records = [comparison.baseline, *(s for r in comparison.results for s in r.steps)]
    assert all(r.stats.latency_ms > 0 for r in records)
    assert comparison.latency["models"] == 2  # the original and the folded model
    x, y = comparison.results
    assert x.steps[-1].stats.latency_ms == y.steps[-1].stats.latency_ms
    assert [p.name for p in comparison.pipelines] == ["x", "y"]


# ---- Pareto fronts ----

def test_pareto_front_on_constructed_points():
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (2.0, 0.9), (0.5, 0.1), (None, 1.0), (4.0, math.nan), (5.0, 0.95),
              (5.0, 0.9), (6.0, math.inf)]
    assert pareto_front(points) == [True, True, False, True, True, False, False, True, False, True]
    assert pareto_front([]) == []


# ---- files and the command line ----

def test_cli_writes_json_markdown_and_plot(tmp_path, model_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "compare", model_path, "--order", "fold_batchnorm cleanup",
                             "--order", "prune_weights fold_batchnorm", "--out-dir", out, "--latency-runs", 3,
                             "--save-models")
    assert code == 0, err
    assert "P1" in stdout and "+ prune_weights" in stdout and "Pareto front (cosine against file size)" in stdout
    doc = json.loads((out / "compare.json").read_text())
    assert [p["name"] for p in doc["pipelines"]] == ["P1", "P2"] and doc["metric"] == "cosine"
    assert doc["pipelines"][0]["final"]["fidelity"] > 0.9999 and doc["pipelines"][0]["final"]["latency_ms"] > 0
    assert doc["pareto"]["size"] and doc["plot_skipped"] is None
    markdown = (out / "compare.md").read_text()
    assert "| pipeline | step |" in markdown and "![cosine against file size and latency](compare.png)" in markdown
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "P1.onnx").is_file() and (out / "P2.onnx").is_file()


def test_cli_without_matplotlib_skips_the_plot_and_writes_the_rest(tmp_path, model_path, capsys, monkeypatch):
    for name in [k for k in list(sys.modules) if k.split(".")[0] == "matplotlib"] + [
            "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "compare", model_path, "--permutations", "fold_batchnorm cleanup",
                             "--out-dir", out, "--no-latency")
    assert code == 0, err
    assert "plot skipped: matplotlib is not installed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    assert json.loads((out / "compare.json").read_text())["plot_skipped"].startswith("plot skipped")
    code, stdout, err = _run(capsys, "compare", model_path, "--order", "cleanup", "--out-dir", out, "--no-latency", "--json")
    assert code == 0 and json.loads(stdout)["latency"] is None and "plot skipped" in err


@pytest.mark.parametrize("argv, message", [
    (["--order", "fold_batchnorm nope"], "unknown pass 'nope'"),
    (["--order", ""], "empty --order"),
    (["--order", "fold_batchnorm,cleanup"], "separate the passes of an ordering with spaces"),
    (["--permutations", "cleanup:bogus=1 fold_batchnorm"], "has no option 'bogus'"),
    ([], "nothing to compare"),
    (["--permutations", "cleanup " * 7], "at most 6 passes"),
    (["--order", "cleanup", "--jobs", "0"], "--jobs must be at least 1"),
    (["--order", "cleanup", "--metric", "accuracy"], "needs labels"),
    (["--order", "cleanup", "--out-dir", "{tmp}/no/such/dir"], "its parent does not exist"),
    (["--order", "cleanup", "--save-models"], "--save-models needs --out-dir"),
    (["--recipe", "{tmp}/missing.yaml"], "recipe file not found"),
    (["--order", "cleanup", "--metric", "speed"], "invalid choice"),
])
def test_cli_user_errors_are_one_line_exit_2_nothing_written(tmp_path, model_path, capsys, argv, message):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, err = _run(capsys, "compare", model_path, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert err.startswith("graph-opt: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err and stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_needs_model_or_example(capsys):
    code, _, err = _run(capsys, "compare", "--order", "cleanup")
    assert code == 2 and "give either MODEL(s) or --example" in err


def test_plot_labels_of_nearby_points_do_not_overlap():
    from graph_opt.plot import _label_offsets

    placed = _label_offsets({(1.0, 1.0): ["P1"], (1.01, 1.0): ["P2"], (5.0, 0.0): ["P3", "P4"]})
    offsets = {text: off for _, off, text in placed}
    assert offsets["P1"] != offsets["P2"] and offsets["P3, P4"] == (5, 4)


@pytest.mark.slow
def test_ray_backend_attaches_to_a_running_cluster():
    """`ray start --head` on this machine (loopback only), then --backend ray --address: the results
    are the sequential ones."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).with_name("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_cmd = [str(ray_cli), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--include-dashboard=false", "--disable-usage-stats"]
    started = subprocess.run(env_cmd, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        model = small_cnn()
        sequential = _comparer(ORDERS[:2], model).run(model)
        attached = _comparer(ORDERS[:2], model, backend="ray", address=f"127.0.0.1:{port}").run(model)
        _same_results(sequential, attached)
        with pytest.raises(GraphOptError, match="--address names a Ray cluster"):
            _comparer(ORDERS[:2], model, address=f"127.0.0.1:{port}")
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120)


@dataclass(frozen=True, kw_only=True)
class Crash(Pass):
    """Raises inside the pass: a bug (ZeroDivisionError) or a user-facing GraphOptError."""

    name: ClassVar[str] = "crash"
    user: bool = False

    def run(self, model, report, ctx):
        if self.user:
            raise GraphOptError("calibration data has no input 'x'")
        return 1 / 0


def test_an_exception_inside_a_pass_names_the_pass_and_the_steps_before_it():
    import pickle

    model = small_cnn()
    with pytest.raises(PassError) as err:
        _comparer([[Tally(tag="c"), Tally(tag="b"), Crash()]], model).run(model)
    assert str(err.value).startswith("pass crash failed (after tally:tag=c -> tally:tag=b): ZeroDivisionError")
    assert err.value.internal and err.value.pass_name == "crash"
    back = pickle.loads(pickle.dumps(err.value))  # as it comes back from a worker process
    assert (str(back), back.pass_name, back.internal) == (str(err.value), "crash", True)
    with pytest.raises(PassError) as err:  # the same step function under Pipeline.run
        Pipeline([Crash(user=True)], verify_data=random_dataset(model, 4), latency=False).run(model)
    assert str(err.value) == "pass crash:user=True failed (the first step): calibration data has no input 'x'"
    assert not err.value.internal


def test_cli_prints_the_failing_pass_in_one_line_and_the_traceback_only_with_v(tmp_path, model_path, monkeypatch,
                                                                              capsys):
    import graph_opt.passes.cleanup as cleanup

    monkeypatch.setattr(cleanup.Cleanup, "run", lambda self, model, report, ctx: 1 / 0)
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", model_path, "-o", out, "--pass", "cleanup", "--no-latency")
    assert code == 2 and not out.exists()
    assert "error: pass cleanup failed (after simplify): ZeroDivisionError" in err and "Traceback" not in err
    code, _, err = _run(capsys, "-v", "optimize", model_path, "-o", out, "--pass", "cleanup", "--no-latency")
    assert code == 2 and "Traceback" in err and "ZeroDivisionError" in err


# ---- several models at once ----

def _alone(models, **kw):
    return [graph_opt.compare(m, ORDERS[:2], latency=False, tolerances={"cosine": 0.95}, **kw) for m in models]


@pytest.mark.parametrize("backend,jobs", [("process", 1), ("process", 2), ("ray", 2)])
def test_several_models_give_each_model_alone_results_on_every_backend(backend, jobs):
    if backend == "ray":
        pytest.importorskip("ray")
    models = {"cnn": small_cnn(), "res": residual_model()}
    many = graph_opt.compare_models(models, ORDERS[:2], latency=False, tolerances={"cosine": 0.95}, jobs=jobs,
                                    backend=backend)
    assert [c.name for c in many.items] == ["cnn", "res"]
    for together, alone in zip(many.items, _alone(models.values())):
        _same_results(together, alone)
    assert any(s.modified for c in many.items for r in c.results for s in r.steps)


def test_cli_compares_several_models_in_one_table_and_one_report(tmp_path, capsys):
    from graph_opt.model_io import save_model

    paths = [save_model(small_cnn(), tmp_path / "cnn.onnx"), save_model(residual_model(), tmp_path / "res.onnx")]
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "res.npz", **random_dataset(residual_model(), 4, seed=3).inputs)  # cnn: random inputs
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "compare", *paths, "--order", "fold_batchnorm cleanup", "--order", "cleanup",
                             "--data", data, "--out-dir", out, "--no-latency")
    assert code == 0, err
    assert "== cnn" in stdout and "== res" in stdout
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["models"]) == ["cnn", "res"]
    assert doc["models"]["res"]["data"] == {"source": str(data / "res.npz"), "samples": 4}
    assert doc["models"]["cnn"]["data"]["source"].startswith("random")
    markdown = (out / "compare.md").read_text()
    assert "## cnn" in markdown and "## res" in markdown and markdown.count("| pipeline | step |") == 2
    code, _, err = _run(capsys, "compare", *paths, "--order", "cleanup", "--data", data / "res.npz")
    assert code == 2 and "folder of <model name>.npz" in err
