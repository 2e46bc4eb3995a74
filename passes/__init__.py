"""The passes of graph-opt, one module each; `PASSES` is the registry, one explicit list."""

from graph_opt.passes.cleanup import Cleanup
from graph_opt.passes.distill import Distill
from graph_opt.passes.equalize import Equalize
from graph_opt.passes.factorize_conv import FactorizeConv
from graph_opt.passes.factorize_gemm import FactorizeGemm
from graph_opt.passes.fold_batchnorm import FoldBatchnorm
from graph_opt.passes.prune_channels import PruneChannels
from graph_opt.passes.prune_weights import PruneWeights
from graph_opt.passes.quantize import Quantize
from graph_opt.passes.reconstruct import Reconstruct
from graph_opt.passes.simplify import Simplify
from graph_opt.passes.smooth import Smooth

PASSES = (
    Simplify,
    FoldBatchnorm,
    Cleanup,
    Equalize,
    PruneWeights,
    PruneChannels,
    FactorizeGemm,
    FactorizeConv,
    Smooth,
    Quantize,
    Reconstruct,
    Distill,
)

__all__ = ["PASSES", "Cleanup", "Distill", "Equalize", "FactorizeConv", "FactorizeGemm", "FoldBatchnorm", "PruneChannels",
           "PruneWeights", "Quantize", "Reconstruct", "Simplify", "Smooth"]
