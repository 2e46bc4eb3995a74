"""Where `compare`'s steps run: prefix trees of pass specs, one per model, and the backends that
run their nodes (this process, worker processes, Ray tasks).

A tree's node is one step: a pass applied to its parent's model with the history of the accepted
rewrites before it, checked and verified against that model's original (`pipeline.run_step`).
A node depends only on its parent's model and history and every pass is seeded, so the results
are the same whatever the backend, the number of jobs and the order in which nodes complete.

Several trees (several models compared at once) share one pool of workers: every node whose
parent is done is submitted, whichever model it belongs to, so a task is one step of one
(model, pipeline). Models travel to workers as serialized bytes; a worker builds the runner of
a model (the original's reference outputs) once, the first time it meets one of its steps.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import onnx

from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError
from graph_opt.onnx_util import first_line
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.pipeline import StepOutcome, StepRecord, run_step, step_record
from graph_opt.verify import ParityReport, Reference

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'graph-opt[ray]'"


def pass_key(p: Pass) -> tuple[str, str]:
    """What makes two configured passes the same step: their class and their spec."""
    return f"{type(p).__module__}.{type(p).__qualname__}", p.spec()


# ---- the prefix tree ----

@dataclass(eq=False)
class Node:
    index: int  # creation order: a parent is always created before its children
    step: Pass | None  # None at the root (the original model)
    parent: Node | None
    children: dict[tuple[str, str], Node] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # pipelines whose last step this is
    record: StepRecord | None = None
    parity: ParityReport | None = None  # parity of the last accepted step up to here
    history: list[PassReport] = field(default_factory=list)  # reports of accepted rewrites
    blob: bytes | None = None  # the model serialized once, for workers

    @property
    def model(self) -> onnx.ModelProto:
        return self.record.model

    def serialized(self) -> bytes:
        if self.blob is None:
            self.blob = self.model.SerializeToString()
        return self.blob

    def specs(self) -> list[str]:
        """The specs of the steps from the original to here."""
        specs = []
        node = self
        while node.step is not None:
            specs.append(node.step.spec())
            node = node.parent
        return specs[::-1]

    def prefix(self) -> str:
        return " ".join(self.specs())


def tree(pipelines: Sequence[Sequence[Pass]]) -> tuple[Node, list[Node], list[list[Node]]]:
    """The root, every other node in creation order, and each pipeline's path of nodes."""
    root = Node(0, None, None)
    nodes: list[Node] = []
    paths = []
    for i, passes in enumerate(pipelines):
        node, path = root, []
        for p in passes:
            key = pass_key(p)
            if key not in node.children:
                child = Node(len(nodes) + 1, p, node)
                node.children[key] = child
                nodes.append(child)
            node = node.children[key]
            path.append(node)
        node.ends.append(i)
        paths.append(path)
    return root, nodes, paths


# ---- one step (runs wherever the backend puts it) ----

class Runner:
    """Runs one pass on one model against the original: the body of `Pipeline.run`'s loop."""

    def __init__(self, original: onnx.ModelProto, reference: Reference, calib: Dataset, *,
                 tolerances: dict[str, float], threads: int, seed: int, shapes: dict[str, tuple[int, ...]] | None):
        self.original, self.reference, self.calib = original, reference, calib
        self.tolerances, self.threads, self.seed, self.shapes = tolerances, threads, seed, shapes

    def step(self, p: Pass, model: onnx.ModelProto, history: list[PassReport], before: list[str]) -> StepOutcome:
        ctx = PassContext(data=self.calib, original=self.original, history=list(history), seed=self.seed,
                          shapes=self.shapes)
        return run_step(p, model, ctx, self.reference, self.tolerances, threads=self.threads, shapes=self.shapes,
                        before=before)


@dataclass
class Setup:
    """What a worker needs to build one model's `Runner`, sent once (the original as bytes)."""

    token: str  # "<run id>:<model index>": names this model of this run in a worker that outlives it
    original: bytes
    verify: Dataset
    calib: Dataset
    tolerances: dict[str, float]
    threads: int
    seed: int
    shapes: dict[str, tuple[int, ...]] | None

    def runner(self) -> Runner:
        original = onnx.ModelProto.FromString(self.original)
        reference = Reference(original, self.verify, threads=self.threads)
        return Runner(original, reference, self.calib, tolerances=self.tolerances, threads=self.threads,
                      seed=self.seed, shapes=self.shapes)


@dataclass
class Tree:
    """One model's prefix tree with what runs it: `runner` in this process, `setup` elsewhere
    (None for a run in this process)."""

    root: Node
    nodes: list[Node]
    runner: Runner
    setup: Setup | None


