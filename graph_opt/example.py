"""The built-in example: a small ResNet-style CNN trained on real MNIST digits, with its data.

Trained and exported by `benchmarks/train_example.py` (torch only there). The files ship inside
the package: the model, a calibration split and a labelled test split, disjoint from training.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from graph_opt.data import Dataset, load_data
from graph_opt.model_io import load_model

MODEL_FILE = "mnist_resnet.onnx"
CALIB_FILE = "mnist_calib.npz"
TEST_FILE = "mnist_test.npz"
RECIPE_FILE = "recipe.yaml"


def example_dir() -> Path:
    return Path(str(resources.files("graph_opt") / "example"))


def example_model_path() -> Path:
    return example_dir() / MODEL_FILE


def example_model():
    return load_model(example_model_path())


def example_calibration() -> Dataset:
    return load_data(example_dir() / CALIB_FILE, example_model())


def example_test() -> Dataset:
    """The labelled test split (500 digits)."""
    return load_data(example_dir() / TEST_FILE, example_model())


def example_recipe():
    """The recommended recipe for the example: low-rank, channel pruning, int8, each with reconstruct."""
    from graph_opt.registry import load_recipe

    return load_recipe(example_dir() / RECIPE_FILE)
