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
2. **Shapes.** Dynamic dims other than each input's batch axis (`graph_opt.data.batch_layout`) are
   bound where the pipeline knows them (`--input-shape`, or the shapes of the calibration data); a
   bound dim stays bound in the output. The batch dim stays symbolic unless folding needs it: the
   engine folds the model twice, with two different batch sizes, and when both results are the
   same graph (up to the batch size in type annotations) the batch size cannot have entered a
   folded constant, and the result is kept with the batch dim symbolic. When they differ, the
   batch is bound only if the user bound it.
3. **Engine.** onnxscript's optimizer on onnx-ir, repeated until the node count stops falling
   (it lifts Constant nodes to initializers at the end of a round, and some of its fusions fire on
   initializers only): constant folding with shape propagation, Constant nodes → initializers,
   duplicate small initializers and common subexpressions merged, Identity/no-op Cast/Expand
   removed, Cast/Reshape/Transpose/Unsqueeze pairs collapsed, Flatten → Reshape, Pad → Conv,
   BatchNormalization → Conv/Gemm, inside If/Loop/Scan bodies too; ConstantOfShape fills of known
   shape are folded up to a size limit. Each rewrite rule is tried only on nodes of its pattern's
   root op type (`_RootOpRule`): the engine's own rewrites, without its cost that grows with the
   square of the graph.
4. **graph-opt's own rewrites** on what the engine leaves (`passes/_simplify_rules.py` states each
   one's conditions and skip reasons): duplicate initializers of any size merged; constant Pad
   folded into the following Conv, AveragePool or MaxPool; MatMul by a constant matrix + Add of a
   constant row → Gemm; a Slice of a Slice → one Slice; constant per-channel Mul/Add after a Conv
   or Gemm folded into its weight and bias. New weights get fresh names; old ones are never edited.

Below IR 4 every initializer had to be a graph input as well; such a model is stamped IR 4 without
those inputs, so that its weights fold as the constants they are (from IR 4 on, an initializer that
is also an input is a deliberate override point and stays one).

Preconditions and guarantees: the result passes the full onnx.checker (when folding with bound
dims gives a model that fails it, as when a bound dim disagrees with another input's, the model is
folded again without binding; a result that still fails is discarded, with the reason); graph
input and output names never change, initializers aside (a result that would change them is
discarded, with the reason); weights kept on disk (models over 2 GB, see `graph_opt.external_data`)
stay references to their files unless a rewrite reads them; outputs are unchanged up to float
rounding of the folded products (within 1e-5 relative; the pipeline verifies).

