import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from graph_opt.errors import SpecError
from graph_opt.pass_base import Pass
from graph_opt.registry import catalog, describe, load_recipe, parse_spec


@dataclass(frozen=True, kw_only=True)
class Demo(Pass):
    """A pass with one option of every kind the parser supports."""

    name: ClassVar[str] = "demo"
    ratio: float = 0.5
    rank: int | Literal["auto"] = "auto"
    method: Literal["tucker2", "cp"] = "tucker2"
    ops: tuple[str, ...] = ("Conv", "Gemm")
    strict: bool = False
    limit: int | None = None


CATALOG = (Demo,)


def test_parses_typed_options():
    p = parse_spec("demo:ratio=0.25,rank=16,method=cp,ops=Conv,MatMul,strict=true,limit=none", CATALOG)
    assert p == Demo(ratio=0.25, rank=16, method="cp", ops=("Conv", "MatMul"), strict=True, limit=None)
    assert parse_spec("demo", CATALOG) == Demo()
    assert parse_spec("demo:rank=auto", CATALOG).rank == "auto"
    assert parse_spec("demo:limit=3", CATALOG).limit == 3


def test_spec_round_trips():
    p = Demo(ratio=0.25, ops=("Conv", "MatMul"))
    assert parse_spec(p.spec(), CATALOG) == p
    assert Demo().spec() == "demo"


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown pass 'nope'"),
    ("demo:bogus=1", "has no option 'bogus'"),
    ("demo:ratio=abc", "is not a number"),
    ("demo:rank=1.5", "cannot read '1.5'"),
    ("demo:method=svd", "is not one of tucker2, cp"),
    ("demo:strict=maybe", "is not a boolean"),
    ("demo:ratio=1,ratio=2", "given twice"),
    ("demo:=3", "bad option"),
    ("", "empty pass spec"),
])
def test_spec_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec, CATALOG)


def test_recipe_yaml_and_json(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("passes:\n  - demo:ratio=0.1\n  - demo: {rank: 8, ops: [Conv]}\n  - {pass: demo, strict: true}\n  - demo\n")
    got = load_recipe(y, CATALOG)
    assert got == [Demo(ratio=0.1), Demo(rank=8, ops=("Conv",)), Demo(strict=True), Demo()]
    j = tmp_path / "r.json"
    j.write_text(json.dumps([{"demo": {"method": "cp"}}, "demo:limit=2"]))
    assert load_recipe(j, CATALOG) == [Demo(method="cp"), Demo(limit=2)]


@pytest.mark.parametrize("text, message", [
    ("passes: 3", "expected a list"),
    ("- demo: {bogus: 1}", "has no option 'bogus'"),
    ("- demo: {rank: [1, 2]}", "cannot read"),
    ("- [1, 2]", "is not a pass"),
    ("- demo: 7", "options must be a mapping"),
    (": : :\n- [", "cannot parse recipe"),
])
def test_recipe_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_recipe(path, CATALOG)


def test_missing_recipe(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_recipe(tmp_path / "none.yaml", CATALOG)


def test_catalog_names_are_unique_and_match_modules():
    names = [cls.name for cls in catalog()]
    assert len(names) == len(set(names))
    for cls in catalog():
        assert cls.__module__ == f"graph_opt.passes.{cls.name}"  # one pass per module, one name everywhere
        assert cls.summary()
        describe(cls)
