"""Fingerprints of the quantize pass's output, to show a refactor left its behaviour byte-identical.

Runs a fixed list of quantize configurations (defaults; int4/uint8/ternary/binary weights;
percentile/entropy/mse calibration; weight-only sensitive layers; an SNR floor; GPTQ rounding; a
named target) on the built-in example with its calibration data and on a few models of
``tests/builders.py`` with seeded random data, and records per case the sha256 of the output
model's ``SerializeToString()``, the plan JSON the report carries and that JSON's sha256.

    python benchmarks/check_refactor.py                  # write results/check_refactor.json
    python benchmarks/check_refactor.py --check FILE     # compare with a saved run; exit 1 on a difference

Needs only the test extra (no torch). Run it before and after a refactor: every hash must match.
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

from graph_opt.data import random_dataset  # noqa: E402
from graph_opt.example import example_calibration, example_model  # noqa: E402
from graph_opt.pass_base import PassContext  # noqa: E402
from graph_opt.passes.quantize import Quantize  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(HERE / "results" / "check_refactor.json"))
    ap.add_argument("--check", help="a saved run to compare with (nothing is written)")
    args = ap.parse_args()
    got = fingerprint()
    if args.check:
        want = json.loads(Path(args.check).read_text())
        bad = [k for k in sorted(set(want) | set(got))
               if {f: want.get(k, {}).get(f) for f in ("model_sha256", "plan_sha256")}
               != {f: got.get(k, {}).get(f) for f in ("model_sha256", "plan_sha256")}]
        for k in bad:
            print(f"DIFFERENT: {k}")
        print(f"{len(got) - len(bad)}/{len(got)} identical")
        return 1 if bad else 0
    Path(args.out).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({len(got)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
