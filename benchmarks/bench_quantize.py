"""Static int8 quantization of real exports: graph-opt (through its CLI) against onnxruntime
`quantize_static`, NNCF and AIMET-ONNX, every quantizer in its own process, in one run.

    pip install -e '.[bench]'                       # + NNCF / AIMET-ONNX: benchmarks/README.md
    python benchmarks/bench_quantize.py [--models ppocr_det,resnet,...] [--quantizers graph-opt,ort,...]
                                        [--rounds 10] [--runs 10] [--timeout 600] [--opt-timeout 240]
    python benchmarks/bench_quantize.py --render     # bench_quantize.md again from the saved JSON
    python benchmarks/bench_quantize.py --weights int4   # W4A8 on the CNN classifiers (own JSON/md)

Models: every corpus model (benchmarks/corpus.py) and the zoo's resnet and minilm. Each model's
calibration split is the one set of samples every quantizer sees; its eval split scores them.

Quantizers (``--quantizers``), each run once in a fresh subprocess (``--worker``):

- ``graph-opt``: the CLI as users run it, ``graph-opt optimize MODEL -o OUT --pass quantize
  --data CALIB_DIR [--input-shape NAME=DIMS ...] --report OUT.json`` (the calibration split written
  as an ``.npz``; ``--input-shape`` only for inputs with dynamic non-batch dims, from the model's
  batch-1 shapes). The CLI's defaults: simplify first, verification and latency included.
- ``ort``: ``quant_pre_process`` (when it fails, the failure is recorded and the raw model is
  quantized), then ``quantize_static(quant_format=QDQ, per_channel=True)``, every other argument
  at its default (MinMax, QUInt8 activations, QInt8 weights, reduce_range off); the reader
  yields the calibration split in batches of 8 (the model's fixed batch where it has one).
- ``nncf``: ``nncf.quantize(model, nncf.Dataset(samples), subset_size=len(calib))`` on the ONNX
  backend, defaults otherwise; ``model_type=nncf.ModelType.TRANSFORMER`` for the text encoders.
- ``aimet``: ``QuantizationSimModel(model, dummy_input=sample)`` (int8 / int8, min-max, the
  default config), ``compute_encodings(samples)``, exported with ``to_onnx_qdq()``; input dims
  declared -1 (paddle2onnx) are renamed symbolic first, as AIMET's own dummy input fails on them.
- ``aimet+seqmse`` / ``aimet+adaround``: the same sim with ``apply_seq_mse`` (20 candidates) /
  ``apply_adaround`` (10,000 iterations per layer) first, both at their defaults, under the
  shorter ``--opt-timeout`` guard: where they do not finish, the row says so.

Cost, per quantizer: wall time of the whole process (start to exit: interpreter, imports, loading
the model and the data, quantizing, saving; for graph-opt everything its CLI does), the time of
the quantizing call alone, CPU time, and the peak resident set (``VmHWM`` of the process, read by
the worker at its end; the parent's polled value where the worker was killed). A guard kills a
process over its time limit or ``--mem-limit-gb`` of RSS and records the failure.

Every produced model that onnxruntime loads and runs (optimizations off and on) is measured
against the fp32 original in the parent process: the task metric, output cosine and per-sample
cosine with every onnxruntime optimization on (the fused integer kernels, as deployed; with
``--emulated`` also with optimizations off, QDQ emulated in float), int8 latency against fp32
over ``--rounds`` interleaved rounds (median ratio and its spread over the rounds, with how busy
the machine was; benchmarks/_harness.py). Every table names the CPU and its flags.

``--weights int4`` (W4A8: 4-bit weights, 8-bit activations) runs the CNN classifiers by default
and writes its own bench_quantize_w4a8.{json,md}: graph-opt with ``--pass quantize:weights=int4``,
onnxruntime with ``weight_type=QInt4`` (4-bit QDQ needs opset 21), AIMET with ``param_type=int4``;
NNCF's ONNX ``nncf.quantize`` has no 4-bit weights (its int4 is weight-only compression), so it is
not run. The issue's W4A8 floor is top-1 agreement >= 0.90 on the classifiers; only the fidelity
targets are judged (the latency targets are the int8 ones).

Writes benchmarks/results/bench_quantize.json (after every model: a stopped run keeps what it
measured; a run with ``--models`` replaces only those models) and bench_quantize.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _proc import status_kb

BENCH_DIR = Path(__file__).resolve().parent
MB = 1024
QUANTIZERS = ("graph-opt", "ort", "nncf", "aimet", "aimet+seqmse", "aimet+adaround")
INCUMBENTS = ("ort", "nncf", "aimet", "aimet+seqmse", "aimet+adaround")
SLOW = ("aimet+seqmse", "aimet+adaround")  # run under --opt-timeout
MODELS = ("ppocr_det", "ppocr_rec", "ppocr_cls", "magika", "silero_vad", "dddd_det", "dddd_ocr", "yolo",
          "minilm_dynamo", "orinet", "opennsfw", "resnet", "minilm")
TEXT_ENCODERS = ("minilm", "minilm_dynamo")
CALIB_BATCH = 8
# The number each model's fidelity target is judged on (as deployed), and the floor.
# "top1" is top-1 agreement with fp32; "sample_cos_mean" the mean per-sample embedding cosine.
PRIMARY: dict[str, tuple[str, float | None, str]] = {
    "ppocr_det": ("iou_vs_fp32", 0.9, "detector/segmenter: map IoU vs fp32 >= 0.9"),
    "ppocr_rec": ("agreement_vs_fp32", 0.9, "OCR: CTC exact match (same string as fp32, end spaces aside) >= 0.9"),
    "ppocr_cls": ("top1", 0.97, "CNN classifier: top-1 agreement >= 0.97"),
    "magika": ("top1", 0.97, "classifier: top-1 agreement >= 0.97"),
    "silero_vad": ("agreement_vs_fp32", None, "no target in the issue (frame agreement with fp32)"),
    "dddd_det": ("det_f1_vs_fp32", 0.9, "detector: detection F1 vs fp32 >= 0.9 (one class)"),
    "dddd_ocr": ("agreement_vs_fp32", 0.9, "OCR: CTC exact match (same string as fp32, end spaces aside) >= 0.9"),
    "yolo": ("top_class_agreement_vs_fp32", 0.95, "detector: top-class agreement >= 0.95"),
    "minilm_dynamo": ("sample_cos_mean", 0.995, "text encoder: embedding cosine >= 0.995"),
    "orinet": ("top1", 0.97, "CNN classifier: top-1 agreement >= 0.97"),
    "opennsfw": ("top1", 0.97, "CNN classifier: top-1 agreement >= 0.97"),
    "resnet": ("top1", 0.97, "CNN classifier: top-1 agreement >= 0.97"),
    "minilm": ("sample_cos_mean", 0.995, "text encoder: embedding cosine >= 0.995"),
}
W4A8_MODELS = ("ppocr_cls", "magika", "orinet", "opennsfw", "resnet")  # the CNN classifiers
W4A8_FLOOR = 0.90  # the issue: CNN classifiers' top-1 agreement with fp32 at W4A8
BIG_MACS = 50e6  # the issue: on a VNNI CPU int8 below fp32 on every model with more MACs than this


# ============================================================================================ worker


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _samples(spec: dict, batch: int):
    """The calibration split as graph-opt reads it (each input's batch axis), in batches."""
    import onnx

    from graph_opt.data import load_data

    model = onnx.load(spec["source"], load_external_data=False)
    return list(load_data(spec["calib"], model).batches(batch))


def _run_graph_opt(spec: dict, result: dict) -> None:
    from graph_opt.cli import main as cli

    # W4A8 by name (int4 weights alone are weight-only), every layer kept so (the CPU runs it in float)
    qpass = "quantize:weights=int4,activations=uint8,prefer=size" if spec.get("weights") == "int4" else "quantize"
    argv = ["optimize", spec["source"], "-o", spec["out"], "--pass", qpass, "--data", spec["calib_dir"],
            *[a for name, dims in spec["input_shapes"].items()
              for a in ("--input-shape", f"{name}={'x'.join(map(str, dims))}")],
            "--report", spec["out"] + ".report.json"]
    result["command"] = "graph-opt " + " ".join(argv)
    code = cli(argv)
    result["exit_code_cli"] = code
    if code != 0:
        raise RuntimeError(f"graph-opt exited {code}")
    report = json.loads(Path(spec["out"] + ".report.json").read_text())
    result["report"] = _go_summary(report)


def _go_summary(report: dict) -> dict:
    """What the CLI's report says about its quantize step: accepted, rewritten/skipped counts, why skipped."""
    steps = report.get("steps", [])
    q = next((s for s in steps if s.get("name") == "quantize"), {})
    rep = q.get("report") or {}
    reasons: dict[str, int] = {}
    for s in rep.get("skipped", []):
        reason = str(s.get("reason", "?"))[:80]
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"accepted": q.get("accepted"), "rewritten": len(rep.get("rewritten", [])),
            "skipped": len(rep.get("skipped", [])), "skip_reasons": reasons,
            "steps": [s.get("name") for s in steps], "seconds": {s.get("name"): s.get("seconds") for s in steps}}


