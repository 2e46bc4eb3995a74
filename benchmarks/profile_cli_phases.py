"""Where one `graph-opt optimize` run spends its CPU: process CPU seconds per phase.

    python benchmarks/profile_cli_phases.py optimize MODEL -o OUT --pass quantize --data CALIB.npz [...]

The arguments are the CLI's own. The run is the CLI's, in this process; around each phase below
(outermost call only, so that a phase inside another one is listed as "(nested)" and not counted
twice) the process's CPU time (`time.process_time`: every thread, onnxruntime's included) is
summed. Unlike cProfile, nothing slows the Python code down, so the figures add up to the run's
CPU time; what no phase covers (loading, reports, saving) is the difference to the total. Printed
to stderr after the CLI's own output.
"""

from __future__ import annotations

import collections
import functools
import importlib
import sys
import time

# (module, attribute): the phases, and every module that imported a phase function by name
PHASES = [
    ("graph_opt.verify", "Reference.__init__"),      # the original's outputs (once)
    ("graph_opt.verify", "Reference.compare"),       # each step's model against them
    ("graph_opt.passes.simplify", "Simplify.run"),
    ("graph_opt.passes.quantize.plan", "make_plan"),
    ("graph_opt.passes.quantize.calibration", "calibrate"),
    ("graph_opt.passes.quantize.sensitivity", "measure"),
    ("graph_opt.passes.quantize.weights", "attach_hessians"),   # GPTQ's input second moments
    ("graph_opt.passes.quantize.search", "search_ranges"),      # calibration=output
    ("graph_opt.passes.quantize.plan", "_admit"),               # the end-to-end admission check
    ("graph_opt.passes._smooth", "smooth"),
    ("graph_opt.passes.quantize", "Quantize._gate"),
    ("graph_opt.passes.quantize.emit", "apply_plan"),
    ("graph_opt.pipeline", "Pipeline._measure_latency"),
    ("graph_opt.stats", "model_stats"),
    ("graph_opt.model_io", "check_model"),
    ("graph_opt.model_io", "save_model"),
]
# modules that bound a phase function by name at import: (module, name, phase module)
REBOUND = [
    ("graph_opt.pipeline", "model_stats", "graph_opt.stats"),
    ("graph_opt.pipeline", "check_model", "graph_opt.model_io"),
    ("graph_opt.passes.simplify", "check_model", "graph_opt.model_io"),
    ("graph_opt.passes.quantize", "make_plan", "graph_opt.passes.quantize.plan"),
    ("graph_opt.passes.quantize.plan", "attach_hessians", "graph_opt.passes.quantize.weights"),
    ("graph_opt.passes.quantize", "smooth", "graph_opt.passes._smooth"),
]

seconds: collections.Counter[str] = collections.Counter()
_depth = [0]


def _timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.process_time()
        _depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth[0] -= 1
            seconds[label + ("" if _depth[0] == 0 else " (nested)")] += time.process_time() - start
    return wrapper


def instrument() -> None:
    for module, attr in PHASES:
        owner = importlib.import_module(module)
        *outer, name = attr.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, name, _timed(f"{module.rsplit('.', 1)[-1]}.{attr}", getattr(owner, name)))
    for module, name, source in REBOUND:
        setattr(importlib.import_module(module), name, getattr(importlib.import_module(source), name))


def main(argv: list[str]) -> int:
    start = time.process_time()
    from graph_opt import cli
    from graph_opt.registry import catalog

    catalog()  # the CLI imports every pass to parse --pass
    imports = time.process_time() - start
    instrument()
    code = cli.main(argv)
    total = time.process_time()
    print(f"\nCPU seconds: imports {imports:.2f}", file=sys.stderr)
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label} {s:.2f}", file=sys.stderr)
    print(f"  process total {total:.2f}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
