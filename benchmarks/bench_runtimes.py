"""bench_runtimes: every pass family's default output under onnxruntime and under OpenVINO, side by side.

For each model of the zoo and the corpus (``--models``; default: the 14 of ``MODELS``, one that does not
load is reported with its error) and each pass family (``--families``), the family's default output is
made by the real pipeline (``graph_opt.api.optimize(model, specs, data=calib, shapes=zm.shapes,
latency=False)``, ``calib`` the first ``--calib`` calibration samples; `simplify`
runs first as always, no tolerances, so a step is rolled back only when its output is invalid):

- ``simplify``: the default recipe alone (``api.DEFAULT_PASSES``: simplify, fold_batchnorm, cleanup);
- ``prune_channels``, ``factorize`` (``factorize_gemm`` then ``factorize_conv``), ``quantize``,
  ``prune_weights``: each pass at its defaults, after simplify.

The pipeline's final model is the candidate; the steps it ran (modified, rolled back and why, the most
frequent skip reasons) are recorded, and a family whose own pass changed nothing is marked so.
Then, under each runtime (``graph_opt.runtime.get("onnxruntime")`` and ``get("openvino")``):

- loads: whether the runtime accepts the candidate (else its one-line reason; when it rejects the
  original, only the candidates' loads are recorded);
- fidelity against the ORIGINAL model run under the SAME runtime, over the model's whole eval
  split (a few hundred samples; silero_vad's 3,451 short chunks; a model with its own ``runner``
  runs through it under onnxruntime, through its batch layout under OpenVINO): cosine of the main
  (first) output, and the zoo's task metrics (``zm.evaluate``);
- latency ratio candidate / original in that runtime, batch-1 feed (``zm.sample()``): the
  original and every loaded candidate timed interleaved (rotating order) in ``--rounds`` rounds of
  ``--runs`` runs, the ratio's median over rounds and its min-max spread. onnxruntime runs with all
  graph optimizations on and spinning stopped (``graph_opt.stats.measure_latency``), OpenVINO with
  its CPU plugin at its default inference precision (recorded: bf16 on a CPU with avx512_bf16);
  both with ``--threads`` threads. Under OpenVINO the original's cosine to onnxruntime's is recorded too.

Each model runs in its own child process with a hard time cap (``--timeout`` seconds; a model over
it is reported as timed out); inside it, a family whose optimize step would start after
``--soft-budget`` seconds is skipped with a note. CPU model and flags, package versions and how busy
the machine was while timing are recorded.

    python benchmarks/bench_runtimes.py [--models example,resnet,...] [--rounds 10] [--runs 20]
    python benchmarks/bench_runtimes.py --render      # the Markdown table of the saved results

Writes ``benchmarks/results/bench_runtimes.json`` (models not measured in a run keep their previous
rows) and prints the Markdown table of RESULTS.md. Needs ``pip install -e '.[openvino]'``, the
zoo/corpus cache (``GRAPH_OPT_ZOO``; built by ``benchmarks/zoo.py`` and ``benchmarks/corpus.py``
with the ``bench`` extra), ``opencv-python-headless`` for the detection metrics (yolo, dddd_det,
ppocr_det) and ``ddddocr==1.6.1`` for dddd_ocr's charset; a model whose loader lacks a package is
skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import _harness  # noqa: E402

RESULT = _harness.RESULTS_DIR / "bench_runtimes.json"
MODELS = ("example", "resnet", "minilm", "dddd_det", "dddd_ocr", "magika", "minilm_dynamo", "opennsfw", "orinet",
          "ppocr_cls", "ppocr_det", "ppocr_rec", "silero_vad", "yolo")
FAMILIES: dict[str, list[str] | None] = {
    "simplify": None,  # api.DEFAULT_PASSES
    "prune_channels": ["prune_channels"],
    "factorize": ["factorize_gemm", "factorize_conv"],
    "quantize": ["quantize"],
    "prune_weights": ["prune_weights"],
}
RUNTIMES = ("onnxruntime", "openvino")
# the task metric a table row shows (every metric is in the JSON); otherwise the model's first one
PREFERRED_METRICS = ("det_f1_vs_fp32", "decision_agreement_vs_fp32")


# ============================================================================================ child


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _candidates(zm, original, calib, families: list[str], soft_budget: float, start: float) -> dict[str, dict[str, Any]]:
    """Each family's final pipeline model and what its steps did."""
    from graph_opt import api

    out: dict[str, dict[str, Any]] = {}
    for family in families:
        entry: dict[str, Any] = {"family": family, "specs": list(FAMILIES[family] or api.DEFAULT_PASSES)}
        if time.perf_counter() - start > soft_budget:
            entry["skipped"] = f"not run: the model's time budget ({soft_budget:.0f} s) was spent"
            out[family] = entry
            continue
        t0 = time.perf_counter()
        try:
            res = api.optimize(original, FAMILIES[family], data=calib, shapes=zm.shapes, latency=False)
        except Exception as exc:  # noqa: BLE001 - recorded as this family's failure
            entry["skipped"] = f"optimize failed: {_first_line(exc)}"
            out[family] = entry
            continue
        entry["optimize_seconds"] = round(time.perf_counter() - t0, 1)
        entry["steps"] = [{"name": s.name, "spec": s.spec, "modified": s.modified, "accepted": s.accepted,
                           "reason": s.reason, "rewritten": len(s.report.rewritten) if s.report else 0,
                           "skips": len(s.report.skipped) if s.report else 0,
                           "skip_reasons": _top_reasons(s.report)} for s in res.steps]
        family_steps = [s for s in res.steps if s.name != "simplify"] if FAMILIES[family] else res.steps
        entry["rolled_back"] = [f"{s.name}: {s.reason}" for s in res.steps if not s.accepted]
        entry["unchanged"] = not any(s.modified and s.accepted for s in family_steps)
        entry["model"] = res.model
        out[family] = entry
    return out


