"""The channel analysis's handlers for ops that move, cut or join the channel axis: Concat,
Split, Slice, Flatten, Reshape, Transpose, Squeeze, Unsqueeze (see `passes/_groups.py`).

A Concat on the channel axis concatenates the atom lists (channels of inputs that carry none get
new frozen atoms); on another axis it ties channel-aligned inputs. Split and Slice cut the list
(an `Edit` records their sizes/bounds for the pruning pass). Flatten and Reshape map channel c to
its block of features when they merge the channel axis with its neighbours (found from suffix
products, so unknown leading dims do not matter); a Reshape that splits the channel axis cannot be
mapped and freezes the channels.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graph_opt.passes._graph import constant, node_label
from graph_opt.passes._groups_plan import Chan, Edit


class LayoutOps:
    """Mixed into `_groups_walk.Walker`; uses its bookkeeping: `set`, `unknown`, `first_only`,
    `attr_or_input`, `new_atoms`, `unify`, `shape_of` and the `edits` list."""

    def op_Concat(self, node: gs.Node, ins: list[Chan | None]) -> None:
        label = node_label(node)
        rank = next(c.rank for c in ins if c is not None)
        axis = int(node.attrs.get("axis", 0)) % rank
        chans = [c for c in ins if c is not None]
        if all(c.axis == axis for c in chans):
            parts = []
            for t, c in zip(node.inputs, ins):
                if c is not None:
                    parts.append(c)
                    continue
                shape = self.shape_of(t)
                size = shape[axis] if shape is not None and len(shape) == rank else None
                if size is None:
                    self.unknown(node, ins, f"an input of {label} has an unknown size on the channel axis")
                    return
                atoms = self.new_atoms(size, f"concatenated in {label} with channels that are not prunable")
                parts.append(Chan(axis, rank, atoms, np.full(size, np.nan), np.zeros(size, bool)))
            self.set(node.outputs[0], Chan(axis, rank, np.concatenate([p.atoms for p in parts]),
                                           np.concatenate([p.value for p in parts]),
                                           np.concatenate([p.approx for p in parts])))
            return
        if len(chans) != len(node.inputs) or len({(c.axis, len(c.atoms)) for c in chans}) != 1:
            self.unknown(node, ins, f"{label} joins them with tensors that are not channel-aligned")
            return
        first = chans[0]
        for c in chans[1:]:
            self.unify(first.atoms, c.atoms)
        same = np.all([c.value == first.value for c in chans], axis=0)
        value = np.where(same, first.value, np.nan)
        approx = np.any([c.approx for c in chans], axis=0)
        self.set(node.outputs[0], Chan(first.axis, rank, first.atoms, value, approx))

    def op_Split(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = self.first_only(node, ins, "split sizes")
        if x is None:
            return
        label = node_label(node)
        axis = int(node.attrs.get("axis", 0)) % x.rank
        outs = node.outputs
        if axis != x.axis:
            for o in outs:
                self.set(o, x)
            return
        n = len(x.atoms)
        ok, sizes = self.attr_or_input(node, ins, "split", "split sizes")
        if not ok:
            return
        if sizes is None:
            parts = int(node.attrs.get("num_outputs", len(outs)))
            step = -(-n // parts)
            sizes = [min(step, n - i * step) for i in range(parts)]
        sizes = [int(s) for s in np.asarray(sizes).ravel()]
        if sum(sizes) != n or len(sizes) != len(outs):
            self.unknown(node, ins, f"the split sizes of {label} do not match its channels")
            return
        start = 0
        for o, s in zip(outs, sizes):
            self.set(o, x.take(slice(start, start + s)))
            start += s
        self.edits.append(Edit("split", node, x.atoms, {"sizes": sizes}))

    def op_Slice(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = self.first_only(node, ins, "slice bounds")
        if x is None:
            return
        label = node_label(node)
        if len(node.inputs) < 3:
            self.unknown(node, ins, f"{label} uses the opset-1 attribute form")
            return
        given = [i < len(node.inputs) and bool(node.inputs[i].name) for i in range(1, 5)]
        starts, ends, axes, steps = (constant(node.inputs[i]) if g else None for i, g in zip(range(1, 5), given))
        if any(g and v is None for g, v in zip(given, (starts, ends, axes, steps))):
            self.unknown(node, ins, f"the bounds of {label} are computed at run time")
            return
        starts, ends = np.asarray(starts).ravel(), np.asarray(ends).ravel()
        axes = list(range(len(starts))) if axes is None else [int(a) % x.rank for a in np.asarray(axes).ravel()]
        steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).ravel()
        if x.axis not in axes:
            self.set(node.outputs[0], x)
            return
        pos = axes.index(x.axis)
        if int(steps[pos]) != 1:
            self.unknown(node, ins, f"{label} slices the channel axis with a step other than 1")
            return
        n = len(x.atoms)
        s, e = int(starts[pos]), int(ends[pos])
        s = min(max(s + n if s < 0 else s, 0), n)
        e = min(max(e + n if e < 0 else e, 0), n)
        e = max(e, s)
        self.set(node.outputs[0], x.take(slice(s, e)))
        self.edits.append(Edit("slice", node, x.atoms, {"pos": pos, "start": s, "end": e}))

    def op_Flatten(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        shape = self.shape_of(node.inputs[0])
        axis = int(node.attrs.get("axis", 1))
        axis = axis + x.rank if axis < 0 else axis  # Flatten's axis lies in [-r, r]
        if axis > x.axis:
            self.unknown(node, ins, f"{label} merges the channel axis into its leading dimension")
            return
        dims = None if shape is None else shape[axis:]
        if dims is None or any(d is None for d in dims):
            self.unknown(node, ins, f"{label} flattens dimensions of unknown size")
            return
        inner = math.prod(shape[x.axis + 1:])
        outer = math.prod(shape[axis:x.axis])
        self.set(node.outputs[0], x.expand(inner, outer, 1, 2))

    def op_Reshape(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        if ins[1] is not None:
            self.unknown(node, ins, f"{label} takes them as its target shape")
            return
        target = constant(node.inputs[1])
        if target is None:
            self.unknown(node, ins, f"the target shape of {label} is computed at run time; cannot map the channels")
            return
        target = np.asarray(target, np.int64).ravel()
        if int(node.attrs.get("allowzero", 0)) and np.any(target == 0):
            self.unknown(node, ins, f"{label} uses allowzero")
            return
        s_in = self.shape_of(node.inputs[0])
        s_out = self.shape_of(node.outputs[0])
        if s_in is not None and (s_out is None or len(s_out) != len(target)):
            s_out = _reshape_shape(s_in, target)
        mapping = None if s_in is None or s_out is None else _map_axis(s_in, s_out, x.axis)
        if mapping is None:
            self.unknown(node, ins, f"{label} reshapes {_fmt(s_in)} → {_fmt(s_out)}, which splits the channel axis: "
                                    "cannot map it")
            return
        j, p, m = mapping
        exact_axis = j == x.axis and p == m == x.axis
        copies = [i for i, t in enumerate(target.tolist()) if t == 0]
        if (x.axis in copies or j in copies) and not exact_axis:
            self.unknown(node, ins, f"{label} copies a dimension (0 in its target) that the channels change")
            return
        inner = math.prod(s_in[x.axis + 1:m + 1])
        outer = math.prod(s_in[p:x.axis])
        out = x.expand(inner, outer, j, len(s_out))
        self.set(node.outputs[0], out)
        if target[j] > 0:
            self.edits.append(Edit("reshape", node, out.atoms, {"axis": j}))

    def op_Transpose(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        perm = list(node.attrs.get("perm", list(range(x.rank))[::-1]))
        self.set(node.outputs[0], x.moved(perm.index(x.axis), x.rank))

    def op_Unsqueeze(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        ok, axes = self._axes(node, ins)
        if not ok:
            return
        if axes is None:
            self.unknown(node, ins, f"{node_label(node)} has no axes")
            return
        rank = x.rank + len(axes)
        axes = {int(a) % rank for a in axes}
        kept = [i for i in range(rank) if i not in axes]
        self.set(node.outputs[0], x.moved(kept[x.axis], rank))

    def op_Squeeze(self, node: gs.Node, ins: list[Chan | None]) -> None:
        x = ins[0]
        label = node_label(node)
        ok, axes = self._axes(node, ins)
        if not ok:
            return
        if axes is None:
            shape = self.shape_of(node.inputs[0])
            if shape is None or any(d is None for d in shape):
                self.unknown(node, ins, f"{label} squeezes dimensions of unknown size")
                return
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = {int(a) % x.rank for a in axes}
        if x.axis in axes:
            self.unknown(node, ins, f"{label} squeezes the channel axis away")
            return
        self.set(node.outputs[0], x.moved(x.axis - sum(1 for a in axes if a < x.axis), x.rank - len(axes)))

    def _axes(self, node: gs.Node, ins: list[Chan | None]) -> tuple[bool, list[int] | None]:
        """(ok, axes) from the axes input or attribute; ok False once the channels are frozen."""
        if any(c is not None for c in ins[1:]):
            self.unknown(node, ins, f"{node_label(node)} takes them as its axes")
            return False, None
        ok, axes = self.attr_or_input(node, ins, "axes", "axes")
        return ok, None if axes is None else [int(a) for a in np.asarray(axes).ravel()]


def _reshape_shape(s_in, target) -> tuple[int | None, ...] | None:
    """The output shape of Reshape(target) from a partly known input shape (None dims unknown)."""
    out: list[int | None] = [s_in[i] if t == 0 and i < len(s_in) else int(t) for i, t in enumerate(target.tolist())]
    if -1 in out:
        known_in = [d for d in s_in if d is not None]
        if len(known_in) != len(s_in):
            out[out.index(-1)] = None
        else:
            rest = math.prod(d for d in out if d not in (-1, None))
            out[out.index(-1)] = math.prod(known_in) // rest if rest else None
    return tuple(out)


def _suffix(shape, start: int) -> int | None:
    dims = shape[start:]
    return None if any(d is None for d in dims) else math.prod(dims)


def _map_axis(s_in, s_out, k: int) -> tuple[int, int, int] | None:
    """(j, p, m): output axis j holds exactly input axes p..m (p ≤ k ≤ m), else None.

    Found from suffix products, so unknown leading dims (batch, sequence) do not matter.
    """
    for p in range(k, -1, -1):
        full = _suffix(s_in, p)
        if full is None:
            return None
        for m in range(k, len(s_in)):
            tail = _suffix(s_in, m + 1)
            for j in range(len(s_out)):
                if _suffix(s_out, j) == full and _suffix(s_out, j + 1) == tail:
                    return j, p, m
    return None


def _fmt(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"

