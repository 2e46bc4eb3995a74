"""Fuzz campaign: every pass on N random models, outside CI.

The same generator and oracle as `tests/core/test_fuzz.py` (`tests/builders.py`: `fuzz_spec`,
`fuzz_model`, `fuzz_check`): random MLPs, CNNs (residuals, Concat, depthwise and grouped convs,
SE blocks, strides, dilations, auto_pad, pooling, per-channel affine constants, GAP or Flatten
heads) and transformer FFN blocks (LayerNorm, Gelu/erf-Gelu/SiLU), random widths and shapes,
opsets 13–21, float32, symbolic or static batch, sometimes an intermediate graph output and a
quarter of dead channels; a quarter of the models are loaded with their weights kept on disk (the
code path of models over 2 GB). Each pass runs through the Pipeline (onnx.checker full check +
onnxruntime load after every pass); the oracle also demands exactness at lossless settings
(fold_batchnorm, cleanup, prune_channels of dead channels, full-rank factorization), quantized
weights within half a step of their grid, and reconstruct never increasing the calibration error.

Case i uses seed `--seed + i`; a failure prints its seed and spec, and `--replay SEED` reruns one
case with its full report. The CI test draws its specs through hypothesis from the same generator.

    python benchmarks/fuzz_campaign.py                    # 10 000 cases, all settings
    python benchmarks/fuzz_campaign.py --cases 1000 --jobs 2
    python benchmarks/fuzz_campaign.py --replay 1234
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("GRAPH_OPT_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import builders  # noqa: E402  (tests/builders.py: the generator and the oracle)


def _runs(extra: bool) -> dict:
    return {**builders.FUZZ_RUNS, **(builders.FUZZ_RUNS_EXTRA if extra else {})}


def _case(args: tuple[int, bool]) -> dict:
    seed, extra = args
    start = time.perf_counter()
    spec = builders.fuzz_spec(seed)
    try:
        outcome = builders.fuzz_check(spec, _runs(extra))
        problems, fired, exact = outcome.problems, outcome.fired, outcome.exact
    except Exception as exc:  # noqa: BLE001 - the generator itself failing is a finding too
        problems, fired, exact = [f"generator/oracle crashed: {type(exc).__name__}: {exc}"], {}, {}
    return {"seed": seed, "spec": str(spec), "kind": spec.kind, "opset": spec.opset, "on_disk": spec.on_disk,
            "problems": problems,
            "fired": fired, "exact": exact, "seconds": time.perf_counter() - start}


def _quiet() -> None:
    import logging

    logging.getLogger("graph_opt").setLevel(logging.ERROR)  # rollbacks are counted, not logged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="case i uses seed SEED + i")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--no-extra", action="store_true", help="only the settings the CI test runs")
    parser.add_argument("--replay", type=int, metavar="SEED", help="rerun one case and print its spec and problems")
    parser.add_argument("--json", metavar="FILE", help="write every failing case and the summary there")
    args = parser.parse_args(argv)
    extra = not args.no_extra
    _quiet()
    if args.replay is not None:
        result = _case((args.replay, extra))
        print(result["spec"])
        print("fired:", ", ".join(k for k, v in result["fired"].items() if v) or "nothing")
        print("\n".join(result["problems"]) or "no problems")
        return 1 if result["problems"] else 0

    seeds = range(args.seed, args.seed + args.cases)
    start = time.perf_counter()
    kinds: collections.Counter = collections.Counter()
    opsets: collections.Counter = collections.Counter()
    on_disk = 0
    fired: collections.Counter = collections.Counter()
    exact: collections.Counter = collections.Counter()
    failures: list[dict] = []
    done = 0
    work = ((s, extra) for s in seeds)
    with ProcessPoolExecutor(args.jobs, initializer=_quiet) if args.jobs > 1 else _Inline() as pool:
        for result in pool.map(_case, work, chunksize=4):
            done += 1
            kinds[result["kind"]] += 1
            opsets[result["opset"]] += 1
            on_disk += result["on_disk"]
            fired.update(k for k, v in result["fired"].items() if v)
            exact.update(k for k, v in result["exact"].items() if v)
            if result["problems"]:
                failures.append(result)
                print(f"FAIL seed {result['seed']}: {result['problems'][0]}\n    {result['spec']}", flush=True)
            if done % 500 == 0:
                print(f"... {done} cases, {len(failures)} failing, {time.perf_counter() - start:.0f} s", flush=True)
    elapsed = time.perf_counter() - start
    runs = _runs(extra)
    print(f"\n{done} cases in {elapsed:.0f} s ({elapsed / max(done, 1):.2f} s per case, {args.jobs} jobs); "
          f"seeds {args.seed}..{args.seed + args.cases - 1}")
    print("models: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
          + "; opsets: " + ", ".join(f"{k}: {v}" for k, v in sorted(opsets.items()))
          + f"; weights kept on disk: {on_disk}")
    print(f"pass runs: {done * len(runs)} ({len(runs)} settings per case); cases where the setting rewrote "
          "something (accepted), and of those, held to exactness:")
    for name, (specs, is_exact) in runs.items():
        held = f"{exact[name]:6d}" if is_exact else "     -"
        print(f"  {name:42s} {fired[name]:6d} {held}  {'exact' if is_exact else 'lossy'}: {' → '.join(specs)}")
    print(f"failures: {len(failures)} cases" + (" (seeds: " + ", ".join(str(f["seed"]) for f in failures[:50]) + ")"
                                                if failures else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": done, "seconds": elapsed, "kinds": kinds, "opsets": opsets,
                                               "on_disk": on_disk,
                                               "fired": fired, "exact": exact, "failures": failures},
                                              indent=2, default=str))
    return 1 if failures else 0


class _Inline:
    """The executor interface, in this process (--jobs 1: tracebacks and profilers stay simple)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, iterable, chunksize=1):
        return map(fn, iterable)


if __name__ == "__main__":
    sys.exit(main())
