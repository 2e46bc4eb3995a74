"""GPTQ for block-wise weights (``rounding=gptq`` with int4 or ``block_size``): each layer's codes
and per-block scales solved against its real inputs, streamed so that a model of billions of
parameters fits in memory.

For every 2-D Gemm/MatMul weight with blocks, the input statistic is ``H = E[x xᵀ]`` over every
position of the layer's input (all axes but the feature axis are samples), on the float model's
activations (not chained through the layers already quantized). The codes come from
`kernels.quant.gptq_blockwise` (per-block scales computed as the feedback proceeds, lazy batch
updates, dampening, float64 Cholesky of ``H⁻¹``). The damping grows as the calibration rows get
fewer than the input features (`shrinkage`): 1% of the mean diagonal with at least 100 rows per
feature, the whole mean diagonal with fewer rows than features.

Streaming, one layer input at a time (`LayerInputs`):

1. one onnxruntime pass over the calibration data exposes every such input; each batch's rows
   are appended (float32) to one spill file per tensor in a private temporary folder (kept in
   memory when they all fit in `SPILL_BYTES`), so a batch is the most ever held of the model's
   activations;
2. per tensor, in graph order: ``H`` from the rows read back in chunks (float32 products, summed in float64);
   every layer reading the tensor is solved together (their weights stacked as rows: GPTQ rows
   are independent given ``H``, so this is exact and shares one Cholesky); ``H`` and the rows
   are dropped before the next tensor.

Peak memory beyond the model: one batch of the exposed tensors (at most `SPILL_BYTES` of rows in
memory), one ``H`` (float64, inputs²) and one tensor's stacked weights. Cost: the feedback is ``O(outputs · inputs²)`` per layer; when the
model's total ``Σ outputs·inputs²`` exceeds `FEEDBACK_BUDGET` (multiply-adds), the feedback is
windowed (``gptq_blockwise(window=)``) with the widest power-of-two multiple of the block that
fits, and a note says so. Skipped (nearest rounding, with a note): layers whose input is not float, not
finite, or wider than `MAX_INPUTS`; every layer when there is no calibration data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Self

import numpy as np
import onnx
from graph_opt.kernels.quant import QuantParams, gptq_blockwise
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes.quantize.layers import Layer

from graph_opt.data import Dataset, batch_size_for
from graph_opt.intermediates import stream
from graph_opt.onnx_util import attr

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize

log = logging.getLogger(__name__)

SPILL_BYTES = 256 * 2**20   # the exposed rows stay in memory below this, else go to disk
MAX_INPUTS = 16384          # H of a wider input (float64) would take over 2 GB
MIN_DAMP = 0.01            # GPTQ's damping with plenty of rows (the paper's 1%)
FEEDBACK_BUDGET = 6e11      # multiply-adds of GPTQ's feedback over the whole model before it is windowed
_CHUNK_ROWS = 2048


class LayerInputs:
    """The rows of some tensors over the calibration data, captured in one streaming pass and
    read back one tensor at a time (see the module docstring). Use as a context manager: the
    spill folder is removed on exit."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, requests: dict[str, int], widths: dict[str, int], *,
                 threads: int = 0) -> None:
        self.requests = requests
        self.rows: dict[str, int] = {}
        self.bad: dict[str, str] = {}
        self._mem: dict[str, list[np.ndarray]] = {}
        self._dir: tempfile.TemporaryDirectory | None = None
        self._files: dict[str, object] = {}
        held = 0
        inputs = {i.name for i in model.graph.input}
        names = sorted(t for t in requests if t not in inputs)
        batches = (stream(model, data, names, desc="gptq inputs", threads=threads) if names
                   else ((feed, {}) for feed in data.batches(batch_size_for(model))))
        try:
            for feed, values in batches:
                for t, axis in requests.items():
                    if t in self.bad:
                        continue
                    x = np.asarray(feed[t] if t in inputs else values[t])
                    if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating) or x.shape[axis] != widths[t]:
                        self.bad[t] = "its input is not a float tensor of the weight's width"
                        continue
                    r = np.ascontiguousarray(np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]), np.float32)
                    if not np.all(np.isfinite(r)):
                        self.bad[t] = "its input is not finite on the calibration data"
                        continue
                    self.rows[t] = self.rows.get(t, 0) + r.shape[0]
                    self._mem.setdefault(t, []).append(r)
                    held += r.nbytes
                if held > SPILL_BYTES:  # from here on, rows go to disk as they come
                    self._spill()
                    held = 0
        finally:
            if self._dir is not None:
                self._spill()
            for fh in self._files.values():
                fh.close()
            self._files.clear()

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="graph_opt_gptq.")
        for t, parts in self._mem.items():
            if t not in self._files:
                self._files[t] = open(self._path(t), "wb")  # noqa: SIM115 (closed after the pass)
            for r in parts:
                self._files[t].write(r.tobytes())
        self._mem.clear()

    def _path(self, t: str) -> str:
        assert self._dir is not None
        return os.path.join(self._dir.name, f"{abs(hash(t)):x}.f32")

    def gram(self, t: str, width: int) -> np.ndarray | None:
        """``E[x xᵀ]`` of tensor `t`, float64; None when not captured. Each chunk of `_CHUNK_ROWS`
        rows is multiplied in float32 (relative error about 1e-7 · chunk rows, far below GPTQ's
        damping) and the chunks are summed in float64."""
        n = self.rows.get(t, 0)
        if not n or t in self.bad:
            return None
        h = np.zeros((width, width))
        if self._dir is None:
            chunks = iter(self._mem.pop(t))
        else:
            rows = np.memmap(self._path(t), dtype=np.float32, mode="r", shape=(n, width))
            chunks = (np.asarray(rows[i:i + _CHUNK_ROWS]) for i in range(0, n, _CHUNK_ROWS))
        for r in chunks:
            for i in range(0, r.shape[0], _CHUNK_ROWS):
                part = r[i:i + _CHUNK_ROWS]
                h += part.T @ part
        if self._dir is not None:
            del rows
            os.unlink(self._path(t))
        return h / n

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._mem.clear()
        if self._dir is not None:
            self._dir.cleanup()