def _run_ort(spec: dict, result: dict) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = _samples(spec, CALIB_BATCH)
    source = spec["source"]
    pre = spec["out"] + ".pre.onnx"
    start = time.perf_counter()
    try:
        quant_pre_process(source, pre)
        source, result["pre_process"] = pre, "ok"
    except Exception as exc:  # noqa: BLE001 - recorded: onnxruntime then quantizes the raw model
        result["pre_process"] = f"failed: {_first_line(exc)}"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    kw = {"weight_type": QuantType.QInt4} if spec.get("weights") == "int4" else {}
    quantize_static(source, spec["out"], Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **kw)
    result["call_s"] = time.perf_counter() - start


def _run_nncf(spec: dict, result: dict) -> None:
    import nncf
    import onnx

    samples = _samples(spec, 1)
    model = onnx.load(spec["source"])
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if spec["model"] in TEXT_ENCODERS else {}
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples), **kw)
    result["call_s"] = time.perf_counter() - start
    onnx.save(quantized, spec["out"])
    result["nncf"] = nncf.__version__


def _run_aimet(spec: dict, result: dict) -> None:
    import onnx
    from aimet_onnx import apply_adaround, apply_seq_mse
    from aimet_onnx.quantsim import QuantizationSimModel

    samples = _samples(spec, 1)
    model = onnx.load(spec["source"])
    # AIMET builds its own random input from the declared shapes and fails on a dim declared as -1
    # (paddle2onnx writes those): such dims are renamed symbolic, which is what -1 means.
    fixed = 0
    for value in model.graph.input:
        for k, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param, fixed = f"{value.name}_dim{k}", fixed + 1
    if fixed:
        result["note"] = f"{fixed} input dims declared -1 made symbolic for AIMET"
    start = time.perf_counter()
    kw = {"param_type": "int4"} if spec.get("weights") == "int4" else {}
    sim = QuantizationSimModel(model, dummy_input=samples[0], **kw)
    if spec["kind"] == "aimet+seqmse":
        apply_seq_mse(sim, samples)
    elif spec["kind"] == "aimet+adaround":
        apply_adaround(sim, samples)
    sim.compute_encodings(samples)
    quantized = sim.to_onnx_qdq()
    result["call_s"] = time.perf_counter() - start
    onnx.save(quantized, spec["out"])


