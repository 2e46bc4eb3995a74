"""Shared measurement code for the benchmark scripts: one table row per model variant.

Every number a benchmark publishes comes from `measure(...)`, which for one zoo model and a set of
variants (name → ModelProto) computes, in one process and one run:

- parameters, MACs (batch 1) and serialized size of each variant (`graph_opt.stats`);
- fidelity against the original on the eval split (graph-opt's parity harness: onnxruntime CPU,
  optimizations off): cosine and SNR of the outputs, top-1 agreement for logits;
- the task metric of each variant (accuracy, paraphrase retrieval, detection agreement);
- latency ratios to the original: every variant timed in the same process, interleaved with a
  rotating order, medians of `runs` runs each, graph optimizations on (as deployed), spinning
  worker threads stopped (docs/design.md, fact 1), one sample per run;
- how busy the machine was while measuring (other processes' CPU share), because ratios from a
  busy machine are unreliable.

Results go to `benchmarks/results/<bench>.json` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graph_opt.stats import measure_latency, model_stats
from graph_opt.target import host
from graph_opt.verify import compare_outputs

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def zoo_args(doc: str, *, models: str, runs: int, argv=None) -> argparse.Namespace:
    """The command line every zoo benchmark takes: --models (comma-separated zoo or corpus names),
    --runs (latency runs per model) and --threads."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default=models)
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def apply_passes(model: onnx.ModelProto, passes, ctx, counted: tuple[type, ...]) -> tuple[onnx.ModelProto, int]:
    """`passes` one after the other (no verification): the final model and how many layers the
    passes of the `counted` classes rewrote."""
    rewritten = 0
    for p in passes:
        result = p(model, ctx)
        if isinstance(p, counted):
            rewritten += len(result.report.rewritten)
        model = result.model
    return model, rewritten


def measure_models(args: argparse.Namespace, get, variants, *, before=None, after=None) -> list[Row]:
    """`measure` on every model of ``args.models`` (``get(name)`` loads one, ``variants(zm)`` gives
    (models, extras)), printing each model's table as it completes. ``before(zm, extras)`` may add
    extras; ``after(rows, extras)`` may annotate the rows and return a line to print."""
    rows = []
    for name in args.models.split(","):
        zm = get(name)
        vs, extras = variants(zm)
        if before is not None:
            before(zm, extras)
        got = measure(zm, vs, runs=args.runs, threads=args.threads, extras=extras)
        for r in got:
            r.rewritten = r.extra.get("rewritten", 0)
        line = after(got, extras) if after is not None else None
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(markdown(got), flush=True)
        if line:
            print(f"\n{line}", flush=True)
    return rows


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of total CPU time used by anything (this process included) over `seconds`."""
    def snap():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


@dataclass
class Row:
    model: str
    variant: str
    params: int
    macs: int | None
    file_bytes: int
    params_ratio: float
    macs_ratio: float | None
    size_ratio: float
    latency_ms: float
    latency_ratio: float
    cosine: float
    snr_db: float
    top1_agreement: float | None
    task: dict[str, float]
    rewritten: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def measure(zm, variants: dict[str, onnx.ModelProto], *, runs: int = 200, threads: int = 1,
            extras: dict[str, dict[str, Any]] | None = None, rounds: int = 1,
            macs_of: onnx.ModelProto | None = None) -> list[Row]:
    """Rows for the original ('fp32') and every variant of one zoo model, measured in one run.

    ``rounds`` > 1: latency over that many interleaved rounds of ``runs`` runs (`latency_rounds`),
    each row's ``extra['latency_spread']`` = (min, max) of its ratio over the rounds.
    ``macs_of``: an exact rewrite of the original (e.g. simplified) whose MACs stand for fp32's, for
    exports whose shapes stop at a computed op; every other fp32 figure is the original's."""
    original = zm.load()
    models = {"fp32": original, **variants}
    ref_out = zm.outputs(original, threads=threads)  # the model's own runner where it has one
    stats = {name: model_stats(m, shapes=zm.shapes) for name, m in models.items()}
    if macs_of is not None:
        stats["fp32"] = replace(stats["fp32"], macs=model_stats(macs_of, shapes=zm.shapes).macs)
    feed = zm.sample(0)
    busy_before = cpu_busy(0.5)
    spread = None
    if rounds > 1:
        latencies, spread = latency_rounds(list(models.values()), feed, rounds=rounds, runs=runs, threads=threads)
    else:
        latencies = measure_latency(list(models.values()), feed, runs=runs, threads=threads)
    busy_after = cpu_busy(0.5)
    base = stats["fp32"]
    rows = []
    for k, ((name, model), lat) in enumerate(zip(models.items(), latencies)):
        out = ref_out if name == "fp32" else zm.outputs(model, threads=threads)
        parity = compare_outputs(ref_out, out, data_source=zm.name)
        st = stats[name]
        rows.append(Row(
            model=zm.name, variant=name, params=st.params, macs=st.macs, file_bytes=st.file_bytes,
            params_ratio=st.params / base.params, macs_ratio=(st.macs / base.macs) if st.macs and base.macs else None,
            size_ratio=st.file_bytes / base.file_bytes, latency_ms=lat,
            latency_ratio=spread[k][0] if spread else lat / latencies[0],
            cosine=parity.cosine, snr_db=parity.snr_db,
            top1_agreement=parity.top1 if zm.task.startswith("classification") else None, task=zm.evaluate(out),
            extra={"cpu_busy_before": round(busy_before, 3), "cpu_busy_after": round(busy_after, 3),
                   **({"latency_spread": [round(spread[k][1], 3), round(spread[k][2], 3)]} if spread else {}),
                   **((extras or {}).get(name, {}))},
        ))
    return rows


