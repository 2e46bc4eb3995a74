"""The Python API: the same operations as the CLI (`optimize`, `compare`, `verify`, `inspect`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_opt.compare import Backend, Comparer, Comparison, Comparisons, ModelCase, NamedPipeline, named_pipelines
from graph_opt.data import Dataset, load_data
from graph_opt.errors import GraphOptError
from graph_opt.intermediates import divergence, feature_distances
from graph_opt.external_data import stored_bytes
from graph_opt.model_io import load_model
from graph_opt.pass_base import Pass
from graph_opt.pipeline import Pipeline, PipelineResult
from graph_opt.registry import parse_spec, with_simplify
from graph_opt.runtime import get as get_runtime
from graph_opt.stats import ModelStats, measure_latency, model_stats
from graph_opt.verify import ParityReport, compare_outputs
from graph_opt.verify import verify as _verify

# The default recipe: every pass that is exact and always safe. `simplify` also runs first in every
# other pipeline unless `simplify=False`.
DEFAULT_PASSES = ("simplify", "fold_batchnorm", "cleanup")


def _model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_model(model_or_path)


def _passes(passes: Sequence[Pass | str] | None, simplify: bool = True) -> list[Pass]:
    configured = [p if isinstance(p, Pass) else parse_spec(p) for p in (passes if passes is not None else DEFAULT_PASSES)]
    return with_simplify(configured, simplify)


def optimize(model_or_path: onnx.ModelProto | str | os.PathLike, passes: Sequence[Pass | str] | None = None, *,
             data: Any = None, calib_data: Any = None, shapes: dict[str, tuple[int, ...]] | None = None,
             tolerances: dict[str, float] | None = None, rollback: bool = True, latency: bool = True,
             latency_runs: int | None = None, latency_steps: bool = False, threads: int = 1, seed: int = 0,
             n_random: int = 8, simplify: bool = True, verify_threads: int = 0) -> PipelineResult:
    """Run `passes` (configured passes or `name:key=value` specs) and verify against the original.

    `simplify` (the pass of that name) runs first unless `simplify=False` or `passes` starts with it.
    `data` (npz path, directory, dict of arrays, CalibrationDataReader, Dataset, or None for seeded
    random inputs) is used for verification, and for calibration unless `calib_data` is given.
    Latency (``latency``) is measured for the original and the final model, and for every step
    with ``latency_steps``; ``latency_runs`` None sizes the interleaved rounds by time
    (`graph_opt.stats.measure_latency`). ``threads``: onnxruntime's intra-op threads for the latency;
    ``verify_threads``: for running the models over the data (0: one per core).
    """
    model = _model(model_or_path)
    configured = _passes(passes, simplify)
    verify_data = load_data(data, model, shapes=shapes, n_random=n_random, seed=seed)
    calib = load_data(calib_data, model, shapes=shapes, seed=seed) if calib_data is not None else verify_data
    pipeline = Pipeline(configured, verify_data=verify_data, calib_data=calib, tolerances=tolerances,
                        rollback=rollback, latency=latency, latency_runs=latency_runs,
                        latency_steps=latency_steps, threads=threads, seed=seed, shapes=shapes,
                        verify_threads=verify_threads)
    return pipeline.run(model)


def compare(model_or_path: onnx.ModelProto | str | os.PathLike, pipelines: Any, *, data: Any = None,
            calib_data: Any = None, shapes: dict[str, tuple[int, ...]] | None = None,
            tolerances: dict[str, float] | None = None, metric: str = "auto", latency: bool = True,
            latency_runs: int | None = None, threads: int = 1, seed: int = 0, n_random: int = 8, jobs: int = 1,
            backend: Backend = "process", simplify: bool = True, address: str | None = None) -> Comparison:
    """Run several pipelines on one model with the same data; work shared by common prefixes runs once.

    `pipelines`: a mapping name → passes, or a sequence of pass lists (configured passes or specs)
    or ordering strings (``"prune_channels:ratio=0.3 quantize"``, specs separated by spaces), named
    P1, P2, …; ``from graph_opt.compare import permutations`` lists every ordering of a few passes. `jobs` > 1
    runs the steps in that many processes (`backend="ray"`: as Ray tasks); the results do not
    depend on it. Worker processes are spawned: a script calling this with `jobs` > 1 needs the
    ``if __name__ == "__main__":`` guard. Latency of every model is measured afterwards, interleaved in one run.
    `metric` is the fidelity of the Pareto fronts: accuracy (with labels), top1, cosine or snr_db.
    Every pipeline starts with `simplify` (run once, shared) unless `simplify=False`.
    """
    model = _model(model_or_path)
    named = [NamedPipeline(p.name, with_simplify(p.passes, simplify)) for p in named_pipelines(pipelines)]
    verify_data = load_data(data, model, shapes=shapes, n_random=n_random, seed=seed)
    calib = load_data(calib_data, model, shapes=shapes, seed=seed) if calib_data is not None else verify_data
    return Comparer(named, verify_data=verify_data, calib_data=calib, tolerances=tolerances, metric=metric,
                    latency=latency, latency_runs=latency_runs, threads=threads, seed=seed, shapes=shapes,
                    jobs=jobs, backend=backend, address=address).run(model)


def compare_models(models: Mapping[str, onnx.ModelProto | str | os.PathLike] | Sequence[str | os.PathLike],
                   pipelines: Any, *, data: Any = None, shapes: dict[str, tuple[int, ...]] | None = None,
                   tolerances: dict[str, float] | None = None, metric: str = "auto", latency: bool = True,
                   latency_runs: int | None = None, threads: int = 1, seed: int = 0, n_random: int = 8, jobs: int = 1,
                   backend: Backend = "process", simplify: bool = True, address: str | None = None) -> Comparisons:
    """`compare` on several models at once: the same pipelines on each, one task per (model, step)
    in one pool of `jobs` workers (or Ray tasks), one `Comparison` per model.

    `models`: a mapping name → model or path, or paths (named after their file, made unique).
    `data`: None (seeded random inputs per model), a mapping name → data source, or a folder
    holding ``<name>.npz`` per model (a model without one gets random inputs). The results are
    those of `compare` on each model alone, whatever `jobs` and `backend`.
    """
    named = _named_models(models)
    pipes = [NamedPipeline(p.name, with_simplify(p.passes, simplify)) for p in named_pipelines(pipelines)]
    cases = []
    for name, model in named.items():
        source = data.get(name) if isinstance(data, Mapping) else data
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            source = Path(source) / f"{name}.npz"
            source = source if source.is_file() else None
        cases.append(ModelCase(name, model, load_data(source, model, shapes=shapes, n_random=n_random, seed=seed)))
    comparer = Comparer(pipes, tolerances=tolerances, metric=metric, latency=latency, latency_runs=latency_runs,
                        threads=threads, seed=seed, shapes=shapes, jobs=jobs, backend=backend, address=address)
    return Comparisons(comparer.run_models(cases))


def _named_models(models) -> dict[str, onnx.ModelProto]:
    if isinstance(models, Mapping):
        return {str(name): _model(m) for name, m in models.items()}
    out: dict[str, onnx.ModelProto] = {}
    for path in models:
        name, k = Path(path).stem, 2
        while name in out:
            name, k = f"{Path(path).stem}-{k}", k + 1
        out[name] = _model(path)
    if not out:
        raise GraphOptError("nothing to compare: no models")
    return out


def verify(original: onnx.ModelProto | str | os.PathLike, candidate: onnx.ModelProto | str | os.PathLike, *,
           data: Any = None, labels: Any = None, shapes: dict[str, tuple[int, ...]] | None = None,
           tolerances: dict[str, float] | None = None, threads: int = 1, seed: int = 0,
           n_random: int = 8, temperature: float = 1.0, kd_alpha: float = 1.0, layers: bool = False,
           features: Sequence[str | tuple[str, str]] = (), runtime: str = "onnxruntime") -> ParityReport:
    """Compare `candidate` to `original` under onnxruntime (optimizations off) on the same inputs.

    `runtime="openvino"` runs both under OpenVINO's CPU plugin instead (as it deploys them) and
    adds the candidate's latency ratio there (`report.latency_ratio`).

    `layers=True` adds the per-layer divergence (SNR of every tensor both models compute, in the
    original's order); `features` names intermediate tensors (or (teacher, student) pairs when a
    rewrite renamed them) whose feature-map distance ½‖A_s − A_t‖²/n is reported.
    """
    ref = _model(original)
    cand = _model(candidate)
    dataset: Dataset = load_data(data, ref, shapes=shapes, n_random=n_random, seed=seed)
    if labels is not None:
        dataset = dataset.with_labels(labels if isinstance(labels, (str, os.PathLike)) else np.asarray(labels))
    if runtime == "onnxruntime":
        report = _verify(ref, cand, dataset, tolerances=tolerances, threads=threads, temperature=temperature,
                         kd_alpha=kd_alpha)
    else:
        rt = get_runtime(runtime)
        report = compare_outputs(rt.run(ref, dataset, threads=threads), rt.run(cand, dataset, threads=threads),
                                 labels=dataset.labels, temperature=temperature, kd_alpha=kd_alpha,
                                 data_source=f"{dataset.source} ({runtime})", tolerances=tolerances)
        base, other = rt.latency([ref, cand], dataset.sample(0), runs=50, threads=threads)
        report.runtime, report.latency_ratio = runtime, other / base
    if layers:
        report.layers = divergence(ref, cand, dataset, threads=threads, shapes=shapes)
    if features:
        pairs = [(f, f) if isinstance(f, str) else tuple(f) for f in features]
        report.features = feature_distances(ref, cand, dataset, pairs, threads=threads)
    return report


def inspect(model_or_path: onnx.ModelProto | str | os.PathLike, *, shapes: dict[str, tuple[int, ...]] | None = None,
            latency: bool = True, runs: int = 50, threads: int = 1, seed: int = 0) -> ModelStats:
    """Op histogram, parameters, bytes, MACs per layer and (optionally) median ORT latency."""
    path_bytes = None
    if not isinstance(model_or_path, onnx.ModelProto):
        path_bytes = stored_bytes(model_or_path) if os.path.isfile(model_or_path) else None
    model = _model(model_or_path)
    stats = model_stats(model, shapes=shapes, file_bytes=path_bytes)
    if latency:  # inspect shows what it can: no latency is a note, not a refusal
        try:
            feed = load_data(None, model, shapes=shapes, n_random=1, seed=seed).sample(0)
            stats.latency_ms = measure_latency([model], feed, runs=runs, threads=threads)[0]
        except GraphOptError as exc:
            stats.latency_note = f"latency not measured: {exc}"
    return stats
