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
