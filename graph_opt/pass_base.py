"""The pass contract: one entry point, a new model out, an honest `modified` flag and a report.

A pass is a frozen keyword-only dataclass whose fields are its typed options::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class FactorizeGemm(Pass):
        name: ClassVar[str] = "factorize_gemm"
        rank_ratio: float = 0.5

        def run(self, model, report, ctx):
            ...  # match, then rewrite; report.rewrite(...) / report.skip(...)
            return model

`Pass.__call__` owns the template: it hands `run` a private deep copy (so the caller's model is
never mutated, whatever `run` does), and derives `modified` from what `run` reported as
rewritten, so the flag cannot drift from the report. Validity of the output (onnx.checker,
onnxruntime load, fidelity) is checked by the pipeline after every pass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from graph_opt.model_io import copy_model

if typing.TYPE_CHECKING:
    from graph_opt.data import Dataset


@dataclass
class Skip:
    """A node (or group) the pass looked at and left untouched, with the reason."""

    node: str
    reason: str


@dataclass
class PassReport:
    """What one pass did: rewritten nodes with their chosen parameters, skips with reasons."""

    pass_name: str
    options: dict[str, Any]
    rewritten: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rewrite(self, node: str, **details: Any) -> None:
        self.rewritten.append({"node": node, **details})

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append(Skip(node, reason))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "options": _jsonable(self.options),
            "rewritten": _jsonable(self.rewritten),
            "skipped": [{"node": s.node, "reason": s.reason} for s in self.skipped],
            "notes": list(self.notes),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool
    report: PassReport


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration data, the original model, a seed, and the
    input shapes the user bound (`--input-shape`)."""

    data: Dataset | None = None
    original: onnx.ModelProto | None = None
    history: list[PassReport] = field(default_factory=list)
    seed: int = 0
    shapes: dict[str, tuple[int, ...]] | None = None


def check_literals(options: Any) -> None:
    """ValueError when a Literal-typed option holds a value outside its choices (for a union such
    as ``float | Literal['auto']``, a string that is none of its choices)."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        t, value = hints[f.name], getattr(options, f.name)
        members = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
        choices = [c for m in members if typing.get_origin(m) is Literal for c in typing.get_args(m)]
        if not choices or value in choices:
            continue
        if len(members) == 1 or (isinstance(value, str) and str not in members):
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Base class of every pass. Subclasses are frozen kw-only dataclasses (fields = options).

    Every Literal option is checked when the pass is made (`check_literals`), before a
    subclass's own ``__post_init__`` runs: a bad choice never reaches `run`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "checks_literals", False):
            def post_init(self, _own=own) -> None:
                check_literals(self)
                _own(self)
            post_init.checks_literals = True  # type: ignore[attr-defined]
            cls.__post_init__ = post_init  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        check_literals(self)

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    # False for a pass whose `run` never edits its argument and always returns a new model: it is
    # then handed the caller's model itself, not a deep copy (one copy of every weight less).
    edits_input: ClassVar[bool] = True

    def __call__(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> PassResult:
        report = PassReport(self.name, self.options())
        out = self.run(copy_model(model) if self.edits_input else model, report, ctx or PassContext())
        return PassResult(out, bool(report.rewritten), report)

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        """Rewrite `model` (a private copy unless `edits_input` is False) and return the result."""
        raise NotImplementedError

    def preflight(self) -> None:
        """Raise a `GraphOptError` when this pass cannot run at all here (an optional dependency
        missing), so a pipeline refuses before any pass has worked. Nothing by default."""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def spec(self) -> str:
        """The `name:key=value,...` spelling of this configured pass (non-default options only)."""
        changed = [f"{f.name}={_spell(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(changed) if changed else "")


def _spell(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)