def _nested_qdq(graph) -> int:
    """QuantizeLinear / DequantizeLinear nodes inside the subgraphs (If, Loop, Scan) of `graph`."""
    count = 0
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                count += sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node) + _nested_qdq(g)
    return count


RUNNERS = {"graph-opt": _run_graph_opt, "ort": _run_ort, "nncf": _run_nncf, "aimet": _run_aimet,
           "aimet+seqmse": _run_aimet, "aimet+adaround": _run_aimet}


def _foreign_checkout() -> str | None:
    """Where graph_opt (and its passes) import from when that is not this checkout (an editable
    install of another worktree in the interpreter's site-packages): a run would measure that code."""
    import graph_opt
    import graph_opt.passes

    repo = BENCH_DIR.parent.resolve()
    for module in (graph_opt, graph_opt.passes):
        where = Path(module.__file__).resolve()
        if repo not in where.parents:
            return str(where)
    return None


def worker(spec: dict) -> int:
    """Run one quantizer in this (fresh) process; write its result JSON, with this process's peak RSS."""
    result: dict = {"kind": spec["kind"]}
    try:
        foreign = _foreign_checkout()
        if foreign:
            raise RuntimeError(f"graph_opt imports from {foreign}, not this checkout: reinstall with pip install -e")
        RUNNERS[spec["kind"]](spec, result)
        import onnx

        qm = onnx.load(spec["out"], load_external_data=False)
        ops: dict[str, int] = {}
        for n in qm.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        result["q_nodes"], result["dq_nodes"] = ops.get("QuantizeLinear", 0), ops.get("DequantizeLinear", 0)
        # weights stored quantized: DequantizeLinear nodes reading an integer initializer of > 16 values
        # (a quantizer that misses weights held in Constant nodes leaves them float)
        ints = {t.name for t in qm.graph.initializer if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                and np.prod(t.dims) > 16}
        result["weight_dq"] = sum(n.op_type == "DequantizeLinear" and n.input[0] in ints for n in qm.graph.node)
        nested = _nested_qdq(qm.graph)
        if nested:  # silero_vad's network lives in If branches
            result["qdq_in_subgraphs"] = nested
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - recorded, not raised: the parent reports this quantizer's failure
        import traceback

        traceback.print_exc()  # into the job's log; its last lines go into the JSON
        result["ok"] = False
        result["error"] = _first_line(exc)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["hwm_kb"] = status_kb("VmHWM")
    Path(spec["result"]).write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


