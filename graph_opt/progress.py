"""Progress bars over batches and passes (tqdm on stderr, silent when stderr is not a terminal)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    disable = os.environ.get("GRAPH_OPT_PROGRESS", "auto") == "0" or not sys.stderr.isatty()
    yield from tqdm(items, total=total, desc=desc, leave=False, disable=disable, file=sys.stderr)


def bar(total: int, desc: str = ""):
    """A progress bar to update by hand (`update`, `set_postfix`), silent as `progress` is; close it."""
    disable = os.environ.get("GRAPH_OPT_PROGRESS", "auto") == "0" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, leave=False, disable=disable, file=sys.stderr)
