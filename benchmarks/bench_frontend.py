"""What the front door (`simplify`, run before every pipeline) changes for the passes behind it.

For every corpus model (real exports, `corpus.py`) and zoo model, in one process:

- MACs and node count of the raw export and of its simplified form (`graph_opt.stats`);
- `quantize` (defaults) three ways, each through `graph_opt.optimize` with the same calibration and
  verification data: on the raw export with the front door off (`simplify=False`, what the
  passes saw before it existed), on the raw export as users now run it (simplify first), and on the
  model already simplified (`simplify=False`). The last two must give the same plan (the same
  nodes quantized, with the same dtypes) and the same latency; wall time of each;
- int8 latency of the three against the fp32 raw export: interleaved rounds, median ratio and its
  spread over the rounds, CPU model and flags recorded;
- `factorize_gemm`, `factorize_conv` and `prune_channels` (defaults) on the raw export as users run
  it: layers rewritten and the MAC ratio (never 0 MACs: shapes are known after the front door).

Results: `results/bench_frontend.json` and a Markdown table on stdout (RESULTS.md, "Front door").

    python benchmarks/bench_frontend.py [--models NAME ...] [--rounds 10] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
import corpus  # noqa: E402
import zoo  # noqa: E402

import graph_opt  # noqa: E402
from graph_opt.data import load_data  # noqa: E402
from graph_opt.stats import model_stats  # noqa: E402

VERIFY_SAMPLES = 16
STRUCTURAL = ("factorize_gemm", "factorize_conv", "prune_channels")


def _plan(result) -> dict[str, str]:
    """node name → action (quantize / float / skip) in the quantize step's plan (the report's
    `plan:` note); measured sensitivities are left out, they differ in the last bits."""
    step = next(s for s in result.steps if s.name == "quantize")
    note = next((n for n in step.report.notes if n.startswith("plan: ")), None) if step.report else None
    if note is None:
        return {}
    plan = json.loads(note[len("plan: "):])
    return {f"{d['op']} {d['node']}": d["action"] for d in plan.get("nodes", [])}


def _run(zm, model, passes, *, simplify: bool):
    start = time.perf_counter()
    # No shapes= here: zm.shapes binds the batch to 1 for counting MACs, and a bound batch would
    # keep simplify from leaving it dynamic; the data's own shapes bind the other dims.
    # the data as graph-opt reads it (each input's batch axis), then the first samples
    data = load_data(zm.eval, model).take(VERIFY_SAMPLES)
    result = graph_opt.optimize(model, passes, data=data, calib_data=load_data(zm.calib, model),
                                latency=False, simplify=simplify)
    return result, time.perf_counter() - start


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def bench_model(zm, *, rounds: int, runs: int) -> dict:
    raw = zm.load()
    simplified, t_simplify = _run(zm, raw, ["simplify"], simplify=False)
    simple = simplified.model
    st_raw, st_simple = model_stats(raw, shapes=zm.shapes), model_stats(simple, shapes=zm.shapes)
    q = {}
    for name, model, simp in (("raw, front door off", raw, False), ("raw", raw, True),
                              ("simplified", simple, False)):
        result, seconds = _run(zm, model, ["quantize"], simplify=simp)
        q[name] = (result, seconds)
    plans = {name: _plan(r) for name, (r, _) in q.items()}
    models = [raw] + [r.model for r, _ in q.values()]
    _, spread = _harness.latency_rounds(models, zm.sample(0), rounds=rounds, runs=runs)
    row = {
        "model": zm.name, "exporter": zm.info.get("exporter", "-"),
        "nodes": [len(raw.graph.node), len(simple.graph.node)],
        "macs": [st_raw.macs, st_simple.macs], "simplify_s": round(t_simplify, 2),
        "same_plan": plans["raw"] == plans["simplified"] and bool(plans["raw"]),
        "plan_sizes": {k: len(v) for k, v in plans.items()},
        "quantize": {name: {"seconds": round(s, 2), "latency_ratio": spread[i + 1],
                            "qlinear_ops": {k: v for k, v in _ops(r.model).items()
                                            if k in ("QuantizeLinear", "DequantizeLinear")},
                            "cosine": (r.final_parity.cosine if r.final_parity else None)}
                     for i, (name, (r, s)) in enumerate(q.items())},
        "structural": {},
    }
    for spec in STRUCTURAL:
        result, seconds = _run(zm, raw, [spec], simplify=True)
        step = next(s for s in result.steps if s.name == spec)
        after = model_stats(result.model, shapes=zm.shapes)
        row["structural"][spec] = {
            "rewritten": len(step.report.rewritten) if step.report else 0,
            "skipped": len(step.report.skipped) if step.report else 0,
            "accepted": step.accepted, "reason": step.reason,
            # against the simplified model's MACs: the raw export's are unknown when shapes stop at a computed Pad
            "macs_after": after.macs,
            "macs_ratio": (after.macs / st_simple.macs) if after.macs and st_simple.macs else None,
            "seconds": round(seconds, 2),
        }
    return row


def markdown(rows: list[dict]) -> str:
    head = ["model", "exporter", "nodes raw→simplified", "MACs raw / simplified", "same plan",
            "int8 latency: raw, no front door", "raw", "simplified", "quantize s (off / raw / simplified)",
            *[f"{s} rewritten (MACs)" for s in STRUCTURAL]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def macs(v):
        return "unknown" if not v else f"{v / 1e6:.1f}M"

    def ratio(t):
        return f"{t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f})"

    for r in rows:
        qs = r["quantize"]
        cells = [r["model"], r["exporter"], f"{r['nodes'][0]}→{r['nodes'][1]}",
                 f"{macs(r['macs'][0])} / {macs(r['macs'][1])}", "yes" if r["same_plan"] else "NO",
                 *[ratio(qs[k]["latency_ratio"]) for k in ("raw, front door off", "raw", "simplified")],
                 " / ".join(f"{qs[k]['seconds']:.1f}" for k in ("raw, front door off", "raw", "simplified"))]
        for spec in STRUCTURAL:
            s = r["structural"][spec]
            m = "-" if s["macs_ratio"] is None else f"{s['macs_ratio']:.2f}x"
            cells.append(f"{s['rewritten']} ({m})" + ("" if s["accepted"] else " rolled back"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="corpus or zoo names (default: every corpus model)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="runs per model per round")
    args = ap.parse_args(argv)
    names = args.models or corpus.names()
    out = _harness.RESULTS_DIR / "bench_frontend.json"
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    kept = [r for r in old if r["model"] not in names]
    rows = []
    for name in names:
        zm = corpus.load(name) if name in corpus.names() else zoo.ALL[name]()
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(bench_model(zm, rounds=args.rounds, runs=args.runs))
        out.write_text(json.dumps({"bench": "bench_frontend", "environment": _harness.environment(),
                                   "rows": kept + rows}, indent=1, default=str))  # after every model
    print(markdown(kept + rows))
    print(f"\n{_harness.cpu_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
