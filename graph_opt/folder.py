"""Export folders: one recipe over every model of a folder, everything else copied as it is.

Exporters such as Hugging Face optimum or onnxruntime-genai write folders: several `.onnx` files
(an encoder and a decoder, say), their external data, and config and tokenizer files the runtime
reads beside them. `optimize_folder(src, dst, run)` calls `run(model, data_path)` (a pipeline) for
every `.onnx` below `src` (or the ones named), writes each result at the same relative path below
`dst` — with external data again when the source had it —, copies every other file byte for byte
(so components that share a tokenizer or config stay consistent: input and output names never
change), and leaves the models not selected untouched, their data included. Nothing is written
at `dst` until every model is done: the folder is built beside it and renamed into place.
Per-model data: ``DATA_DIR/<stem>.npz`` when a data folder is given and holds one, else the
pipeline's default (seeded random inputs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from graph_opt.errors import ModelSaveError, SpecError
from graph_opt.model_io import load_model, save_model, umask_mode


def external_files(path: Path) -> set[Path]:
    """The external data files a model file reads (resolved), without loading them."""
    model = onnx.load(str(path), load_external_data=False)
    out = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in t.external_data}
            if "location" in entry:
                out.add((path.parent / entry["location"]).resolve())
    return out


def select(src: Path, only: Sequence[str] = ()) -> list[Path]:
    """The `.onnx` files below `src` to optimize: all, or those whose relative path or stem is named."""
    found = sorted(p for p in src.rglob("*.onnx") if p.is_file())
    if not found:
        raise SpecError(f"no .onnx file in the folder {src}")
    if not only:
        return found
    chosen = [p for p in found if str(p.relative_to(src)) in only or p.stem in only or p.name in only]
    missing = [n for n in only if not any(n in (str(p.relative_to(src)), p.stem, p.name) for p in chosen)]
    if missing:
        raise SpecError(f"no model {missing[0]!r} in {src} (it has: {', '.join(str(p.relative_to(src)) for p in found)})")
    return chosen


def optimize_folder(src: str | os.PathLike, dst: str | os.PathLike, run: Callable[[onnx.ModelProto, Path | None], Any],
                    *, only: Sequence[str] = (), data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run `run(model, data_path)` on each selected model of `src`; write the folder at `dst`.
    Returns relative path → what `run` returned (its `.model` is saved)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise SpecError(f"not a folder: {src}")
    if dst == src or src in dst.parents:
        raise ModelSaveError(f"the output folder {dst} must not be the input folder or inside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelSaveError(f"the output folder {dst} exists and is not empty")
    if not dst.parent.is_dir():
        raise ModelSaveError(f"output directory does not exist: {dst.parent}")
    models = select(src, only)
    replaced = {f for m in models for f in external_files(m)}
    results: dict[str, Any] = {}
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    staging.chmod(umask_mode(0o777))  # the output folder, once renamed into place: not a private temp dir
    try:
        for path in models:
            rel = path.relative_to(src)
            data = Path(data_dir) / f"{path.stem}.npz" if data_dir is not None else None
            result = run(load_model(path), data if data is not None and data.is_file() else None)
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            save_model(result.model, target, external_data=bool(external_files(path)) or None)
            results[str(rel)] = result
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir() or path in models or path.resolve() in replaced:
                continue
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / rel)
        if dst.exists():
            dst.rmdir()
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results
