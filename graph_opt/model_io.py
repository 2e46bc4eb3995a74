"""Model I/O: loading with external data, atomic saving, validation, graphsurgeon conversion.

Loading checks what a user can get wrong before onnx does anything surprising: the path exists,
the bytes parse as a ModelProto that has a graph, every external-data reference stays inside the
model's folder and the referenced bytes exist. Saving never touches the input path and writes
through a temporary file renamed into place, so a crash leaves either the old file or the new one.
Models whose tensors exceed protobuf's 2 GB limit are saved with external data automatically;
model and data are two renames, so a crash between them leaves no model rather than a mismatched
pair. Leftovers of a killed save are hidden temporaries (``.<name>.*``), never ``*.onnx`` files.

Weights kept on disk. A model over 2 GB is loaded with its main-graph weights left in their files:
each such initializer stays an EXTERNAL tensor, and a private external-data key (`DISK_KEY`) holds
the absolute folder its `location` is relative to (an in-memory model has no folder of its own).
Copying such a model copies references, not bytes. Readers go through `read_array`/`read_raw`;
graphsurgeon reads them when a pass first touches them (`to_graph`); onnxruntime sessions and the
checker see a temporary folder where the weight files are hard-linked (copied across file systems);
`save_model` streams them into the output. The pipeline writes each step's new weights to a
temporary folder the same way (`spill`), so memory holds the weights a pass works on, not whole models.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graph_opt.errors import InvalidModelError, ModelLoadError, ModelSaveError
from graph_opt.onnx_util import all_graphs, first_line, gs_subgraphs

log = logging.getLogger(__name__)

# Protobuf refuses to serialize messages of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**20


def load_model(path: str | os.PathLike, *, check: bool = True,
               weights: Literal["auto", "memory", "disk"] = "auto") -> onnx.ModelProto:
    """Load an ONNX model with its external data; raise `ModelLoadError` with one clear line.

    `weights`: where the main-graph weights stored as external data live: "memory" loads them,
    "disk" leaves them in their files (see the module docstring), "auto" leaves them on disk when
    the model is over protobuf's 2 GB limit, where holding and serializing them would cost a copy
    of the weights per model in flight."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx may raise others
        raise ModelLoadError(f"{path} is not a valid ONNX model (cannot parse: {first_line(exc)})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(f"{path} is not a valid ONNX model (no graph or no IR version)")
    _load_external_data(model, path.parent.resolve(), path, weights)
    if check:
        try:
            if not needs_external_data(model):
                onnx.checker.check_model(model)
            elif has_disk_weights(model):  # on a weightless view: no weight is read
                _check_weightless(model, full=False)
        except Exception as exc:
            raise ModelLoadError(f"{path} fails onnx.checker: {first_line(exc)}") from None
    return model


def _load_external_data(model: onnx.ModelProto, base: Path, path: Path, weights: str = "memory") -> None:
    tensors = [t for t in external_data_helper._get_all_tensors(model) if _is_external(t)]
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
        sizes = {id(t): _known_length(t) for t in model.graph.initializer if _is_external(t)}
        keep = {k for k, size in sizes.items() if size is not None}
        if weights == "auto" and tensor_bytes(model) + sum(s or 0 for s in sizes.values()) < PROTOBUF_LIMIT:
            keep = set()
    try:
        for tensor in tensors:
            if id(tensor) in keep:
                _point_at(tensor, base, _ext_info(tensor)["location"], int(_ext_info(tensor).get("offset", 0) or 0),
                          _known_length(tensor))
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
    names = {_ext_info(t).get("location", "") for t in external_data_helper._get_all_tensors(model) if _is_external(t)}
    for name in sorted(n for n in names if n):
        data = path.parent / name
        if data.is_file() and _is_within(data.resolve(), path.parent.resolve()):
            total += data.stat().st_size
    return total


def _ext_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _known_length(tensor: onnx.TensorProto) -> int | None:
    """Bytes of an external tensor: its `length`, else computed from dims (None for packed types)."""
    length = _ext_info(tensor).get("length")
    if length:
        return int(length)
    if tensor.data_type in _PACKED_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        return None
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


# --- weights kept on disk -------------------------------------------------------------------

DISK_KEY = "graph_opt.dir"  # private external-data key: the absolute folder `location` is relative to
_CHUNK = 16 << 20  # bytes per read when weights are streamed from one file to another


def on_disk(tensor: onnx.TensorProto) -> bool:
    """True for a tensor whose bytes stay in a file (see the module docstring)."""
    return _is_external(tensor) and any(e.key == DISK_KEY for e in tensor.external_data)


def has_disk_weights(model: onnx.ModelProto) -> bool:
    return any(on_disk(t) for t in model.graph.initializer)


def _disk_ref(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    info = _ext_info(tensor)
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
    path, offset, length = _disk_ref(tensor)
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
    _copy_except(loaded, tensor, "external_data", "data_location")
    loaded.raw_data = read_raw(tensor)
    return numpy_helper.to_array(loaded)


def update_digest(h, model: onnx.ModelProto) -> None:
    """Feed `model` into the hash `h`: its serialization, with weights kept on disk fed by content
    (a tensor at a time), never by where they are: equal models hash equal wherever their files are."""
    if not has_disk_weights(model):
        h.update(model.SerializeToString(deterministic=True))
        return
    shell = copy_model(model)
    for tensor in shell.graph.initializer:
        if on_disk(tensor):
            h.update(tensor.name.encode() + read_raw(tensor))
            del tensor.external_data[:]
    h.update(shell.SerializeToString(deterministic=True))


def _copy_disk_bytes(tensor: onnx.TensorProto, data) -> None:
    """Append a kept-on-disk tensor's bytes to the open file `data`, a chunk at a time."""
    path, offset, length = _disk_ref(tensor)
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
def _writing_weights(where: Path) -> Iterator[None]:
    """A failed write of weights kept on disk (disk full, ...) as one clear `ModelSaveError`."""
    try:
        yield
    except OSError as exc:
        raise ModelSaveError(f"cannot write weights to {where}: {exc.strerror or exc} (graph-opt keeps the "
                             "weights of models over 2 GB on disk there: point TMPDIR at a folder with room "
                             "for them)") from None


def disk_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer for `value` kept on disk: its bytes written to a new file in `spill_dir()`."""
    with _writing_weights(spill_dir()):
        fd, path = tempfile.mkstemp(prefix="weights.", suffix=".bin", dir=spill_dir())
        with os.fdopen(fd, "wb") as data:
            return _write_array(data, Path(path), 0, value, name)[0]


def _write_array(data, path: Path, offset: int, value: np.ndarray, name: str) -> tuple[onnx.TensorProto, int]:
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
    if not any(len(t.raw_data) >= _EXTERNAL_THRESHOLD for t in model.graph.initializer):
        return model
    with _writing_weights(folder):
        fd, name = tempfile.mkstemp(prefix="weights.", suffix=".bin", dir=folder)
        with os.fdopen(fd, "wb") as data:
            return _external_shell(model, data, Path(name).name, keep_in=folder)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _is_within(target: Path, base: Path) -> bool:
    try:
        target.relative_to(base)
        return True
    except ValueError:
        return False


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all weight data (initializers, Constant nodes, subgraphs), without serializing;
    weights kept on disk count with their size."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if on_disk(t):
            total += _disk_ref(t)[2]
        elif t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialized as one protobuf with its weights: ≥ 2 GB, or
    weights kept on disk."""
    return has_disk_weights(model) or tensor_bytes(model) >= PROTOBUF_LIMIT


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               protect: tuple[str | os.PathLike, ...] = (),
               external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically (temporary file, then rename).

    `protect` lists paths that must never be overwritten (the input model). `external_data`
    None chooses automatically: external data when the model would exceed protobuf's 2 GB limit;
    the data then goes to `<name>.data` next to the model.
    """
    path = Path(path)
    target = path.resolve()
    for p in protect:
        if p is not None and Path(p).exists() and target == Path(p).resolve():
            raise ModelSaveError(f"refusing to overwrite the input model {p}; choose another output path")
    if not target.parent.is_dir():
        raise ModelSaveError(f"output directory does not exist: {target.parent}")
    if target.is_dir():
        raise ModelSaveError(f"output path is a directory: {target}")
    reading = {_disk_ref(t)[0].resolve() for t in model.graph.initializer if on_disk(t)}
    if (target.parent / (target.name + ".data")).resolve() in reading:
        raise ModelSaveError(f"refusing to overwrite {target.name}.data: the model's weights are read from it; "
                             "choose another output path")
    if external_data is None:
        external_data = tensor_bytes(model) >= PROTOBUF_LIMIT
    try:
        if external_data:
            _save_external(model, target)
        elif has_disk_weights(model):  # small enough for one file: read its weights back in
            write_atomic(target, _loaded_copy(model).SerializeToString())
        else:
            write_atomic(target, model.SerializeToString())
    except OSError as exc:
        raise ModelSaveError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def write_atomic(target: Path, payload: bytes) -> None:
    """Write bytes through a temporary file in the same folder, fsync, then rename into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_external(model: onnx.ModelProto, target: Path) -> None:
    """Model + `<name>.data`, both written in a private temp dir then renamed into place."""
    data_name = target.name + ".data"
    tmpdir = tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        tmp_model = Path(tmpdir) / (target.name + ".tmp")  # never a *.onnx file, even in a leftover
        with open(Path(tmpdir) / data_name, "wb") as data:
            shell = _external_shell(model, data, data_name)
        if shell.ByteSize() < PROTOBUF_LIMIT:
            tmp_model.write_bytes(shell.SerializeToString())
        else:  # heavy Constant nodes or subgraph weights: onnx moves every tensor (on a full copy)
            work = _loaded_copy(model) if has_disk_weights(model) else copy_model(model)
            onnx.save_model(work, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        del shell
        for written in (tmp_model, Path(tmpdir) / data_name):
            _fsync(written)
        # Two files cannot be replaced in one step. A previous model at `target` reads `data_name`
        # too, so it goes first: a kill between the renames must not leave the old model next to
        # the new data (it would load, with the wrong weights). Then the data, then the model: a
        # model file is only ever visible next to its own complete data.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        os.replace(Path(tmpdir) / data_name, target.parent / data_name)
        os.replace(tmp_model, target)
    finally:
        for leftover in Path(tmpdir).glob("*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)


def _loaded_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with its kept-on-disk weights read into memory."""
    out = copy_model(model)
    for tensor in out.graph.initializer:
        if on_disk(tensor):
            raw = read_raw(tensor)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            tensor.raw_data = raw
    return out


@contextlib.contextmanager
def session_source(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What `onnxruntime.InferenceSession` can read `model` from, valid inside the `with` block.

    The serialized bytes; or, for a model protobuf cannot serialize (≥ 2 GB, or weights kept on
    disk), the path of a temporary copy with external data (onnxruntime refuses absolute
    external-data paths in a model given as bytes, so a file it is), see `file_view`.
    """
    if not needs_external_data(model):
        yield model.SerializeToString()
        return
    with file_view(model) as path:
        yield str(path)


@contextlib.contextmanager
def file_view(model: onnx.ModelProto) -> Iterator[Path]:
    """`model` as a file with its weights as external data, in a temporary folder removed on exit.

    In-memory weights are written there; the files of weights kept on disk are hard-linked into
    the folder (no bytes copied; onnxruntime refuses symbolic links that leave the folder), or
    copied when the link fails (another file system). A session made inside the block keeps its
    weights after the folder is gone: it has read or mapped them, and a mapped file stays readable.
    """
    tmpdir = Path(tempfile.mkdtemp(prefix="graph-opt-session."))
    try:
        links: dict[Path, str | None] = {}
        for tensor in model.graph.initializer:
            if on_disk(tensor):
                source = _disk_ref(tensor)[0]
                if source not in links:
                    name = f"linked-{len(links)}.bin"
                    try:
                        os.link(source, tmpdir / name)
                        links[source] = name
                    except OSError:
                        links[source] = None
        path = tmpdir / "model.onnx"
        data_name = "model.onnx.data"
        with open(tmpdir / data_name, "wb") as data:
            shell = _external_shell(model, data, data_name, links=links)
        path.write_bytes(shell.SerializeToString())  # protobuf refuses a graph still over 2 GB
        del shell
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# Tensors below this many bytes stay inside the model file (onnx's default threshold too).
_EXTERNAL_THRESHOLD = 1024
# Offsets of external tensors are page-aligned, so onnxruntime may map them instead of copying.
_EXTERNAL_ALIGN = 4096


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the bytes of its main-graph initializers of ≥ 1 KB: they become
    external references to a file that does not exist. Names, types and dims stay, so shape
    inference, parameter counts and MACs work on it, on a model of any size, for the cost of its
    small tensors; running it or reading its weights does not."""
    return _external_shell(model, None, "weights-not-loaded")


# Element types whose bytes numpy (and onnxruntime's OrtValue) take as they are.
_SHAREABLE = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL")}


def detached(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` without the bytes of its in-memory main-graph weights (≥ 1 KB), and those weights.

    The model keeps each such initializer's name, type and dims as a reference to a file that does
    not exist, as `weightless_copy`; the arrays (read-only, one copy of the bytes) are handed to
    onnxruntime separately (`verify.make_session`), so a session costs neither a deep copy of the
    model nor its serialization. Weights kept on disk stay references to their files.
    """
    shell = onnx.ModelProto()
    _copy_except(shell, model, "graph")
    _copy_except(shell.graph, model.graph, "initializer")
    # onnxruntime drops an initializer nothing reads before it would take the handed-over array.
    read = _names_read(model.graph) | {o.name for o in model.graph.output}
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
        if len(raw) < _EXTERNAL_THRESHOLD:
            out.raw_data = raw
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        _point_at(out, None, "weights-handed-over", 0, len(raw))
    return shell, arrays


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of `graph` or of its subgraphs reads."""
    return {name for g in all_graphs(graph) for node in g.node for name in node.input}


def _external_shell(model: onnx.ModelProto, data, data_name: str, *, keep_in: Path | None = None,
                    links: dict[Path, str | None] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose main-graph initializers (≥ 1 KB of raw data) live in the open file
    `data` (None: nowhere), written here one tensor at a time. Unlike `CopyFrom` + `onnx.save_model`,
    the weights are never copied as a whole: a > 2 GB model saves with one tensor's worth of extra memory.

    Weights kept on disk are streamed into `data` too, unless `data` is None or `keep_in` is given
    (they stay references), or `links` names a link to their file next to `data`. With `keep_in`
    (the folder of `data`), the written weights are kept on disk there (`spill`)."""
    shell = onnx.ModelProto()
    _copy_except(shell, model, "graph")
    _copy_except(shell.graph, model.graph, "initializer")
    offset = 0
    for tensor in model.graph.initializer:
        out = shell.graph.initializer.add()
        if on_disk(tensor):
            source, at, length = _disk_ref(tensor)
            if data is None or keep_in is not None:
                out.CopyFrom(tensor)
                continue
            _copy_except(out, tensor, "external_data", "data_location")
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
        if len(raw) < _EXTERNAL_THRESHOLD:
            out.CopyFrom(tensor)
            continue
        _copy_except(out, tensor, "raw_data")
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
    _copy_except(shell, model, "graph")
    if not model.HasField("graph"):
        return shell.ByteSize()
    _copy_except(shell.graph, model.graph, "initializer")
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


def _copy_except(target, source, *skip: str) -> None:
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_model(model: onnx.ModelProto, *, without: Collection[str] = (), nodes: bool = True) -> onnx.ModelProto:
    """A deep copy (protobuf CopyFrom copies every byte, weights included; of weights kept on
    disk, only their references). The main-graph initializers named in `without` are left out,
    and with ``nodes=False`` the main graph's nodes: a pass that replaces some weights copies the
    others once and never the replaced ones (protobuf frees a replaced field's bytes only with its
    whole message)."""
    out = onnx.ModelProto()
    if not without and nodes:
        out.CopyFrom(model)
        return out
    _copy_except(out, model, "graph")
    _copy_except(out.graph, model.graph, "initializer", *(() if nodes else ("node",)))
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in without)
    return out


def check_model(model: onnx.ModelProto, *, full: bool = True) -> onnx.ModelProto:
    """Run onnx.checker (with strict shape inference when `full`); return the shape-inferred model.

    Raises `InvalidModelError` with the checker's first line.
    """
    try:
        if not needs_external_data(model):
            onnx.checker.check_model(model, full_check=full)
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=full)
        _check_weightless(model, full)
        return model
    except Exception as exc:
        raise InvalidModelError(f"model fails onnx.checker: {first_line(exc)}") from None


def _check_weightless(model: onnx.ModelProto, full: bool) -> None:
    """onnx.checker for a model over 2 GB or with weights on disk: the checker takes a file whose
    external data exists, and reads nothing of it (onnxruntime, which does, sees the real weights:
    `session_source`); empty stand-ins do, and hard links to the real files would be refused."""
    shell = weightless_copy(model)
    with tempfile.TemporaryDirectory(prefix="graph-opt-check.") as tmpdir:
        for tensor in external_data_helper._get_all_tensors(shell):
            if _is_external(tensor):
                stand_in = Path(tmpdir) / _ext_info(tensor)["location"]
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.touch()
        path = Path(tmpdir) / "model.onnx"
        path.write_bytes(shell.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full)


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """ModelProto → graphsurgeon Graph whose weights are private copies, made when first read.

    graphsurgeon imports weights lazily: a Constant's array is built on first access from the
    model's TensorProto (`LazyValues.load`, a fresh writable copy each time, cached per Constant), so
    editing it in place never reaches the caller's model, even through `Graph.copy()`. Weights a
    pass never reads are never turned into arrays and are exported from their TensorProto as they
    are: on a model of several GB this saves a full copy of the weights per pass. Weights kept on
    disk are read from their file instead (`peek` reads one without caching it), and `to_model`
    writes the ones a pass rewrote to `spill_dir()`.
    """
    model, opaque = _hide_packed(model)
    graph = gs.import_onnx(model)
    graph._graph_opt_packed = opaque  # restored by to_model
    graph._graph_opt_disk = has_disk_weights(model)  # its rewritten weights are exported to disk too
    for tensor in _all_tensors(graph):  # weights kept on disk: read from their file when first used
        lazy = getattr(tensor, "_values", None) if isinstance(tensor, gs.Constant) else None
        if type(lazy) is LazyValues and on_disk(lazy.tensor):
            tensor._values = _DiskValues(lazy.tensor)
            tensor._graph_opt_source = lazy.tensor  # what `_arrays_to_disk` compares a read weight with
            tensor.data_location = None  # a weight a pass rewrites is exported with its bytes
    return graph


def peek(constant: gs.Constant) -> np.ndarray:
    """A Constant's array. One kept on disk and not yet loaded is read without being cached in
    the graph, and comes back read-only: scoring every weight of a model over 2 GB then holds one
    at a time, and an in-place edit (which the graph would not see) fails loudly."""
    lazy = constant._values
    if type(lazy) is _DiskValues:
        value = lazy.load()
        value.flags.writeable = False
        return value
    return constant.values


def weights_on_disk(graph: gs.Graph) -> bool:
    """True for a graph from `to_graph` of a model whose weights are kept on disk."""
    return bool(getattr(graph, "_graph_opt_disk", False))


class _DiskValues(LazyValues):
    """graphsurgeon's lazy weight, for a tensor kept on disk."""

    def load(self) -> np.ndarray:
        return read_array(self.tensor)


def _export(graph: gs.Graph) -> onnx.ModelProto:
    """`gs.export_onnx`, with each never-read weight's bytes copied once, straight into the result.

    graphsurgeon exports a never-read Constant by putting its source TensorProto in a GraphProto
    (one copy of the bytes) that `make_model` then copies into the ModelProto (a second one), and
    renames that source in place when a pass renamed the Constant (an edit of the caller's model).
    Here the exporter sees a stub without the bytes instead; the bytes go into the exported tensor.
    """
    sources: dict[str, onnx.TensorProto] = {}
    swapped: list[tuple[gs.Constant, LazyValues | np.ndarray]] = []  # restored in reverse, whatever happens
    try:
        if weights_on_disk(graph):
            _arrays_to_disk(graph, swapped)
        _stub_lazy_weights(graph, swapped, sources)
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, lazy in reversed(swapped):
            tensor._values = lazy
    for t in external_data_helper._get_all_tensors(model):
        source = sources.get(t.name)
        if source is not None and not t.HasField("raw_data"):
            t.raw_data = source.raw_data
    return model


def _stub_lazy_weights(graph: gs.Graph, swapped: list, sources: dict[str, onnx.TensorProto]) -> None:
    """Give never-read weights a stub for the exporter: a copy of a reference kept on disk, or a
    tensor without its bytes (`sources` keeps where they are)."""
    for tensor in _all_tensors(graph):
        lazy = getattr(tensor, "_values", None) if isinstance(tensor, gs.Constant) else None
        if type(lazy) is _DiskValues:  # exported as the same reference, under the Constant's name
            stub = onnx.TensorProto()
            stub.CopyFrom(lazy.tensor)
            swapped.append((tensor, lazy))
            tensor._values = LazyValues(stub)
        elif type(lazy) is LazyValues and lazy.tensor.HasField("raw_data"):
            stub = onnx.TensorProto()
            _copy_except(stub, lazy.tensor, "raw_data")
            swapped.append((tensor, lazy))
            sources[tensor.name] = lazy.tensor
            tensor._values = LazyValues(stub)


# dtypes whose numpy bytes are their ONNX raw_data, as graphsurgeon would export them
_PLAIN_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                       "uint8", "uint16", "uint32", "uint64", "bool")}


