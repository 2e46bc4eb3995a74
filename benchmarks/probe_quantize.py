"""Probe quantize's plan in process on a zoo or corpus model: for each variant, the task metric
and the output SNR against fp32 on the eval split, with onnxruntime's optimizations on (the
fused integer kernels, as deployed) and off (QDQ emulated in float). The model is simplified
first, with the batch-1 shapes of its dynamic inputs bound, as the CLI does. No latency: this
is for questions of fidelity (which layer, which option), one row per variant, with the quantize
pass's CPU seconds (all threads of this process) and wall seconds.

    GRAPH_OPT_ZOO=<cache> python benchmarks/probe_quantize.py yolo "prefer=size" \\
        "prefer=size,sensitivity_snr_db=25"
    python benchmarks/probe_quantize.py ppocr_rec "prefer=size" \\
        "prefer=size,keep_float=p2o.Conv.1|p2o.Conv.2|p2o.Conv.3|p2o.Conv.4"

``--notes`` prints the pass's sensitivity notes and verdicts under each row. ``--split-rows K`` adds the SNR of the first output's rows below K and from K on, along axis 1
(YOLOv8's output: 4 box coordinates, then one row of scores per class: ``--split-rows 4``), each
on the eval split as deployed.

A variant is quantize's options as the CLI spells them (without ``quantize:``); in
``keep_float`` and ``exclude`` names are separated by ``|`` and match exactly. Prints a table
with the CPU's model and flags; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness
import zoo
from bench_quantize import _dynamic_shapes

from graph_opt.budget import exact_pattern
from graph_opt.data import batch_size_for
from graph_opt.metrics import snr_db
from graph_opt.pass_base import PassContext
from graph_opt.passes import Simplify
from graph_opt.registry import parse_spec
from graph_opt.runtime import make_session, run_model


def _spec(variant: str) -> str:
    """keep_float/exclude names joined by '|' → exact patterns joined by ',' (the spec's tuple form)."""
    parts = []
    for piece in variant.split(","):
        key, _, value = piece.partition("=")
        if key.strip() in ("keep_float", "exclude") and value:
            value = ",".join(exact_pattern(n) for n in value.split("|"))
        parts.append(f"{key}={value}" if value else piece)
    return "quantize:" + ",".join(parts)


def _outputs(zm, model, optimize: bool):
    session = make_session(model, optimize=optimize)
    return run_model(session, zm.eval, batch_size=batch_size_for(model, 8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--notes", action="store_true", help="print the pass's sensitivity notes and verdicts under each row")
    ap.add_argument("--split-rows", type=int, default=None, metavar="K",
                    help="also the SNR of the first output's rows < K and >= K along axis 1")
    args = ap.parse_args(argv)
    zm = zoo.get(args.model)
    raw = zm.load()
    shapes = _dynamic_shapes(raw, zm.shapes) or None
    ctx = PassContext(data=zm.calib, shapes=shapes)
    model = Simplify()(raw, ctx).model
    ref = {opt: _outputs(zm, model, opt) for opt in (True, False)}
    print(f"{args.model}; {_harness.cpu_line()}")
    k = args.split_rows
    split = f" SNR dB rows < {k} | SNR dB rows >= {k} |" if k is not None else ""
    print(f"| variant | task (deployed) | SNR dB deployed | SNR dB emulated |{split} layers int8 | quantize CPU s (wall s) |")
    print("|---|---|---|---|" + ("---|---|" if k is not None else "") + "---|---|")
    for variant in args.variants:
        q = parse_spec(_spec(variant))
        cpu, wall = time.process_time(), time.perf_counter()
        result = q(model, ctx)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        snr = {}
        for opt in (True, False):
            out = _outputs(zm, result.model, opt)
            name = next(iter(ref[opt]))
            snr[opt] = snr_db(ref[opt][name], out[name])
            if opt:
                task = zm.evaluate(out)
                rows = ""
                if k is not None:
                    r, o = ref[opt][name], out[name]
                    rows = f" {snr_db(r[:, :k], o[:, :k]):.2f} | {snr_db(r[:, k:], o[:, k:]):.2f} |"
        layers = sum(1 for e in result.report.rewritten if e.get("weight"))
        task_text = ", ".join(f"{k} {v:.4f}" for k, v in task.items())
        print(f"| {variant} | {task_text} | {snr[True]:.2f} | {snr[False]:.2f} |{rows} {layers} | {cpu:.1f} ({wall:.1f}) |",
              flush=True)
        if args.notes:
            for note in result.report.notes:
                if note.startswith("sensitivity"):
                    print(f"    {note}")
            for s in result.report.skipped:
                if s.reason.startswith("sensitive"):
                    print(f"    {s.node}: {s.reason}")
            threshold = q.threshold_db()
            for e in result.report.rewritten:  # quantized although below the threshold on their own
                if threshold is not None and e.get("snr_db") is not None and e["snr_db"] < threshold:
                    print(f"    {e['node']}: int8 at {e['snr_db']:.1f} dB on its own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
