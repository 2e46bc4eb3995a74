"""The CPU a model is compressed for: its integer features, read from the host or named.

`host()` reads this machine's CPU (``/proc/cpuinfo`` on Linux: x86 ``flags``, ARM ``Features``);
`resolve(name)` gives the host for ``"host"`` and a named target otherwise, so a model can be
quantized on one machine for another. What follows from the features (docs/design.md, fact 6):

- ``int8_dot``: the CPU has int8 dot-product instructions (x86: AVX-512 VNNI, AVX-VNNI or AMX;
  ARM: the dot-product extension or i8mm). onnxruntime's integer kernels then accumulate
  u8×s8 products without saturating.
- ``reduce_range``: x86 without them. Its u8×s8 kernels add pairs of products in 16 bits, so int8
  weights must stay on a 7-bit grid when activations are uint8.

Unknown names are a user error (`SpecError`) listing the known ones.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

from graph_opt.errors import SpecError

_X86_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
_ARM_DOT = ("asimddp", "i8mm")
# The features worth naming in a report, in the order they are named.
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp",
            "i8mm", "sve")

_AVX2 = ("avx2", "fma")
_AVX512 = (*_AVX2, "avx512f", "avx512bw")
# name → (architecture, features)
NAMED: dict[str, tuple[str, tuple[str, ...]]] = {
    "x86-avx2": ("x86_64", _AVX2),
    "x86-avx-vnni": ("x86_64", (*_AVX2, "avx_vnni")),
    "x86-avx512": ("x86_64", _AVX512),
    "x86-avx512-vnni": ("x86_64", (*_AVX512, "avx512_vnni")),
    "x86-amx": ("x86_64", (*_AVX512, "avx512_vnni", "amx_int8")),
    "arm64": ("aarch64", ("asimd",)),
    "arm64-dotprod": ("aarch64", ("asimd", "asimddp")),
    "arm64-i8mm": ("aarch64", ("asimd", "asimddp", "i8mm")),
}


@dataclass(frozen=True)
class Target:
    name: str
    arch: str                   # "x86_64", "aarch64" or what the platform says
    model: str                  # the CPU's model name ("" for a named target)
    features: frozenset[str]

    @property
    def int8_dot(self) -> bool:
        return bool(self.features & set(_X86_DOT if self.arch == "x86_64" else _ARM_DOT))

    @property
    def reduce_range(self) -> bool:
        return self.arch == "x86_64" and not self.int8_dot

    def describe(self) -> str:
        """One line: the name, the CPU, the features that matter, the consequence."""
        named = [f for f in FEATURES if f in self.features]
        cpu = f"{self.model}; " if self.model else ""
        dot = "int8 dot products" if self.int8_dot else "no int8 dot products"
        return f"{self.name} ({cpu}{self.arch}: {', '.join(named) or 'no SIMD features read'}; {dot})"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "arch": self.arch, "model": self.model,
                "features": [f for f in FEATURES if f in self.features],
                "int8_dot": self.int8_dot, "reduce_range": self.reduce_range}


def _normal_arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    return machine


@functools.lru_cache(maxsize=1)
def host() -> Target:
    """This machine's CPU (cached: it does not change while the process runs)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: architecture only
        pass
    return Target("host", _normal_arch(platform.machine()), model, frozenset(flags))


def resolve(name: str) -> Target:
    if name == "host":
        return host()
    if name not in NAMED:
        raise SpecError(f"unknown target {name!r} (known: host, {', '.join(NAMED)})")
    arch, features = NAMED[name]
    return Target(name, arch, "", frozenset(features))
