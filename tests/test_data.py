"""The embedded data sets, the stratified split and the batch iterator."""

import numpy as np
import pytest

import jaxforget as jf


@pytest.fixture(scope="module")
def mnist5k():
    return jf.embedded_dataset("mnist5k")


def test_mnist5k_is_5000_real_digits_500_per_class(mnist5k):
    assert mnist5k.inputs.shape == (5000, 28, 28, 1) and mnist5k.inputs.dtype == np.float32
    assert mnist5k.inputs.min() == 0.0 and mnist5k.inputs.max() == 1.0
    np.testing.assert_array_equal(np.bincount(mnist5k.labels), np.full(10, 500))
    # Real digits: a border of blank pixels around ink in the middle.
    assert mnist5k.inputs[:, 0, :, 0].max() == 0.0
    assert mnist5k.inputs[:, 10:18, 10:18, 0].mean() > 0.2


def test_digits_is_sklearn_8x8():
    digits = jf.embedded_dataset("digits")
    assert digits.inputs.shape == (1797, 8, 8, 1)
    assert 0.0 <= digits.inputs.min() and digits.inputs.max() == 1.0
    assert set(np.unique(digits.labels)) == set(range(10))


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match=r"'cifar10'.*digits.*mnist5k"):
        jf.embedded_dataset("cifar10")


def test_split_is_stratified_disjoint_and_deterministic(mnist5k):
    train, test = jf.stratified_split(mnist5k.labels, 0.2, seed=0)
    assert len(test) == 1000 and len(train) == 4000
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(5000))
    np.testing.assert_array_equal(np.bincount(mnist5k.labels[test]), np.full(10, 100))
    again_train, again_test = jf.stratified_split(mnist5k.labels, 0.2, seed=0)
    np.testing.assert_array_equal(again_test, test)
    _, other_test = jf.stratified_split(mnist5k.labels, 0.2, seed=1)
    assert not np.array_equal(other_test, test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_must_be_inside_the_unit_interval(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        jf.stratified_split(np.arange(10) % 2, fraction, seed=0)


def test_batches_cover_each_epoch_once_and_are_seeded():
    data = jf.Batch(np.arange(10, dtype=np.float32)[:, None], np.arange(10))
    run = [b.labels.tolist() for b in jf.batches(data, 3, seed=4, epochs=2)]
    assert len(run) == 6 and all(len(b) == 3 for b in run)
    first_epoch = sum(run[:3], [])
    assert len(set(first_epoch)) == 9  # drop_remainder leaves one sample out per epoch
    assert run == [b.labels.tolist() for b in jf.batches(data, 3, seed=4, epochs=2)]
    assert run != [b.labels.tolist() for b in jf.batches(data, 3, seed=5, epochs=2)]
    kept = [b.labels.tolist() for b in jf.batches(data, 4, seed=0, shuffle=False, drop_remainder=False)]
    assert kept == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for b in jf.batches(data, 3, seed=0):
        np.testing.assert_array_equal(b.inputs[:, 0], b.labels)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 11}, "batch_size"), ({"batch_size": 2, "epochs": 0}, "epochs")],
)
def test_batches_reject_bad_sizes(kwargs, name):
    data = jf.Batch(np.zeros((10, 1)), np.zeros(10))
    with pytest.raises(ValueError, match=name):
        next(jf.batches(data, seed=0, **kwargs))
