"""Consumers a model is verified under: onnxruntime (always) and OpenVINO (optional extra).

A deployment pipeline ships one ONNX file to several runtimes, and a rewrite one of them fuses
may run unfused, slower or differently in another. `get(name)` gives a `Runtime` that can
`load` a model (None, or the one-line reason it refuses it), `run` it over a `Dataset` (every
output, concatenated over batches, in the graph's output order and names) and time several
models interleaved (`latency`, medians in ms). Parity is computed by `graph_opt.verify` on what
`run` returns, so every metric means the same under every runtime.

- ``onnxruntime``: the parity harness's CPU sessions (graph optimizations off for `run`, on for
  `latency`, as deployed), through `graph_opt.verify` and `graph_opt.stats`.
- ``openvino``: OpenVINO's CPU plugin (``pip install 'graph-opt[openvino]'``), which reads ONNX
  directly (QDQ included) and always compiles with its own graph transformations: `run` is the
  model as OpenVINO deploys it. ``INFERENCE_NUM_THREADS`` follows ``threads``.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

import numpy as np
import onnx

from graph_opt.data import Dataset, batch_size_for
from graph_opt.errors import GraphOptError
from graph_opt.onnx_util import first_line

RUNTIMES = ("onnxruntime", "openvino")


class Runtime(Protocol):
    name: str

    def load(self, model: onnx.ModelProto) -> str | None: ...

    def run(self, model: onnx.ModelProto, data: Dataset, *, threads: int = 1) -> dict[str, np.ndarray]: ...

    def latency(self, models: list[onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int = 100,
                threads: int = 1) -> list[float]: ...


class OnnxRuntime:
    name = "onnxruntime"

    def load(self, model: onnx.ModelProto) -> str | None:
        from graph_opt.verify import make_session

        try:
            make_session(model)
        except GraphOptError as exc:
            return first_line(exc)
        return None

    def run(self, model: onnx.ModelProto, data: Dataset, *, threads: int = 1) -> dict[str, np.ndarray]:
        from graph_opt.verify import run_model

        return run_model(model, data, threads=threads, desc="onnxruntime")

    def latency(self, models, feed, *, runs=100, threads=1):
        from graph_opt.stats import measure_latency

        return measure_latency(models, feed, runs=runs, threads=threads)


def _openvino_reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO error (its first lines name source files and checks)."""
    lines = [ln.strip(" -") for ln in str(exc).splitlines() if ln.strip()]
    noise = ("Exception from", "Check ", "FrontEnd API failed", "Model wasn't", "Summary", "To facilitate")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    return (" ".join(useful[:2]) if useful[0:1] and useful[0].endswith("message:") else useful[0] if useful else first_line(exc))[:300]


class OpenVino:
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
    if name == "onnxruntime":
        return OnnxRuntime()
    if name == "openvino":
        return OpenVino()
    raise GraphOptError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
