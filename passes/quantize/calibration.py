"""Calibration for the quantize pass: the range of each activation a placement may quantize.

One streaming pass (at most ``max_samples``; batches sized by memory, `runtime.run_batches`,
each dropped after it updates the observers) over a weightless copy of the model run by
onnxruntime, with the observed tensors as extra outputs (`_exposing`).

- ``minmax`` reduces each observed tensor to three scalars inside onnxruntime (ReduceMin,
  ReduceMax, Size) and derives the ranges of Relu/Clip/Sigmoid/Tanh outputs and of data-movement
  ops from their sources (`_minmax_derivations`). A batch where a NaN or inf reaches a reduction
  or a graph output is fetched whole and observed exactly (onnxruntime's reductions drop NaN).
- ``percentile``, ``entropy``, ``mse`` fill histogram observers (`kernels.calib`) in a second
  thread while onnxruntime runs the next batch; the batches reach each observer in order, so the
  result is the one a sequential pass gives. The range contains 0; [0, max] puts the zero point
  at qmin, so a Relu/Clip before the Q can go.
- Per-feature floor: on a tensor read only linearly (`_LINEAR_READERS`) a clipping method keeps
  the value every feature reaches in every sample (`_feature_axes`), so a transformer's outlier
  dimensions survive; onnxruntime computes the per-sample, per-feature extremes where the shape
  allows (`_inside_features`).

`Ranges` turns observers into ranges on first use (a histogram search is the costly part) and can
derive, on every core, the ones a dry run of the placement asks for; `_Asking` records what a
dry run asked. Tensors that are not float32 are left out (never an error).

The copies with extra outputs and reductions are `intermediates.with_outputs`'s; their sessions
run with every graph optimization and without onnxruntime's memory arena, their batches are
`runtime.run_batches`'s (sized by memory unless ``batch_size`` is given).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from graph_opt.data import Dataset, batch_size_for
from graph_opt.errors import GraphOptError
from graph_opt.intermediates import PerFeature, with_outputs
from graph_opt.kernels.calib import HistogramObserver, MinMaxObserver
from graph_opt.passes._graph import LAYER_OPS, GraphIndex, infer_shapes
from graph_opt.passes.quantize.ops import SHARED_OPS
from graph_opt.runtime import cores, make_session, release_memory, run_batches

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize


def calibrate(model: onnx.ModelProto, data: Dataset, tensors: list[str], method: str, *,
              batch_size: int | None = None, max_samples: int | None = None, threads: int = 1,
              feature_axis: Callable[[str, int], int | None] | None = None) -> dict[str, MinMaxObserver]:
    """One streaming pass over `data`: one observer per float32 tensor in `tensors`.

    minmax reduces inside onnxruntime (`_calibrate_minmax`); the other methods expose the
    tensors as extra outputs of a private copy of `model`, and each batch updates the observers
    and is dropped (see the module docstring). Tensors that turn out not to be float32 are left
    out. Without `batch_size` the batch is sized to the memory the tensors take as outputs (see
    `runtime.run_batches`). ``feature_axis(tensor, rank)``: the axis whose features the histogram
    observer of `tensor` keeps a floor for (`kernels.calib`), or None.
    """
    if max_samples is not None:
        data = data.take(max_samples)
    if method == "minmax":
        try:
            return _calibrate_minmax(model, data, list(dict.fromkeys(tensors)), batch_size, threads)
        except GraphOptError:
            pass  # a tensor onnxruntime cannot reduce (its type, its rank): expose the tensors instead
    inputs = set(data.inputs)
    wanted = [t for t in dict.fromkeys(tensors) if t not in inputs]
    inside = _inside_features(model, wanted, feature_axis) if method != "minmax" else {}
    runner = _Swappable(None)  # the only holder of the session, so that it can be replaced
    runner.session, reduced = _exposing(model, wanted, threads, inside)
    fetch = wanted + [x for pair in reduced.values() for x in pair]
    observe = _Observing(tensors, inputs, fetch, reduced, method, inside, feature_axis)
    _observe_stream(runner, observe, data, batch_size or batch_size_for(model, 0), threads,
                    lambda: _exposing(model, wanted, cores(0) - 1, inside))
    return {t: o for t, o in observe.observers.items() if o.count}


class _Observing:
    """The observers of one calibration pass, fed batch by batch (`__call__`): one per float32
    tensor of `tensors`, made on its first batch; a tensor that is not float32 is dropped."""

    def __init__(self, tensors: list[str], inputs: set[str], fetch: list[str], reduced: dict[str, tuple[str, str]],
                 method: str, inside: Mapping[str, tuple[int, int | None]],
                 feature_axis: Callable[[str, int], int | None] | None) -> None:
        self.tensors, self.inputs, self.fetch, self.reduced = tensors, inputs, fetch, reduced
        self.method, self.inside, self.feature_axis = method, inside, feature_axis
        self.observers: dict[str, MinMaxObserver] = {}
        self.dropped: set[str] = set()

    def _make(self, t: str, v: np.ndarray) -> MinMaxObserver:
        if self.method == "minmax":
            return MinMaxObserver()
        axis = self.inside[t][0] if t in self.inside else self.feature_axis(t, v.ndim) if self.feature_axis else None
        return HistogramObserver(feature_axis=axis)

    def __call__(self, feed: dict[str, np.ndarray], outs: list[np.ndarray]) -> None:
        values = dict(zip(self.fetch, outs))
        values.update({t: feed[t] for t in self.tensors if t in self.inputs})
        observers, dropped = self.observers, self.dropped
        for t in self.tensors:
            v = values.pop(t, None)
            if t in dropped or v is None:
                continue
            if np.asarray(v).dtype != np.float32:
                dropped.add(t)
                observers.pop(t, None)
                continue
            if t not in observers:
                observers[t] = self._make(t, v)
            if t in self.reduced:  # (samples·features,) or (samples, features), as reduced by onnxruntime
                extremes = tuple(values[x].reshape(v.shape[0], -1) for x in self.reduced[t])
                observers[t].update(v, feature_extremes=extremes)
            else:
                observers[t].update(v)


def _observe_stream(runner: _Swappable, observe: _Observing, data: Dataset, batch_size: int, threads: int,
                    fewer_threads: Callable[[], tuple[object, dict[str, tuple[str, str]]]]) -> None:
    """Run `runner` over `data` and feed every batch to `observe`, in order.

    One batch is observed (numpy) while onnxruntime computes the next: the batches still reach
    each observer in order, so the result is the same as in sequence. numpy's bincount holds the
    GIL, so the observer needs a core of its own when it is the slower side: the first batch is
    observed in sequence and timed against a second (warm) run of it, and when observing took
    longer, the rest runs on the session `fewer_threads` makes, with one thread less (by default,
    threads=0, only)."""
    fetch = observe.fetch
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for k, (feed, outs) in enumerate(run_batches(runner, fetch, data, batch_size, "calibrate")):
            if k == 0:
                start = time.perf_counter()
                observe(feed, outs)
                observe_s = time.perf_counter() - start
                if not threads and cores(0) > 1:
                    start = time.perf_counter()
                    runner.run(fetch, feed)
                    if observe_s > time.perf_counter() - start:
                        runner.session = None  # one session at a time: each holds the weights
                        release_memory()
                        runner.session, again = fewer_threads()
                        assert again == observe.reduced  # the same names: the copy is built the same way
                continue
            if pending is not None:
                pending.result()
            pending = pool.submit(observe, feed, outs)
            del outs
        if pending is not None:
            pending.result()


class _Swappable:
    """An onnxruntime session that can be replaced between two runs of `run_batches`."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(names, feed)


