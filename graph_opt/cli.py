"""The `graph-opt` command line: the only place that prints.

    graph-opt optimize MODEL -o OUT [--pass SPEC]... [--recipe FILE] [--data PATH] [--input-shape NAME=DIMS]...
                             [--tolerance METRIC=VALUE]... [--report FILE.json] [--no-simplify] [--json]
    graph-opt optimize --example -o OUT            (the built-in model and its data)
    graph-opt compare MODEL [MODEL...]|--example [--recipe FILE]... [--order "SPEC SPEC ..."]... [--permutations "SPEC SPEC ..."]
                      [--data PATH] [--out-dir DIR] [--jobs N] [--backend process|ray] [--json]
    graph-opt verify ORIGINAL CANDIDATE [--data PATH] [--labels FILE] [--tolerance METRIC=VALUE]... [--json]
    graph-opt inspect MODEL [--input-shape NAME=DIMS]... [--json]
    graph-opt passes [--json]

Exit codes: 0 success, 1 verification failed its tolerance, 2 user error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from graph_opt import api, runtime
from graph_opt.compare import METRICS, cli_pipelines
from graph_opt.data import load_data, parse_shape_spec
from graph_opt.errors import GraphOptError, ModelSaveError, PassError
from graph_opt.external_data import stored_bytes
from graph_opt.model_io import load_model, save_model, write_atomic
from graph_opt.intermediates import first_divergence
from graph_opt.plot import PlotUnavailable
from graph_opt.registry import catalog, describe, load_recipe, parse_spec
from graph_opt.report import jsonable, layers_table, parity_table, pipeline_table, stats_text
from graph_opt.runtime import RUNTIMES
from graph_opt.verify import parse_tolerance

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USER_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too by default)
        raise GraphOptError(f"{message} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graph-opt", description="Compress ONNX models by graph rewrites; verify parity under onnxruntime.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    opt = sub.add_parser("optimize", help="run passes on a model, verify against the original, save")
    opt.add_argument("model", nargs="?", help="input .onnx model, or an export folder (every .onnx in it; -o is then a folder)")
    opt.add_argument("--example", action="store_true", help="use the built-in example model and its data")
    opt.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    opt.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                     help="a pass, as name or name:key=value,key=value (repeatable, run in order)")
    opt.add_argument("--recipe", help="YAML/JSON file with an ordered list of passes")
    _data_args(opt)
    opt.add_argument("--calib-data", help="calibration data (default: --data)")
    opt.add_argument("--report", help="JSON report path (default: OUTPUT with .json suffix)")
    opt.add_argument("--only", action="append", default=[], metavar="NAME",
                     help="with a folder as MODEL: optimize only this model (relative path or name; repeatable)")
    opt.add_argument("--report-md", metavar="FILE",
                     help="also write a Markdown summary for review (steps, tolerances and exit status, skips by "
                          "reason, fidelity-against-size plot embedded when matplotlib is installed)")
    opt.add_argument("--verify-runtime", choices=[r for r in RUNTIMES if r != "onnxruntime"], action="append",
                     default=[], help="also check every step's model and the final parity and latency under this "
                                      "runtime (pip install 'graph-opt[openvino]')")
    opt.add_argument("--no-rollback", action="store_true",
                     help="stop with exit 1 (writing nothing) when a pass exceeds the tolerance, instead of rolling it back")
    opt.add_argument("--latency-steps", action="store_true",
                     help="time every step's model, not only the original and the final one")
    opt.add_argument("--verify-threads", type=int, default=0, metavar="N",
                     help="onnxruntime threads for running the models over the data (default 0: one per core; "
                          "--threads sets the latency's)")
    _run_args(opt)

    com = sub.add_parser("compare", help="run several pipelines (recipes or pass orderings) on one or more models: "
                                         "one table, one plot per model")
    com.add_argument("model", nargs="*", help="input .onnx model(s); with several, --data is a folder of <model name>.npz")
    com.add_argument("--example", action="store_true", help="use the built-in example model and its data")
    com.add_argument("--recipe", action="append", default=[], metavar="FILE",
                     help="a pipeline from a YAML/JSON recipe, named after the file (repeatable)")
    com.add_argument("--order", action="append", default=[], metavar='"SPEC SPEC ..."',
                     help="a pipeline: pass specs in order, separated by spaces (repeatable; named P1, P2, ...)")
    com.add_argument("--permutations", action="append", default=[], metavar='"SPEC SPEC ..."',
                     help="one pipeline per ordering of these passes (at most 6 passes)")
    _data_args(com)
    com.add_argument("--calib-data", help="calibration data (default: --data)")
    com.add_argument("--metric", choices=["auto", *METRICS], default="auto",
                     help="fidelity of the Pareto fronts (auto: accuracy when the data has labels, else cosine)")
    com.add_argument("-o", "--out-dir", metavar="DIR", help="write compare.json, compare.md and compare.png there")
    com.add_argument("--save-models", action="store_true", help="also write each pipeline's final model as DIR/NAME.onnx")
    com.add_argument("--jobs", type=int, default=1, help="run the steps in N processes (the results do not depend on N)")
    com.add_argument("--backend", choices=["process", "ray"], default="process",
                     help="where --jobs run: local processes, or Ray tasks (pip install 'graph-opt[ray]')")
    com.add_argument("--address", metavar="HOST:PORT",
                     help="with --backend ray: attach to this running Ray cluster (ray start --head) instead of starting one")
    _run_args(com)

    ver = sub.add_parser("verify", help="compare a candidate model with the original under onnxruntime")
    ver.add_argument("original")
    ver.add_argument("candidate")
    _data_args(ver)
    ver.add_argument("--labels", help=".npy file of class labels (or use a 'labels' key in the .npz)")
    ver.add_argument("--temperature", type=float, default=1.0, help="temperature T of the KD loss")
    ver.add_argument("--kd-alpha", type=float, default=1.0,
                     help="α of the KD loss α·T²·KL + (1−α)·CE(student, labels); the CE term needs labels")
    ver.add_argument("--layers", action="store_true",
                     help="per-layer divergence: SNR of every tensor both models compute, first one below --diverge-snr")
    ver.add_argument("--diverge-snr", type=float, default=30.0, help="SNR (dB) under which a layer counts as diverged")
    ver.add_argument("--feature", action="append", default=[], metavar="TENSOR[=STUDENT_TENSOR]",
                     help="feature-map distance between intermediate tensors (repeatable)")
    ver.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                     help="run both models under this runtime (openvino: pip install 'graph-opt[openvino]'); "
                          "with it, the latency ratio there too")
    ver.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    ins = sub.add_parser("inspect", help="op histogram, parameters, bytes, MACs per layer, latency")
    ins.add_argument("model")
    ins.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                     help="bind dynamic dims, e.g. ids=1x128 (repeatable); unbound, MACs that depend on them stay symbolic")
    ins.add_argument("--threads", type=int, default=1)
    ins.add_argument("--runs", type=int, default=50, help="timed runs for the latency median")
    ins.add_argument("--no-latency", action="store_true")
    ins.add_argument("--json", action="store_true")

    ps = sub.add_parser("passes", help="list every pass with its options and defaults")
    ps.add_argument("--json", action="store_true")
    return parser


def _run_args(p: argparse.ArgumentParser) -> None:
    """What optimize and compare share about running their pipelines and printing."""
    p.add_argument("--no-simplify", action="store_true",
                   help="do not run the simplify pass first (constant and shape folding, Pad and Mul/Add into convs)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-runs", type=int, default=None,
                   help="timed rounds, every model once per round, interleaved (default: as many as fit in "
                        "about 3 seconds, 10 to 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=".npz file or directory of .npz files (default: seeded random inputs)")
    p.add_argument("--samples", type=int, default=8, help="number of random samples when no --data is given")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                   help="bind dynamic dims, e.g. input=1x3x224x224 (repeatable)")
    p.add_argument("--tolerance", action="append", default=[], metavar="METRIC=VALUE",
                   help="e.g. cosine=0.999, snr_db=30, accuracy_drop=0.01, max_abs=1e-3 (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--seed", type=int, default=0)


def _shapes(specs: list[str]) -> dict[str, tuple[int, ...]] | None:
    return dict(parse_shape_spec(s) for s in specs) or None


def _tolerances(specs: list[str]) -> dict[str, float]:
    return dict(parse_tolerance(s) for s in specs)


def _print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2, default=str))


def _model_and_data(args: argparse.Namespace, shapes):
    """(source path, model, verification data, calibration data) for MODEL or --example."""
    if args.example:
        from graph_opt import example

        model = example.example_model()
        verify_data = load_data(args.data, model, shapes=shapes) if args.data else example.example_test()
        calib = load_data(args.calib_data, model, shapes=shapes) if args.calib_data else example.example_calibration()
        return example.example_model_path(), model, verify_data, calib
    model = load_model(args.model)
    verify_data = load_data(args.data, model, shapes=shapes, n_random=args.samples, seed=args.seed)
    calib = load_data(args.calib_data, model, shapes=shapes) if args.calib_data else verify_data
    return Path(args.model), model, verify_data, calib


def cmd_optimize(args: argparse.Namespace) -> int:
    if args.example == bool(args.model):
        raise GraphOptError("give either MODEL or --example")
    shapes = _shapes(args.input_shape)
    tolerances = _tolerances(args.tolerance)
    passes = [parse_spec(s) for s in args.passes]
    if args.recipe:
        passes = load_recipe(args.recipe) + passes
    if not passes and args.example:
        from graph_opt import example

        passes = example.example_recipe()
    elif not passes:
        passes = [parse_spec(s) for s in api.DEFAULT_PASSES]
    if args.model and Path(args.model).is_dir():
        return _optimize_folder(args, passes, shapes, tolerances)
    if args.only:
        raise GraphOptError("--only selects models of an export folder: give a folder as MODEL")
    source, model, verify_data, calib = _model_and_data(args, shapes)
    out = Path(args.output)
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    for target in (out, report_path):
        if target.resolve() == source.resolve():
            raise ModelSaveError(f"refusing to overwrite the input model {source}; choose another output path")
        if not target.resolve().parent.is_dir():
            raise ModelSaveError(f"output directory does not exist: {target.resolve().parent}")
    runtimes_ = [runtime.get(name) for name in args.verify_runtime]  # refuse a missing extra before any work
    result = _optimize(args, model, passes, verify_data, calib, shapes, tolerances)
    doc = {"input": str(source), "output": None, **result.to_dict()}
    if runtimes_:
        doc["runtimes"] = {rt.name: _other_runtime(rt, result, verify_data, args) for rt in runtimes_}
    if not result.passed:
        if args.json:
            _print_json(doc)
        else:
            print(pipeline_table(result))
        _write_markdown(args, result, source, EXIT_VERIFY_FAILED)
        print(f"graph-opt: verification failed, nothing written: {result.stopped}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    saved = save_model(result.model, out, protect=(source,))
    doc["output"] = str(saved)
    doc["output_file_bytes"] = stored_bytes(saved)  # with its external data, if any
    try:  # disk full (or gone) now is a user-facing line too, not a traceback
        write_atomic(report_path.resolve(), json.dumps(jsonable(doc), indent=2, default=str).encode())
    except OSError as exc:
        raise ModelSaveError(f"wrote {saved} but cannot write the report {report_path}: {exc.strerror or exc}") from None
    md = _write_markdown(args, result, source, EXIT_OK)
    if args.json:
        _print_json(doc)
    else:
        print(pipeline_table(result))
        for name, summary in doc.get("runtimes", {}).items():
            print(_runtime_text(name, summary))
        print(f"\nwrote {saved} ({saved.stat().st_size:,} bytes) and report {report_path}" + (f" and {md}" if md else ""))
    return EXIT_OK


def _optimize(args, model, passes, verify_data, calib, shapes, tolerances):
    return api.optimize(model, passes, data=verify_data, calib_data=calib, shapes=shapes, tolerances=tolerances,
                        rollback=not args.no_rollback, latency=not args.no_latency, latency_runs=args.latency_runs,
                        latency_steps=args.latency_steps, threads=args.threads, seed=args.seed,
                        simplify=not args.no_simplify, verify_threads=args.verify_threads)


def _optimize_folder(args, passes, shapes, tolerances) -> int:
    """optimize DIR -o OUTDIR: the recipe on every model of an export folder (graph_opt.folder)."""
    from graph_opt.folder import optimize_folder

    if args.data and not Path(args.data).is_dir():
        raise GraphOptError("with a folder as MODEL, --data is a folder of <model name>.npz files")
    out = Path(args.output)
    report_path = Path(args.report) if args.report else out.with_suffix(".json")

    stopped: list[str] = []

    class Stopped(Exception):
        pass

    def run(model, data_path):
        data = load_data(data_path, model, shapes=shapes, n_random=args.samples, seed=args.seed)
        result = _optimize(args, model, passes, data, data, shapes, tolerances)
        if not result.passed:  # --no-rollback: one model failing its tolerance writes no folder at all
            stopped.append(result.stopped)
            raise Stopped
        return result

    try:
        results = optimize_folder(args.model, out, run, only=args.only, data_dir=args.data)
    except Stopped:
        print(f"graph-opt: verification failed, nothing written: {stopped[0]}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    doc = {"input": str(Path(args.model)), "output": str(out.resolve()), "passed": True,
           "models": {name: r.to_dict() for name, r in results.items()}}
    write_atomic(report_path.resolve(), json.dumps(jsonable(doc), indent=2, default=str).encode())
    if args.json:
        _print_json(doc)
    else:
        for name, r in results.items():
            print(f"\n== {name}\n{pipeline_table(r)}")
        print(f"\nwrote {out} ({len(results)} models optimized, other files copied) and report {report_path}")
    return EXIT_OK


def _other_runtime(rt, result, data, args) -> dict[str, Any]:
    """Which step models `rt` loads (with the reason when not), and the final model's parity and
    latency ratio under it against the original's."""
    steps = [{"step": r.spec, "loads": (why := rt.load(r.model)) is None, "reason": why}
             for r in result.steps if r.accepted and r.modified]
    summary: dict[str, Any] = {"steps": steps, "parity": None, "latency_ratio": None}
    if rt.load(result.original) is not None or rt.load(result.model) is not None:
        return summary
    from graph_opt.verify import compare_outputs

    parity = compare_outputs(rt.run(result.original, data, threads=args.threads),
                             rt.run(result.model, data, threads=args.threads), labels=data.labels,
                             data_source=f"{data.source} ({rt.name})")
    summary["parity"] = parity.to_dict()
    if not args.no_latency:
        base, final = rt.latency([result.original, result.model], data.sample(0), runs=args.latency_runs,
                                 threads=args.threads)
        summary["latency_ratio"] = final / base
    return summary