def cpu_info() -> dict[str, Any]:
    """The CPU model, architecture and the int8/vector features it has (`graph_opt.target`)."""
    return host().to_dict()


def cpu_line() -> str:
    """One line naming the CPU and its flags, printed under every benchmark table."""
    return "CPU: " + host().describe()


def latency_rounds(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], *, rounds: int = 10,
                   runs: int = 20, threads: int = 1) -> tuple[list[float], list[tuple[float, float, float]]]:
    """Median latency (ms) of each model over `rounds` interleaved rounds of `runs` runs, and each
    model's ratio to the first model as (median, min, max) over the rounds: the spread a ratio
    read from one shared machine carries."""
    per_round = [measure_latency(models, feed, runs=runs, threads=threads, warmup=3 if r else 10)
                 for r in range(rounds)]
    times = np.asarray(per_round)  # rounds x models
    ratios = times / times[:, :1]
    medians = [float(v) for v in np.median(times, axis=0)]
    spread = [(float(np.median(c)), float(c.min()), float(c.max())) for c in ratios.T]
    return medians, spread


def environment() -> dict[str, Any]:
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(bench: str, rows: list[Row], meta: dict[str, Any] | None = None) -> Path:
    """Write the rows; rows (model, variant) this run did not measure are kept from the previous
    file (so `--models resnet` refreshes one model's rows without dropping the others). Each row's
    ratios are to the fp32 run of its own measurement."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{bench}.json"
    new = [asdict(r) for r in rows]
    measured = {(r["model"], r["variant"]) for r in new}
    old = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    kept = [r for r in old if (r["model"], r["variant"]) not in measured]
    doc = {"bench": bench, "environment": environment(), **(meta or {}), "rows": kept + new}
    path.write_text(json.dumps(doc, indent=1, default=_default))
    return path


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return str(o)
    return str(o)


def markdown(rows: list[Row], task_keys: list[str] | None = None, extra_keys=()) -> str:
    """One table row per variant; `extra_keys` adds columns from each row's ``extra`` (``-`` where absent)."""
    keys = task_keys if task_keys is not None else sorted({k for r in rows for k in r.task})
    counted = any(r.rewritten for r in rows)  # a bench that does not count rewritten layers shows no column of 0s
    head = ["model", "variant", "params", "MACs", *extra_keys, "size", "latency", "cosine", "top-1 agr", *keys,
            *(["rewritten"] if counted else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model, r.variant, f"{r.params_ratio:.2f}x", "-" if r.macs_ratio is None else f"{r.macs_ratio:.2f}x",
                 *[_cell(r.extra.get(k)) for k in extra_keys], f"{r.size_ratio:.2f}x", f"{r.latency_ratio:.2f}x" + _spread(r), f"{r.cosine:.4f}",
                 "-" if r.top1_agreement is None else f"{r.top1_agreement:.3f}",
                 *[_cell(r.task.get(k)) for k in keys], *([str(r.rewritten)] if counted else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(r: Row) -> str:
    lo_hi = r.extra.get("latency_spread")
    return f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else ""


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render(bench: str, task_keys: list[str] | None = None, models: list[str] | None = None, extra_keys=()) -> str:
    """The Markdown tables of a saved result file, one per model (as pasted into RESULTS.md)."""
    doc = json.loads((RESULTS_DIR / f"{bench}.json").read_text())
    rows = [Row(**r) for r in doc["rows"] if models is None or r["model"] in models]
    parts = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = sorted((r for r in rows if r.model == model), key=lambda r: r.variant != "fp32")
        busy = max(max(r.extra.get("cpu_busy_before", 0), r.extra.get("cpu_busy_after", 0)) for r in mine)
        keys = [k for k in (task_keys or []) if any(k in r.task for r in mine)] or None
        parts.append(f"**{model}** (CPU busy while timing: up to {busy:.0%})\n\n{markdown(mine, keys, extra_keys)}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    import sys

    # BENCH [TASK_KEYS [MODELS [EXTRA_KEYS]]], comma-separated lists
    lists = [a.split(",") if a else None for a in sys.argv[2:5]] + [None] * 3
    print(render(sys.argv[1], lists[0], lists[1], lists[2] or ()))
