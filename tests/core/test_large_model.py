"""The > 2 GB code path on a small model: the protobuf limit is lowered so that a few kilobytes of
weights count as "over 2 GB" (the real size is measured by benchmarks/bench_large.py)."""

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from builders import conv_bn_model, gemm_bn_model, wide_cnn

import graph_opt.external_data as ext
import graph_opt.model_io as mio
from graph_opt import cli
from graph_opt.data import random_dataset
from graph_opt.external_data import needs_external_data, read_raw
from graph_opt.gs_convert import to_graph, to_model
from graph_opt.model_io import load_model, save_model, session_source
from graph_opt.pipeline import Pipeline
from graph_opt.registry import parse_spec
from graph_opt.runtime import make_session, run_model


@pytest.fixture
def over_the_limit(monkeypatch):
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)


def test_session_source_is_bytes_below_the_limit():
    model = gemm_bn_model(k=64, n=64)
    with session_source(model) as source:
        assert source == model.SerializeToString()


def test_session_source_is_a_temporary_external_data_file_above_it(over_the_limit):
    import onnxruntime as ort

    model = gemm_bn_model(k=64, n=64)
    assert needs_external_data(model)
    with session_source(model) as source:
        assert isinstance(source, str) and os.path.isfile(source + ".data")
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        folder = os.path.dirname(source)
    assert not os.path.exists(folder)  # removed on exit; the session has its weights
    data = random_dataset(model, 4, seed=0)
    expected = run_model(make_session(model), data)  # the real limit is not reached: bytes work too
    got = run_model(session, data)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_pipeline_verifies_and_saves_a_model_over_the_limit(tmp_path, over_the_limit):
    model = conv_bn_model(cin=16, cout=16)
    data = random_dataset(model, 4, seed=0)
    result = Pipeline([parse_spec("fold_batchnorm"), parse_spec("cleanup")], verify_data=data, latency=False).run(model)
    assert [s.accepted for s in result.steps] == [True, True]
    assert result.steps[0].modified and result.final_parity.cosine > 0.99999
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    out = save_model(result.model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()
    again = load_model(out)
    assert read_raw(again.graph.initializer[0]) == read_raw(result.model.graph.initializer[0])


def test_cli_round_trip_with_external_data(tmp_path, over_the_limit, capsys):
    src = save_model(conv_bn_model(cin=16, cout=16), tmp_path / "in.onnx")
    assert (tmp_path / "in.onnx.data").is_file()
    code = cli.main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--pass", "fold_batchnorm",
                     "--no-latency", "--samples", "4"])
    assert code == 0, capsys.readouterr().err
    out = onnx.load(str(tmp_path / "out.onnx"))  # external data loaded from next to the model
    assert (tmp_path / "out.onnx.data").is_file()
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_unread_weights_are_exported_untouched_and_renames_do_not_reach_the_input():
    model = conv_bn_model(cin=16, cout=16)
    before = model.SerializeToString()
    graph = to_graph(model)
    consts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    consts[0].name = consts[0].name + "_renamed"  # renamed, never read
    consts[1].values[...] = 0  # read and edited in place
    out = to_model(graph, model)
    assert model.SerializeToString() == before
    names = {t.name: t for t in out.graph.initializer}
    assert consts[0].name in names
    assert not onnx.numpy_helper.to_array(names[consts[1].name]).any()
    untouched = [t for t in model.graph.initializer if t.name not in (consts[0].name[:-8], consts[1].name)]
    for t in untouched:
        assert names[t.name].raw_data == t.raw_data


def test_pipeline_statistics_over_the_limit_match_the_in_memory_ones(monkeypatch):
    from graph_opt.stats import model_stats

    model = conv_bn_model(cin=16, cout=16)
    expected = model_stats(model)
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)
    got = Pipeline([], latency=False)._stats(model)
    assert (got.params, got.weight_bytes, got.macs, got.ops) == (expected.params, expected.weight_bytes,
                                                                 expected.macs, expected.ops)
    assert got.macs and got.file_bytes == expected.weight_bytes


