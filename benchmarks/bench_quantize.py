"""Static int8 quantization on real trained models: graph-opt's `quantize` vs onnxruntime's
`quantize_static`, side by side in one run.

    pip install -e '.[bench]'
    python benchmarks/bench_quantize.py [--models example,resnet,mobilenet,minilm,yolo] [--runs 100]
                                        [--timeout 420] [--mem-limit-gb 12]

For every model (benchmarks/zoo.py) and every calibration method:

- graph-opt: ``Quantize(calibration=minmax|percentile|entropy|mse)`` with its defaults (int8
  per-channel weights on a 7-bit grid, uint8 activations, sensitivity gate 'auto'), calibration
  data ``PassContext(data=zm.calib)``; extra rows: int4 weight-only (MatMul blocks of 128) on
  MiniLM and ternary weight-only on the ResNet;
- onnxruntime: ``quantize_static(path, out, reader, quant_format=QDQ, per_channel=True,
  activation_type=QUInt8, weight_type=QInt8, calibrate_method=MinMax|Percentile|Entropy)``, every
  other argument at its default (all op types, reduce_range=False, no ``quant_pre_process``). The
  CalibrationDataReader yields ``zm.calib`` in batches of 8; graph-opt sizes its own batches by
  memory (``batch_size=None``), so both see exactly the same samples, in different batches.

Diagnostic rows on every model: graph-opt minmax with the sensitivity pass off; ORT MinMax with
``reduce_range=True``; on the CNNs (BatchNormalization after every Conv) graph-opt minmax and ORT
MinMax on the model after graph-opt's ``fold_batchnorm`` + ``cleanup`` (not timed; same input for both).

Each quantizer runs alone in a fresh subprocess (``--worker``), which imports both libraries and
loads the model and the calibration data, then quantizes and saves. Quantizers faster than
``REPEAT_UNDER_S`` (5 s) run ``--repeat`` (3) times, in turn over the variants, and their medians
are reported and compared (every run's costs are kept in the JSON as ``repeats``). Wall and CPU
time are measured inside around the quantizer call (and the save). Peak memory is the subprocess's own peak resident
set (``VmHWM``, raw, nothing subtracted), not the ``ru_maxrss`` that ``wait4`` returns: on Linux a
child's ru_maxrss starts at the parent's peak RSS (exec records the forked image's high-water mark),
so it would report this script's own peak (recorded for reference as ``wait4_ru_maxrss_mb``). The
peak is reset after loading, so ``quantizer_own_mb`` (peak while quantizing minus RSS after loading)
is the quantizer's own cost; a subprocess that only imports and loads gives the baseline. The
"at most half the peak memory" target is judged on ``quantizer_own_mb``: the raw peak adds the
same imports, model and data to both sides (the baseline row: 130 MB for the 0.2 MB example),
which alone is more than half of onnxruntime's raw peak on the small models; the raw ratio is
printed beside it. A guard
kills a quantizer that exceeds ``--timeout`` seconds or ``--mem-limit-gb`` of RSS (polled every
0.1 s) and records the failure instead of hanging; an exception inside a quantizer is recorded too.

Every produced model that onnxruntime loads and runs is then measured against the fp32 original
in one run (benchmarks/_harness.py: sizes, interleaved latency ratio, cosine/SNR/top-1 vs fp32
with optimizations off, task metric); in addition, each model is run once more over the eval
split with all onnxruntime optimizations ON (the fused integer kernels, as deployed), because
the QDQ emulation with optimizations off cannot show errors of the integer kernels.
Writes benchmarks/results/bench_quantize.json and prints Markdown tables and a target check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _proc import status_kb

BENCH_DIR = Path(__file__).resolve().parent
GO_METHODS = ("minmax", "percentile", "entropy", "mse")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
PAIRS = (("minmax", "MinMax"), ("percentile", "Percentile"), ("entropy", "Entropy"))
EXTRAS = {
    "minilm": [("go int4 weight-only", {"weights": "int4", "activations": "none"})],
    "resnet": [("go ternary weight-only", {"weights": "ternary", "activations": "none"})],
}
CNNS = ("example", "resnet", "mobilenet")
# Diagnostic row: the default minmax without the per-layer sensitivity pass (its cost and what it buys).
NO_SENS = "go minmax, sensitivity off"
# The CNNs come with BatchNormalization after every Conv; rows where both quantizers get the model
# after graph-opt's fold_batchnorm + cleanup (exact up to float rounding), the deployable form.
GO_FOLDED, ORT_FOLDED = "go minmax, BN folded first", "ort MinMax, BN folded first"
# onnxruntime's documented switch for CPUs without VNNI (7-bit weights): its default (off) saturates
# in the u8 x s8 integer kernels on this AVX2 machine, which only shows with optimizations on.
ORT_RR = "ort MinMax, reduce_range"
CALIB_BATCH = 8
# Quantizers faster than this run --repeat times (default 3) and are compared on their medians.
REPEAT_UNDER_S = 5.0
# The fidelity number each target is judged on, per model (besides the harness's output cosine).
PRIMARY = {"example": "top1", "resnet": "top1", "mobilenet": "top1", "minilm": "sample_cos_mean",
           "yolo": "top_class_agreement_vs_fp32"}
TASK_KEYS = {
    "classification": ["accuracy"],
    "minilm": ["sample_cos_mean", "sample_cos_min", "pair_top1", "pair_margin"],
    "yolo": ["top_class_agreement_vs_fp32", "det_f1_vs_fp32", "detections"],
}
MB = 1024 * 1024


def go_name(method: str) -> str:
    return f"go {method}"


def ort_name(method: str) -> str:
    return f"ort {method}"


# ============================================================================================ worker


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: '5' > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> int:
    """Run one job in this (fresh) process and write its result JSON. Kinds: 'load' (imports,
    model and calibration data only: the baseline), 'session' (one onnxruntime session of the
    model, optimizations off as in onnxruntime's calibrator, run on one calibration batch: what
    any onnxruntime-based calibrator costs at least), 'go' (graph-opt Quantize), 'ort'
    (onnxruntime quantize_static)."""
    result: dict = {"kind": spec["kind"]}
    try:
        import onnx
        import onnxruntime
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        import zoo
        from graph_opt.pass_base import PassContext
        from graph_opt.passes import Quantize
        from graph_opt.runtime import release_memory, session_options

        zm = zoo.get(spec["model"])
        model = zm.load()
        calib = zm.calib
        source = str(zm.path)
        if spec.get("fold_bn"):  # preprocessing shared by both quantizers, not timed
            from graph_opt.passes import Cleanup, FoldBatchnorm

            model = Cleanup()(FoldBatchnorm()(model, PassContext()).model, PassContext()).model
            source = spec["out"] + ".fp32.onnx"
            onnx.save(model, source)
        _ = sum(int(v.nbytes) for v in calib.inputs.values())  # the arrays are in memory (np.load read them)
        # The heap that loading (and the BN-folding preprocessing) freed goes back to the OS first:
        # otherwise the quantizer reuses it without growing RSS, and its own peak reads low.
        release_memory()
        result["rss_loaded_kb"] = status_kb("VmRSS")
        result["hwm_load_kb"] = status_kb("VmHWM")
        result["peak_reset"] = _reset_peak()
        out = spec.get("out")
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        if spec["kind"] == "go":
            res = Quantize(**spec["options"])(model, PassContext(data=calib))
            onnx.save(res.model, out)
            rep = res.report
            result["rewritten"] = len(rep.rewritten)
            result["by_op"] = {}
            for r in rep.rewritten:
                result["by_op"][r.get("op", "?")] = result["by_op"].get(r.get("op", "?"), 0) + 1
            result["skipped"] = len(rep.skipped)
            result["float_sensitive"] = sum("sensitive" in s.reason for s in rep.skipped)
            result["notes"] = [n for n in rep.notes if not n.startswith("plan: ")]
        elif spec["kind"] == "session":  # the floor of any onnxruntime-based calibrator
            options = session_options(optimize=False, threads=0)  # onnxruntime's default thread count
            session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            session.run(None, next(calib.batches(CALIB_BATCH)))
            del session
        elif spec["kind"] == "ort":

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self._it = iter(calib.batches(CALIB_BATCH))

                def get_next(self):
                    return next(self._it, None)

            quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, spec["method"]),
                            reduce_range=bool(spec.get("reduce_range", False)))
        result["wall_s"] = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        result["quantize_cpu_s"] = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        if out:
            qm = onnx.load(out, load_external_data=False)
            ops: dict[str, int] = {}
            for n in qm.graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            result["q_nodes"] = ops.get("QuantizeLinear", 0)
            result["dq_nodes"] = ops.get("DequantizeLinear", 0)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - recorded, not raised: the parent reports it as this variant's failure
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    result["hwm_quantize_kb"] = status_kb("VmHWM")  # peak since the reset: the quantizer's phase
    result["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


# ============================================================================================ parent


def run_job(spec: dict, work: Path, *, timeout: float, mem_limit_kb: int) -> dict:
    """Run `spec` in a fresh subprocess (cwd: an empty folder, to catch stray files); guard time
    and memory; return the worker's result with the kernel's rusage of the process."""
    tag = spec["tag"]
    cwd = work / f"cwd-{tag}"
    cwd.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(work / f"{tag}.result.json")}
    log_path = work / f"{tag}.log"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.monotonic()
    failure = None
    polled = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = status_kb("VmRSS", proc.pid)
            polled = max(polled, status_kb("VmHWM", proc.pid), rss)
            elapsed = time.monotonic() - start
            if failure is None and rss > mem_limit_kb:
                failure = (f"killed by the memory guard: RSS {rss / MB:.1f} GB > {mem_limit_kb / MB:.0f} GB "
                           f"after {elapsed:.0f} s")
            elif failure is None and elapsed > timeout:
                failure = f"timed out after {timeout:.0f} s"
            if failure is not None:
                proc.send_signal(signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    result: dict = {}
    rp = Path(spec["result"])
    if rp.is_file() and failure is None:
        result = json.loads(rp.read_text())
    # Peak memory: the worker's VmHWM (peak resident set of its own address space). Not the rusage
    # ru_maxrss that wait4 returns: on Linux a child's ru_maxrss starts at the parent's peak RSS
    # (exec records the forked/vforked parent image's high-water mark), so after a big model every
    # later child would report the parent's peak. Kept for reference as wait4_ru_maxrss_mb.
    loaded = result.get("rss_loaded_kb")
    peak = max(result.get("hwm_load_kb", 0), result.get("hwm_quantize_kb", 0)) or polled
    result.update(tag=tag, process_s=round(elapsed, 2), cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
                  peak_rss_mb=round(peak / 1024, 1),
                  rss_loaded_mb=None if loaded is None else round(loaded / 1024, 1),
                  quantize_peak_mb=(round(result["hwm_quantize_kb"] / 1024, 1)
                                    if result.get("peak_reset") and "hwm_quantize_kb" in result else None),
                  wait4_ru_maxrss_mb=round(usage.ru_maxrss / 1024, 1), polled_peak_mb=round(polled / 1024, 1),
                  exit_code=proc.returncode)
    if result["quantize_peak_mb"] is not None and loaded is not None:
        result["quantizer_own_mb"] = round(result["quantize_peak_mb"] - loaded / 1024, 1)
    stray = sorted(p.name for p in cwd.iterdir())
    if stray:
        result["stray_files_in_cwd"] = stray
    if failure is not None:
        result["ok"], result["error"] = False, failure
    elif not result.get("ok"):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        result["ok"] = False
        result.setdefault("error", f"exit code {proc.returncode}: " + " | ".join(tail)[:300])
    return result


_COST_KEYS = ("wall_s", "quantize_cpu_s", "cpu_s", "process_s", "peak_rss_mb", "quantizer_own_mb")


def _cost(job: dict) -> dict:
    return {k: job[k] for k in _COST_KEYS if job.get(k) is not None}


def _take_medians(job: dict) -> None:
    """Set each cost of a repeated job to its median over the runs that succeeded (each run is
    kept in ``repeats``); a run that failed makes the whole job a failure."""
    runs = job["repeats"]
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        job["ok"], job["error"] = False, f"a repeated run failed: {failed[0]}"
        return
    for k in _COST_KEYS:
        values = [r[k] for r in runs if k in r]
        if values:
            job[k] = float(np.median(values))


def _check_runs(model, zm) -> str | None:
    """None when onnxruntime loads and runs the model (optimizations off and on), else why not."""
    from graph_opt.runtime import make_session

    feed = zm.eval.sample(0)
    for optimize in (False, True):
        try:
            s = make_session(model, optimize=optimize)
            s.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - any failure to load or run disqualifies the model
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            return f"onnxruntime ({'optimizations on' if optimize else 'optimizations off'}) fails: {first}"
    return None


def _with_sample_cosine(zm):
    """The zoo model with `evaluate` extended by the per-sample cosine of every output to the fp32
    outputs (mean and min over the eval samples)."""
    ref = zm.outputs()

    def evaluate(outputs):
        metrics = dict(zm.evaluate(outputs))
        cos = []
        for name, r in ref.items():
            c = np.asarray(outputs[name], np.float64).reshape(len(r), -1)
            r = np.asarray(r, np.float64).reshape(len(r), -1)
            den = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
            cos.append(np.where(den > 0, (r * c).sum(1) / np.maximum(den, 1e-30), 1.0))
        per = np.mean(cos, axis=0)
        metrics["sample_cos_mean"] = float(per.mean())
        metrics["sample_cos_min"] = float(per.min())
        return metrics

    return dataclasses.replace(zm, evaluate=evaluate), ref


def _deployed(model, zm, evaluate, ref) -> dict:
    """Fidelity with every onnxruntime optimization on (fused integer kernels, as deployed)."""
    from graph_opt import metrics
    from graph_opt.runtime import make_session, run_model

    out = run_model(make_session(model, optimize=True), zm.eval, batch_size=CALIB_BATCH)
    name = next(iter(ref))
    res = {"cosine": metrics.cosine(ref[name], out[name])}
    if ref[name].ndim == 2 and ref[name].shape[1] >= 2 and zm.task.startswith("classification"):
        res["top1"] = metrics.top1_agreement(ref[name], out[name])
    res.update(evaluate(out))
    return res


def _fmt_mb(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def cost_table(jobs: dict[str, dict], baseline: dict) -> str:
    head = ["variant", "status", "quantize wall s", "quantize CPU s", "peak RSS MB (raw)", "own MB", "Q / DQ nodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             (f"| baseline: imports + model + calib data only | ok | - | - | "
              f"{_fmt_mb(baseline.get('peak_rss_mb'))} | - | - |")]
    one = baseline.get("one_session", {})
    lines.append(f"| baseline + one onnxruntime session of the model (optimizations off), one batch of {CALIB_BATCH} | "
                 + (f"FAILED: {one['error']} | - | - | - | - | - |" if "error" in one else
                    f"ok | - | - | {_fmt_mb(one.get('peak_rss_mb'))} | {_fmt_mb(one.get('quantizer_own_mb'))} | - |"))
    for name, j in jobs.items():
        status = "ok" if j.get("ok") else f"FAILED: {j.get('error', '?')}"
        wall = f"{j['wall_s']:.1f}" if j.get("wall_s") is not None else f"({j['process_s']:.0f} s process)"
        qdq = f"{j.get('q_nodes', '-')} / {j.get('dq_nodes', '-')}" if j.get("ok") else "-"
        cpu = f"{j['quantize_cpu_s']:.1f}" if j.get("quantize_cpu_s") is not None else f"({j['cpu_s']:.0f} process)"
        lines.append(f"| {name} | {status} | {wall} | {cpu} | {_fmt_mb(j['peak_rss_mb'])} | "
                     f"{_fmt_mb(j.get('quantizer_own_mb'))} | {qdq} |")
    return "\n".join(lines)


def deployed_table(rows, deployed: dict[str, dict], keys: list[str]) -> str:
    head = ["variant", "cosine (opt off)", "cosine (opt on)", *[f"{k} (opt on)" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = deployed.get(r.variant)
        if d is None:
            continue
        cells = [r.variant, f"{r.cosine:.4f}", f"{d['cosine']:.4f}",
                 *[("-" if d.get(k) is None else f"{d[k]:.4f}") for k in keys]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _primary(row, model: str) -> float | None:
    key = PRIMARY[model]
    if key == "top1":
        return row.top1_agreement
    return row.task.get(key)


def check_targets(by_model: dict[str, dict]) -> tuple[str, list[dict]]:
    """The issue's targets, each judged on the measured numbers: (Markdown table, records)."""
    recs: list[dict] = []

    def add(target, model, met, numbers):
        recs.append({"target": target, "model": model, "met": met, "numbers": numbers})

    for model, d in by_model.items():
        rows = {r.variant: r for r in d["rows"]}
        jobs = d["jobs"]
        base = d["baseline"].get("peak_rss_mb") or 0.0
        pk = PRIMARY[model]
        # 1. fidelity >= onnxruntime's, method by method and best against best
        for go_m, ort_m in PAIRS:
            g, o = rows.get(go_name(go_m)), rows.get(ort_name(ort_m))
            if g is None:
                add(f"fidelity {go_m} >= ORT {ort_m}", model, False, "graph-opt variant missing")
                continue
            if o is None:
                add(f"fidelity {go_m} >= ORT {ort_m}", model, True,
                    f"ORT {ort_m} produced no usable model ({jobs[ort_name(ort_m)].get('error', '?')})")
                continue
            dg, do = d["deployed"][g.variant], d["deployed"][o.variant]
            pg, po = _primary(g, model), _primary(o, model)
            qg, qo = dg.get(pk), do.get(pk)
            off = g.cosine >= o.cosine and pg >= po
            on = dg["cosine"] >= do["cosine"] and qg >= qo
            add(f"fidelity {go_m} >= ORT {ort_m}", model, off and on,
                f"opt off ({'met' if off else 'not met'}): cosine {g.cosine:.5f} vs {o.cosine:.5f}, {pk} "
                f"{pg:.4f} vs {po:.4f}; opt on ({'met' if on else 'not met'}): cosine {dg['cosine']:.5f} vs "
                f"{do['cosine']:.5f}, {pk} {qg:.4f} vs {qo:.4f}")
        g, o = rows.get(go_name("minmax")), rows.get(ORT_RR)
        if g is not None and o is not None:
            dg, do = d["deployed"][g.variant], d["deployed"][o.variant]
            ok = dg["cosine"] >= do["cosine"] and dg.get(pk) >= do.get(pk)
            add("(diagnostic) fidelity minmax >= ORT MinMax reduce_range, opt on", model, ok,
                f"cosine {dg['cosine']:.5f} vs {do['cosine']:.5f}, {pk} {dg.get(pk):.4f} vs {do.get(pk):.4f}")
        # 2. wall time and peak memory <= half of onnxruntime's. Memory is the quantizer's own
        # peak (peak while quantizing minus the RSS after loading): the raw peak also holds the
        # imports, the model and the data, the same in both processes, which alone can exceed
        # half of onnxruntime's raw peak on a small model.
        for go_m, ort_m in PAIRS:
            g, o = jobs.get(go_name(go_m), {}), jobs.get(ort_name(ort_m), {})
            if not g.get("ok"):
                add(f"wall {go_m} <= 1/2 ORT {ort_m}", model, False, "graph-opt failed")
                add(f"own peak memory {go_m} <= 1/2 ORT {ort_m}", model, False, "graph-opt failed")
                continue
            if not o.get("ok"):
                why = (f"ORT failed ({o.get('error')}); graph-opt {g['wall_s']:.1f} s, {g['peak_rss_mb']:.0f} MB; "
                       f"ORT reached {o.get('process_s', 0):.0f} s, {o.get('peak_rss_mb', 0):.0f} MB before it stopped")
                add(f"wall {go_m} <= 1/2 ORT {ort_m}", model, None, why)
                add(f"own peak memory {go_m} <= 1/2 ORT {ort_m}", model, None, why)
                continue
            wr = g["wall_s"] / o["wall_s"]
            cr = g["quantize_cpu_s"] / max(o["quantize_cpu_s"], 1e-9)
            add(f"wall {go_m} <= 1/2 ORT {ort_m}", model, wr <= 0.5,
                f"{g['wall_s']:.2f} / {o['wall_s']:.2f} s = {wr:.2f} (CPU {g['quantize_cpu_s']:.1f} / "
                f"{o['quantize_cpu_s']:.1f} s = {cr:.2f})")
            og, oo = g.get("quantizer_own_mb"), o.get("quantizer_own_mb")
            raw = f"raw peak RSS {g['peak_rss_mb']:.0f} / {o['peak_rss_mb']:.0f} MB = {g['peak_rss_mb'] / o['peak_rss_mb']:.2f}"
            if og is None or not oo or oo <= 0:
                add(f"own peak memory {go_m} <= 1/2 ORT {ort_m}", model, None, f"own peak not measured; {raw}")
                continue
            floor = d["baseline"].get("one_session", {}).get("quantizer_own_mb")
            add(f"own peak memory {go_m} <= 1/2 ORT {ort_m}", model, og / oo <= 0.5,
                f"{og:.0f} / {oo:.0f} MB = {og / oo:.2f} ({raw}"
                + (f"; one onnxruntime session of the model alone: {floor:.0f} MB)" if floor is not None else ")"))
        g, o = jobs.get(NO_SENS, {}), jobs.get(ort_name("MinMax"), {})
        if g.get("ok") and o.get("ok"):
            wr = g["wall_s"] / o["wall_s"]
            add("(diagnostic) wall minmax, sensitivity off <= 1/2 ORT MinMax", model, wr <= 0.5,
                f"{g['wall_s']:.2f} / {o['wall_s']:.2f} s = {wr:.2f}")
        # 3. int8 latency below fp32 on the CNNs
        if model in CNNS:
            lat = {m: rows[go_name(m)].latency_ratio for m in GO_METHODS if go_name(m) in rows}
            add("int8 latency < fp32", model, bool(lat) and all(v < 1 for v in lat.values()),
                ", ".join(f"{m} {v:.2f}x" for m, v in lat.items()))
            if GO_FOLDED in rows:
                r, o = rows[GO_FOLDED], rows.get(ORT_FOLDED)
                add("(BN folded first) int8 latency < fp32", model, r.latency_ratio < 1,
                    f"minmax {r.latency_ratio:.2f}x" + (f"; ORT MinMax {o.latency_ratio:.2f}x" if o else ""))
        # 4. MiniLM cosine >= 0.99 / YOLO class agreement >= 0.95, both faster than fp32
        if model in ("minilm", "yolo"):
            thr = 0.99 if model == "minilm" else 0.95
            for m in GO_METHODS:
                r = rows.get(go_name(m))
                if r is None:
                    continue
                v = _primary(r, model)
                dep = d["deployed"].get(go_name(m), {}).get(pk)
                add(f"{pk} >= {thr} and latency < fp32 ({m})", model, v >= thr and r.latency_ratio < 1
                    and (dep is None or dep >= thr),
                    f"{pk} {v:.4f} (opt on {dep:.4f}), latency {r.latency_ratio:.2f}x"
                    + "".join(f"; ORT {om}: {_primary(rows[ort_name(om)], model):.4f} at "
                              f"{rows[ort_name(om)].latency_ratio:.2f}x" for om in ORT_METHODS
                              if ort_name(om) in rows and om == dict(PAIRS).get(m)))
        # 5. percentile calibration under 1 GB
        g = jobs.get(go_name("percentile"), {})
        if g.get("ok"):
            add("percentile peak RSS < 1 GB", model, g["peak_rss_mb"] < 1024,
                f"{g['peak_rss_mb']:.0f} MB raw (baseline process {base:.0f} MB; the quantizer's own "
                f"{g.get('quantizer_own_mb', float('nan')):.0f} MB)")
    lines = ["| target | model | met | numbers |", "|---|---|---|---|"]
    for r in recs:
        met = "n/a" if r["met"] is None else ("MET" if r["met"] else "NOT MET")
        lines.append(f"| {r['target']} | {r['model']} | {met} | {r['numbers']} |")
    return "\n".join(lines), recs