def _weight_shape(ix: GraphIndex, layer: Layer) -> tuple[int, ...]:
    """The weight's shape without reading it (a weight kept on disk is read only to be solved)."""
    init = ix.inits.get(layer.w)
    return tuple(int(d) for d in init.dims) if init is not None else tuple(np.shape(layer.wv))


def _rows_view(layer: Layer) -> tuple[np.ndarray, bool]:
    """The weight as (outputs × inputs) float32, and whether that is its transpose."""
    w = np.asarray(layer.wv, dtype=np.float32)
    return (w.T, True) if layer.red_axis == 0 else (w, False)


def feedback_window(sizes: list[tuple[int, int]], block: int, budget: float = FEEDBACK_BUDGET) -> int | None:
    """The feedback window for layers of (outputs, inputs) `sizes`: None (full GPTQ) when
    ``Σ outputs·inputs²`` fits `budget`, else the widest ``block·2^j`` whose
    ``Σ outputs·inputs·min(inputs, window)`` fits (at least `block`)."""
    if sum(n * k * k for n, k in sizes) <= budget:
        return None
    window = block
    while window * 2 < max(k for _, k in sizes) and sum(n * k * min(k, window * 2) for n, k in sizes) <= budget:
        window *= 2
    return window


def solve_blocked(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], data: Dataset | None,
                  opts: Quantize, block_of: Callable[[Layer], int], limits: tuple[int, int],
                  notes: list[str]) -> None:
    """Set ``layer.gptq = (codes, params)`` for every blocked 2-D Gemm/MatMul layer of `layers`
    (see the module docstring); the others are left alone."""
    shapes = {i: _weight_shape(ix, lay) for i, lay in layers.items()}
    todo = {i: lay for i, lay in layers.items()
            if lay.op in ("Gemm", "MatMul") and block_of(lay) > 0 and len(shapes[i]) == 2}
    if not todo:
        return
    if data is None:
        notes.append("rounding=gptq without calibration data: block-wise weights rounded to nearest")
        return
    requests: dict[str, int] = {}
    widths: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
    skipped: dict[int, str] = {}
    for idx, lay in todo.items():
        k = shapes[idx][lay.red_axis]
        if k > MAX_INPUTS:
            skipped[idx] = f"{k} input features (over {MAX_INPUTS})"
            continue
        trans_a = attr(ix.nodes[idx], "transA", 0) if lay.op == "Gemm" else 0
        requests[lay.x] = 0 if trans_a else -1
        widths[lay.x] = k
        groups.setdefault(lay.x, []).append(idx)
    sizes = [(shapes[i][1 - todo[i].red_axis], widths[t]) for t, ids in groups.items() for i in ids]
    blocks = {block_of(todo[i]) for ids in groups.values() for i in ids}
    window = feedback_window(sizes, max(blocks)) if len(blocks) == 1 else None
    done = 0
    clock = {"capture": 0.0, "second moments": 0.0, "solve": 0.0}
    t0 = time.perf_counter()
    with LayerInputs(model, data, requests, widths, threads=opts.threads) as captured:
        clock["capture"] = time.perf_counter() - t0
        rows = max(captured.rows.values(), default=0)
        for t in sorted(groups, key=lambda name: min(groups[name])):
            t0 = time.perf_counter()
            h = captured.gram(t, widths[t])
            clock["second moments"] += time.perf_counter() - t0
            if h is None:
                for i in groups[t]:
                    skipped[i] = captured.bad.get(t, "its input was not captured")
                continue
            damp = shrinkage(widths[t], captured.rows[t])
            t0 = time.perf_counter()
            for same_block in _by_block(groups[t], todo, block_of):
                _solve_group(same_block, todo, h, block_of(todo[same_block[0]]), opts, limits, window, damp)
                done += len(same_block)
            clock["solve"] += time.perf_counter() - t0
            del h
    note = (f"rounding=gptq: {done} of {len(todo)} block-wise layers solved against their inputs' second moments "
            f"on {len(data)} samples ({rows} rows; streamed one input at a time")
    note += f"; feedback windowed to {window} input features to bound the cost" if window else "; full feedback"
    notes.append(note + "; " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.items()) + ")")
    for idx, why in skipped.items():
        notes.append(f"rounding=gptq: {todo[idx].label} rounded to nearest: {why}")


