"""simplify: fold constants and shape arithmetic, merge duplicates, fold Pad and constant Mul/Add into convs.

Exported graphs compute at run time what is fixed once the input shapes are: TensorFlow-style
"same" padding (Shape → Gather → Cast → arithmetic → Concat → Pad before every conv), weights in
Constant nodes, Identity and Cast no-ops, Transpose/Reshape pairs. Shape inference stops at the
first computed Pad, so every shape-dependent pass (MACs, low-rank, quantize) is blind after it::

    x ─ Shape ─ Gather ─ Cast ─ Div ─ Ceil ─ … ─ Concat ─ Cast ┐
    x ──────────────────────────────────────────────────── Pad ─ Conv(W, b) ─ Mul(s) ─ Add(t)
    after:  x ─ Conv(W·s, b·s + t, pads=…)

What it does, in order:

1. **Opset.** A model stamped with an opset onnxruntime does not run (below 7, or one whose ops
   it dropped) is converted by onnx's version converter (to opset 13 or the model's own when
   higher) and the conversion is verified: on seeded inputs, onnx's reference evaluator on the
   original and onnxruntime on the converted model agree within 1e-5 relative. Otherwise the
   model is left as it is and the skip says why.
2. **Shapes.** Dynamic dims other than each input's batch axis (`graph_opt.data.batch_layout`) are bound where the pipeline knows
   them (`--input-shape`, or the shapes of the calibration data); a bound dim stays bound in the
   output. The batch dim stays symbolic unless folding needs it: the engine folds the model twice,
   with two different batch sizes, and when both results are the same graph (up to the batch size
   in type annotations) the batch size cannot have entered a folded constant, and the result is
   kept with the batch dim symbolic. When they differ, the batch is bound only if the user bound it.
3. **Engine.** onnxscript's optimizer on onnx-ir, repeated until the node count stops falling
   (it lifts Constant nodes to initializers at the end of a round, and some of its fusions fire on
   initializers only): constant folding with shape propagation, Constant nodes → initializers,
   duplicate small initializers and common subexpressions merged, Identity/no-op Cast/Expand
   removed, Cast/Reshape/Transpose/Unsqueeze pairs collapsed, Flatten → Reshape, Pad → Conv,
   BatchNormalization → Conv/Gemm, inside If/Loop/Scan bodies too.
4. **graph-opt's own rewrites**, on what the engine leaves:
   - duplicate initializers of any size (in memory) merged;
   - Pad (constant mode, non-negative pads on spatial axes only) folded into the following
     Conv (pad value 0), AveragePool (pad value 0 → ``count_include_pad=1``; skipped when the
     pool already pads without counting the pad, or with ``ceil_mode``; a pool's total pads must stay
     below its kernel), MaxPool (pad value −inf,
     or a pad value no larger than a proven lower bound of the input: Relu/Clip/Sigmoid outputs;
     otherwise skipped with the reason) when the Pad's output has no other reader;
   - MatMul of a 2-D input by a constant matrix followed by Add of a constant row → one Gemm;
   - a Slice of a Slice on other (non-negative, explicit) axes → one Slice;
   - Conv or Gemm followed by Mul/Add with a constant per-output-channel (or scalar) operand:
     ``Mul(s)``: W·s, b·s; ``Add(t)``: b + t (Gemm: ``C' = β·C + t``, β = 1); the Conv/Gemm output
     must have no other reader. New weights get fresh names; the old ones are never edited.

Below IR 4 every initializer had to be a graph input as well; such a model is stamped IR 4 without
those inputs, so that its weights fold as the constants they are (from IR 4 on, an initializer that
is also an input is a deliberate override point and stays one).

Preconditions and guarantees: the result passes the full onnx.checker (when folding with bound
dims gives a model that fails it, as when a bound dim disagrees with another input's, the model
is folded again without binding; a result that still fails is discarded, with the reason); graph
input and output names never change (initializers aside) (a result that would
change them is discarded, with the reason); weights kept on disk (models over 2 GB, see
`model_io`) stay references to their files unless a rewrite reads them; outputs are unchanged
up to float rounding of the folded products (within 1e-5 relative; the pipeline verifies).

Why onnxscript's optimizer (benchmarks/bench_simplify.py; numbers in RESULTS.md, "Graph simplification"):
of the maintained engines compared on exported CNNs, detectors, OCR, a byte classifier, a
transformer and a TF-style CNN, it is the one that keeps dynamic dims dynamic while folding, works
on onnx-ir's lazy external tensors (weights on disk are not loaded), descends into subgraphs, emits
only standard ops and leaves IR-3 initializers-as-inputs valid. onnxruntime's basic-level offline
optimization is as exact and much faster, but folds nothing of a run-time padding chain while the
batch dim is dynamic, needs every weight in memory, and wrote invalid models from IR-3 files, as
did onnxslim, which also changed the TF-style CNN's output; onnxsim 0.8.1 wrote an invalid model
for an OCR classifier. What the engine leaves (Pad before pools, constant Mul/Add after convs,
MatMul+Add, Slice pairs, small ConstantOfShape fills, the batch probe) is step 4 and the shapes step.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx

from graph_opt.data import batch_layout
from graph_opt.errors import InvalidModelError
from graph_opt.external_data import DISK_KEY, on_disk
from graph_opt.model_io import check_model
from graph_opt.onnx_util import all_graphs, subgraphs
from graph_opt.opset import RuntimeOpsetError, upgrade_for_runtime
from graph_opt.pass_base import Pass, PassContext, PassReport

log = logging.getLogger(__name__)

_BATCH_PROBES = (3, 5)  # two batch sizes that differ (and are not 1, which broadcasting treats specially)
_MAX_ROUNDS = 4
_FOLD_FILL_LIMIT = 65536  # elements: a ConstantOfShape up to this size is folded into an initializer


@dataclass(frozen=True, kw_only=True)
class Simplify(Pass):
    """Fold constants and shape arithmetic, merge duplicates, fold Pad and constant Mul/Add into convs (exact)."""

    name: ClassVar[str] = "simplify"

    bind_shapes: bool = True  # bind dynamic non-batch dims from --input-shape / the data's shapes
    fold_pads: bool = True  # Pad → Conv / AveragePool / MaxPool
    fold_affine: bool = True  # Conv/Gemm → constant Mul/Add folded into weights and bias
    upgrade_opset: bool = True  # convert opsets onnxruntime does not run (verified), else skip

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        source = model
        if self.upgrade_opset:
            try:
                model, note = upgrade_for_runtime(model, shapes=_known_shapes(model, ctx))
            except RuntimeOpsetError as exc:
                report.skip("model", str(exc))
                return source
            if note:
                report.rewrite("model", action=note)
        model = _ir3_constants(model, report)
        bound, batch = _bindings(model, ctx, self.bind_shapes)
        try:
            folded = _fold_with_shapes(model, bound, batch, report)
        except Exception as exc:  # noqa: BLE001 - the engine's failure on one model is a skip, not a crash
            log.warning("simplify: the folding engine failed: %s", exc)
            report.skip("model", f"the folding engine failed: {type(exc).__name__}: {str(exc).strip()[:200]}")
            report.rewritten.clear()
            return source
        out = _Rewriter(folded, report, pads=self.fold_pads, affine=self.fold_affine).run()
        problem = _interface_changed(source, out) or _checked(out)
        if problem and (bound or batch):  # bound dims the graph does not agree with: fold without them
            report.note(f"folding with bound dims gave an invalid model ({problem[:160]}); folded without binding")
            del report.rewritten[len([r for r in report.rewritten if r.get("node") == "model"]):]
            del report.skipped[:]
            out = _Rewriter(_engine(model), report, pads=self.fold_pads, affine=self.fold_affine).run()
            problem = _interface_changed(source, out) or _checked(out)
        if problem:
            report.skip("model", f"result discarded: {problem}")
            report.rewritten.clear()
            return source
        _report_counts(model, out, report)
        return out if report.rewritten else source


def _ir3_constants(model: onnx.ModelProto, report: PassReport) -> onnx.ModelProto:
    """Below IR 4 every initializer had to be listed as a graph input too: a rule of the format,
    not a wish to override the weights (graph-opt never feeds them). Such a model is stamped IR 4
    with its initializers no longer inputs, so that they fold as the constants they are. From IR 4
    on, an initializer listed as an input is a deliberate override point and is left alone."""
    inits = {t.name for t in model.graph.initializer}
    if model.ir_version >= 4 or not any(v.name in inits for v in model.graph.input):
        return model
    out = _shallow(model)
    kept = [v for v in out.graph.input if v.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.ir_version = 4
    report.rewrite("model", action=f"IR {model.ir_version} → 4: initializers are no longer graph inputs")
    return out


# --------------------------------------------------------------------------------------------------
# Shapes: what to bind, and the batch probe


def _known_shapes(model: onnx.ModelProto, ctx: PassContext) -> dict[str, tuple[int, ...]]:
    """Full input shapes the pipeline knows (the user's, else one run's feed of the data)."""
    shapes = dict(ctx.shapes or {})
    if ctx.data is not None and len(ctx.data):
        for name, value in ctx.data.sample(0).items():
            shapes.setdefault(name, tuple(np.shape(value)))
    return shapes


def _input_dims(model: onnx.ModelProto) -> dict[str, list[onnx.TensorShapeProto.Dimension]]:
    inits = {t.name for t in model.graph.initializer}
    return {v.name: list(v.type.tensor_type.shape.dim) for v in model.graph.input
            if v.name not in inits and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _bindings(model: onnx.ModelProto, ctx: PassContext,
              bind: bool) -> tuple[dict[str, dict[int, int]], dict[str, tuple[int, int | None]]]:
    """(input → {axis: size} for dynamic non-batch dims to bind, input → (its batch axis, the
    user's batch size or None) for each input whose batch dim is dynamic). The batch axis of each
    input is the data layer's (`graph_opt.data.batch_layout`: a state [2, batch, 128] batches on
    axis 1)."""
    user = dict(ctx.shapes or {})
    sample = ({k: np.shape(v) for k, v in ctx.data.sample(0).items()}
              if ctx.data is not None and len(ctx.data) else {})
    axes = dict(batch_layout(model).axes)
    if ctx.data is not None and ctx.data.axes:  # what the data showed (a state batched on axis 1)
        axes.update({k: v for k, v in ctx.data.axes.items() if v is not None})
    bound: dict[str, dict[int, int]] = {}
    batch: dict[str, tuple[int, int | None]] = {}
    for name, dims in _input_dims(model).items():
        dynamic = [axis for axis, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]
        if not dynamic:
            continue
        given = user.get(name)
        if given is not None and len(given) != len(dims):
            given = None
        seen = sample.get(name)
        if seen is not None and len(seen) != len(dims):
            seen = None
        bax = axes.get(name)
        if bax is not None and bax in dynamic:
            batch[name] = (bax, given[bax] if given is not None else None)
        if not bind:
            continue
        for axis in dynamic:
            if axis == bax:
                continue
            size = given[axis] if given is not None else seen[axis] if seen is not None else None
            if size:
                bound.setdefault(name, {})[axis] = int(size)
    return bound, batch


def _with_dims(model: onnx.ModelProto, sizes: dict[str, dict[int, int]]) -> onnx.ModelProto:
    out = _shallow(model)
    for value in out.graph.input:
        for axis, size in sizes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size
    return out


def _shallow(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs may be edited (everything else is only read by the engine)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _fold_with_shapes(model: onnx.ModelProto, bound: dict[str, dict[int, int]],
                      batch: dict[str, tuple[int, int | None]], report: PassReport) -> onnx.ModelProto:
    if bound:
        report.note("bound for folding (kept in the output): " + ", ".join(
            f"{n}[{a}]={s}" for n, axes in bound.items() for a, s in axes.items()))
    if not batch:
        return _engine(_with_dims(model, bound))
    probes = []
    for size in _BATCH_PROBES:
        sizes = {n: dict(bound.get(n, {})) for n in set(bound) | set(batch)}
        for name, (axis, _) in batch.items():
            sizes[name][axis] = size
        probes.append(_engine(_with_dims(model, sizes)))
    if not _same_graph(*probes):
        _generalize_reshapes(*probes)
    if _same_graph(*probes):
        out = probes[0]
        _unbind_batch(out, probes[1], model)
        report.note("the batch dim stays dynamic: folding gives the same graph at batch sizes "
                    + " and ".join(map(str, _BATCH_PROBES)))
        return out
    given = {n: (axis, s) for n, (axis, s) in batch.items() if s is not None}
    if given:
        report.note("the batch dim is bound (" + ", ".join(f"{n}[{a}]={s}" for n, (a, s) in given.items())
                    + "): folding depends on it")
        sizes = {n: dict(bound.get(n, {})) for n in set(bound) | set(given)}
        for name, (axis, size) in given.items():
            sizes[name][axis] = size
        return _engine(_with_dims(model, sizes))
    report.note("folding with a dynamic batch dim: more would fold with it bound (--input-shape)")
    return _engine(_with_dims(model, bound))


def _type_protos(model: onnx.ModelProto) -> Iterator[onnx.TypeProto]:
    for graph in all_graphs(model.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            yield value.type


def _tensor_types(type_proto: onnx.TypeProto) -> Iterator[onnx.TypeProto.Tensor]:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        yield type_proto.tensor_type
    elif kind in ("sequence_type", "optional_type"):
        yield from _tensor_types(getattr(type_proto, kind).elem_type)


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Equal up to the dims written in type annotations."""
    def stripped(m: onnx.ModelProto) -> bytes:
        m = _shallow(m)
        for graph in all_graphs(m.graph):
            del graph.value_info[:]
        for t in _type_protos(m):
            for tt in _tensor_types(t):
                tt.ClearField("shape")
        return m.SerializeToString(deterministic=True)
    return stripped(a) == stripped(b)


def _generalize_reshapes(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """A Reshape target the engine wrote with the batch size in front (Flatten → Reshape) reads
    0 there instead, "copy the input's first dim", when that dim is the probe's batch size in
    both probes: the same graph then serves every batch size."""
    def first_dims(m: onnx.ModelProto) -> dict[str, int]:
        out = {}
        for v in (*m.graph.value_info, *m.graph.input):
            dims = v.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                out[v.name] = dims[0].dim_value
        return out
    da, db = first_dims(a), first_dims(b)
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    readers = Counter(name for n in a.graph.node for name in n.input)
    for na, nb in zip(a.graph.node, b.graph.node):
        if na.op_type != "Reshape" or nb.op_type != "Reshape" or len(na.input) < 2 or na.input[1] != nb.input[1]:
            continue
        if any(x.name == "allowzero" and x.i for x in na.attribute) or readers[na.input[1]] != 1:
            continue
        ta, tb = ia.get(na.input[1]), ib.get(nb.input[1])
        if ta is None or tb is None or ta.data_type != onnx.TensorProto.INT64:
            continue
        va, vb = onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb)
        if va.shape != vb.shape or not va.size or np.array_equal(va, vb) or not np.array_equal(va[1:], vb[1:]):
            continue
        if (va[0], vb[0]) != (da.get(na.input[0]), db.get(nb.input[0])):
            continue
        for t, v in ((ta, va), (tb, vb)):
            v = v.copy()
            v[0] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))