def test_a_graph_exports_twice_with_its_weights():
    """prune_channels exports one graph twice: the stubs used while exporting must not stay behind."""
    model = conv_bn_model(cin=16, cout=16)
    graph = to_graph(model)
    first, second = to_model(graph, model), to_model(graph, model)
    assert first.SerializeToString() == second.SerializeToString()
    by_name = {t.name: t.raw_data for t in first.graph.initializer}
    assert all(by_name[t.name] == t.raw_data for t in model.graph.initializer)


@pytest.mark.parametrize("spec", [
    "fold_batchnorm", "factorize_gemm:latency_gate=false,rank=8", "factorize_conv:latency_gate=false,rank=8",
    "prune_weights:sparsity=0.5", "prune_channels:ratio=0.25", "quantize",
])
def test_every_pass_family_over_the_limit(spec, monkeypatch):
    """Each family rewrites a model "over 2 GB" (limit lowered): shapes inferred on a weightless copy,
    sessions from a temporary external-data file, sizes streamed; result verified like any other."""
    from builders import wide_cnn

    model = wide_cnn(channels=32, hw=8)
    data = random_dataset(model, 8, seed=0)
    expected = Pipeline([parse_spec(spec)], verify_data=data, latency=False).run(model)
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)
    assert needs_external_data(model)
    # What fails on a real > 2 GB model must not happen here: shape inference, or an onnxruntime
    # session from bytes, on a model that still carries its weights.
    # (Recorded, not raised: the passes turn a failed shape inference into a reasoned skip.)
    real_infer, real_session = onnx.shape_inference.infer_shapes, ort.InferenceSession
    violations = []

    def infer(m, *args, **kwargs):
        if any(len(t.raw_data) >= 1024 for t in m.graph.initializer):  # the weights are still inside
            violations.append("shape inference on the whole model")
            raise ValueError("protobuf cannot serialize a model over 2 GB")
        return real_infer(m, *args, **kwargs)

    def session(source, *args, **kwargs):
        carried = onnx.load_from_string(source).graph.initializer if isinstance(source, bytes) else []
        if any(len(t.raw_data) >= 1024 for t in carried):  # a session from bytes that hold the weights
            violations.append("an onnxruntime session from the serialized model")
            raise ValueError("protobuf cannot serialize a model over 2 GB")
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", infer)
    monkeypatch.setattr(ort, "InferenceSession", session)
    result = Pipeline([parse_spec(spec)], verify_data=data, latency=False).run(model)
    assert violations == []
    step = result.steps[0]
    assert step.accepted and step.modified, step.reason or step.report.skipped
    assert [e["node"] for e in step.report.rewritten] == [e["node"] for e in expected.steps[0].report.rewritten]
    assert result.final_parity.cosine == pytest.approx(expected.final_parity.cosine, abs=1e-6)


def test_compressed_sizes_over_the_limit_are_streamed_and_close_to_the_in_memory_ones(monkeypatch):
    from builders import wide_cnn

    from graph_opt.passes.prune_weights import compressed_sizes

    model = wide_cnn(channels=32, hw=8)
    in_memory = compressed_sizes(model)
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)
    streamed = compressed_sizes(model)
    assert streamed["bytes"] == pytest.approx(in_memory["bytes"], rel=0.05)
    assert streamed["gzip_bytes"] == pytest.approx(in_memory["gzip_bytes"], rel=0.05)


def _disk_bytes_in_memory(model: onnx.ModelProto) -> int:
    """Bytes of ≥ 1 KB main-graph weights a model holds in memory (not kept on disk)."""
    return sum(len(t.raw_data) for t in model.graph.initializer if len(t.raw_data) >= 1024)