def _by_block(ids: list[int], layers: dict[int, Layer], block_of: Callable[[Layer], int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i in ids:
        out.setdefault(block_of(layers[i]), []).append(i)
    return list(out.values())


def shrinkage(inputs: int, rows: int) -> float:
    """GPTQ's damping λ/mean(diag H) for an input of `inputs` features seen in `rows` rows:
    ``clip(inputs / rows, MIN_DAMP, 1)``. With fewer rows than features ``H`` is singular and
    the feedback would fit the calibration rows' null space (worse than nearest rounding on
    other data); shrinking ``H`` toward its mean variance in proportion to ``inputs/rows`` (as
    covariance shrinkage does) leaves nearest rounding's behaviour where the data says little."""
    return float(min(1.0, max(MIN_DAMP, inputs / max(rows, 1))))


def _solve_group(ids: list[int], layers: dict[int, Layer], h: np.ndarray, block: int, opts: Quantize,
                 limits: tuple[int, int], window: int | None, damp: float) -> None:
    """GPTQ on the weights of `ids` (one input, one block size) stacked as rows, split back."""
    views = [_rows_view(layers[i]) for i in ids]
    stacked = views[0][0] if len(views) == 1 else np.concatenate([v for v, _ in views], axis=0)
    codes, p = gptq_blockwise(stacked, h, 1, block, opts.weights, symmetric=opts.symmetric, limits=limits,
                              window=window, damp=damp)
    del stacked
    start = 0
    for i, (v, transposed) in zip(ids, views):
        stop = start + v.shape[0]
        c, s, z = codes[start:stop], p.scale[start:stop], p.zero_point[start:stop]
        if transposed:
            c, s, z = c.T, s.T, z.T
        lay = layers[i]
        lay.gptq = (np.ascontiguousarray(c), QuantParams(scale=np.ascontiguousarray(s), zero_point=np.ascontiguousarray(z),
                                                         dtype=opts.weights, axis=lay.red_axis, block_size=block))
        start = stop