def _runtime_text(name: str, summary: dict[str, Any]) -> str:
    refused = [f"{s['step']} ({s['reason']})" for s in summary["steps"] if not s["loads"]]
    parity = summary["parity"]
    cos = min((o["cosine"] for o in parity["outputs"]), default=float("nan")) if parity else None
    lat = summary["latency_ratio"]
    return (f"\nunder {name}: " + (f"final cosine {cos:.6f} to the original" if cos is not None else "not compared")
            + (f", latency {lat:.2f}x" if lat is not None else "")
            + ("; refused: " + "; ".join(refused) if refused else "; every step's model loads"))


def _write_markdown(args, result, source: Path, status: int) -> Path | None:
    if not args.report_md:
        return None
    from graph_opt.plot import Point, PlotUnavailable, plot_front
    from graph_opt.report import pipeline_markdown

    png, note = None, ""
    points = [Point("original", result.baseline.stats.file_bytes, result.baseline.stats.latency_ms,
                    result.baseline.parity.cosine if result.baseline.parity else None, reference=True)]
    points += [Point(r.spec, r.stats.file_bytes, r.stats.latency_ms, r.parity.cosine if r.parity else None)
               for r in result.steps if r.accepted and r.modified]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            png = plot_front(points, Path(tmp) / "plot.png", metric="cosine").read_bytes()
        except PlotUnavailable as exc:
            note = f"plot skipped: {exc}"
    target = Path(args.report_md).resolve()
    if not target.parent.is_dir():
        raise ModelSaveError(f"--report-md: directory does not exist: {target.parent}")
    text = pipeline_markdown(result, model=str(source), exit_status=status, plot_png=png, plot_note=note)
    write_atomic(target, text.encode())
    return target


