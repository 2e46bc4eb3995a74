"""optimize DIR -o OUTDIR: every model of an export folder, the other files copied as they are."""

import json

import numpy as np
import onnx
from builders import run_cli as _run
from builders import small_cnn

from graph_opt.folder import external_files
from graph_opt.model_io import save_model


def _export_folder(root):
    """Two components (one with its weights as external data), a config, a tokenizer, a nested file."""
    root.mkdir()
    save_model(small_cnn(seed=1), root / "encoder.onnx")
    save_model(small_cnn(seed=2), root / "decoder.onnx", external_data=True)
    (root / "config.json").write_text(json.dumps({"hidden": 16, "layers": 2}))
    (root / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    (root / "extra").mkdir()
    (root / "extra" / "notes.txt").write_text("shipped with the export")
    return root


def test_every_model_is_optimized_and_the_rest_copied(tmp_path, capsys):
    src = _export_folder(tmp_path / "export")
    assert external_files(src / "decoder.onnx")  # vacuity: the decoder really reads external data
    out = tmp_path / "optimized"
    code, stdout, err = _run(capsys, "optimize", src, "-o", out, "--pass", "fold_batchnorm", "--no-latency")
    assert code == 0, err
    for name in ("config.json", "tokenizer.json", "extra/notes.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    for name in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(out / name))
        assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
        assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["logits"]
    assert external_files(out / "decoder.onnx") and not external_files(out / "encoder.onnx")  # layout kept
    assert not any(p.suffix == ".data" and "decoder.onnx.data" != p.name for p in out.iterdir())
    report = json.loads((tmp_path / "optimized.json").read_text())
    assert report["passed"] and set(report["models"]) == {"encoder.onnx", "decoder.onnx"}
    assert "== decoder.onnx" in stdout and "== encoder.onnx" in stdout


def test_only_the_named_model_and_refusals(tmp_path, capsys):
    src = _export_folder(tmp_path / "export")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "optimize", src, "-o", out, "--pass", "fold_batchnorm", "--only", "encoder",
                        "--no-latency")
    assert code == 0, err
    assert (out / "decoder.onnx").read_bytes() == (src / "decoder.onnx").read_bytes()  # untouched, data too
    assert external_files(out / "decoder.onnx") == {(out / p.name).resolve() for p in src.iterdir()
                                                    if p.name.startswith("decoder.onnx.")}
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out / "encoder.onnx")).graph.node)
    for argv, text in (((src, "-o", out), "exists and is not empty"),
                       ((src, "-o", src / "inside"), "must not be the input folder or inside it"),
                       ((src, "-o", tmp_path / "o2", "--only", "nope"), "no model 'nope'")):
        code, _, err = _run(capsys, "optimize", *argv, "--no-latency")
        assert code == 2 and text in err and err.count("\n") == 1


def test_a_broken_tolerance_writes_no_folder(tmp_path, capsys):
    src = _export_folder(tmp_path / "export")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "optimize", src, "-o", out, "--pass", "quantize:weights=binary", "--tolerance",
                        "cosine=0.9999999", "--no-rollback", "--no-latency")
    assert code == 1 and "nothing written" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    np.testing.assert_equal(sorted(p.name for p in src.iterdir()),
                            sorted(["config.json", "decoder.onnx", "decoder.onnx.data", "encoder.onnx", "extra",
                                    "tokenizer.json"]))


def test_outputs_get_the_umask_permissions_not_the_private_temp_ones(tmp_path, capsys):
    """Written through private temporary files and folders (0600/0700), the outputs end up as a
    plain `open()`/`mkdir()` would have made them: readable by the service that deploys them."""
    import os

    old = os.umask(0o022)
    try:
        src = _export_folder(tmp_path / "export")
        out_dir, out_file = tmp_path / "optimized", tmp_path / "one.onnx"
        code, _, err = _run(capsys, "optimize", src, "-o", out_dir, "--pass", "cleanup", "--no-latency")
        assert code == 0, err
        code, _, err = _run(capsys, "optimize", src / "encoder.onnx", "-o", out_file, "--pass", "cleanup",
                            "--no-latency")
        assert code == 0, err
    finally:
        os.umask(old)
    assert out_dir.stat().st_mode & 0o777 == 0o755
    for path in (out_dir / "encoder.onnx", out_file, tmp_path / "one.json", tmp_path / "optimized.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
