"""`graph-opt optimize` and `graph-opt inspect` over onnx's bundled conformance corpus.

Every model of the onnx wheel's backend test data (``onnx/backend/test/data/{pytorch-converted,
pytorch-operator,simple,light,real}``; a case without a model file, as in ``real``, is skipped)
goes through the CLI, each command in its own subprocess with a timeout: ``optimize`` with the
default recipe (seeded random inputs, latency measured) and ``inspect``. Each run is tallied as
exit 0, exit 1 (verification failed), exit 2 (refused, with its one-line reason, grouped), a
traceback (a bug of graph-opt), a timeout or another exit code (a crash).

    python benchmarks/conformance.py [--out results/conformance.json] [--timeout 300]
        [--graph-opt "python -m graph_opt"] [--only SUBSTRING]...
    python benchmarks/conformance.py --render results/conformance.json

``--graph-opt`` runs another installation (a checkout of an older commit in its own venv) for a
before/after tally; the printed summary is what benchmarks/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITES = ("pytorch-converted", "pytorch-operator", "simple", "light", "real")


def corpus() -> list[tuple[str, Path]]:
    """(suite/case, model path) for every model file of the bundled corpus, in a stable order."""
    import onnx

    root = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"
    found = []
    for suite in SUITES:
        base = root / suite
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_dir() and (entry / "model.onnx").is_file():
                found.append((f"{suite}/{entry.name}", entry / "model.onnx"))
            elif entry.suffix == ".onnx" and entry.is_file():
                found.append((f"{suite}/{entry.stem}", entry))
    return found


def reason_key(line: str) -> str:
    """A refusal's line with names and numbers blanked, so the same reason groups together."""
    line = re.sub(r"'[^']*'", "'…'", line)
    line = re.sub(r"\[[^\]]*\]", "[…]", line)
    line = re.sub(r"\b\d+(\.\d+)?\b", "N", line)
    return line[:160]


def run(cmd: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "GRAPH_OPT_PROGRESS": "0", "OPENBLAS_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout", "seconds": timeout}
    seconds = round(time.perf_counter() - start, 2)
    err = proc.stderr.strip()
    lines = [l for l in err.splitlines() if l.strip()]
    if "Traceback (most recent call last)" in err:  # the exception's own line, not its continuation
        raised = [l for l in lines if re.match(r"[A-Za-z_][\w.]*(: |$)", l)] or lines
        return {"outcome": "traceback", "seconds": seconds, "reason": raised[-1][:300] if raised else ""}
    if proc.returncode in (0, 1, 2):
        out = {"outcome": f"exit {proc.returncode}", "seconds": seconds}
        if proc.returncode:
            errors = [l for l in lines if "error:" in l or "failed" in l] or lines
            out["reason"] = errors[-1][:300] if errors else ""
        return out
    return {"outcome": f"exit {proc.returncode}", "seconds": seconds, "reason": lines[-1][:300] if lines else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "conformance.json"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--graph-opt", default=f"{shlex.quote(sys.executable)} -m graph_opt",
                    help="the command that runs graph-opt (default: this interpreter's)")
    ap.add_argument("--only", action="append", default=[], help="only cases whose name contains this")
    ap.add_argument("--render", metavar="JSON", help="print the summary of a saved result file and exit")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    tool = shlex.split(args.graph_opt)
    cases = [(n, p) for n, p in corpus() if not args.only or any(s in n for s in args.only)]
    results = []
    with tempfile.TemporaryDirectory(prefix="graph-opt-conformance.") as tmp:
        for i, (name, path) in enumerate(cases):
            out = Path(tmp) / "out.onnx"
            opt = run([*tool, "optimize", str(path), "-o", str(out), "--latency-runs", "5"], args.timeout)
            ins = run([*tool, "inspect", str(path), "--runs", "5"], args.timeout)
            for f in Path(tmp).iterdir():
                f.unlink()
            results.append({"case": name, "optimize": opt, "inspect": ins})
            print(f"[{i + 1}/{len(cases)}] {name}: optimize {opt['outcome']}, inspect {ins['outcome']}", file=sys.stderr)
    summary = {cmd: summarize([r[cmd] for r in results]) for cmd in ("optimize", "inspect")}
    import onnx

    doc = {"graph_opt": args.graph_opt, "onnx_corpus": onnx.__version__, "models": len(cases), "summary": summary,
           "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(render(doc))


def summarize(runs: list[dict]) -> dict:
    tally = collections.Counter(r["outcome"] for r in runs)
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in runs:
        if r["outcome"] != "exit 0":
            reasons[r["outcome"]][reason_key(r.get("reason", ""))] += 1
    return {"tally": dict(sorted(tally.items())),
            "reasons": {k: dict(v.most_common()) for k, v in sorted(reasons.items())}}


def render(doc: dict) -> str:
    lines = [f"{doc['models']} models, graph-opt: {doc['graph_opt']}"]
    for cmd, s in doc["summary"].items():
        lines.append(f"\n{cmd}: " + ", ".join(f"{k}: {v}" for k, v in s["tally"].items()))
        for outcome, reasons in s["reasons"].items():
            for reason, count in reasons.items():
                lines.append(f"  {outcome} x{count}: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
