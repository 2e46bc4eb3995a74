"""Cross-layer equalization and bias correction before / inside int8 quantization, on real CNNs.

    pip install -e '.[bench]'
    GRAPH_OPT_ZOO=<cache> python benchmarks/bench_equalize.py [--models resnet,orinet,...] [--rounds 10]

For each model (zoo and corpus, `zoo.get`; raw exports go through `simplify`, `fold_batchnorm`
and `cleanup` first, exact) the variants are:

- ``equalize``: the `equalize` pass alone (exact: its fidelity says so);
- ``quantize``: the `quantize` pass with its defaults (target host, static uint8 activations);
- ``quantize bc``: the same with ``bias_correction=True``;
- ``equalize + quantize`` and ``equalize + quantize bc``.

Every variant is calibrated on the calibration split and scored on the eval split with the
model's task metric and the fidelity to fp32 (cosine, top-1 agreement for classifiers). Latency
is interleaved over ``--rounds`` rounds (median ratio to fp32 and its spread over the rounds),
with how busy the machine was; the CPU model and flags are recorded. Each row also keeps the
wall time of its passes and how many pairs `equalize` rewrote. Writes results/bench_equalize.json
and Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness
import zoo

from graph_opt.pass_base import PassContext
from graph_opt.passes import Cleanup, Equalize, FoldBatchnorm, Quantize, Simplify

MODELS = "resnet,orinet,opennsfw,ppocr_cls,ppocr_det,ppocr_rec"
EXTRA_KEYS = ("pairs", "seconds", "snr_db")


def _apply(model, passes, ctx):
    """`passes` in order; the result and (pairs equalize rewrote, seconds taken)."""
    pairs, t0 = 0, time.perf_counter()
    for p in passes:
        result = p(model, ctx)
        if isinstance(p, Equalize):
            pairs = len(result.report.rewritten)
        model = result.model
    return model, {"pairs": pairs, "seconds": round(time.perf_counter() - t0, 2)}


def variants(zm):
    raw = zm.load()
    ctx = PassContext(data=zm.calib, original=raw)
    base, _ = _apply(raw, [Simplify(), FoldBatchnorm(), Cleanup()], ctx)
    recipes = {
        "equalize": [Equalize()],
        "quantize": [Quantize()],
        "quantize bc": [Quantize(bias_correction=True)],
        "equalize + quantize": [Equalize(), Quantize()],
        "equalize + quantize bc": [Equalize(), Quantize(bias_correction=True)],
    }
    models, extras = {}, {}
    for name, passes in recipes.items():
        models[name], extras[name] = _apply(base, passes, PassContext(data=zm.calib, original=raw))
        print(f"  {zm.name} {name}: {extras[name]}", flush=True)
    return models, extras


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--runs", type=int, default=20, help="latency runs per model and round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        zm = zoo.get(name)
        vs, extras = variants(zm)
        got = _harness.measure(zm, vs, runs=args.runs, threads=args.threads, extras=extras, rounds=args.rounds)
        for r in got:  # the metrics saturate on the easy models: SNR still tells the variants apart
            r.extra["snr_db"] = round(float(r.snr_db), 2)
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(_harness.markdown(got, extra_keys=EXTRA_KEYS), flush=True)
        _harness.save("bench_equalize", rows, {"command": "python benchmarks/bench_equalize.py "
                                               + " ".join(sys.argv[1:] if argv is None else argv)})
    print("\n" + _harness.cpu_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
