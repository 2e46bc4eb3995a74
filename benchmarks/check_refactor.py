"""Fingerprints of graph-opt's outputs, to show a refactor left its behaviour byte-identical.

Two sections:
- quantize: a fixed list of quantize configurations (defaults; int4/uint8/ternary/binary weights;
  percentile/entropy/mse calibration; weight-only sensitive layers; an SNR floor; GPTQ rounding; a
  named target) on the built-in example with its calibration data and on a few models of
  ``tests/builders.py`` with seeded random data: the sha256 of the output model's
  ``SerializeToString()``, the plan JSON the report carries and that JSON's sha256.
- pipelines: recipes through the whole pipeline (simplify first, verification against the
  original, rollback) on the built-in example (the default recipe and every pass of the catalog but
  distill, which needs torch) and on the zoo and corpus models found in the benchmark cache
  (``GRAPH_OPT_ZOO``; absent models are listed, not built): the final model's sha256, and per step
  whether it was accepted, why not, what it rewrote and skipped, and its parity.

    python benchmarks/check_refactor.py                  # write results/check_refactor.json
    python benchmarks/check_refactor.py --check FILE     # compare with a saved run; exit 1 on a difference

Run it before and after a refactor on the same machine: every fingerprint must match (plans, parities
and `target=host` choices depend on the CPU, so a saved file from another machine differs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import builders  # noqa: E402
from graph_opt.passes.quantize import Quantize  # noqa: E402

from graph_opt import api  # noqa: E402
from graph_opt.data import random_dataset  # noqa: E402
from graph_opt.example import example_calibration, example_model  # noqa: E402
from graph_opt.model_io import load_model  # noqa: E402
from graph_opt.pass_base import PassContext  # noqa: E402

CONFIGS: dict[str, dict] = {
    "defaults": {},
    "weights=int4": {"weights": "int4"},
    "weights=uint8": {"weights": "uint8"},
    "weights=ternary": {"weights": "ternary"},
    "weights=binary": {"weights": "binary"},
    "calibration=percentile": {"calibration": "percentile"},
    "calibration=entropy": {"calibration": "entropy"},
    "calibration=mse": {"calibration": "mse"},
    "sensitive=weight_only": {"sensitive": "weight_only", "sensitivity_snr_db": 40.0},
    "min_snr_db=30": {"min_snr_db": 30.0},
    "min_snr_db=45": {"min_snr_db": 45.0},
    "rounding=gptq": {"rounding": "gptq"},
    "target=x86-avx2": {"target": "x86-avx2"},
    "activations=none": {"activations": "none"},
}
# Builder models, each with seeded random calibration data (and the shapes of dynamic inputs).
BUILT = {
    "small_cnn": (builders.small_cnn, None),
    "residual": (builders.residual_model, None),
    "concat": (builders.concat_model, None),
    "ffn": (builders.ffn_model, {"x": (1, 6, 8)}),
    "conv_bn_gemm": (builders.conv_bn_gemm_model, None),
}


# Recipes through the whole pipeline. The example gets the default recipe and every pass alone.
EXAMPLE_RECIPES = {
    "default": None,
    "fold_batchnorm": ["fold_batchnorm"],
    "cleanup": ["cleanup"],
    "prune_weights": ["prune_weights:sparsity=0.5"],
    "prune_channels": ["prune_channels:ratio=0.3"],
    "factorize_gemm": ["factorize_gemm:rank_ratio=0.5,latency_gate=false"],
    "factorize_conv": ["factorize_conv:rank_ratio=0.5,latency_gate=false"],
    "quantize": ["quantize"],
    "prune+factorize+quantize": ["prune_channels:ratio=0.3", "factorize_conv:rank_ratio=0.5,latency_gate=false", "quantize"],
    "prune+factorize+reconstruct": ["prune_channels:ratio=0.3", "factorize_conv:rank_ratio=0.5,latency_gate=false", "reconstruct"],
}
ZOO_RECIPES = {
    "default": None,
    "prune_channels": ["prune_channels:ratio=0.3"],
    "factorize": ["factorize_gemm:rank_ratio=0.5,latency_gate=false", "factorize_conv:rank_ratio=0.5,latency_gate=false"],
    "quantize": ["quantize"],
    "prune+factorize+reconstruct": ["prune_channels:ratio=0.3", "factorize_gemm:rank_ratio=0.5,latency_gate=false",
                                    "factorize_conv:rank_ratio=0.5,latency_gate=false", "reconstruct"],
}
ZOO_MODELS = ("resnet", "minilm", "orinet", "ppocr_cls", "magika")


def _cases():
    yield "example", example_model(), example_calibration(), list(CONFIGS)
    for name, (build, shapes) in BUILT.items():
        model = build()
        yield name, model, random_dataset(model, 32, shapes=shapes, seed=0), list(CONFIGS)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model_name, model, data, configs in _cases():
        for cfg in configs:
            result = Quantize(**CONFIGS[cfg])(model, PassContext(data=data))
            plans = [n[len("plan: "):] for n in result.report.notes if n.startswith("plan: ")]
            out[f"{model_name} {cfg}"] = {
                "model_sha256": _sha(result.model.SerializeToString()),
                "plan_sha256": _sha("\n".join(plans).encode()),
                "plan": plans,
            }
            print(f"{model_name:14s} {cfg:24s} {out[f'{model_name} {cfg}']['model_sha256'][:16]}", flush=True)
    return out


def _pipeline_print(result) -> dict:
    steps = []
    for step in result.steps:
        report = step.report.to_dict() if step.report else {}
        steps.append({"name": step.name, "modified": step.modified, "accepted": step.accepted, "reason": step.reason,
                      "rewritten": report.get("rewritten"), "skipped": report.get("skipped"),
                      "parity": _parity(step.parity)})
    return {"model_sha256": _sha(result.model.SerializeToString()), "steps_sha256": _steps_sha(steps), "steps": steps}


def _parity(parity) -> dict | None:
    """A step's parity without the data's path (the same file from another checkout)."""
    return None if parity is None else {k: v for k, v in parity.to_dict().items() if k != "data"}


def _steps_sha(steps: list[dict]) -> str:
    return _sha(json.dumps(steps, sort_keys=True).encode())


def _zoo_cases():
    sys.path.insert(0, str(HERE))
    import zoo

    for name in ZOO_MODELS:
        if not (zoo.cache_dir() / f"{name}.json").is_file():  # never built here: building is the zoo's job
            print(f"{name}: not in the cache, left out", flush=True)
            continue
        m = zoo.get(name)
        yield name, load_model(m.path), m.calib.take(16), m.shapes


def pipelines() -> dict[str, dict]:
    out: dict[str, dict] = {}
    cases = [("example", example_model(), example_calibration(), None, EXAMPLE_RECIPES)]
    cases += [(n, model, data, shapes, ZOO_RECIPES) for n, model, data, shapes in _zoo_cases()]
    for name, model, data, shapes, recipes in cases:
        for recipe, passes in recipes.items():
            result = api.optimize(model, passes, data=data, shapes=shapes, latency=False)
            key = f"pipeline {name} {recipe}"
            out[key] = _pipeline_print(result)
            print(f"{name:14s} {recipe:28s} {out[key]['model_sha256'][:16]} {out[key]['steps_sha256'][:16]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(HERE / "results" / "check_refactor.json"))
    ap.add_argument("--check", help="a saved run to compare with (nothing is written)")
    ap.add_argument("--only", choices=("quantize", "pipelines"), help="one section only")
    args = ap.parse_args()
    got = {}
    if args.only != "pipelines":
        got.update(fingerprint())
    if args.only != "quantize":
        got.update(pipelines())
    if args.check:
        want = json.loads(Path(args.check).read_text())
        keys = ("model_sha256", "plan_sha256", "steps_sha256")
        bad = [k for k in sorted(got) if {f: want.get(k, {}).get(f) for f in keys} != {f: got[k].get(f) for f in keys}]
        missing = sorted(set(want) - set(got))
        if missing:
            print(f"not run here: {len(missing)} saved cases (another section, or models absent from the cache)")
        for k in bad:
            print(f"DIFFERENT: {k}")
        print(f"{len(got) - len(bad)}/{len(got)} identical")
        return 1 if bad else 0
    Path(args.out).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({len(got)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