def cmd_compare(args: argparse.Namespace) -> int:
    if args.example == bool(args.model):
        raise GraphOptError("give either MODEL(s) or --example")
    pipelines = {p.name: p.passes for p in cli_pipelines(recipes=args.recipe, orders=args.order,
                                                         permuted=args.permutations)}
    shapes = _shapes(args.input_shape)
    tolerances = _tolerances(args.tolerance)
    out_dir = Path(args.out_dir).resolve() if args.out_dir else None
    if out_dir is not None and ((out_dir.exists() and not out_dir.is_dir()) or not out_dir.parent.is_dir()):
        raise ModelSaveError(f"--out-dir {out_dir}: not a directory, or its parent does not exist")
    if args.save_models and out_dir is None:
        raise GraphOptError("--save-models needs --out-dir")
    common = dict(shapes=shapes, tolerances=tolerances, metric=args.metric, latency=not args.no_latency,
                  latency_runs=args.latency_runs, threads=args.threads, seed=args.seed, jobs=args.jobs,
                  backend=args.backend, simplify=not args.no_simplify, address=args.address)
    if len(args.model) > 1:
        return _compare_models(args, pipelines, common, out_dir)
    args.model = args.model[0] if args.model else None
    source, model, verify_data, calib = _model_and_data(args, shapes)
    comparison = api.compare(model, pipelines, data=verify_data, calib_data=calib, **common)
    doc: dict[str, Any] = {"input": str(source), **comparison.to_dict(), "files": {}, "plot_skipped": None}
    skipped = ""
    if out_dir is not None:
        out_dir.mkdir(exist_ok=True)
        files = doc["files"]
        skipped = _compare_plot(comparison, out_dir / "compare.png", f"graph-opt compare: {source.name}", files, doc)
        if args.save_models:
            files["models"] = _save_finals(comparison, out_dir, "", source)
        markdown = comparison.markdown(source=str(source), plot="compare.png" if "plot" in files else None)
        _write_compare(out_dir, markdown, doc)
    _print_compare(args, doc, comparison.table(), out_dir, skipped)
    return EXIT_OK


