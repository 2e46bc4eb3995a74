"""graph-opt: compress exported ONNX models by graph rewrites and prove parity under onnxruntime."""

from graph_opt.api import compare, compare_models, inspect, optimize, verify
from graph_opt.errors import GraphOptError
from graph_opt.model_io import load_model, save_model
from graph_opt.pass_base import Pass, PassContext, PassReport, PassResult

__version__ = "0.1.0"

__all__ = [
    "GraphOptError", "Pass", "PassContext", "PassReport", "PassResult", "compare", "compare_models", "inspect", "load_model",
    "optimize",
    "save_model", "verify",
]