def _unbind_batch(out: onnx.ModelProto, other: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Where the two probes' type annotations differ, the dim came from the batch size: make it
    dynamic again (on graph inputs and outputs, the original's symbol)."""
    for mine, theirs in zip(all_graphs(out.graph), all_graphs(other.graph)):
        types = {v.name: v.type for v in (*theirs.input, *theirs.output, *theirs.value_info)}
        for value in (*mine.input, *mine.output, *mine.value_info):
            if value.name not in types:
                for tm in _tensor_types(value.type):
                    tm.ClearField("shape")
                continue
            for tm, tt in zip(_tensor_types(value.type), _tensor_types(types[value.name])):
                if len(tm.shape.dim) != len(tt.shape.dim):
                    tm.ClearField("shape")
                    continue
                for dm, dt in zip(tm.shape.dim, tt.shape.dim):
                    if dm.HasField("dim_value") and dm.dim_value != dt.dim_value:
                        dm.Clear()
    by_name = {v.name: v for v in (*original.graph.input, *original.graph.output)}
    for value in (*out.graph.input, *out.graph.output):
        dims = value.type.tensor_type.shape.dim
        before = by_name[value.name].type.tensor_type.shape.dim if value.name in by_name else []
        if len(dims) != len(before):
            continue
        for dim, was in zip(dims, before):
            if not dim.HasField("dim_value") and not dim.HasField("dim_param"):
                dim.CopyFrom(was)


# --------------------------------------------------------------------------------------------------
# The engine: onnxscript's optimizer on onnx-ir, weights kept on disk stay there


def _engine(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnxscript import optimizer

    disk = {t.name: t for t in model.graph.initializer if on_disk(t)}
    with warnings.catch_warnings():  # our folder key is read below; onnx-ir need not know it
        warnings.filterwarnings("ignore", message=".*unknown external data key.*", category=UserWarning)
        irm = ir.from_proto(model)
    for value in irm.graph.initializers.values():
        tensor = value.const_value
        if value.name in disk and isinstance(tensor, ir.ExternalTensor):
            info = {e.key: e.value for e in disk[value.name].external_data}
            value.const_value = ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name, base_dir=info[DISK_KEY])
    count = _node_count(irm)
    for _ in range(_MAX_ROUNDS):
        optimizer.optimize_ir(irm, num_iterations=2, should_fold=_should_fold)
        now = _node_count(irm)
        if now >= count:
            break
        count = now
    out = ir.to_proto(irm)
    by_place = {(e["location"], e.get("offset", "0")): t for t in disk.values()
                for e in [{x.key: x.value for x in t.external_data}]}
    for tensor in out.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            src = disk.get(tensor.name) or by_place.get((info.get("location"), info.get("offset", "0")))
            if src is None:
                raise RuntimeError(f"simplify: external tensor {tensor.name!r} has no source on disk")
            name = tensor.name
            tensor.CopyFrom(src)
            tensor.name = name
    return out


def _should_fold(node) -> bool | None:
    """The engine leaves ConstantOfShape unfolded (a fill costs less than its bytes in the file);
    a small one whose shape is known is folded, so that what reads it (anchor grids of detection
    heads, masks) can fold too. None: the engine's own rule."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = node.outputs[0].shape
    if shape is None or not shape.is_static():
        return None
    return int(np.prod([int(d) for d in shape])) <= _FOLD_FILL_LIMIT


def _node_count(irm) -> int:
    return sum(len(g) for g in irm.graphs())


# --------------------------------------------------------------------------------------------------
# graph-opt's own rewrites (on a ModelProto: decide per node, then apply)


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
        self.used_names = {n for g in all_graphs(model.graph) for n in _names(g)}

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

    def _fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

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
        if reason:
            self.report.skip(label, reason)
            return False
        rank = len(pads) // 2
        if any(pads[a] or pads[a + rank] for a in (0, 1)):
            self.report.skip(label, "pads the batch or channel axis")
            return False
        attrs = {a.name: a for a in target.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            self.report.skip(label, f"{target.op_type} uses auto_pad")
            return False
        spatial = rank - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
        if len(old) != 2 * spatial:
            return False
        kind = target.op_type
        if kind == "Conv" and value != 0:
            self.report.skip(label, f"pad value {value:g} before a Conv (only zero padding folds into it)")
            return False
        if kind == "AveragePool":
            if value != 0:
                self.report.skip(label, f"pad value {value:g} before an AveragePool (only zero padding folds)")
                return False
            if "ceil_mode" in attrs and attrs["ceil_mode"].i:
                self.report.skip(label, "AveragePool with ceil_mode: its edge windows would count the pad differently")
                return False
            counts = "count_include_pad" in attrs and attrs["count_include_pad"].i
            if any(old) and not counts:
                self.report.skip(label, "AveragePool already pads without counting the pad: one count rule cannot express both")
                return False
        if kind == "MaxPool":
            if len(target.output) > 1 and target.output[1]:
                self.report.skip(label, "MaxPool's Indices output would index the padded tensor")
                return False
            floor = self._lower_bound(pad.input[0])
            if not (value == -np.inf or (floor is not None and value <= floor)):
                bound = "no lower bound known" if floor is None else f"its lower bound is {floor:g}"
                self.report.skip(label, f"pad value {value:g} before a MaxPool (-inf pads fold; {bound} for the input)")
                return False
        new_pads = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
        if kind != "Conv" and (len(kernel) != spatial or any(p >= k for p, k in zip(new_pads, kernel * 2))):
            self.report.skip(label, f"{kind} padded {new_pads} with kernel {kernel}: a pool's pads must stay below its kernel")
            return False
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
        if node.op_type == "Conv":
            per = _per_channel(c, weight.shape[0], rank=weight.ndim)
            if per is None:
                return False
            if op.op_type == "Mul":
                new_w = weight * per.reshape((-1,) + (1,) * (weight.ndim - 1))
                new_b = bias * per if bias is not None else None
            else:
                new_w = weight
                new_b = (bias if bias is not None else np.zeros(weight.shape[0], weight.dtype)) + per
        else:
            attrs = {a.name: a for a in node.attribute}
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            n = weight.shape[0] if trans_b else weight.shape[1]
            per = _per_channel(c, n, rank=2)
            if per is None:
                return False
            beta = float(attrs["beta"].f) if "beta" in attrs else 1.0
            if op.op_type == "Mul":
                new_w = weight * (per[:, None] if trans_b else per[None, :])
                new_b = bias * per if bias is not None else None
            else:
                new_w = weight
                new_b = (beta * bias if bias is not None else np.zeros(n, weight.dtype)) + per
                new_b = new_b.astype(weight.dtype)
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


# --------------------------------------------------------------------------------------------------
# Report and postconditions


def _interface_changed(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    inits = {t.name for t in before.graph.initializer}
    ins = [v.name for v in before.graph.input if v.name not in inits]
    outs = [v.name for v in before.graph.output]
    inits_after = {t.name for t in after.graph.initializer}
    got_ins = [v.name for v in after.graph.input if v.name not in inits_after]
    got_outs = [v.name for v in after.graph.output]
    if got_ins != ins:
        return f"graph inputs would change from {ins} to {got_ins}"
    if got_outs != outs:
        return f"graph outputs would change from {outs} to {got_outs}"
    return ""


def _checked(model: onnx.ModelProto) -> str:
    """"" when `model` passes the full checker, else the reason."""
    try:
        check_model(model, full=True)
    except InvalidModelError as exc:
        return f"the folded model fails onnx.checker: {exc}"
    return ""


def _op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for g in all_graphs(model.graph) for n in g.node)


def _report_counts(before: onnx.ModelProto, after: onnx.ModelProto, report: PassReport) -> None:
    a, b = _op_counts(before), _op_counts(after)
    nb, na = sum(a.values()), sum(b.values())
    ib, ia = len(before.graph.initializer), len(after.graph.initializer)
    if nb != na or a != b:
        changes = {op: [a.get(op, 0), b.get(op, 0)] for op in sorted(set(a) | set(b)) if a.get(op, 0) != b.get(op, 0)}
        report.rewrite("graph", action="folded", nodes=[nb, na], ops=changes)
    report.note(f"nodes {nb} -> {na}, initializers {ib} -> {ia}")


def describe_engine() -> dict[str, Any]:
    """The engine's name and version (for reports and benchmarks)."""
    import onnxscript

    return {"engine": "onnxscript.optimizer", "version": onnxscript.__version__}


__all__ = ["Simplify", "describe_engine"]