def _compare_models(args, pipelines, common, out_dir) -> int:
    """compare M1 M2 …: the pipelines on every model in one pool of steps; one table, one report."""
    if args.calib_data:
        raise GraphOptError("--calib-data takes one model's data; with several models give --data DIR")
    if args.data and not Path(args.data).is_dir():
        raise GraphOptError("with several models, --data is a folder of <model name>.npz files")
    paths = [Path(m) for m in args.model]
    comparisons = api.compare_models(paths, pipelines, data=args.data, n_random=args.samples, **common)
    doc: dict[str, Any] = {"inputs": [str(p) for p in paths], **comparisons.to_dict(), "files": {}, "plot_skipped": None}
    skipped = ""
    if out_dir is not None:
        out_dir.mkdir(exist_ok=True)
        files, plots = doc["files"], {}
        files["plots"], files["models"] = {}, {}
        for c in comparisons.items:
            inner: dict[str, Any] = {}
            skipped = _compare_plot(c, out_dir / f"compare_{c.name}.png", f"graph-opt compare: {c.name}", inner, doc)
            if "plot" in inner:
                files["plots"][c.name] = plots[c.name] = inner["plot"]
            if args.save_models:
                files["models"][c.name] = _save_finals(c, out_dir, f"{c.name}_", *paths)
        plots = {name: Path(path).name for name, path in plots.items()}
        _write_compare(out_dir, comparisons.markdown(plots=plots), doc)
    _print_compare(args, doc, comparisons.table(), out_dir, skipped)
    return EXIT_OK


