"""Channel and weight pruning on real trained models: parameters, MACs, latency, fidelity.

    pip install -e '.[bench]'
    python benchmarks/bench_prune.py [--models example,resnet,mobilenet,minilm] [--runs 200]

For each model (benchmarks/zoo.py) and each importance criterion (l1, l2, bn_gamma, activation
on the calibration split) it removes channels at several ratios with `prune_channels`
(mode=remove, default settings otherwise: first/last layers kept, exact bias folding, kept widths
rounded to 4), followed by `fold_batchnorm` for the CNNs; plus unstructured `prune_weights` at 50% and
2:4 to show that zeros shrink the compressed file, not the latency. Everything is measured
against the fp32 original in one run (benchmarks/_harness.py). No recovery (`reconstruct`).
Writes benchmarks/results/bench_prune.json and prints Markdown tables.
"""

from __future__ import annotations

import gzip
import sys
import time

import _harness
import zoo

from graph_opt.pass_base import PassContext
from graph_opt.passes import Cleanup, FoldBatchnorm, PruneChannels, PruneWeights

RATIOS = (0.1, 0.25, 0.4)


def variants(zm) -> tuple[dict, dict]:
    model = zm.load()
    ctx = PassContext(data=zm.calib)
    cnn = zm.task.startswith("classification")
    # Prune first, then fold: bn_gamma reads the BatchNormalization (l1/l2 score the BN-scaled
    # filter either way), and folding afterwards gives the deployable model.
    suffix = [FoldBatchnorm(), Cleanup()] if cnn else [Cleanup()]
    criteria = ("l1", "l2", "bn_gamma", "activation") if cnn else ("l1", "l2", "activation")
    out, extras = {}, {}

    def add(name, passes):
        start = time.perf_counter()
        m, n = _harness.apply_passes(model, passes, ctx, (PruneChannels, PruneWeights))
        out[name] = m
        extras[name] = {"rewritten": n, "seconds": round(time.perf_counter() - start, 2),
                        "gzip_bytes": len(gzip.compress(m.SerializeToString(), 6))}

    for ratio in RATIOS:
        for importance in criteria:
            add(f"channels {ratio:.0%} {importance}",
                [PruneChannels(ratio=ratio, importance=importance), *suffix])
    add("weights 50% (unstructured)", [*suffix[:-1], PruneWeights(sparsity=0.5), Cleanup()])
    add("weights 2:4", [*suffix[:-1], PruneWeights(pattern="2:4"), Cleanup()])
    return out, extras


def main(argv=None) -> int:
    args = _harness.zoo_args(__doc__, models="example,resnet,mobilenet,minilm", runs=200, argv=argv)
    def fp32_gzip(zm, extras):
        extras["fp32"] = {"gzip_bytes": len(gzip.compress(zm.load().SerializeToString(), 6))}

    def gzip_ratios(got, extras):
        for r in got:
            r.extra["gzip_ratio"] = round(r.extra["gzip_bytes"] / extras["fp32"]["gzip_bytes"], 3)
        return "gzip-compressed size vs fp32: " + ", ".join(f"{r.variant}: {r.extra['gzip_ratio']:.2f}x" for r in got[1:])

    rows = _harness.measure_models(args, zoo.get, variants, before=fp32_gzip, after=gzip_ratios)
    path = _harness.save("bench_prune", rows, {"runs": args.runs, "threads": args.threads, "ratios": RATIOS})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
