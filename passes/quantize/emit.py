"""Emission: the one step that writes a `QuantPlan` into the graph, and the pass's report of it.

Weights and biases become integer initializers (int4 and int2 packed two and four to a byte)
and a DequantizeLinear writing the weight's old name; the float initializer (or its Constant
node) is removed, so the file really shrinks. Each activation gets QuantizeLinear →
DequantizeLinear right after its producer: a tensor whose every reader is quantized
(``consumers=None``) keeps its name on the DequantizeLinear output, otherwise only the listed
readers are redirected to the new DequantizeLinear output. A shared-scale tensor reuses its
source's scale and zero-point initializers. The plan's opset must already be the model's.

``int4_format='matmulnbits'``: a weight-only MatMul whose 2-D int4 weight is blocked along K
(power-of-two blocks of at least 16) becomes one ``com.microsoft.MatMulNBits`` (onnxruntime's
int4 kernel) instead of DequantizeLinear → MatMul: ``Y = A · dequant(B)``, B as uint8
``[N, ⌈K/block⌉, block/2]`` (two codes per byte along K, the first in the low nibble, the last
block padded with the zero point), scales ``[N·⌈K/block⌉]`` row-major by N, attributes
``K, N, bits=4, block_size, accuracy_level``. Signed codes are stored offset by 8 (``u = q + 8``):
with no zero-point input onnxruntime's zero point is 8, so ``(u − 8)·s = q·s`` is exactly what the
DequantizeLinear form computes; a non-zero zero point goes into a packed uint8 zero-point input
(``z + 8``). ``accuracy_level`` `NBITS_ACCURACY_LEVEL` (4: A quantized to int8 per block inside
the kernel, products in int8 dot products): the level onnxruntime's own DequantizeLinear →
MatMul fusion writes, so both forms run the same kernel once loaded (level 0, float A, runs
several times slower on CPU; the int8 A adds well under a percent of relative error to a
layer's output, against int4's weight error of several percent). Anything else keeps the
DequantizeLinear form.
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


NBITS_DOMAIN = "com.microsoft"
NBITS_ACCURACY_LEVEL = 4  # what onnxruntime's DQ → MatMulNBits fusion writes (see the module docstring)


def nbits_block_ok(block: int | None) -> bool:
    """Block sizes MatMulNBits takes: a power of two, at least 16."""
    return block is not None and block >= 16 and block & (block - 1) == 0


def _nbits_candidates(ix: GraphIndex, plan: QuantPlan) -> dict[int, TensorQuant]:
    """node index → its weight's plan entry, for the MatMuls that become MatMulNBits."""
    label_idx = {label: i for i, label in enumerate(ix.labels)}
    out: dict[int, TensorQuant] = {}
    for d in plan.nodes:
        if d.action != "quantize" or d.op != "MatMul" or not d.weight or d.inputs:
            continue
        tq = plan.tensors.get(d.weight)
        if (tq is None or tq.dtype != "int4" or tq.axis != 0 or not nbits_block_ok(tq.block_size)
                or tq.codes is None or np.ndim(tq.codes) != 2):
            continue
        idx = label_idx.get(d.node)
        if idx is not None and list(ix.nodes[idx].input)[1:2] == [tq.tensor] and len(ix.readers(tq.tensor)) == 1:
            out[idx] = tq
    return out


def matmul_nbits(g: onnx.GraphProto, namer: Namer, node: onnx.NodeProto, tq: TensorQuant,
                 accuracy_level: int) -> onnx.NodeProto:
    """The MatMulNBits node (and its initializers in `g`) computing `node` (x @ W) with W's int4
    codes and block scales (see the module docstring for the layout)."""
    codes = np.asarray(tq.codes, dtype=np.int16)  # (K, N)
    k, n = codes.shape
    block = int(tq.block_size)
    k_blocks = -(-k // block)
    u = np.full((n, k_blocks * block), 8, np.int16)
    u[:, :k] = codes.T + 8
    packed = pack_int4(u.reshape(-1)).reshape(n, k_blocks, block // 2)
    base = tq.tensor
    b_name, s_name = namer(f"{base}_nbits"), namer(f"{base}_nbits_scales")
    g.initializer.append(numpy_helper.from_array(packed, b_name))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(tq.scale.T).reshape(-1).astype(np.float32), s_name))
    inputs = [node.input[0], b_name, s_name]
    zp = np.asarray(tq.zero_point, dtype=np.int16)
    if np.any(zp != 0):
        z_name = namer(f"{base}_nbits_zero_points")
        zu = np.full((n, k_blocks + k_blocks % 2), 8, np.int16)
        zu[:, :k_blocks] = zp.T + 8
        g.initializer.append(numpy_helper.from_array(pack_int4(zu.reshape(-1)), z_name))
        inputs.append(z_name)
    return helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name or namer(f"{base}_MatMulNBits"),
                            domain=NBITS_DOMAIN, K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)


def apply_plan(model: onnx.ModelProto, plan: QuantPlan, *, int4_format: str = "dq",
               accuracy_level: int = NBITS_ACCURACY_LEVEL) -> onnx.ModelProto:
    """Insert the plan's QuantizeLinear/DequantizeLinear nodes into a copy of `model`.

    Weights and biases: integer initializer + DequantizeLinear writing the weight's old name (the
    float initializer, or its Constant node, is removed). Activations: Q → DQ after the producer;
    a tensor with ``consumers=None`` keeps its name on the DQ output (the producer's output is
    renamed), otherwise only the listed nodes read the new DQ output. ``int4_format='matmulnbits'``:
    the eligible int4 MatMuls become MatMulNBits (module docstring).
    """
    if int4_format not in ("dq", "matmulnbits"):
        raise ValueError(f"int4_format must be 'dq' or 'matmulnbits', got {int4_format!r}")
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
    nbits = _nbits_candidates(ix, plan) if int4_format == "matmulnbits" else {}
    nbits_weights = {tq.tensor for tq in nbits.values()}
    if nbits and not any(imp.domain == NBITS_DOMAIN for imp in out.opset_import):
        out.opset_import.append(helper.make_opsetid(NBITS_DOMAIN, 1))
    for tq in plan.tensors.values():
        if tq.tensor in nbits_weights:
            continue
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
        if idx in nbits:
            node = matmul_nbits(g, namer, node, nbits[idx], accuracy_level)
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
