"""Small ONNX models for tests, built in a few lines."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.verify import make_session


class GraphBuilder:
    """Chain `input`, `const`, `node`, `output`, then `build()` a checked ModelProto."""

    def __init__(self, opset: int = 17, seed: int = 0, name: str = "test"):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.inputs, self.outputs, self.inits, self.nodes = [], [], [], []
        self._count = 0

    def input(self, name: str, shape, dtype=np.float32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        return name

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape, scale: float = 0.5) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs, outputs=None, name: str | None = None, domain: str = "", **attrs) -> str:
        self._count += 1
        name = name if name is not None else f"{op.lower()}{self._count}"
        outputs = outputs or [f"{name}_out"]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None, **attrs))
        return outputs[0]

    def output(self, name: str, shape=None, dtype=np.float32) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int = 3, *, group: int = 1, bias: bool = True, pads=None,
             name: str | None = None, **attrs) -> str:
        self._count += 1
        name = name or f"conv{self._count}"
        w = self.weight(f"{name}.w", (cout, cin // group, k, k))
        ins = [x, w] + ([self.weight(f"{name}.b", (cout,))] if bias else [])
        pads = pads if pads is not None else [k // 2] * 4
        return self.node("Conv", ins, name=name, kernel_shape=[k, k], pads=pads, group=group, **attrs)

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        self._count += 1
        name = name or f"bn{self._count}"
        gamma = self.const(f"{name}.gamma", self.rng.uniform(0.5, 1.5, c).astype(np.float32))
        beta = self.const(f"{name}.beta", self.rng.standard_normal(c).astype(np.float32))
        mean = self.const(f"{name}.mean", self.rng.standard_normal(c).astype(np.float32))
        var = self.const(f"{name}.var", self.rng.uniform(0.5, 2.0, c).astype(np.float32))
        return self.node("BatchNormalization", [x, gamma, beta, mean, var], name=name, epsilon=1e-5)

    def gemm(self, x: str, k: int, n: int, *, trans_b: int = 1, bias: bool = True, name: str | None = None, **attrs) -> str:
        self._count += 1
        name = name or f"gemm{self._count}"
        w = self.weight(f"{name}.w", (n, k) if trans_b else (k, n))
        ins = [x, w] + ([self.weight(f"{name}.b", (n,))] if bias else [])
        return self.node("Gemm", ins, name=name, transB=trans_b, **attrs)

    def build(self, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset <= 17 else 10
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def conv_bn_model(cin: int = 3, cout: int = 8, k: int = 3, group: int = 1, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", cin, hw, hw])
    y = g.node("Relu", [g.bn(g.conv(x, cin, cout, k, group=group), cout)], ["y"])
    g.output(y, ["N", cout, hw, hw])
    return g.build()


def gemm_bn_model(k: int = 16, n: int = 8, trans_b: int = 1, seed: int = 0, **gemm_attrs) -> onnx.ModelProto:
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", k])
    y = g.node("Relu", [g.bn(g.gemm(x, k, n, trans_b=trans_b, **gemm_attrs), n)], ["y"])
    g.output(y, ["N", n])
    return g.build()


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual Add, a depthwise conv, GAP, Flatten, Gemm head: 10 logits."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, 16, 16])
    a = g.node("Relu", [g.bn(g.conv(x, 3, 16), 16)])
    r = g.node("Relu", [g.bn(g.conv(a, 16, 16), 16)])
    r = g.bn(g.conv(r, 16, 16), 16)
    s = g.node("Relu", [g.node("Add", [a, r])])
    d = g.node("Relu", [g.bn(g.conv(s, 16, 16, group=16), 16)])
    p = g.node("GlobalAveragePool", [d])
    f = g.node("Flatten", [p], axis=1)
    y = g.gemm(f, 16, 10, name="head")
    g.node("Identity", [y], ["logits"])
    g.output("logits", ["N", 10])
    return g.build()


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs under onnxruntime CPU with graph optimizations off (the parity harness's session)."""
    return make_session(model).run(None, feeds)


