"""Emission: the one step that writes a `QuantPlan` into the graph, and the pass's report of it.

Weights and biases become integer initializers (int4 and int2 packed two and four to a byte)
and a DequantizeLinear writing the weight's old name; the float initializer (or its Constant
node) is removed, so the file really shrinks. Each activation gets QuantizeLinear →
DequantizeLinear right after its producer: a tensor whose every reader is quantized
(``consumers=None``) keeps its name on the DequantizeLinear output, otherwise only the listed
readers are redirected to the new DequantizeLinear output. A shared-scale tensor reuses its
source's scale and zero-point initializers. The plan's opset must already be the model's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.kernels.quant import pack_int2, pack_int4
from graph_opt.model_io import copy_model
from graph_opt.pass_base import PassReport
from graph_opt.onnx_util import Namer
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._qplan import QuantPlan, TensorQuant
from graph_opt.passes.quantize.layers import opset_of
from graph_opt.stats import serialized_bytes


_ONNX_DTYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4,
                "uint4": TensorProto.UINT4, "int2": TensorProto.INT2, "uint2": TensorProto.UINT2,
                "int32": TensorProto.INT32}


def _int_tensor(name: str, dtype: str, codes: np.ndarray) -> TensorProto:
    codes = np.asarray(codes)
    if dtype in ("int4", "uint4"):
        return helper.make_tensor(name, _ONNX_DTYPES[dtype], codes.shape, pack_int4(codes).tobytes(), raw=True)
    if dtype in ("int2", "uint2"):
        return helper.make_tensor(name, _ONNX_DTYPES[dtype], codes.shape, pack_int2(codes).tobytes(), raw=True)
    np_dtype = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}[dtype]
    return numpy_helper.from_array(codes.astype(np_dtype), name)


def param_inits(g: onnx.GraphProto, namer: Namer, base: str, tq: TensorQuant) -> tuple[str, str]:
    """Scale and zero-point initializers of `tq` ('' zero point for int32 biases, whose zero point is
    0 by definition; onnxruntime's QGemm fusion needs the weight's zero point present, even at 0)."""
    s = namer(f"{base}_scale")
    g.initializer.append(numpy_helper.from_array(tq.scale.astype(np.float32), s))
    if tq.role == "bias":
        return s, ""
    z = namer(f"{base}_zero_point")
    g.initializer.append(_int_tensor(z, tq.dtype, tq.zero_point))
    return s, z


def dq_weight(g: onnx.GraphProto, namer: Namer, tq: TensorQuant, out: str) -> str:
    """Add the integer initializer of a weight/bias and its DequantizeLinear writing `out`."""
    q = namer(f"{tq.tensor}_quantized")
    g.initializer.append(_int_tensor(q, tq.dtype, tq.codes))
    s, z = param_inits(g, namer, tq.tensor, tq)
    attrs = {}
    if tq.axis is not None:
        attrs["axis"] = tq.axis
    if tq.block_size is not None:
        attrs["block_size"] = tq.block_size
    g.node.append(helper.make_node("DequantizeLinear", [q, s] + ([z] if z else []), [out],
                                   name=namer(f"{tq.tensor}_DequantizeLinear"), **attrs))
    return out


def apply_plan(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Insert the plan's QuantizeLinear/DequantizeLinear nodes into a copy of `model`.

    Weights and biases: integer initializer + DequantizeLinear writing the weight's old name (the
    float initializer, or its Constant node, is removed). Activations: Q → DQ after the producer;
    a tensor with ``consumers=None`` keeps its name on the DQ output (the producer's output is
    renamed), otherwise only the listed nodes read the new DQ output.
    """
    if opset_of(model) < plan.opset:
        raise ValueError(f"the plan needs opset {plan.opset}, the model has {opset_of(model)}")
    ix = GraphIndex(model)
    out = copy_model(model)
    g = out.graph
    namer = Namer(g)
    label_idx = {label: i for i, label in enumerate(ix.labels)}
    old_nodes = list(g.node)
    del g.node[:]

    # Weights and biases: DequantizeLinear nodes first (they read initializers only).
    replaced = {t.tensor for t in plan.tensors.values() if t.role in ("weight", "bias")}
    drop_nodes = {ix.producer[t] for t in replaced if t in ix.producer}
    keep_inits = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    kept_inputs = [i for i in g.input if i.name not in replaced]
    del g.input[:]
    g.input.extend(kept_inputs)
    for tq in plan.tensors.values():
        if tq.role in ("weight", "bias"):
            if tq.codes is None:
                raise ValueError(f"plan entry {tq.tensor!r} has no codes (plans read from JSON cannot be applied)")
            dq_weight(g, namer, tq, tq.tensor)

    # Activations.
    param_names: dict[str, tuple[str, str]] = {}
    rename: dict[str, str] = {}              # producer output -> new float name
    redirect: dict[tuple[int, str], str] = {}  # (reader node, tensor) -> DQ output
    after: dict[int, list[onnx.NodeProto]] = {}
    acts = [t for t in plan.tensors.values() if t.role == "activation"]
    for tq in sorted(acts, key=lambda q: q.shared_with is not None):
        t = tq.tensor
        if tq.shared_with is not None and tq.shared_with in param_names:
            s, z = param_names[tq.shared_with]
        else:
            s, z = param_inits(g, namer, t, tq)
        param_names[t] = (s, z)
        q = namer(f"{t}_quantized")
        if tq.consumers is None:
            src = namer(f"{t}_float")
            rename[t] = src
            dq_out = t
        else:
            src = t
            dq_out = namer(f"{t}_dequantized")
            for label in tq.consumers:
                redirect[(label_idx[label], t)] = dq_out
        nodes = [helper.make_node("QuantizeLinear", [src, s, z], [q], name=namer(f"{t}_QuantizeLinear")),
                 helper.make_node("DequantizeLinear", [q, s, z], [dq_out], name=namer(f"{t}_DequantizeLinear"))]
        after.setdefault(ix.producer.get(t, -1), []).extend(nodes)
    g.node.extend(after.get(-1, []))
    for idx, node in enumerate(old_nodes):
        if idx in drop_nodes:
            continue
        for slot, name in enumerate(node.input):
            if (idx, name) in redirect:
                node.input[slot] = redirect[(idx, name)]
        for slot, name in enumerate(node.output):
            if name in rename:
                node.output[slot] = rename[name]
        g.node.append(node)
        g.node.extend(after.get(idx, []))
    return out


