"""Running models: every onnxruntime session graph-opt makes, and the runtimes `verify` runs under.

onnxruntime sessions (`make_session`, options from `session_options`): CPU execution provider,
one inter-op thread, sequential execution, no spinning worker threads, and per call site the
graph optimizations (none, "basic" or all), the intra-op threads (`cores`: 0 means one per
core this process may run on), whether QDQ pairs may become integer kernels, and whether the
CPU memory arena is on. The weights reach onnxruntime as arrays beside a weightless model
(`external_data.detached`), never inside a serialized copy; a model whose weights are on disk, or
that protobuf cannot serialize (≥ 2 GB), is read from a temporary external-data copy. A model
onnxruntime refuses raises `InvalidModelError`; a run that fails raises `GraphOptError` with the
first line of onnxruntime's message.

`run_model` runs every output over a `Dataset` (batches cut on each input's batch axis, outputs
concatenated on axis 0); `graph_opt.intermediates` streams internal tensors instead.
`profile_nodes` times several models node by node with onnxruntime's profiler, as deployed
(optimizations on), the models alternating run by run.
`release_memory` hands the heap that freed sessions left behind back to the OS (glibc's
``malloc_trim``; a no-op elsewhere), so that a later phase does not start from an earlier
phase's peak.

The runtimes a model is verified under (`get`): ``onnxruntime``, always, and ``openvino``
(``pip install 'graph-opt[openvino]'``), OpenVINO's CPU plugin, which reads ONNX directly (QDQ
included) and always compiles with its own graph transformations, so that its `run` is the
model as OpenVINO deploys it. A `Runtime` can `load` a model (None, or the one-line reason it
refuses it), `run` it over a `Dataset` (every output in the graph's order, concatenated over
batches) and time several models interleaved (`latency`, medians in ms). Parity is computed by
`graph_opt.verify` on what `run` returns, so every metric means the same under every runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import onnx
import onnxruntime as ort

from graph_opt.data import Dataset, batch_size_for
from graph_opt.errors import GraphOptError, InvalidModelError
from graph_opt.external_data import detached, handed_over, names_read, needs_external_data
from graph_opt.model_io import session_source
from graph_opt.onnx_util import first_line
from graph_opt.progress import progress

RUNTIMES = ("onnxruntime", "openvino")


def session_options(*, optimize: bool | Literal["basic"] = False, threads: int = 1, fuse_qdq: bool = True,
                    arena: bool = True) -> ort.SessionOptions:
    """``optimize``: every onnxruntime graph optimization (True), none (False), or ``"basic"`` ones
    only: constant folding and redundant-node removal, without the fusions and the layout changes
    that keep reordered copies of the convolution weights (a session run on a few batches then
    starts about as fast and takes less memory). ``fuse_qdq=False`` keeps
    QuantizeLinear/DequantizeLinear as the float ops they define even with optimizations on (no
    integer kernels), while constant folding, layout and the other float optimizations still
    apply. ``arena=False`` turns off onnxruntime's CPU memory arena and memory pattern: each
    buffer is freed when its last reader is done instead of the arena keeping the largest
    batch's pages. ``threads`` 0 is onnxruntime's default, one per core."""
    opts = ort.SessionOptions()
    levels = {True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    opts.graph_optimization_level = levels[optimize]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # Spinning worker threads steal CPU from the next session timed on a 2-core machine.
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not fuse_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if not arena:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    return opts


def make_session(model: onnx.ModelProto, *, optimize: bool | Literal["basic"] = False, threads: int = 1, fuse_qdq: bool = True,
                 arena: bool = True, weights: Mapping[str, np.ndarray] | None = None,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; a model that onnxruntime refuses raises `InvalidModelError`.

    The weights reach onnxruntime as arrays, not inside the serialized model (`external_data.detached`):
    `weights`, the arrays of a model made by `detached` and then edited (a copy with extra
    outputs), or else `model`'s own. A model with weights kept on disk reaches onnxruntime
    through a temporary external-data copy (protobuf cannot serialize it), see
    `model_io.session_source`. ``profile_prefix``: onnxruntime's profiler on, its file named so."""
    if weights is None and not needs_external_data(model):
        model, weights = detached(model)
    options = session_options(optimize=optimize, threads=threads, fuse_qdq=fuse_qdq, arena=arena)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if weights:
        options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()])
    try:
        with session_source(model) as source:
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = first_line(exc)
        raise InvalidModelError(f"onnxruntime cannot load the model: {first[:300]}") from None


