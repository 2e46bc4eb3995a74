"""Architecture lines: kernels are pure numerics; the core never imports a concrete pass."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_numerics(path):
    banned = {"onnx", "onnxruntime", "onnx_graphsurgeon", "graph_opt"}
    bad = {m for m in _imports(path) if m.split(".")[0] in banned and not m.startswith("graph_opt.kernels")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "graph_opt").glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_a_pass_module(path):
    if path.name == "cli.py":  # the front end sits above the passes
        return
    bad = {m for m in _imports(path) if m.startswith("graph_opt.passes.")}
    assert not bad, f"{path.name} imports {bad}"


def test_tensorly_is_called_from_one_kernel_module():
    users = [p.name for p in (ROOT / "kernels").glob("*.py") if any(m.startswith("tensorly") for m in _imports(p))]
    assert len(users) <= 1, users