def _top_reasons(report, k: int = 3) -> list[str]:
    """The `k` most frequent skip reasons of a pass report, with their counts."""
    if report is None or not report.skipped:
        return []
    counts = Counter(sk.reason for sk in report.skipped)
    return [f"{n}x {reason[:120]}" for reason, n in counts.most_common(k)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    from graph_opt import metrics

    if a.shape != b.shape:
        return float("nan")
    return float(metrics.cosine(a, b))


class _Runner:
    """Outputs over the eval split and latency in one runtime."""

    def __init__(self, name: str, zm, threads: int):
        from graph_opt import runtime

        self.name, self.zm, self.threads = name, zm, threads
        self.rt = runtime.get(name)

    def outputs(self, model) -> dict[str, np.ndarray]:
        if self.name == "onnxruntime":
            return self.zm.outputs(model, threads=self.threads)  # the model's own runner where it has one
        from graph_opt.data import load_data

        return self.rt.run(model, load_data(self.zm.eval, model), threads=self.threads)

    def latency_rounds(self, models, feed, rounds: int, runs: int):
        per_round = [self.rt.latency(models, feed, runs=runs, threads=self.threads) for _ in range(rounds)]
        times = np.asarray(per_round)
        ratios = times / times[:, :1]
        return ([float(v) for v in np.median(times, axis=0)],
                [(float(np.median(c)), float(c.min()), float(c.max())) for c in ratios.T])


def measure_model(name: str, args) -> dict[str, Any]:
    """One model: candidates of every family, then each runtime's load / fidelity / latency."""
    import zoo

    start = time.perf_counter()
    zm = zoo.get(name)
    original = zm.load()
    from graph_opt.data import load_data

    calib = load_data(zm.calib, original).take(args.calib)
    main_output = original.graph.output[0].name
    cands = _candidates(zm, original, calib, args.families.split(","), args.soft_budget, start)
    doc: dict[str, Any] = {"model": name, "task": zm.task, "eval_samples": len(zm.eval), "calib_samples": len(calib),
                           "main_output": main_output, "families": {}, "runtimes": {}}
    feed = zm.sample(0)
    refs: dict[str, np.ndarray] = {}
    for rt_name in RUNTIMES:
        r: dict[str, Any] = {}
        doc["runtimes"][rt_name] = r
        try:
            runner = _Runner(rt_name, zm, args.threads)
        except Exception as exc:  # noqa: BLE001 - the runtime is not installed
            r["error"] = _first_line(exc)
            continue
        reason = runner.rt.load(original)
        if reason:  # nothing to compare with; still say which candidates this runtime loads
            r["original_rejected"] = reason
            for family, entry in cands.items():
                if "model" in entry:
                    reason = runner.rt.load(entry["model"])
                    r[family] = {"rejected": reason} if reason else {"loads_without_original": True}
            continue
        t0 = time.perf_counter()
        ref = runner.outputs(original)
        r["original_task"] = _task(zm, ref)
        refs[rt_name] = np.asarray(ref[main_output], np.float64)
        if rt_name != "onnxruntime" and "onnxruntime" in refs:  # how far the runtimes differ on the original itself
            r["original_cosine_vs_onnxruntime"] = _cosine(refs["onnxruntime"], refs[rt_name])
        r["eval_seconds_original"] = round(time.perf_counter() - t0, 1)
        loaded = {}
        for family, entry in cands.items():
            cell: dict[str, Any] = {}
            r[family] = cell
            if "model" not in entry:
                continue
            model = entry["model"]
            reason = runner.rt.load(model)
            if reason:
                cell["rejected"] = reason
                continue
            try:
                out = runner.outputs(model)
            except Exception as exc:  # noqa: BLE001 - loads but fails to run: a rejection too
                cell["rejected"] = f"fails to run: {_first_line(exc)}"
                continue
            cell["cosine"] = _cosine(np.asarray(ref[main_output], np.float64), np.asarray(out[main_output], np.float64))
            cell["task"] = _task(zm, out)
            loaded[family] = model
        busy_before = _harness.cpu_busy(0.5)
        try:
            medians, spread = runner.latency_rounds([original, *loaded.values()], feed, args.rounds, args.runs)
        except Exception as exc:  # noqa: BLE001 - recorded; fidelity stays
            r["latency_error"] = _first_line(exc)
            medians = spread = None
        r["cpu_busy"] = [round(busy_before, 3), round(_harness.cpu_busy(0.5), 3)]
        if spread:
            r["original_ms"] = round(medians[0], 4)
            for family, ms in zip(loaded, medians[1:]):
                r[family]["latency_ms"] = round(ms, 4)
            for family, (med, lo, hi) in zip(loaded, spread[1:]):
                r[family]["latency_ratio"] = round(med, 4)
                r[family]["latency_spread"] = [round(lo, 4), round(hi, 4)]
    for family, entry in cands.items():
        doc["families"][family] = {k: v for k, v in entry.items() if k != "model"}
    doc["seconds"] = round(time.perf_counter() - start, 1)
    return doc


def _task(zm, outputs) -> dict[str, float] | str:
    try:
        return {k: round(float(v), 5) for k, v in zm.evaluate(outputs).items()}
    except Exception as exc:  # noqa: BLE001 - a metric that cannot be computed here is noted, not fatal
        return f"not computed: {_first_line(exc)}"


def child(args) -> int:
    try:
        doc = measure_model(args.one, args)
    except Exception as exc:  # noqa: BLE001 - the parent reports it for this model
        doc = {"model": args.one, "error": _first_line(exc), "traceback": traceback.format_exc()[-2000:]}
    Path(args.out).write_text(json.dumps(doc, default=_harness._default))
    return 0


# ============================================================================================ parent


def cpu_flags() -> list[str]:
    """The CPU's vector and reduced-precision flags (OpenVINO's default precision follows bf16 support)."""
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
            "amx_bf16", "amx_int8")
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in keep if f in flags]


