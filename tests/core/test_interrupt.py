"""No data loss: a run killed at any moment (SIGKILL, no cleanup) leaves the input untouched and the
output either absent or a complete model; a full disk surfaces as one clear line.

The kill moments are drawn from a seeded generator (printed on failure), so a failing round can be
replayed. Leftovers of a killed save are hidden temporaries, never `*.onnx` files.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, assert_valid, small_cnn

import graph_opt.model_io as model_io
from graph_opt.cli import main
from graph_opt.errors import ModelSaveError
from graph_opt.model_io import load_model, save_model

SEED = 20260828


def _big_model(features: int, seed: int) -> onnx.ModelProto:
    """A Gemm with a features×features weight (4·features² bytes: 16 MB at 2048)."""
    g = GraphBuilder(seed=seed)
    g.output(g.gemm(g.input("x", ["N", features]), features, features, name="fc"), ["N", features])
    return g.build(check=False)


def _weights(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_SAVER = textwrap.dedent("""
    import sys
    import onnx
    from graph_opt.model_io import save_model

    target, external = sys.argv[1], sys.argv[2] == "1"
    models = [onnx.load(p) for p in sys.argv[3:]]
    print("ready", flush=True)
    i = 0
    while True:  # until killed: alternate the models, so there is always a previous complete one
        save_model(models[i % len(models)], target, protect=tuple(sys.argv[3:]), external_data=external)
        i += 1
""")


def _assert_target_whole(target: Path, expected: list[dict[str, bytes]], where: str) -> None:
    if not target.exists():
        return
    model = load_model(target)  # complete: parses, its external data is all there, checker passes
    assert _weights(model) in expected, f"{where}: {target.name} loads but holds neither model's weights"


def _assert_no_fake_outputs(folder: Path, allowed: set[str], where: str) -> None:
    for path in folder.rglob("*"):
        if path.name in allowed:
            continue
        rel = path.relative_to(folder).parts
        assert rel[0].startswith("."), f"{where}: leftover {path.name} is not a hidden temporary"
        assert path.suffix != ".onnx", f"{where}: leftover {path} looks like a model"


@pytest.mark.parametrize("external, rounds, features", [(False, 8, 2048), (True, 5, 1536)])
def test_kill_during_save_loop(tmp_path, external, rounds, features):
    """A subprocess saves a 9–16 MB model over and over; SIGKILL at random moments."""
    sources = tmp_path / "in"
    sources.mkdir()
    models = [_big_model(features, seed=1), _big_model(features // 2, seed=2)]  # different sizes and weights
    paths = [sources / "a.onnx", sources / "b.onnx"]
    for m, p in zip(models, paths):
        p.write_bytes(m.SerializeToString())
    hashes = [_sha(p) for p in paths]
    expected = [_weights(m) for m in models]
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.onnx"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = np.random.default_rng(SEED + external)
    for r in range(rounds):
        delay = float(rng.uniform(0.05, 0.6))
        where = f"round {r} (external={external}, seed {SEED + external}, kill after {delay:.3f} s)"
        proc = subprocess.Popen([sys.executable, str(script), str(target), "1" if external else "0", *map(str, paths)],
                                stdout=subprocess.PIPE, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        try:
            assert proc.stdout.readline().strip() == b"ready", where
            time.sleep(delay)
            assert proc.poll() is None, f"{where}: the saver died on its own"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert [_sha(p) for p in paths] == hashes, f"{where}: an input changed"
        _assert_target_whole(target, expected, where)
        allowed = {"model.onnx", "model.onnx.data"}
        _assert_no_fake_outputs(out, allowed, where)
    # After all that, a plain save still works and tidies nothing it should not.
    save_model(models[0], target, external_data=external)
    assert _weights(load_model(target)) == expected[0]


def test_crash_between_the_two_renames_of_external_data(tmp_path, monkeypatch):
    """Model and data are two files: a death between their renames must not pair the previous
    model with the new data (it would load, with the wrong weights)."""
    old, new = _big_model(64, seed=1), _big_model(64, seed=2)
    target = save_model(old, tmp_path / "m.onnx", external_data=True)
    real_replace = os.replace
    calls = []

    def dies_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here (no cleanup code after this point runs)
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_model(new, target, external_data=True)
    monkeypatch.undo()
    assert calls[0].name == "m.onnx.data"  # the data went first ...
    assert not target.exists()  # ... so the old model was taken away before it: no mismatched pair
    save_model(new, target, external_data=True)
    assert _weights(load_model(target)) == _weights(new)


def test_kill_cli_optimize_at_random_moments(tmp_path):
    """`graph-opt optimize` killed mid-run: the input is untouched; the output (and its report) is
    absent or the complete previous one or the complete new one."""
    src = save_model(small_cnn(), tmp_path / "in.onnx")
    digest = _sha(src)
    out = tmp_path / "out.onnx"
    argv = [sys.executable, "-m", "graph_opt", "optimize", str(src), "-o", str(out), "--latency-runs", "3",
            "--pass", "fold_batchnorm", "--pass", "cleanup"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "GRAPH_OPT_PROGRESS": "0"}
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)  # a complete previous output
    full = time.perf_counter() - start
    previous = out.read_bytes()
    rng = np.random.default_rng(SEED)
    for r in range(3):
        delay = float(rng.uniform(0.3, 1.0) * full)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = f"round {r} (seed {SEED}, kill after {delay:.2f} s of a {full:.2f} s run)"
        assert _sha(src) == digest, where
        assert out.exists(), where  # the previous output is never removed before the new one is complete
        assert_valid(load_model(out))  # complete: the previous one or the new one (the same bytes here)
        assert out.read_bytes() == previous, where
        json.loads((tmp_path / "out.json").read_text())  # the report parses (old or new)
        _assert_no_fake_outputs(tmp_path, {"in.onnx", "out.onnx", "out.json"}, where)


# -------------------------------------------------------------------------------- disk full


@pytest.fixture
def disk_full(monkeypatch):
    """Every temporary file the saver opens is /dev/full: real ENOSPC from write/flush."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_mkstemp = model_io.tempfile.mkstemp

    def full_mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(path)
        return os.open("/dev/full", os.O_WRONLY), path

    monkeypatch.setattr(model_io.tempfile, "mkstemp", full_mkstemp)


def test_disk_full_while_saving_keeps_the_previous_file(tmp_path, disk_full):
    target = tmp_path / "m.onnx"
    target.write_bytes(small_cnn().SerializeToString())
    before = target.read_bytes()
    with pytest.raises(ModelSaveError, match="No space left on device") as info:
        save_model(_big_model(256, seed=3), target)
    assert "\n" not in str(info.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_disk_full_with_external_data(tmp_path, monkeypatch):
    target = save_model(_big_model(64, seed=1), tmp_path / "m.onnx", external_data=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io, "external_shell", no_space)  # where the weights are written
    with pytest.raises(ModelSaveError, match="No space left on device"):
        save_model(_big_model(64, seed=2), target, external_data=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp dir left, old pair intact


def test_disk_full_through_the_cli(tmp_path, capsys, disk_full):
    src = tmp_path / "in.onnx"
    src.write_bytes(small_cnn().SerializeToString())
    digest = _sha(src)
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--no-latency"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert _sha(src) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_disk_full_on_the_report_is_one_line(tmp_path, capsys, monkeypatch):
    src = save_model(small_cnn(), tmp_path / "in.onnx")
    import graph_opt.cli as cli

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "write_atomic", no_space)  # the model is written, then the report fails
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--no-latency"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "cannot write the report" in err and "No space" in err
    assert_valid(load_model(tmp_path / "o.onnx"))
