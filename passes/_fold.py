"""Folding BatchNormalization into the Conv/Gemm before it: matching and rewriting, shared by the
passes that fold (`fold_batchnorm`, and `quantize` before it quantizes activations).

BatchNormalization (inference) computes y = γ·(x − μ)/√(σ² + ε) + β per channel. With
s = γ/√(σ² + ε) the producer's output channel c is scaled and shifted:
W'[c] = s[c]·W[c] and b'[c] = s[c]·(b[c] − μ[c]) + β[c]. Exact up to float rounding.

`match_fold` decides one BatchNormalization (pure: the fold, or the reason there is none);
`find_folds` decides every one of the main graph; `apply_folds` writes a copy of the model with
the folds applied. See `passes/fold_batchnorm.py` for the layouts and every skip reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_opt.external_data import disk_tensor, on_disk
from graph_opt.model_io import copy_model
from graph_opt.onnx_util import Namer
from graph_opt.passes._graph import GraphIndex

_DEFAULT = ("", "ai.onnx")


@dataclass(frozen=True)
class Fold:
    """One BatchNormalization to fold into its producer, with the folded per-channel scale and bias."""

    bn: int              # node index of the BatchNormalization
    producer: int        # node index of its Conv/Gemm
    weight: str          # the constant holding the producer's weight (past Identity nodes)
    scale: np.ndarray    # per output channel, float64
    bias: np.ndarray     # the folded bias b' (float64)
    axis: int            # the weight's output-channel axis

    def folded_weight(self, w: np.ndarray) -> np.ndarray:
        shape = [1] * w.ndim
        shape[self.axis] = -1
        return (w.astype(np.float64) * self.scale.reshape(shape)).astype(w.dtype)


def find_folds(ix: GraphIndex) -> tuple[list[Fold], list[tuple[str, str]]]:
    """Every BatchNormalization of the main graph, in graph order: the folds, and the
    (label, reason) of each one that cannot be folded."""
    folds: list[Fold] = []
    skipped: list[tuple[str, str]] = []
    for idx, node in enumerate(ix.nodes):
        if node.op_type != "BatchNormalization" or node.domain not in _DEFAULT:
            continue
        match = match_fold(ix, idx)
        if isinstance(match, str):
            skipped.append((ix.labels[idx], match))
        else:
            folds.append(match)
    return folds, skipped


def _source(ix: GraphIndex, name: str) -> str:
    """`name`, or what an Identity chain producing it copies (torch ties equal BN parameters so)."""
    seen = set()
    while name in ix.producer and name not in seen:
        seen.add(name)
        node = ix.nodes[ix.producer[name]]
        if node.op_type != "Identity" or node.domain not in _DEFAULT or not node.input:
            break
        name = node.input[0]
    return name


def _constant(ix: GraphIndex, name: str) -> np.ndarray | None:
    return ix.const(_source(ix, name)) if name else None


def match_fold(ix: GraphIndex, idx: int) -> Fold | str:
    """The fold when it is valid, else the reason it is not."""
    bn = ix.nodes[idx]
    if any(a.name == "training_mode" and a.i for a in bn.attribute):
        return "BatchNormalization in training mode"
    if len([o for o in bn.output if o]) != 1 or not bn.output[0]:
        return "BatchNormalization with running-statistics outputs"
    params = [_constant(ix, t) for t in bn.input[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "BatchNormalization parameters are not constants"
    gamma, beta, mean, var = (p.astype(np.float64).ravel() for p in params)
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    x = bn.input[0]
    if x not in ix.producer:
        return "input is a graph input, not a layer output"
    p_idx = ix.producer[x]
    producer, label = ix.nodes[p_idx], ix.labels[p_idx]
    if producer.op_type not in ("Conv", "Gemm") or producer.domain not in _DEFAULT:
        return f"producer is {producer.op_type}, not Conv or Gemm"
    if ix.sole_reader(x) != idx:
        return f"output of {label} is also read elsewhere"
    w_name = _source(ix, producer.input[1]) if len(producer.input) > 1 else ""
    w_shape = _shape_of(ix, w_name)
    if w_shape is None:
        return f"weight of {label} is not a constant"
    if ix.sole_reader(producer.input[1]) is None:
        return f"weight of {label} is shared with another node"
    has_bias = len(producer.input) > 2 and producer.input[2] != ""
    b = _constant(ix, producer.input[2]) if has_bias else None
    if has_bias and (b is None or ix.sole_reader(producer.input[2]) is None):
        return f"bias of {label} is not a private constant"
    attrs = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
    gemm = producer.op_type == "Gemm"
    if gemm and len(w_shape) != 2:
        return "Gemm weight is not 2-D"
    if not w_shape:
        return f"weight of {label} is a scalar"
    axis = 1 if gemm and not attrs.get("transB", 0) else 0
    channels = w_shape[axis]
    if gamma.size != channels or any(p.size != channels for p in (beta, mean, var)):
        return f"BatchNormalization has {gamma.size} channels, {label} produces {channels}"
    if b is not None:
        if gemm:
            if b.size not in (1, channels) or (b.ndim == 2 and b.shape[0] != 1):
                return "Gemm bias C is not per-column"
            b = np.broadcast_to(b.reshape(-1), (channels,)) * float(attrs.get("beta", 1.0))
        b = b.astype(np.float64).reshape(-1)
    else:
        b = np.zeros(channels)
    scale = gamma / np.sqrt(var + eps)
    return Fold(idx, p_idx, w_name, scale, b * scale + beta - mean * scale, axis)


def _shape_of(ix: GraphIndex, name: str) -> tuple[int, ...] | None:
    """The shape of constant `name` (an initializer's without reading its bytes), else None."""
    if name in ix.inits:
        return tuple(ix.inits[name].dims)
    value = ix.const(name)
    return None if value is None else value.shape


def apply_folds(model: onnx.ModelProto, ix: GraphIndex, folds: list[Fold]) -> onnx.ModelProto:
    """A copy of `model` with each fold applied: the producer takes the new weight and bias and
    writes the BatchNormalization's output; the BN goes, and so do the weights, Constant and
    Identity nodes that only it or the old weights read."""
    g = model.graph
    namer = Namer(g)
    to_disk = any(on_disk(t) for t in g.initializer)
    reads = Counter(name for name, readers in ix.consumers.items() for _ in readers)
    dropped_nodes = {f.bn for f in folds}
    pending: list[tuple[str, Fold]] = []
    rewired: dict[int, onnx.NodeProto] = {}
    orphans: list[str] = []
    for f in folds:
        bn, old = ix.nodes[f.bn], ix.nodes[f.producer]
        base = ix.labels[f.producer]
        names = [namer(f"{base}.weight_bnfold"), namer(f"{base}.bias_bnfold")]
        pending.append((names[0], f))
        node = onnx.NodeProto()
        node.CopyFrom(old)
        for name in [*old.input[1:3], *bn.input]:
            if name:
                reads[name] -= 1
                orphans.append(name)
        del node.input[1:]
        node.input.extend(names)
        node.output[0] = bn.output[0]
        if node.op_type == "Gemm":
            for a in node.attribute:
                if a.name == "beta":
                    a.f = 1.0
        rewired[f.producer] = node
    # Whatever only the folded nodes read goes too: initializers, and Constant/Identity chains.
    outputs = {o.name for o in g.output}
    dropped_inits: set[str] = set()
    while orphans:
        name = orphans.pop()
        if reads[name] > 0 or name in outputs:
            continue
        if name in ix.inits:
            dropped_inits.add(name)
        elif name in ix.producer and ix.producer[name] not in dropped_nodes:
            idx = ix.producer[name]
            node = ix.nodes[idx]
            if node.op_type in ("Constant", "Identity") and node.domain in _DEFAULT and all(
                    reads[o] <= 0 and o not in outputs for o in node.output):
                dropped_nodes.add(idx)
                for i in node.input:
                    reads[i] -= 1
                    orphans.append(i)
    out = copy_model(model, without=dropped_inits, nodes=False)
    out.graph.node.extend(rewired.get(idx, node) for idx, node in enumerate(ix.nodes) if idx not in dropped_nodes)
    added = []
    for w_name, f in pending:  # one layer's arrays at a time, straight into the copy
        w = ix.const(f.weight, cache=False)
        b_name = rewired[f.producer].input[2]
        for name, value in ((w_name, f.folded_weight(w)), (b_name, f.bias.astype(w.dtype))):
            added.append(out.graph.initializer.add())
            added[-1].CopyFrom(disk_tensor(value, name) if to_disk and value.nbytes >= 1024
                               else numpy_helper.from_array(value, name))
        del w
    gone = dropped_inits | {ix.nodes[f.bn].input[0] for f in folds}
    for field in (out.graph.input, out.graph.value_info):
        keep = [v for v in field if v.name not in gone]
        if len(keep) != len(field):
            del field[:]
            field.extend(keep)
    if model.ir_version < 4:  # initializers must be listed as graph inputs there
        out.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in added)
    return out
