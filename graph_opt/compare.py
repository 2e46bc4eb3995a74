"""Compare several pipelines (recipes, or orderings of passes) on one model with the same data.

The pipelines form a prefix tree of pass specs. Each distinct prefix is run once and its model
is handed to every pipeline that continues from it (the pass contract guarantees that a pass
never mutates its input, so sharing is safe): ``a b c`` and ``a c b`` run ``a`` once, and the six
orderings of three passes take 15 pass runs instead of 18::

    original ─ a ─ b ─ c        P1  a b c
             │   └ c ─ b        P2  a c b
             ├ b ─ a ─ c        P3  b a c
             ...

A step does exactly what `Pipeline.run` does: run the pass on its parent's model (with the
history of the accepted rewrites before it, which `reconstruct` reads), check the output
(onnx.checker, onnxruntime load), verify it against the *original* on the verification data,
and roll it back when it breaks a tolerance (the parent's model goes on). Each pipeline's result
is a `PipelineResult` whose steps are the tree nodes on its path.

Where the steps run (`graph_opt.fanout`): in this process (``jobs=1``), in ``jobs`` worker
processes, or as Ray tasks (``backend="ray"``, an optional extra); the results are the same
whatever the backend and the number of jobs. Several models are compared at once with
`Comparer.run_models`: one tree per model, every (model, step) a task of the same pool, one
`Comparison` per model. Latency is measured afterwards in this process: every distinct model of
every pipeline of a model together, interleaved in one run (`stats.measure_latency`).

Fidelity is one metric (``accuracy`` when the data has labels, else ``cosine``; or ``top1``,
``snr_db``); the original and each pipeline's final model are points of fidelity against file
size and against latency, and the Pareto front of each is marked (see `graph_opt.plot`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from graph_opt.data import Dataset
from graph_opt.errors import DataError, GraphOptError, SpecError
from graph_opt.fanout import Runner, Setup, Tree, import_ray, pass_key, run_trees, tree
from graph_opt.pass_base import Pass
from graph_opt.pipeline import PipelineResult, StepRecord, reference_for
from graph_opt.plot import Point, pareto_front, plot_front
from graph_opt.progress import progress
from graph_opt.registry import load_recipe, parse_spec
from graph_opt.report import _step_row, jsonable, table
from graph_opt.stats import ModelStats, measure_latency, model_stats
from graph_opt.verify import ParityReport

log = logging.getLogger(__name__)

Backend = Literal["process", "ray"]
METRICS = ("accuracy", "top1", "cosine", "snr_db")
MAX_PERMUTED = 6  # 720 orderings; 7 passes would be 5,040 pipelines


# ---- what to compare ----

@dataclass
class NamedPipeline:
    """One contender: a name for the tables and its configured passes, in order."""

    name: str
    passes: list[Pass]

    @property
    def ordering(self) -> str:
        """The passes as one `--order` string (specs separated by spaces)."""
        return " ".join(p.spec() for p in self.passes)


def parse_ordering(text: str, *, where: str = "ordering", passes: tuple[type[Pass], ...] | None = None) -> list[Pass]:
    """``"prune_channels:ratio=0.3 factorize_conv quantize"`` → configured passes, in order.

    Specs are separated by whitespace: a spec never contains a space, while commas belong to
    its options (``quantize:exclude_ops=Conv,Gemm``), so whitespace is the unambiguous separator.
    """
    pieces = text.split()
    if not pieces:
        raise SpecError(f"empty {where}: give pass specs separated by spaces, e.g. \"fold_batchnorm cleanup\"")
    out = []
    for piece in pieces:
        name = piece.partition(":")[0]
        if "," in name:
            raise SpecError(f"{where} {text!r}: {piece!r} is not a pass spec; separate the passes of an ordering "
                            f"with spaces: {' '.join(name.split(','))!r}")
        try:
            out.append(parse_spec(piece, passes))
        except SpecError as exc:
            raise SpecError(f"{where} {text!r}: {exc}") from None
    return out


def permutations(items: Sequence[Any]) -> list[list[Any]]:
    """Every ordering of `items`, in a stable order (lexicographic in the given positions)."""
    if len(items) > MAX_PERMUTED:
        raise SpecError(f"--permutations of {len(items)} passes would be {_factorial(len(items)):,} pipelines; "
                        f"at most {MAX_PERMUTED} passes")
    return [list(p) for p in itertools.permutations(items)]


def _factorial(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def named_pipelines(pipelines: Mapping[str, Any] | Sequence[Any]) -> list[NamedPipeline]:
    """Python API forms → named pipelines.

    A mapping name → passes, or a sequence whose items are `NamedPipeline`s, lists of passes or
    specs, or ordering strings (``"fold_batchnorm quantize"``). Unnamed ones are called P1, P2, …
    """
    items = list(pipelines.items()) if isinstance(pipelines, Mapping) else [(None, p) for p in pipelines]
    out = []
    for i, (name, item) in enumerate(items, 1):
        if isinstance(item, NamedPipeline):
            out.append(item)
            continue
        if isinstance(item, str):
            configured = parse_ordering(item)
        elif isinstance(item, Pass) or not isinstance(item, Sequence):
            raise SpecError(f"pipeline {name or i}: expected a list of passes or an ordering string, got "
                            f"{type(item).__name__} (a one-pass pipeline is [pass])")
        else:
            configured = [p if isinstance(p, Pass) else parse_spec(p) for p in item]
            if not configured:
                raise SpecError(f"pipeline {name or i} has no passes")
        out.append(NamedPipeline(str(name) if name is not None else f"P{i}", configured))
    return dedupe(out)


def cli_pipelines(*, recipes: Sequence[str] = (), orders: Sequence[str] = (),
                  permuted: Sequence[str] = ()) -> list[NamedPipeline]:
    """`--recipe FILE`… (named after the file), then `--order`… and `--permutations`… (P1, P2, …)."""
    out: list[NamedPipeline] = []
    for path in recipes:
        configured = load_recipe(path)
        if not configured:
            raise SpecError(f"recipe {path} has no passes")
        out.append(NamedPipeline(Path(path).stem, configured))
    numbered = [parse_ordering(text, where="--order") for text in orders]
    for text in permuted:
        numbered += permutations(parse_ordering(text, where="--permutations"))
    out += [NamedPipeline(f"P{i}", p) for i, p in enumerate(numbered, 1)]
    if not out:
        raise SpecError("nothing to compare: give --recipe FILE, --order \"SPEC SPEC ...\" or --permutations \"SPEC SPEC ...\"")
    return dedupe(out)


def dedupe(pipelines: list[NamedPipeline]) -> list[NamedPipeline]:
    """Drop repeated orderings (first one kept) and make names unique."""
    seen: dict[tuple, str] = {}
    names: set[str] = set()
    out = []
    for p in pipelines:
        key = tuple(pass_key(x) for x in p.passes)
        if key in seen:
            log.warning("%s repeats %s (%s); compared once", p.name, seen[key], p.ordering)
            continue
        name, k = p.name, 2
        while name in names:
            name, k = f"{p.name}-{k}", k + 1
        seen[key] = name
        names.add(name)
        out.append(NamedPipeline(name, p.passes))
    return out


# ---- the comparison ----

def resolve_metric(metric: str, data: Dataset) -> str:
    """``auto`` → ``accuracy`` when the data has labels, else ``cosine``; refuses a metric the data cannot give."""
    if metric == "auto":
        metric = "accuracy" if data.labels is not None else "cosine"
    if metric not in METRICS:
        raise GraphOptError(f"unknown fidelity metric {metric!r} (one of {', '.join(METRICS)})")
    if metric == "accuracy" and data.labels is None:
        raise DataError(f"fidelity metric 'accuracy' needs labels; {data.source} has none "
                        "(add a 'labels' array to the .npz, or choose --metric cosine)")
    return metric


@dataclass
class ModelCase:
    """One model to compare the pipelines on, with its data (`Comparer.run_models`)."""

    name: str
    model: onnx.ModelProto
    verify_data: Dataset
    calib_data: Dataset | None = None


class Comparer:
    """Several named pipelines, run on one model with the same data; shared prefixes run once."""

    def __init__(self, pipelines: list[NamedPipeline], *, verify_data: Dataset | None = None, calib_data: Dataset | None = None,
                 tolerances: dict[str, float] | None = None, metric: str = "auto", latency: bool = True,
                 latency_runs: int = 100, threads: int = 1, seed: int = 0,
                 shapes: dict[str, tuple[int, ...]] | None = None, jobs: int = 1, backend: Backend = "process",
                 address: str | None = None):
        if not pipelines:
            raise SpecError("nothing to compare: no pipelines")
        for pipeline in pipelines:  # a pass that cannot run here (an extra missing) refuses before any work
            for p in pipeline.passes:
                p.preflight()
        if jobs < 1:
            raise GraphOptError(f"--jobs must be at least 1 (got {jobs})")
        if backend not in ("process", "ray"):
            raise GraphOptError(f"unknown backend {backend!r} (process or ray)")
        if backend == "ray":
            import_ray()
        elif address:
            raise GraphOptError("--address names a Ray cluster: it needs --backend ray")
        if verify_data is not None:
            resolve_metric(metric, verify_data)  # a wrong metric refuses before any work
        elif metric not in (*METRICS, "auto"):
            raise GraphOptError(f"unknown fidelity metric {metric!r} (one of {', '.join(METRICS)})")
        self.pipelines = list(pipelines)
        self.verify_data = verify_data
        self.calib_data = calib_data if calib_data is not None else verify_data
        self.tolerances = dict(tolerances or {})
        self.metric = metric
        self.latency, self.latency_runs = latency, latency_runs
        self.threads, self.seed, self.shapes = threads, seed, shapes
        self.jobs, self.backend, self.address = jobs, backend, address

    def run(self, original: onnx.ModelProto) -> Comparison:
        return self.run_models([ModelCase("", original, self.verify_data, self.calib_data)])[0]

    def run_models(self, cases: list[ModelCase]) -> list[Comparison]:
        """The pipelines on each model with its own data, as one pool of steps (see `fanout`):
        one `Comparison` per model, in the order given."""
        run_id = uuid.uuid4().hex
        remote = self.backend == "ray" or self.jobs > 1
        trees, made = [], []
        for k, case in enumerate(cases):
            root, nodes, paths = tree([p.passes for p in self.pipelines])
            original, reference, upgraded = reference_for(case.model, case.verify_data,
                                                          [p.passes[0] if p.passes else None for p in self.pipelines],
                                                          threads=self.threads, shapes=self.shapes)
            baseline = StepRecord("original", "original", stats=model_stats(original, shapes=self.shapes),
                                  model=original, reason=upgraded)
            baseline.parity = reference.itself()
            root.record, root.parity = baseline, baseline.parity
            calib = case.calib_data if case.calib_data is not None else case.verify_data
            runner = Runner(original, reference, calib, tolerances=self.tolerances, threads=self.threads,
                            seed=self.seed, shapes=self.shapes)
            # the original travels as bytes only to workers; a serial run never copies its weights
            setup = Setup(f"{run_id}:{k}", original.SerializeToString(), case.verify_data, calib, self.tolerances,
                          self.threads, self.seed, self.shapes) if remote else None
            trees.append(Tree(root, nodes, runner, setup))
            made.append((case, original, baseline, nodes, paths))
        events = run_trees(trees, jobs=self.jobs, backend=self.backend, address=self.address)
        for _ in progress(events, total=sum(len(t.nodes) for t in trees), desc="steps"):
            pass
        out = []
        for case, original, baseline, nodes, paths in made:
            results = [PipelineResult(original, path[-1].model, baseline, [n.record for n in path], self.tolerances)
                       for path in paths]
            comparison = Comparison(original, baseline, self.pipelines, results, self.tolerances,
                                    resolve_metric(self.metric, case.verify_data), pass_runs=len(nodes),
                                    data_source=case.verify_data.source, samples=len(case.verify_data), name=case.name)
            if self.latency:
                self._measure_latency(comparison, case.verify_data)
            out.append(comparison)
        return out

    def _measure_latency(self, comparison: Comparison, data: Dataset) -> None:
        """Every distinct model (by content) of every pipeline, interleaved in one run."""
        records = [comparison.baseline, *(s for r in comparison.results for s in r.steps)]
        digests: dict[int, str] = {}
        unique: dict[str, onnx.ModelProto] = {}
        for rec in records:
            if id(rec.model) not in digests:
                digest = hashlib.sha256(rec.model.SerializeToString()).hexdigest()
                digests[id(rec.model)] = digest
                unique.setdefault(digest, rec.model)
        feed = data.sample(0)
        times = dict(zip(unique, measure_latency(list(unique.values()), feed, runs=self.latency_runs,
                                                 threads=self.threads)))
        for rec in records:
            rec.stats.latency_ms = times[digests[id(rec.model)]]
        comparison.latency = {"runs": self.latency_runs, "models": len(unique), "threads": self.threads}


@dataclass
class Comparison:
    """The outcome: one `PipelineResult` per pipeline (steps shared along common prefixes)."""

    original: onnx.ModelProto
    baseline: StepRecord
    pipelines: list[NamedPipeline]
    results: list[PipelineResult]
    tolerances: dict[str, float]
    metric: str
    pass_runs: int  # pass invocations, one per distinct prefix
    data_source: str = ""
    samples: int = 0
    latency: dict[str, int] | None = None  # how latency was measured (None: not measured)
    name: str = ""  # the model's name when several were compared

    @property
    def steps_without_sharing(self) -> int:
        return sum(len(p.passes) for p in self.pipelines)

    def fidelity(self, parity: ParityReport | None) -> float | None:
        if parity is None:
            return None
        return parity.accuracy_candidate if self.metric == "accuracy" else parity.metric(self.metric)

    def points(self) -> list[Point]:
        """The original, then each pipeline's final model (its last accepted parity)."""
        def point(label: str, stats: ModelStats, parity: ParityReport | None, reference: bool = False) -> Point:
            return Point(label, stats.file_bytes, stats.latency_ms, self.fidelity(parity), reference)

        return [point("original", self.baseline.stats, self.baseline.parity, True),
                *(point(p.name, r.steps[-1].stats, r.final_parity) for p, r in zip(self.pipelines, self.results))]

    def front(self, axis: Literal["size", "latency"]) -> list[bool]:
        """Pareto flags for `points()`: fidelity against file size or against latency."""
        return pareto_front([(getattr(p, axis), p.fidelity) for p in self.points()])

    def front_names(self, axis: Literal["size", "latency"]) -> list[str]:
        return [p.label for p, on in zip(self.points(), self.front(axis)) if on]

    # ---- rendering ----

    def _rows(self, timings: bool) -> tuple[list[str], list[list[str]]]:
        headers = ["pipeline", "step", "params", "size", "MACs", "latency", "cosine", "SNR dB", "top-1 agr", "accuracy",
                   "time", "status", "Pareto"]
        base = self.baseline.stats
        flags = list(zip(self.front("size"), self.front("latency")))

        def pareto(k: int) -> str:
            size, lat = flags[k]
            return ", ".join(n for n, on in (("size", size), ("latency", lat)) if on)

        rows = [["original", *_step_row(self.baseline, base, True), pareto(0)]]
        rows[0][1] = ""
        seen: set[int] = set()
        for k, (pipe, result) in enumerate(zip(self.pipelines, self.results), 1):
            for j, rec in enumerate(result.steps):
                row = [pipe.name, *_step_row(rec, base, False), pareto(k) if j == len(result.steps) - 1 else ""]
                if id(rec) in seen:
                    row[headers.index("time")] = "shared"
                seen.add(id(rec))
                rows.append(row)
        width = max(len(r[1]) for r in rows)
        for r in rows:  # the table right-aligns every column but the first: keep step names flush left
            r[1] = r[1].ljust(width)
        if not timings:
            t = headers.index("time")
            headers = headers[:t] + headers[t + 1:]
            rows = [r[:t] + r[t + 1:] for r in rows]
        return headers, rows

    def legend(self) -> list[str]:
        """Each pipeline's passes, spelled as an `--order` argument (to copy)."""
        width = max(len(p.name) for p in self.pipelines)
        return [f"{p.name.ljust(width)}  {p.ordering}" for p in self.pipelines]

    def notes(self) -> list[str]:
        out, seen = [], set()
        for pipe, result in zip(self.pipelines, self.results):
            for rec in result.steps:
                if not rec.accepted and id(rec) not in seen:
                    out.append(f"{pipe.name} {rec.spec}: rolled back ({rec.reason})")
                seen.add(id(rec))
        return out

    def summary(self) -> list[str]:
        lines = [f"{self.pass_runs} pass runs for {len(self.pipelines)} pipelines of {self.steps_without_sharing} steps "
                 "(shared prefixes run once)"]
        lines.append(f"Pareto front ({self.metric} against file size): {', '.join(self.front_names('size')) or '-'}")
        if self.latency:
            lines.append(f"Pareto front ({self.metric} against latency): {', '.join(self.front_names('latency')) or '-'}")
        return lines

    def table(self, *, timings: bool = True) -> str:
        """The legend, one table (per pipeline, per step), rollbacks and the Pareto fronts, as text."""
        headers, rows = self._rows(timings)
        parts = ["\n".join(self.legend()), "", table(headers, rows)]
        parts += ["- " + n for n in self.notes()]
        parts += ["", *self.summary()]
        return "\n".join(parts)

    def markdown(self, *, source: str = "", plot: str | None = None) -> str:
        headers, rows = self._rows(timings=True)
        lat = self.latency
        how = (f"median of {lat['runs']} runs per model, {lat['models']} distinct models interleaved in one run, "
               f"{lat['threads']} thread(s)") if lat else "not measured"
        lines = ["# graph-opt compare", ""]
        if source:
            lines.append(f"- model: `{source}`")
        lines += [f"- verification data: {self.data_source} ({self.samples} samples)",
                  f"- fidelity: {self.metric}" + (" on the labels" if self.metric == "accuracy" else " against the original"),
                  f"- tolerances: {', '.join(f'{k}={v:g}' for k, v in self.tolerances.items()) or 'none'}",
                  f"- latency (onnxruntime CPU, all optimizations on): {how}", "",
                  "## Pipelines", "", _md_table(["pipeline", "passes, in order"],
                                                 [[p.name, " → ".join(f"`{x.spec()}`" for x in p.passes)] for p in self.pipelines]),
                  "", "## Results", "",
                  "Ratios against the original. `shared`: the step was run once for an earlier pipeline with the same prefix.",
                  "", _md_table(headers, rows), ""]
        lines += [f"- {n}" for n in self.notes()]
        lines += ["", "## Pareto front", "", *(f"- {s}" for s in self.summary()), ""]
        if plot:
            lines += [f"![{self.metric} against file size and latency]({plot})", ""]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        points = self.points()
        size, lat = self.front("size"), self.front("latency")
        base = self.baseline.stats

        def ratio(v: float | None, b: float | None) -> float | None:
            return None if v is None or not b else v / b

        def final(k: int) -> dict[str, Any]:
            st = (self.baseline if k == 0 else self.results[k - 1].steps[-1]).stats
            return {"params": st.params, "file_bytes": st.file_bytes, "macs": st.macs, "latency_ms": st.latency_ms,
                    "params_ratio": ratio(st.params, base.params), "size_ratio": ratio(st.file_bytes, base.file_bytes),
                    "macs_ratio": ratio(st.macs, base.macs), "latency_ratio": ratio(st.latency_ms, base.latency_ms),
                    "fidelity": points[k].fidelity, "pareto": {"size": size[k], "latency": lat[k]}}

        return jsonable({
            "metric": self.metric,
            "data": {"source": self.data_source, "samples": self.samples},
            "tolerances": dict(self.tolerances),
            "pass_runs": self.pass_runs,
            "steps_without_sharing": self.steps_without_sharing,
            "latency": self.latency,
            "original": {**self.baseline.to_dict(), "final": final(0)},
            "pipelines": [{"name": p.name, "passes": [x.spec() for x in p.passes], "ordering": p.ordering,
                           "final": final(k), **r.to_dict()}
                          for k, (p, r) in enumerate(zip(self.pipelines, self.results), 1)],
            "pareto": {"size": self.front_names("size"), "latency": self.front_names("latency")},
        })

    def plot(self, path: str | Path, *, title: str = "") -> Path:
        """PNG of fidelity against size and latency (raises `plot.PlotUnavailable` without matplotlib)."""
        return plot_front(self.points(), path, metric=self.metric, title=title)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.strip().replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Comparisons:
    """`compare` over several models: one `Comparison` per model, in the order given."""

    items: list[Comparison]

    def table(self, *, timings: bool = True) -> str:
        return "\n\n".join(f"== {c.name}\n{c.table(timings=timings)}" for c in self.items)

    def markdown(self, *, plots: Mapping[str, str] | None = None) -> str:
        """One document: a section per model (its plot when `plots` names one)."""
        parts = [f"# graph-opt compare: {len(self.items)} models", ""]
        for c in self.items:
            body = c.markdown(source=c.name, plot=(plots or {}).get(c.name))
            parts.append(body.replace("# graph-opt compare", f"## {c.name}", 1).replace("\n## ", "\n### "))
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"models": {c.name: c.to_dict() for c in self.items}}