def openvino_precision() -> str | None:
    """OpenVINO CPU plugin's default INFERENCE_PRECISION_HINT on this machine (what `run` and `latency` use)."""
    try:
        import openvino

        return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # noqa: BLE001 - not installed or no CPU plugin: nothing to record
        return None


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("graph-opt", "onnxruntime", "openvino", "onnx", "numpy", "onnx-graphsurgeon", "tensorly"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_models(args) -> list[dict[str, Any]]:
    docs = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--one", name, "--out", str(out), "--families", args.families,
                   "--rounds", str(args.rounds), "--runs", str(args.runs), "--threads", str(args.threads),
                   "--calib", str(args.calib), "--soft-budget", str(args.soft_budget)]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
                doc = json.loads(out.read_text()) if out.exists() else {
                    "model": name, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                doc = {"model": name, "error": f"timed out after {args.timeout:.0f} s"}
            doc.setdefault("seconds", round(time.perf_counter() - start, 1))
        docs.append(doc)
        print(render_model(doc), flush=True)
    return docs


def save(docs: list[dict[str, Any]], args) -> Path:
    measured = {d["model"] for d in docs}
    old = json.loads(RESULT.read_text()).get("models", []) if RESULT.exists() else []
    kept = [d for d in old if d["model"] not in measured]
    env = _harness.environment()
    doc = {"bench": "bench_runtimes", "environment": {**env, "cpu_line": _harness.cpu_line(), "cpu_flags": cpu_flags(),
                                                     "openvino_inference_precision": openvino_precision(),
                                                     "versions": versions()},
           "settings": {"rounds": args.rounds, "runs": args.runs, "threads": args.threads, "calib": args.calib,
                        "families": {f: FAMILIES[f] for f in args.families.split(",")}},
           "models": kept + docs}
    RESULT.parent.mkdir(exist_ok=True)
    tmp = RESULT.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_harness._default))
    tmp.replace(RESULT)
    return RESULT


