"""Small ONNX models for tests, built in a few lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.external_data import read_array
from graph_opt.runtime import make_session


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


def small_cnn(seed: int = 0, channels: int = 3) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual Add, a depthwise conv, GAP, Flatten, Gemm head: 10 logits.
    ``channels``: of the input image (quantize keeps a 3-channel stem float, a 4-channel one not)."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", channels, 16, 16])
    a = g.node("Relu", [g.bn(g.conv(x, channels, 16), 16)])
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


def masked_pool_model(hidden: int = 32, ff: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A padded-sequence encoder's tail: x[B, S, hidden] → fc1 (MatMul + b) → Relu → fc2 (MatMul + b),
    then the mean over the positions where attention_mask[B, S] (int64) is 1 → y[B, hidden]."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["B", "S", hidden])
    mask = g.input("attention_mask", ["B", "S"], np.int64)
    h = g.node("Relu", [g.node("Add", [g.node("MatMul", [x, g.weight("w1", (hidden, ff), hidden ** -0.5)], name="fc1"),
                                       g.weight("b1", (ff,), 0.1)])])
    y = g.node("Add", [g.node("MatMul", [h, g.weight("w2", (ff, hidden), ff ** -0.5)], name="fc2"),
                       g.weight("b2", (hidden,), 0.1)])
    m = g.node("Cast", [g.node("Unsqueeze", [mask, g.const("ax", np.array([2], np.int64))])], to=TensorProto.FLOAT)
    total = g.node("ReduceSum", [g.node("Mul", [y, m]), g.const("ax1", np.array([1], np.int64))], keepdims=0)
    count = g.node("ReduceSum", [m, g.const("ax1b", np.array([1], np.int64))], keepdims=0)
    g.node("Div", [total, count], ["y"])
    g.output("y", ["B", hidden])
    return g.build()


def padding_bases(hidden: int = 32) -> np.ndarray:
    """The two 8-dim subspaces of `padded_data` (real, padding), each 8 × hidden."""
    return np.random.default_rng(100).standard_normal((2, 8, hidden))


def padded_data(n: int = 48, seq: int = 16, hidden: int = 32, seed: int = 0):
    """Inputs for `masked_pool_model`: 3–8 real positions per row whose features live in an 8-dim
    subspace, the rest padding (mask 0) with 30× larger features in another one (the same two
    subspaces for every `seed`)."""
    real_basis, pad_basis = padding_bases(hidden)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, seq, 8)) @ pad_basis * 30).astype(np.float32)
    lengths = rng.integers(3, 9, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    real = rng.standard_normal((n, seq, 8)) @ real_basis + 0.05 * rng.standard_normal((n, seq, hidden))
    x = np.where(mask[..., None] == 1, real, x).astype(np.float32)
    return {"x": x, "attention_mask": mask}


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


# ---- hostile and odd models (tests/core/test_hostile.py) ----

def _with_domains(g: GraphBuilder, *domains: tuple[str, int]) -> onnx.ModelProto:
    model = g.build(check=False)
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in domains)
    return model


def conv_bn_gemm_model(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu (3×3), Conv-BN-Relu (1×1), GAP, Flatten, Gemm-Relu, Gemm head; ops legal from opset 7.

    The IR version is the lowest the opset allows; below IR 4 every initializer is also listed as a
    graph input, as the IR then requires."""
    g = GraphBuilder(opset=opset, seed=seed)
    a = _cbr(g, g.input("x", ["N", 3, 8, 8]), 3, 8, 3, name="c1")
    a = _cbr(g, a, 8, 8, 1, name="c2")
    f = g.node("Flatten", [g.node("GlobalAveragePool", [a])], axis=1)
    g.node("Identity", [g.gemm(g.node("Relu", [g.gemm(f, 8, 8, name="fc")]), 8, 4, name="head")], ["y"])
    g.output("y", ["N", 4])
    model = g.build(check=False)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    if model.ir_version < 4:
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    return model


def custom_domain_model() -> onnx.ModelProto:
    """Conv-BN, then com.microsoft FusedConv (Relu) and com.microsoft Gelu around a 1×1 conv, a head."""
    g = GraphBuilder(opset=17)
    a = g.bn(g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, name="c1"), 8)
    f = g.node("FusedConv", [a, g.weight("fused.w", (8, 8, 3, 3)), g.weight("fused.b", (8,))], name="fused",
               domain="com.microsoft", activation="Relu", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.node("Gelu", [g.conv(f, 8, 8, 1, name="c2")], name="ms_gelu", domain="com.microsoft")
    classifier_head(g, h, 8)
    return _with_domains(g, ("com.microsoft", 1))


def unknown_domain_model() -> onnx.ModelProto:
    """Conv-BN, then an op of a domain no runtime knows (onnxruntime cannot load it)."""
    g = GraphBuilder(opset=17)
    a = g.bn(g.conv(g.input("x", ["N", 3, 8, 8]), 3, 8, name="c1"), 8)
    g.node("Frobnicate", [a], ["y"], name="frob", domain="org.example.custom", strength=2)
    g.output("y", ["N", 8, 8, 8])
    return _with_domains(g, ("org.example.custom", 1))


def constant_node_model() -> onnx.ModelProto:
    """conv_bn_gemm_model with no initializers: every weight is a Constant node."""
    model = conv_bn_gemm_model()
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in model.graph.initializer]
    nodes = consts + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def no_weights_model() -> onnx.ModelProto:
    g = GraphBuilder(opset=17)
    g.node("Softmax", [g.node("Relu", [g.input("x", ["N", 4, 6])])], ["y"], axis=-1)
    g.output("y", ["N", 4, 6])
    return g.build()


def weights_as_inputs_model() -> onnx.ModelProto:
    """Conv and Gemm weights are graph inputs (no initializer). All inputs have 8 rows, so samples
    stacked on axis 0 (the way graph-opt feeds data) give every run one whole weight."""
    g = GraphBuilder(opset=17)
    x, w, fw = g.input("x", [8, 3, 8, 8]), g.input("conv_w", [8, 3, 3, 3]), g.input("fc_w", [8, 8])
    a = g.node("Relu", [g.bn(g.node("Conv", [x, w], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 8)])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [a])], axis=1)
    g.node("Gemm", [f, fw], ["y"], name="fc", transB=1)
    g.output("y", [8, 8])
    return g.build()


def overridable_weights_model() -> onnx.ModelProto:
    """conv_bn_gemm_model whose initializers are also graph inputs (IR ≥ 4: overridable defaults)."""
    model = conv_bn_gemm_model()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    return model


