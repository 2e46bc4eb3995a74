"""Weights outside the protobuf: external-data references, weights kept on disk, and views of a
model without its weight bytes.

External data. A tensor stored outside the model file is a reference (`location`, `offset`,
`length`) relative to the model's folder. Loading (`resolve_external_data`) refuses a reference that
leaves that folder, names a missing file or reaches past its end, before any byte is read.

Weights kept on disk. A model over 2 GB is loaded with its main-graph weights left in their files:
each such initializer stays an EXTERNAL tensor, and a private external-data key (`DISK_KEY`) holds
the absolute folder its `location` is relative to (an in-memory model has no folder of its own).
Copying such a model copies references, not bytes. Readers go through `read_array`/`read_raw`;
graphsurgeon reads them when a pass first touches them (`graph_opt.gs_convert.to_graph`);
onnxruntime sessions and the checker see a temporary folder where the weight files are hard-linked
(copied across file systems); saving streams them into the output. The pipeline writes each step's
new weights to a temporary folder the same way (`spill`), so memory holds the weights a pass works
on, not whole models.

Views without the bytes. `weightless_copy` keeps names, types and dims (shape inference, counts,
the checker); `detached` hands the bytes to onnxruntime as arrays; `external_shell` writes them to
an open file one tensor at a time, so a model over 2 GB is saved with one tensor's worth of extra
memory; `wire_size` is a model's serialized size computed without serializing its weights.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from graph_opt.errors import ModelLoadError, ModelSaveError
from graph_opt.onnx_util import all_graphs, first_line

# Protobuf refuses to serialize messages of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**20


def over_protobuf_limit(nbytes: int) -> bool:
    """True when `nbytes` of weights (or of a serialized message) cannot be one protobuf."""
    return nbytes >= PROTOBUF_LIMIT


# Tensors below this many bytes stay inside the model file (onnx's default threshold too).
EXTERNAL_THRESHOLD = 1024

# Offsets of external tensors are page-aligned, so onnxruntime may map them instead of copying.
_EXTERNAL_ALIGN = 4096

# Sub-byte element types (int4/int2 and friends): graphsurgeon cannot round-trip their packed
# bytes, so they cross the graphsurgeon boundary as graph inputs and come back untouched.
PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, n)}


def resolve_external_data(model: onnx.ModelProto, base: Path, path: Path, weights: str = "memory") -> None:
    """Check every external reference of `model` (loaded from `path` in folder `base`) and load
    its bytes, or with `weights` "disk" (or "auto" over the limit) keep the main-graph weights on
    disk; raise `ModelLoadError` with one clear line."""
    tensors = [t for t in external_data_helper._get_all_tensors(model) if is_external(t)]
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or not _is_within(target, base):
            raise ModelLoadError(
                f"{path}: external data location {location!r} of tensor {tensor.name!r} "
                "points outside the model's folder; refusing to read it")
        if not target.is_file():
            raise ModelLoadError(f"{path}: external data file missing for tensor {tensor.name!r}: {target}")
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        needed = offset + (int(length) if length else 0)
        if target.stat().st_size < needed:
            raise ModelLoadError(
                f"{path}: external data file {target.name} is truncated "
                f"(tensor {tensor.name!r} needs {needed} bytes, file has {target.stat().st_size})")
    if not tensors:
        return
    keep = set()
    if weights != "memory":
        sizes = {id(t): _known_length(t) for t in model.graph.initializer if is_external(t)}
        keep = {k for k, size in sizes.items() if size is not None}
        if weights == "auto" and tensor_bytes(model) + sum(s or 0 for s in sizes.values()) < PROTOBUF_LIMIT:
            keep = set()
    try:
        for tensor in tensors:
            if id(tensor) in keep:
                info = external_info(tensor)
                _point_at(tensor, base, info["location"], int(info.get("offset", 0) or 0), _known_length(tensor))
            else:
                external_data_helper.load_external_data_for_tensor(tensor, str(base))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read external data: {first_line(exc)}") from None


def stored_bytes(path: str | os.PathLike) -> int:
    """Bytes a saved model takes: its file plus the external-data files its tensors name."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: its own size is all there is
        return total
    names = {external_info(t).get("location", "") for t in external_data_helper._get_all_tensors(model)
             if is_external(t)}
    for name in sorted(n for n in names if n):
        data = path.parent / name
        if data.is_file() and _is_within(data.resolve(), path.parent.resolve()):
            total += data.stat().st_size
    return total


