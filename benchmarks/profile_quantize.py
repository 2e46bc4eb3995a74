"""Where the time goes: onnxruntime's per-node profile of a zoo model, fp32 against graph-opt's
int8 (``Quantize()`` with its defaults, calibrated on ``zm.calib``), as deployed.

    python benchmarks/profile_quantize.py [--models example,resnet] [--runs 300] [--threads 1]

Both sessions run with every onnxruntime optimization on (the fused integer kernels) and the
session options of bench_quantize's latency runs (`runtime.session_options`), one sample per
run, the two models alternating run by run so that a change in the machine's speed reaches
both. onnxruntime's profiler records each kernel's time per run; the tables give each node's
median over the runs (µs), and the sum per op type. The profiler's own overhead is in every
number, so compare the two columns with each other, not with bench_quantize's latency. Prints
Markdown; nothing is written to disk but the profiler's temporary files, which are removed.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from _harness import cpu_busy, environment, zoo_args  # noqa: E402

from graph_opt.pass_base import PassContext  # noqa: E402
from graph_opt.passes import Quantize  # noqa: E402
from graph_opt.runtime import session_options  # noqa: E402


def _session(model, prefix: str, threads: int) -> ort.InferenceSession:
    """The options bench_quantize's latency runs with (`runtime.session_options`), plus the profiler."""
    opts = session_options(optimize=True, threads=threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _node_medians(path: str) -> list[tuple[str, str, float]]:
    """(node, op type, median µs) per node, in the order of the node's first run."""
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    with open(path) as f:
        for event in json.load(f):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                times[(event["name"][: -len("_kernel_time")], event["args"]["op_name"])].append(event["dur"])
    return [(name, op, float(np.median(v))) for (name, op), v in times.items()]


def profile(name: str, runs: int, threads: int) -> str:
    zm = zoo.get(name)
    model = zm.load()
    quantized = Quantize()(model, PassContext(data=zm.calib)).model
    feed = zm.eval.sample(0)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {tag: _session(m, os.path.join(tmp, tag), threads)
                    for tag, m in (("fp32", model), ("int8", quantized))}
        busy = cpu_busy()
        for _ in range(runs):
            for s in sessions.values():
                s.run(None, feed)
        nodes = {tag: _node_medians(s.end_profiling()) for tag, s in sessions.items()}
    lines = [f"## {name}", "",
             f"{runs} runs of each model, alternating, batch 1, {threads} thread(s); machine busy before: "
             f"{busy:.0%} of all CPU.", "",
             "| op type | fp32 µs (sum of node medians) | int8 µs |", "|---|---|---|"]
    per_op = {tag: collections.Counter() for tag in nodes}
    for tag, rows in nodes.items():
        for _, op, us in rows:
            per_op[tag][op] += us
    ops = sorted(set(per_op["fp32"]) | set(per_op["int8"]),
                 key=lambda op: -(per_op["fp32"][op] + per_op["int8"][op]))
    for op in ops:
        lines.append(f"| {op} | {per_op['fp32'][op]:.1f} | {per_op['int8'][op]:.1f} |")
    lines.append(f"| **total** | **{sum(per_op['fp32'].values()):.1f}** | **{sum(per_op['int8'].values()):.1f}** |")
    for tag, rows in nodes.items():
        lines += ["", f"{tag}, node by node (onnxruntime's names after its fusions):", "",
                  "| node | op type | median µs |", "|---|---|---|"]
        lines += [f"| `{node[:70]}` | {op} | {us:.1f} |" for node, op, us in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = zoo_args(__doc__, models="example,resnet", runs=300, argv=argv)
    env = environment()
    print(f"# profile_quantize: per-node onnxruntime time, fp32 vs graph-opt int8\n\n{json.dumps(env)}\n")
    for name in args.models.split(","):
        print(profile(name.strip(), args.runs, args.threads), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
