"""Input data for verification and calibration.

Sources, all turned into one `Dataset` (arrays of N samples per model input, plus optional labels):

- an ``.npz`` file whose keys are the model's input names (a single-input model also accepts a
  file with one array under any name); an optional ``labels`` key holds class labels;
- a directory of such ``.npz`` files, concatenated in sorted order;
- an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()`` returning a feed dict or
  None), from Python;
- seeded random tensors built from the model's input specs (the default when no data is given).

Where the batch is (`batch_layout`): samples are stacked along each input's batch axis, the
model's feeds concatenated. The batch axis is where the model's batch dimension is: the axis of
a dimension named like a batch (``batch``, ``batch_size``, ``N``, ``B``, ``bs``), else of the symbol
most inputs have at axis 0, else axis 0 when it is dynamic, so an RNN state ``[2, batch, 128]``
stacks on axis 1. An input without the batch dimension (a 0-d sample rate, a fixed-size table) is
*shared*: stored once, given unchanged to every run. When no input has a dynamic batch, the
model's batch is fixed (the leading size of its largest input, 2 for ``[2, 3, 224, 224]``) and every
run takes exactly that many samples; an input whose dims do not include that size is shared.

Dynamic dimensions are bound with ``name=1x3x224x224`` specs; a dimension bound on one input binds
the same symbol on every input; a batch dimension left unbound defaults to 1; any other unbound
dynamic dimension is an error that says how to bind it (`unbound_hint`).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from graph_opt.errors import DataError
from graph_opt.onnx_util import first_line

log = logging.getLogger(__name__)

LABELS_KEY = "labels"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # int: static, str: symbolic, None: unknown


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of a model (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DataError(f"input {value.name!r} is not a tensor; graph-opt only feeds tensor inputs")
        dims: list[int | str | None] = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)), tuple(dims)))
    return specs


def parse_shape_spec(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1x3x224x224`` → ('name', (1, 3, 224, 224))."""
    name, sep, dims = text.partition("=")
    if not sep or not name.strip():
        raise DataError(f"bad --input-shape {text!r}: expected NAME=DIMS such as input=1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().replace(",", "x").split("x"))
    except ValueError:
        raise DataError(f"bad --input-shape {text!r}: dimensions must be integers joined by 'x'") from None
    if not shape or any(d <= 0 for d in shape):
        raise DataError(f"bad --input-shape {text!r}: dimensions must be positive")
    return name.strip(), shape


_BATCH_NAMES = {"batch", "batch_size", "batchsize", "n", "b", "bs"}


@dataclass(frozen=True)
class BatchLayout:
    """Where each input's samples stack (`axes`: name → axis, None for a shared input) and the
    number of samples each run must take (`fixed`; None when the batch is dynamic)."""

    axes: dict[str, int | None]
    fixed: int | None = None
    symbol: str | None = None  # the batch dimension's name, when it has one


def batch_layout(model: onnx.ModelProto) -> BatchLayout:
    """The batch axis of every input and the fixed batch, read from the input specs (see module doc)."""
    specs = input_specs(model)
    symbols = [d for s in specs for d in s.shape if isinstance(d, str)]
    named = [d for d in symbols if d.lower() in _BATCH_NAMES or "batch" in d.lower()]
    leading = collections.Counter(s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str))
    symbol = named[0] if named else (leading.most_common(1)[0][0] if leading else None)
    dynamic = symbol is not None or any(s.shape and s.shape[0] is None for s in specs)
    axes: dict[str, int | None] = {}
    if dynamic:
        for s in specs:
            if symbol is not None and symbol in s.shape:
                axes[s.name] = s.shape.index(symbol)
            elif s.shape and not isinstance(s.shape[0], int):
                axes[s.name] = 0
            else:
                axes[s.name] = None
        return BatchLayout(axes, None, symbol)
    ranked = [s for s in specs if s.shape]
    if not ranked:
        return BatchLayout({s.name: None for s in specs})
    main = max(ranked, key=lambda s: (len(s.shape) > 1, int(np.prod([d for d in s.shape if isinstance(d, int)]))))
    fixed = main.shape[0]
    for s in specs:
        axes[s.name] = s.shape.index(fixed) if fixed in s.shape else None
    return BatchLayout(axes, fixed)