def _metric_cell(task: Any, key: str | None) -> str:
    if not isinstance(task, dict) or key is None or key not in task:
        return "-"
    return f"{task[key]:.3f}"


def _rt_cells(rt: dict[str, Any], family: str, key: str | None) -> list[str]:
    if "error" in rt:
        return ["n/a", "-", "-", "-"]
    cell = rt.get(family, {})
    if "original_rejected" in rt and "rejected" not in cell:
        return ["yes (original rejected)" if cell.get("loads_without_original") else "-", "-", "-", "-"]
    if "rejected" in cell:
        return ["**rejected**", "-", "-", "-"]
    if "cosine" not in cell:
        return ["-", "-", "-", "-"]
    lat = "-"
    if "latency_ratio" in cell:
        lo, hi = cell["latency_spread"]
        lat = f"{cell['latency_ratio']:.2f}x ({lo:.2f}-{hi:.2f})"
    return ["yes", f"{cell['cosine']:.4f}", _metric_cell(cell.get("task"), key), lat]


def _vs_ort(rt: dict[str, Any]) -> str:
    c = rt.get("original_cosine_vs_onnxruntime")
    return "" if c is None else f" (vs ORT {c:.4f})"


def render_model(doc: dict[str, Any]) -> str:
    """One model's rows of the table (Markdown, no header)."""
    name = doc["model"]
    if "error" in doc:
        return f"| {name} | - | {doc['error'][:120]} |" + " |" * 8
    ort_, ov = doc["runtimes"].get("onnxruntime", {}), doc["runtimes"].get("openvino", {})
    base = ort_.get("original_task")
    key = next((k for k in PREFERRED_METRICS if isinstance(base, dict) and k in base),
               next(iter(base)) if isinstance(base, dict) and base else None)
    cells = []
    for rt in (ort_, ov):
        ms = f" = {rt['original_ms']:.3g} ms" if "original_ms" in rt else ""
        if "original_task" in rt:
            cells += ["yes", f"1.0000{_vs_ort(rt)}", _metric_cell(rt["original_task"], key), f"1.00x{ms}"]
        else:
            cells += ["**rejected**" if "original_rejected" in rt else "n/a", "-", "-", "-"]
    rows = [f"| {name} | original ({key or 'no metric'}) | | " + " | ".join(cells) + " |"]
    for family, entry in doc["families"].items():
        if "skipped" in entry:
            rows.append(f"| {name} | {family} | {entry['skipped'][:100]} |" + " |" * 8)
            continue
        steps = ", ".join(f"{s['name']} {s['rewritten']}" for s in entry["steps"] if s["accepted"] and s["modified"])
        if entry["unchanged"]:
            steps = (steps + "; " if steps else "") + "**family made no change**"
        if entry["rolled_back"]:
            steps += "; rolled back: " + "; ".join(entry["rolled_back"])[:80]
        cells = _rt_cells(ort_, family, key) + _rt_cells(ov, family, key)
        rows.append(f"| {name} | {family} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


HEADER = ("| model | family | steps that changed it (items rewritten) | ORT loads | ORT cosine | ORT metric | ORT latency (spread) "
          "| OV loads | OV cosine | OV metric | OV latency (spread) |\n|" + "---|" * 11)


def rejections(docs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for d in docs:
        for rt_name, rt in d.get("runtimes", {}).items():
            if "original_rejected" in rt:
                lines.append(f"- {d['model']} original: rejected by {rt_name}: {rt['original_rejected']}")
            for family in d.get("families", {}):
                cell = rt.get(family, {})
                if isinstance(cell, dict) and "rejected" in cell:
                    lines.append(f"- {d['model']} / {family}: rejected by {rt_name}: {cell['rejected']}")
    return lines


def render(doc: dict[str, Any]) -> str:
    order = {name: i for i, name in enumerate(MODELS)}
    docs = sorted(doc["models"], key=lambda d: order.get(d["model"], len(order)))
    parts = [HEADER, *(render_model(d) for d in docs)]
    env = doc["environment"]
    parts.append("\n" + env["cpu_line"] + "; flags: " + " ".join(env.get("cpu_flags", [])))
    if env.get("openvino_inference_precision"):
        parts.append(f"OpenVINO CPU inference precision (its default here): {env['openvino_inference_precision']}")
    parts.append("versions: " + ", ".join(f"{k} {v}" for k, v in doc["environment"]["versions"].items() if v))
    busy = [max(rt.get("cpu_busy", [0, 0])) for d in docs for rt in d.get("runtimes", {}).values()]
    if busy:
        parts.append(f"CPU busy while timing: up to {max(busy):.0%}")
    rej = rejections(docs)
    parts.append("\nRejected outputs:\n" + ("\n".join(rej) if rej else "- none"))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="latency runs per model per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=64, help="calibration/verification samples for optimize")
    ap.add_argument("--timeout", type=float, default=360.0, help="hard cap per model (seconds)")
    ap.add_argument("--soft-budget", type=float, default=150.0,
                    help="a family's optimize does not start after this many seconds of the model's run")
    ap.add_argument("--render", action="store_true", help="print the tables of the saved results and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    if args.one:
        return child(args)
    if args.render:
        print(render(json.loads(RESULT.read_text())))
        return 0
    os.environ.setdefault("GRAPH_OPT_PROGRESS", "0")
    print(HEADER, flush=True)
    start = time.perf_counter()
    docs = run_models(args)
    path = save(docs, args)
    print(f"\n{render(json.loads(path.read_text()))}\n\nwrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
