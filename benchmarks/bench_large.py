"""Models over 2 GB: load, rewrite and save a generated > 2 GB model with every pass family.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_large.py [--workdir DIR] [--keep] [--gb 2.3]
                                                            [--only fold_batchnorm,quantize,...]
                                                            [--profile fold_batchnorm] [--render]

The model is generated from code (seeded) straight into external data, one tensor at a time, so
this script never holds the weights: a CNN stem (3×3 Conv + BatchNormalization + Relu, three
stages, global average pooling) feeding an MLP of expand/contract pairs (``Gemm`` 512 → W with
bias, ``MatMul`` W → 512 + ``Add`` bias, Relu between) sized so that float32 weights exceed 2 GB,
and a 1000-way ``Gemm`` head. The layers are rectangular on purpose: ``factorize_gemm`` computes a
float64 SVD per layer, which on 1 thread is seconds for 512×32768 and many minutes for 8192×8192.

Each pass family runs in a fresh subprocess through the command line exactly as a user would
(``graph-opt optimize MODEL -o OUT --pass SPEC --no-latency``, in-process ``graph_opt.cli.main``):
load with external-data checks, the pass, the pipeline's postconditions (onnx.checker, an
onnxruntime session, parity against the original on 8 seeded random inputs, which are also the
calibration data of ``quantize`` and ``reconstruct``), then the save (external data when the
result is still ≥ 2 GB). Latency measurement is off (``--no-latency``): it would keep an
optimized onnxruntime session of the original and of the result alive at once, which is a
measurement of onnxruntime, not of the rewrite.

Peak memory is the child's own ``VmHWM`` (peak resident set, read from /proc/self/status at the
end of the child, nothing subtracted), not ``ru_maxrss`` from wait4 (on Linux a child's
ru_maxrss starts at the parent's peak). The ratio reported is peak / weight bytes of the input.
A second fresh subprocess then checks each output: ``onnx.load`` with its external data,
onnxruntime session from the path, one inference, and its own peak.

``factorize_gemm`` runs with ``latency_gate=false``: at one row per sample the gate (rightly, for
latency) skips every Gemm/MatMul of this model, and the point here is to exercise the rewrite.
``reconstruct`` needs something compressed to refit, so its run is ``factorize_gemm`` then
``reconstruct`` (refitting pruned 32768-wide consumers instead would need a 32768² float64 Gram
matrix per layer, 8 GB: not feasible in 2× the weights). ``--profile SPEC`` also runs the steps of
``Pipeline.run`` one by one for one pass in a child, each step's own peak, to show where copies are.

Writes benchmarks/results/bench_large.json and bench_large.md (the command is recorded in both);
``--render`` rewrites the Markdown from the JSON.
Generated files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _proc import status_kb

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# family → extra CLI arguments (the passes of one `graph-opt optimize` run)
FAMILIES: dict[str, list[str]] = {
    "fold_batchnorm": ["--pass", "fold_batchnorm"],
    "cleanup": ["--pass", "cleanup"],
    # the latency gate skips every Gemm/MatMul here (one row per sample); off, the rewrite runs
    "factorize_gemm": ["--pass", "factorize_gemm:latency_gate=false"],
    "factorize_conv": ["--pass", "factorize_conv"],
    "prune_weights": ["--pass", "prune_weights:sparsity=0.5"],
    "prune_channels": ["--pass", "prune_channels:ratio=0.3"],
    "quantize": ["--pass", "quantize"],
    # weight-only int4 with GPTQ: inputs captured once and streamed to disk, one Gram matrix at a time
    "quantize_int4": ["--pass", "quantize:weights=int4,activations=none,rounding=gptq"],
    # reconstruct needs something compressed to refit: the low-rank factors of factorize_gemm
    "reconstruct": ["--pass", "factorize_gemm:latency_gate=false", "--pass", "reconstruct"],
}

ALIGN = 4096  # external data offsets on page boundaries (onnxruntime can then map them)


# --------------------------------------------------------------------------- the model

class ExternalData:
    """Float32 weights appended one at a time to an open external-data file, at page-aligned
    offsets; `inits` holds the initializers that point at them, `total` the bytes written."""

    def __init__(self, fh, data_name: str):
        self.fh, self.data_name = fh, data_name
        self.inits: list = []
        self.offset = self.total = 0

    def add(self, name: str, arr: np.ndarray) -> str:
        from onnx import TensorProto

        pad = (-self.offset) % ALIGN
        self.fh.write(b"\0" * pad)
        self.offset += pad
        raw = np.ascontiguousarray(arr, np.float32).tobytes()
        self.fh.write(raw)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.inits.append(t)
        self.offset += len(raw)
        self.total += len(raw)
        return name


def generate(path: Path, *, target_bytes: int, seed: int = 0, hidden: int = 512, wide: int = 32768) -> dict:
    """Write the model and `<name>.data` (external data), one tensor at a time; return its summary."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes: list[onnx.NodeProto] = []

    with open(path.parent / data_name, "wb") as fh:
        store = ExternalData(fh, data_name)

        def weight(name: str, shape: tuple[int, ...], scale: float, *, positive: bool = False) -> str:
            arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            if positive:
                arr = np.abs(arr) + np.float32(0.5)
            return store.add(name, arr)

        x = "input"
        channels = [3, 64, 128, 256]
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            w = weight(f"conv{i}.w", (cout, cin, 3, 3), (2.0 / (cin * 9)) ** 0.5)
            nodes.append(helper.make_node("Conv", [x, w], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                          strides=[1 if i == 0 else 2] * 2))
            bn = [weight(f"bn{i}.{k}", (cout,), 0.1, positive=(k in ("scale", "var"))) for k in ("scale", "bias", "mean", "var")]
            nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn], [f"bn{i}"], name=f"bn{i}"))
            nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
        w = weight("proj.w", (hidden, channels[-1]), (2.0 / channels[-1]) ** 0.5)
        b = weight("proj.b", (hidden,), 0.01)
        nodes.append(helper.make_node("Gemm", ["flat", w, b], ["proj"], name="proj", transB=1))
        x = "proj"
        pair_bytes = 2 * hidden * wide * 4
        pairs = max(1, -(-(target_bytes - store.total) // pair_bytes))
        for k in range(pairs):
            nodes.append(helper.make_node("Relu", [x], [f"a{k}"], name=f"act{k}"))
            w = weight(f"up{k}.w", (wide, hidden), (2.0 / hidden) ** 0.5)
            b = weight(f"up{k}.b", (wide,), 0.01)
            nodes.append(helper.make_node("Gemm", [f"a{k}", w, b], [f"up{k}"], name=f"up{k}", transB=1))
            nodes.append(helper.make_node("Relu", [f"up{k}"], [f"h{k}"], name=f"hact{k}"))
            w = weight(f"down{k}.w", (wide, hidden), (1.0 / wide) ** 0.5)
            b = weight(f"down{k}.b", (hidden,), 0.01)
            nodes.append(helper.make_node("MatMul", [f"h{k}", w], [f"dmm{k}"], name=f"down{k}"))
            nodes.append(helper.make_node("Add", [f"dmm{k}", b], [f"down{k}"], name=f"down{k}.bias"))
            x = f"down{k}"
        nodes.append(helper.make_node("Relu", [x], ["feat"], name="act_head"))
        w = weight("head.w", (1000, hidden), (1.0 / hidden) ** 0.5)
        b = weight("head.b", (1000,), 0.01)
        nodes.append(helper.make_node("Gemm", ["feat", w, b], ["logits"], name="head", transB=1))

    graph = helper.make_graph(nodes, "large_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], initializer=store.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_large")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return {"weight_bytes": store.total, "file_bytes": path.stat().st_size + (path.parent / data_name).stat().st_size,
            "initializers": len(store.inits), "nodes": len(nodes), "pairs": pairs, "hidden": hidden, "wide": wide,
            "params": store.total // 4, "seed": seed}


# --------------------------------------------------------------------------- children

def child_optimize(argv: list[str], result_path: Path) -> int:
    """One `graph-opt optimize` run in this (fresh) process; write exit code and peak memory."""
    from graph_opt import cli

    start = time.perf_counter()
    error = ""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # recorded, not hidden: the table says what broke (and where)
        import traceback

        ours = [f for f in traceback.extract_tb(exc.__traceback__) if "graph_opt" in f.filename or "passes" in f.filename]
        where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})" if ours else ""
        code, error = -1, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}{where}"
    result = {"exit": code, "error": error, "seconds": time.perf_counter() - start,
              "vm_hwm_kb": status_kb("VmHWM"), "vm_rss_end_kb": status_kb("VmRSS")}
    result_path.write_text(json.dumps(result))
    return 0