def report_plan(plan: QuantPlan, report: PassReport, before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """One rewrite entry per quantized node (weight scheme, input, output, SNR), the plan's notes,
    the bytes before and after, and the plan itself as compact JSON."""
    for d in plan.nodes:
        if d.action != "quantize":
            continue
        details: dict[str, object] = {"op": d.op}
        if d.weight:
            w = plan.tensors[d.weight]
            details["weight"] = {"dtype": w.dtype, "scheme": w.scheme, "granularity": w.granularity,
                                 **({"axis": w.axis} if w.axis is not None else {}),
                                 **({"block_size": w.block_size} if w.block_size else {})}
            if d.bias:
                details["bias"] = "int32"
        details["input"] = d.inputs or "float"
        details["output"] = d.output or "float"
        if d.absorbed:
            details["absorbed"] = d.absorbed
        if d.sensitivity:
            details["snr_db"] = d.sensitivity.get("snr_db")
        if d.reason:
            details["note"] = d.reason
        report.rewrite(d.node, **details)
    for note in plan.notes:
        report.note(note)
    before_bytes, after_bytes = serialized_bytes(before), serialized_bytes(after)
    report.note(f"model bytes {before_bytes} → {after_bytes} ({before_bytes / max(after_bytes, 1):.2f}× smaller)")
    report.note("plan: " + plan.to_json(compact=True))