def _arrays_to_disk(graph: gs.Graph, swapped: list) -> None:
    """Write the main graph's weights a pass turned into arrays (≥ 1 KB) to a new file in
    `spill_dir()` and give their Constants a reference to it, for a model whose weights are kept on
    disk: its export then holds no weight bytes (the caller restores the arrays listed in `swapped`
    afterwards, also after a failed write).

    A weight that was only read (equal to its file) drops its array for good and keeps pointing at
    its file: a pass that scores every weight does not keep a copy of all of them in memory."""
    gc.collect()  # weights a pass replaced are garbage in graphsurgeon's reference cycles: free them first
    with _writing_weights(spill_dir()):
        fd, name = tempfile.mkstemp(prefix="weights.", suffix=".bin", dir=spill_dir())
        with os.fdopen(fd, "wb") as data:
            _write_arrays(graph, data, Path(name), swapped)


def _write_arrays(graph: gs.Graph, data, path: Path, swapped: list) -> None:
    offset = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None) if isinstance(tensor, gs.Constant) else None
        if (not isinstance(values, np.ndarray) or values.nbytes < _EXTERNAL_THRESHOLD
                or values.dtype not in _PLAIN_DTYPES):
            continue
        source = getattr(tensor, "_graph_opt_source", None)
        if source is not None and tuple(source.dims) == values.shape:
            original = read_array(source)
            same = original.dtype == values.dtype and np.array_equal(original, values)
            del original
            if same:
                tensor._values = _DiskValues(source)
                continue
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        export = getattr(tensor, "_export_dtype", None)  # graphsurgeon converts on export: leave those to it
        if export is not None and (export if isinstance(export, int) else
                                   onnx.helper.np_dtype_to_tensor_dtype(np.dtype(export))) != onnx_type:
            continue
        stub, offset = _write_array(data, path, offset, values, tensor.name)
        swapped.append((tensor, values))
        tensor._values = _DiskValues(stub)


