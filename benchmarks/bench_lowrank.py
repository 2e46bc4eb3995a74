"""Low-rank factorization on real trained models: MACs, parameters, latency and fidelity.

    pip install -e '.[bench]'
    python benchmarks/bench_lowrank.py [--models example,resnet,mobilenet,minilm] [--runs 200]

For each model (benchmarks/zoo.py: the built-in example, a ResNet-style and a MobileNet-style
CNN trained on real MNIST digits, the real all-MiniLM-L6-v2 sentence encoder) it builds variants
with graph-opt's passes and measures all of them against the fp32 original in one run
(benchmarks/_harness.py): fold_batchnorm → factorize_conv (Tucker-2 or spatial SVD) →
factorize_gemm → cleanup at several per-layer MAC budgets (the fidelity-vs-MACs curve), the
default settings, and the same budget with the latency gate and rank alignment switched off (to
show where MACs drop but latency does not). No recovery (no `reconstruct`): raw factorization.
Writes benchmarks/results/bench_lowrank.json and prints Markdown tables.
"""

from __future__ import annotations

import sys
import time

import _harness
import zoo

from graph_opt.pass_base import PassContext
from graph_opt.passes import Cleanup, FactorizeConv, FactorizeGemm, FoldBatchnorm

# Per-layer MAC budgets of the fidelity-vs-MACs curve. The curve runs without rank alignment
# (align=0): with 32-channel layers the only 16-aligned rank that saves is 16, so aligned budgets
# collapse onto one point; the aligned default is measured on its own row.
LEVELS = (0.3, 0.5, 0.7, 0.9)


def variants(zm) -> tuple[dict, dict]:
    model = zm.load()
    ctx = PassContext(data=zm.calib)  # binds dynamic dims (MiniLM's sequence) for MAC-based ranks
    out, extras = {}, {}

    def add(name, passes):
        start = time.perf_counter()
        m, n = _harness.apply_passes(model, passes, ctx, (FactorizeConv, FactorizeGemm))
        out[name] = m
        extras[name] = {"rewritten": n, "seconds": round(time.perf_counter() - start, 2)}

    if zm.task.startswith("classification"):
        for method in ("tucker2", "spatial_svd"):
            for level in LEVELS:
                add(f"{method} macs<={level} align=0", [FoldBatchnorm(), FactorizeConv(method=method, macs_ratio=level, align=0),
                                                        FactorizeGemm(macs_ratio=level, align=0), Cleanup()])
        add("default (tucker2, macs<=0.5, align=16)", [FoldBatchnorm(), FactorizeConv(), FactorizeGemm(), Cleanup()])
        add("spatial_svd macs<=0.5 align=16", [FoldBatchnorm(), FactorizeConv(method="spatial_svd"), FactorizeGemm(), Cleanup()])
        add("tucker2 macs<=0.5 ungated", [FoldBatchnorm(), FactorizeConv(macs_ratio=0.5, latency_gate=False, align=0),
                                          FactorizeGemm(macs_ratio=0.5, latency_gate=False, align=0), Cleanup()])
        if zm.name == "example":
            add("cp macs<=0.5", [FoldBatchnorm(), FactorizeConv(method="cp", macs_ratio=0.5), Cleanup()])
    else:
        for level in LEVELS:
            add(f"svd macs<={level} align=0", [FactorizeGemm(macs_ratio=level, align=0), Cleanup()])
        add("default (svd, macs<=0.5, align=16)", [FactorizeGemm(), Cleanup()])
        add("svd macs<=0.5 ungated", [FactorizeGemm(macs_ratio=0.5, latency_gate=False, align=0), Cleanup()])
    return out, extras


def main(argv=None) -> int:
    args = _harness.zoo_args(__doc__, models="example,resnet,mobilenet,minilm", runs=200, argv=argv)
    rows = _harness.measure_models(args, zoo.get, variants)
    path = _harness.save("bench_lowrank", rows, {"runs": args.runs, "threads": args.threads, "levels": LEVELS})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