def _symbol_values(specs: list[InputSpec], overrides: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Sizes of named dimensions that --input-shape bound on some input."""
    values: dict[str, int] = {}
    for spec in specs:
        if spec.name in overrides:
            for dim, size in zip(spec.shape, overrides[spec.name]):
                if isinstance(dim, str):
                    values.setdefault(dim, size)
    return values


def bind_shapes(model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]] | None = None, *,
                partial: bool = False) -> dict[str, tuple[Any, ...]]:
    """A concrete shape for every input: overrides first, then static dims, a symbol bound on
    another input, batch dim 1. With `partial`, a dimension that stays unbound keeps its name
    (a str, or None when unnamed) instead of raising the error that says how to bind it."""
    overrides = dict(overrides or {})
    specs = input_specs(model)
    names = [s.name for s in specs]
    for name in overrides:
        if name not in names:
            raise DataError(f"no model input named {name!r} (inputs: {', '.join(names)})")
    layout = batch_layout(model)
    symbols = _symbol_values(specs, overrides)
    shapes: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if len(shape) != len(spec.shape):
                raise DataError(f"input {spec.name!r} has rank {len(spec.shape)}, --input-shape gives {len(shape)} dims")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int) and want != got:
                    raise DataError(f"input {spec.name!r} axis {axis} is fixed to {want}, --input-shape gives {got}")
            shapes[spec.name] = tuple(shape)
            continue
        shape: list[Any] = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif isinstance(dim, str) and dim in symbols:
                shape.append(symbols[dim])
            elif axis == layout.axes.get(spec.name):
                shape.append(1)
            elif partial:
                shape.append(dim)
            else:
                raise DataError(f"input {spec.name!r} has a dynamic dimension {dim or '?'} at axis {axis}; "
                                f"bind it with {unbound_hint(model, overrides)}")
        shapes[spec.name] = tuple(shape)
    return shapes


def unbound_hint(model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]] | None = None) -> str | None:
    """The ``--input-shape`` arguments that would bind every dynamic dimension, or None when all
    are bound: the batch at 1, other dimensions as their names in capitals (``ids=1xSEQ``); a
    symbol already named by an earlier input is not asked for again."""
    bound = bind_shapes(model, overrides, partial=True)
    args, covered = [], set()
    for name, shape in bound.items():
        unbound = [d for d in shape if not isinstance(d, int)]
        if not unbound or (None not in unbound and covered >= set(unbound)):
            continue  # a symbol bound on one input binds it on every input
        covered.update(unbound)
        args.append(f"--input-shape {name}=" + "x".join(
            str(d) if isinstance(d, int) else (str(d).upper() if d else "N") for d in shape))
    return " ".join(args) or None


@dataclass
class Dataset:
    """N samples for every model input (stacked on each input's batch axis) and optional labels.

    `axes` gives an input's batch axis (None: a shared input, fed unchanged to every run); without
    it every input of rank ≥ 1 stacks on axis 0 and a 0-d input is shared. `fixed`: the number of
    samples every run must take (a model whose batch is static), or None."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    axes: dict[str, int | None] | None = None
    fixed: int | None = None

    @property
    def seeded_random(self) -> bool:
        """Made by `random_dataset` because no data was given: not the user's data."""
        return self.source.startswith("random(")

    def axis(self, name: str) -> int | None:
        if self.axes is not None and name in self.axes:
            return self.axes[name]
        return 0 if np.ndim(self.inputs[name]) else None

    def __len__(self) -> int:
        for name, value in self.inputs.items():
            axis = self.axis(name)
            if axis is not None:
                return int(np.shape(value)[axis])
        return 1 if self.inputs else 0  # only shared inputs: one run

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The feed of samples [start, stop): each input cut on its batch axis, shared ones whole."""
        feed = {}
        for name, value in self.inputs.items():
            axis = self.axis(name)
            if axis is None:
                feed[name] = value
            else:
                index = [slice(None)] * np.ndim(value)
                index[axis] = slice(start, stop)
                feed[name] = value[tuple(index)]
        return feed

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        batch_size = self.fixed or batch_size
        for start in range(0, n, batch_size):
            yield self.slice(start, min(start + batch_size, n))

    def take(self, n: int) -> Dataset:
        n = len(self) if n >= len(self) else max(n - n % self.fixed, self.fixed) if self.fixed else n
        labels = None if self.labels is None else self.labels[:n]
        return replace(self, inputs=self.slice(0, n), labels=labels)

    def sample(self, index: int = 0) -> dict[str, np.ndarray]:
        """The feed of one run (for latency measurement): one sample, or the model's fixed batch."""
        size = self.fixed or 1
        return self.slice(index * size, (index + 1) * size)

    def with_labels(self, labels: np.ndarray | str | os.PathLike | None) -> Dataset:
        """This data with `labels` (an array, or a .npy file of one label per sample)."""
        if labels is not None and not isinstance(labels, np.ndarray):
            try:
                labels = np.load(labels, allow_pickle=False)
            except Exception as exc:
                raise DataError(f"cannot read labels {labels}: {first_line(exc)}") from None
        if labels is not None and len(labels) != len(self):
            raise DataError(f"{len(labels)} labels for {len(self)} samples")
        return replace(self, labels=labels)

    def laid_out(self, model: onnx.ModelProto) -> Dataset:
        """This data with `model`'s batch layout, when it was built without one (a plain Dataset)."""
        if self.axes is not None:
            return self
        layout = batch_layout(model)
        if not set(self.inputs) <= set(layout.axes):
            return self
        return replace(self, axes=dict(layout.axes), fixed=layout.fixed)


def batch_size_for(model: onnx.ModelProto, requested: int = 32) -> int:
    """A model whose batch is static takes exactly that many samples per run."""
    return batch_layout(model).fixed or requested


# A run of a model whose batch is dynamic takes at most this many bytes of inputs: inside
# onnxruntime a large image's activations take many times its input, and 32 such images in one run
# held hundreds of MB for no speed (a Conv computes each image on its own).
RUN_INPUT_BYTES = 4 << 20


def batch_size_within(data: Dataset, model: onnx.ModelProto, requested: int = 32) -> int:
    """Samples per run of `model` on `data`: its static batch, else `requested` or as many as
    `RUN_INPUT_BYTES` of inputs hold, whichever is fewer (at least one)."""
    fixed = batch_layout(model).fixed
    if fixed or not len(data):
        return fixed or requested
    per_sample = sum(int(np.asarray(v).nbytes) for v in data.slice(0, 1).values())
    return int(min(requested, max(1, RUN_INPUT_BYTES // max(per_sample, 1))))


def paired_batch_size(teacher: onnx.ModelProto, student: onnx.ModelProto, requested: int = 32) -> int:
    """The batch size both models take when run side by side on the same batches: a static batch
    of either (a student whose batch `simplify` bound under the user's --input-shape), else `requested`."""
    return batch_layout(teacher).fixed or batch_layout(student).fixed or requested


# Ops an index input passes through unchanged in value on its way to a Gather.
_INDEX_PASSTHROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Transpose"}


def index_bound(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the smallest table the integer input `name` indexes: the dim along the gather axis
    of every Gather whose indices it feeds (through Cast/Unsqueeze/Squeeze/Reshape/...), whose
    table is an initializer or a Constant node. None when it feeds no such Gather."""
    graph = model.graph
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    dims[node.output[0]] = tuple(attr.t.dims)
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for x in node.input:
            consumers[x].append(node)
    bounds = []
    todo, seen = [name], {name}
    while todo:
        tensor = todo.pop()
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                table = dims.get(node.input[0])
                axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
                if table and -len(table) <= axis < len(table) and table[axis] > 0:
                    bounds.append(int(table[axis]))
            elif node.op_type in _INDEX_PASSTHROUGH and node.input[0] == tensor:
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        todo.append(out)
    return min(bounds) if bounds else None


def _random_integers(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: np.dtype,
                     bound: int | None) -> np.ndarray:
    """Integer inputs by convention: masks all ones, token type / segment ids zeros, position ids
    0, 1, 2, ... along the last axis, a sample rate 16000, indices within the table they index,
    another 0-d integer 0, anything else in [0, 100)."""
    lname = name.lower()
    if "mask" in lname:
        return np.ones(shape, dtype)
    if "type" in lname or "segment" in lname:
        return np.zeros(shape, dtype)
    if "position" in lname and shape:
        return np.broadcast_to(np.arange(shape[-1]) % (bound or shape[-1]), shape).astype(dtype)
    if lname in ("sr", "sample_rate", "sampling_rate") and bound is None:
        return np.full(shape, 16000, dtype)
    if not shape and bound is None:  # a 0-d integer is a position, an index or a count: 0 is valid for all
        return np.zeros(shape, dtype)
    high = min(bound, 100) if bound is not None else 100
    if dtype.kind == "u" or np.iinfo(dtype).max < high:
        high = min(high, int(np.iinfo(dtype).max) + 1)
    return rng.integers(0, high, shape).astype(dtype)


def random_dataset(model: onnx.ModelProto, n: int = 8, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                   seed: int = 0) -> Dataset:
    """Seeded random inputs from the model's specs: N(0,1) floats; integers by convention
    (`_random_integers`); `n` runs' worth of samples on each batch axis, shared inputs once."""
    rng = np.random.default_rng(seed)
    bound = bind_shapes(model, shapes)
    layout = batch_layout(model)
    inputs = {}
    for spec in input_specs(model):
        shape = list(bound[spec.name])
        axis = layout.axes.get(spec.name)
        if axis is not None:
            shape[axis] *= n
        full = tuple(shape)
        if spec.dtype.kind == "f":
            arr = rng.standard_normal(full).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arr = np.ones(full, bool) if "mask" in spec.name.lower() else rng.integers(0, 2, full).astype(bool)
        elif spec.dtype.kind in "iu":
            arr = _random_integers(rng, spec.name, full, spec.dtype, index_bound(model, spec.name))
        else:
            kind = "string" if spec.dtype.kind in "OSU" else str(spec.dtype)
            raise DataError(f"cannot make random data for input {spec.name!r} of type {kind}; give real inputs with --data")
        inputs[spec.name] = arr
    return Dataset(inputs, None, f"random(seed={seed}, n={n})", dict(layout.axes), layout.fixed)


def load_data(source: Any, model: onnx.ModelProto, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
              n_random: int = 8, seed: int = 0) -> Dataset:
    """Any supported source (path, Dataset, dict of arrays, CalibrationDataReader, None) → Dataset."""
    if source is None:
        return random_dataset(model, n_random, shapes=shapes, seed=seed)
    if isinstance(source, Dataset):
        data = source
    elif isinstance(source, Mapping):
        data = _from_arrays(dict(source), "arrays")
    elif hasattr(source, "get_next"):
        data = _from_reader(source, batch_layout(model))
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise DataError(f"no .npz files in data directory {path}")
            parts = [_read_npz(f) for f in files]
            keys = set(parts[0])
            for f, part in zip(files, parts):
                if set(part) != keys:
                    raise DataError(f"{f} has arrays {sorted(part)}, expected {sorted(keys)} like {files[0].name}")
            data = _from_arrays(_stack(parts, batch_layout(model)), str(path))
        elif path.is_file():
            data = _from_arrays(_read_npz(path), str(path))
        else:
            raise DataError(f"data path not found: {path}")
    return match_model(data, model, shapes)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz: {first_line(exc)}") from None


def _from_arrays(arrays: dict[str, np.ndarray], source: str) -> Dataset:
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError(f"{source} holds no input arrays")
    return Dataset({k: np.asarray(v) for k, v in arrays.items()}, None if labels is None else np.asarray(labels), source)


def _from_reader(reader: Any, layout: BatchLayout) -> Dataset:
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append({k: np.asarray(v) for k, v in feed.items()})
    if not feeds:
        raise DataError("the data reader returned no samples")
    return Dataset(_stack(feeds, layout), None, type(reader).__name__)


def _stack(parts: list[dict[str, np.ndarray]], layout: BatchLayout) -> dict[str, np.ndarray]:
    """Feeds (or files) joined on each input's batch axis; a shared input (no batch axis, such as
    a 0-d sample rate) is taken from the first part. Arrays under labels or unknown names stack on axis 0."""
    merged = {}
    for i, part in enumerate(parts):
        if set(part) != set(parts[0]):
            raise DataError(f"sample {i} has arrays {sorted(part)}, expected {sorted(parts[0])} like sample 0")
    for k in parts[0]:
        axis = layout.axes.get(k, 0) if k != LABELS_KEY else 0
        values = [p[k] for p in parts]
        if axis is None or values[0].ndim == 0:
            merged[k] = values[0]
        else:
            try:
                merged[k] = np.concatenate(values, axis=min(axis, values[0].ndim - 1))
            except ValueError:
                raise DataError(f"array {k!r} has shapes {sorted({v.shape for v in values})} across the data; "
                                f"they do not stack on axis {axis}") from None
    return merged


def match_model(data: Dataset, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Dataset:
    """Check names, ranks, fixed dims and dtypes against the model; cast floats; rename a lone input."""
    specs = input_specs(model)
    if shapes:
        bind_shapes(model, shapes)  # validates the names in the overrides
    inputs = dict(data.inputs)
    names = [s.name for s in specs]
    if len(specs) == 1 and len(inputs) == 1 and names[0] not in inputs:
        inputs = {names[0]: next(iter(inputs.values()))}
    missing = [n for n in names if n not in inputs]
    if missing:
        raise DataError(f"{data.source}: no data for model input {missing[0]!r} (data has: {', '.join(sorted(inputs))})")
    extra = sorted(set(inputs) - set(names))
    if extra:
        raise DataError(f"{data.source}: array {extra[0]!r} is not a model input (inputs: {', '.join(names)}; labels go under 'labels')")
    layout = _with_data_axes(batch_layout(model), specs, inputs)
    n: int | None = None
    out = {}
    for spec in specs:
        arr = inputs[spec.name]
        axis = layout.axes.get(spec.name)
        if arr.ndim != len(spec.shape):
            raise DataError(f"{data.source}: {spec.name!r} has shape {arr.shape}, model expects rank {len(spec.shape)} {_shape_str(spec.shape)}")
        for i, dim in enumerate(spec.shape):
            if i != axis and isinstance(dim, int) and arr.shape[i] != dim:
                raise DataError(f"{data.source}: {spec.name!r} has shape {arr.shape}, model expects {_shape_str(spec.shape)}"
                                + (f" (samples stacked on axis {axis})" if axis else ""))
        if arr.dtype != spec.dtype:
            if arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                arr = arr.astype(spec.dtype)
            else:
                raise DataError(f"{data.source}: {spec.name!r} is {arr.dtype}, model expects {spec.dtype}")
        if axis is not None:
            if n is None:
                n = arr.shape[axis]
            elif arr.shape[axis] != n:
                raise DataError(f"{data.source}: inputs disagree on the number of samples ({n} vs {arr.shape[axis]} "
                                f"for {spec.name!r} on axis {axis})")
        out[spec.name] = arr
    if data.labels is not None and n is not None and len(data.labels) != n:
        raise DataError(f"{data.source}: {len(data.labels)} labels for {n} samples")
    result = Dataset(out, data.labels, data.source, dict(layout.axes), layout.fixed)
    if layout.fixed and n is not None and n % layout.fixed:
        if n < layout.fixed:
            raise DataError(f"{data.source}: {n} samples, but the model takes exactly {layout.fixed} per run")
        log.warning("%s: the model takes exactly %d samples per run; using the first %d of %d",
                    data.source, layout.fixed, n - n % layout.fixed, n)
        result = result.take(n - n % layout.fixed)
    return result


def _with_data_axes(layout: BatchLayout, specs: list[InputSpec], inputs: dict[str, np.ndarray]) -> BatchLayout:
    """An input the specs cannot place (no named batch dim: a state [2, ?, 128] next to an input
    [?, ?]) batches on its one unnamed dynamic axis when the data has the other inputs' sample
    count there."""
    if layout.fixed is not None:
        return layout
    counts = {inputs[s.name].shape[ax] for s in specs
              if (ax := layout.axes.get(s.name)) is not None and s.name in inputs and inputs[s.name].ndim > ax}
    if len(counts) != 1 or (n := counts.pop()) < 2:
        return layout
    axes = dict(layout.axes)
    for s in specs:
        arr = inputs.get(s.name)
        if axes.get(s.name) is not None or arr is None or arr.ndim != len(s.shape):
            continue
        unnamed = [i for i, d in enumerate(s.shape) if d is None]
        if len(unnamed) == 1 and arr.shape[unnamed[0]] == n:
            axes[s.name] = unnamed[0]
    return BatchLayout(axes, layout.fixed, layout.symbol)


def _shape_str(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
