"""Placement for the quantize pass: which activation tensors get a QuantizeLinear/DequantizeLinear
pair, and which nodes run on them (pure: nothing here edits the graph).

A layer (`layers.Layer`, ``op_types``) that is a static candidate and whose input is usable gets
an input QDQ, and an output QDQ after an absorbed Relu/Clip (`ops.ABSORBED_OPS`); a Gemm/MatMul
output only when a quantized node reads it (onnxruntime fuses the float-output form, QGemm /
MatMulIntegerToFloat). Data-movement ops (`ops.SHARED_OPS`: MaxPool, Reshape, Flatten,
Transpose, Split, Slice, Gather, nearest Resize …) after a quantized tensor share its scale (after
a float Gemm/MatMul output only when a quantized node reads what they write); Add,
Mul, Concat and pooling (`ops.OWN_OPS`) with a quantized input get their own output scale.

A tensor is usable when it is quantized already or has a calibrated range and no ``keep_float``
pattern. Kept float, with the reason: a Concat whose input ranges differ by more than
`CONCAT_RANGE_RATIO` (one scale would erase the small input); nodes ``exclude``/``keep_float``
name; layers in ``forced_float`` (a Conv on a graph input, a sensitive layer), whose decision the
caller records; an output not seen in calibration.

Each activation's parameters: one asymmetric per-tensor scale from its range
(``compute_params``), ``consumers=None`` when every reader reads the QDQ, else the labels of the
quantized readers. `calibration_tensors` lists what a placement may ask a range for.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graph_opt.kernels.quant import compute_params
from graph_opt.passes._graph import GraphIndex
from graph_opt.passes._qplan import NodeDecision, TensorQuant
from graph_opt.onnx_util import attr
from graph_opt.passes.quantize.layers import Layer, excluded, matching_pattern
from graph_opt.passes.quantize.ops import ABSORBED_OPS, OWN_OPS, SHARED_OPS

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize


# One shared output scale cannot serve Concat inputs whose ranges differ by more than this.
CONCAT_RANGE_RATIO = 10.0


@dataclass
class Placement:
    """The outcome of `place`: the activations' parameters, a decision per placed node, and the
    layers whose activation input is quantized."""

    acts: dict[str, TensorQuant] = field(default_factory=dict)
    decisions: dict[int, NodeDecision] = field(default_factory=dict)
    static: set[int] = field(default_factory=set)  # layers whose activation input is quantized


def place(ix: GraphIndex, layers: dict[int, Layer], candidates: set[int], ranges: Mapping[str, tuple[float, float]],
          opts: Quantize, forced_float: dict[int, str], unasked: Container[str] = frozenset()) -> Placement:
    """Decide which activation tensors get a QDQ (see the module docstring).

    `unasked`: tensors left out of calibration because no placement could use them (see
    `plan.make_plan`); a Gemm/MatMul output among them is reported as the float output it is."""
    return _Placer(ix, layers, candidates, ranges, opts, forced_float, unasked).run()


class _Placer:
    """One run of `place`, in graph order: the decisions so far and the state they share."""

    def __init__(self, ix: GraphIndex, layers: dict[int, Layer], candidates: set[int],
                 ranges: Mapping[str, tuple[float, float]], opts: Quantize, forced_float: dict[int, str],
                 unasked: Container[str]) -> None:
        self.ix, self.layers, self.candidates, self.ranges = ix, layers, candidates, ranges
        self.opts, self.forced_float, self.unasked = opts, forced_float, unasked
        self.pl = Placement()
        self.region: set[str] = set()               # tensors whose producer is quantized: every reader reads DQ
        self.pending: dict[str, tuple[int, str | None]] = {}  # Gemm/MatMul outputs quantized only if read quantized
        self.pending_shared: dict[str, int] = {}    # data movement (node index) of a pending output, likewise
        self.readers: dict[str, list[str]] = {}     # float-produced tensors: the quantized readers (labels)

    def run(self) -> Placement:
        ix, pl = self.ix, self.pl
        for idx, node in enumerate(ix.nodes):
            if idx in self.layers:
                if idx not in self.forced_float:
                    self._layer(idx)
                continue
            if excluded(ix, idx, self.opts) or idx in self.forced_float or node.domain not in ("", "ai.onnx"):
                continue
            data_inputs = [t for t in node.input if t and not ix.is_const(t)]
            if node.op_type in SHARED_OPS:
                self._shared(idx, data_inputs)
            elif node.op_type in OWN_OPS and any(self._quantized(t) for t in data_inputs):
                self._own_scale(idx, data_inputs)
        for t, (idx, _) in self.pending.items():
            pl.decisions[idx].reason = _FLOAT_OUTPUT
        for t, q in pl.acts.items():
            q.consumers = None if t in self.region else self.readers.get(t, [])
        return pl

    # -- the three kinds of node

    def _layer(self, idx: int) -> None:
        layer, pl = self.layers[idx], self.pl
        d = pl.decisions[idx] = NodeDecision(self.ix.labels[idx], layer.op, "quantize", weight=layer.w)
        if idx not in self.candidates:
            d.reason = "weight-only"
            return
        if not self._usable(layer.x):
            d.reason = f"weight-only: input {layer.x!r} is kept float or not a float32 tensor seen in calibration"
            return
        self._use(layer.x, idx)
        d.inputs = [layer.x]
        pl.static.add(idx)
        t, absorbed, why = self._chain_output(idx)
        if t is None:
            d.reason = why
        elif layer.op in ("Gemm", "MatMul"):
            self.pending[t] = (idx, absorbed)
        else:
            self._own(t)
            self.region.add(t)
            d.output, d.absorbed = t, absorbed

    def _shared(self, idx: int, data_inputs: list[str]) -> None:
        node = self.ix.nodes[idx]
        op = node.op_type
        if not node.input or node.input[0] not in data_inputs or not self._quantized(node.input[0]):
            return
        src, outs = node.input[0], [o for o in node.output if o]
        if not outs or (len(outs) > 1 and op != "Split") or any(self._keep(o) for o in outs):
            return  # (a MaxPool's second output holds int64 indices)
        if op == "Resize" and attr(node, "mode", b"nearest") != b"nearest":
            return
        if src in self.pending or src in self.pending_shared:
            # a float Gemm/MatMul output: the data movement is quantized only if a quantized node
            # reads what it writes (then the layer's output gets its QDQ too)
            for out in outs:
                self.pending_shared[out] = idx
            return
        self._place_shared(idx)

    def _place_shared(self, idx: int) -> None:
        node, pl = self.ix.nodes[idx], self.pl
        op = node.op_type
        src, outs = node.input[0], [o for o in node.output if o]
        self._materialize(src)
        base = pl.acts[src]
        for out in outs:
            pl.acts[out] = TensorQuant(out, "activation", base.dtype, base.scale, base.zero_point, scheme="shared",
                                       shared_with=base.shared_with or src, method=base.method, range=base.range)
            self.region.add(out)
        pl.decisions[idx] = NodeDecision(self.ix.labels[idx], op, "quantize",
                                         "shares its input's scale (int8 data movement)", inputs=[src], output=outs[0])

    def _own_scale(self, idx: int, data_inputs: list[str]) -> None:
        node, pl = self.ix.nodes[idx], self.pl
        op, label = node.op_type, self.ix.labels[idx]
        if op in ("Add", "Mul") and len(data_inputs) != 2:
            return
        if op in ("AveragePool", "GlobalAveragePool") and data_inputs != [node.input[0]]:
            return
        if not all(self._usable(t) for t in data_inputs):
            return
        if op == "Concat":
            spans = [a for a in (self._span(t) for t in data_inputs) if a]
            if spans and max(spans) / min(spans) > CONCAT_RANGE_RATIO:
                pl.decisions[idx] = NodeDecision(
                    label, op, "float",
                    f"input ranges differ by {max(spans) / min(spans):.0f}x (max |x| from {min(spans):.3g} to "
                    f"{max(spans):.3g}): one output scale would erase the small-range input; the Concat and its "
                    "output stay float, each input keeps its own scale")
                return
        t, absorbed, why = self._chain_output(idx)
        if t is None:
            pl.decisions[idx] = NodeDecision(label, op, "float", why)
            return
        for inp in data_inputs:
            self._use(inp, idx)
        self._own(t)
        self.region.add(t)
        pl.decisions[idx] = NodeDecision(label, op, "quantize", "own output scale", inputs=list(data_inputs),
                                         output=t, absorbed=absorbed)

    # -- tensors

    def _keep(self, t: str) -> bool:
        return matching_pattern(self.opts.keep_float, t) is not None

    def _own(self, t: str) -> TensorQuant:
        acts = self.pl.acts
        if t not in acts:
            lo, hi = self.ranges[t]
            p = compute_params((lo, hi), self.opts.activation_dtype, symmetric=False)
            acts[t] = TensorQuant.from_params(t, "activation", p, method=self.opts.calibration, range=(lo, hi))
        return acts[t]

    def _materialize(self, t: str) -> None:
        """A pending Gemm/MatMul output gets its QDQ: a quantized node reads it (or reads what a
        data-movement op made of it)."""
        if t in self.pending_shared:
            idx = self.pending_shared[t]
            for out in self.ix.nodes[idx].output:
                self.pending_shared.pop(out, None)
            self._place_shared(idx)
            return
        if t in self.pending:
            idx, absorbed = self.pending.pop(t)
            self._own(t)
            self.region.add(t)
            self.pl.decisions[idx].output, self.pl.decisions[idx].absorbed = t, absorbed

    def _quantized(self, t: str) -> bool:
        return t in self.region or t in self.pending or t in self.pending_shared

    def _usable(self, t: str) -> bool:
        return self._quantized(t) or (t in self.ranges and not self._keep(t))

    def _use(self, t: str, idx: int) -> None:
        self._materialize(t)
        if t not in self.region:
            self._own(t)
            self.readers.setdefault(t, []).append(self.ix.labels[idx])

    def _span(self, t: str) -> float | None:
        acts = self.pl.acts
        r = self.ranges.get(t) or (acts[t].range if t in acts else None)
        return None if r is None else max(abs(r[0]), abs(r[1]))

    def _chain_output(self, idx: int) -> tuple[str | None, str | None, str]:
        """(tensor quantized after node idx, the Relu/Clip absorbed, why none)."""
        ix = self.ix
        y = ix.nodes[idx].output[0]
        r = ix.sole_reader(y)
        t, absorbed = y, None
        if (r is not None and ix.nodes[r].op_type in ABSORBED_OPS and not excluded(ix, r, self.opts)
                and r not in self.forced_float):
            t, absorbed = ix.nodes[r].output[0], ix.labels[r]
        if self._keep(t):
            return None, None, f"output {t!r} kept float (keep_float)"
        if t not in self.ranges:
            if t in self.unasked and ix.nodes[idx].op_type in ("Gemm", "MatMul"):
                return None, None, _FLOAT_OUTPUT
            return None, None, f"output {t!r} is not a float32 tensor seen in calibration"
        return t, absorbed, ""


_FLOAT_OUTPUT = ("float output: nothing quantized reads it (onnxruntime fuses the float-output form: QGemm / "
                 "MatMulIntegerToFloat)")


def calibration_tensors(ix: GraphIndex, layers: dict[int, Layer], candidates: set[int]) -> list[str]:
    """Every tensor a placement may ask a range for: the inputs and outputs of the candidate
    layers, the inputs of own-scale and absorbed ops and their outputs, in graph order."""
    out: list[str] = []
    for idx, node in enumerate(ix.nodes):
        op = node.op_type
        if idx in layers:
            if idx in candidates:
                out += [layers[idx].x, node.output[0]]
        elif op in OWN_OPS or op in ABSORBED_OPS:
            out += [t for t in node.input if t and not ix.is_const(t)][: None if op in ("Concat", "Add", "Mul") else 1]
            out += node.output[:1]
    return list(dict.fromkeys(t for t in out if t))