# ============================================================================================ parent


def run_job(spec: dict, work: Path, *, timeout: float, mem_limit_kb: int) -> dict:
    """`spec` in a fresh subprocess (cwd: an empty folder, to catch stray files), guarded in time
    and memory; the worker's result with the process's wall time and peak RSS."""
    tag = spec["tag"]
    cwd = work / f"cwd-{tag}"
    cwd.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(work / f"{tag}.result.json")}
    log_path = work / f"{tag}.log"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "GRAPH_OPT_PROGRESS": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.monotonic()
    failure, polled = None, 0
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
            if rss > mem_limit_kb:
                failure = f"killed by the memory guard: RSS {rss / MB / MB:.1f} GB after {elapsed:.0f} s"
            elif elapsed > timeout:
                failure = f"timeout: killed after {timeout:.0f} s"
            if failure is not None:
                proc.send_signal(signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    wall = time.monotonic() - start
    result: dict = {}
    rp = Path(spec["result"])
    if rp.is_file() and failure is None:
        result = json.loads(rp.read_text())
    peak = result.get("hwm_kb") or polled
    result.update(tag=tag, wall_s=round(wall, 2), cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
                  peak_rss_mb=round(peak / MB, 1), exit_code=os.waitstatus_to_exitcode(status))
    stray = sorted(p.name for p in cwd.iterdir())
    if stray:
        result["stray_files_in_cwd"] = stray
    if failure is not None:
        result["ok"], result["error"] = False, failure
    if not result.get("ok"):
        result["log_tail"] = log_path.read_text(errors="replace").strip().splitlines()[-8:]
    if failure is None and not result.get("ok"):
        tail = result["log_tail"][-3:]
        result["ok"] = False
        result.setdefault("error", f"exit code {result['exit_code']}: " + " | ".join(tail)[:300])
    return result


def _dynamic_shapes(model, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The batch-1 shapes of the inputs that have a dynamic dim other than the first (what the
    CLI asks to be bound with --input-shape)."""
    from graph_opt.data import input_specs

    out = {}
    for s in input_specs(model):
        dims = list(s.shape or ())
        if any(not isinstance(d, int) or d < 0 for d in dims[1:]) and s.name in shapes:
            out[s.name] = tuple(shapes[s.name])
    return out


def _outputs(zm, model, *, optimize: bool) -> dict[str, np.ndarray]:
    """The model's outputs over the eval split, with onnxruntime optimizations on or off (the
    model's own runner where its inputs do not all stack on axis 0)."""
    from graph_opt.data import batch_size_for
    from graph_opt.runtime import make_session, run_model

    session = make_session(model, optimize=optimize)
    if zm.runner is not None:  # whole split in one run (silero's state is batched on axis 1)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, dict(zm.eval.inputs))))
    # a quantizer may have fixed a dynamic batch to 1 (its calibration batch)
    return run_model(session, zm.eval, batch_size=batch_size_for(model, CALIB_BATCH))


def _fidelity(zm, ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, float]:
    """Task metrics, output cosine, top-1 agreement (classifiers) and mean / min per-sample cosine."""
    from graph_opt import metrics

    res = dict(zm.evaluate(out))
    name = next(iter(ref))
    res["cosine"] = float(metrics.cosine(ref[name], out[name]))
    if zm.task.startswith("classification") and ref[name].ndim == 2 and ref[name].shape[1] >= 2:
        res["top1"] = float(metrics.top1_agreement(ref[name], out[name]))
    n = len(zm.eval)
    cos = []
    for k, r in ref.items():
        if r.ndim == 0 or r.shape[0] != n:  # a recurrent state (batched on axis 1) has no per-sample rows here
            continue
        c = np.asarray(out[k], np.float64).reshape(n, -1)
        r = np.asarray(r, np.float64).reshape(n, -1)
        den = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
        cos.append(np.where(den > 0, (r * c).sum(1) / np.maximum(den, 1e-30), 1.0))
    if cos:
        per = np.mean(cos, axis=0)
        res["sample_cos_mean"], res["sample_cos_min"] = float(per.mean()), float(per.min())
    return res


def _check_runs(model, zm) -> str | None:
    """None when onnxruntime loads and runs the model (optimizations off and on), else why not."""
    from graph_opt.runtime import make_session

    for optimize in (False, True):
        try:
            make_session(model, optimize=optimize).run(None, zm.sample(0))
        except Exception as exc:  # noqa: BLE001 - any failure to load or run disqualifies the model
            return f"onnxruntime ({'optimizations on' if optimize else 'off'}) fails: {_first_line(exc)}"
    return None


def _floor(name: str, weights: str) -> dict:
    """The issue's floor for `name`: the int8 one, or at W4A8 the classifiers' 0.90 (no other)."""
    if weights != "int4":
        return {"target": PRIMARY[name][1], "target_text": PRIMARY[name][2]}
    if name in W4A8_MODELS:
        return {"target": W4A8_FLOOR, "target_text": f"CNN classifier at W4A8: top-1 agreement >= {W4A8_FLOOR}"}
    return {"target": None, "target_text": "no W4A8 target in the issue"}


def bench_model(name: str, args, work: Path) -> dict:
    import _harness
    import corpus
    import onnx
    import zoo

    from graph_opt.stats import model_stats

    zm = zoo.get(name)
    model = zm.load()
    data_dir = work / f"data-{name}"
    corpus.export_data(zm, data_dir)
    calib_dir = data_dir / "calib"
    calib_dir.mkdir()
    os.replace(data_dir / f"{name}_calib.npz", calib_dir / f"{name}_calib.npz")
    base = {"model": name, "source": str(zm.path), "calib": str(calib_dir / f"{name}_calib.npz"),
            "calib_dir": str(calib_dir), "input_shapes": _dynamic_shapes(model, zm.shapes), "weights": args.weights}
    macs = model_stats(model, shapes=zm.shapes).macs
    print(f"\n## {name} ({zm.task}; {zm.path.stat().st_size / 1e6:.1f} MB, {macs or 0:.3g} MACs, "
          f"calib {len(zm.calib)}, eval {len(zm.eval)})\n", file=sys.stderr, flush=True)
    jobs: dict[str, dict] = {}
    variants: dict[str, onnx.ModelProto] = {}
    for q in args.quantizers:
        out = work / f"{name}-{q.replace('+', '_')}.onnx"
        timeout = args.opt_timeout if q in SLOW else args.timeout
        job = run_job({**base, "kind": q, "tag": f"{name}-{q.replace('+', '_')}", "out": str(out)}, work,
                      timeout=timeout, mem_limit_kb=int(args.mem_limit_gb * MB * MB))
        if job.get("ok"):
            produced = onnx.load(str(out))
            why = _check_runs(produced, zm)
            if why is None:
                variants[q] = produced
            else:
                job["ok"], job["error"] = False, f"invalid model: {why}"
        jobs[q] = job
        print(f"[{name}] {q}: {'ok' if job.get('ok') else job['error']} ({job['wall_s']:.1f} s, "
              f"peak {job['peak_rss_mb']:.0f} MB)", file=sys.stderr, flush=True)
    ref = _outputs(zm, model, optimize=False)
    deployed = {"fp32": _fidelity(zm, ref, _outputs(zm, model, optimize=True))}
    emulated = {}
    for q, m in list(variants.items()):
        try:
            deployed[q] = _fidelity(zm, ref, _outputs(zm, m, optimize=True))
            if args.emulated:
                emulated[q] = _fidelity(zm, ref, _outputs(zm, m, optimize=False))
        except Exception as exc:  # noqa: BLE001 - this quantizer's model is reported as failing, the run goes on
            jobs[q]["ok"], jobs[q]["error"] = False, f"eval split fails: {_first_line(exc)}"
            deployed.pop(q, None)
            del variants[q]
    busy0 = _harness.cpu_busy(0.5)
    _, spread = _harness.latency_rounds([model, *variants.values()], zm.sample(0), rounds=args.rounds,
                                        runs=args.runs)
    busy1 = _harness.cpu_busy(0.5)
    latency = {q: spread[i + 1] for i, q in enumerate(variants)}
    for m in ([] if macs else variants.values()):  # shapes the raw export leaves unknown: a rewritten model's count
        macs = macs or model_stats(m, shapes=zm.shapes).macs
    sizes = {q: len(m.SerializeToString()) / max(zm.path.stat().st_size, 1) for q, m in variants.items()}
    return {"model": name, "task": zm.task, "macs": macs, "calib": len(zm.calib), "eval": len(zm.eval),
            "primary": PRIMARY[name][0], **_floor(name, args.weights), "weights": args.weights,
            "input_shapes": {k: list(v) for k, v in base["input_shapes"].items()},
            "date": time.strftime("%Y-%m-%d %H:%M"), "jobs": jobs, "deployed": deployed, "emulated": emulated, "latency": latency, "size_ratio": sizes,
            "cpu_busy": [round(busy0, 3), round(busy1, 3)]}


# ============================================================================================ tables


def _num(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def model_table(r: dict) -> str:
    key = r["primary"]
    off = bool(r["emulated"])  # scored with optimizations off too (--emulated)
    head = ["quantizer", "status", f"{key} (deployed)", *([f"{key} (opt off)"] if off else []), "cosine",
            "int8 / fp32 latency (spread)",
            "size", "wall s (quantize call)", "CPU s", "peak MB", "Q / DQ (weights stored quantized)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = r["deployed"]["fp32"]
    lines.append(f"| fp32 | - | {_num(fp.get(key))} |{' - |' if off else ''} 1.0000 | 1.00x | 1.00x | - | - | - | - |")
    for q, j in r["jobs"].items():
        d, e, lat = r["deployed"].get(q, {}), r["emulated"].get(q, {}), r["latency"].get(q)
        status = "ok" if j.get("ok") else j.get("error", "?")
        if j.get("earlier_run"):
            status += f" (run of {j['earlier_run']})"
        if q == "ort" and j.get("pre_process", "ok") != "ok":
            status += f" (quant_pre_process {j['pre_process']})"
        if q == "graph-opt" and j.get("report"):
            rep = j["report"]
            status += f" ({rep['rewritten']} quantized, {rep['skipped']} skipped" + \
                      ("" if rep.get("accepted", True) else ", ROLLED BACK") + ")"
        call = f" ({j['call_s']:.1f})" if j.get("call_s") is not None else ""
        lines.append("| " + " | ".join([
            q, status, _num(d.get(key)), *([_num(e.get(key))] if off else []), _num(d.get("cosine")),
            "-" if lat is None else f"{lat[0]:.2f}x ({lat[1]:.2f}-{lat[2]:.2f})",
            "-" if q not in r["size_ratio"] else f"{r['size_ratio'][q]:.2f}x",
            f"{j['wall_s']:.1f}{call}", f"{j['cpu_s']:.1f}", f"{j['peak_rss_mb']:,.0f}",
            (f"{j.get('q_nodes', '-')} / {j.get('dq_nodes', '-')}"
             + (f" ({j['weight_dq']} weights)" if j.get("weight_dq") is not None else "")
             + (f" (+{j['qdq_in_subgraphs']} in subgraphs)" if j.get("qdq_in_subgraphs") else "")) if j.get("ok") else "-",
        ]) + " |")
    return "\n".join(lines)


def targets(r: dict) -> list[dict]:
    """The issue's "Must show" targets for one model, judged on this run's numbers."""
    key, floor = r["primary"], r["target"]
    recs = []

    def add(target, met, numbers):
        recs.append({"model": r["model"], "target": target, "met": met, "numbers": numbers})

    go = r["jobs"].get("graph-opt", {})
    gv = r["deployed"].get("graph-opt", {}).get(key)
    others = {q: r["deployed"][q].get(key) for q in INCUMBENTS if q in r["deployed"]}
    others = {q: v for q, v in others.items() if v is not None}
    if gv is None:
        add("fidelity >= best incumbent", False, f"graph-opt: {go.get('error', 'no model')}")
    elif not others:
        add("fidelity >= best incumbent", None, "no incumbent produced a usable model")
    else:
        best = max(others, key=others.get)
        add("fidelity >= best incumbent", gv >= others[best], f"{key} {gv:.4f} vs {best} {others[best]:.4f}")
    if floor is not None:
        add(f"{key} >= {floor}", None if gv is None else gv >= floor, "-" if gv is None else f"{gv:.4f}")
    if r.get("weights") == "int4":  # the latency and cost targets are the int8 ones
        return recs
    lat = r["latency"]
    if "graph-opt" in lat and "ort" in lat:
        add("int8 latency <= ort int8", lat["graph-opt"][0] <= lat["ort"][0],
            f"{lat['graph-opt'][0]:.2f}x vs {lat['ort'][0]:.2f}x of fp32")
    if "graph-opt" in lat and (r["macs"] or 0) > BIG_MACS:
        add("int8 latency < fp32 (> 50M MACs, VNNI)", lat["graph-opt"][0] < 1.0,
            f"{lat['graph-opt'][0]:.2f}x ({lat['graph-opt'][1]:.2f}-{lat['graph-opt'][2]:.2f})")
    o = r["jobs"].get("ort", {})
    if go.get("ok") and o.get("ok"):
        add("wall <= ort (CLI)", go["wall_s"] <= o["wall_s"],
            f"{go['wall_s']:.1f} vs {o['wall_s']:.1f} s (CPU {go['cpu_s']:.1f} vs {o['cpu_s']:.1f} s)")
        add("peak memory <= ort (CLI)", go["peak_rss_mb"] <= o["peak_rss_mb"],
            f"{go['peak_rss_mb']:,.0f} vs {o['peak_rss_mb']:,.0f} MB")
    return recs


def summary_table(results: list[dict]) -> str:
    head = ["model", "metric (target)", "fp32", *QUANTIZERS, "graph-opt latency", "ort latency",
            "graph-opt / ort wall (CPU)", "graph-opt / ort peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        key = r["primary"]
        cells = [r["model"], f"{key} ({'-' if r['target'] is None else r['target']})",
                 _num(r["deployed"]["fp32"].get(key), ".3f")]
        for q in QUANTIZERS:
            j = r["jobs"].get(q)
            if j is None:
                cells.append("not run")
            elif q in r["deployed"]:
                cells.append(_num(r["deployed"][q].get(key), ".3f"))
            else:
                cells.append("timeout" if "timeout" in j.get("error", "") else "failed")
        for q in ("graph-opt", "ort"):
            lat = r["latency"].get(q)
            cells.append("-" if lat is None else f"{lat[0]:.2f}x ({lat[1]:.2f}-{lat[2]:.2f})")
        go, o = r["jobs"].get("graph-opt", {}), r["jobs"].get("ort", {})
        both = go.get("ok") and o.get("ok")
        cells.append(f"{go['wall_s']:.0f} / {o['wall_s']:.0f} s ({go['cpu_s']:.0f} / {o['cpu_s']:.0f} s)" if both else "-")
        cells.append(f"{go['peak_rss_mb']:,.0f} / {o['peak_rss_mb']:,.0f} MB" if both else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(results: list[dict]) -> str:
    lines = ["| model | target | met | numbers |", "|---|---|---|---|"]
    for r in results:
        for t in targets(r):
            met = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
            lines.append(f"| {t['model']} | {t['target']} | {met} | {t['numbers']} |")
    return "\n".join(lines)


def render(doc: dict) -> str:
    import _harness

    env = doc["environment"]
    cpu = "CPU: " + doc.get("cpu_line", "?")
    busy = max((max(r["cpu_busy"]) for r in doc["results"]), default=0.0)
    w4 = any(r.get("weights") == "int4" for r in doc["results"])
    stem = doc.get("stem") or ("bench_quantize_w4a8" if w4 else "bench_quantize")
    parts = [
        ("# bench_quantize: graph-opt (CLI) vs onnxruntime, NNCF, AIMET-ONNX on real exports (one run)"
         + (", W4A8 (4-bit weights, 8-bit activations)" if w4 else "")), "",
        (f"`{doc['command']}` ({doc['date']}, {doc['total_seconds']:.0f} s; raw numbers in `{stem}.json`; "
         "a model measured by an earlier invocation says so under its table)."),
        f"{cpu}. onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, "
        + ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items()) + ".",
        (f"Machine shared with other jobs: up to {busy:.0%} of all CPU busy while timing latency "
         "(50% = one of two cores): latency ratios are indicative."), "",
        ("Fidelity: the task metric as deployed (onnxruntime, every optimization on) against the fp32 model; "
         "latency: int8 / fp32 median over interleaved rounds (min-max over the rounds); wall and peak: the "
         "whole quantizer process (graph-opt: its CLI, verification included)."), "",
        "## Summary", "", summary_table(doc["results"]), "", cpu, "", "## Targets (issue 20)", "",
        targets_table(doc["results"]), "", cpu]
    for r in doc["results"]:
        parts += ["", (f"## {r['model']} ({r['task']}; {r['macs'] or 0:.3g} MACs; calib {r['calib']}, "
                       f"eval {r['eval']}; measured {r.get('date', '?')}; machine busy while timing "
                       f"{r['cpu_busy'][0]:.0%} / {r['cpu_busy'][1]:.0%})"), "",
                  f"Target: {r['target_text']}.", "", model_table(r), "", cpu]
        go = r["jobs"].get("graph-opt", {})
        if go.get("report", {}).get("skip_reasons"):
            grouped: dict[str, int] = {}
            for reason, n in go["report"]["skip_reasons"].items():  # "sensitive: SNR 23.0 dB < 25 dB (...)"
                reason = re.sub(r"-?\d+(\.\d+)?", "#", reason.split(" (")[0]).strip()
                grouped[reason] = grouped.get(reason, 0) + n
            parts += ["", "graph-opt kept float: " + "; ".join(f"{n}× {k}" for k, n in grouped.items())]
    del _harness
    return "\n".join(parts) + "\n"


def _keep_earlier(res: dict, earlier: dict | None) -> None:
    """A run of some quantizers (``--quantizers``) keeps the earlier run's rows of the others,
    each marked with that run's date (its latency ratio is to the fp32 of its own run)."""
    if earlier is None:
        return
    for q, job in earlier["jobs"].items():
        if q in res["jobs"]:
            continue
        res["jobs"][q] = {**job, "earlier_run": job.get("earlier_run", earlier.get("date", "?"))}
        for part in ("deployed", "emulated", "latency", "size_ratio"):
            if q in earlier.get(part, {}):
                res[part][q] = earlier[part][q]
    res["jobs"] = {q: res["jobs"][q] for q in QUANTIZERS if q in res["jobs"]}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("nncf", "aimet-onnx", "torch", "graph-opt"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "not installed"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quantizers", default=",".join(QUANTIZERS), help=f"among {', '.join(QUANTIZERS)}")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=10, help="runs per model per round")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per quantizer process")
    ap.add_argument("--opt-timeout", type=float, default=240.0, help=f"seconds for {', '.join(SLOW)}")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="RSS limit per quantizer process")
    ap.add_argument("--emulated", action="store_true",
                    help="also score every model with onnxruntime optimizations off (QDQ emulated in float)")
    ap.add_argument("--weights", choices=("int8", "int4"), default="int8",
                    help="int4: W4A8 on the CNN classifiers, into bench_quantize_w4a8.{json,md}")
    ap.add_argument("--tag", default="", metavar="TAG",
                    help="write bench_quantize[_w4a8]_TAG.{json,md}, e.g. a run on another kind of CPU")
    ap.add_argument("--render", action="store_true", help="only rewrite bench_quantize.md from the saved JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    stem = ("bench_quantize_w4a8" if args.weights == "int4" else "bench_quantize") + (f"_{args.tag}" if args.tag else "")
    if args.weights == "int4" and "--models" not in (argv or sys.argv[1:]):
        args.models = ",".join(W4A8_MODELS)
    if args.weights == "int4" and "--quantizers" not in (argv or sys.argv[1:]):
        args.quantizers = ",".join(q for q in QUANTIZERS if q != "nncf")
    if args.render:
        saved = BENCH_DIR / "results" / f"{stem}.json"
        saved.with_suffix(".md").write_text(render(json.loads(saved.read_text())))
        return 0
    args.quantizers = [q for q in args.quantizers.split(",") if q]
    bad = [q for q in args.quantizers if q not in QUANTIZERS] + [m for m in args.models.split(",") if m not in MODELS]
    if bad:
        ap.error(f"unknown quantizer or model: {bad[0]} (quantizers: {', '.join(QUANTIZERS)}; models: {', '.join(MODELS)})")

    import _harness

    foreign = _foreign_checkout()
    if foreign:
        ap.error(f"graph_opt imports from {foreign}, not this checkout ({BENCH_DIR.parent}): "
                 "pip install -e the checkout into this interpreter")
    t0 = time.perf_counter()
    path = _harness.RESULTS_DIR / f"{stem}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    names = args.models.split(",")
    kept = [r for r in old.get("results", []) if r["model"] not in names]
    doc = {"bench": "bench_quantize", "environment": _harness.environment(), "cpu_line": _harness.host().describe(),
           "versions": _versions(), "command": "python benchmarks/bench_quantize.py " + " ".join(argv or sys.argv[1:]),
           "stem": stem, "date": time.strftime("%Y-%m-%d %H:%M"), "calib_batch_ort": CALIB_BATCH,
           "timeouts_s": {"default": args.timeout, "slow": args.opt_timeout}, "rounds": args.rounds,
           "runs": args.runs, "results": kept}
    with tempfile.TemporaryDirectory(prefix="bench_quantize-") as tmp:
        for name in names:
            res = bench_model(name, args, Path(tmp))
            _keep_earlier(res, next((r for r in old.get("results", []) if r["model"] == name), None))
            res["targets"] = targets(res)
            doc["results"] = [r for r in doc["results"] if r["model"] != name] + [res]
            doc["results"].sort(key=lambda r: MODELS.index(r["model"]))
            doc["total_seconds"] = round(time.perf_counter() - t0, 1)
            path.write_text(json.dumps(doc, indent=1, default=_harness._default))
            (path.with_suffix(".md")).write_text(render(doc))
            print(model_table(res), flush=True)
    print("\n" + summary_table(doc["results"]) + "\n\n" + targets_table(doc["results"]), flush=True)
    print(f"\nwrote {path} (total {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
