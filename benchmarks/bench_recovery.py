"""Structural compression that holds: plain vs data-aware factors, then recovery with and without training.

    pip install -e '.[bench,train]'
    python benchmarks/bench_recovery.py [--models resnet,minilm,ppocr_cls,...] [--rounds 10] [--distill-minutes 5]

For each model (zoo and corpus, `zoo.get`) and each structural family at about 0.5–0.7× MACs —
low-rank (`factorize_conv` Tucker-2 + `factorize_gemm` SVD at a per-layer MAC budget), channel
pruning (`prune_channels`, l1), and both — the variants are:

- low-rank: ``plain`` (the weights truncated, ``data=plain``), ``whitened`` (factors that minimize
  each layer's output error on the calibration data, ``data=whitened``), ``whitened + reconstruct``
  (least-squares refit, no training) and ``whitened + reconstruct + distill`` (the student trained
  against the teacher: soft labels / relative MSE, early stopping on held-out calibration batches);
- pruning: ``pruned``, ``+ reconstruct``, ``+ reconstruct + distill``; both: the same on prune → low-rank.

Corpus models are raw exports: `simplify` runs first (exact) and every variant starts from it.
Every fidelity number is on the eval split (held out from calibration and from training);
latency is interleaved over rounds (median ratio and its spread), with the CPU recorded, and
the wall time of each step is kept. Writes results/bench_recovery.json and Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness
import zoo

from graph_opt.pass_base import PassContext
from graph_opt.passes import (Cleanup, Distill, FactorizeConv, FactorizeGemm, FoldBatchnorm, PruneChannels,
                              Reconstruct, Simplify)

LOWRANK_LEVEL = {"classification": 0.5, "default": 0.7}
PRUNE_RATIO = 0.3


def _apply(model, passes, ctx):
    for p in passes:
        result = p(model, ctx)
        ctx.history.append(result.report)
        model = result.model
    return model


def _lowrank(level: float, data: str) -> list:
    return [FactorizeConv(macs_ratio=level, data=data), FactorizeGemm(macs_ratio=level, data=data)]


def families(zm) -> dict[str, tuple[list, list]]:
    """name → (passes before the data-aware choice, the low-rank passes or [] for pruning only)."""
    level = LOWRANK_LEVEL["classification" if zm.task.startswith("classification") else "default"]
    prune = [PruneChannels(ratio=PRUNE_RATIO)]
    return {f"lowrank {level}": ([], [level]), f"prune {PRUNE_RATIO:.0%}": (prune, []),
            f"prune {PRUNE_RATIO:.0%} + lowrank {level}": (prune, [level])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet,minilm")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="runs per model per latency round")
    ap.add_argument("--distill-minutes", type=float, default=5.0)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--distill-lr", type=float, default=1e-4, help="Adam's step size (the pass's default)")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--only", default="", help="run only families whose name contains this text")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        zm = zoo.get(name)
        raw = zm.load()
        base = _apply(raw, [Simplify(), FoldBatchnorm(), Cleanup()], PassContext(data=zm.calib, original=raw))
        variants, extras = {}, {}

        def keep(label, model, seconds, **extra):
            variants[label] = model
            extras[label] = {"seconds": round(seconds, 2), **extra}

        for fam, (first, lowrank) in families(zm).items():
            if args.only not in fam:
                continue
            modes = ["plain", "whitened"] if lowrank else ["whitened"]
            for mode in modes:
                ctx = PassContext(data=zm.calib, original=raw)
                start = time.perf_counter()
                model = _apply(base, first + (_lowrank(lowrank[0], mode) if lowrank else []) + [Cleanup()], ctx)
                label = fam + (f" {mode}" if lowrank else "")
                keep(label, model, time.perf_counter() - start)
                if mode == "plain":
                    continue
                start = time.perf_counter()
                rec = Reconstruct()(model, ctx)
                ctx.history.append(rec.report)
                keep(label + " + reconstruct", rec.model, time.perf_counter() - start, refit=len(rec.report.rewritten))
                if args.no_distill:
                    continue
                start = time.perf_counter()
                dist = Distill(steps=args.distill_steps, max_minutes=args.distill_minutes, lr=args.distill_lr, threads=2,
                               patience=6)(rec.model, ctx)
                keep(label + " + reconstruct + distill", dist.model, time.perf_counter() - start,
                     notes=[n for n in dist.report.notes if n.startswith("distill:")],
                     skipped=[s.reason for s in dist.report.skipped])
        got = _harness.measure(zm, variants, rounds=args.rounds, runs=args.runs, extras=extras)
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(_harness.markdown(got), flush=True)
    path = _harness.save("bench_recovery", rows, {"rounds": args.rounds, "runs": args.runs})
    print(f"\n{_harness.cpu_line()}\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
