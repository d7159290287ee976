"""`jaxforget.data.load`: embedded splits, fast offline failures, and tfds data read back without TensorFlow.

The tfds tests prepare tiny stand-ins for mnist, fashion_mnist and cifar10 on disk, in tfds' own layout and
format (tests/tfds_fakes.py).
"""

import json
import shutil
import socket
import sys
import time

import numpy as np
import pytest
from tfds_fakes import FAKE_SHAPES, fake_images, prepare_fake_tfds

from jaxforget import data as data_lib
from jaxforget.models import Batch

FAKE_SIZES = {"train": 7, "test": 3}  # at most 10 per split, so that the label identifies the example


@pytest.fixture
def no_network(monkeypatch):
    """Makes every DNS lookup and socket connection fail, and records the attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def fake_images_for(name, split):
    return fake_images(name, split, FAKE_SIZES[split])


def prepare_fake(name, data_dir):
    return prepare_fake_tfds(name, data_dir, FAKE_SIZES)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for name in FAKE_SHAPES:
        prepare_fake(name, root)
    return root


def assert_matches_fake(batch, name, split):
    """Each loaded example equals the generated image of its label, scaled to [0, 1]."""
    expected = fake_images_for(name, split)
    assert isinstance(batch, Batch)
    assert batch.inputs.dtype == np.float32 and batch.labels.dtype == np.int32
    assert batch.inputs.shape == (FAKE_SIZES[split], *FAKE_SHAPES[name])
    assert sorted(batch.labels.tolist()) == list(range(FAKE_SIZES[split]))
    np.testing.assert_array_equal(batch.inputs, expected[batch.labels].astype(np.float32) / 255.0)


# Embedded data sets.


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_embedded_splits_follow_the_fixed_stratified_split(name):
    everything = data_lib.embedded_dataset(name)
    train_indices, test_indices = data_lib.stratified_split(everything.labels, test_fraction=0.2, seed=0)
    for split, index in [("train", train_indices), ("test", test_indices)]:
        batch = data_lib.load(name, split)
        np.testing.assert_array_equal(batch.inputs, everything.inputs[index])
        np.testing.assert_array_equal(batch.labels, everything.labels[index])
    whole = data_lib.load(name, "all")
    np.testing.assert_array_equal(whole.labels, everything.labels)
    assert len(train_indices) + len(test_indices) == len(everything.labels)


def test_embedded_names_ignore_data_dir_and_download(tmp_path, no_network):
    batch = data_lib.load("digits", "test", data_dir=tmp_path / "absent", download=True)
    assert batch.inputs.shape[1:] == (8, 8, 1)
    assert not no_network


# Argument errors, raised before any file or network access.


@pytest.mark.parametrize(
    ("name", "split", "match"),
    [
        ("imagenet", "train", "choose one of"),
        ("digits", "validation", "choose one of"),
        ("digits", "train[:10%]", "choose one of"),
        ("mnist", "validation", "not a split of mnist"),
        ("cifar10", "train+validation", "not a split of cifar10"),
    ],
)
def test_unknown_name_or_split_raises_value_error(tmp_path, no_network, name, split, match):
    with pytest.raises(ValueError, match=match):
        data_lib.load(name, split, data_dir=tmp_path)
    assert not no_network


# Missing data, offline.


@pytest.mark.parametrize("name", data_lib.TFDS_DATASETS)
def test_missing_data_fails_fast_without_network(tmp_path, no_network, name):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        data_lib.load(name, "train", data_dir=tmp_path)
    assert time.perf_counter() - start < 10.0
    assert not no_network
    message = str(error.value)
    for part in (name, str(tmp_path), "--data-dir", "data_dir=", "--download", "download=True"):
        assert part in message
    assert not list(tmp_path.iterdir())  # nothing was written either


def test_default_data_dir_is_tfds_data_dir(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from_env"))
    with pytest.raises(FileNotFoundError, match="from_env"):
        data_lib.load("mnist", "test")
    assert not no_network


def test_missing_message_names_versions_found_on_disk(tmp_path, no_network):
    old = tmp_path / "mnist" / "1.0.0"
    old.mkdir(parents=True)
    for filename in ("dataset_info.json", "features.json"):
        (old / filename).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"found version\(s\) 1\.0\.0"):
        data_lib.load("mnist", "train", data_dir=tmp_path)


@pytest.mark.skipif(data_lib._tensorflow_available(), reason="TensorFlow is installed")
def test_download_without_tensorflow_points_to_the_tf_extra(tmp_path, no_network):
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[tf\]'"):
        data_lib.load("mnist", "train", data_dir=tmp_path, download=True)
    assert not no_network


def test_download_offline_fails_fast(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data_lib, "_tensorflow_available", lambda: True)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="--data-dir") as error:
        data_lib.load("cifar10", "train", data_dir=tmp_path, download=True)
    assert time.perf_counter() - start < 10.0
    assert "www.cs.toronto.edu" in str(error.value)
    assert no_network  # the pre-check tried, and stopped there
    assert not (tmp_path / "cifar10").exists()


# Prepared data, read back without TensorFlow.


@pytest.mark.parametrize("name", data_lib.TFDS_DATASETS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_prepared_array_record_data_loads_without_tensorflow(prepared_dir, no_network, name, split):
    batch = data_lib.load(name, split, data_dir=prepared_dir)
    assert_matches_fake(batch, name, split)
    assert not no_network
    assert "tensorflow" not in sys.modules or data_lib._tensorflow_available()


def test_split_expressions_and_all(prepared_dir):
    train = data_lib.load("mnist", "train", data_dir=prepared_dir)
    test = data_lib.load("mnist", "test", data_dir=prepared_dir)
    head = data_lib.load("mnist", "train[:3]", data_dir=prepared_dir)
    np.testing.assert_array_equal(head.labels, train.labels[:3])
    tail = data_lib.load("mnist", "test[50%:]", data_dir=prepared_dir)
    np.testing.assert_array_equal(tail.labels, test.labels[-len(tail.labels) :])
    for split in ("all", "train+test"):
        both = data_lib.load("mnist", split, data_dir=prepared_dir)
        np.testing.assert_array_equal(both.labels, np.concatenate([train.labels, test.labels]))
        np.testing.assert_array_equal(both.inputs, np.concatenate([train.inputs, test.inputs]))


def test_download_with_prepared_data_reads_it_offline(prepared_dir, no_network):
    batch = data_lib.load("fashion_mnist", "test", data_dir=prepared_dir, download=True)
    assert_matches_fake(batch, "fashion_mnist", "test")
    assert not no_network


def test_tfrecord_data_without_tensorflow_points_to_the_tf_extra(prepared_dir, tmp_path, monkeypatch):
    # A data set prepared in tfrecord format differs, for this check, only in the format its metadata names.
    shutil.copytree(prepared_dir / "mnist", tmp_path / "mnist")
    (info_path,) = (tmp_path / "mnist").glob("*/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    monkeypatch.setattr(data_lib, "_tensorflow_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[tf\]'") as error:
        data_lib.load("mnist", "train", data_dir=tmp_path)
    assert "array_record" in str(error.value) and "tfrecord" in str(error.value)
