"""The small error hierarchy of graph-opt.

Every user mistake (a missing file, a bad option, a shape that does not parse) raises a
`GraphOptError` subclass with a one-line message; the CLI prints that line and exits with 2.
Anything else escaping is a bug in graph-opt and keeps its traceback.
"""

from __future__ import annotations


class GraphOptError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ModelLoadError(GraphOptError):
    """The model file is missing, unreadable, not ONNX, or its external data is broken."""


class ModelSaveError(GraphOptError):
    """The output cannot be written (would overwrite the input, disk full, bad directory)."""


class SpecError(GraphOptError):
    """An unknown pass, an unknown option, or an option value that does not parse."""


class DataError(GraphOptError):
    """Input data that does not match the model (names, shapes, dtypes) or cannot be read."""


class InvalidModelError(GraphOptError):
    """A model fails onnx.checker, shape inference, or onnxruntime's loader."""


class PassError(GraphOptError):
    """A pass raised instead of returning: the message names the pass and the steps run before it.

    ``internal`` is True when the cause is not a `GraphOptError`, i.e. a bug in graph-opt; the
    original exception stays the ``__cause__`` (the CLI prints its traceback with ``-v``)."""

    def __init__(self, message: str, pass_name: str = "", internal: bool = False):
        super().__init__(message)
        self.pass_name = pass_name
        self.internal = internal

    def __reduce__(self):  # crosses process boundaries (compare's workers) with its fields
        return type(self), (str(self), self.pass_name, self.internal)
