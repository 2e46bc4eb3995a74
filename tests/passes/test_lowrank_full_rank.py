"""Exact at full rank, on every test model, for every method that can be exact.

CP is left out: no CP rank is guaranteed to reproduce a generic kernel (the CP rank of a 4-D
tensor can exceed every dimension and ALS may stall), so CP is tested on kernels of known CP rank
in test_factorize_conv.py instead.
"""

import numpy as np
import pytest
from builders import (assert_valid, concat_model, depthwise_model, ffn_model, flatten_model, random_input,
                      residual_model, run, se_model, small_cnn, split_model)

from graph_opt import example
from graph_opt.data import input_specs
from graph_opt.passes import FactorizeConv, FactorizeGemm

MODELS = {
    "small_cnn": small_cnn, "residual": residual_model, "concat": concat_model, "depthwise": depthwise_model,
    "se": se_model, "flatten": flatten_model, "ffn": ffn_model, "split": split_model,
    "example": example.example_model,
}
FULL = dict(rank_ratio=1.0, align=0, latency_gate=False, require_saving=False)


def _feeds(model):
    feeds = {}
    for spec in input_specs(model):
        shape = [d if isinstance(d, int) else (2 if i == 0 else 5) for i, d in enumerate(spec.shape)]
        feeds[spec.name] = random_input(shape)
    return feeds


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("make", [lambda: FactorizeGemm(**FULL), lambda: FactorizeConv(method="tucker2", **FULL),
                                  lambda: FactorizeConv(method="spatial_svd", **FULL)],
                         ids=["svd", "tucker2", "spatial_svd"])
def test_full_rank_is_exact(name, make):
    model = MODELS[name]()
    result = make()(model)
    feeds = _feeds(model)
    ref, out = run(model, feeds), run(result.model, feeds)
    if result.modified:
        assert_valid(result.model)
    else:  # nothing eligible: every candidate was skipped with a reason, or there is no candidate
        assert result.report.skipped or not any(n.op_type == "Conv" for n in model.graph.node)
    for a, b in zip(ref, out):
        assert np.linalg.norm(a - b) <= 1e-4 * max(np.linalg.norm(a), 1e-12)


def test_full_rank_rewrites_every_eligible_layer_of_the_example():
    model = example.example_model()
    tucker = FactorizeConv(method="tucker2", **FULL)(model)
    svd = FactorizeGemm(**FULL)(model)
    assert len(tucker.report.rewritten) == 4  # the 3x3 convs but the depthwise one and the 1-channel stem
    assert len(svd.report.rewritten) == 3  # the 1x1 pointwise conv and both Gemms