def child_check(model_path: Path, result_path: Path) -> int:
    """Load the output as a user would (onnx with external data, onnxruntime from the path), run once."""
    import onnx
    import onnxruntime as ort

    from graph_opt.external_data import tensor_bytes

    out: dict = {}
    try:
        model = onnx.load(str(model_path), load_external_data=True)
        out["weight_bytes"] = tensor_bytes(model)
        out["external_data"] = any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                                   for t in onnx.load(str(model_path), load_external_data=False).graph.initializer)
        ops: dict[str, int] = {}
        for n in model.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        out["ops"] = ops
        del model
        out["onnx_load"] = "ok"
    except Exception as exc:
        out["onnx_load"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        out["ort_run"] = "ok" if y.shape == (1, 1000) and np.isfinite(y).all() else f"bad output {y.shape}"
    except Exception as exc:
        out["ort_run"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    out["vm_hwm_kb"] = status_kb("VmHWM")
    result_path.write_text(json.dumps(out))
    return 0


def child_profile(model_path: Path, spec: str, result_path: Path) -> int:
    """Where the memory goes: the steps of `Pipeline.run` for one pass, done one by one here, with
    this process's peak reset between them ('5' > /proc/self/clear_refs), so each step's own peak."""
    import gc

    from graph_opt.data import load_data
    from graph_opt.model_io import load_model, save_model
    from graph_opt.pass_base import PassContext
    from graph_opt.pipeline import check_candidate
    from graph_opt.registry import parse_spec
    from graph_opt.stats import model_stats
    from graph_opt.verify import Reference

    phases = []

    def mark(what: str, t0: float) -> float:
        phases.append({"phase": what, "peak_mb": status_kb("VmHWM") // 1024, "rss_after_mb": status_kb("VmRSS") // 1024,
                       "seconds": round(time.perf_counter() - t0, 1)})
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return time.perf_counter()

    t = mark("imports", time.perf_counter())
    model = load_model(model_path)
    t = mark("load_model", t)
    data = load_data(None, model, n_random=8, seed=0)
    step = parse_spec(spec)
    model_stats(model)
    t = mark("stats of the original", t)
    reference = Reference(model, data)
    t = mark("reference outputs (onnxruntime session)", t)
    result = step(model, PassContext(data=data, original=model))
    t = mark(f"pass {spec}", t)
    gc.collect()
    t = mark("gc", t)
    problem, _ = check_candidate(result.model, reference, {})
    t = mark(f"check_candidate ({problem or 'accepted'})", t)
    model_stats(result.model)
    t = mark("stats of the result", t)
    out = result_path.with_suffix(".onnx")
    save_model(result.model, out)
    mark("save", t)
    for p in (out, out.parent / (out.name + ".data")):
        p.unlink(missing_ok=True)
    result_path.write_text(json.dumps(phases))
    return 0


def run_child(args: list[str], *, timeout: float) -> tuple[float, int, int]:
    """Run this script as a child; (wall seconds, return code, highest VmHWM the parent saw)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], env=env)
    seen = 0
    while proc.poll() is None:
        seen = max(seen, status_kb("VmHWM", str(proc.pid)))
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.2)
    return time.perf_counter() - start, proc.returncode, seen


def files_bytes(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return (path.stat().st_size if path.exists() else 0) + (data.stat().st_size if data.exists() else 0)


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="where the model and outputs go (default: a temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model and outputs")
    ap.add_argument("--gb", type=float, default=2.3, help="weight bytes of the generated model, in GB (1e9)")
    ap.add_argument("--only", default="", help="comma-separated pass families (default: all)")
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of the families run in the existing bench_large.json (each row "
                         "records the commit it ran at)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pass family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="", metavar="SPEC",
                    help="also profile the pipeline's steps for this pass, each step's own peak (e.g. fold_batchnorm)")
    ap.add_argument("--child-profile", nargs=3, metavar=("RESULT", "MODEL", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--child-optimize", nargs=2, metavar=("RESULT", "ARGV_JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--child-check", nargs=2, metavar=("RESULT", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only rewrite bench_large.md from bench_large.json")
    args = ap.parse_args()
    if args.render:
        (RESULTS_DIR / "bench_large.md").write_text(markdown(json.loads((RESULTS_DIR / "bench_large.json").read_text())))
        return 0
    if args.child_optimize:
        return child_optimize(json.loads(args.child_optimize[1]), Path(args.child_optimize[0]))
    if args.child_profile:
        return child_profile(Path(args.child_profile[1]), args.child_profile[2], Path(args.child_profile[0]))
    if args.child_check:
        return child_check(Path(args.child_check[1]), Path(args.child_check[0]))

    command = "OPENBLAS_NUM_THREADS=1 python benchmarks/bench_large.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--workdir") and not a.startswith("/"))
    families = [f for f in (args.only.split(",") if args.only else FAMILIES) if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    target = int(args.gb * 1e9)
    base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    need = 2.6 * target  # the model, one output at a time (deleted after its check), save temporaries
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"bench_large: {base} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_large.", dir=base))
    rows = []
    try:
        model_path = work / "large.onnx"
        t0 = time.perf_counter()
        info = generate(model_path, target_bytes=target, seed=args.seed)
        info["generate_seconds"] = round(time.perf_counter() - t0, 1)
        weights = info["weight_bytes"]
        print(f"model: {info['params']:,} params, {weights / 1e9:.3f} GB weights "
              f"({info['pairs']} Gemm/MatMul pairs 512↔{info['wide']}, 3 Conv+BN), "
              f"generated in {info['generate_seconds']} s", flush=True)

        # baseline: a process that only imports graph_opt and loads the model (what a load costs)
        res = work / "baseline.json"
        probe = ["inspect", str(model_path), "--no-latency", "--json"]
        wall, rc, seen = run_child(["--child-optimize", str(res), json.dumps(probe)], timeout=args.timeout)
        base_res = json.loads(res.read_text()) if res.exists() else {}
        baseline = {"what": "graph-opt inspect --no-latency (load + stats)", "wall_s": round(wall, 1),
                    "peak_mb": round(max(base_res.get("vm_hwm_kb", 0), seen) / 1024),
                    "exit": base_res.get("exit", rc), "error": base_res.get("error", "")}
        baseline["peak_over_weights"] = round(baseline["peak_mb"] * 2**20 / weights, 2)
        print(f"baseline (load + inspect): {baseline}", flush=True)

        profile = []
        if args.profile:
            res = work / "profile.json"
            run_child(["--child-profile", str(res), str(model_path), args.profile], timeout=args.timeout)
            profile = json.loads(res.read_text()) if res.exists() else [{"phase": "profile child died"}]
            for ph in profile:
                ph["peak_over_weights"] = round(ph.get("peak_mb", 0) * 2**20 / weights, 2)
                print(f"profile {args.profile}: {ph}", flush=True)

        for family in families:
            out = work / f"{family}.onnx"
            argv = ["optimize", str(model_path), "-o", str(out), *FAMILIES[family], "--no-latency"]
            res = work / f"{family}.result.json"  # not {family}.json: that is the CLI's report
            wall, rc, seen = run_child(["--child-optimize", str(res), json.dumps(argv)], timeout=args.timeout)
            r = json.loads(res.read_text()) if res.exists() else {"exit": rc, "error": f"child died (rc {rc})"}
            peak_kb = max(r.get("vm_hwm_kb", 0), seen)
            row = {"family": family, "commit": _commit(), "cli": "graph-opt " + " ".join(a if a != str(model_path) else "large.onnx"
                                                                    for a in argv).replace(str(work) + "/", ""),
                   "exit": r.get("exit"), "error": r.get("error", ""), "wall_s": round(wall, 1),
                   "peak_mb": round(peak_kb / 1024), "peak_over_weights": round(peak_kb * 1024 / weights, 2)}
            report = work / f"{family}.json"  # the CLI's own report (same stem as the output)
            if out.exists():
                row["output_bytes"] = files_bytes(out)
                row["output_external_data"] = (out.parent / (out.name + ".data")).exists()
                chk = work / f"{family}.check.json"
                run_child(["--child-check", str(chk), str(out)], timeout=args.timeout)
                row["check"] = json.loads(chk.read_text()) if chk.exists() else {"error": "check child died"}
                try:
                    doc = json.loads(report.read_text())
                    row["steps"] = [{"name": s["name"], "modified": s["modified"], "accepted": s["accepted"],
                                     "reason": s["reason"], "seconds": s["seconds"],
                                     "rewritten": len((s.get("report") or {}).get("rewritten", [])),
                                     "skipped": len((s.get("report") or {}).get("skipped", [])),
                                     "cosine": ((s.get("parity") or {}).get("cosine"))} for s in doc["steps"]]
                except (OSError, ValueError, KeyError):
                    pass
                if not args.keep:
                    for p in (out, out.parent / (out.name + ".data")):
                        p.unlink(missing_ok=True)
            row["status"] = status(row, weights)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    doc = {"command": command, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "model": info, "baseline": baseline, "rows": rows, "target_peak_over_weights": 2.0,
           "profile": {"spec": args.profile, "phases": profile}}
    previous = RESULTS_DIR / "bench_large.json"
    if args.update and previous.exists():  # keep the other families' rows (and the notes) of the last run
        old = json.loads(previous.read_text())
        ran = {r["family"] for r in rows}
        doc["rows"] = [r for r in old["rows"] if r["family"] not in ran] + rows
        doc["rows"].sort(key=lambda r: list(FAMILIES).index(r["family"]))
        doc["command"] = old["command"] + "; then " + command
        doc["baseline"] = old.get("baseline", baseline)
        if old.get("notes"):
            doc["notes"] = old["notes"]
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "bench_large.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    (RESULTS_DIR / "bench_large.md").write_text(md)
    print(md)
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def status(row: dict, weights: int) -> str:
    if row.get("exit") != 0:
        return f"FAILED (exit {row.get('exit')}): {row.get('error', '')}"
    chk = row.get("check") or {}
    if chk.get("onnx_load") != "ok" or chk.get("ort_run") != "ok":
        return f"output broken: onnx {chk.get('onnx_load')}, ort {chk.get('ort_run')}"
    steps = row.get("steps") or []
    rolled = [f"{s['name']} rolled back ({s['reason'][:80]})" for s in steps if not s["accepted"]]
    unchanged = [s["name"] for s in steps if not s["modified"]]
    size_ok = (row["output_bytes"] >= 2**31) == row["output_external_data"]
    parts = ["ok" if size_ok else "size/external-data mismatch"]
    parts += rolled + [f"{n}: nothing rewritten" for n in unchanged]
    if row["peak_over_weights"] > 2.0:
        parts.append("peak > 2x")
    return "; ".join(parts)


def markdown(doc: dict) -> str:
    m = doc["model"]
    lines = [
        "# bench_large: a generated model over 2 GB through every pass family",
        "",
        f"Command: `{doc['command']}` ({doc['machine']['cpus']} CPUs; the notes say what else ran).",
        "",
        f"Model: {m['params']:,} float32 parameters, **{m['weight_bytes'] / 1e9:.3f} GB of weights** "
        f"({m['weight_bytes'] / 2**20:,.0f} MiB; external data), 3 Conv+BN+Relu, {m['pairs']} Gemm/MatMul pairs "
        f"{m['hidden']}↔{m['wide']}, Gemm head; seed {m['seed']}.",
        "",
        f"Baseline ({doc['baseline']['what']}): peak {doc['baseline']['peak_mb']:,} MB "
        f"= {doc['baseline']['peak_over_weights']}× the weights, {doc['baseline']['wall_s']} s.",
        "",
        "| pass family | graph-opt arguments | commit | wall s | peak MB | peak / weights | output | status |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in doc["rows"]:
        args = " ".join(a for a in r["cli"].split() if a not in ("optimize", "large.onnx", "-o", "--no-latency")
                        and not a.endswith(".onnx"))
        size = (f"{r['output_bytes'] / 1e9:.3f} GB" + (" (external data)" if r.get("output_external_data") else "")
                if "output_bytes" in r else "none")
        lines.append(f"| {r['family']} | `{args}` | {r.get('commit', '')} | {r['wall_s']} | {r['peak_mb']:,} | {r['peak_over_weights']} | "
                     f"{size} | {r['status']} |")
    if doc.get("notes"):  # written by hand into the JSON after a run, rendered with --render
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    prof = doc.get("profile") or {}
    if prof.get("phases"):
        lines += ["", f"Where the memory goes (`--profile {prof['spec']}`: the steps of `Pipeline.run`, each "
                  "step's own peak, the process's peak reset in between):", "",
                  "| step | s | peak MB | peak / weights | resident after, MB |", "|---|---:|---:|---:|---:|"]
        for ph in prof["phases"]:
            lines.append(f"| {ph['phase']} | {ph.get('seconds', '')} | {ph.get('peak_mb', 0):,} | "
                         f"{ph.get('peak_over_weights', '')} | {ph.get('rss_after_mb', 0):,} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
