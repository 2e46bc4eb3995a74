"""The pass contract: the input is never mutated, `modified` is honest, for every registered pass."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
from builders import GraphBuilder, small_cnn

from graph_opt.pass_base import Pass
from graph_opt.registry import catalog


@pytest.mark.parametrize("cls", catalog(), ids=lambda c: c.name)
def test_input_never_mutated(cls):
    model = small_cnn()
    before = model.SerializeToString()
    result = cls()(model)
    assert model.SerializeToString() == before
    if not result.modified:
        assert result.model.SerializeToString() == before


@pytest.mark.parametrize("cls", catalog(), ids=lambda c: c.name)
def test_modified_is_honest_on_a_model_with_nothing_to_do(cls):
    g = GraphBuilder()
    g.output(g.node("Relu", [g.input("x", ["N", 4])], ["y"]), ["N", 4])
    model = g.build()
    result = cls()(model)
    assert not result.modified and not result.report.rewritten
    assert result.model.SerializeToString() == model.SerializeToString()


@dataclass(frozen=True, kw_only=True)
class Vandal(Pass):
    """Edits the model it is given in place."""

    name: ClassVar[str] = "vandal"

    def run(self, model, report, ctx):
        model.graph.node[0].op_type = "Sigmoid"
        report.rewrite(model.graph.node[0].name, action="vandalized")
        return model


def test_base_class_protects_the_caller_even_from_an_in_place_pass():
    model = small_cnn()
    before = model.SerializeToString()
    result = Vandal()(model)
    assert result.modified and result.model.graph.node[0].op_type == "Sigmoid"
    assert model.SerializeToString() == before


def _literal_fields(cls):
    import typing

    hints = typing.get_type_hints(cls)
    return [f.name for f in __import__("dataclasses").fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Literal]


@pytest.mark.parametrize("cls", [c for c in catalog() if _literal_fields(c)], ids=lambda c: c.name)
def test_every_literal_option_is_checked_when_the_pass_is_made(cls):
    for name in _literal_fields(cls):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            cls(**{name: "no-such-choice"})