@pytest.mark.parametrize("specs", [
    ["fold_batchnorm"], ["factorize_gemm:latency_gate=false,rank=8"], ["factorize_conv:latency_gate=false,rank=8"],
    ["prune_weights:sparsity=0.5"], ["prune_channels:ratio=0.25"], ["prune_channels:ratio=0.25,importance=activation"],
    ["quantize"], ["quantize:weights=int4,activations=none,rounding=gptq,block_size=32"],
    ["factorize_conv:latency_gate=false,rank=4", "reconstruct"],
])
def test_weights_kept_on_disk_give_the_in_memory_result(specs, tmp_path):
    """A model loaded with its weights left on disk (what `load_model` does over 2 GB) goes through
    every family to the same rewrite and parity as in memory, while no step holds its weights in memory."""
    from builders import wide_cnn

    from graph_opt.stats import weights_of

    model = wide_cnn(channels=32, hw=8)
    data = random_dataset(model, 8, seed=0)
    expected = Pipeline([parse_spec(s) for s in specs], verify_data=data, latency=False).run(model)
    path = save_model(model, tmp_path / "in.onnx", external_data=True)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    disk = load_model(path, weights="disk")
    assert ext.has_disk_weights(disk) and _disk_bytes_in_memory(disk) == 0
    before = disk.SerializeToString()
    result = Pipeline([parse_spec(s) for s in specs], verify_data=data, latency=False).run(disk)
    assert disk.SerializeToString() == before  # the input model is not mutated
    for got, want in zip(result.steps, expected.steps, strict=True):
        assert got.accepted and got.modified, got.reason or got.report.skipped
        assert [e["node"] for e in got.report.rewritten] == [e["node"] for e in want.report.rewritten]
        assert got.parity.cosine == pytest.approx(want.parity.cosine, abs=1e-6)
        assert _disk_bytes_in_memory(got.model) == 0  # spilled: the step's new weights are on disk
    (tmp_path / "out").mkdir()
    out = save_model(result.model, tmp_path / "out" / "out.onnx")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in files} == files  # input untouched
    name = expected.model.graph.output[0].name
    want = run_model(result.model, data)[name]
    (tmp_path / "in.onnx.data").rename(tmp_path / "moved.data")  # the saved output must not read it
    again = load_model(out, weights="memory")
    assert _disk_bytes_in_memory(again) > 0 and not ext.has_disk_weights(again)
    for key, value in weights_of(expected.model).items():
        np.testing.assert_allclose(weights_of(again)[key], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(run_model(again, data)[name], want)


def test_save_refuses_to_overwrite_the_weights_it_reads(tmp_path):
    from graph_opt.errors import ModelSaveError

    path = save_model(gemm_bn_model(k=64, n=64), tmp_path / "m.onnx", external_data=True)
    disk = load_model(path, weights="disk")
    with pytest.raises(ModelSaveError, match="weights are read from it"):
        save_model(disk, tmp_path / "m.onnx")
    assert ext.read_array(disk.graph.initializer[0]).shape == tuple(disk.graph.initializer[0].dims)


@pytest.mark.parametrize("spec", ["fold_batchnorm", "prune_weights:sparsity=0.5", "prune_channels:ratio=0.25",
                                  "factorize_conv:latency_gate=false,rank=8"])
def test_a_graphsurgeon_pass_exports_the_weights_it_rewrites_to_disk(spec, tmp_path):
    """On a model whose weights are on disk, a pass's own output holds no weight bytes either: the
    arrays it rewrote go to this process's spill folder, with the same values as in memory."""
    from builders import wide_cnn

    from graph_opt.stats import weights_of

    model = wide_cnn(channels=32, hw=8)
    ctx_data = random_dataset(model, 8, seed=0)
    from graph_opt.pass_base import PassContext

    expected = parse_spec(spec)(model, PassContext(data=ctx_data))
    disk = load_model(save_model(model, tmp_path / "in.onnx", external_data=True), weights="disk")
    got = parse_spec(spec)(disk, PassContext(data=ctx_data))
    assert got.modified and _disk_bytes_in_memory(got.model) == 0
    assert any(ext.on_disk(t) and ext.spill_dir().name in t.external_data[-1].value for t in got.model.graph.initializer)
    want = weights_of(expected.model)
    assert weights_of(got.model).keys() == want.keys()
    for name, value in weights_of(got.model).items():
        np.testing.assert_array_equal(value, want[name])


def test_a_model_on_disk_hashes_by_content_not_by_location(tmp_path):
    import hashlib

    model = gemm_bn_model(k=64, n=64)
    digests = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        disk = load_model(save_model(model, tmp_path / folder / "m.onnx", external_data=True), weights="disk")
        h = hashlib.sha256()
        mio.update_digest(h, disk)
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]
    path = tmp_path / "a" / "m.onnx.data"  # the same file, other weights: another digest
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    h = hashlib.sha256()
    mio.update_digest(h, load_model(tmp_path / "a" / "m.onnx", weights="disk"))
    assert h.hexdigest() != digests[0]