def _calibrate_minmax(model: onnx.ModelProto, data: Dataset, tensors: list[str], batch_size: int | None,
                      threads: int) -> dict[str, MinMaxObserver]:
    """minmax calibration with the reductions inside onnxruntime: ReduceMin, ReduceMax and Size
    per tensor, so three scalars per tensor and batch leave the session instead of the tensor.
    A tensor whose range follows from observed ones (a Relu or Sigmoid output, a Reshape, a
    Concat: `_minmax_derivations`) is not reduced at all; its range is derived at the end.

    onnxruntime drops a NaN that is not the first value it reduces (and a vectorized max can then
    miss values around it), while `MinMaxObserver` keeps the min/max of the finite values. So each
    batch also sums every float graph output (a NaN or inf in the model reaches them); a batch
    with a non-finite sum or reduction has every tensor fetched whole and observed exactly, and
    only the other batches' extremes are derived from.
    """
    derived = _minmax_derivations(model, tensors)
    session, reduced, guards, weight_bytes = _reducing_session(model, [t for t in tensors if t not in derived], threads)
    names = [*(x for r in reduced.values() for x in r), *guards]
    exposing = None  # the session exposing the tensors themselves, made on first need
    clean = {t: MinMaxObserver() for t in reduced}     # from the batches with finite reductions
    exact = {t: MinMaxObserver() for t in tensors}     # from the others, observed whole
    dropped: set[str] = set()

    def batch_bytes(outs: list[np.ndarray]) -> float:
        # The bytes the reduced tensors would take as outputs (onnxruntime's buffers grow with them).
        values = dict(zip(names, outs))
        return sum(int(values[n]) * values[lo].itemsize for lo, _, n in reduced.values())

    for feed, outs in run_batches(session, names, data, batch_size or batch_size_for(model, 0), "calibrate",
                                  batch_bytes=batch_bytes, weight_bytes=weight_bytes):
        values = dict(zip(names, outs))
        extremes = _batch_extremes(values, reduced, guards, dropped)
        if extremes is not None:
            for t, (lo, hi, n) in extremes.items():
                clean[t].update_extremes(lo, hi, n)
            continue
        inner = [t for t in tensors if t not in feed]
        if exposing is None:
            exposing, _ = _exposing(model, inner, threads)
        fetched = dict(zip(inner, exposing.run(inner, feed) if inner else []))
        for t in tensors:
            value = feed[t] if t in feed else fetched[t]
            if value.dtype != np.float32:
                dropped.add(t)
            else:
                exact[t].update(value)
        del values, outs, fetched
    for t, (sources, f) in derived.items():  # graph order: a source is ready before its readers
        if any(s in dropped for s in sources):
            dropped.add(t)
        elif f is None:
            clean[t] = functools.reduce(MinMaxObserver.merge, (clean[s] for s in sources), MinMaxObserver())
        else:
            clean[t] = clean[sources[0]].mapped(f)
    observers = {t: clean[t].merge(exact[t]) if t in clean else exact[t] for t in tensors}
    return {t: o for t, o in observers.items() if o.count and t not in dropped}


