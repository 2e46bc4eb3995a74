"""ModelProto ↔ graphsurgeon Graph: weights copied only when a pass first reads them.

`to_graph` imports a model whose weights graphsurgeon builds lazily, as private copies, so a pass
may edit the arrays it reads without reaching the caller's model; weights a pass never reads are
never turned into arrays, and `to_model` copies their bytes once, straight into the exported model.
Weights kept on disk (`graph_opt.external_data`) are read from their files when first used, and the
ones a pass rewrote go to a new file in `spill_dir()` on export. Sub-byte element types (int4 and friends),
which graphsurgeon cannot round-trip, cross the boundary as graph inputs and come back untouched.
`to_model` keeps the source model's IR version, opsets, metadata and functions, and the
initializers it listed as graph inputs.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graph_opt.external_data import (EXTERNAL_THRESHOLD, PACKED_TYPES, copy_except, has_disk_weights, names_read,
                                     on_disk, read_array, spill_dir, write_array, writing_weights)
from graph_opt.model_io import copy_model
from graph_opt.onnx_util import gs_subgraphs


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
            copy_except(stub, lazy.tensor, "raw_data")
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
    with writing_weights(spill_dir()):
        fd, name = tempfile.mkstemp(prefix="weights.", suffix=".bin", dir=spill_dir())
        with os.fdopen(fd, "wb") as data:
            _write_arrays(graph, data, Path(name), swapped)


def _write_arrays(graph: gs.Graph, data, path: Path, swapped: list) -> None:
    offset = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None) if isinstance(tensor, gs.Constant) else None
        if (not isinstance(values, np.ndarray) or values.nbytes < EXTERNAL_THRESHOLD
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
        stub, offset = write_array(data, path, offset, values, tensor.name)
        swapped.append((tensor, values))
        tensor._values = _DiskValues(stub)


def _hide_packed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    packed = [t for t in model.graph.initializer if t.data_type in PACKED_TYPES]
    if not packed:
        return model, {}
    work = copy_model(model)
    keep = [t for t in work.graph.initializer if t.data_type not in PACKED_TYPES]
    del work.graph.initializer[:]
    work.graph.initializer.extend(keep)
    inputs = {i.name for i in work.graph.input}
    for t in packed:
        if t.name not in inputs:
            work.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return work, {t.name: t for t in packed}


def _restore_packed(model: onnx.ModelProto, packed: dict[str, onnx.TensorProto]) -> None:
    used = names_read(model.graph) | {o.name for o in model.graph.output}  # subgraphs' reads count too
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