Why onnxscript's optimizer (benchmarks/bench_simplify.py, RESULTS.md "Graph simplification"): of
the maintained engines compared there, it keeps dynamic dims dynamic while folding, works on
onnx-ir's lazy external tensors (weights on disk are not loaded), descends into subgraphs, emits
only standard ops and leaves IR-3 initializers-as-inputs valid. onnxslim and onnxruntime's
offline optimizer wrote invalid models from IR-3 files (and the latter needs every weight in
memory), onnxslim changed an output, onnxsim wrote an invalid model. What the engine leaves undone
is step 4 and the batch probe of step 2.
"""

from __future__ import annotations

import contextlib
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
from graph_opt.model_io import check_model, copy_model
from graph_opt.onnx_util import all_graphs
from graph_opt.opset import RuntimeOpsetError, upgrade_for_runtime
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._simplify_rules import apply_rules

log = logging.getLogger(__name__)

_BATCH_PROBES = (3, 5)  # two batch sizes that differ (and are not 1, which broadcasting treats specially)
_MAX_ROUNDS = 4
_FOLD_FILL_LIMIT = 65536  # elements: a ConstantOfShape up to this size is folded into an initializer


@dataclass(frozen=True, kw_only=True)
class Simplify(Pass):
    """Fold constants and shape arithmetic, merge duplicates, fold Pad and constant Mul/Add into convs (exact)."""

    name: ClassVar[str] = "simplify"
    # `run` only reads its argument (the engine works on onnx-ir's view of it and writes a new model;
    # input dims are bound on that view), so the pipeline need not copy every weight for it
    edits_input: ClassVar[bool] = False

    bind_shapes: bool = True  # bind dynamic non-batch dims from --input-shape / the data's shapes
    fold_pads: bool = True  # Pad → Conv / AveragePool / MaxPool
    fold_affine: bool = True  # Conv/Gemm → constant Mul/Add folded into weights and bias; MatMul + Add → Gemm
    upgrade_opset: bool = True  # convert opsets onnxruntime does not run (verified), else skip

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        source = model
        if self.upgrade_opset:
            try:
                model, note = upgrade_for_runtime(model, shapes=_known_shapes(model, ctx))
            except RuntimeOpsetError as exc:
                report.skip("model", str(exc))
                return copy_model(source)
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
            return copy_model(source)
        out = apply_rules(folded, report, pads=self.fold_pads, affine=self.fold_affine)
        problem = _interface_changed(source, out) or _checked(out)
        if problem and (bound or batch):  # bound dims the graph does not agree with: fold without them
            report.note(f"folding with bound dims gave an invalid model ({problem[:160]}); folded without binding")
            del report.rewritten[len([r for r in report.rewritten if r.get("node") == "model"]):]
            del report.skipped[:]
            out = apply_rules(_engine(model), report, pads=self.fold_pads, affine=self.fold_affine)
            problem = _interface_changed(source, out) or _checked(out)
        if problem:
            report.skip("model", f"result discarded: {problem}")
            report.rewritten.clear()
            return copy_model(source)
        _report_counts(model, out, report)
        return out if report.rewritten else copy_model(source)


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
        return _engine(model, bound)
    given = {n: (axis, s) for n, (axis, s) in batch.items() if s is not None}
    # Two batch sizes that differ. When the user bound every batch dim to one size, that size is the
    # first probe: its graph is the answer when folding turns out to depend on the batch, so the
    # engine runs twice, not three times.
    sizes_given = {s for _, s in given.values()}
    first = next(iter(sizes_given)) if len(given) == len(batch) and len(sizes_given) == 1 else None
    probe_sizes = _BATCH_PROBES if first is None else (first, next(p for p in _BATCH_PROBES if p != first))
    probes = []
    for size in probe_sizes:
        sizes = {n: dict(bound.get(n, {})) for n in set(bound) | set(batch)}
        for name, (axis, _) in batch.items():
            sizes[name][axis] = size
        probes.append(_engine(model, sizes))
    same = _same_graph(*probes)
    if not same:
        _generalize_reshapes(*probes)
        same = _same_graph(*probes)
    if same:
        out = probes[0]
        _unbind_batch(out, probes[1], model)
        report.note("the batch dim stays dynamic: folding gives the same graph at batch sizes "
                    + " and ".join(map(str, probe_sizes)))
        return out
    if given:
        report.note("the batch dim is bound (" + ", ".join(f"{n}[{a}]={s}" for n, (a, s) in given.items())
                    + "): folding depends on it")
        if first is not None:
            return probes[0]
        sizes = {n: dict(bound.get(n, {})) for n in set(bound) | set(given)}
        for name, (axis, size) in given.items():
            sizes[name][axis] = size
        return _engine(model, sizes)
    report.note("folding with a dynamic batch dim: more would fold with it bound (--input-shape)")
    return _engine(model, bound)


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
    """Equal up to the dims written in type annotations. The main graph's initializers are compared
    one by one where they are, the rest on a copy without them (a copy of the weights would cost
    more than the comparison)."""
    def stripped(m: onnx.ModelProto) -> bytes:
        m = copy_model(m, without={t.name for t in m.graph.initializer})
        for graph in all_graphs(m.graph):
            del graph.value_info[:]
        for t in _type_protos(m):
            for tt in _tensor_types(t):
                tt.ClearField("shape")
        return m.SerializeToString(deterministic=True)
    ia, ib = a.graph.initializer, b.graph.initializer
    return (len(ia) == len(ib) and stripped(a) == stripped(b)
            and all(x.SerializeToString(deterministic=True) == y.SerializeToString(deterministic=True)
                    for x, y in zip(ia, ib)))


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


def _engine(model: onnx.ModelProto, dims: dict[str, dict[int, int]] | None = None) -> onnx.ModelProto:
    """onnxscript's optimizer on onnx-ir's view of `model` (not edited: its weights are read where
    they are, not copied), with the graph inputs' dims in `dims` ({input: {axis: size}}) bound on
    that view; the folded model is a new proto."""
    import onnx_ir as ir
    from onnxscript import optimizer

    disk = {t.name: t for t in model.graph.initializer if on_disk(t)}
    with warnings.catch_warnings():  # our folder key is read below; onnx-ir need not know it
        warnings.filterwarnings("ignore", message=".*unknown external data key.*", category=UserWarning)
        irm = ir.from_proto(model)
    _bind_dims(irm, dims or {})
    for value in irm.graph.initializers.values():
        tensor = value.const_value
        if value.name in disk and isinstance(tensor, ir.ExternalTensor):
            info = {e.key: e.value for e in disk[value.name].external_data}
            value.const_value = ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name, base_dir=info[DISK_KEY])
    # onnx-ir's tensors read `model`'s tensor protos in place (initializers, Constant values), and
    # renaming a tensor renames its proto: the names are put back once the result is written, so
    # `model` leaves as it came
    names = [(t, t.name if t.HasField("name") else None) for t in _tensor_protos(model)]
    try:
        count = _node_count(irm)
        with _rules_by_root_op():
            for _ in range(_MAX_ROUNDS):
                optimizer.optimize_ir(irm, num_iterations=2, should_fold=_should_fold)
                now = _node_count(irm)
                if now >= count:
                    break
                count = now
        out = ir.to_proto(irm)
    finally:
        for tensor, name in names:
            if name is None:
                tensor.ClearField("name")
            elif tensor.name != name:
                tensor.name = name
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


def _tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor proto of `model`'s graphs: initializers and tensor-valued node attributes."""
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _bind_dims(irm, dims: dict[str, dict[int, int]]) -> None:
    """Fix the graph inputs' dims in `dims` to their sizes (a bound dim loses its name and its
    denotation, as a cleared `TensorShapeProto.Dimension` would)."""
    import onnx_ir as ir

    for value in irm.graph.inputs:
        axes = dims.get(value.name)
        if not axes or value.shape is None:
            continue
        shape = value.shape
        value.shape = ir.Shape([axes.get(i, d) for i, d in enumerate(shape.dims)],
                               [None if i in axes else shape.get_denotation(i) for i in range(shape.rank())])


