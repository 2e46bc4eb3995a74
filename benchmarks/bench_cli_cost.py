"""What `graph-opt optimize` costs as users run it: CPU time, wall time and peak memory of the whole
CLI process, for two checkouts of graph-opt on the same models, interleaved.

Each run is a fresh process (`python -m graph_opt.cli optimize MODEL -o OUT --pass ... --data ...
--input-shape ...`), so imports, loading, simplification, the passes, every step's verification and
the latency measurement all count. The two checkouts alternate run by run (old, new, old, new …),
so the machine's load falls on both alike; CPU seconds (user + system) move far less with load than
wall time, and are the number to compare on a shared machine.

A checkout is a folder whose ``graph_opt/`` package imports from it (``PYTHONPATH``): this tree, or
a `git worktree` of an older commit with ``graph_opt/passes`` and ``graph_opt/kernels`` linked to
its top-level ``passes/`` and ``kernels/``. Models come from the corpus and the zoo
(``GRAPH_OPT_ZOO``; ``zoo.get``: corpus models and the zoo's resnet and minilm), their calibration
data from ``--data DIR`` (``NAME_calib.npz``: ``corpus.py --export-data DIR``, or
``corpus.export_data(zoo.get(NAME), DIR)`` for the zoo's models). The table gives each checkout's
median and its range over the rounds.

    python benchmarks/bench_cli_cost.py --old /path/to/old-checkout --data DIR --models yolo,orinet
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import RESULTS_DIR, cpu_busy, cpu_line  # noqa: E402
from _proc import status_kb

HERE = Path(__file__).resolve().parents[1]


def run_cli(checkout: Path, model: Path, data: Path, shapes: list[str], passes: list[str], out: Path) -> dict:
    """One CLI process: wall seconds, its CPU seconds (wait4, the child alone) and peak RSS (its
    VmHWM, polled every 50 ms)."""
    cmd = [sys.executable, "-m", "graph_opt.cli", "optimize", str(model), "-o", str(out), "--data", str(data)]
    for s in shapes:
        cmd += ["--input-shape", s]
    for p in passes:
        cmd += ["--pass", p]
    env = dict(os.environ, PYTHONPATH=str(checkout), OPENBLAS_NUM_THREADS="1", GRAPH_OPT_PROGRESS="0")
    start = time.perf_counter()
    # cwd outside every checkout: `python -m` puts the working directory first on sys.path, so run
    # from this tree both checkouts would import this tree's graph_opt whatever PYTHONPATH says
    # stderr to a file: a pipe nobody reads while polling could fill and stall the child
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        # The peak is the child's VmHWM, polled: wait4's ru_maxrss starts from this (large) process's
        # resident set at the spawn, so every model read at least this script's size.
        hwm = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, status_kb("VmHWM", proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        err_file.seek(0)
        err = err_file.read()
    code = os.waitstatus_to_exitcode(status)
    return {"exit": code, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_mb": round(hwm / 1024, 1), "error": err.strip().splitlines()[-1] if code else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="the checkout to compare against")
    ap.add_argument("--new", type=Path, default=HERE, help="default: this tree")
    ap.add_argument("--data", required=True, type=Path, help="folder of NAME_calib.npz (corpus.py --export-data)")
    ap.add_argument("--models", default="yolo,orinet")
    ap.add_argument("--pass", dest="passes", action="append", default=None, help="default: quantize")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_cli_cost.json")
    args = ap.parse_args(argv)
    passes = args.passes or ["quantize"]
    import zoo  # the models' paths and input shapes

    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    busy_before = cpu_busy()
    for name in args.models.split(","):
        zm = zoo.get(name)
        shapes = ["{}={}".format(k, "x".join(map(str, v))) for k, v in zm.shapes.items() if len(v)]
        for r in range(args.rounds):
            for label, checkout in (("old", args.old), ("new", args.new)):
                res = run_cli(checkout, zm.path, args.data / f"{name}_calib.npz", shapes, passes,
                              tmp / f"bench_cli_cost_{name}_{label}.onnx")
                rows.append({"model": name, "checkout": label, "round": r, **res})
                print(json.dumps(rows[-1]), flush=True)
    doc = {"cpu": cpu_line(), "passes": passes, "old": str(args.old), "new": str(args.new),
           "busy_before": busy_before, "busy_after": cpu_busy(),
           "load_average": os.getloadavg(), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{doc['cpu']}; machine busy (all CPU): {busy_before:.0%} before, {doc['busy_after']:.0%} after\n")
    print("| model | checkout | CPU s median (range) | wall s median (range) | peak MB |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        for label in ("old", "new"):
            mine = [x for x in rows if x["model"] == name and x["checkout"] == label and x["exit"] == 0]
            if not mine:
                print(f"| {name} | {label} | failed | - | - |")
                continue
            cells = []
            for k in ("cpu_s", "wall_s"):
                v = [x[k] for x in mine]
                cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})")
            print(f"| {name} | {label} | {cells[0]} | {cells[1]} | {max(x['peak_mb'] for x in mine)} |")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    raise SystemExit(main())