def weights_dequantized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """`model` with every main-graph DequantizeLinear of constant inputs (a quantized weight) replaced
    by its output, and the weights to hand to `make_session`; None when there is none, or when the
    weights stay on disk.

    The outputs are computed once by onnxruntime's own DequantizeLinear kernel, the one that runs
    them when optimizations are off, and the activations' QuantizeLinear/DequantizeLinear still run
    as written, so the result emulates the same integer arithmetic in float without dequantizing
    every weight again for every batch. Convolutions give the same values bit for bit
    (tests/core/test_verify.py); a MatMul whose weight is now an initializer may take another
    kernel path, whose last-bit differences an activation's rounding can carry further."""
    g = model.graph
    consts = {t.name for t in g.initializer}
    folds = [n for n in g.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")
             and all(not x or x in consts for x in n.input)]
    if not folds or needs_external_data(model):
        return None
    shell, weights = detached(model)
    stubs = {t.name: t for t in shell.graph.initializer}
    needed = list(dict.fromkeys(x for n in folds for x in n.input if x))
    outputs = [onnx.helper.make_tensor_value_info(n.output[0], stubs[n.input[1]].data_type, None) for n in folds]
    mini = onnx.helper.make_model(onnx.helper.make_graph(folds, "weights", [], outputs, [stubs[x] for x in needed]),
                                  opset_imports=list(model.opset_import), ir_version=model.ir_version)
    session = make_session(mini, weights={x: weights[x] for x in needed if x in weights})
    values = session.run([o.name for o in outputs], {})
    folded = {o.name: np.asarray(v) for o, v in zip(outputs, values)}
    for i in reversed(range(len(g.node))):  # the shell's nodes are in the model's order
        if g.node[i].op_type == "DequantizeLinear" and g.node[i].output[0] in folded:
            del shell.graph.node[i]
    read = names_read(shell.graph) | {o.name for o in g.output}
    live = [t for t in shell.graph.initializer if t.name in read]
    del shell.graph.initializer[:]
    shell.graph.initializer.extend(live)
    shell.graph.initializer.extend(handed_over(name, a) for name, a in folded.items())
    weights = {k: v for k, v in weights.items() if k in read} | folded
    return shell, weights


def cores(threads: int) -> int:
    """The threads to use for `threads` (0: one per core this process may run on)."""
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_memory() -> None:
    """Hand the heap that freed sessions and arrays left behind back to the OS (glibc keeps it
    otherwise, so each later phase would start from the earlier phases' peak). No-op elsewhere.
    No gc.collect: sessions and arrays go with their last reference, and a full collection
    is slow with onnx and numpy loaded."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# Automatic batches (`run_batches` with batch_size 0): about this many bytes of requested outputs
# per batch, at most STREAM_MAX_BATCH samples.
STREAM_BUDGET_BYTES = 64 << 20
STREAM_MAX_BATCH = 64
# Sessions that reduce inside onnxruntime return scalars, but onnxruntime's own buffers still grow
# with the batch: a few samples per run amortize the cost of a run, more only hold memory, unless
# the weights each run reads outweigh the batch.
REDUCE_BATCH = 4


def run_batches(session, names: list[str], data: Dataset, batch_size: int, desc: str = "run", *,
                budget_bytes: int | None = None, batch_bytes: Callable[[list[np.ndarray]], float] | None = None,
                weight_bytes: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """Run `session` (anything with onnxruntime's ``run(names, feed)``) over `data` batch by batch,
    in order, yielding ``(feed, outputs)``; each feed cuts every input on its own batch axis.

    ``batch_size`` samples per run (a model whose batch is static: always that many, `data.fixed`),
    or 0 for automatic: the first run takes one sample, the rest go in batches whose requested
    outputs take about ``budget_bytes`` (default `STREAM_BUDGET_BYTES`; at most `STREAM_MAX_BATCH`
    samples). ``batch_bytes(outputs)`` overrides how a batch's memory is counted (a session that
    reduces inside onnxruntime counts the tensors it reduced, not the scalars it returns); such a
    session gives ``weight_bytes``, the bytes of its model's weights: its batches take half the
    budget, and stop at `REDUCE_BATCH` samples or at as many as the weights outweigh. A failing run
    raises `GraphOptError` with onnxruntime's first line."""
    budget = STREAM_BUDGET_BYTES if budget_bytes is None else budget_bytes
    n = len(data)
    step = data.fixed or batch_size
    total = math.ceil(n / step) if step else None

    def run():
        start, bs = 0, step or 1
        while start < n:
            stop = min(start + bs, n)
            feed = data.slice(start, stop)
            try:
                outs = session.run(names, feed) if names else []
            except Exception as exc:
                hint = " (random inputs may not suit this model: give real ones with --data)" if data.seeded_random else ""
                raise GraphOptError(f"onnxruntime failed to run the model on {data.source} ({desc}): "
                                    f"{first_line(exc)[:300]}{hint}") from None
            if not step and start == 0:
                size = batch_bytes(outs) if batch_bytes else sum(int(np.asarray(o).nbytes) for o in outs)
                bs = _automatic_batch(max(size / (stop - start), 1.0), budget, weight_bytes)
            yield feed, outs
            del outs
            start = stop

    yield from progress(run(), total=total, desc=desc)


