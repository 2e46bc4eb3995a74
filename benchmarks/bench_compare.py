"""Pass orderings side by side: `graph-opt compare` on real trained models.

    pip install -e '.[bench]'
    python benchmarks/bench_compare.py [--models example,resnet] [--runs 100]

Six orderings of the same three compressions, each followed by `reconstruct` (refit before
quantizing, bias correction after): low-rank (`factorize_conv`, Tucker-2 at half the MACs per
layer), channel pruning (`prune_channels`, 40% by l1) and int8 (`quantize`, static, minmax).
Plus the recommended recipe (`graph_opt/example/recipe.yaml`) and the same order with automatic
budgets (`target_macs` per pass instead of per-layer numbers). Calibration on the model's calibration split, every number on its held-out eval split.
Writes benchmarks/results/compare_<model>.{md,json,png} (the same files as
`graph-opt compare --out-dir`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zoo

from graph_opt import example
from graph_opt.compare import Comparer, named_pipelines
from graph_opt.model_io import write_atomic
from graph_opt.registry import load_recipe
from graph_opt.report import jsonable

RESULTS = Path(__file__).resolve().parent / "results"

LOWRANK = "factorize_conv reconstruct"
PRUNE = "prune_channels:ratio=0.4 reconstruct"
INT8 = "quantize reconstruct"
# The recipe's order with global targets instead of per-layer numbers (graph_opt/budget.py).
BUDGETS = ("fold_batchnorm prune_channels:target_macs=0.75 reconstruct factorize_conv:target_macs=0.6 reconstruct "
           "quantize reconstruct")


def orderings() -> dict[str, list]:
    blocks = {"L": LOWRANK, "P": PRUNE, "Q": INT8}
    out = {}
    for order in ("PLQ", "LPQ", "PQL", "LQP", "QPL", "QLP"):
        out["→".join(order)] = " ".join(blocks[c] for c in order)
    out["recipe"] = load_recipe(example.example_dir() / "recipe.yaml")
    out["budgets"] = BUDGETS
    return out


def summary(doc: dict) -> str:
    """One row per pipeline: its final model against the original (the RESULTS.md table)."""
    rows = ["| pipeline | params | size | MACs | latency | accuracy | Pareto |", "|---|---|---|---|---|---|---|"]
    base = doc["original"]["parity"]["accuracy_candidate"]
    rows.append(f"| original | 1.00x | 1.00x | 1.00x | 1.00x | {base:.1%} | |")
    for p in doc["pipelines"]:
        f = p["final"]
        front = ", ".join(k for k, v in f["pareto"].items() if v)
        rows.append(f"| {p['name']} | {f['params_ratio']:.2f}x | {f['size_ratio']:.2f}x | {f['macs_ratio']:.2f}x "
                    f"| {f['latency_ratio']:.2f}x | {f['fidelity']:.1%} | {front} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="example,resnet")
    ap.add_argument("--runs", type=int, default=100, help="latency runs per model (all interleaved)")
    ap.add_argument("--summary", action="store_true", help="print the summary tables of the saved results and exit")
    args = ap.parse_args(argv)
    if args.summary:
        for name in args.models.split(","):
            doc = json.loads((RESULTS / f"compare_{name}.json").read_text())
            print(f"{name}: {doc['command']} ({doc['seconds']:.0f} s)\n\n{summary(doc)}\n")
        return 0
    RESULTS.mkdir(exist_ok=True)
    for name in args.models.split(","):
        zm = zoo.get(name)
        model = zm.load()
        start = time.perf_counter()
        comparison = Comparer(named_pipelines(orderings()), verify_data=zm.eval, calib_data=zm.calib,
                              metric="accuracy", latency_runs=args.runs, shapes=zm.shapes).run(model)
        seconds = time.perf_counter() - start
        print(f"## {name} ({seconds:.0f} s)\n")
        print(comparison.table(timings=False))
        stem = RESULTS / f"compare_{name}"
        plot = comparison.plot(stem.with_suffix(".png"), title=f"graph-opt compare: {name}")
        markdown = comparison.markdown(source=f"{name} (benchmarks/zoo.py)", plot=plot.name)
        write_atomic(stem.with_suffix(".md"), markdown.encode())
        doc = {"model": name, "seconds": seconds, "command": "python benchmarks/bench_compare.py " + " ".join(argv or sys.argv[1:]),
               **comparison.to_dict()}
        write_atomic(stem.with_suffix(".json"), json.dumps(jsonable(doc), indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