def random_input(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def assert_valid(model: onnx.ModelProto) -> None:
    """The output passes the full checker and loads in onnxruntime."""
    onnx.checker.check_model(model, full_check=True)
    make_session(model)


# ---- models with channel dependencies (pruning tests); k=1 convs have no padding ----

def _cbr(g: GraphBuilder, x: str, cin: int, cout: int, k: int, **kw) -> str:
    return g.node("Relu", [g.bn(g.conv(x, cin, cout, k, **kw), cout)])


def classifier_head(g: GraphBuilder, x: str, c: int, classes: int = 5) -> str:
    f = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    g.node("Identity", [g.gemm(f, c, classes, name="head")], ["y"])
    return g.output("y", ["N", classes])


def residual_model(k: int = 3, seed: int = 0) -> onnx.ModelProto:
    """stem → [conv-bn-relu → conv-bn] + skip → relu → conv-bn-relu → GAP → Flatten → Gemm."""
    g = GraphBuilder(seed=seed)
    a = _cbr(g, g.input("x", ["N", 3, 8, 8]), 3, 8, k, name="stem")
    c = g.bn(g.conv(_cbr(g, a, 8, 8, k, name="res1"), 8, 8, k, name="res2"), 8)
    s = g.node("Relu", [g.node("Add", [a, c])])
    classifier_head(g, _cbr(g, s, 8, 12, k, name="expand"), 12)
    return g.build()


def concat_model(k: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Two conv branches and the raw input concatenated on channels → BN → Relu → conv."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, 8, 8])
    a = g.node("Relu", [g.conv(x, 3, 6, k, name="branch_a")])
    b = g.node("Relu", [g.conv(x, 3, 4, k, name="branch_b")])
    cat = g.node("Relu", [g.bn(g.node("Concat", [a, b, x], axis=1), 13)])
    classifier_head(g, _cbr(g, cat, 13, 8, k, name="mix"), 8)
    return g.build()


def depthwise_model(k: int = 3, mult: int = 1, seed: int = 0) -> onnx.ModelProto:
    """conv-bn-relu → depthwise conv (channel multiplier `mult`) -bn-relu → 1×1 conv."""
    g = GraphBuilder(seed=seed)
    a = _cbr(g, g.input("x", ["N", 3, 8, 8]), 3, 8, k, name="pw_in")
    d = _cbr(g, a, 8, 8 * mult, k, group=8, name="dw")
    classifier_head(g, _cbr(g, d, 8 * mult, 8, 1, name="pw_out"), 8)
    return g.build()


def se_model(k: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Squeeze-Excitation twice: a Conv form (GAP → 1×1 → Relu → 1×1 → Sigmoid → Mul) and a
    Gemm form (GAP → Flatten → Gemm → Relu → Gemm → HardSigmoid → Reshape → Mul), with SiLU."""
    g = GraphBuilder(seed=seed)
    f = g.bn(g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, k, name="feat"), 8)
    f = g.node("Mul", [f, g.node("Sigmoid", [f])])  # SiLU
    s = g.node("GlobalAveragePool", [f])
    s = g.node("Sigmoid", [g.conv(g.node("Relu", [g.conv(s, 8, 4, 1, name="se_reduce")]), 4, 8, 1, name="se_expand")])
    f = g.node("Mul", [f, s])
    h = g.node("HardSwish", [g.bn(g.conv(f, 8, 8, k, name="feat2"), 8)])
    t = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    t = g.node("HardSigmoid", [g.gemm(g.node("Relu", [g.gemm(t, 8, 4, name="se2_reduce")]), 4, 8, name="se2_expand")])
    t = g.node("Reshape", [t, g.const("se2_shape", np.array([-1, 8, 1, 1], np.int64))])
    classifier_head(g, g.node("Mul", [h, t]), 8)
    return g.build()


def flatten_model(use_reshape: bool = False, seed: int = 0) -> onnx.ModelProto:
    """conv (no padding, 6×6 → 4×4) → Relu → Flatten or Reshape[-1, 128] → Gemm → Relu → Gemm."""
    g = GraphBuilder(seed=seed)
    a = _cbr(g, g.input("x", ["N", 3, 6, 6]), 3, 8, 3, pads=[0, 0, 0, 0], name="conv")
    if use_reshape:
        f = g.node("Reshape", [a, g.const("flat_shape", np.array([-1, 128], np.int64))])
    else:
        f = g.node("Flatten", [a], axis=1)
    h = g.node("Relu", [g.gemm(f, 128, 16, name="fc1")])
    g.node("Identity", [g.gemm(h, 16, 5, name="fc2")], ["y"])
    g.output("y", ["N", 5])
    return g.build()


def ffn_model(act: str = "Gelu", bias: bool = True, hidden: int = 8, ff: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Transformer FFN on [batch, seq, hidden]: MatMul → (+b1) → act → MatMul → (+b2) → + x.

    act: an op name (Gelu needs opset 20) or 'gelu_erf', the decomposed form exporters emit.
    """
    g = GraphBuilder(opset=20 if act == "Gelu" else 17, seed=seed)
    x = g.input("x", ["B", "S", hidden])
    h = g.node("MatMul", [x, g.weight("w1", (hidden, ff))], name="fc1")
    if bias:
        h = g.node("Add", [h, g.weight("b1", (ff,))])
    if act == "gelu_erf":
        e = g.node("Erf", [g.node("Div", [h, g.const("sqrt2", np.array(np.sqrt(2), np.float32))])])
        h = g.node("Mul", [g.node("Mul", [h, g.node("Add", [e, g.const("one", np.array(1, np.float32))])]),
                           g.const("half", np.array(0.5, np.float32))])
    else:
        h = g.node(act, [h])
    y = g.node("MatMul", [h, g.weight("w2", (ff, hidden))], name="fc2")
    if bias:
        y = g.node("Add", [y, g.weight("b2", (hidden,))])
    g.node("Add", [y, x], ["y"])
    g.output("y", ["B", "S", hidden])
    return g.build()


def split_model(k: int = 3, seed: int = 0) -> onnx.ModelProto:
    """conv-bn-relu (10) → Split [4, 6] on channels → two convs → Add; and a Slice of channels 2:8."""
    g = GraphBuilder(seed=seed)
    a = _cbr(g, g.input("x", ["N", 3, 8, 8]), 3, 10, k, name="wide")
    p, q = g.node("Split", [a, g.const("sizes", np.array([4, 6], np.int64))], ["p", "q"], axis=1), "q"
    s = g.node("Slice", [a, g.const("starts", np.array([2], np.int64)), g.const("ends", np.array([8], np.int64)),
                         g.const("axes", np.array([1], np.int64))])
    t = g.node("Add", [g.conv(p, 4, 8, k, name="from_p"), g.conv(q, 6, 8, k, name="from_q")])
    t = g.node("Add", [t, g.conv(s, 6, 8, k, name="from_slice")])
    classifier_head(g, g.node("Relu", [t]), 8)
    return g.build()


# ---- a CNN wide enough (≥ 32 channels) for the low-rank latency gate (reconstruct tests) ----

def wide_cnn(channels: int = 32, hw: int = 12, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """small_cnn with `channels` everywhere: stem, a residual block of two 3×3 convs, a 1×1 conv, GAP, Gemm."""
    g = GraphBuilder(seed=seed)
    c = channels
    a = _cbr(g, g.input("x", ["N", 3, hw, hw]), 3, c, 3, name="stem")
    r = g.bn(g.conv(_cbr(g, a, c, c, 3, name="res1"), c, c, 3, name="res2"), c)
    s = g.node("Relu", [g.node("Add", [a, r])])
    p = _cbr(g, s, c, c, 1, name="point")
    f = g.node("Flatten", [g.node("GlobalAveragePool", [p])], axis=1)
    g.node("Identity", [g.gemm(f, c, classes, name="head")], ["logits"])
    g.output("logits", ["N", classes])
    return g.build()