def _automatic_batch(per_sample: float, budget: int, weight_bytes: int | None) -> int:
    """Samples per run after the first (see `run_batches`)."""
    if weight_bytes is None:
        bs = min(STREAM_MAX_BATCH, budget // per_sample)
    else:
        bs = min(STREAM_MAX_BATCH, budget // 2 // per_sample, max(REDUCE_BATCH, weight_bytes // per_sample))
    return int(max(1, bs))


def run_model(model_or_session: onnx.ModelProto | ort.InferenceSession, data: Dataset, *,
              batch_size: int | None = None, threads: int = 1, desc: str = "run") -> dict[str, np.ndarray]:
    """All outputs of the model over every sample of `data`, concatenated on axis 0."""
    if isinstance(model_or_session, onnx.ModelProto):
        data = data.laid_out(model_or_session)
        session = make_session(model_or_session, threads=threads)
        bs = batch_size or batch_size_for(model_or_session)
    else:
        session = model_or_session
        bs = batch_size or 32
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for _feed, outs in run_batches(session, names, data, bs, desc):
        for name, value in zip(names, outs):
            chunks[name].append(np.asarray(value))
    return {name: _concat(parts) for name, parts in chunks.items()}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(p.ndim and p.shape[1:] == parts[0].shape[1:] for p in parts):
        return np.concatenate(parts)
    return np.concatenate([p.ravel() for p in parts])  # varying shapes: compare element-wise


@dataclass(frozen=True)
class NodeTime:
    """One kernel of an optimized session: onnxruntime's node name (after its fusions), its op
    type and its median time per run in microseconds."""

    name: str
    op: str
    us: float


def profile_nodes(models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray], *, runs: int = 20,
                  warmup: int = 3, threads: int = 1) -> list[list[NodeTime]]:
    """Each model's kernels timed by onnxruntime's profiler, in the order they first ran.

    Sessions as `measure_latency` makes them (every optimization on, spinning stopped); the first
    `warmup` runs of each are left out, the models alternate run by run `runs` times, so that
    a change in the machine's speed reaches all of them; each node's time is its median over the
    runs. The profiler's files go to a temporary folder, removed before returning."""
    out: list[list[NodeTime]] = []
    with tempfile.TemporaryDirectory(prefix="graph-opt-profile-") as tmp:
        sessions = []
        for k, model in enumerate(models):
            sessions.append(make_session(model, optimize=True, threads=threads,
                                         profile_prefix=os.path.join(tmp, f"m{k}")))
        names = [[o.name for o in s.get_outputs()] for s in sessions]
        try:
            for _ in range(max(warmup, 0) + runs):
                for s, n in zip(sessions, names):
                    s.run(n, dict(feed))
        except Exception as exc:
            raise GraphOptError(f"onnxruntime failed to run the model for profiling: {first_line(exc)[:300]}") from None
        for s in sessions:
            with open(s.end_profiling()) as fh:
                events = json.load(fh)
            times: dict[tuple[str, str], list[float]] = {}
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    key = (e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", ""))
                    times.setdefault(key, []).append(float(e["dur"]))
            # the first `warmup` runs of every node are left out (first-run allocation and packing)
            out.append([NodeTime(name, op, float(np.median(v[warmup:] if len(v) > warmup else v)))
                        for (name, op), v in times.items()])
    return out


# -- the runtimes `verify --runtime` offers ----------------------------------------------------


class Runtime(Protocol):
    name: str

    def load(self, model: onnx.ModelProto) -> str | None: ...

    def run(self, model: onnx.ModelProto, data: Dataset, *, threads: int = 1) -> dict[str, np.ndarray]: ...

    def latency(self, models: list[onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int = 100,
                threads: int = 1) -> list[float]: ...


class OnnxRuntime:
    """The parity harness's sessions: graph optimizations off for `run`, on for `latency` (as deployed)."""

    name = "onnxruntime"

    def load(self, model: onnx.ModelProto) -> str | None:
        try:
            make_session(model)
        except GraphOptError as exc:
            return first_line(exc)
        return None

    def run(self, model: onnx.ModelProto, data: Dataset, *, threads: int = 1) -> dict[str, np.ndarray]:
        return run_model(model, data, threads=threads, desc="onnxruntime")

    def latency(self, models, feed, *, runs=100, threads=1):
        from graph_opt.stats import measure_latency

        return measure_latency(models, feed, runs=runs, threads=threads)


def _openvino_reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO error (its first lines name source files and checks)."""
    lines = [ln.strip(" -") for ln in str(exc).splitlines() if ln.strip()]
    noise = ("Exception from", "Check ", "FrontEnd API failed", "Model wasn't", "Summary", "To facilitate")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    if useful and useful[0].endswith("message:"):  # 'Conv-16 with a message:': the message is on the next line
        return " ".join(useful[:2])[:300]
    return (useful[0] if useful else first_line(exc))[:300]


class OpenVino:
    """OpenVINO's CPU plugin; ``INFERENCE_NUM_THREADS`` follows ``threads``."""

    name = "openvino"

    def __init__(self):
        try:
            import openvino
        except ImportError:
            raise GraphOptError("--runtime openvino needs OpenVINO: pip install 'graph-opt[openvino]'") from None
        self.ov = openvino
        self.core = openvino.Core()

    def _compile(self, model: onnx.ModelProto, threads: int):
        ov_model = self.core.read_model(model.SerializeToString())
        return self.core.compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": max(1, threads)})

    def load(self, model: onnx.ModelProto) -> str | None:
        try:
            self._compile(model, 1)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for every refusal
            return _openvino_reason(exc)
        return None

    def run(self, model: onnx.ModelProto, data: Dataset, *, threads: int = 1) -> dict[str, np.ndarray]:
        try:
            compiled = self._compile(model, threads)
        except Exception as exc:
            raise GraphOptError(f"OpenVINO refuses the model: {_openvino_reason(exc)}") from None
        names = [o.name for o in model.graph.output]
        request = compiled.create_infer_request()
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
        bs = batch_size_for(model)
        for feed in data.batches(bs):
            try:
                result = request.infer(feed)
            except Exception as exc:
                raise GraphOptError(f"OpenVINO failed to run the model on {data.source}: {_openvino_reason(exc)}") from None
            for i, name in enumerate(names):
                chunks[name].append(np.array(result[compiled.output(i)]))
        return {n: np.concatenate(parts) if parts and parts[0].ndim else parts[0] for n, parts in chunks.items()}

    def latency(self, models, feed, *, runs=100, threads=1):
        requests = [self._compile(m, threads).create_infer_request() for m in models]
        for r in requests:
            for _ in range(5):
                r.infer(feed)
        times: list[list[float]] = [[] for _ in requests]
        for k in range(runs):  # interleaved, rotating order, as graph_opt.stats does for onnxruntime
            order = list(range(len(requests)))
            order = order[k % len(order):] + order[:k % len(order)]
            for i in order:
                start = time.perf_counter_ns()
                requests[i].infer(feed)
                times[i].append((time.perf_counter_ns() - start) / 1e6)
        return [float(np.median(t)) if t else math.nan for t in times]


def get(name: str) -> Runtime:
    """The runtime called `name` (one of `RUNTIMES`)."""
    if name == "onnxruntime":
        return OnnxRuntime()
    if name == "openvino":
        return OpenVino()
    raise GraphOptError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