def runtime_weights_model() -> onnx.ModelProto:
    """Weights computed at run time: Conv W = w0·s (Mul), Gemm B = Transpose(b0), MatMul W = m0 + m1."""
    g = GraphBuilder(opset=17)
    w = g.node("Mul", [g.weight("w0", (8, 3, 3, 3)), g.const("s", np.float32(0.5))])
    conv = g.node("Conv", [g.input("x", ["N", 3, 8, 8]), w, g.weight("cb", (8,))], name="conv",
                  kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [g.bn(conv, 8)])])], axis=1)
    h = g.node("Relu", [g.node("Gemm", [f, g.node("Transpose", [g.weight("b0", (8, 16))], perm=[1, 0])],
                               name="fc", transB=1)])
    g.node("MatMul", [h, g.node("Add", [g.weight("m0", (16, 4)), g.weight("m1", (16, 4))])], ["y"], name="mm")
    g.output("y", ["N", 4])
    return g.build()


def shared_weights_model() -> onnx.ModelProto:
    """One Conv weight and bias read by two Convs, one Gemm weight by two Gemms, a MatMul weight tied
    to its own transpose (input/output embeddings)."""
    g = GraphBuilder(opset=17)
    w, b = g.weight("shared_conv_w", (8, 8, 3, 3)), g.weight("shared_conv_b", (8,))
    a = g.input("x", ["N", 8, 8, 8])
    for name in ("conv_a", "conv_b"):
        a = g.node("Relu", [g.bn(g.node("Conv", [a, w, b], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 8)])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [a])], axis=1)
    fw = g.weight("shared_fc_w", (8, 8))
    for name in ("fc_a", "fc_b"):
        h = g.node("Relu", [g.node("Gemm", [h, fw], name=name, transB=1)])
    e = g.weight("embed", (8, 8))
    h = g.node("MatMul", [h, e], name="tied_in")
    g.node("MatMul", [h, g.node("Transpose", [e], perm=[1, 0])], ["y"], name="tied_out")
    g.output("y", ["N", 8])
    return g.build()


def nonfinite_weights_model(bad: float = float("nan")) -> onnx.ModelProto:
    """One Conv weight and one Gemm weight element set to `bad` (NaN or ±inf), a Gemm bias with -inf."""
    g = GraphBuilder(opset=17)
    w = (g.rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)
    w[0, 0, 0, 0] = bad
    conv = g.node("Conv", [g.input("x", ["N", 3, 8, 8]), g.const("conv.w", w)], name="conv",
                  kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [g.bn(conv, 8, name="bn")])])], axis=1)
    fw = (g.rng.standard_normal((8, 8)) * 0.5).astype(np.float32)
    fw[1, 1] = bad
    fb = np.where(np.arange(8) == 2, -np.inf, 0.1).astype(np.float32)
    h = g.node("Relu", [g.node("Gemm", [f, g.const("fc.w", fw), g.const("fc.b", fb)], name="fc", transB=1)])
    g.node("Identity", [g.gemm(h, 8, 4, name="head")], ["y"])
    g.output("y", ["N", 4])
    return g.build()


def zero_sized_model() -> onnx.ModelProto:
    """A Gemm with a [0, 8] weight and [0] bias whose empty output is concatenated to a live one,
    and an unused zero-sized initializer."""
    g = GraphBuilder(opset=17)
    g.const("empty", np.zeros((1, 0), np.float32))
    h = g.node("Relu", [g.gemm(g.input("x", ["N", 8]), 8, 8, name="fc")])
    z = g.node("Gemm", [h, g.const("zero_w", np.zeros((0, 8), np.float32)), g.const("zero_b", np.zeros(0, np.float32))],
               name="fc_empty", transB=1)
    g.node("Identity", [g.gemm(g.node("Concat", [h, z], axis=1), 8, 4, name="head")], ["y"])
    g.output("y", ["N", 4])
    return g.build()


def symbolic_model() -> onnx.ModelProto:
    """Every input dimension symbolic: a CNN on x[N, C, H, W] and an FFN on t[B, S, D]."""
    g = GraphBuilder(opset=17)
    a = _cbr(g, _cbr(g, g.input("x", ["N", "C", "H", "W"]), 3, 8, 3, name="c1"), 8, 8, 1, name="c2")
    g.node("Identity", [g.node("GlobalAveragePool", [a])], ["y"])
    t = g.input("t", ["B", "S", "D"])
    h = g.node("Relu", [g.node("MatMul", [t, g.weight("w1", (16, 32))], name="ffn1")])
    g.node("Add", [g.node("MatMul", [h, g.weight("w2", (32, 16))], name="ffn2"), t], ["z"])
    g.output("y", ["N", 8, 1, 1])
    g.output("z", ["B", "S", "D"])
    return g.build()


def renamed_nodes_model(name: str = "") -> onnx.ModelProto:
    """small_cnn with every node named `name` (empty: unnamed nodes; else duplicates)."""
    model = small_cnn()
    for node in model.graph.node:
        node.name = name
    return model


