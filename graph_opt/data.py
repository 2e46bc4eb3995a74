"""Input data for verification and calibration.

Sources, all turned into one `Dataset` (arrays of N samples per model input, plus optional labels):

- an ``.npz`` file whose keys are the model's input names (a single-input model also accepts a
  file with one array under any name); an optional ``labels`` key holds class labels;
- a directory of such ``.npz`` files, concatenated in sorted order;
- an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()`` returning a feed dict or
  None), from Python;
- seeded random tensors built from the model's input specs (the default when no data is given).

Dynamic dimensions are bound with ``name=1x3x224x224`` specs; a leading (batch) dimension left
unbound defaults to 1, any other unbound dynamic dimension is an error that says how to bind it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from graph_opt.errors import DataError

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


def bind_shapes(model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every input: overrides first, then static dims, batch dim 1."""
    overrides = dict(overrides or {})
    specs = input_specs(model)
    names = [s.name for s in specs]
    for name in overrides:
        if name not in names:
            raise DataError(f"no model input named {name!r} (inputs: {', '.join(names)})")
    shapes = {}
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
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(1)
            else:
                raise DataError(
                    f"input {spec.name!r} has a dynamic dimension {dim or '?'} at axis {axis}; "
                    f"bind it with --input-shape {spec.name}=" + "x".join(str(d) if isinstance(d, int) else "N" for d in spec.shape))
        shapes[spec.name] = tuple(shape)
    return shapes


@dataclass
class Dataset:
    """N samples for every model input (stacked on axis 0) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield {k: v[start:stop] for k, v in self.inputs.items()}

    def take(self, n: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.source)

    def sample(self, index: int = 0) -> dict[str, np.ndarray]:
        """One sample as a batch of 1 (for latency measurement)."""
        return {k: v[index:index + 1] for k, v in self.inputs.items()}


def batch_size_for(model: onnx.ModelProto, requested: int = 32) -> int:
    """A model with a static leading dimension takes exactly that many samples per run."""
    sizes = {s.shape[0] for s in input_specs(model) if s.shape and isinstance(s.shape[0], int)}
    if len(sizes) == 1:
        return sizes.pop()
    return requested


def random_dataset(model: onnx.ModelProto, n: int = 8, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                   seed: int = 0) -> Dataset:
    """Seeded random inputs from the model's specs: N(0,1) floats; small ints for integer inputs.

    Integer inputs follow common conventions: names containing 'mask' get ones, 'type' zeros
    (token type ids), anything else values in [0, 100) (token ids in any vocabulary).
    """
    rng = np.random.default_rng(seed)
    bound = bind_shapes(model, shapes)
    inputs = {}
    for spec in input_specs(model):
        shape = bound[spec.name]
        per_sample = shape[1:] if shape else ()
        full = (n * shape[0], *per_sample) if shape else ()
        if spec.dtype.kind == "f":
            arr = rng.standard_normal(full).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arr = rng.integers(0, 2, full).astype(bool)
        elif spec.dtype.kind in "iu":
            lname = spec.name.lower()
            if "mask" in lname:
                arr = np.ones(full, spec.dtype)
            elif "type" in lname:
                arr = np.zeros(full, spec.dtype)
            else:
                arr = rng.integers(0, 100, full).astype(spec.dtype)
        else:
            raise DataError(f"cannot make random data for input {spec.name!r} of type {spec.dtype}")
        inputs[spec.name] = arr
    return Dataset(inputs, None, f"random(seed={seed}, n={n})")


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
        data = _from_reader(source)
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
            merged = {k: np.concatenate([p[k] for p in parts]) for k in keys}
            data = _from_arrays(merged, str(path))
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
        raise DataError(f"cannot read {path} as .npz: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _from_arrays(arrays: dict[str, np.ndarray], source: str) -> Dataset:
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError(f"{source} holds no input arrays")
    return Dataset({k: np.asarray(v) for k, v in arrays.items()}, None if labels is None else np.asarray(labels), source)


def _from_reader(reader: Any) -> Dataset:
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    if not feeds:
        raise DataError("the data reader returned no samples")
    keys = set(feeds[0])
    merged = {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in keys}
    return Dataset(merged, None, type(reader).__name__)


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
    n = None
    out = {}
    for spec in specs:
        arr = inputs[spec.name]
        if arr.ndim != len(spec.shape):
            raise DataError(f"{data.source}: {spec.name!r} has shape {arr.shape}, model expects rank {len(spec.shape)} {_shape_str(spec.shape)}")
        for axis, dim in enumerate(spec.shape):
            if axis and isinstance(dim, int) and arr.shape[axis] != dim:
                raise DataError(f"{data.source}: {spec.name!r} has shape {arr.shape}, model expects {_shape_str(spec.shape)}")
        if arr.dtype != spec.dtype:
            if arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                arr = arr.astype(spec.dtype)
            else:
                raise DataError(f"{data.source}: {spec.name!r} is {arr.dtype}, model expects {spec.dtype}")
        if n is None:
            n = arr.shape[0] if arr.ndim else 1
        elif arr.ndim and arr.shape[0] != n:
            raise DataError(f"{data.source}: inputs disagree on the number of samples ({n} vs {arr.shape[0]} for {spec.name!r})")
        out[spec.name] = arr
    labels = data.labels
    if labels is not None and n is not None and len(labels) != n:
        raise DataError(f"{data.source}: {len(labels)} labels for {n} samples")
    return Dataset(out, labels, data.source)


def _shape_str(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
