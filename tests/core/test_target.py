"""The quantization target: the host's CPU features, or a named CPU."""

import platform

import pytest

from graph_opt.errors import SpecError
from graph_opt.target import NAMED, host, resolve


def test_host_reads_this_machine():
    t = resolve("host")
    assert t is host() and t.name == "host"
    machine = platform.machine().lower()
    assert t.arch == {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    assert t.describe().startswith("host (")
    assert t.to_dict()["reduce_range"] == t.reduce_range


@pytest.mark.parametrize("name,dot,reduce", [
    ("x86-avx2", False, True), ("x86-avx512", False, True), ("x86-avx512-vnni", True, False),
    ("x86-avx-vnni", True, False), ("x86-amx", True, False),
    ("arm64", False, False), ("arm64-dotprod", True, False), ("arm64-i8mm", True, False)])
def test_named_targets(name, dot, reduce):
    t = resolve(name)
    assert (t.int8_dot, t.reduce_range) == (dot, reduce)
    assert t.name == name and t.arch == NAMED[name][0]
    assert ("no int8 dot products" in t.describe()) == (not dot)


def test_unknown_target():
    with pytest.raises(SpecError, match="unknown target 'pentium'.*x86-avx2"):
        resolve("pentium")
