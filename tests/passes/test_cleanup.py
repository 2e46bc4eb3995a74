import numpy as np
from builders import GraphBuilder, assert_valid, random_input, run

from graph_opt.passes.cleanup import Cleanup


def _model_with_dead_parts():
    g = GraphBuilder()
    x = g.input("x", ["N", 4])
    y = g.gemm(x, 4, 3, name="live")
    g.gemm(x, 4, 5, name="dead")  # output read by nobody
    g.const("unused", np.ones(7, np.float32))
    g.output(g.node("Relu", [y], ["y"]), ["N", 3])
    return g.build()


def test_removes_dead_nodes_and_unused_initializers():
    model = _model_with_dead_parts()
    assert len(model.graph.node) == 3 and len(model.graph.initializer) == 5  # vacuity guard
    result = Cleanup()(model)
    assert result.modified
    assert [(n.op_type, n.name) for n in result.model.graph.node][0] == ("Gemm", "live")
    assert len(result.model.graph.node) == 2
    names = {t.name for t in result.model.graph.initializer}
    assert "unused" not in names and "dead.w" not in names and "live.w" in names
    actions = {r["action"] for r in result.report.rewritten}
    assert actions == {"removed dead node", "removed unused initializer"}
    assert_valid(result.model)
    x = random_input((2, 4))
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(result.model, {"x": x})[0])


def test_sorts_unsorted_graph():
    model = _model_with_dead_parts()
    model = Cleanup()(model).model
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    result = Cleanup()(model)
    assert result.modified and result.report.rewritten[-1]["action"] == "sorted nodes topologically"
    assert [n.name for n in result.model.graph.node] == [n.name for n in nodes]
    assert_valid(result.model)


def test_clean_model_is_not_modified():
    model = Cleanup()(_model_with_dead_parts()).model
    again = Cleanup()(model)
    assert not again.modified and not again.report.rewritten
    assert again.model.SerializeToString() == model.SerializeToString()