def qoperator_model() -> onnx.ModelProto:
    """QOperator form: QuantizeLinear → QLinearConv (int8 weight, int32 bias) → DequantizeLinear,
    then a float Conv-BN-Relu and a float head."""
    g = GraphBuilder(opset=17)
    xs, xz = g.const("x_s", np.float32(0.02)), g.const("x_z", np.uint8(128))
    q = g.node("QuantizeLinear", [g.input("x", ["N", 3, 8, 8]), xs, xz], name="q_in")
    ys, yz = g.const("y_s", np.float32(0.05)), g.const("y_z", np.uint8(128))
    qc = g.node("QLinearConv", [q, xs, xz, g.const("qconv.w_q", g.rng.integers(-60, 60, (8, 3, 3, 3)).astype(np.int8)),
                                g.const("qconv.w_s", np.full(8, 0.01, np.float32)), g.const("qconv.w_z", np.zeros(8, np.int8)),
                                ys, yz, g.const("qconv.b_q", g.rng.integers(-100, 100, 8).astype(np.int32))],
                name="qconv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    d = g.node("DequantizeLinear", [qc, ys, yz], name="dq_out")
    classifier_head(g, _cbr(g, d, 8, 8, 3, name="float_conv"), 8)
    return g.build()


def dynamic_quant_model() -> onnx.ModelProto:
    """onnxruntime's quantize_dynamic form: DynamicQuantizeLinear → MatMulInteger → Cast → Mul, then a float MatMul."""
    g = GraphBuilder(opset=17)
    g.node("DynamicQuantizeLinear", [g.input("x", ["N", 16])], ["xq", "xs", "xz"], name="dql")
    mi = g.node("MatMulInteger", ["xq", g.const("w_q", g.rng.integers(0, 255, (16, 8)).astype(np.uint8)), "xz",
                                  g.const("w_z", np.uint8(128))], name="mmi")
    f = g.node("Mul", [g.node("Cast", [mi], to=TensorProto.FLOAT), g.node("Mul", ["xs", g.const("w_s", np.float32(0.01))])])
    g.node("MatMul", [g.node("Relu", [f]), g.weight("w2", (8, 4))], ["y"], name="float_mm")
    g.output("y", ["N", 4])
    return g.build()


def matmulnbits_model() -> onnx.ModelProto:
    """com.microsoft MatMulNBits (4-bit, blocks of 16), then a float MatMul."""
    g = GraphBuilder(opset=21)
    k, n, block = 32, 16, 16
    packed = g.const("w_packed", g.rng.integers(0, 256, (n, k // block, block // 2)).astype(np.uint8))
    h = g.node("MatMulNBits", [g.input("x", ["N", k]), packed, g.const("w_scales", np.full(n * k // block, 0.05, np.float32))],
               name="nbits", domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    g.node("MatMul", [g.node("Relu", [h]), g.weight("w2", (n, 4))], ["y"], name="float_mm")
    g.output("y", ["N", 4])
    return _with_domains(g, ("com.microsoft", 1))


def _branch(name: str, seed: int) -> onnx.GraphProto:
    """An If branch: Conv-BN-Relu on the outer-scope tensor 'feat', its weights inside the branch."""
    b = GraphBuilder(opset=17, seed=seed, name=name)
    b._count = 100 * seed  # names unique across branches (the whole model must be SSA)
    b.node("Identity", [_cbr(b, "feat", 8, 8, 3, name=f"{name}_conv")], [f"{name}_out"])
    b.output(f"{name}_out", ["N", 8, 8, 8])
    return helper.make_graph(b.nodes, name, [], b.outputs, b.inits)


def control_flow_model(kind: str = "If") -> onnx.ModelProto:
    """A Conv-BN-Relu stem, then `kind`: an If with a Conv-BN in each branch, a Loop whose body is a
    MatMul (2 trips), or a Scan whose body is a MatMul; a Gemm head. Subgraph weights are inside them."""
    g = GraphBuilder(opset=17)
    g.node("Identity", [_cbr(g, g.input("x", ["N", 3, 8, 8]), 3, 8, 3, name="stem")], ["feat"])
    if kind == "If":
        cond = g.node("Greater", [g.node("ReduceMean", ["feat"], keepdims=0), g.const("low", np.float32(-1e9))])
        out = g.node("If", [cond], ["if_out"], name="branch", then_branch=_branch("then", 1), else_branch=_branch("else", 2))
        classifier_head(g, out, 8)
        return g.build()
    f = g.node("Flatten", [g.node("GlobalAveragePool", ["feat"])], axis=1)
    body = GraphBuilder(opset=17, seed=3, name="body")
    if kind == "Loop":
        body.input("i", [], np.int64), body.input("c_in", [], bool), body.input("h_in", ["N", 8])
        body.node("Relu", [body.node("MatMul", ["h_in", body.weight("loop_w", (8, 8))], name="loop_mm")], ["h_out"])
        body.node("Identity", ["c_in"], ["c_out"])
        body.output("c_out", [], bool), body.output("h_out", ["N", 8])
        graph = helper.make_graph(body.nodes, "body", body.inputs, body.outputs, body.inits)
        y = g.node("Loop", [g.const("trips", np.int64(2)), g.const("keep_going", np.bool_(True)), f], ["loop_out"],
                   name="loop", body=graph)
    elif kind == "Scan":
        body.input("s_in", ["N", 8]), body.input("x_t", [8])
        mm = body.node("MatMul", ["x_t", body.weight("scan_w", (8, 8))], name="scan_mm")
        body.node("Add", ["s_in", mm], ["s_out"])
        body.node("Identity", [mm], ["y_t"])
        body.output("s_out", ["N", 8]), body.output("y_t", [8])
        graph = helper.make_graph(body.nodes, "body", body.inputs, body.outputs, body.inits)
        state = g.node("Mul", [f, g.const("zero", np.float32(0))])
        y = g.node("Scan", [state, f], ["scan_state", "scan_out"], name="scan", body=graph, num_scan_inputs=1)
    else:
        raise ValueError(f"unknown control-flow kind {kind!r}")
    g.node("Identity", [g.gemm(y, 8, 4, name="head")], ["y"])
    g.output("y", ["N", 4])
    return g.build()


# ---- random models for fuzzing (tests/core/test_fuzz.py, benchmarks/fuzz_campaign.py) ----
#
# One generator serves hypothesis (which draws every choice, so failures shrink) and the campaign
# script (numpy, one seed per case): `draw_fuzz_spec(integer, choice)` asks for each choice through
# two callables; `fuzz_spec(seed)` answers them from `np.random.default_rng(seed)`.
#
# With `zero_channels`, a quarter of every hidden layer's output channels is exactly dead (zero
# filter and bias; BatchNormalization with zero mean and shift there; activations with f(0) = 0), the
# same first-quarter indices along tied (residual) paths and every width a multiple of 4, so that
# `prune_channels:ratio=0.25,scope=layer,round_to=1` prunes only dead channels: an exact rewrite.

FUZZ_KINDS = ("mlp", "cnn", "ffn")
FUZZ_ACTS = ("Relu", "LeakyRelu", "Tanh", "HardSwish", "SiLU", "none")  # all map 0 to 0


@dataclass(frozen=True)
class FuzzSpec:
    kind: str                 # mlp | cnn | ffn
    opset: int                # 13..21
    seed: int                 # weights
    zero_channels: bool
    width: int                # input features / channels / hidden size
    size: int                 # cnn: height = width of the image; ffn: sequence length; mlp: unused
    blocks: tuple             # per kind, see fuzz_model
    act: str
    bn: bool
    classes: int
    batch: int = 0            # 0: a symbolic batch dimension; else that static batch size
    extra_output: bool = False  # the first block's output is a graph output too
    dead_code: bool = False   # a node nobody reads and an unused initializer (cleanup's work)
    on_disk: bool = False     # loaded with its weights kept on disk (load_model's way over 2 GB)

    def __str__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"FuzzSpec({fields})"


def draw_fuzz_spec(integer, choice) -> FuzzSpec:
    """A random spec; `integer(lo, hi)` (inclusive) and `choice(options)` make every choice."""
    kind = choice(FUZZ_KINDS)
    opset = integer(13, 21)
    zero = choice((False, True))
    unit = 4 if zero else 1

    def width(lo: int, hi: int) -> int:
        return unit * integer(max(1, -(-lo // unit)), max(1, hi // unit))

    act = choice(tuple(a for a in FUZZ_ACTS if a != "HardSwish" or opset >= 14))
    blocks: list = []
    if kind == "mlp":
        w, size = width(1, 24), 0
        for _ in range(integer(1, 3)):
            blocks.append((choice(("gemm", "matmul")), width(1, 32), integer(0, 1), choice((1.0, 0.5)), choice((1.0, 2.0))))
    elif kind == "cnn":
        w, size = integer(1, 4), integer(3, 10)
        for _ in range(integer(1, 4)):
            block = choice(("conv", "conv", "res", "cat", "dw", "group", "pool", "se", "affine"))
            if block == "conv":
                blocks.append(("conv", width(1, 24), choice((1, 2, 3, 5)), choice((1, 1, 2)), choice((1, 1, 2)),
                               choice(("pads", "pads", "SAME_UPPER", "VALID"))))
            elif block == "cat":
                blocks.append(("cat", width(1, 12), width(1, 12)))
            elif block == "dw":
                blocks.append(("dw", choice((1, 2))))
            elif block == "group":
                blocks.append(("group", 2 * width(1, 12)))
            elif block == "pool":
                blocks.append(("pool", choice(("MaxPool", "AveragePool", "AveragePool_pad"))))
            else:
                blocks.append((block,))
        blocks.append(("head", choice(("gap", "gap", "flatten"))))
    else:
        w, size = width(4, 32), integer(1, 6)
        act = choice(tuple(["Relu", "Tanh", "SiLU", "gelu_erf"] + (["Gelu"] if opset >= 20 else [])))
        for _ in range(integer(1, 2)):
            blocks.append(("ffn", width(4, 64), choice((False, True)), choice((False, True)) and opset >= 17))
    seed = integer(0, 2**31 - 1)
    bn = bool(choice((False, True)))
    classes = integer(1, 10)
    batch = choice((0, 0, 0, 1, 2))
    extra_output = bool(choice((False, True)))
    dead_code = bool(choice((False, True)))
    on_disk = choice((False, False, False, True))  # drawn last: earlier seeds keep their models
    return FuzzSpec(kind, opset, seed, zero, w, size, tuple(blocks), act, bn, classes, batch, extra_output,
                    dead_code, on_disk)


def fuzz_spec(seed: int) -> FuzzSpec:
    rng = np.random.default_rng(seed)
    return draw_fuzz_spec(lambda lo, hi: int(rng.integers(lo, hi + 1)), lambda options: options[int(rng.integers(len(options)))])


class _Fuzz:
    """GraphBuilder plus the bookkeeping of dead channels (see `FuzzSpec.zero_channels`)."""

    def __init__(self, spec: FuzzSpec):
        self.spec = spec
        self.g = GraphBuilder(opset=spec.opset, seed=spec.seed, name=f"fuzz_{spec.kind}")
        self.rng = self.g.rng
        self.batch = spec.batch or "N"

    def dead(self, n: int) -> np.ndarray:
        return np.arange(n // 4) if self.spec.zero_channels else np.arange(0)

    def weight(self, name: str, shape, fan_in: int, dead: np.ndarray = np.arange(0), axis: int = 0) -> str:
        w = (self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
        np.moveaxis(w, axis, 0)[dead] = 0
        return self.g.const(name, w)

    def bias(self, name: str, n: int, dead: np.ndarray) -> str:
        b = (self.rng.standard_normal(n) * 0.1).astype(np.float32)
        b[dead] = 0
        return self.g.const(name, b)

    def bn(self, x: str, c: int, dead: np.ndarray) -> str:
        if not self.spec.bn:
            return x
        g = self.g
        g._count += 1
        name = f"bn{g._count}"
        gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        mean = (self.rng.standard_normal(c) * 0.1).astype(np.float32)
        var = self.rng.uniform(0.5, 2.0, c).astype(np.float32)
        beta = (self.rng.standard_normal(c) * 0.1).astype(np.float32)
        mean[dead], beta[dead] = 0, 0  # BN(0) = 0 exactly on dead channels
        ins = [g.const(f"{name}.{k}", v) for k, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        return g.node("BatchNormalization", [x, *ins], name=name, epsilon=1e-5)

    def act(self, x: str) -> str:
        a, g = self.spec.act, self.g
        if a == "none":
            return x
        if a == "SiLU":
            return g.node("Mul", [x, g.node("Sigmoid", [x])])
        if a == "gelu_erf":
            e = g.node("Erf", [g.node("Div", [x, g.const(f"sqrt2_{g._count}", np.float32(np.sqrt(2)))])])
            one, half = g.const(f"one_{g._count}", np.float32(1)), g.const(f"half_{g._count}", np.float32(0.5))
            return g.node("Mul", [g.node("Mul", [x, g.node("Add", [e, one])]), half])
        return g.node(a, [x])

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, dilation: int = 1,
             pad: str = "pads", dead_in: np.ndarray = np.arange(0), dead: np.ndarray | None = None) -> tuple[str, np.ndarray]:
        g = self.g
        g._count += 1
        name = f"conv{g._count}"
        if group == cin and cout % cin == 0 and group > 1:  # depthwise: output j reads input j // m
            mult = cout // cin
            dead = np.array([j for j in range(cout) if j // mult in set(dead_in.tolist())], np.int64)
            w = self.weight(f"{name}.w", (cout, 1, k, k), k * k)
        else:
            dead = self.dead(cout) if dead is None else dead
            w = self.weight(f"{name}.w", (cout, cin // group, k, k), cin // group * k * k, dead)
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "group": group, "dilations": [dilation] * 2}
        if pad == "pads":
            total = dilation * (k - 1)
            attrs["pads"] = [total // 2, total // 2, total - total // 2, total - total // 2]
        else:
            attrs["auto_pad"] = pad
        y = g.node("Conv", [x, w, self.bias(f"{name}.b", cout, dead)], name=name, **attrs)
        return y, dead


def fuzz_model(spec: FuzzSpec) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]] | None]:
    """The model of `spec` and the shapes that bind its dynamic dimensions (batch 1)."""
    f = _Fuzz(spec)
    g = f.g
    extra: list[tuple[str, list]] = []
    if spec.dead_code:
        g.node("Neg", [g.node("Relu", ["x"])], name="dead_relu_neg")
        f.weight("unused.w", (2, 2), 2)

    def mark(x: str, shape: list) -> None:  # the first block's output becomes a graph output too
        if spec.extra_output and not extra:
            extra.append((x, shape))

    if spec.kind == "mlp":
        x, c = g.input("x", [f.batch, spec.width]), spec.width
        for i, (op, n, trans_b, alpha, beta) in enumerate(spec.blocks):
            dead = f.dead(n)
            if op == "gemm":
                w = f.weight(f"fc{i}.w", (n, c) if trans_b else (c, n), c, dead, axis=0 if trans_b else 1)
                x = g.node("Gemm", [x, w, f.bias(f"fc{i}.b", n, dead)], name=f"fc{i}", transB=trans_b,
                           alpha=alpha, beta=beta)
            else:
                w = f.weight(f"fc{i}.w", (c, n), c, dead, axis=1)
                x = g.node("Add", [g.node("MatMul", [x, w], name=f"fc{i}"), f.bias(f"fc{i}.b", n, dead)])
            x, c = f.act(f.bn(x, n, dead)), n
            mark(x, [f.batch, c])
        features = c
    elif spec.kind == "cnn":
        x, c, hw = g.input("x", [f.batch, spec.width, spec.size, spec.size]), spec.width, spec.size
        dead = np.arange(0)
        for block in spec.blocks:
            kind = block[0]
            if kind == "conv":
                _, n, k, stride, dilation, pad = block
                if hw < 4:
                    stride, pad = 1, "pads"
                if pad == "VALID" and hw - dilation * (k - 1) < 1:
                    pad = "pads"
                if pad == "SAME_UPPER":
                    dilation = 1  # onnxruntime has no dilated SAME padding
                x, dead = f.conv(x, c, n, k, stride, dilation=dilation, pad=pad)
                span = dilation * (k - 1) if pad == "VALID" else 0
                x, c, hw = f.act(f.bn(x, n, dead)), n, -(-(hw - span) // stride)
            elif kind == "res":
                r, d1 = f.conv(x, c, c, 3, dead_in=dead)
                r, _ = f.conv(f.act(f.bn(r, c, d1)), c, c, 3, dead=dead)  # tied to the skip: the same dead channels
                x = f.act(g.node("Add", [x, f.bn(r, c, dead)]))
            elif kind == "cat":
                _, ca, cb = block
                a, da = f.conv(x, c, ca, 3)
                b, db = f.conv(x, c, cb, 1)
                x = g.node("Concat", [f.act(f.bn(a, ca, da)), f.act(f.bn(b, cb, db))], axis=1)
                c, dead = ca + cb, np.concatenate([da, db + ca])
            elif kind == "dw":
                x, dead = f.conv(x, c, c * block[1], 3, group=c, dead_in=dead)
                c *= block[1]
                x = f.act(f.bn(x, c, dead))
            elif kind == "group":
                n = block[1]
                x, dead = f.conv(x, c, n, 3, group=2 if c % 2 == 0 else 1)
                x, c = f.act(f.bn(x, n, dead)), n
            elif kind == "pool" and hw >= 4:
                if block[1] == "MaxPool":
                    x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
                    hw //= 2
                else:  # 3×3 stride 1, zero-padded border counted or not
                    x = g.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                               count_include_pad=int(block[1] == "AveragePool_pad"))
            elif kind == "se":  # squeeze-excitation: x · sigmoid(W2 relu(W1 gap(x)))
                s, ds = f.conv(g.node("GlobalAveragePool", [x]), c, max(1, c // 4) * (4 if spec.zero_channels else 1), 1)
                s = g.node("Relu", [s])
                s, _ = f.conv(s, max(1, c // 4) * (4 if spec.zero_channels else 1), c, 1, dead=dead)
                x = g.node("Mul", [x, g.node("Sigmoid", [s])])
            elif kind == "affine":  # per-channel scale and shift constants (zero shift on dead channels)
                scale = f.rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)
                shift = (f.rng.standard_normal((1, c, 1, 1)) * 0.1).astype(np.float32)
                shift[0, dead] = 0
                g._count += 1
                x = g.node("Add", [g.node("Mul", [x, g.const(f"scale{g._count}", scale)]), g.const(f"shift{g._count}", shift)])
            elif kind == "head":
                if block[1] == "gap" or hw > 4:
                    x, features = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1), c
                else:
                    x, features = g.node("Flatten", [x], axis=1), c * hw * hw
            if kind != "head":
                mark(x, [f.batch, c, hw, hw])
    else:
        d = spec.width
        x = g.input("x", [spec.batch or "B", "S", d])
        for i, (_, ff, bias, ln) in enumerate(spec.blocks):
            h = x
            if ln:
                h = g.node("LayerNormalization", [h, g.const(f"ln{i}.g", f.rng.uniform(0.5, 1.5, d).astype(np.float32)),
                                                  g.const(f"ln{i}.b", (f.rng.standard_normal(d) * 0.1).astype(np.float32))],
                           axis=-1)
            dead = f.dead(ff)
            h = g.node("MatMul", [h, f.weight(f"ffn{i}.w1", (d, ff), d, dead, axis=1)], name=f"ffn{i}.fc1")
            if bias:
                h = g.node("Add", [h, f.bias(f"ffn{i}.b1", ff, dead)])
            mark(h, [spec.batch or "B", "S", ff])
            h = g.node("MatMul", [f.act(h), f.weight(f"ffn{i}.w2", (ff, d), ff)], name=f"ffn{i}.fc2")
            if bias:
                h = g.node("Add", [h, f.bias(f"ffn{i}.b2", d, np.arange(0))])
            x = g.node("Add", [h, x])
        g.node("Identity", [x], ["y"])
        g.output("y", [spec.batch or "B", "S", d])
        for name, shape in extra:
            g.output(name, shape)
        return g.build(), {"x": (spec.batch or 1, spec.size, d)}
    w = f.weight("head.w", (spec.classes, features), features)
    g.node("Gemm", [x, w, f.bias("head.b", spec.classes, np.arange(0))], ["y"], name="head", transB=1)
    g.output("y", [f.batch, spec.classes])
    for name, shape in extra:
        g.output(name, shape)
    return g.build(), None


# The fuzz oracle: every pass (as the pipeline runs it) on one random model, and what must hold.
# name → (pass specs run as one pipeline, exact?). Exact runs carry a rel_error tolerance, so a
# rollback there is a broken exactness claim; any other rollback is a pass emitting an invalid model.
FUZZ_EXACT_TOL = 1e-4
_FULL_RANK = "rank_ratio=1.0,align=0,latency_gate=false,require_saving=false"
FUZZ_RUNS: dict[str, tuple[tuple[str, ...], bool]] = {
    "fold_batchnorm": (("fold_batchnorm",), True),
    "cleanup": (("cleanup",), True),
    "prune_channels_dead": (("prune_channels:ratio=0.25,scope=layer,round_to=1,keep_first_last=false",), True),
    "factorize_gemm_full": ((f"factorize_gemm:{_FULL_RANK}",), True),
    "factorize_conv_full": ((f"factorize_conv:{_FULL_RANK}",), True),
    "quantize": (("quantize",), False),
    "prune_weights": (("prune_weights:sparsity=0.5,keep_first_last=false",), False),
    "prune_channels_lossy": (("prune_channels:ratio=0.5,scope=global,keep_first_last=false,fold=approximate",), False),
    "lowrank_reconstruct": (("factorize_gemm:rank_ratio=0.5,align=0,latency_gate=false",
                             "factorize_conv:rank_ratio=0.5,align=0,latency_gate=false", "reconstruct"), False),
}
# Campaign only (slower, or rarer paths): more settings, same oracle.
FUZZ_RUNS_EXTRA: dict[str, tuple[tuple[str, ...], bool]] = {
    "factorize_conv_spatial_full": ((f"factorize_conv:method=spatial_svd,{_FULL_RANK}",), True),
    "factorize_conv_cp": (("factorize_conv:method=cp,rank=4,align=0,latency_gate=false",), False),
    "quantize_int4": (("quantize:weights=int4",), False),
    "quantize_entropy": (("quantize:calibration=entropy",), False),
    "quantize_weight_only": (("quantize:activations=none,per_channel=false",), False),
    "prune_weights_2_4": (("prune_weights:pattern=2:4,keep_first_last=false",), False),
    "default_recipe_then_quantize_reconstruct": (("fold_batchnorm", "cleanup", "quantize", "reconstruct"), False),
}


@dataclass
class FuzzOutcome:
    spec: FuzzSpec
    problems: list[str]
    fired: dict[str, bool]  # run name → some step rewrote something and was accepted
    exact: dict[str, bool]  # run name → fired, and was held to exactness (not vacuous)


def fuzz_check(spec: FuzzSpec, runs: dict | None = None, samples: int = 4) -> FuzzOutcome:
    """Build `spec`'s model and run every entry of `runs` (default FUZZ_RUNS) through a Pipeline.

    Problems: a crash; a rolled-back step that was not a tolerance rollback (the pass emitted a model
    that fails onnx.checker / onnxruntime); an exact run that is not exact; a quantized weight or bias
    off its grid by more than half a step; reconstruct increasing the error on its calibration data;
    the input model mutated."""
    from graph_opt.data import random_dataset
    from graph_opt.pipeline import Pipeline
    from graph_opt.registry import parse_spec

    runs = FUZZ_RUNS if runs is None else runs
    model, shapes = fuzz_model(spec)
    if spec.on_disk:
        model = _on_disk(model)
    before = model.SerializeToString()
    data = random_dataset(model, samples, shapes=shapes, seed=spec.seed % 1000)
    problems: list[str] = []
    fired: dict[str, bool] = {}
    exactness: dict[str, bool] = {}
    for name, (specs, exact) in runs.items():
        exact = exact and (name != "prune_channels_dead" or spec.zero_channels)
        try:
            result = Pipeline([parse_spec(s) for s in specs], verify_data=data, calib_data=data, latency=False,
                              shapes=shapes, tolerances={"rel_error": FUZZ_EXACT_TOL} if exact else None).run(model)
        except Exception as exc:  # noqa: BLE001 - any escape is a finding
            problems.append(f"{name}: crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            continue
        fired[name] = any(s.modified and s.accepted for s in result.steps)
        exactness[name] = fired[name] and exact
        previous = result.baseline
        for step in result.steps:
            if not step.accepted:
                kind = "not exact" if exact and step.reason.startswith("tolerance") else "invalid output"
                problems.append(f"{name}: {step.name} {kind}: {step.reason[:300]}")
            elif step.modified:
                problems += [f"{name}: {step.name}: {p}" for p in _step_problems(step, previous, model, data)]
                previous = step
    if model.SerializeToString() != before:
        problems.append("the input model was mutated")
    return FuzzOutcome(spec, problems, fired, exactness)


def _on_disk(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` saved with external data and loaded back with its weights kept on disk."""
    import atexit
    import shutil
    import tempfile

    from graph_opt.model_io import load_model, save_model

    folder = tempfile.mkdtemp(prefix="fuzz-on-disk.")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return load_model(save_model(model, Path(folder) / "model.onnx", external_data=True), weights="disk")


def _step_problems(step, previous, original: onnx.ModelProto, data) -> list[str]:
    out = []
    if step.name == "quantize":
        gptq = any(n.startswith("rounding=gptq: ") for n in step.report.notes)
        out += quantized_grid_problems(previous.model, step.model, gptq)
    if step.name == "reconstruct":  # its guarantee: the pooled output MSE on its calibration data never grows
        before, after = (output_mse(original, m, data) for m in (previous.model, step.model))
        if after > before * (1 + 1e-5) + 1e-12:
            out.append(f"output MSE on the calibration data grew: {before:.6g} → {after:.6g}")
    return out


def output_mse(teacher: onnx.ModelProto, student: onnx.ModelProto, data) -> float:
    """Mean squared difference of all graph outputs (pooled), as reconstruct measures it."""
    from graph_opt.runtime import run_model

    t, s = run_model(teacher, data), run_model(student, data)
    total = sum(float(np.sum((t[k].astype(np.float64) - s[k].astype(np.float64)) ** 2)) for k in t)
    return total / max(sum(v.size for v in t.values()), 1)


# GPTQ moves a code off nearest to carry the error of the columns before it: its weights are held to
# this many steps at most, and to one step in the mean (nearest rounding: half a step everywhere).
GPTQ_MAX_STEPS = 8.0


def quantized_grid_problems(before: onnx.ModelProto, after: onnx.ModelProto, gptq: bool = False) -> list[str]:
    """Every int8/uint8/int32 weight or bias DequantizeLinear (constant input, per tensor or per
    channel) must reproduce the float tensor it replaced to within half a step of its scale; with
    `gptq` (the pass rounded weights by GPTQ) every weight within `GPTQ_MAX_STEPS`, one step in
    the mean."""
    floats = {t.name: read_array(t) for t in before.graph.initializer}
    consts = {t.name: t for t in after.graph.initializer}
    problems = []
    for node in after.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in floats or node.input[0] not in consts:
            continue
        q = consts[node.input[0]]
        if q.data_type not in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size"):
            continue
        codes = read_array(q).astype(np.float64)
        scale = read_array(consts[node.input[1]]).astype(np.float64)
        zero = (read_array(consts[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        shape = [1] * codes.ndim
        if scale.ndim:
            shape[attrs.get("axis", 1) % codes.ndim] = -1
        s, z = scale.reshape(shape), zero.reshape(shape)
        error = np.abs(floats[node.output[0]].astype(np.float64) - (codes - z) * s)
        bound = s / 2 * (1 + 1e-5) + 1e-12
        if gptq and q.data_type != TensorProto.INT32:
            steps = error / (s + 1e-30)
            if np.max(steps) > GPTQ_MAX_STEPS or np.mean(steps) > 1.0:
                problems.append(f"{node.output[0]} (GPTQ) is off its grid by up to {float(np.max(steps)):.3f} "
                                f"steps, {float(np.mean(steps)):.3f} in the mean")
        elif np.any(error > bound):
            problems.append(f"{node.output[0]} is off its grid by up to {float(np.max(error / (s + 1e-30))):.3f} steps")
    return problems


# ---- more odd models (tests/core/test_hostile.py) ----

def scalar_output_model() -> onnx.ModelProto:
    """Gemm-BN then ReduceSum over everything: a rank-0 output (a score or a loss)."""
    g = GraphBuilder(opset=17)
    g.node("ReduceSum", [g.bn(g.gemm(g.input("x", ["N", 8]), 8, 8, name="fc"), 8)], ["y"], keepdims=0)
    g.output("y", [])
    return g.build()


def float16_model() -> onnx.ModelProto:
    """conv_bn_model in float16 (weights, activations, input and output)."""
    from onnx import numpy_helper as nh

    model = conv_bn_model()
    for t in model.graph.initializer:
        t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model


def outer_scope_weight_model() -> onnx.ModelProto:
    """A main-graph Conv weight also read, from the outer scope, by a Conv inside an If branch."""
    g = GraphBuilder(opset=17)
    w = g.weight("shared.w", (8, 8, 3, 3))
    conv = g.node("Conv", [g.input("x", ["N", 8, 8, 8]), w], name="main_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.node("Identity", [g.node("Relu", [g.bn(conv, 8)])], ["feat"])
    then = helper.make_graph([helper.make_node("Conv", ["feat", "shared.w"], ["then_out"], name="branch_conv",
                                               kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", 8, 8, 8])])
    other = helper.make_graph([helper.make_node("Identity", ["feat"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", 8, 8, 8])])
    cond = g.node("Greater", [g.node("ReduceMean", ["feat"], keepdims=0), g.const("low", np.float32(-1e9))])
    classifier_head(g, g.node("If", [cond], ["if_out"], name="branch", then_branch=then, else_branch=other), 8)
    return g.build()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`graph-opt ARGV...` in this process: (exit code, stdout, stderr)."""
    from graph_opt.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- inputs as real exports have them (tests/core/test_data.py, test_cli.py) ----

def scalar_input_model() -> onnx.ModelProto:
    """Gemm-BN on x[N, 8], scaled by a 0-d float input (a gain or a sample rate)."""
    g = GraphBuilder(opset=17)
    y = g.bn(g.gemm(g.input("x", ["N", 8]), 8, 8, name="fc"), 8)
    g.node("Mul", [y, g.input("gain", [])], ["y"])
    g.output("y", ["N", 8])
    return g.build()


def fixed_batch_model(batch: int = 2) -> onnx.ModelProto:
    """conv_bn_model whose batch is fixed at `batch` (x[2, 3, 8, 8]): every run takes exactly 2 samples."""
    g = GraphBuilder(opset=17)
    x = g.input("x", [batch, 3, 8, 8])
    g.node("Relu", [g.bn(g.conv(x, 3, 8, 3, name="c"), 8)], ["y"])
    g.output("y", [batch, 8, 8, 8])
    return g.build()


def state_model() -> onnx.ModelProto:
    """A VAD-style step: x[batch, 16] and a state[2, batch, 8] whose batch is on axis 1, plus a 0-d
    int64 sample rate; out = Gemm-BN(x) + the state's two layers, new state = the state · sr/16000."""
    g = GraphBuilder(opset=17)
    x = g.input("x", ["batch", 16])
    state = g.input("state", [2, "batch", 8])
    sr = g.input("sr", [], np.int64)
    h = g.bn(g.gemm(x, 16, 8, name="fc"), 8)
    s = g.node("ReduceSum", [state, g.const("axis0", np.array([0], np.int64))], keepdims=0)
    g.node("Add", [h, s], ["out"])
    scale = g.node("Div", [g.node("Cast", [sr], to=TensorProto.FLOAT), g.const("rate", np.float32(16000))])
    g.node("Mul", [state, scale], ["new_state"])
    g.output("out", ["batch", 8])
    g.output("new_state", [2, "batch", 8])
    return g.build()


def embedding_model(rows: int = 7, through: bool = True) -> onnx.ModelProto:
    """Token ids[N, seq] (int64) → Gather from a [rows, 8] table (through Cast and Unsqueeze/Reshape
    when `through`), with an attention mask and token type ids; then Gemm-BN on the mean embedding."""
    g = GraphBuilder(opset=17)
    ids = g.input("input_ids", ["N", "seq"], np.int64)
    mask = g.input("attention_mask", ["N", "seq"], np.int64)
    types = g.input("token_type_ids", ["N", "seq"], np.int64)
    idx = ids
    if through:
        idx = g.node("Cast", [g.node("Unsqueeze", [ids, g.const("ax", np.array([2], np.int64))])], to=TensorProto.INT32)
        idx = g.node("Reshape", [idx, g.const("flat", np.array([0, -1], np.int64))])
    emb = g.node("Gather", [g.weight("table", (rows, 8)), idx], name="embed", axis=0)
    emb = g.node("Add", [emb, g.node("Gather", [g.weight("types", (2, 8)), types], axis=0)])
    m = g.node("Unsqueeze", [g.node("Cast", [mask], to=TensorProto.FLOAT), g.const("ax2", np.array([2], np.int64))])
    pooled = g.node("ReduceMean", [g.node("Mul", [emb, m])], axes=[1], keepdims=0)
    g.node("Relu", [g.bn(g.gemm(pooled, 8, 8, name="fc"), 8)], ["y"])
    g.output("y", ["N", 8])
    return g.build()
# ---- exporter-style graphs the `simplify` pass cleans up ----
def _unsqueezed(g: GraphBuilder, x: str) -> str:
    return g.node("Unsqueeze", [x, g.const(f"{x}_axes", np.array([0], np.int64))])


def tf_same_padding_model(seed: int = 0, hw: int = 16, constant_weights: bool = True) -> onnx.ModelProto:
    """A CNN as TensorFlow-style exporters write it: every conv pads "same" through a Shape → Gather →
    Cast → arithmetic → Pad chain computed at run time (the scalars unsqueezed before the Concat),
    convs without pads, ReLU6 as Clip, a max pool padded with -inf the same way, weights in Constant
    nodes (`constant_weights`), a Transpose pair and an Identity; input N×3×hw×hw (N dynamic)."""
    g = GraphBuilder(opset=13, seed=seed, name="tf_same")
    x = g.input("image", ["N", 3, hw, hw])
    layers = [(3, 16, 3, 2, 1), (16, 16, 3, 1, 16), (16, 24, 1, 1, 1), (24, 24, 5, 2, 24), (24, 32, 1, 1, 1)]
    for i, (cin, cout, k, stride, group) in enumerate(layers):
        pads = _same_pads_unsq(g, x, k, stride, f"l{i}")
        padded = g.node("Pad", [x, pads, g.const(f"l{i}_pv", np.float32(0))], mode="constant")
        w = g.weight(f"l{i}.w", (cout, cin // group, k, k))
        b = g.weight(f"l{i}.b", (cout,))
        conv = g.node("Conv", [padded, w, b], name=f"conv{i}", kernel_shape=[k, k], strides=[stride, stride], group=group)
        x = g.node("Clip", [conv, g.const(f"l{i}_lo", np.float32(0)), g.const(f"l{i}_hi", np.float32(6))])
        if i == 2:
            pads = _same_pads_unsq(g, x, 3, 2, "pool")
            padded = g.node("Pad", [x, pads, g.const("pool_pv", np.float32(-np.inf))], mode="constant")
            x = g.node("MaxPool", [padded], kernel_shape=[3, 3], strides=[1, 1])
    t = g.node("Transpose", [x], perm=[0, 2, 3, 1])
    x = g.node("Identity", [g.node("Transpose", [t], perm=[0, 3, 1, 2])])
    f = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    y = g.gemm(f, 32, 10, name="head")
    g.node("Identity", [y], ["logits"])
    g.output("logits", ["N", 10])
    model = g.build()
    if constant_weights:
        consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in model.graph.initializer]
        nodes = consts + list(model.graph.node)
        del model.graph.initializer[:]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.checker.check_model(model, full_check=True)
    return model


def _same_pads_unsq(g: GraphBuilder, x: str, k: int, stride: int, tag: str) -> str:
    """`_same_pads` with the per-axis scalars unsqueezed to 1-D (Concat needs rank 1)."""
    shape = g.node("Shape", [x], name=f"{tag}_shape")
    parts = {}
    for axis in (2, 3):
        size = g.node("Cast", [g.node("Gather", [shape, g.const(f"{tag}_ax{axis}", np.int64(axis))], axis=0)], to=TensorProto.FLOAT)
        out = g.node("Ceil", [g.node("Div", [size, g.const(f"{tag}_s{axis}", np.float32(stride))])])
        need = g.node("Sub", [g.node("Add", [g.node("Mul", [g.node("Sub", [out, g.const(f"{tag}_one{axis}", np.float32(1))]),
                                                            g.const(f"{tag}_st{axis}", np.float32(stride))]),
                                              g.const(f"{tag}_k{axis}", np.float32(k))]), size])
        total = g.node("Max", [need, g.const(f"{tag}_zero{axis}", np.float32(0))])
        before = g.node("Floor", [g.node("Div", [total, g.const(f"{tag}_two{axis}", np.float32(2))])])
        parts[axis] = (_unsqueezed(g, before), _unsqueezed(g, g.node("Sub", [total, before])))
    zeros = g.const(f"{tag}_z", np.zeros(2, np.float32))
    flat = g.node("Concat", [zeros, parts[2][0], parts[3][0], zeros, parts[2][1], parts[3][1]], axis=0)
    return g.node("Cast", [flat], to=TensorProto.INT64)


def decoder_model(d: int = 128, heads: int = 4, ff: int = 256, layers: int = 1, seq: int = 8, seed: int = 0
                  ) -> onnx.ModelProto:
    """LLaMA-like decoder blocks on a float input x [N, seq, d]: RMSNorm, causal attention
    (q/k/v/o MatMuls reading [d, d] weights), RMSNorm, SwiGLU MLP (gate/up [d, ff], down [ff, d]),
    residual adds; 7 weight MatMuls per block (q, k, v share their input, so do gate and up)."""
    g = GraphBuilder(opset=17, seed=seed)
    x = g.input("x", ["N", seq, d])
    dh = d // heads
    g.const("eps", np.float32(1e-5))
    g.const("heads_shape", np.array([0, seq, heads, dh], np.int64))
    g.const("model_shape", np.array([0, seq, d], np.int64))
    g.const("inv_sqrt_dh", np.float32(1.0 / np.sqrt(dh)))
    g.const("causal", np.triu(np.full((seq, seq), -1e4, np.float32), 1))

    def rms(t: str, name: str) -> str:
        ms = g.node("ReduceMean", [g.node("Mul", [t, t])], axes=[-1], keepdims=1)
        inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [ms, "eps"])])])
        return g.node("Mul", [g.node("Mul", [t, inv]), g.const(f"{name}.g", g.rng.uniform(0.8, 1.2, d).astype(np.float32))])

    def mm(t: str, k: int, n: int, name: str) -> str:
        return g.node("MatMul", [t, g.weight(f"{name}.w", (k, n), scale=1.0 / np.sqrt(k))], name=name)

    def split_heads(t: str) -> str:
        return g.node("Transpose", [g.node("Reshape", [t, "heads_shape"])], perm=[0, 2, 1, 3])

    for i in range(layers):
        h = rms(x, f"l{i}.ln1")
        q, k, v = (split_heads(mm(h, d, d, f"l{i}.{p}")) for p in ("q", "k", "v"))
        s = g.node("Add", [g.node("Mul", [g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])]),
                                          "inv_sqrt_dh"]), "causal"])
        a = g.node("MatMul", [g.node("Softmax", [s], axis=-1), v])
        a = g.node("Reshape", [g.node("Transpose", [a], perm=[0, 2, 1, 3]), "model_shape"])
        x = g.node("Add", [x, mm(a, d, d, f"l{i}.o")])
        h = rms(x, f"l{i}.ln2")
        gate, up = mm(h, d, ff, f"l{i}.gate"), mm(h, d, ff, f"l{i}.up")
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
        x = g.node("Add", [x, mm(act, ff, d, f"l{i}.down")])
    g.node("Identity", [x], ["y"])
    g.output("y", ["N", seq, d])
    return g.build()


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """Op types after onnxruntime's own optimizations (all levels), read back from the saved file."""
    import onnxruntime as ort

    path = tmp_path / "optimized.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(path)
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path)).graph.node]