def _reducing_session(model: onnx.ModelProto, tensors: list[str], threads: int):
    """A session of a weightless copy of `model` whose outputs are ReduceMin, ReduceMax and Size of
    each tensor of `tensors` and the ReduceSum of each float graph output (the guards): the
    session, ``{tensor: (min, max, size) output names}``, the guard names and the weights' bytes."""
    reducers: dict[str, tuple[str, ...]] = {t: ("min", "max", "size") for t in tensors}
    outputs = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    for o in outputs:
        reducers[o] = reducers.get(o, ()) + ("sum",)
    cap = with_outputs(model, [], reducers=reducers)
    reduced = {t: (cap.reduced[t]["min"], cap.reduced[t]["max"], cap.reduced[t]["size"]) for t in tensors}
    guards = [cap.reduced[o]["sum"] for o in outputs]
    weight_bytes = sum(int(a.nbytes) for a in cap.weights.values())
    session = make_session(cap.model, optimize=True, threads=threads, arena=False, weights=cap.weights)
    return session, reduced, guards, weight_bytes


def _batch_extremes(values: dict[str, np.ndarray], reduced: dict[str, tuple[str, str, str]], guards: list[str],
                    dropped: set[str]) -> dict[str, tuple[float, float, int]] | None:
    """One batch's ``{tensor: (min, max, count)}`` from its reductions, or None when a guard or a
    reduction is not finite (the batch must be observed whole). A tensor that is not float32 is
    added to `dropped`."""
    extremes: dict[str, tuple[float, float, int]] = {}
    if any(not math.isfinite(float(values[s])) for s in guards):
        return None
    for t, (lo_name, hi_name, n_name) in reduced.items():
        lo, hi, n = values[lo_name], values[hi_name], int(values[n_name])
        if lo.dtype != np.float32:
            dropped.add(t)
        elif n:
            extremes[t] = (float(lo), float(hi), n)
            if not (math.isfinite(extremes[t][0]) and math.isfinite(extremes[t][1])):
                return None
    return extremes


# Ops whose output range follows from their input's, for minmax (see `_minmax_derivations`).
_SAME_VALUES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})


def _sigmoid(x: float) -> float:
    return float(np.float32(0.5 * (1.0 + math.tanh(0.5 * x))))


def _tanh(x: float) -> float:
    return float(np.float32(math.tanh(x)))


