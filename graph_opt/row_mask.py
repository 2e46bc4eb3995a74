"""Calibration positions that count: a 0/1 mask input over the leading dims of activations.

A batch of padded sequences (token ids ``[batch, seq]`` with an ``attention_mask`` that is 0 on
padding) runs every layer at every position, padding included. When the model applies the mask
(attention never reads a padded key, pooling averages real tokens only) nothing a layer computes at
a padded position reaches the outputs, yet statistics that fit layers (the whitening covariance of
data-aware factorization, `reconstruct`'s least squares, activation importance) would weigh those
positions like real ones. With a row mask they count only positions where the mask is non-zero.

**Which input** (``row_mask=`` of the passes that use it): the name of a graph input, ``auto``
(the default) or ``none``. ``auto`` takes the one graph input that

1. has an integer or bool type and at least 2 dims (a mask over positions, not one per sample),
2. is never read as indices (Gather, GatherElements, GatherND, OneHot, directly or through
   Cast/Reshape/Unsqueeze/Squeeze/Identity): token ids and type ids are,
3. is combined with data: a Mul, Where, Add or Sub reads both a tensor computed from it and one
   computed from another graph input (an attention bias, a masked pooling),
4. holds only 0 and 1 on the calibration data, with at least one 0 (else nothing to drop) and at
   least one 1 in every sample.

None or several candidates: no mask (several: name one). Calibration data made of seeded random
inputs has masks of ones, so ``auto`` never applies to it.

**Which positions** of a tensor: the tensor's axes except its feature axis, in order, are its
positions; the mask applies when its shape (in one batch of the data) equals the leading dims of
those positions, and is broadcast over the remaining ones (an ``[N, S]`` mask on ``[N, S, H]``
activations drops whole rows; on ``[N, heads, S, S]`` it does not apply). Where it does not
apply, every position counts; the passes report which layers were masked. A value other than 0
keeps its position with weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graph_opt.data import Dataset
from graph_opt.errors import DataError

AUTO = "auto"
_INDEX_OPS = {"Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "OneHot": (0,)}
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}
_COMBINE = {"Mul", "Where", "Add", "Sub"}
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
              onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class RowMask:
    """A graph input whose non-zero entries mark the positions that count (see the module docstring).

    sample_shape: the mask's shape in one run of one sample (what `fits` compares to batch-1 shapes);
    kept, total: its non-zero entries and all entries over the calibration data; how: why this input."""

    name: str
    sample_shape: tuple[int, ...]
    kept: int
    total: int
    how: str

    def describe(self) -> str:
        return (f"row mask {self.name!r} ({self.how}): statistics count {self.kept} of {self.total} positions "
                f"({self.kept / max(self.total, 1):.0%}) where the layer's positions start with the mask's dims")

    def fits(self, shape: tuple[int, ...] | None, feature_axis: int) -> bool:
        """Whether the mask applies to a tensor of `shape` (batch 1) with features on `feature_axis`."""
        if not shape:
            return False
        return _prefix(_positions(tuple(shape), feature_axis), self.sample_shape)

    def keep(self, feed: dict[str, np.ndarray], shape: tuple[int, ...], feature_axis: int) -> np.ndarray | None:
        """Bool per position of a tensor of `shape` in the run of `feed` (the positions in C order of the
        axes other than `feature_axis`), or None when the mask does not apply to it."""
        mask = feed.get(self.name)
        if mask is None:
            return None
        mask = np.asarray(mask)
        positions = _positions(tuple(shape), feature_axis)
        if not _prefix(positions, mask.shape):
            return None
        full = np.broadcast_to((mask != 0).reshape(mask.shape + (1,) * (len(positions) - mask.ndim)), positions)
        return full.reshape(-1)


def _positions(shape: tuple[int, ...], feature_axis: int) -> tuple[int, ...]:
    axis = feature_axis % len(shape)
    return shape[:axis] + shape[axis + 1:]


def _prefix(positions: tuple[int, ...], mask_shape: tuple[int, ...]) -> bool:
    return 0 < len(mask_shape) <= len(positions) and tuple(positions[:len(mask_shape)]) == tuple(mask_shape)


def resolve(option: str | None, model: onnx.ModelProto, data: Dataset | None) -> tuple[RowMask | None, str | None]:
    """The row mask `option` names (an input, ``auto`` or None) for `model` on `data`, and a note for
    the report (why there is none under ``auto``; None when there is nothing to say). A named input that
    the model or the data lacks, or that is not a 0/1 mask, is a `DataError`."""
    if option is None or option == "none" or data is None or len(data) == 0:
        return None, None
    inputs = {i.name: i for i in model.graph.input}
    if option != AUTO:
        if option not in inputs:
            raise DataError(f"row_mask={option!r}: the model has no input of that name "
                            f"(inputs: {', '.join(inputs) or 'none'})")
        if option not in data.inputs:
            raise DataError(f"row_mask={option!r}: the calibration data has no such input")
        problem = _value_problem(np.asarray(data.inputs[option]), data.axis(option))
        if problem:
            raise DataError(f"row_mask={option!r}: {problem}")
        return _make(option, data, "given"), None
    candidates = [name for name in _structural_candidates(model) if name in data.inputs
                  and not _value_problem(np.asarray(data.inputs[name]), data.axis(name))]
    if len(candidates) > 1:
        return None, (f"row_mask=auto: several inputs look like masks ({', '.join(candidates)}); every position "
                      "counts (name one with row_mask=)")
    if not candidates:
        return None, None
    return _make(candidates[0], data, "auto: an integer 0/1 input with zeros that the graph multiplies or adds "
                                      "to data"), None


def _make(name: str, data: Dataset, how: str) -> RowMask:
    values = np.asarray(data.inputs[name])
    return RowMask(name, tuple(np.shape(data.sample(0)[name])), int(np.count_nonzero(values)), int(values.size), how)


def _value_problem(values: np.ndarray, batch_axis: int | None) -> str | None:
    """Why `values` are not a usable 0/1 mask, or None."""
    if batch_axis is None:
        return "has no batch axis in the data (one value shared by every run)"
    if values.ndim < 2:
        return f"has {values.ndim} dims (a mask over positions has at least 2)"
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
            or values.dtype == np.bool_):
        return f"has dtype {values.dtype}, not a number or bool"
    if not np.all((values == 0) | (values == 1)):
        return "holds values other than 0 and 1"
    if values.all():
        return "is 1 everywhere on the calibration data (nothing to leave out)"
    per_sample = np.moveaxis(values, batch_axis, 0).reshape(values.shape[batch_axis], -1)
    if not per_sample.any(axis=1).all():
        return "is 0 everywhere in some sample (no position of it would count)"
    return None


def _structural_candidates(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that pass tests 1–3 of the module docstring, in input order."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inputs = [i for i in g.input if i.name not in inits]

    def cone(start: str) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for n in readers.get(stack.pop(), ()):
                for o in n.output:
                    if o and o not in seen:
                        seen.add(o)
                        stack.append(o)
        return seen

    cones = {i.name: cone(i.name) for i in inputs}
    out = []
    for i in inputs:
        t = i.type.tensor_type
        if t.elem_type not in _INT_TYPES or len(t.shape.dim) < 2:
            continue
        if _read_as_indices(i.name, readers):
            continue
        mine = cones[i.name]
        others = set().union(*(c for name, c in cones.items() if name != i.name)) if len(cones) > 1 else set()
        if any(n.op_type in _COMBINE and any(x in mine for x in n.input) and any(x in others - mine for x in n.input)
               for n in g.node):
            out.append(i.name)
    return out


def _read_as_indices(name: str, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    stack, seen = [name], {name}
    while stack:
        t = stack.pop()
        for n in readers.get(t, ()):
            if any(k < len(n.input) and n.input[k] == t for k in _INDEX_OPS.get(n.op_type, ())):
                return True
            if n.op_type in _PASS_THROUGH and n.input and n.input[0] == t:
                for o in n.output:
                    if o not in seen:
                        seen.add(o)
                        stack.append(o)
    return False
