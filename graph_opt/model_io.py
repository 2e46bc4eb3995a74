"""Model I/O: loading with external data, atomic saving, copying, validation, session sources.

Loading checks what a user can get wrong before onnx does anything surprising: the path exists,
the bytes parse as a ModelProto that has a graph, every external-data reference stays inside the
model's folder and the referenced bytes exist. Saving never touches the input path and writes
through a temporary file renamed into place, so a crash leaves either the old file or the new one.
Models whose tensors exceed protobuf's 2 GB limit are saved with external data automatically;
model and data are two renames, so a crash between them leaves no model rather than a mismatched
pair. Leftovers of a killed save are hidden temporaries (``.<name>.*``), never ``*.onnx`` files.

A model over 2 GB is loaded with its weights kept on disk (`graph_opt.external_data`): copying it
copies references, checking it reads no weight, and saving streams the weights into the output.
The conversion to and from graphsurgeon lives in `graph_opt.gs_convert`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Literal

import onnx
from onnx import external_data_helper

from graph_opt.errors import InvalidModelError, ModelLoadError, ModelSaveError
from graph_opt.external_data import (copy_except, disk_ref, external_info, external_shell, has_disk_weights,
                                     is_external, needs_external_data, on_disk, over_protobuf_limit, read_raw,
                                     resolve_external_data, tensor_bytes, weightless_copy)
from graph_opt.onnx_util import first_line

log = logging.getLogger(__name__)


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
    resolve_external_data(model, path.parent.resolve(), path, weights)
    if check:
        try:
            if not needs_external_data(model):
                onnx.checker.check_model(model)
            elif has_disk_weights(model):  # on a weightless view: no weight is read
                _check_weightless(model, full=False)
        except Exception as exc:
            raise ModelLoadError(f"{path} fails onnx.checker: {first_line(exc)}") from None
    return model


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
    reading = {disk_ref(t)[0].resolve() for t in model.graph.initializer if on_disk(t)}
    if (target.parent / (target.name + ".data")).resolve() in reading:
        raise ModelSaveError(f"refusing to overwrite {target.name}.data: the model's weights are read from it; "
                             "choose another output path")
    if external_data is None:
        external_data = over_protobuf_limit(tensor_bytes(model))
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


def umask_mode(mode: int) -> int:
    """`mode` as the process's umask leaves it: what `open()` or `mkdir()` would have given. Temporary
    files and folders are private (0600/0700); an output renamed into place gets this instead."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_atomic(target: Path, payload: bytes) -> None:
    """Write bytes through a temporary file in the same folder, fsync, then rename into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))
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
            shell = external_shell(model, data, data_name)
        if not over_protobuf_limit(shell.ByteSize()):
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
    copy_except(out, model, "graph")
    copy_except(out.graph, model.graph, "initializer", *(() if nodes else ("node",)))
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in without)
    return out


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


def check_model(model: onnx.ModelProto, *, full: bool = True, infer: bool = True) -> onnx.ModelProto:
    """Run onnx.checker (with strict shape inference when `full`); return the shape-inferred model.

    ``infer=False``: only check, and return `model` itself. The full check already runs strict,
    type-checking shape inference (the options `onnx.shape_inference.infer_shapes` is given here);
    inferring again only builds the returned copy, which costs a serialization of the whole
    model each way.
    Raises `InvalidModelError` with the checker's first line.
    """
    try:
        if not needs_external_data(model):
            onnx.checker.check_model(model, full_check=full)
            if not infer:
                return model
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
            if is_external(tensor):
                stand_in = Path(tmpdir) / external_info(tensor)["location"]
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.touch()
        path = Path(tmpdir) / "model.onnx"
        path.write_bytes(shell.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full)


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
                source = disk_ref(tensor)[0]
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
            shell = external_shell(model, data, data_name, links=links)
        path.write_bytes(shell.SerializeToString())  # protobuf refuses a graph still over 2 GB
        del shell
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