def bench_model(name: str, args, work: Path) -> dict:
    import _harness
    import onnx
    import zoo

    zm = zoo.get(name)
    guard = {"timeout": args.timeout, "mem_limit_kb": int(args.mem_limit_gb * MB)}
    print(f"\n## {name} ({zm.task}; {zm.path.stat().st_size / 1e6:.1f} MB, calib {len(zm.calib)}, "
          f"eval {len(zm.eval)})\n", flush=True)
    baseline = run_job({"kind": "load", "model": name, "tag": f"{name}-baseline"}, work, **guard)
    floor = run_job({"kind": "session", "model": name, "tag": f"{name}-session"}, work, **guard)
    baseline["one_session"] = _cost(floor) if floor.get("ok") else {"error": floor["error"]}
    specs: dict[str, dict] = {}
    for m in GO_METHODS:
        specs[go_name(m)] = {"kind": "go", "options": {"calibration": m}}
    for m in ORT_METHODS:
        specs[ort_name(m)] = {"kind": "ort", "method": m}
    specs[NO_SENS] = {"kind": "go", "options": {"calibration": "minmax", "sensitivity_snr_db": None}}
    specs[ORT_RR] = {"kind": "ort", "method": "MinMax", "reduce_range": True}
    if any(n.op_type == "BatchNormalization" for n in zm.load().graph.node):
        specs[GO_FOLDED] = {"kind": "go", "options": {"calibration": "minmax"}, "fold_bn": True}
        specs[ORT_FOLDED] = {"kind": "ort", "method": "MinMax", "fold_bn": True}
    for variant, opts in EXTRAS.get(name, []):
        specs[variant] = {"kind": "go", "options": opts}
    jobs: dict[str, dict] = {}
    outs: dict[str, Path] = {}
    for variant, spec in specs.items():
        tag = f"{name}-{variant.replace(' ', '_')}"
        outs[variant] = work / f"{tag}.onnx"
        jobs[variant] = run_job({**spec, "model": name, "tag": tag, "out": str(outs[variant])}, work, **guard)
        jobs[variant]["spec"] = spec
    # The short quantizers run again, in turn (round robin over the variants, fresh subprocesses
    # each time): their medians, not one draw of a noisy machine, are compared.
    short = [v for v, j in jobs.items() if j.get("ok") and j.get("wall_s", REPEAT_UNDER_S) < REPEAT_UNDER_S]
    for k in range(1, args.repeat):
        for variant in short:
            j = jobs[variant]
            again = run_job({**j["spec"], "model": name, "tag": f"{j['tag']}-{k}", "out": f"{outs[variant]}.{k}"},
                            work, **guard)
            j.setdefault("repeats", [_cost(j)]).append(_cost(again) if again.get("ok") else {"error": again["error"]})
    for variant in short:
        if "repeats" in jobs[variant]:
            _take_medians(jobs[variant])
    for variant, job in jobs.items():
        if job.get("ok"):
            model = onnx.load(str(outs[variant]))
            why = _check_runs(model, zm)
            if why is not None:
                job["ok"], job["error"] = False, f"invalid model: {why}"
            else:
                job["model"] = model
        state = "ok" if job.get("ok") else job["error"]
        print(f"[{name}] {variant}: {state} ({job.get('wall_s', job['process_s']):.1f} s, "
              f"peak {job['peak_rss_mb']:.0f} MB)", file=sys.stderr, flush=True)

    zm_eval, ref = _with_sample_cosine(zm)
    variants = {v: j.pop("model") for v, j in jobs.items() if "model" in j}
    extras = {v: {"job": {k: val for k, val in j.items() if k != "spec"}} for v, j in jobs.items() if v in variants}
    rows = _harness.measure(zm_eval, variants, runs=args.runs, threads=args.threads, extras=extras)
    for r in rows:
        r.rewritten = jobs.get(r.variant, {}).get("rewritten", jobs.get(r.variant, {}).get("q_nodes", 0)) \
            if r.variant != "fp32" else 0
    deployed = {}
    for v, m in variants.items():
        deployed[v] = _deployed(m, zm, zm_eval.evaluate, ref)
    deployed["fp32"] = _deployed(zm.load(), zm, zm_eval.evaluate, ref)
    for r in rows:
        r.extra["deployed"] = deployed.get(r.variant)
    keys = TASK_KEYS.get(name, TASK_KEYS["classification"])
    print(_harness.markdown(rows, task_keys=keys), flush=True)
    busy = rows[0].extra
    print(f"\nmachine busy while timing: {busy['cpu_busy_before']:.0%} before, {busy['cpu_busy_after']:.0%} after "
          f"(share of all CPU; 50% = one of two cores). `rewritten`: nodes graph-opt quantized / ORT QuantizeLinear "
          f"count.\n", flush=True)
    print("Quantization cost (each quantizer alone in a fresh subprocess; wall: the quantizer call and its save; "
          "CPU: the whole subprocess; peak RSS: the subprocess's VmHWM, raw; own: peak while quantizing minus RSS "
          "after loading):\n", flush=True)
    print(cost_table(jobs, baseline), flush=True)
    dkeys = ["top1"] + keys if name in CNNS else keys
    print("\nFidelity as deployed (onnxruntime optimizations on: fused integer kernels):\n", flush=True)
    print(deployed_table(rows, deployed, dkeys), flush=True)
    notes = {v: j.get("notes") for v, j in jobs.items() if j.get("notes")}
    failed = [v for v, j in jobs.items() if not j.get("ok")]
    if failed:
        print("\nNot measured: " + "; ".join(f"{v}: {jobs[v]['error']}" for v in failed), flush=True)
    for j in jobs.values():
        j.pop("spec", None)
    return {"rows": rows, "jobs": jobs, "baseline": baseline, "deployed": deployed, "notes": notes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="example,resnet,mobilenet,minilm,yolo")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per quantizer subprocess")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="RSS limit per quantizer subprocess")
    ap.add_argument("--repeat", type=int, default=3,
                    help=f"runs of each quantizer faster than {REPEAT_UNDER_S:g} s (medians are compared)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    import _harness

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_quantize-"))
    by_model: dict[str, dict] = {}
    try:
        for name in args.models.split(","):
            by_model[name] = bench_model(name, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table, recs = check_targets(by_model)
    print("\n## Targets\n", flush=True)
    print(table, flush=True)
    rows = [r for d in by_model.values() for r in d["rows"]]
    meta = {"runs": args.runs, "threads": args.threads, "timeout_s": args.timeout, "mem_limit_gb": args.mem_limit_gb,
            "calib_batch": CALIB_BATCH, "total_seconds": round(time.perf_counter() - t0, 1),
            "ort_call": "quantize_static(path, out, reader, quant_format=QDQ, per_channel=True, "
                        "activation_type=QUInt8, weight_type=QInt8, calibrate_method=...); no quant_pre_process",
            "targets": recs,
            "quantizers": {m: {"baseline": d["baseline"], "jobs": d["jobs"], "notes": d["notes"]}
                           for m, d in by_model.items()}}
    path = _harness.save("bench_quantize", rows, meta)
    print(f"\nwrote {path} (total {meta['total_seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
