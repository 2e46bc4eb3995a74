"""Opsets onnxruntime does not run: convert with onnx's version converter, and prove the conversion.

onnxruntime's CPU kernels start at opset 7, and some old op versions have no kernel any more. Such
a model is converted to `TARGET_OPSET` (or kept at its own when higher) by `onnx.version_converter`;
the conversion is accepted only when the converted model passes the full checker, onnxruntime
loads it, and on seeded random inputs its outputs under onnxruntime agree with onnx's reference
evaluator on the *original* within `RTOL` (relative to each output's largest magnitude). Anything
else is refused with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from graph_opt.errors import DataError, InvalidModelError
from graph_opt.onnx_util import first_line, opset_version

log = logging.getLogger(__name__)

MIN_RUNTIME_OPSET = 7
TARGET_OPSET = 13
RTOL = 1e-5


class RuntimeOpsetError(InvalidModelError):
    """onnxruntime cannot run the model and the opset conversion does not convert or does not verify."""


def _load_problem(model: onnx.ModelProto) -> str:
    from graph_opt.runtime import make_session

    try:
        make_session(model)
    except InvalidModelError as exc:
        return str(exc)
    return ""


def upgrade_for_runtime(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None,
                        seed: int = 0) -> tuple[onnx.ModelProto, str]:
    """(model, "") when onnxruntime runs it; (converted model, what was done) when the conversion
    verifies; RuntimeOpsetError with the reason otherwise."""
    version = opset_version(model)
    problem = "" if version >= MIN_RUNTIME_OPSET and not _load_problem(model) else (
        f"opset {version} is below onnxruntime's {MIN_RUNTIME_OPSET}" if version < MIN_RUNTIME_OPSET else _load_problem(model))
    if not problem:
        return model, ""
    target = max(TARGET_OPSET, version)
    if target == version:
        raise RuntimeOpsetError(f"onnxruntime cannot run it ({problem}) and it is already at opset {version}")
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # the converter raises bare RuntimeErrors for unsupported adapters
        raise RuntimeOpsetError(f"{problem}; onnx's version converter cannot convert opset {version} to {target}: "
                                f"{first_line(exc)}") from None
    still = _load_problem(converted)
    if still:
        raise RuntimeOpsetError(f"{problem}; converted to opset {target}, onnxruntime still refuses it: {still}")
    mismatch = _verify_conversion(model, converted, shapes, seed)
    if mismatch:
        raise RuntimeOpsetError(f"{problem}; the conversion to opset {target} does not verify: {mismatch}")
    note = f"opset {version} upgraded to {target} by onnx's version converter (verified against onnx's reference evaluator)"
    log.info(note)
    return converted, note


def _verify_conversion(original: onnx.ModelProto, converted: onnx.ModelProto,
                       shapes: Mapping[str, tuple[int, ...]] | None, seed: int) -> str:
    from onnx.reference import ReferenceEvaluator

    from graph_opt.data import random_dataset
    from graph_opt.runtime import make_session

    try:
        feed = random_dataset(converted, 2, shapes=dict(shapes or {}), seed=seed).sample(0)
    except DataError as exc:
        return f"no inputs to check it on ({exc})"
    try:
        expected = ReferenceEvaluator(original).run(None, feed)
    except Exception as exc:
        return f"onnx's reference evaluator cannot run the original ({first_line(exc)})"
    got = make_session(converted).run(None, feed)
    for out, e, g in zip(converted.graph.output, expected, got):
        e, g = np.asarray(e, np.float64), np.asarray(g, np.float64)
        if e.shape != g.shape:
            return f"output {out.name!r} has shape {g.shape}, the original {e.shape}"
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        err = float(np.max(np.abs(e - g))) if e.size else 0.0
        if err > RTOL * max(scale, 1e-30):
            return f"output {out.name!r} differs by {err:.3g} (largest magnitude {scale:.3g})"
    return ""


def runnable_original(original: onnx.ModelProto, first_pass, shapes: Mapping[str, tuple[int, ...]] | None = None
                      ) -> tuple[onnx.ModelProto, str]:
    """The pipeline's reference when onnxruntime refuses the input: its verified opset upgrade, when
    the pipeline starts with a pass that upgrades opsets (`simplify`); (original, "") otherwise."""
    if first_pass is None or not getattr(first_pass, "upgrade_opset", False):
        return original, ""
    return upgrade_for_runtime(original, shapes)