def _compare_plot(comparison, path: Path, title: str, files: dict, doc: dict) -> str:
    try:
        files["plot"] = str(comparison.plot(path, title=title))
    except PlotUnavailable as exc:
        doc["plot_skipped"] = f"plot skipped: {exc}"
    return doc["plot_skipped"] or ""


def _save_finals(comparison, out_dir: Path, prefix: str, *inputs: Path) -> dict[str, str]:
    return {p.name: str(save_model(r.model, out_dir / f"{prefix}{p.name}.onnx", protect=inputs))
            for p, r in zip(comparison.pipelines, comparison.results)}


def _write_compare(out_dir: Path, markdown: str, doc: dict) -> None:
    doc["files"]["markdown"] = str(out_dir / "compare.md")
    doc["files"]["json"] = str(out_dir / "compare.json")
    write_atomic(out_dir / "compare.md", markdown.encode())
    write_atomic(out_dir / "compare.json", json.dumps(jsonable(doc), indent=2, default=str).encode())


def _print_compare(args, doc: dict, text: str, out_dir: Path | None, skipped: str) -> None:
    if args.json:
        _print_json(doc)
    else:
        print(text)
        if out_dir is not None:
            files = doc["files"]
            written = [v for k, v in files.items() if k not in ("models", "plots")] + list(files.get("plots", {}).values())
            models = files.get("models") or {}
            count = sum(len(v) if isinstance(v, dict) else 1 for v in models.values()) if "inputs" in doc else len(models)
            print("\nwrote " + ", ".join(written) + (f" and {count} models" if count else ""))
        else:
            print("\nnothing written (give --out-dir DIR for compare.json, compare.md and compare.png)")
    if skipped:
        print(f"graph-opt: {skipped}", file=sys.stderr if args.json else sys.stdout)


