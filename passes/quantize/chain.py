"""Chained GPTQ rounding (``chain``): each layer's codes solved against the inputs it receives once
the layers before it are quantized, so that it corrects the error that reaches it.

Unchained, GPTQ (`weights`) rounds a layer's weight ``W`` against ``H = E[x xᵀ]`` of its input in
the float model. Chained, the input is taken from the model as planned so far: every other layer's
weights and every activation quantized (the plan's QDQ, emulated in float), the layer's own input
through its QuantizeLinear → DequantizeLinear when its activations are quantized. With ``x`` the
float model's input and ``x̂`` that one, the codes minimize the error at the layer's output
against the float model:

    E‖W x − Ŵ x̂‖² = E‖(W' − Ŵ) x̂‖² + const,   W' = W C H⁻¹,   H = E[x̂ x̂ᵀ],  C = E[x x̂ᵀ]

so GPTQ rounds the aim ``W'`` (`kernels.quant.chained_target`, damped toward ``W``) with its
feedback through the chained ``H``, on the same grid (the scales still come from ``W``). Each
element of the aim stays within `weights.AIM_STEPS` grid steps of ``W`` (one): the correction
refines which way a weight rounds, as GPTQ's feedback does, and cannot move a weight far for
the sake of the few large activations an output's squared error is dominated by.
``W' = W`` when nothing before the layer is quantized and its own input is float. Block-wise
(int4) weights are not chained.

Stages: the GPTQ layers are ordered by depth, the number of GPTQ layers on the longest path
from the graph inputs to their input (layers of one depth never read each other's outputs); the
depths are cut into ``chain`` consecutive stages of about equal numbers of depths. Stage by stage,
the partly chained model is built once (the plan with the stages before already chained, the
layers of this stage and after at their unchained codes) and the calibration data runs once
through it and through the float model side by side (one onnxruntime session each per stage,
each cut down to the nodes the stage's inputs depend on (`upto`), streamed batches, products in
float32 summed in float64), then the stage's layers are solved.
A layer deeper in a stage than another of the same stage sees that one's unchained codes, which
then change too: the corrections add up (one stage for a deep model over-corrects), so with one
stage per depth each layer sees exactly the codes it is deployed next to. Chaining runs last in
the plan (`plan.make_plan`), on the final placement, for the layers it quantizes.

Cost: per stage, one model build and two streaming passes over the calibration data (the samples
the unchained statistics were taken on), plus the chained layers' solves (each layer is solved
twice in all: unchained, then chained). Skipped (the unchained codes kept, with a note): layers
whose chained input is not captured (not float, not finite, a width other than the weight's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from graph_opt.kernels.quant import chained_target, fake_quantize
from graph_opt.passes._graph import GraphIndex, subgraph_reads
from graph_opt.passes._qplan import TensorQuant
from graph_opt.passes.quantize.gptq import shrinkage
from graph_opt.passes.quantize.layers import Layer

from graph_opt.data import Dataset, paired_batch_size
from graph_opt.intermediates import stream
from graph_opt.onnx_util import attr

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize

log = logging.getLogger(__name__)

_CHUNK_ROWS = 4096

# One stage's model as planned so far: the model and, per layer index, its input's activation
# parameters when that input is quantized (None: the layer reads the float tensor).
StageModel = tuple[onnx.ModelProto, dict[int, TensorQuant | None]]


def depths(ix: GraphIndex, ids: set[int]) -> dict[int, int]:
    """Layer index → the number of layers of `ids` on the longest path from the graph inputs to
    its input (nodes in graph order, which ONNX requires to be topological)."""
    level: dict[str, int] = {}
    out: dict[int, int] = {}
    for idx, node in enumerate(ix.nodes):
        d = max((level.get(t, 0) for t in node.input if t), default=0)
        if idx in ids:
            out[idx] = d
            d += 1
        for t in node.output:
            level[t] = d
    return out


def stages(depth: dict[int, int], n: int) -> list[list[int]]:
    """The layers of `depth` in `n` stages (fewer when there are fewer depths): consecutive depths,
    about as many depths in each, layers in graph order within a stage."""
    levels = sorted(set(depth.values()))
    groups = np.array_split(np.asarray(levels), max(1, min(n, len(levels))))
    where = {int(d): s for s, group in enumerate(groups) for d in group}
    out: list[list[int]] = [[] for _ in groups]
    for idx in sorted(depth):
        out[where[depth[idx]]].append(idx)
    return [s for s in out if s]


def upto(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` (edited in place) cut down to the nodes that `names` depend on, with `names` as its
    only outputs: a stage's inputs are computed without the rest of the model. Graph inputs
    stay, read or not (every batch feeds them); unread initializers are dropped by the session."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    keep: set[int] = set()
    todo = list(names)
    while todo:
        i = producer.get(todo.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        todo.extend(t for t in g.node[i].input if t)
        todo.extend(subgraph_reads(g.node[i]))
    nodes = [n for i, n in enumerate(g.node) if i in keep]
    del g.node[:]
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=t) for t in names)
    return model


def _feature_axis(ix: GraphIndex, layer: Layer) -> int:
    if layer.op == "Conv":
        return 1
    trans_a = attr(ix.nodes[layer.idx], "transA", 0) if layer.op == "Gemm" else 0
    return 0 if trans_a else -1


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1).reshape(-1, x.shape[axis])


class _Moments:
    """``Σ x̂ x̂ᵀ`` and ``Σ x x̂ᵀ`` of one input, float32 chunk products summed in float64."""

    def __init__(self, width: int) -> None:
        self.h = np.zeros((width, width))
        self.c = np.zeros((width, width))
        self.rows = 0
        self.bad = ""

    def add(self, xf: np.ndarray, xq: np.ndarray) -> None:
        if self.bad:
            return
        if xf.shape != xq.shape or xq.shape[1] != self.h.shape[0]:
            self.bad = "its chained input is not of the weight's width"
            return
        if not (np.all(np.isfinite(xf)) and np.all(np.isfinite(xq))):
            self.bad = "its chained input is not finite on the calibration data"
            return
        for i in range(0, xq.shape[0], _CHUNK_ROWS):
            f, q = xf[i:i + _CHUNK_ROWS], xq[i:i + _CHUNK_ROWS]
            self.h += q.T @ q
            self.c += f.T @ q
        self.rows += xq.shape[0]


def rechain(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], data: Dataset, n_stages: int,
            opts: Quantize, build: Callable[[], StageModel], forget: Callable[[set[int]], None],
            notes: list[str], only: set[int] | None = None) -> set[int]:
    """Solve the GPTQ layers of `layers` (those with a ``hessian``; of `only`, when given) chained, in `n_stages` stages
    (see the module docstring): set each one's ``hessian`` (``E[x̂ x̂ᵀ]``) and ``aim`` (``W'``).
    ``build()`` returns the model as planned with the layers' current codes; ``forget(ids)`` is
    told which layers were re-solved, so that their codes are computed again. Returns those layers."""
    ids = {i for i, lay in layers.items()
           if lay.hessian is not None and np.ndim(lay.wv) >= 2 and (only is None or i in only)}
    if not ids:
        return set()
    plan = stages(depths(ix, ids), n_stages)
    inputs = {i.name for i in model.graph.input}
    clock = {"codes and stage models": 0.0, "streaming": 0.0, "aims": 0.0}
    done: set[int] = set()
    skipped: dict[int, str] = {}
    for stage in plan:
        t0 = time.perf_counter()
        staged, acts = build()
        clock["codes and stage models"] += time.perf_counter() - t0
        # one accumulator per (input, feature axis, its QDQ): layers reading the same input alike share it
        keys: dict[int, tuple[str, int, int]] = {}
        moments: dict[tuple[str, int, int], _Moments] = {}
        qdq: dict[tuple[str, int, int], TensorQuant | None] = {}
        for idx in stage:
            lay = layers[idx]
            axis = _feature_axis(ix, lay)
            w = lay.wv
            width = int(w.shape[lay.red_axis] if w.ndim == 2 else w.shape[1])
            tq = acts.get(idx)
            key = (lay.x, axis, id(tq))
            keys[idx] = key
            if key not in moments:
                moments[key] = _Moments(width)
                qdq[key] = tq
        names = sorted({k[0] for k in moments if k[0] not in inputs})
        t0 = time.perf_counter()
        bs = paired_batch_size(model, staged)
        if names:
            head = onnx.ModelProto()
            head.CopyFrom(model)
            pairs = zip(stream(upto(head, names), data, names, batch_size=bs, threads=opts.threads,
                               desc="chain float"),
                        stream(upto(staged, names), data, names, batch_size=bs, threads=opts.threads,
                               desc="chain quantized"))
            del head
        else:
            pairs = (((feed, {}), (feed, {})) for feed in data.batches(bs))
        for (feed, f_vals), (_, q_vals) in pairs:
            for key, acc in moments.items():
                t, axis, _ = key
                xf = np.asarray(feed[t] if t in inputs else f_vals[t])
                xq = np.asarray(feed[t] if t in inputs else q_vals[t])
                if xf.ndim == 0 or not np.issubdtype(xq.dtype, np.floating):
                    acc.bad = acc.bad or "its chained input is not a float tensor"
                    continue
                if qdq[key] is not None:
                    xq = fake_quantize(xq, qdq[key].params())
                acc.add(_rows(xf, axis), _rows(xq, axis))
        del staged
        clock["streaming"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for idx in stage:
            acc = moments[keys[idx]]
            if acc.bad or not acc.rows:
                skipped[idx] = acc.bad or "its chained input was not captured"
                continue
            lay = layers[idx]
            h, c = acc.h / acc.rows, acc.c / acc.rows
            w = np.asarray(lay.wv, dtype=np.float32)
            damp = shrinkage(h.shape[0], acc.rows)
            if w.ndim == 2:
                aim = chained_target(w, c, h, lay.red_axis, damp=damp)
            else:  # a 1×1 Conv: (out, in) over the channels
                aim = chained_target(w.reshape(w.shape[0], w.shape[1]), c, h, 1, damp=damp).reshape(w.shape)
            lay.hessian, lay.aim = h, aim
            done.add(idx)
        forget(set(stage))
        clock["aims"] += time.perf_counter() - t0
    # the plan's notes stay deterministic (a plan is compared and serialized): the times go to the log
    log.info("chain: %s", ", ".join(f"{k} {v:.1f} s" for k, v in clock.items()))
    notes.append(f"chain: {len(done)} of {len(ids)} GPTQ layers rounded against their inputs in the model "
                 f"quantized before them, in {len(plan)} stages by depth, on {len(data)} samples")
    for idx, why in skipped.items():
        notes.append(f"chain: {layers[idx].label} keeps its unchained codes: {why}")
    return done
