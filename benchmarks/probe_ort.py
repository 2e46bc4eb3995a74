"""Probes of onnxruntime's CPU behaviour that graph-opt's defaults rely on (docs/design.md).

Each probe builds its models in code (seeded random weights: these are timing facts, not
fidelity facts) and prints one table, with the CPU model and flags:

- ``spinning``: three identical sessions (2 intra-op threads) timed in turn, with onnxruntime's
  default worker threads (they keep spinning after ``run`` returns and steal the CPU from the
  next session) and with ``session.force_spinning_stop`` (what `graph_opt.stats` sets). Identical
  models must time alike; with spinning they do not.
- ``align``: a 3×3 conv (C→C channels) against its Tucker-2 form (1×1 → 3×3 core → 1×1) at
  ranks that are and are not multiples of 16: onnxruntime's blocked channel layout makes the
  aligned rank the faster one even when it has more MACs.
- ``saturation``: a conv chain quantized by graph-opt (uint8 activations) with full-range int8
  weights (``reduce_range=false``) and with 7-bit ones, run as deployed (fused integer kernels)
  against the same QDQ model with optimizations off (float reference of the same arithmetic):
  the largest difference in output quantization steps. On x86 without VNNI the u8×s8 kernels
  saturate with full-range weights; with VNNI (or 7-bit weights) the difference stays at a step.

    python benchmarks/probe_ort.py [spinning|align ...] [--rounds 10] [--runs 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402

OPSET = 17


def _conv_model(layers: list[tuple[int, int, int]], hw: int, channels: int, seed: int = 0) -> onnx.ModelProto:
    """A chain of convs, each (out_channels, in_channels, kernel) with 'same' padding."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (o, c, k) in enumerate(layers):
        w = numpy_helper.from_array((rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32), f"w{i}")
        inits.append(w)
        p = k // 2
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"y{i}"], pads=[p, p, p, p]))
        x = f"y{i}"
    out_c = layers[-1][0]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, hw, hw])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", out_c, hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _macs(layers: list[tuple[int, int, int]], hw: int) -> int:
    return sum(o * c * k * k * hw * hw for o, c, k in layers)


def probe_spinning(rounds: int, runs: int) -> None:
    model = _conv_model([(64, 64, 3)] * 4, 28, 64)
    feed = {"x": np.random.default_rng(1).standard_normal((1, 64, 28, 28)).astype(np.float32)}
    print("| worker threads | session A ms | session B ms | session C ms | max/min |\n|---|---|---|---|---|")
    for label, stop in (("spinning (onnxruntime default)", False), ("force_spinning_stop=1", True)):
        sessions = []
        for _ in range(3):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            so.add_session_config_entry("session.force_spinning_stop", "1" if stop else "0")
            sessions.append(ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]))
        times = [[] for _ in sessions]
        for s in sessions:
            for _ in range(5):
                s.run(None, feed)
        for _ in range(rounds):
            for i, s in enumerate(sessions):  # each session's runs back to back, then the next
                for _ in range(runs):
                    t0 = time.perf_counter_ns()
                    s.run(None, feed)
                    times[i].append((time.perf_counter_ns() - t0) / 1e6)
        med = [float(np.median(t)) for t in times]
        print(f"| {label} | " + " | ".join(f"{m:.3f}" for m in med) + f" | {max(med) / min(med):.2f} |")


def probe_align(rounds: int, runs: int) -> None:
    c, hw = 48, 28
    variants = {"3x3 conv": [(c, c, 3)]}
    for r in (12, 16, 24, 32):
        variants[f"tucker2 rank {r}"] = [(r, c, 1), (r, r, 3), (c, r, 1)]
    models = [_conv_model(v, hw, c) for v in variants.values()]
    feed = {"x": np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)}
    medians, spread = _harness.latency_rounds(models, feed, rounds=rounds, runs=runs)
    base = _macs(variants["3x3 conv"], hw)
    print(f"{c}→{c} channels, {hw}×{hw}, batch 1, 1 intra-op thread, optimizations on\n")
    print("| variant | MACs ratio | latency ms | latency ratio (median, min-max over rounds) |\n|---|---|---|---|")
    for (name, layers), ms, (mid, lo, hi) in zip(variants.items(), medians, spread):
        print(f"| {name} | {_macs(layers, hw) / base:.2f}x | {ms:.3f} | {mid:.2f}x ({lo:.2f}-{hi:.2f}) |")


def probe_saturation(rounds: int, runs: int) -> None:
    from graph_opt.data import Dataset
    from graph_opt.pass_base import PassContext
    from graph_opt.passes.quantize import Quantize
    from graph_opt.runtime import make_session

    c, hw = 64, 14
    model = _conv_model([(c, c, 3)] * 3, hw, c, seed=3)
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((32, c, hw, hw))).astype(np.float32)  # non-negative: uint8 activations use all steps
    print("| int8 weights | max abs(deployed − reference), output steps | mean |\n|---|---|---|")
    for reduce in (False, True):
        q = Quantize(reduce_range=reduce, sensitivity_snr_db=None)(model, PassContext(data=Dataset({"x": x[:16]}))).model
        ref = make_session(q, optimize=False).run(None, {"x": x[16:]})[0]
        dep = make_session(q, optimize=True).run(None, {"x": x[16:]})[0]
        step = (ref.max() - min(ref.min(), 0.0)) / 255.0
        diff = np.abs(dep - ref) / step
        print(f"| {'7-bit (reduce_range)' if reduce else 'full range'} | {diff.max():.1f} | {diff.mean():.3f} |")


PROBES = {"spinning": probe_spinning, "align": probe_align, "saturation": probe_saturation}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="*", help="spinning, align, saturation (default: all)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)
    for name in args.probes or PROBES:
        print(f"\n### {name}\n")
        PROBES[name](args.rounds, args.runs)
    print(f"\n{_harness.cpu_line()}; onnxruntime {ort.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
