"""prune_weights: zero the smallest-magnitude weights of Conv / Gemm / MatMul (unstructured or N:M).

Before:  x → Conv(W) → …           After:  x → Conv(W ⊙ M) → …      (M ∈ {0, 1}, same shapes)

The mask keeps the largest |w| (the magnitude heuristic behind the sparsity-regularized
objective ``min_w L(w) + λ‖w‖₁``):

- ``scope=layer``: every selected weight loses ``round(sparsity · size)`` of its smallest |w|;
- ``scope=global``: one ranking over all selected weights together, ``round(sparsity · Σ size)``
  zeros in total, so layers with small weights lose more of them;
- ``pattern=N:M`` (e.g. ``2:4``): in every run of M consecutive weights along the reduction axis
  (Conv: input channels, axis 1; Gemm: K; MatMul: the weight's contraction axis), keep the N of
  largest |w|; sparsity is then 1 − N/M and ``sparsity``/``scope`` are not used.

Weights that are already zero count toward the target. The report gives the sparsity reached per
layer and, for the whole model, the gzip-compressed size before and after (and zstd when the
Python build provides it; no extra dependency is added for it).

**No speed-up.** onnxruntime's CPU kernels run dense: unstructured zeros (and N:M sparsity, which
only some GPUs accelerate) cost exactly as much as any other weight. What pruning buys here is
compressibility (a zero-heavy file gzips much smaller) and a starting point for sparse runtimes;
for a faster model on onnxruntime use `prune_channels` (mode=remove) or low-rank factorization.

Lossy, with no fixed bound: each output changes by the dropped terms Σ w·x over the zeroed w.
``sparsity=0`` changes nothing (and reports nothing).

Layers: op type in `op_types`, node name matching `include` (fnmatch, all when empty) and not
`exclude`; with `keep_first_last` the first layers (fed by a graph input) and the last layers
(feeding a graph output) stay dense. Skipped, with the reason: a weight computed at run time, not
float, or shared with another node (tied weights); a MatMul of two runtime tensors or of two
constants; an N:M pattern whose M does not divide the reduction axis; the first/last layer; an
If/Loop/Scan whose subgraphs hold layers (subgraphs are not rewritten).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.kernels.importance import global_magnitude_masks, magnitude_mask, nm_mask
from graph_opt.external_data import needs_external_data, on_disk, read_raw, weightless_copy
from graph_opt.gs_convert import to_graph, to_model
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.onnx_util import Namer
from graph_opt.passes._graph import constant, node_label, report_subgraphs, used_once
from graph_opt.passes._graph import LAYER_OPS, check_op_types
from graph_opt.passes._groups import boundary_layers, selected

log = logging.getLogger(__name__)


def parse_pattern(text: str) -> tuple[int, int] | None:
    """'2:4' → (2, 4); '' → None; anything else raises ValueError."""
    if not text:
        return None
    n, sep, m = text.partition(":")
    try:
        nm = (int(n), int(m))
    except ValueError:
        raise ValueError(f"pattern must read N:M such as 2:4, got {text!r}") from None
    if not sep or not (0 < nm[0] < nm[1]):
        raise ValueError(f"pattern must read N:M with 0 < N < M, got {text!r}")
    return nm


def compressed_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Serialized bytes, gzip bytes, and zstd bytes when a zstd module ships with this Python.

    Over 2 GB (protobuf cannot serialize it) the model is measured as its file would be saved: the
    graph without the weights, then each weight's bytes streamed through one gzip stream; zstd is
    left out there."""
    if needs_external_data(model):
        return _streamed_sizes(model)
    raw = model.SerializeToString()
    out = {"bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, compresslevel=6, mtime=0))}
    zstd = _zstd()
    if zstd is not None:
        out["zstd_bytes"] = len(zstd(raw))
    return out


def _streamed_sizes(model: onnx.ModelProto) -> dict[str, int]:
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip format, as gzip.compress writes
    shell = weightless_copy(model).SerializeToString()
    total, packed = len(shell), len(gz.compress(shell))
    for tensor in model.graph.initializer:
        raw = read_raw(tensor) if on_disk(tensor) else tensor.raw_data
        if len(raw) >= 1024:  # the ones weightless_copy left out (the rest are inside the shell)
            total += len(raw)
            packed += len(gz.compress(raw))
    packed += len(gz.flush())
    return {"bytes": total, "gzip_bytes": packed}


def _zstd():
    try:  # Python 3.14+
        from compression import zstd  # type: ignore[import-not-found]

        return zstd.compress
    except ImportError:
        pass
    try:  # only if the user already has it installed; never a dependency of graph-opt
        import zstandard  # type: ignore[import-not-found]

        return zstandard.ZstdCompressor().compress
    except ImportError:
        return None


@dataclass(frozen=True, kw_only=True)
class PruneWeights(Pass):
    """Zero the smallest weights (per layer, global or N:M); smaller when compressed, not faster."""

    name: ClassVar[str] = "prune_weights"

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    pattern: str = ""
    op_types: tuple[str, ...] = LAYER_OPS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True

    def __post_init__(self) -> None:
        check_op_types(self)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        parse_pattern(self.pattern)

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        nm = parse_pattern(self.pattern)
        if nm is None and self.sparsity == 0.0:
            return model
        graph = to_graph(model)
        report_subgraphs(graph, report, self.op_types)
        first, last = boundary_layers(graph) if self.keep_first_last else (set(), set())
        layers = []
        for node in graph.nodes:
            if not selected(node, self.op_types, self.include, self.exclude):
                continue
            match = _match(node)
            if isinstance(match, str):
                report.skip(node_label(node), match)
                continue
            if id(node) in first or id(node) in last:
                which = "first" if id(node) in first else "last"
                report.skip(node_label(node), f"{which} layer kept dense (keep_first_last)")
                continue
            index, _, axis = match  # the weight is read again below: one layer's weight in memory at a time
            layers.append((node, index, axis))
        if not layers:
            return model
        if self.scope == "global" and nm is None:  # one threshold over every weight: all of them at once
            global_masks = global_magnitude_masks([constant(n.inputs[i]) for n, i, _ in layers], self.sparsity)
        namer = Namer(graph)
        zeros = size = 0
        for k, (node, index, axis) in enumerate(layers):
            w = constant(node.inputs[index])
            if nm is not None:
                try:
                    mask = nm_mask(w, nm[0], nm[1], axis)
                except ValueError:
                    report.skip(node_label(node), f"{self.pattern} needs the reduction axis ({w.shape[axis]}) "
                                                  f"to be a multiple of {nm[1]}")
                    continue
            elif self.scope == "global":
                mask = global_masks[k]
            else:
                mask = magnitude_mask(w, self.sparsity)
            pruned = np.where(mask, w, np.zeros((), w.dtype))
            before, after = int(np.count_nonzero(w == 0)), int(np.count_nonzero(pruned == 0))
            zeros, size = zeros + after, size + w.size
            if after == before:
                continue  # already at least this sparse
            tensor = node.inputs[index]
            node.inputs[index] = gs.Constant(namer(f"{tensor.name}_pruned"), pruned)
            report.rewrite(node_label(node), weight=tensor.name, size=int(w.size), sparsity_before=before / w.size,
                           sparsity=after / w.size, pattern=self.pattern or None)
        if not report.rewritten:
            return model
        graph.cleanup()
        out = to_model(graph, model)
        s0, s1 = compressed_sizes(model), compressed_sizes(out)
        report.note(f"sparsity of the pruned layers: {zeros / size:.4f} ({zeros} of {size} weights are zero)")
        text = f"model bytes {s0['bytes']} → {s1['bytes']}; gzip {s0['gzip_bytes']} → {s1['gzip_bytes']}"
        if "zstd_bytes" in s1:
            text += f"; zstd {s0['zstd_bytes']} → {s1['zstd_bytes']}"
        report.note(text)
        report.note("onnxruntime runs these zeros at full cost: no speed-up from unstructured or N:M sparsity on CPU; "
                    "the gain is compressibility (use prune_channels mode=remove for a smaller, faster model)")
        return out


def _match(node: gs.Node) -> tuple[int, np.ndarray, int] | str:
    """(weight input index, weight, reduction axis) or the reason the layer is skipped."""
    index = 1
    if node.op == "MatMul":
        c0, c1 = constant(node.inputs[0]), constant(node.inputs[1])
        if c0 is None and c1 is None:
            return "MatMul of two runtime tensors has no weight"
        if c0 is not None and c1 is not None:
            return "MatMul of two constants (fold constants first)"
        index = 1 if c1 is not None else 0
    tensor = node.inputs[index] if len(node.inputs) > index else None
    w = constant(tensor) if tensor is not None else None
    if w is None:
        return "weight is computed at run time"
    if w.dtype.kind != "f":
        return f"weight is {w.dtype}, not float"
    if not used_once(tensor):
        return f"weight {tensor.name!r} is shared with another node"
    if w.ndim < 2:
        return "weight has fewer than 2 dimensions"
    if node.op == "Conv":
        axis = 1
    elif node.op == "Gemm":
        axis = 1 if int(node.attrs.get("transB", 0)) else 0
    else:
        axis = w.ndim - 2 if index == 1 else w.ndim - 1
    return index, w, axis