class _RootOpRule:
    """One of the engine's rewrite rules, tried only on nodes of its pattern's root op type.

    The engine tries every rule on every node, and a rule whose pattern ends in another op fails
    at its first comparison: a waste that grows with the graph (a rule with two output nodes
    indexes the whole graph by op type first, once per node tried, so its misses cost N² on a
    graph of N nodes). Skipping the nodes whose op type differs gives the same matches, in the
    same order, hence the same model. Everything but `try_rewrite` is the rule's own."""

    def __init__(self, rule, op_type: str):
        self._rule = rule
        self._op_type = op_type

    def __getattr__(self, name: str):
        return getattr(self._rule, name)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        if node.op_type != self._op_type:
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


def _root_op(rule) -> str | None:
    """The op type every match of `rule` starts from, or None when onnxscript's rule does not say
    (a pattern whose root op is not one constant name: that rule is tried on every node)."""
    from onnxscript.rewriter._pattern_ir import StringConstantPattern

    try:
        op = rule._target_pattern.output_nodes[0].op
    except (AttributeError, IndexError):
        return None
    return op.value() if isinstance(op, StringConstantPattern) else None


@contextlib.contextmanager
def _rules_by_root_op() -> Iterator[None]:
    """While inside: the engine's default rewrite rules as `_RootOpRule`s (the same rules, in
    the same order). onnxscript's optimizer reads them from the rewriter module on every call;
    when that module does not hold them under the expected name, nothing changes."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    wrapped = tuple(rule if (op := _root_op(rule)) is None else _RootOpRule(rule, op) for rule in rules)
    rewriter._DEFAULT_REWRITE_RULES = wrapped
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


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
        check_model(model, full=True, infer=False)
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