# Sub-byte element types (int4/int2 and friends): graphsurgeon cannot round-trip their packed
# bytes, so they cross the graphsurgeon boundary as graph inputs and come back untouched.
_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1")
                 if hasattr(onnx.TensorProto, n)}


def _hide_packed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    packed = [t for t in model.graph.initializer if t.data_type in _PACKED_TYPES]
    if not packed:
        return model, {}
    work = copy_model(model)
    keep = [t for t in work.graph.initializer if t.data_type not in _PACKED_TYPES]
    del work.graph.initializer[:]
    work.graph.initializer.extend(keep)
    inputs = {i.name for i in work.graph.input}
    for t in packed:
        if t.name not in inputs:
            work.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return work, {t.name: t for t in packed}


def _restore_packed(model: onnx.ModelProto, packed: dict[str, onnx.TensorProto]) -> None:
    used = _names_read(model.graph) | {o.name for o in model.graph.output}  # subgraphs' reads count too
    kept_inputs = [i for i in model.graph.input if i.name not in packed]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    model.graph.initializer.extend(t for name, t in packed.items() if name in used)


def _restore_initializer_inputs(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """graphsurgeon drops initializers from the graph inputs. Below IR 4 every initializer must be
    a graph input (the checker rejects the model otherwise); from IR 4 on, an initializer listed
    as an input is an overridable default, part of the model's interface: keep the ones that remain."""
    inputs = {i.name for i in model.graph.input}
    if like.ir_version < 4:
        wanted = [t for t in model.graph.initializer if t.name not in inputs]
    else:
        was_input = {i.name for i in like.graph.input} & {t.name for t in like.graph.initializer}
        wanted = [t for t in model.graph.initializer if t.name in was_input and t.name not in inputs]
    for t in wanted:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _all_tensors(graph: gs.Graph):
    seen = set()
    for g in [graph, *gs_subgraphs(graph)]:
        for tensor in g.tensors().values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """graphsurgeon Graph → ModelProto keeping `like`'s IR version, opsets, metadata and functions."""
    model = _export(graph)
    _restore_packed(model, getattr(graph, "_graph_opt_packed", {}))
    _restore_initializer_inputs(model, like)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)
    return model
