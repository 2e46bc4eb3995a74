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


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_only_numerics(path):
    banned = {"onnx", "onnxruntime", "onnx_graphsurgeon", "graph_opt"}
    bad = {m for m in _imports(path) if m.split(".")[0] in banned and not m.startswith("graph_opt.kernels")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "graph_opt").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_a_pass_module(path):
    if path.relative_to(ROOT).as_posix() == "graph_opt/cli.py":  # the front end sits above the passes
        return
    bad = {m for m in _imports(path) if m.startswith("graph_opt.passes.")}
    assert not bad, f"{path.name} imports {bad}"


# The concrete passes: a module or a package (one directory, split along its seams) under passes/.
PASS_NAMES = sorted(p.stem for p in (ROOT / "passes").iterdir()
                    if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists()))


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "passes").rglob("*.py") if p != ROOT / "passes" / "__init__.py"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_a_pass_never_imports_another_pass(path):
    # Shared mechanisms live in helper modules (passes/_*.py); only the registry imports every pass.
    own = path.relative_to(ROOT / "passes").parts[0].removesuffix(".py")
    bad = {m for m in _imports(path) if m.startswith("graph_opt.passes.")
           and m.split(".")[2] in PASS_NAMES and m.split(".")[2] != own}
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_tensorly_is_called_from_one_kernel_module():
    users = [p.name for p in (ROOT / "kernels").glob("*.py") if any(m.startswith("tensorly") for m in _imports(p))]
    assert len(users) <= 1, users


@pytest.mark.parametrize("path", sorted([*(ROOT / "graph_opt").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_onnxruntime_is_imported_by_the_runtime_module_only(path):
    # Every session goes through graph_opt.runtime (its options, its error messages, one place to change them).
    if path.relative_to(ROOT).as_posix() == "graph_opt/runtime.py":
        return
    bad = {m for m in _imports(path) if m.split(".")[0] == "onnxruntime"}
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: make sessions with graph_opt.runtime.make_session"