def _minmax_derivations(model: onnx.ModelProto, tensors: Collection[str]
                        ) -> dict[str, tuple[list[str], Callable[[float], float] | None]]:
    """The tensors of `tensors` whose minmax range follows from other tensors of `tensors`, in
    graph order: ``{tensor: (sources, f)}``, the range being ``[f(min), f(max)]`` of its one
    source for a never-decreasing elementwise ``f`` (Relu, LeakyRelu, Clip with constant bounds,
    Sigmoid, Tanh; ``f`` is the identity for ops that only move values: Reshape, Flatten …), or
    the union of its sources' (``f`` None: a Concat). Those need no reduction of their own.

    Exact for every op but Sigmoid and Tanh, which onnxruntime computes with its own
    approximations: there the derived bound is the exact function's, and can differ from the one
    a reduction gives by that approximation's error.
    """
    ix = GraphIndex(model)
    known = set(tensors)
    out: dict[str, tuple[list[str], Callable[[float], float] | None]] = {}
    for node in ix.nodes:
        if node.domain not in ("", "ai.onnx") or not node.output or node.output[0] not in known:
            continue
        t, op = node.output[0], node.op_type
        data = [x for x in node.input[: None if op == "Concat" else 1] if x]
        if not data or not all(x in known and x != t for x in data):
            continue
        f: Callable[[float], float] | None
        if op == "Concat":
            f = None
        elif op in _SAME_VALUES:
            f = float
        elif op == "Relu":
            f = functools.partial(max, 0.0)
        elif op == "LeakyRelu":
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
            if alpha < 0:
                continue
            f = functools.partial(_leaky_relu, float(np.float32(alpha)))
        elif op == "Clip":
            bounds = _clip_bounds(ix, node)
            if bounds is None:
                continue
            f = functools.partial(_clip, *bounds)
        elif op == "Sigmoid":
            f = _sigmoid
        elif op == "Tanh":
            f = _tanh
        else:
            continue
        out[t] = (data, f)
    return out


def _leaky_relu(alpha: float, x: float) -> float:
    return x if x >= 0 else float(np.float32(alpha) * np.float32(x))


def _clip(lo: float, hi: float, x: float) -> float:
    return min(max(x, lo), hi)


