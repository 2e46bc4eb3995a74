"""bench_simplify: graph-opt's `simplify` against onnxsim 0.8.1, onnxslim and onnxruntime's basic-level
offline optimization, side by side on the same models in one run.

Per model and tool: nodes after (every graph, If/Loop/Scan bodies included), whether the result is
valid (full onnx.checker, onnxruntime loads it), exactness (largest output difference relative to
the output's largest magnitude, and the relative L2 error, onnxruntime CPU with graph optimizations
off, on seeded inputs or the corpus model's first evaluation sample), the tool's wall time and peak memory (each tool runs
alone in a fresh subprocess: wall time of the tool call; peak RSS of the subprocess, and its RSS
just before the call), the graph inputs the result declares, and onnxruntime latency as deployed
(all optimizations on, spinning stopped): the original and every valid result timed in one process,
interleaved, in ``--rounds`` rounds (≥ 10) of ``--runs`` runs each; the ratio to the original is the
median over the rounds of each round's ratio, reported with its min–max spread.

Every tool gets the same information: the full input shapes of the feed (``path@name=1x3x48x160``,
a corpus model's ``shapes``, or batch 1 for a dynamic first axis) — onnxsim as
``overwrite_input_shapes``, onnxslim as ``input_shapes``, onnxruntime as fixed input dims, graph-opt
as the pipeline's bound shapes (it keeps the batch dim dynamic when folding does not need it).

Models: ``.onnx`` paths (``PATH`` or ``PATH@input=1x3x48x160,other=1x16``), corpus names
(``--corpus NAME``, from ``benchmarks/corpus.py``: ``corpus.load(name)`` → path, eval data, shapes),
``--builtin tf_same`` (the TF-style "same"-padding CNN of tests/builders.py, Constant-node weights)
and ``--builtin light`` (the onnx wheel's ``backend/test/data/light`` models: IR 3, initializers
that are also graph inputs).

    python benchmarks/bench_simplify.py --builtin tf_same --builtin light \\
        path/to/model.onnx@x=1x3x48x320 --corpus ppocr_det --rounds 10 --runs 30

Writes ``benchmarks/results/bench_simplify.json`` (rows of models not measured in this run are kept
from the previous file) and prints the Markdown table of RESULTS.md.
Needs ``pip install -e '.[bench]'`` (onnxsim==0.8.1, onnxslim).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
TOOLS = ("graph-opt", "onnxsim", "onnxslim", "ort-basic")
SEED = 0


# ============================================================================================ worker


def _fixed_dims(model, shapes: dict[str, list[int]]):
    for value in model.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    return model


def worker(spec: dict[str, Any]) -> int:
    """One tool on one model, alone in this process: time and memory of the tool call."""
    import onnx

    sys.path.insert(0, str(BENCH_DIR))
    from _proc import status_kb

    tool, src, dst = spec["tool"], spec["src"], spec["dst"]
    shapes = {k: list(v) for k, v in spec["shapes"].items()}
    result: dict[str, Any] = {"tool": tool}
    try:
        if tool == "graph-opt":
            from graph_opt.model_io import load_model, save_model
            from graph_opt.pass_base import PassContext
            from graph_opt.passes.simplify import Simplify

            model = load_model(src)
            result["rss_before_kb"] = status_kb("VmRSS")
            start = time.perf_counter()
            out = Simplify()(model, PassContext(shapes={k: tuple(v) for k, v in shapes.items()})).model
            result["seconds"] = time.perf_counter() - start
            save_model(out, dst)
        elif tool == "onnxsim":
            import onnxsim

            model = onnx.load(src)
            result["rss_before_kb"] = status_kb("VmRSS")
            start = time.perf_counter()
            out, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes or None, include_subgraph=True)
            result["seconds"] = time.perf_counter() - start
            result["self_check"] = bool(ok)
            onnx.save(out, dst)
        elif tool == "onnxslim":
            import onnxslim

            model = onnx.load(src)
            result["rss_before_kb"] = status_kb("VmRSS")
            start = time.perf_counter()
            specs = [f"{k}:{','.join(map(str, v))}" for k, v in shapes.items()]
            out = onnxslim.slim(model, input_shapes=specs or None)
            result["seconds"] = time.perf_counter() - start
            onnx.save(out, dst)
        elif tool == "ort-basic":
            import onnxruntime as ort

            model = _fixed_dims(onnx.load(src), shapes)
            result["rss_before_kb"] = status_kb("VmRSS")
            start = time.perf_counter()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.optimized_model_filepath = dst
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            result["seconds"] = time.perf_counter() - start
        else:
            raise ValueError(f"unknown tool {tool}")
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - recorded: the parent reports it as this tool's failure
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    result["peak_kb"] = status_kb("VmHWM")
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ============================================================================================ parent


def cpu_info() -> dict[str, Any]:
    model, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"cpu": model, "flags": [f for f in keep if f in flags], "cores": os.cpu_count()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxsim", "onnxslim", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "-"
    return out


def node_count(model) -> int:
    from graph_opt.onnx_util import all_graphs

    return sum(len(g.node) for g in all_graphs(model.graph))


def op_counts(model) -> Counter:
    from graph_opt.onnx_util import all_graphs

    return Counter(n.op_type for g in all_graphs(model.graph) for n in g.node)


def _parse_path(text: str) -> tuple[str, Path, dict[str, tuple[int, ...]]]:
    path, _, rest = text.partition("@")
    shapes = {}
    for piece in filter(None, rest.split(",")):
        name, _, dims = piece.partition("=")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return Path(path).stem, Path(path), shapes


def builtin(name: str, work: Path) -> list[tuple[str, Path, dict, dict | None]]:
    import onnx

    if name == "tf_same":
        sys.path.insert(0, str(ROOT / "tests"))
        from builders import tf_same_padding_model

        path = work / "tf_same.onnx"
        onnx.save(tf_same_padding_model(hw=32), path)
        return [("tf_same", path, {"image": (1, 3, 32, 32)}, None)]
    if name == "light":
        folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
        return [(Path(p).stem, Path(p), {}, None) for p in sorted(glob.glob(str(folder / "*.onnx")))]
    raise SystemExit(f"unknown --builtin {name!r} (tf_same, light)")


def from_corpus(name: str, corpus_dir: Path) -> tuple[str, Path, dict, dict | None]:
    sys.path.insert(0, str(corpus_dir))
    import corpus  # noqa: PLC0415 - optional: only with --corpus

    zm = corpus.load(name)
    shapes = {k: tuple(v) for k, v in (zm.shapes or {}).items()}
    feed = {k: _first_sample(v, shapes.get(k)) for k, v in zm.eval.inputs.items()}
    return name, Path(zm.path), shapes, feed


def _first_sample(value: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    """The first evaluation sample at the model's input shape: samples are stacked on axis 0, or on
    the one axis where the recorded shape has 1 (a state [2, N, 128]); a scalar input stays scalar."""
    if shape is None:
        return value[:1]
    if shape == ():
        return np.array(value.reshape(-1)[0])
    if len(shape) == value.ndim:
        axis = next((a for a, (d, s) in enumerate(zip(value.shape, shape)) if d != s and s == 1), 0)
        return np.take(value, [0], axis=axis)
    return value[:1]


def feed_for(model, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    from graph_opt.data import bind_shapes, random_dataset

    bound = bind_shapes(model, shapes)
    return random_dataset(model, 1, shapes=bound, seed=SEED).sample(0), bound


def run_tool(tool: str, src: Path, dst: Path, shapes: dict, work: Path, timeout: float) -> dict[str, Any]:
    spec = {"tool": tool, "src": str(src), "dst": str(dst), "shapes": {k: list(v) for k, v in shapes.items()},
            "result": str(work / f"{dst.stem}.json")}
    cwd = work / f"cwd-{dst.stem}"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "GRAPH_OPT_PROGRESS": "0"}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    try:
        result = json.loads(Path(spec["result"]).read_text())
    except (OSError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"tool": tool, "ok": False, "error": f"worker died (exit {proc.returncode}): {tail[:300]}"}
    result["process_seconds"] = time.monotonic() - start
    stray = [p.name for p in cwd.iterdir()]
    if stray:
        result["stray_files"] = stray
    return result


def errors(reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[float, float]:
    """(largest |difference| / largest |reference|, ‖difference‖ / ‖reference‖), worst over the outputs."""
    worst_max = worst_l2 = 0.0
    for r, o in zip(reference, outputs):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r.shape != o.shape:
            return float("inf"), float("inf")
        if r.size:
            worst_max = max(worst_max, float(np.max(np.abs(r - o)) / max(float(np.max(np.abs(r))), 1e-30)))
            worst_l2 = max(worst_l2, float(np.linalg.norm(r - o) / max(float(np.linalg.norm(r)), 1e-30)))
    return worst_max, worst_l2


def measure_model(label: str, src: Path, shapes: dict, feed: dict | None, work: Path, *, rounds: int, runs: int,
                  timeout: float, tools: tuple[str, ...]) -> dict[str, Any]:
    from graph_opt.model_io import check_model, load_model
    from graph_opt.stats import measure_latency
    from graph_opt.runtime import make_session

    original = load_model(src)
    if feed is None:
        feed, shapes = feed_for(original, shapes)
    else:
        shapes = shapes or {k: tuple(v.shape) for k, v in feed.items()}
    reference = make_session(original).run(None, feed)
    row: dict[str, Any] = {"model": label, "path": str(src), "shapes": {k: list(v) for k, v in shapes.items()},
                           "nodes_before": node_count(original), "tools": {}}
    models = {"original": original}
    for tool in tools:
        dst = work / f"{label}.{tool}.onnx"
        res = run_tool(tool, src, dst, shapes, work, timeout)
        if res.get("ok"):
            try:
                out = load_model(dst)
                res["nodes"] = node_count(out)
                res["ops"] = dict(op_counts(out))
                res["inputs"] = [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                                 for v in out.graph.input if v.name in {i.name for i in original.graph.input}]
                check_model(out, full=True)
                got = make_session(out).run(None, feed)
                res["max_rel_error"], res["rel_l2_error"] = errors(reference, got)
                res["valid"] = True
                models[tool] = out
            except Exception as exc:  # noqa: BLE001 - an invalid result is a finding, not a crash
                res["valid"] = False
                res["invalid"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:240]}"
        row["tools"][tool] = res
        print(f"  {label} {tool}: " + (f"{res.get('nodes')} nodes, err {res.get('max_rel_error', '-')}, "
                                       f"{res.get('seconds', 0):.2f}s" if res.get("ok") else res.get("error", "")),
              file=sys.stderr)
    for name in [n for n in models if n != "original"]:  # as deployed: onnxruntime with all optimizations
        try:
            make_session(models[name], optimize=True)
        except Exception as exc:  # noqa: BLE001 - a finding about that tool's output
            row["tools"][name]["deploy_error"] = (str(exc).strip().splitlines() or [""])[0][:240]
            del models[name]
    names = list(models)
    per_round = []
    for _ in range(rounds):
        times = measure_latency(list(models.values()), feed, runs=runs, warmup=3)
        per_round.append([t / times[0] for t in times])
    ratios = np.array(per_round)
    row["latency_original_ms"] = None
    for i, name in enumerate(names):
        med, lo, hi = float(np.median(ratios[:, i])), float(ratios[:, i].min()), float(ratios[:, i].max())
        if name == "original":
            continue
        row["tools"][name]["latency_ratio"] = med
        row["tools"][name]["latency_spread"] = [lo, hi]
    return row


def _fmt_tool(res: dict[str, Any]) -> str:
    if not res.get("ok"):
        return "fails: " + res.get("error", "?")[:60]
    if not res.get("valid"):
        return f"{res.get('nodes', '?')} nodes, **invalid**: " + res.get("invalid", "")[:60]
    if "deploy_error" in res:
        return f"{res['nodes']} nodes, exact to {res['max_rel_error']:.1g}, **onnxruntime with optimizations on refuses it**"
    err = f"{res['max_rel_error']:.1g}" + (f" ({res['rel_l2_error']:.0e})" if "rel_l2_error" in res else "")
    spread = res.get("latency_spread", [0, 0])
    return (f"{res['nodes']} / {err} / {res['latency_ratio']:.2f}x ({spread[0]:.2f}–{spread[1]:.2f}) / "
            f"{res['seconds']:.2f}s / {res['peak_kb'] / 1024:.0f} MB")


def markdown(doc: dict[str, Any]) -> str:
    tools = doc["tools"]
    head = ["model", "nodes before", *tools]
    lines = ["Cells: nodes after / max relative error (relative L2 error) / latency ratio to the original (min–max over rounds) / "
             "tool time / peak RSS of the tool's process.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["rows"]:
        lines.append("| " + " | ".join([row["model"], str(row["nodes_before"]),
                                         *[_fmt_tool(row["tools"].get(t, {})) for t in tools]]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="PATH.onnx or PATH.onnx@input=1x3x48x320,...")
    ap.add_argument("--corpus", action="append", default=[], help="a corpus model name (benchmarks/corpus.py)")
    ap.add_argument("--corpus-dir", default=str(BENCH_DIR), help="folder holding corpus.py")
    ap.add_argument("--builtin", action="append", default=[], choices=["tf_same", "light"])
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model per round (interleaved)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--table", action="store_true", help="only print the table of the saved results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.table:
        doc = json.loads((RESULTS / "bench_simplify.json").read_text())
        print(f"CPU: {doc['cpu']} ({', '.join(doc['flags'])}), {doc['cores']} cores; "
              + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
        print(markdown(doc))
        return 0
    if args.rounds < 10:
        ap.error("--rounds must be at least 10 (the spread needs them)")
    tools = tuple(t for t in args.tools.split(",") if t)
    with tempfile.TemporaryDirectory(prefix="bench-simplify-") as tmp:
        work = Path(tmp)
        todo: list[tuple[str, Path, dict, dict | None]] = []
        for b in args.builtin:
            todo += builtin(b, work)
        for text in args.models:
            label, path, shapes = _parse_path(text)
            todo.append((label, path, shapes, None))
        for name in args.corpus:
            todo.append(from_corpus(name, Path(args.corpus_dir)))
        rows = []
        for label, path, shapes, feed in todo:
            print(f"{label}: {path}", file=sys.stderr)
            try:
                rows.append(measure_model(label, path, shapes, feed, work, rounds=args.rounds, runs=args.runs,
                                          timeout=args.timeout, tools=tools))
            except Exception as exc:  # noqa: BLE001 - one model's failure does not end the run
                print(f"  {label}: skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    doc = {"bench": "bench_simplify", "date": time.strftime("%Y-%m-%d %H:%M:%S"), **cpu_info(),
           "versions": versions(), "rounds": args.rounds, "runs": args.runs, "tools": list(tools), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "bench_simplify.json"
    if path.exists():  # rows of models this run did not measure are kept (each row holds its own run's ratios)
        measured = {r["model"] for r in rows}
        doc["rows"] = [r for r in json.loads(path.read_text()).get("rows", []) if r["model"] not in measured] + rows
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"CPU: {doc['cpu']} ({', '.join(doc['flags'])}), {doc['cores']} cores; " +
          ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
