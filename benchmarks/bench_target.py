"""Target-aware quantization: int8 latency against fp32 with and without the latency gate.

    python benchmarks/bench_target.py [--models minilm,resnet,magika,ppocr_cls,yolo,orinet] [--runs 50] [--rounds 10] [--profile]

For every model (zoo or corpus), the simplified model (``simplify`` with the zoo's input shapes,
as the CLI runs it) is the fp32 reference, and two int8 variants are made from it with
calibration data ``zm.calib[:64]`` and every other option at its default:

- ``int8 before``: ``Quantize(prefer='size')`` with `speed.gemm_form` switched off: the pass as it
  was before target-aware quantization (on x86 the activations were uint8 then too);
- ``int8 size``: ``Quantize(prefer='size')``: every planned layer int8 (the structural fixes of
  `passes/quantize/speed.py` included: MatMul + bias as Gemm);
- ``int8 speed``: ``Quantize()`` (``prefer='speed'``, ``target='host'``): the same, then the layers
  not faster in int8 on this CPU kept float after one profiled run of each model.

Latency (benchmarks/_harness.py): the four models interleaved in one process, ``--rounds``
rounds of ``--runs`` runs, batch-1 sample, optimizations on, 1 thread; the ratio to fp32 is the
median of the rounds' ratios with their min-max. Fidelity: cosine / task metric against fp32 on
the eval split. The quantize wall time of each variant is recorded; the machine's busy share
before and after timing too. Writes benchmarks/results/bench_target.json and prints Markdown.

``--profile``: instead, where the time goes: the four models profiled kernel by kernel
(`graph_opt.runtime.profile_nodes`, ``--runs`` runs each, alternating, batch-1 sample), the sum of
the kernels' medians per onnxruntime op type (µs per run); written to
benchmarks/results/bench_target_profile.json.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402
import onnx  # noqa: E402
import zoo  # noqa: E402

from graph_opt.pass_base import PassContext  # noqa: E402
from graph_opt.passes import Quantize  # noqa: E402
from graph_opt.passes.quantize import speed  # noqa: E402
from graph_opt.passes.simplify import Simplify  # noqa: E402


def _before(model, pass_, ctx):
    """``Quantize(prefer='size')`` without `speed.gemm_form`: the pass as it was before this benchmark."""
    keep = speed.gemm_form
    speed.gemm_form = lambda m, skip=None: (m, [])
    try:
        return pass_(model, ctx)
    finally:
        speed.gemm_form = keep


def variants(zm, calib: int = 64):
    model = Simplify()(zm.load(), PassContext(data=zm.calib.take(calib), shapes=zm.shapes)).model
    out, extras = {}, {}
    for name, q in (("int8 before", Quantize(prefer="size")), ("int8 size", Quantize(prefer="size")),
                    ("int8 speed", Quantize())):
        start = time.perf_counter()
        ctx = PassContext(data=zm.calib.take(calib))
        result = _before(model, q, ctx) if name == "int8 before" else q(model, ctx)
        extras[name] = {"quantize_seconds": round(time.perf_counter() - start, 2),
                        "rewritten": len(result.report.rewritten),
                        "gate_note": next((n for n in result.report.notes if n.startswith("prefer=speed")), "")}
        out[name] = result.model
    return model, out, extras


def profile(names: list[str], runs: int, threads: int) -> int:
    import collections
    import json

    from graph_opt.runtime import profile_nodes

    out = {"environment": _harness.environment(), "runs": runs, "models": {}}
    for name in names:
        zm = zoo.get(name)
        simplified, vs, _ = variants(zm)
        models = {"fp32": simplified, **vs}
        busy = _harness.cpu_busy(0.5)
        profiles = profile_nodes(list(models.values()), zm.sample(0), runs=runs, threads=threads)
        per_op = {}
        for tag, nodes in zip(models, profiles):
            ops = collections.Counter()
            for t in nodes:
                ops[t.op] += t.us
            per_op[tag] = {op: round(us, 1) for op, us in ops.most_common()}
        out["models"][name] = {"cpu_busy_before": round(busy, 3), "per_op_us": per_op}
        tags = list(models)
        ops = sorted({op for v in per_op.values() for op in v}, key=lambda op: -max(v.get(op, 0) for v in per_op.values()))
        print(f"\n## {name} (µs per run, sum of kernel medians; machine busy before: {busy:.0%})\n")
        print("| op type | " + " | ".join(tags) + " |\n|---|" + "---|" * len(tags))
        for op in ops[:14]:
            print(f"| {op} | " + " | ".join(f"{per_op[t].get(op, 0):.0f}" for t in tags) + " |")
        print("| **total** | " + " | ".join(f"**{sum(per_op[t].values()):.0f}**" for t in tags) + " |", flush=True)
    path = _harness.RESULTS_DIR / "bench_target_profile.json"
    path.write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,resnet,magika,ppocr_cls,yolo,orinet")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="per-op-type kernel times instead of latency ratios")
    args = ap.parse_args(argv)
    if args.profile:
        return profile(args.models.split(","), args.runs, args.threads)
    rows = []
    for name in args.models.split(","):
        zm = zoo.get(name)
        simplified, vs, extras = variants(zm)
        with tempfile.TemporaryDirectory() as tmp:  # the simplified model is the fp32 reference
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(simplified, path)
            ref = dataclasses.replace(zm, path=path)
            got = _harness.measure(ref, vs, runs=args.runs, threads=args.threads, extras=extras, rounds=args.rounds)
        for r in got:
            r.rewritten = r.extra.get("rewritten", 0)
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(_harness.markdown(got), flush=True)
        for r in got:
            if r.extra.get("gate_note"):
                print(f"- {r.variant}: {r.extra['gate_note']}", flush=True)
        _harness.save("bench_target", rows, {"runs": args.runs, "rounds": args.rounds, "threads": args.threads})
    print("\n" + _harness.cpu_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