def test_a_full_disk_while_keeping_weights_on_disk_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    src = save_model(conv_bn_model(cin=16, cout=16), tmp_path / "in.onnx", external_data=True)
    monkeypatch.setattr(ext, "PROTOBUF_LIMIT", 1024)  # so the CLI keeps the weights on disk
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(ext.spill_dir())):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code = cli.main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--pass", "fold_batchnorm",
                     "--no-latency", "--samples", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "No space left on device" in err[0] and "TMPDIR" in err[0], err
    assert not (tmp_path / "out.onnx").exists()


def test_the_spill_folder_of_a_killed_run_is_removed_by_the_next_run(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ext, "_spill_dir", [])
    dead = tmp_path / "graph-opt-weights.4194305.abc"  # above the kernel's pid limit: never a live process
    alive = tmp_path / f"graph-opt-weights.{os.getpid()}.xyz"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")
    mine = ext.spill_dir()
    assert mine.parent == tmp_path and mine.is_dir() and str(os.getpid()) in mine.name
    assert not dead.exists() and alive.exists()


def test_a_model_on_disk_saves_to_another_folder_self_contained(tmp_path, over_the_limit):
    """Saved with external data (over the limit), whether its graph is small (streamed) or not
    (onnx's own writer on a loaded copy): the output never points back at the input's files."""
    model = wide_cnn(channels=32, hw=8)
    for i, limit in enumerate((1024, 2**31 - 2**20)):
        (tmp_path / f"in{i}").mkdir()
        (tmp_path / f"out{i}").mkdir()
        disk = load_model(save_model(model, tmp_path / f"in{i}" / "in.onnx", external_data=True), weights="disk")
        ext.PROTOBUF_LIMIT = limit
        out = save_model(disk, tmp_path / f"out{i}" / "out.onnx", external_data=True)
        (tmp_path / f"in{i}" / "in.onnx.data").unlink()
        again = onnx.load(str(out))  # external data read from next to the output only
        assert {t.name: t.raw_data for t in again.graph.initializer} == {t.name: t.raw_data for t in model.graph.initializer}


def test_the_stored_size_of_a_model_counts_its_external_data(tmp_path, over_the_limit):
    from graph_opt.api import inspect

    model = wide_cnn(channels=32, hw=8)
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    assert ext.stored_bytes(path) == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert inspect(path, latency=False).file_bytes == ext.stored_bytes(path) > ext.tensor_bytes(model)


def test_latency_of_models_on_disk_is_measured_one_session_at_a_time(tmp_path, monkeypatch):
    import graph_opt.pipeline as pl

    calls = []
    real = pl.measure_latency
    monkeypatch.setattr(pl, "measure_latency", lambda models, *a, **k: calls.append(len(models)) or real(models, *a, **k))
    model = conv_bn_model(cin=16, cout=16)
    disk = load_model(save_model(model, tmp_path / "m.onnx", external_data=True), weights="disk")
    result = Pipeline([parse_spec("fold_batchnorm")], latency_runs=3).run(disk)
    assert calls == [1, 1] and all(s.stats.latency_ms > 0 for s in (result.baseline, *result.steps))
    calls.clear()
    Pipeline([parse_spec("fold_batchnorm")], latency_runs=3).run(model)
    assert calls == [2]  # in memory: interleaved in one run


def test_loading_weights_on_disk_checks_the_graph_and_accepts_a_hard_linked_data_file(tmp_path):
    from graph_opt.errors import ModelLoadError

    path = save_model(gemm_bn_model(k=64, n=64), tmp_path / "m.onnx", external_data=True)
    os.link(tmp_path / "m.onnx.data", tmp_path / "backup.data")  # onnx's own file check refuses this
    assert ext.has_disk_weights(load_model(path, weights="disk"))
    broken = onnx.load(str(path), load_external_data=False)
    broken.graph.node[0].input[0] = "nowhere"
    (tmp_path / "broken.onnx").write_bytes(broken.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"broken.onnx fails onnx.checker: (?!model fails)"):
        load_model(tmp_path / "broken.onnx", weights="disk")