def is_external(tensor: onnx.TensorProto) -> bool:
    """True for a tensor stored as an external-data reference (kept on disk or not)."""
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _is_within(target: Path, base: Path) -> bool:
    try:
        target.relative_to(base)
        return True
    except ValueError:
        return False


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's external-data entries (`location`, `offset`, `length`, ...) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def _known_length(tensor: onnx.TensorProto) -> int | None:
    """Bytes of an external tensor: its `length`, else computed from dims (None for packed types)."""
    length = external_info(tensor).get("length")
    if length:
        return int(length)
    if tensor.data_type in PACKED_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        return None
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


# --- weights kept on disk -------------------------------------------------------------------

DISK_KEY = "graph_opt.dir"  # private external-data key: the absolute folder `location` is relative to

_CHUNK = 16 << 20  # bytes per read when weights are streamed from one file to another


def on_disk(tensor: onnx.TensorProto) -> bool:
    """True for a tensor whose bytes stay in a file (see the module docstring)."""
    return is_external(tensor) and any(e.key == DISK_KEY for e in tensor.external_data)


def has_disk_weights(model: onnx.ModelProto) -> bool:
    """True when some main-graph initializer of `model` is kept on disk."""
    return any(on_disk(t) for t in model.graph.initializer)


def disk_ref(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor kept on disk."""
    info = external_info(tensor)
    return Path(info[DISK_KEY]) / info["location"], int(info.get("offset", 0) or 0), int(info["length"])


def _point_at(tensor: onnx.TensorProto, folder: Path | None, location: str, offset: int, length: int) -> None:
    """Make `tensor` an external reference (without bytes); with `folder`, one kept on disk."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = [("location", location), ("offset", str(offset)), ("length", str(length))]
    if folder is not None:
        entries.append((DISK_KEY, str(folder)))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def read_raw(tensor: onnx.TensorProto) -> bytes:
    """The raw bytes of a tensor, read from its file when it is kept on disk."""
    if not on_disk(tensor):
        return tensor.raw_data
    path, offset, length = disk_ref(tensor)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(length)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the weights of {tensor.name!r} from {path}: {exc.strerror or exc}") from None
    if len(raw) != length:
        raise ModelLoadError(f"the weights of {tensor.name!r} in {path} are truncated (file changed since loading?)")
    return raw


def read_array(tensor: onnx.TensorProto) -> np.ndarray:
    """`numpy_helper.to_array` for any tensor, including one kept on disk."""
    if not on_disk(tensor):
        return numpy_helper.to_array(tensor)
    loaded = onnx.TensorProto()
    copy_except(loaded, tensor, "external_data", "data_location")
    loaded.raw_data = read_raw(tensor)
    return numpy_helper.to_array(loaded)


def _copy_disk_bytes(tensor: onnx.TensorProto, data) -> None:
    """Append a kept-on-disk tensor's bytes to the open file `data`, a chunk at a time."""
    path, offset, length = disk_ref(tensor)
    with open(path, "rb") as src:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(left, _CHUNK))
            if not chunk:
                raise ModelSaveError(f"the weights of {tensor.name!r} in {path} are truncated")
            data.write(chunk)
            left -= len(chunk)


_spill_dir: list[Path] = []


def spill_dir() -> Path:
    """This process's temporary folder for weights kept on disk, removed when the process exits.

    Its name carries the process id: the folders of killed runs (no exit handler ran) are removed
    by the next run that needs one."""
    if not _spill_dir or not _spill_dir[0].is_dir():
        _remove_orphaned_spill_dirs()
        folder = Path(tempfile.mkdtemp(prefix=f"graph-opt-weights.{os.getpid()}."))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _spill_dir[:] = [folder]
    return _spill_dir[0]


def _remove_orphaned_spill_dirs() -> None:
    for folder in Path(tempfile.gettempdir()).glob("graph-opt-weights.*.*"):
        pid = folder.name.split(".")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # exists, owned by someone else
            pass