def cmd_verify(args: argparse.Namespace) -> int:
    shapes = _shapes(args.input_shape)
    tolerances = _tolerances(args.tolerance)
    original = load_model(args.original)
    candidate = load_model(args.candidate)
    data = load_data(args.data, original, shapes=shapes, n_random=args.samples, seed=args.seed)
    features = [tuple(f.split("=", 1)) if "=" in f else f for f in args.feature]
    report = api.verify(original, candidate, data=data, labels=args.labels, shapes=shapes, tolerances=tolerances,
                        threads=args.threads,
                        temperature=args.temperature, kd_alpha=args.kd_alpha, layers=args.layers, features=features,
                        runtime=args.runtime)
    first = first_divergence(report.layers, args.diverge_snr) if args.layers else None
    if args.json:
        doc = report.to_dict()
        if args.layers:
            doc["first_divergence"] = first.to_dict() if first else None
        _print_json(doc)
    else:
        print(parity_table(report))
        if report.runtime != "onnxruntime":
            print(f"under {report.runtime}: candidate latency {report.latency_ratio:.2f}x the original's")
        if args.layers:
            print(layers_table(report.layers))
            print(f"first divergence (SNR < {args.diverge_snr:g} dB): "
                  + (f"{first.tensor} (produced by {first.producer}, {first.snr_db:.1f} dB)" if first else "none"))
    return EXIT_OK if report.passed else EXIT_VERIFY_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    stats = api.inspect(args.model, shapes=_shapes(args.input_shape), latency=not args.no_latency,
                        runs=args.runs, threads=args.threads)
    if args.json:
        _print_json(stats.to_dict())
    else:
        print(stats_text(stats))
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    entries = [{"name": cls.name, "summary": cls.summary(), "options": describe(cls)} for cls in catalog()]
    if args.json:
        _print_json(entries)
        return EXIT_OK
    for e in entries:
        print(f"{e['name']}: {e['summary']}")
        for o in e["options"]:
            print(f"    {o['option']} ({o['type']}, default {o['default']!r})")
    return EXIT_OK


COMMANDS = {"optimize": cmd_optimize, "compare": cmd_compare, "verify": cmd_verify, "inspect": cmd_inspect, "passes": cmd_passes}


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="graph-opt: %(message)s")
        if not args.command:
            parser.print_help(sys.stderr)
            return EXIT_USER_ERROR
        return COMMANDS[args.command](args)
    except GraphOptError as exc:
        print(f"graph-opt: error: {exc}", file=sys.stderr)
        if isinstance(exc, PassError) and exc.internal:
            if args is not None and args.verbose:
                traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
            else:
                print("graph-opt: rerun with -v for the traceback, and please report it", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("graph-opt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graph-opt passes | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
