"""simplify's own rewrites, on what onnxscript's optimizer leaves (decide per node, then apply).

Each rewrite fires only when the intermediate tensor it removes has no other reader (no second
node, no graph output, no subgraph reading it from the outer scope); new weights get fresh names
and the old ones are never edited. All are exact up to float rounding of the folded products.

- **Duplicate initializers** of any size (in memory, not graph inputs or outputs) are merged into
  the first one; every reader, in subgraphs too unless a subgraph shadows the name, reads it.
- **Pad → Conv / AveragePool / MaxPool.** A constant-mode Pad with non-negative pads on spatial
  axes only, read by the pool's data input, is folded into its ``pads``: into a Conv when the pad
  value is 0; into an AveragePool when it is 0 (then ``count_include_pad=1``; skipped when the pool
  already pads without counting the pad, or has ``ceil_mode``); into a MaxPool when it is −inf or
  no larger than a proven lower bound of the input (a Relu/Sigmoid/Softplus/Abs/Exp output: 0; a
  Clip's min) and the pool has no Indices output. A pool's total pads must stay below its kernel;
  ``auto_pad`` targets are skipped. Skips: reflect/edge modes, pads or pad value computed at run
  time, Pad with ``axes``, negative pads (a crop), pads on the batch or channel axis.
- **MatMul + Add → Gemm.** MatMul of a 2-D input by a constant float matrix ``W`` (K×N) followed
  by Add of a constant scalar, row of N, or 1×N: one Gemm with that row as ``C``.
- **Slice of a Slice** on other (explicit, non-negative) axes, the inner one read by nothing else:
  one Slice; Slices left without readers are dropped with their parameters nothing else reads.
- **Constant Mul/Add after Conv or Gemm.** An operand that is one value per output channel (or a
  scalar), of the weight's float dtype: ``Mul(s)``: W·s, b·s; ``Add(t)``: b + t, a missing bias
  counts as 0 (Gemm: ``C' = β·C + t`` and β becomes 1; with ``transB`` the channel axis of W is 0).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx

from graph_opt.external_data import on_disk
from graph_opt.onnx_util import Namer, all_graphs, drop_unused_initializers, subgraphs
from graph_opt.pass_base import PassReport


def apply_rules(model: onnx.ModelProto, report: PassReport, *, pads: bool, affine: bool) -> onnx.ModelProto:
    """Apply the rewrites above to `model` (edited in place and returned), repeated until none
    fires; `pads` and `affine` turn the Pad and the Mul/Add/MatMul foldings on."""
    return _Rewriter(model, report, pads=pads, affine=affine).run()


_SPATIAL_POOLS = {"Conv", "AveragePool", "MaxPool"}
_NONNEGATIVE = {"Relu", "Sigmoid", "Softplus", "Abs", "Exp"}


class _Rewriter:
    """Merges duplicate initializers, folds Pad into pools/convs and constant Mul/Add into Conv/Gemm."""

    def __init__(self, model: onnx.ModelProto, report: PassReport, *, pads: bool, affine: bool):
        self.model = model
        self.report = report
        self.pads = pads
        self.affine = affine
        self.inits = {t.name: t for t in model.graph.initializer}
        self._fresh = Namer({n for g in all_graphs(model.graph) for n in _names(g)})

    def run(self) -> onnx.ModelProto:
        self._merge_duplicates()
        graph = self.model.graph
        changed = True
        while changed:
            changed = False
            for node in list(graph.node):
                if self.pads and node.op_type == "Pad" and node.domain in ("", "ai.onnx"):
                    changed |= self._fold_pad(node)
                elif self.affine and node.op_type in ("Conv", "Gemm") and node.domain in ("", "ai.onnx"):
                    changed |= self._fold_affine(node)
                elif self.affine and node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                    changed |= self._matmul_add_to_gemm(node)
                elif node.op_type == "Slice" and node.domain in ("", "ai.onnx"):
                    changed |= self._merge_slices(node)
        self._drop_dead_slices()
        drop_unused_initializers(self.model)  # what a folding replaced (a Mul's scale, a Pad's pads)
        return self.model

    # -- helpers
    def _consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if name in n.input]

    def _read_elsewhere(self, name: str) -> bool:
        """Read by a graph output or a subgraph (outer-scope reference)."""
        if any(o.name == name for o in self.model.graph.output):
            return True
        return any(name in _names(sub) for node in self.model.graph.node for sub in subgraphs(node))

    def _const(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        if tensor is None or on_disk(tensor) or any(i.name == name for i in self.model.graph.input):
            return None
        return onnx.numpy_helper.to_array(tensor)

    def _add_init(self, base: str, value: np.ndarray) -> str:
        name = self._fresh(base)
        tensor = onnx.numpy_helper.from_array(value, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def _producer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.model.graph.node if name in n.output), None)

    def _remove(self, node: onnx.NodeProto) -> None:
        self.model.graph.node.remove(node)

    # -- duplicate initializers
    def _merge_duplicates(self) -> None:
        graph = self.model.graph
        inputs = {v.name for v in graph.input}
        outputs = {v.name for v in graph.output}
        first: dict[tuple, str] = {}
        rename: dict[str, str] = {}
        for tensor in graph.initializer:
            if on_disk(tensor) or tensor.name in inputs or tensor.name in outputs or not tensor.HasField("raw_data"):
                continue
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
            if key in first and self.inits[first[key]].raw_data == tensor.raw_data:
                rename[tensor.name] = first[key]
            else:
                first.setdefault(key, tensor.name)
        if not rename:
            return
        for g in all_graphs(graph):
            shadowed = {t.name for t in g.initializer} | {v.name for v in g.input} if g is not graph else set()
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name in rename and name not in shadowed:
                        node.input[i] = rename[name]
        kept = [t for t in graph.initializer if t.name not in rename]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for name in rename:
            del self.inits[name]
        for name, into in rename.items():
            self.report.rewrite(name, action="merged duplicate initializer", into=into)

    # -- Pad → Conv / AveragePool / MaxPool
    def _fold_pad(self, pad: onnx.NodeProto) -> bool:
        label = pad.name or pad.output[0]
        consumers = self._consumers(pad.output[0])
        if len(consumers) != 1 or self._read_elsewhere(pad.output[0]):
            return False
        target = consumers[0]
        if target.op_type not in _SPATIAL_POOLS or target.domain not in ("", "ai.onnx") or target.input[0] != pad.output[0]:
            return False
        reason, pads, value = self._pad_amounts(pad)
        new_pads = None
        if not reason:
            reason, new_pads = self._merged_pads(pad, target, pads, value)
        if new_pads is None:
            if reason:
                self.report.skip(label, reason)
            return False
        kind = target.op_type
        for a in list(target.attribute):
            if a.name in ("pads", "auto_pad") or (kind == "AveragePool" and a.name == "count_include_pad"):
                target.attribute.remove(a)
        target.attribute.append(onnx.helper.make_attribute("pads", new_pads))
        if kind == "AveragePool":
            target.attribute.append(onnx.helper.make_attribute("count_include_pad", 1))
        target.input[0] = pad.input[0]
        self._remove(pad)
        self.report.rewrite(label, action=f"Pad folded into {kind}", into=target.name or target.output[0], pads=new_pads)
        return True

    def _merged_pads(self, pad: onnx.NodeProto, target: onnx.NodeProto, pads: list[int],
                     value: float) -> tuple[str, list[int] | None]:
        """The `target`'s pads with the Pad's `pads` (of `value`) added, or why they cannot fold
        (an empty reason: a target this rule does not handle, no skip to report)."""
        rank = len(pads) // 2
        if any(pads[a] or pads[a + rank] for a in (0, 1)):
            return "pads the batch or channel axis", None
        attrs = {a.name: a for a in target.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            return f"{target.op_type} uses auto_pad", None
        spatial = rank - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
        if len(old) != 2 * spatial:
            return "", None
        kind = target.op_type
        if kind == "Conv" and value != 0:
            return f"pad value {value:g} before a Conv (only zero padding folds into it)", None
        if kind == "AveragePool":
            if value != 0:
                return f"pad value {value:g} before an AveragePool (only zero padding folds)", None
            if "ceil_mode" in attrs and attrs["ceil_mode"].i:
                return "AveragePool with ceil_mode: its edge windows would count the pad differently", None
            counts = "count_include_pad" in attrs and attrs["count_include_pad"].i
            if any(old) and not counts:
                return ("AveragePool already pads without counting the pad: one count rule cannot express both",
                        None)
        if kind == "MaxPool":
            if len(target.output) > 1 and target.output[1]:
                return "MaxPool's Indices output would index the padded tensor", None
            floor = self._lower_bound(pad.input[0])
            if not (value == -np.inf or (floor is not None and value <= floor)):
                bound = "no lower bound known" if floor is None else f"its lower bound is {floor:g}"
                return f"pad value {value:g} before a MaxPool (-inf pads fold; {bound} for the input)", None
        new_pads = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
        if kind != "Conv" and (len(kernel) != spatial or any(p >= k for p, k in zip(new_pads, kernel * 2))):
            return f"{kind} padded {new_pads} with kernel {kernel}: a pool's pads must stay below its kernel", None
        return "", new_pads

    def _pad_amounts(self, pad: onnx.NodeProto) -> tuple[str, list[int], float]:
        attrs = {a.name: a for a in pad.attribute}
        mode = attrs["mode"].s.decode() if "mode" in attrs else "constant"
        if mode != "constant":
            return f"Pad mode {mode!r} (only constant padding folds)", [], 0.0
        if "pads" in attrs:  # opset < 11
            pads = list(attrs["pads"].ints)
            value = float(attrs["value"].f) if "value" in attrs else 0.0
        else:
            pads_arr = self._const(pad.input[1]) if len(pad.input) > 1 and pad.input[1] else None
            if pads_arr is None:
                return "pads computed at run time", [], 0.0
            pads = [int(p) for p in pads_arr.reshape(-1)]
            value = 0.0
            if len(pad.input) > 2 and pad.input[2]:
                v = self._const(pad.input[2])
                if v is None or v.size != 1:
                    return "pad value computed at run time", [], 0.0
                value = float(v.reshape(-1)[0])
            if len(pad.input) > 3 and pad.input[3]:
                return "Pad with axes", [], 0.0
        if any(p < 0 for p in pads):
            return "negative pads (a crop)", [], 0.0
        return "", pads, value

    def _lower_bound(self, name: str) -> float | None:
        producer = self._producer(name)
        if producer is None:
            return None
        if producer.op_type in _NONNEGATIVE:
            return 0.0
        if producer.op_type == "Clip":
            attrs = {a.name: a for a in producer.attribute}
            if "min" in attrs:
                return float(attrs["min"].f)
            if len(producer.input) > 1 and producer.input[1]:
                low = self._const(producer.input[1])
                return float(low.reshape(-1)[0]) if low is not None and low.size == 1 else None
        return None

    # -- Slice of a Slice on other axes: one Slice
    def _slice_params(self, node: onnx.NodeProto) -> list[np.ndarray] | None:
        if len(node.input) < 3 or len(node.input) < 4 or not node.input[3]:
            return None  # without explicit axes the slice covers leading axes: left to the engine
        params = []
        for i in range(1, 5):
            if i < len(node.input) and node.input[i]:
                value = self._const(node.input[i])
                if value is None or value.ndim != 1:
                    return None
                params.append(value.astype(np.int64))
            else:
                params.append(np.ones(len(params[0]), np.int64))
        return params

    def _merge_slices(self, outer: onnx.NodeProto) -> bool:
        inner = self._producer(outer.input[0])
        if inner is None or inner.op_type != "Slice" or inner.domain not in ("", "ai.onnx") or self._read_elsewhere(inner.output[0]):
            return False
        a, b = self._slice_params(inner), self._slice_params(outer)
        if a is None or b is None or (a[2] < 0).any() or (b[2] < 0).any() or set(a[2].tolist()) & set(b[2].tolist()):
            return False
        label = outer.name or outer.output[0]
        merged = [np.concatenate([x, y]) for x, y in zip(a, b)]
        names = [self._add_init(f"{label}_{part}", value) for part, value in zip(("starts", "ends", "axes", "steps"), merged)]
        del outer.input[:]
        outer.input.extend([inner.input[0], *names])
        self.report.rewrite(label, action="Slice of a Slice merged into one", inner=inner.name or inner.output[0])
        return True

    def _drop_dead_slices(self) -> None:
        graph = self.model.graph
        for node in list(graph.node):
            if node.op_type == "Slice" and not self._consumers(node.output[0]) and not self._read_elsewhere(node.output[0]):
                graph.node.remove(node)
                used = {n for g in all_graphs(graph) for x in g.node for n in x.input}
                for name in node.input[1:]:
                    if name and name not in used and name in self.inits:
                        graph.initializer.remove(self.inits.pop(name))

    # -- MatMul(2-D, constant) → Add(constant per column) becomes one Gemm
    def _rank(self, name: str) -> int | None:
        for v in (*self.model.graph.value_info, *self.model.graph.input, *self.model.graph.output):
            if v.name == name and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                return len(v.type.tensor_type.shape.dim)
        return None

    def _matmul_add_to_gemm(self, node: onnx.NodeProto) -> bool:
        out = node.output[0]
        consumers = self._consumers(out)
        if len(consumers) != 1 or self._read_elsewhere(out) or consumers[0].op_type != "Add":
            return False
        add = consumers[0]
        weight = self._const(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f" or self._rank(node.input[0]) != 2:
            return False
        other = add.input[1] if add.input[0] == out else add.input[0]
        c = self._const(other)
        if c is None or c.dtype != weight.dtype or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            return False
        if c.size not in (1, weight.shape[1]):
            return False
        bias = self._add_init(f"{other}_gemm_bias", np.broadcast_to(c.reshape(-1), (weight.shape[1],)).astype(weight.dtype))
        label = node.name or out
        node.op_type = "Gemm"
        del node.input[2:]
        node.input.append(bias)
        node.output[0] = add.output[0]
        self._remove(add)
        self.report.rewrite(label, action="MatMul and constant Add fused into Gemm", node_removed=add.name or add.output[0])
        return True

    # -- Conv/Gemm → Mul/Add by a constant
    def _fold_affine(self, node: onnx.NodeProto) -> bool:
        out = node.output[0]
        consumers = self._consumers(out)
        if len(consumers) != 1 or self._read_elsewhere(out):
            return False
        op = consumers[0]
        if op.op_type not in ("Mul", "Add") or op.domain not in ("", "ai.onnx") or len(op.input) != 2:
            return False
        other = op.input[1] if op.input[0] == out else op.input[0]
        if other == out:
            return False
        c = self._const(other)
        weight = self._const(node.input[1])
        if c is None or weight is None or c.dtype != weight.dtype or weight.dtype.kind != "f":
            return False
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = self._const(bias_name) if bias_name else None
        if bias_name and bias is None:
            return False
        folded = _affine_folded(node, op.op_type, c, weight, bias)
        if folded is None:
            return False
        new_w, new_b = folded
        if node.op_type == "Gemm" and op.op_type == "Add":  # β·C + t is the new C: β is 1 now
            for a in list(node.attribute):
                if a.name == "beta":
                    node.attribute.remove(a)
        label = node.name or out
        if new_w is not weight:
            node.input[1] = self._add_init(f"{node.input[1]}_scaled", new_w.astype(weight.dtype))
        if new_b is not None:
            b_name = self._add_init(f"{bias_name or label}_{'scaled' if op.op_type == 'Mul' else 'shifted'}",
                                    np.asarray(new_b, weight.dtype))
            if len(node.input) > 2:
                node.input[2] = b_name
            else:
                node.input.append(b_name)
        result = op.output[0]
        node.output[0] = result
        self._remove(op)
        self.report.rewrite(label, action=f"constant {op.op_type} folded into {node.op_type}", node_removed=op.name or result)
        return True


def _affine_folded(node: onnx.NodeProto, kind: str, c: np.ndarray, weight: np.ndarray,
                   bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight, bias) of Conv/Gemm `node` with a following constant Mul or Add (`kind`) by `c`
    folded in, or None when `c` is not one value per output channel. The weight comes back as the
    same object when unchanged; a missing bias stays missing under Mul."""
    if node.op_type == "Conv":
        per = _per_channel(c, weight.shape[0], rank=weight.ndim)
        if per is None:
            return None
        if kind == "Mul":
            return weight * per.reshape((-1,) + (1,) * (weight.ndim - 1)), (bias * per if bias is not None else None)
        return weight, (bias if bias is not None else np.zeros(weight.shape[0], weight.dtype)) + per
    attrs = {a.name: a for a in node.attribute}
    trans_b = attrs["transB"].i if "transB" in attrs else 0
    n = weight.shape[0] if trans_b else weight.shape[1]
    per = _per_channel(c, n, rank=2)
    if per is None:
        return None
    if kind == "Mul":
        return weight * (per[:, None] if trans_b else per[None, :]), (bias * per if bias is not None else None)
    beta = float(attrs["beta"].f) if "beta" in attrs else 1.0
    new_b = (beta * bias if bias is not None else np.zeros(n, weight.dtype)) + per
    return weight, new_b.astype(weight.dtype)


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`c` as one value per output channel when it broadcasts that way against an output of `rank`
    dims whose channel axis is 1 (Conv: N×C×…; Gemm: M×N)."""
    if c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).copy() if c.size else None


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a graph reads or defines (for fresh names and outer-scope reads)."""
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs(node):
            names |= _names(sub)
    names.discard("")
    return names