@contextlib.contextmanager
def writing_weights(where: Path) -> Iterator[None]:
    """A failed write of weights kept on disk (disk full, ...) as one clear `ModelSaveError`."""
    try:
        yield
    except OSError as exc:
        raise ModelSaveError(f"cannot write weights to {where}: {exc.strerror or exc} (graph-opt keeps the "
                             "weights of models over 2 GB on disk there: point TMPDIR at a folder with room "
                             "for them)") from None


def disk_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer for `value` kept on disk: its bytes written to a new file in `spill_dir()`."""
    with writing_weights(spill_dir()):
        fd, path = tempfile.mkstemp(prefix="weights.", suffix=".bin", dir=spill_dir())
        with os.fdopen(fd, "wb") as data:
            return write_array(data, Path(path), 0, value, name)[0]


def write_array(data, path: Path, offset: int, value: np.ndarray, name: str) -> tuple[onnx.TensorProto, int]:
    """Append `value`'s bytes (little-endian, page-aligned) to the open file `data` (at `path`, now
    `offset` bytes long); return a tensor kept on disk that points at them, and the new length."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    pad = -offset % _EXTERNAL_ALIGN
    data.write(b"\0" * pad)
    data.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).data)
    _point_at(tensor, path.parent, path.name, offset + pad, value.nbytes)
    return tensor, offset + pad + value.nbytes


