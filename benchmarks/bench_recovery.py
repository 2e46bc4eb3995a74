"""Distillation without training: fidelity before/after `reconstruct` on real trained models.

    pip install -e '.[bench]'
    python benchmarks/bench_recovery.py [--models example,resnet,minilm] [--runs 100]

For each model (benchmarks/zoo.py) and each compression at several levels — low-rank
(factorize_conv Tucker-2 / factorize_gemm SVD at per-layer MAC budgets), channel pruning
(prune_channels, l1) and quantization (int8 static, int4 weights) — the compressed model is
measured with and without a following `reconstruct`. `reconstruct` fits on the calibration
split; every number is measured on the eval split, which is held out (disjoint from calibration
and training data). All variants of one model are measured in one run (benchmarks/_harness.py).
Writes benchmarks/results/bench_recovery.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness
import zoo

from graph_opt.pass_base import PassContext
from graph_opt.passes import (Cleanup, FactorizeConv, FactorizeGemm, FoldBatchnorm, PruneChannels, Quantize,
                              Reconstruct)


def _apply(model, passes, ctx):
    for p in passes:
        result = p(model, ctx)
        ctx.history.append(result.report)
        model = result.model
    return model


def recipes(zm) -> dict[str, list]:
    cnn = zm.task.startswith("classification")
    out = {}
    if cnn:
        for level in (0.3, 0.5):
            out[f"lowrank macs<={level}"] = [FoldBatchnorm(), FactorizeConv(macs_ratio=level), FactorizeGemm(macs_ratio=level)]
        for ratio in (0.25, 0.4):
            out[f"prune {ratio:.0%}"] = [FoldBatchnorm(), PruneChannels(ratio=ratio)]
        out["int8"] = [FoldBatchnorm(), Quantize()]
        out["int4 weights"] = [FoldBatchnorm(), Quantize(weights="int4", activations="none", block_size=0)]
    else:
        for level in (0.3, 0.5):
            out[f"lowrank macs<={level}"] = [FactorizeGemm(macs_ratio=level)]
        for ratio in (0.25, 0.4):
            out[f"prune FFN {ratio:.0%}"] = [PruneChannels(ratio=ratio)]
        out["int8"] = [Quantize()]
        out["int4 weights"] = [Quantize(weights="int4", activations="none")]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="example,resnet,minilm")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="run only recipes whose name contains this text")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        zm = zoo.get(name)
        original = zm.load()
        variants, extras = {}, {}
        for label, passes in recipes(zm).items():
            if args.only not in label:
                continue
            ctx = PassContext(data=zm.calib, original=original)
            start = time.perf_counter()
            compressed = _apply(original, passes + [Cleanup()], ctx)
            t1 = time.perf_counter()
            rec = Reconstruct()(compressed, ctx)
            t2 = time.perf_counter()
            variants[label] = compressed
            variants[label + " + reconstruct"] = rec.model
            extras[label] = {"seconds": round(t1 - start, 2)}
            extras[label + " + reconstruct"] = {"seconds": round(t2 - t1, 2), "refit_layers": len(rec.report.rewritten),
                                                "skipped": len(rec.report.skipped)}
        got = _harness.measure(zm, variants, runs=args.runs, threads=args.threads, extras=extras)
        for r in got:
            r.rewritten = r.extra.get("refit_layers", 0)
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(_harness.markdown(got).replace("| rewritten |", "| refit layers |"), flush=True)
    path = _harness.save("bench_recovery", rows, {"runs": args.runs, "threads": args.threads})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
