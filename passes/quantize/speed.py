"""Speed for the quantize pass: int8 where the target runs it faster than float, float elsewhere.

Three parts, each independent of the others:

1. `gemm_form` (every target, exact): a MatMul with a constant 2-D weight whose sole reader is an
   Add of a constant bias (N,) becomes ``Reshape → Gemm(x, W, b) → Reshape`` (no Reshape when
   the input is 2-D); shapes must be static::

       x[B,S,K] → MatMul(W) → Add(b) → y      ⇒   x → Reshape[B·S,K] → Gemm(W, b) → Reshape[B,S,N] → y

   Why: onnxruntime's basic-level MatMulAddFusion makes exactly this Gemm from a float MatMul +
   Add when the input shape is static, and it runs before the QDQ fusions (extended level). On
   the QDQ graph it leaves ``DQ → Reshape → Gemm(DQ(W), float bias)``, which no integer kernel
   matches: every weight is dequantized on every run and the Gemm runs in float, slower than the
   fp32 model (docs/design.md, fact 8). Written as Gemm before planning, the layer is a Gemm with
   an int32 bias that onnxruntime fuses into QGemm, and the Reshapes move int8 data. Shapes are
   those the model states, else ONNX shape inference's (onnxruntime infers them on load).
   Skipped (left as they are): dynamic or unknown input shapes, a weight or bias read elsewhere,
   a bias not one value per output column, a MatMul output read by anything but the Add or
   being a graph output.

2. Targets (`target_rules`): what follows from the CPU when nothing can be timed. Activations
   are uint8 on x86 (onnxruntime's x86 integer kernels take u8 activations with s8 weights) and
   int8 on ARM (its symmetric convolution kernels for the dot-product extension take s8 × s8;
   onnxruntime's guidance names S8S8 the first choice there); 7-bit weights on x86 without int8
   dot products (`graph_opt.target`).

3. The latency gate (`decide`, ``prefer='speed'`` with ``target='host'``): the float model and the
   planned int8 model are profiled once each, alternating run by run (`runtime.profile_nodes`).
   Each quantized layer's int8 cost is its kernel plus the QuantizeLinear/DequantizeLinear that
   onnxruntime left unfused on the tensors it reads and writes (a tensor's cost is shared by the
   quantized layers reading it); its float cost is its kernel in the float profile (with the
   activation fused into it). A layer stays float unless its int8 cost is below
   ``(1 - MIN_GAIN)`` of its float cost. Profiled kernels map back to layers by onnxruntime's
   names: the node name, or an output name, followed by nothing or by a separator (``/``, ``_``,
   ``:``), the longest such key winning. A layer that no kernel of one of the profiles matches is
   left as planned. Then the float model, the planned int8 model and the model planned again
   with those layers float are timed as wholes, interleaved (`latency_timer`): the fastest int8
   form is kept when it is ``MIN_GAIN`` below float (the gated form also ``MIN_GAIN`` below the
   planned one, unless the planned one misses float), else the whole model stays float. The
   wall clock has the last word because a profiler's per-kernel overhead weighs on small kernels
   and on the extra Q/DQ nodes of an int8 graph, so profiled sums can call a faster int8 model
   slower. The timings come from `profile_timer` and `latency_timer`; tests inject fake ones.

``prefer='size'`` skips the gate (every planned layer stays int8, as before); a named target
other than the host cannot be timed: its rules apply and the report says the gate did not run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_opt.external_data import weightless_copy
from graph_opt.model_io import copy_model
from graph_opt.onnx_util import Namer
from graph_opt.passes._graph import GraphIndex
from graph_opt.target import Target

log = logging.getLogger(__name__)

# A layer keeps int8 only when it saves at least this share of its float time (profiling noise).
MIN_GAIN = 0.05

_SEPARATORS = ("/", "_", ":")


# -- 1. MatMul + bias as Gemm ------------------------------------------------------------------


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Tensors whose shape the model states with every dimension known."""
    out: dict[str, tuple[int, ...]] = {}
    for v in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0 for d in t.shape.dim):
            out[v.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    return out


@dataclass(frozen=True)
class _GemmSite:
    matmul: int
    add: int
    x: str
    w: str
    b: str
    y: str
    shape: tuple[int, ...]  # x's shape
    n: int


def _sites(ix: GraphIndex, shapes: Mapping[str, tuple[int, ...]], skip: Callable[[int], bool]) -> list[_GemmSite]:
    sites = []
    for idx, node in enumerate(ix.nodes):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or skip(idx):
            continue
        x, w = node.input
        y = node.output[0]
        if ix.is_const(x) or not ix.is_const(w) or ix.const_dtype(w) != TensorProto.FLOAT or len(ix.readers(w)) != 1:
            continue
        wv = ix.const(w)
        if wv is None or wv.ndim != 2 or x not in shapes or len(shapes[x]) < 2 or shapes[x][-1] != wv.shape[0]:
            continue
        add = ix.sole_reader(y)
        if add is None or ix.nodes[add].op_type != "Add" or ix.nodes[add].domain not in ("", "ai.onnx"):
            continue
        other = [t for t in ix.nodes[add].input if t != y]
        if len(other) != 1 or not ix.is_const(other[0]) or len(ix.readers(other[0])) != 1:
            continue
        b = other[0]
        bv = ix.const(b)
        n = int(wv.shape[1])
        if bv is None or ix.const_dtype(b) != TensorProto.FLOAT or bv.shape not in ((n,), (1, n)):
            continue
        sites.append(_GemmSite(idx, add, x, w, b, ix.nodes[add].output[0], shapes[x], n))
    return sites


def gemm_form(model: onnx.ModelProto, skip: Callable[[GraphIndex, int], bool] = lambda ix, idx: False
              ) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every MatMul + bias Add of static shape written as Gemm (see the module
    docstring), and the labels of the rewritten MatMuls; `model` itself when there are none.
    `skip(index, i)`: MatMuls to leave as they are (excluded ones), by their position in the
    `GraphIndex` of `model`. Exact: Gemm computes x·W + b."""
    ix = GraphIndex(model)
    shapes = _static_shapes(model)
    unknown = [n.input[0] for n in ix.nodes if n.op_type == "MatMul" and n.input and n.input[0] not in shapes]
    if unknown:  # onnxruntime infers shapes on load: so must we, on a copy without the weights' bytes
        try:
            shapes = _static_shapes(onnx.shape_inference.infer_shapes(weightless_copy(model), data_prop=True))
        except Exception as exc:  # noqa: BLE001 - shape inference fails on some exports: the stated shapes only
            log.debug("shape inference failed: %s", exc)
    sites = _sites(ix, shapes, lambda idx: skip(ix, idx))
    if not sites:
        return model, []
    out = copy_model(model, nodes=False)
    g = out.graph
    namer = Namer(model.graph)
    by_matmul = {s.matmul: s for s in sites}
    dropped = {s.add for s in sites}
    for idx, node in enumerate(ix.nodes):
        if idx in dropped:
            continue
        site = by_matmul.get(idx)
        if site is None:
            g.node.append(node)
            continue
        name = node.name or namer("MatMul")
        bias = site.b
        if ix.const(site.b).ndim == 2:  # (1, N): Gemm's C must be one value per column for an int32 bias
            bias = namer(f"{site.b}_vector")
            g.initializer.append(numpy_helper.from_array(ix.const(site.b).reshape(site.n).astype(np.float32), bias))
        if len(site.shape) == 2:
            g.node.append(helper.make_node("Gemm", [site.x, site.w, bias], [site.y], name=name))
            continue
        rows = int(np.prod(site.shape[:-1]))
        shape_in, shape_out = namer(f"{name}/gemm_shape_in"), namer(f"{name}/gemm_shape_out")
        g.initializer.append(numpy_helper.from_array(np.array([rows, site.shape[-1]], np.int64), shape_in))
        g.initializer.append(numpy_helper.from_array(np.array([*site.shape[:-1], site.n], np.int64), shape_out))
        x2, y2 = namer(f"{site.x}_2d"), namer(f"{site.y}_2d")
        g.node.append(helper.make_node("Reshape", [site.x, shape_in], [x2], name=namer(f"{name}/reshape_in")))
        g.node.append(helper.make_node("Gemm", [x2, site.w, bias], [y2], name=name))
        g.node.append(helper.make_node("Reshape", [y2, shape_out], [site.y], name=namer(f"{name}/reshape_out")))
        g.value_info.append(helper.make_tensor_value_info(x2, TensorProto.FLOAT, [rows, site.shape[-1]]))
        g.value_info.append(helper.make_tensor_value_info(y2, TensorProto.FLOAT, [rows, site.n]))
    replaced = {s.b for s in sites if ix.const(s.b).ndim == 2}  # (1, N) biases, now vectors
    if replaced:
        kept = [t for t in g.initializer if t.name not in replaced]
        del g.initializer[:]
        g.initializer.extend(kept)
    return out, [ix.labels[s.matmul] for s in sites]


# -- 2. what the target decides without timing -------------------------------------------------


def activation_dtype(target: Target) -> str:
    """The activation type whose integer kernels the target has: uint8 on x86 (U8S8), int8 on ARM (S8S8)."""
    return "int8" if target.arch == "aarch64" else "uint8"


def target_rules(target: Target) -> list[str]:
    """What follows from the target, one line each, for the report."""
    lines = [f"activations {activation_dtype(target)} "
             + ("(ARM: signed int8 kernels, S8S8)" if target.arch == "aarch64" else "(x86: u8 activations × s8 weights)")]
    lines.append("int8 weights on a 7-bit grid (x86 without int8 dot products)" if target.reduce_range
                 else "int8 weights on the full 8-bit grid")
    return lines


# -- 3. the latency gate -----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKeys:
    """How one quantized layer shows in a profile: its node name and output names (the layer's,
    and the absorbed activation's), the tensors whose QDQ it pays for, alone or shared."""

    label: str
    names: tuple[str, ...]           # node name, output names
    qdq_tensors: tuple[str, ...]     # input, output, weight and bias tensors of the layer


# (float model, int8 model) → each model's kernels as (onnxruntime name, µs)
Timer = Callable[[onnx.ModelProto, onnx.ModelProto], tuple[Sequence[tuple[str, float]], Sequence[tuple[str, float]]]]


def _matches(profile_name: str, key: str) -> bool:
    return profile_name == key or (profile_name.startswith(key) and profile_name[len(key)] in _SEPARATORS)


def _attribute(profile: Sequence[tuple[str, float]], keys: Mapping[str, tuple[str, ...]]) -> dict[str, float]:
    """Time per owner: each profiled kernel goes to the owner with the longest key it matches."""
    flat = sorted(((k, owner) for owner, ks in keys.items() for k in ks if k), key=lambda kv: -len(kv[0]))
    out: dict[str, float] = {}
    for name, us in profile:
        for key, owner in flat:
            if _matches(name, key):
                out[owner] = out.get(owner, 0.0) + us
                break
    return out


def _qdq_names(tensor: str) -> tuple[str, ...]:
    return (f"{tensor}_QuantizeLinear", f"{tensor}_DequantizeLinear")


@dataclass
class GateResult:
    keep_float: dict[str, str]                 # layer label → why it stays float
    costs: dict[str, tuple[float, float]]      # layer label → (float µs, int8 µs)
    unmatched: list[str]                       # layers no profile matched (left as planned)


def decide(layers: Sequence[LayerKeys], float_profile: Sequence[tuple[str, float]],
           int8_profile: Sequence[tuple[str, float]], min_gain: float = MIN_GAIN) -> GateResult:
    """Which quantized layers stay float (pure): see the module docstring, part 3."""
    own = {lay.label: lay.names for lay in layers}
    t_float = _attribute(float_profile, own)
    readers: dict[str, int] = {}
    for lay in layers:
        for t in lay.qdq_tensors:
            readers[t] = readers.get(t, 0) + 1
    qdq = {t: _qdq_names(t) for t in readers}
    t_qdq = _attribute(int8_profile, qdq)
    t_int8 = _attribute(int8_profile, own)
    result = GateResult({}, {}, [])
    for lay in layers:
        if lay.label not in t_float or lay.label not in t_int8:
            result.unmatched.append(lay.label)
            continue
        f = t_float[lay.label]
        q = t_int8[lay.label] + sum(t_qdq.get(t, 0.0) / readers[t] for t in lay.qdq_tensors)
        result.costs[lay.label] = (f, q)
        if q >= (1.0 - min_gain) * f:
            result.keep_float[lay.label] = (f"float: not faster in int8 on this CPU (profiled {q:.0f} µs with its "
                                            f"quantize/dequantize against {f:.0f} µs in float)")
    return result


def profile_timer(feed: Mapping[str, np.ndarray], runs: int, threads: int = 1) -> Timer:
    """The gate's timings on this machine: both models profiled once, alternating run by run."""
    from graph_opt.runtime import profile_nodes

    def timer(float_model: onnx.ModelProto, int8_model: onnx.ModelProto):
        f, q = profile_nodes([float_model, int8_model], feed, runs=runs, threads=threads)
        return [(t.name, t.us) for t in f], [(t.name, t.us) for t in q]

    return timer


def layer_keys(plan, work: onnx.ModelProto) -> list[LayerKeys]:
    """The `LayerKeys` of every layer `plan` (a `passes._qplan.QuantPlan`) quantizes in `work`,
    the model it applies to."""
    ix = GraphIndex(work)
    out = []
    for d in plan.nodes:
        if d.action != "quantize" or not d.weight:
            continue
        idx = ix.find(d.node)
        if idx is None:
            continue
        node = ix.nodes[idx]
        names = [node.name, *[o for o in node.output if o]]
        if d.absorbed is not None:
            a = ix.find(d.absorbed)
            if a is not None:
                names += [o for o in ix.nodes[a].output if o]
        tensors = [*d.inputs, d.output or "", d.weight, d.bias or ""]
        out.append(LayerKeys(d.node, tuple(n for n in names if n), tuple(dict.fromkeys(t for t in tensors if t))))
    return out


def latency_timer(feed: Mapping[str, np.ndarray], runs: int, threads: int = 1
                  ) -> Callable[[Sequence[onnx.ModelProto]], list[float]]:
    """The gate's whole-model check on this machine: each model's median milliseconds over `runs`
    interleaved rounds, as deployed (`graph_opt.stats.measure_latency`)."""
    from graph_opt.stats import measure_latency

    def timer(models: Sequence[onnx.ModelProto]) -> list[float]:
        return measure_latency(list(models), dict(feed), runs=runs, warmup=3, threads=threads)

    return timer