def spill(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """A copy of `model` whose in-memory main-graph weights (≥ 1 KB) are written to a new file in
    `folder` and kept on disk there; weights already on disk stay where they are. A model holding
    no such weight in memory comes back as it is."""
    if not any(len(t.raw_data) >= EXTERNAL_THRESHOLD for t in model.graph.initializer):
        return model
    with writing_weights(folder):
        fd, name = tempfile.mkstemp(prefix="weights.", suffix=".bin", dir=folder)
        with os.fdopen(fd, "wb") as data:
            return external_shell(model, data, Path(name).name, keep_in=folder)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all weight data (initializers, Constant nodes, subgraphs), without serializing;
    weights kept on disk count with their size."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if on_disk(t):
            total += disk_ref(t)[2]
        elif t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialized as one protobuf with its weights: ≥ 2 GB, or
    weights kept on disk."""
    return has_disk_weights(model) or tensor_bytes(model) >= PROTOBUF_LIMIT


# --- views without the weight bytes ---------------------------------------------------------

def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the bytes of its main-graph initializers of ≥ 1 KB: they become
    external references to a file that does not exist. Names, types and dims stay, so shape
    inference, parameter counts and MACs work on it, on a model of any size, for the cost of its
    small tensors; running it or reading its weights does not."""
    return external_shell(model, None, "weights-not-loaded")


# Element types whose bytes numpy (and onnxruntime's OrtValue) take as they are.
_SHAREABLE = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL")}


def detached(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` without the bytes of its in-memory main-graph weights (≥ 1 KB), and those weights.

    The model keeps each such initializer's name, type and dims as a reference to a file that does
    not exist, as `weightless_copy`; the arrays (read-only, one copy of the bytes) are handed to
    onnxruntime separately (`runtime.make_session`), so a session costs neither a deep copy of the
    model nor its serialization. Weights kept on disk stay references to their files.
    """
    shell = onnx.ModelProto()
    copy_except(shell, model, "graph")
    copy_except(shell.graph, model.graph, "initializer")
    # onnxruntime drops an initializer nothing reads before it would take the handed-over array.
    read = names_read(model.graph) | {o.name for o in model.graph.output}
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        out = shell.graph.initializer.add()
        if (on_disk(tensor) or tensor.data_type not in _SHAREABLE or not tensor.HasField("raw_data")
                or tensor.name in arrays or tensor.name not in read):
            out.CopyFrom(tensor)
            continue
        raw = b""  # read once: protobuf hands out a new copy of the bytes on every access
        for fd, value in tensor.ListFields():
            if fd.name == "raw_data":
                raw = value
            else:
                _copy_field(out, fd, value)
        if len(raw) < EXTERNAL_THRESHOLD:
            out.raw_data = raw
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        _point_at(out, None, "weights-handed-over", 0, len(raw))
    return shell, arrays


def handed_over(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer named `name` whose bytes are `array`, handed to onnxruntime separately
    (`runtime.make_session`'s ``weights``), as `detached` leaves the weights it takes out."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                              dims=array.shape)
    _point_at(tensor, None, "weights-handed-over", 0, array.nbytes)
    return tensor


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of `graph` or of its subgraphs reads."""
    return {name for g in all_graphs(graph) for node in g.node for name in node.input}


def external_shell(model: onnx.ModelProto, data, data_name: str, *, keep_in: Path | None = None,
                   links: dict[Path, str | None] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose main-graph initializers (≥ 1 KB of raw data) live in the open file
    `data` (None: nowhere), written here one tensor at a time. Unlike `CopyFrom` + `onnx.save_model`,
    the weights are never copied as a whole: a > 2 GB model saves with one tensor's worth of extra memory.

    Weights kept on disk are streamed into `data` too, unless `data` is None or `keep_in` is given
    (they stay references), or `links` names a link to their file next to `data`. With `keep_in`
    (the folder of `data`), the written weights are kept on disk there (`spill`)."""
    shell = onnx.ModelProto()
    copy_except(shell, model, "graph")
    copy_except(shell.graph, model.graph, "initializer")
    offset = 0
    for tensor in model.graph.initializer:
        out = shell.graph.initializer.add()
        if on_disk(tensor):
            source, at, length = disk_ref(tensor)
            if data is None or keep_in is not None:
                out.CopyFrom(tensor)
                continue
            copy_except(out, tensor, "external_data", "data_location")
            if links is not None and links.get(source):
                _point_at(out, None, links[source], at, length)
                continue
            pad = -offset % _EXTERNAL_ALIGN
            data.write(b"\0" * pad)
            _copy_disk_bytes(tensor, data)
            _point_at(out, None, data_name, offset + pad, length)
            offset += pad + length
            continue
        raw = tensor.raw_data if tensor.HasField("raw_data") else b""
        if len(raw) < EXTERNAL_THRESHOLD:
            out.CopyFrom(tensor)
            continue
        copy_except(out, tensor, "raw_data")
        pad = -offset % _EXTERNAL_ALIGN
        if data is not None:
            data.write(b"\0" * pad + raw)
        _point_at(out, keep_in, data_name, offset + pad, len(raw))
        offset += pad + len(raw)
        del raw
    return shell


def wire_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` without encoding the main graph's weights: protobuf computes a
    message's size by serializing it, which for a 1 GB model is a 1 GB buffer. The model is sized
    with its initializers' raw bytes left out, and each one's field is added back by the wire
    format's rule (tag, length varint, bytes)."""
    shell = onnx.ModelProto()
    copy_except(shell, model, "graph")
    if not model.HasField("graph"):
        return shell.ByteSize()
    copy_except(shell.graph, model.graph, "initializer")
    without = shell.graph.ByteSize()
    graph = without
    for tensor in model.graph.initializer:
        head = onnx.TensorProto()
        raw = None
        for fd, value in tensor.ListFields():
            if fd.name == "raw_data":
                raw = len(value)
            else:
                _copy_field(head, fd, value)
        size = head.ByteSize() + (0 if raw is None else _field_size(_RAW_DATA_TAG, raw))
        graph += _field_size(_INITIALIZER_TAG, size)
    return shell.ByteSize() - _field_size(_GRAPH_TAG, without) + _field_size(_GRAPH_TAG, graph)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_size(tag_bytes: int, length: int) -> int:
    """Bytes of one length-delimited field of `length` bytes: tag, length as a varint, payload."""
    return tag_bytes + _varint_size(length) + length


# Tag bytes of the length-delimited fields `wire_size` adds back (field number, wire type 2).
_RAW_DATA_TAG = _varint_size(onnx.TensorProto.RAW_DATA_FIELD_NUMBER << 3 | 2)
_INITIALIZER_TAG = _varint_size(onnx.GraphProto.INITIALIZER_FIELD_NUMBER << 3 | 2)
_GRAPH_TAG = _varint_size(onnx.ModelProto.GRAPH_FIELD_NUMBER << 3 | 2)


def copy_except(target, source, *skip: str) -> None:
    """Copy every set field of protobuf `source` into `target`, except the fields named in `skip`."""
    for fd, value in source.ListFields():
        if fd.name not in skip:
            _copy_field(target, fd, value)


def _copy_field(message, fd, value) -> None:
    if fd.is_repeated:
        getattr(message, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(message, fd.name).CopyFrom(value)
    else:
        setattr(message, fd.name, value)
