"""Pass lookup and the spelling of configured passes: CLI specs and recipe files.

The catalog of passes is one explicit tuple, `graph_opt.passes.PASSES`; this module only parses.

Spec grammar (CLI `--pass`): ``name`` or ``name:key=value,key=value``. A comma-separated piece
without ``=`` continues the previous value, so list options read naturally:
``quantize:exclude_ops=Gemm,Conv,bits=8``. Values are converted to the option's annotated type
(int, float, bool, str, Literal choices, tuples, unions such as ``int | Literal['auto']``).

Recipe files (YAML or JSON) hold an ordered list of passes, each either a spec string, a mapping
``{name: {options}}``, or ``{pass: name, key: value, ...}``; a top-level ``{passes: [...]}`` works too.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from graph_opt.errors import SpecError
from graph_opt.pass_base import Pass
from graph_opt.onnx_util import first_line


def catalog() -> tuple[type[Pass], ...]:
    # Imported here, not at module level: the core never depends on a concrete pass module.
    from graph_opt.passes import PASSES

    return PASSES


def find_pass(name: str, passes: tuple[type[Pass], ...] | None = None) -> type[Pass]:
    passes = catalog() if passes is None else passes
    for cls in passes:
        if cls.name == name:
            return cls
    known = ", ".join(sorted(c.name for c in passes))
    raise SpecError(f"unknown pass {name!r} (known passes: {known})")


def option_fields(cls: type[Pass]) -> list[tuple[str, Any, Any]]:
    """(name, type, default) for every option of a pass class."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default) for f in dataclasses.fields(cls)]


def make_pass(name: str, options: dict[str, Any], passes: tuple[type[Pass], ...] | None = None) -> Pass:
    """Instantiate a pass from already-split options (strings from the CLI, native values from YAML)."""
    cls = find_pass(name, passes)
    fields = {n: (t, d) for n, t, d in option_fields(cls)}
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise SpecError(f"pass {name!r} has no option {key!r} (options: {known})")
        kwargs[key] = convert(raw, fields[key][0], f"{name}:{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pass {name!r}: {exc}") from None


def parse_spec(spec: str, passes: tuple[type[Pass], ...] | None = None) -> Pass:
    """``name`` or ``name:key=value,key=value`` → a configured pass."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty pass spec")
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    last = None
    for piece in rest.split(",") if rest.strip() else []:
        if "=" in piece:
            key, _, value = piece.partition("=")
            key = key.strip()
            if not key:
                raise SpecError(f"bad option {piece!r} in pass spec {spec!r}")
            if key in options:
                raise SpecError(f"option {key!r} given twice in pass spec {spec!r}")
            options[key] = value.strip()
            last = key
        elif last is not None:
            options[last] += "," + piece.strip()
        else:
            raise SpecError(f"bad option {piece!r} in pass spec {spec!r} (expected key=value)")
    return make_pass(name.strip(), options, passes)


SIMPLIFY = "simplify"


def with_simplify(passes: list[Pass], enabled: bool = True) -> list[Pass]:
    """`passes` with the `simplify` pass in front (once: not when it already starts with it)."""
    if not enabled or (passes and passes[0].name == SIMPLIFY):
        return list(passes)
    return [parse_spec(SIMPLIFY), *passes]


def load_recipe(path: str | Path, passes: tuple[type[Pass], ...] | None = None) -> list[Pass]:
    """Read a YAML or JSON recipe (an ordered list of passes with options)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise SpecError(f"cannot parse recipe {path}: {first_line(exc)}") from None
    return recipe_passes(data, str(path), passes)


def recipe_passes(data: Any, where: str = "recipe", passes: tuple[type[Pass], ...] | None = None) -> list[Pass]:
    if isinstance(data, dict) and "passes" in data:
        data = data["passes"]
    if not isinstance(data, list):
        raise SpecError(f"{where}: expected a list of passes")
    out = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            out.append(parse_spec(entry, passes))
        elif isinstance(entry, dict) and "pass" in entry:
            opts = {k: v for k, v in entry.items() if k != "pass"}
            out.append(make_pass(str(entry["pass"]), opts, passes))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, opts), = entry.items()
            if opts is None:
                opts = {}
            if not isinstance(opts, dict):
                raise SpecError(f"{where}: entry {i + 1} ({name}): options must be a mapping")
            out.append(make_pass(str(name), opts, passes))
        else:
            raise SpecError(f"{where}: entry {i + 1} is not a pass (use 'name', {{name: {{options}}}} or {{pass: name, ...}})")
    return out


_BOOL = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def convert(raw: Any, typ: Any, where: str) -> Any:
    """Convert `raw` (a string from the CLI or a YAML value) to annotation `typ`."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        # Literal and None first: 'auto' must not be tried as a float.
        for sub in sorted(args, key=lambda a: typing.get_origin(a) is not Literal and a is not type(None)):
            try:
                return convert(raw, sub, where)
            except SpecError:
                continue
        raise SpecError(f"{where}: cannot read {raw!r} as {_type_name(typ)}")
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw):
                return choice
        raise SpecError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
    if typ is type(None):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        raise SpecError(f"{where}: not None")
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else [raw]
        sub = args[0] if args else str
        return tuple(convert(item.strip() if isinstance(item, str) else item, sub, where) for item in items if item != "")
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _BOOL:
            return _BOOL[raw.lower()]
        raise SpecError(f"{where}: {raw!r} is not a boolean (true/false)")
    if typ in (int, float):
        if isinstance(raw, bool):
            raise SpecError(f"{where}: {raw!r} is not a number")
        try:
            value = typ(raw)
        except (TypeError, ValueError):
            raise SpecError(f"{where}: {raw!r} is not {'an integer' if typ is int else 'a number'}") from None
        if typ is int and isinstance(raw, float) and raw != int(raw):
            raise SpecError(f"{where}: {raw!r} is not an integer")
        return value
    if typ is str:
        if isinstance(raw, (dict, list)):
            raise SpecError(f"{where}: expected a string")
        return str(raw)
    raise SpecError(f"{where}: unsupported option type {typ}")


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'str'}"
    if typ is type(None):
        return "none"
    return getattr(typ, "__name__", str(typ))


def describe(cls: type[Pass]) -> list[dict[str, Any]]:
    """Options of a pass for `graph-opt passes`: name, type and default."""
    return [{"option": n, "type": _type_name(t), "default": d} for n, t, d in option_fields(cls)]