def _clip_bounds(ix: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """A Clip's (min, max) when both are constant (absent: unbounded), else None."""
    lo, hi = -math.inf, math.inf
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        elif a.name == "max":
            hi = a.f
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            value = ix.const(node.input[slot])
            if value is None or value.size != 1:
                return None
            if slot == 1:
                lo = float(value.reshape(()))
            else:
                hi = float(value.reshape(()))
    return (lo, hi) if lo <= hi else None


def _exposing(model: onnx.ModelProto, tensors: list[str], threads: int,
              features: Mapping[str, tuple[int, int | None]] | None = None):
    """A session of `model` with every tensor in `tensors` also a graph output, and the names of
    the extra outputs that give, per tensor in `features` (``{tensor: (axis, features)}``, see
    `_inside_features`), its per-sample, per-feature max and min: onnxruntime reduces them next
    to the tensor's producer, on its own threads, instead of numpy in the observer's."""
    pairs = {t: (PerFeature("max", axis, size), PerFeature("min", axis, size)) for t, (axis, size) in (features or {}).items()}
    cap = with_outputs(model, tensors, reducers=pairs)
    reduced = {t: (cap.reduced[t][hi], cap.reduced[t][lo]) for t, (hi, lo) in pairs.items()}
    return make_session(cap.model, optimize=True, threads=threads, arena=False, weights=cap.weights), reduced


def _inside_features(model: onnx.ModelProto, tensors: list[str],
                     feature_axis: Callable[[str, int], int | None] | None) -> dict[str, tuple[int, int | None]]:
    """``{tensor: (feature axis, number of features)}`` for the tensors whose per-sample,
    per-feature extremes onnxruntime can compute (`_exposing`): rank from ONNX shape inference
    (`_graph.infer_shapes`) at least 3, feature axis 1 (any rank) or the last one (when its length
    is static). The others (rank 2 or unknown: nothing to reduce, or no safe graph for it) are
    reduced by the observer from the tensor itself."""
    if feature_axis is None or not tensors:
        return {}
    dims = infer_shapes(model)
    out: dict[str, tuple[int, int | None]] = {}
    for t in tensors:
        shape = dims.get(t)
        if shape is None or len(shape) < 3:
            continue
        axis = feature_axis(t, len(shape))
        if axis is None:
            continue
        axis %= len(shape)
        if axis == 1:
            out[t] = (1, shape[1])
        elif axis == len(shape) - 1 and shape[-1]:
            out[t] = (axis, shape[-1])
    return out


class _RangeMap(Mapping[str, tuple[float, float]]):
    """Ranges of the tensors in `names`, each derived on first use by `value` (a Mapping for `placement.place`)."""

    def __init__(self, names: Collection[str], value: Callable[[str], tuple[float, float]]):
        self._names, self._value = names, value
        self._done: dict[str, tuple[float, float]] = {}

    def __getitem__(self, t: str) -> tuple[float, float]:
        if t not in self._done:
            if t not in self._names:
                raise KeyError(t)
            self._done[t] = self._value(t)
        return self._done[t]

    def __contains__(self, t: object) -> bool:
        return t in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Ranges(_RangeMap):
    """The calibrated range of each observed tensor, derived from its observer on first use: the
    placement asks only for the tensors that may get a QDQ (a Conv output whose Relu is absorbed
    never does), and a histogram method's search is the costly part."""

    def __init__(self, observers: dict[str, MinMaxObserver], opts: Quantize) -> None:
        super().__init__(observers, lambda t: _range(observers[t], opts))
        self._observers, self._opts = observers, opts

    def prefetch(self, place: Callable[[Mapping[str, tuple[float, float]]], object]) -> None:
        """Derive at once, on every core, the ranges that `place` asks for.

        `place` runs first on the observed min/max (cheap); the tensors it asked for are the
        ones the real placement will ask for, except perhaps a Concat's, whose decision depends
        on the ranges: those are derived on first use as before. Each search is independent
        and numpy releases the GIL inside it, so the result is the same as one by one."""
        observers = self._observers
        dry = _Asking(observers, lambda t: (observers[t].min, observers[t].max))
        place(dry)
        todo = [t for t in dry.asked if t not in self._done]
        workers = min(cores(self._opts.threads), len(todo))
        if workers < 2:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for t, r in zip(todo, pool.map(self._value, todo)):
                self._done[t] = r


class _Asking(_RangeMap):
    """Stand-in ranges for a dry run of `placement.place`: `asked` records, in order, the tensors the
    placement asked for."""

    def __init__(self, names: Collection[str], value: Callable[[str], tuple[float, float]]):
        super().__init__(names, value)
        self.asked: dict[str, None] = {}

    def __getitem__(self, t: str) -> tuple[float, float]:
        value = super().__getitem__(t)
        self.asked[t] = None
        return value


# Readers that use a tensor's values linearly, or only move them (Shape reads none): a clipped
# feature would reach them as it is. Anything else (Sigmoid, a SiLU's Mul, GELU, Softmax …) bends
# the values first, and saturates the far side of most features anyway.
_LINEAR_READERS = frozenset({*LAYER_OPS, *SHARED_OPS, "Add", "Sub", "Concat", "AveragePool", "GlobalAveragePool",
                             "Relu", "Identity", "Shape", "Size"})


def _feature_axes(ix: GraphIndex) -> Callable[[str, int], int | None]:
    """For a histogram method: the axis of a tensor's features (channels), whose per-feature floor
    keeps a clipped range from cutting a feature that is large on every sample (`kernels.calib`),
    or None. Only for tensors whose every reader is linear (`_LINEAR_READERS`). The axis is 1 for
    rank 4 and up (NCHW …), and for a rank-3 tensor next to a Conv (N, C, L); else the last
    ([batch, features], [batch, sequence, features])."""
    def axis(t: str, ndim: int) -> int | None:
        reads = ix.readers(t)
        if ndim < 2 or not reads or any(slot < 0 for _, slot in reads):  # slot -1: inside an If/Loop body
            return None
        readers = [ix.nodes[i] for i, _ in reads]
        if any(n.op_type not in _LINEAR_READERS for n in readers):
            return None
        if ndim >= 4:
            return 1
        conv = ix.producer_op(t) == "Conv" or any(n.op_type == "Conv" for n in readers)
        return 1 if ndim == 3 and conv else ndim - 1
    return axis


def observed(method: str) -> str:
    """The observation a ``calibration`` method needs: 'output' (`search`) starts from min/max."""
    return "minmax" if method == "output" else method


def _range(obs: MinMaxObserver, opts: Quantize) -> tuple[float, float]:
    if isinstance(obs, HistogramObserver):
        return obs.range(observed(opts.calibration), percentile=opts.percentile, symmetric=False, dtype=opts.activation_dtype)
    return obs.range("minmax")
