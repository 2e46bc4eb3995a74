"""SmoothQuant-style scale migration before int8 quantization, on real transformer exports.

    python benchmarks/bench_smooth.py [--models minilm,minilm_dynamo] [--alphas 0.3,0.5,0.7,0.85]
                                      [--rounds 10] [--runs 20] [--sensitivity-off]

For every model (the zoo's MiniLM, exported with the TorchScript exporter, and the corpus's
``minilm_dynamo``, the same weights through the dynamo exporter) and the calibration split it ships:

- ``quantize``: graph-opt's ``Quantize(smooth="off")``, its defaults otherwise (the target read from this CPU);
- ``quantize smooth=auto``: ``Quantize()``, whose default runs the smooth pass first (its time included);
- ``smooth a=A <mode> → quantize``: ``Smooth(alpha=A, unfoldable=mode)`` then the same
  ``Quantize(smooth="off")``, for every alpha of ``--alphas`` and both modes: ``skip`` (exact folds only, no
  node added) and ``mul`` (also the tensors whose producer cannot absorb 1/s or whose other
  readers need them unscaled, one Mul each);
- ``smooth … (float)``: the smoothed float model alone at alpha 0.5 (its parity shows it is exact);
- with ``--sensitivity-off`` the same with ``sensitivity_snr_db=None`` (every layer int8):
  what the smoothing does to the layers the default keeps float.

Every variant is measured against the fp32 original in one run (benchmarks/_harness.py): output
cosine with onnxruntime optimizations off, the per-sentence embedding cosine (mean and min over the
eval split, the number the issue's ``≥ 0.995`` target is about), paraphrase retrieval, and the same
cosine with every optimization on (the fused int8 kernels, as deployed); latency ratio to fp32
over ``--rounds`` interleaved rounds of ``--runs`` runs (median and spread), with the machine's
busy share. Also per variant: layers quantized, layers kept float by the sensitivity gate, Mul
nodes added, and the pass times. Writes benchmarks/results/bench_smooth.json; prints Markdown.
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness
import bench_quantize
import zoo

from graph_opt.pass_base import PassContext
from graph_opt.passes import Quantize, Smooth

TASK_KEYS = ["sample_cos_mean", "sample_cos_min", "pair_top1", "pair_margin"]


def variants(zm, alphas: list[float], sensitivity_off: bool) -> tuple[dict, dict]:
    model = zm.load()
    ctx = PassContext(data=zm.calib)
    out, extras = {}, {}
    # smooth="off": the rows compare smooth's own output, quantized the same way (quantize's default
    # would smooth the already smoothed models again)
    quantizers = {"": Quantize(smooth="off")}
    if sensitivity_off:
        quantizers[", sensitivity off"] = Quantize(smooth="off", sensitivity_snr_db=None)

    def quantized(name, source, smooth_info):
        for tag, q in quantizers.items():
            start = time.perf_counter()
            res = q(source, ctx)
            seconds = time.perf_counter() - start
            out[name + tag] = res.model
            extras[name + tag] = {
                **smooth_info, "quantize_s": round(seconds, 1),
                "int8_layers": sum(1 for e in res.report.rewritten if e.get("weight")),
                "kept_float": sum("sensitive" in s.reason for s in res.report.skipped)}
            print(f"[{zm.name}] {name + tag}: {extras[name + tag]}", file=sys.stderr, flush=True)

    quantized("quantize", model, {})
    start = time.perf_counter()
    res = Quantize(smooth="auto")(model, ctx)
    out["quantize smooth=auto"] = res.model
    extras["quantize smooth=auto"] = {"quantize_s": round(time.perf_counter() - start, 1),
                                      "int8_layers": sum(1 for e in res.report.rewritten if e.get("weight")),
                                      "kept_float": sum("sensitive" in s.reason for s in res.report.skipped)}
    for mode in ("skip", "mul"):
        for alpha in alphas:
            start = time.perf_counter()
            res = Smooth(alpha=alpha, unfoldable=mode)(model, ctx)
            info = {"smooth_s": round(time.perf_counter() - start, 1), "smoothed": len(res.report.rewritten),
                    "layers_scaled": sum(len(e["layers"]) for e in res.report.rewritten),
                    "muls": sum(e["muls"] for e in res.report.rewritten)}
            name = f"smooth a={alpha:g} {mode} -> quantize"
            if alpha == 0.5:
                out[f"smooth a=0.5 {mode} (float)"] = res.model
                extras[f"smooth a=0.5 {mode} (float)"] = info
            quantized(name, res.model, info)
    return out, extras


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,minilm_dynamo")
    ap.add_argument("--alphas", default="0.3,0.5,0.7,0.85")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sensitivity-off", action="store_true")
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    rows = []
    for name in args.models.split(","):
        zm = zoo.get(name)
        vs, extras = variants(zm, alphas, args.sensitivity_off)
        zm_eval, ref = bench_quantize._with_sample_cosine(zm)
        got = _harness.measure(zm_eval, vs, runs=args.runs, threads=args.threads, extras=extras, rounds=args.rounds)
        for r in got:
            if r.variant != "fp32":
                r.extra["deployed"] = bench_quantize._deployed(vs[r.variant], zm, zm_eval.evaluate, ref)
                r.extra["cos_opt_on"] = round(r.extra["deployed"]["sample_cos_mean"], 5)
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(_harness.markdown(got, task_keys=TASK_KEYS,
                                extra_keys=("cos_opt_on", "int8_layers", "kept_float", "muls")), flush=True)
        busy = max(max(r.extra["cpu_busy_before"], r.extra["cpu_busy_after"]) for r in got)
        print(f"\nmachine busy while timing: up to {busy:.0%} of all CPU (shared machine); {_harness.cpu_line()}",
              flush=True)
    path = _harness.save("bench_smooth", rows, {"alphas": alphas, "rounds": args.rounds, "runs": args.runs,
                                                "sensitivity_off": args.sensitivity_off})
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