_SETUPS: dict[str, Setup] = {}  # per worker process: the setups of the current run (process pool)
_RUNNERS: dict[str, Runner] = {}  # per worker process: runners built so far


def _worker_init(setups: list[Setup]) -> None:
    _SETUPS.clear()
    _SETUPS.update((s.token, s) for s in setups)
    _RUNNERS.clear()


def _runner(setup: Setup | str) -> Runner:
    token = setup if isinstance(setup, str) else setup.token
    if token not in _RUNNERS:
        setup = _SETUPS[token] if isinstance(setup, str) else setup
        run_id = token.partition(":")[0]
        for old in [t for t in _RUNNERS if t.partition(":")[0] != run_id]:  # a Ray worker's earlier runs
            del _RUNNERS[old]
        _RUNNERS[token] = setup.runner()
    return _RUNNERS[token]


def _remote_step(setup: Setup | str, p: Pass, blob: bytes, history: list[PassReport], before: list[str]) -> StepOutcome:
    """A step in a worker: the model comes and goes as bytes."""
    out = _runner(setup).step(p, onnx.ModelProto.FromString(blob), history, before)
    if isinstance(out.model, onnx.ModelProto):
        out.model = out.model.SerializeToString()
    return out


def _apply(node: Node, out: StepOutcome) -> None:
    """Turn a step's outcome into the node's record, exactly as `Pipeline.run` records a step."""
    parent, p = node.parent, node.step
    rec = step_record(p, out, parent.record, parent.parity)
    node.history = parent.history if out.model is None else [*parent.history, out.report]
    node.record = rec
    node.parity = rec.parity if rec.accepted else parent.parity
    if not rec.accepted:
        log.warning("%s (after %s) rolled back: %s", p.spec(), parent.prefix() or "the original", rec.reason)


# ---- backends: each yields nodes as they complete, parents before their children ----

def run_trees(trees: list[Tree], *, jobs: int = 1, backend: str = "process",
              address: str | None = None) -> Iterator[Node]:
    """Every node of every tree, yielded as it completes (a parent before its children)."""
    if backend == "ray":
        return _run_ray(trees, jobs, address)
    if jobs == 1:
        return _run_here(trees)
    return _run_processes(trees, jobs)


def _run_here(trees: list[Tree]) -> Iterator[Node]:
    for t in trees:
        for node in t.nodes:
            _apply(node, t.runner.step(node.step, node.parent.model, node.parent.history, node.parent.specs()))
            yield node


def _run_processes(trees: list[Tree], jobs: int) -> Iterator[Node]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                             initargs=([t.setup for t in trees],)) as pool:
        pending: dict[Any, Node] = {}

        def submit(node: Node, token: str) -> None:
            for child in node.children.values():
                fut = pool.submit(_remote_step, token, child.step, node.serialized(), node.history, node.specs())
                pending[fut] = child
                tokens[child] = token

        tokens: dict[Node, str] = {}
        try:
            for t in trees:
                submit(t.root, t.setup.token)
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f].index):
                    node = pending.pop(fut)
                    _apply(node, fut.result())
                    yield node
                    submit(node, tokens.pop(node))
        finally:
            pool.shutdown(cancel_futures=True)


def import_ray():
    try:
        import ray
    except ImportError:
        raise GraphOptError(f"--backend ray needs the ray package ({RAY_EXTRA})") from None
    return ray


def _run_ray(trees: list[Tree], jobs: int, address: str | None = None) -> Iterator[Node]:
    """Ray tasks; joins a running Ray instance if there is one, else the cluster at `address`
    (``ray start --head`` somewhere, ``HOST:PORT`` or ``auto``), else starts a local one of `jobs` CPUs."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started and address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise GraphOptError(f"cannot attach to the Ray cluster at {address}: "
                                f"{first_line(exc, 200)}") from None
    elif started:
        ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_remote_step)
        pending: dict[Any, Node] = {}
        refs: dict[Node, Any] = {}

        def submit(node: Node, setup_ref: Any) -> None:
            for child in node.children.values():
                ref = remote.remote(setup_ref, child.step, node.serialized(), node.history, node.specs())
                pending[ref] = child
                refs[child] = setup_ref

        for t in trees:
            submit(t.root, ray.put(t.setup))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                node = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # a user mistake stays one line, as in this process
                    if isinstance(getattr(exc, "cause", None), GraphOptError):
                        raise exc.cause from None
                    raise
                _apply(node, out)
                yield node
                submit(node, refs.pop(node))
    finally:
        if started:
            ray.shutdown()
