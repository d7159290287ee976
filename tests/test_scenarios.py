"""Scenarios: the poisoned set, the group Z and its correction Z~ differ exactly where each scenario says."""

import numpy as np
import pytest

import jaxforget as jf
from jaxforget.scenarios import (
    Scenario,
    backdoor,
    label_flip,
    poison_like,
    stamp_trigger,
    triggered_test_set,
)


@pytest.fixture(scope="module")
def digits():
    return jf.embedded_dataset("digits")


def synthetic(n=40, shape=(6, 5, 2), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(0.0, 0.5, size=(n, *shape)).astype(np.float32)
    return jf.Batch(inputs, (np.arange(n) % classes).astype(np.int32))


def assert_batches_identical(a, b):
    for x, y in zip(a, b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def assert_common_structure(scenario, data, n):
    """Group of n sorted distinct indices; clean == data; train equals data outside the group."""
    group = scenario.group
    assert group.shape == (n,) and scenario.size == n
    assert np.all(np.diff(group) > 0)
    assert_batches_identical(scenario.clean, data)
    outside = np.setdiff1d(np.arange(len(data.labels)), group)
    assert_batches_identical(jf.Batch(*(f[outside] for f in scenario.train)), jf.Batch(*(f[outside] for f in data)))
    assert_batches_identical(scenario.poisoned_group, jf.Batch(*(f[group] for f in scenario.train)))
    assert_batches_identical(scenario.corrected, jf.Batch(*(f[group] for f in data)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "shift", "source_class": 3},
        {"mode": "random"},
        {"mode": "pair", "source_class": 1, "target_class": 7},
        {"mode": "target", "target_class": 0},
    ],
)
def test_label_flip_changes_only_the_group_labels(digits, kwargs):
    n = 60
    scenario = label_flip(digits, n, seed=0, **kwargs)
    assert scenario.name == "label_flip" and scenario.params["num_classes"] == 10
    assert_common_structure(scenario, digits, n)
    z, z_tilde = scenario.poisoned_group, scenario.corrected
    np.testing.assert_array_equal(z.inputs, z_tilde.inputs)  # the inputs are never touched
    assert np.all(z.labels != z_tilde.labels)  # every group label is wrong
    np.testing.assert_array_equal(z_tilde.labels, digits.labels[scenario.group])  # and restored in Z~
    mode = kwargs.get("mode", "shift")
    if mode == "shift":
        np.testing.assert_array_equal(z.labels, (z_tilde.labels + 1) % 10)
    if "source_class" in kwargs:
        assert np.all(z_tilde.labels == kwargs["source_class"])
    if "target_class" in kwargs:
        assert np.all(z.labels == kwargs["target_class"])
    if mode == "random":
        assert len(np.unique(z.labels - z_tilde.labels)) > 2  # not one fixed shift


def test_label_flip_is_deterministic_per_seed(digits):
    a, b, c = (label_flip(digits, 50, seed=s, mode="random") for s in (3, 3, 4))
    np.testing.assert_array_equal(a.group, b.group)
    assert_batches_identical(a.train, b.train)
    assert not np.array_equal(a.group, c.group)


def test_label_flip_can_take_every_eligible_sample():
    data = synthetic()
    scenario = label_flip(data, 10, seed=1, mode="pair", source_class=2, target_class=3)
    np.testing.assert_array_equal(scenario.group, np.flatnonzero(data.labels == 2))
    assert np.all(scenario.train.labels[scenario.group] == 3)
    with pytest.raises(ValueError, match=r"n=11 exceeds the 10 eligible"):
        label_flip(data, 11, seed=1, mode="pair", source_class=2, target_class=3)


def test_scenarios_do_not_modify_their_input():
    data = synthetic()
    before = jf.Batch(data.inputs.copy(), data.labels.copy())
    label_flip(data, 5, seed=0)
    backdoor(data, 5, seed=0, patch_size=2)
    assert_batches_identical(data, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n=0 must be a positive int"),
        ({"n": 1798}, "n=1798 exceeds the 1797 eligible"),
        ({"n": 2.0}, "n=2.0 must be a positive int"),
        ({"mode": "swap"}, "mode='swap'"),
        ({"mode": "pair", "source_class": 1}, "needs both source_class and target_class"),
        ({"mode": "pair", "source_class": 1, "target_class": 1}, "two distinct classes"),
        ({"mode": "target"}, "needs target_class"),
        ({"mode": "target", "target_class": 10}, r"target_class=10 must be a class id in \[0, 10\)"),
        ({"mode": "shift", "source_class": -1}, "source_class=-1"),
        ({"mode": "shift", "target_class": 2}, "target_class is unused by mode='shift'"),
        ({"num_classes": 5}, "num_classes=5 but data.labels contains class 9"),
    ],
)
def test_label_flip_rejects_bad_input(digits, kwargs, match):
    kwargs = {"n": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        label_flip(digits, seed=0, **kwargs)


def test_seed_must_be_an_int(digits):
    with pytest.raises(TypeError, match="seed"):
        label_flip(digits, 10, seed=0.5)
    with pytest.raises(ValueError, match="seed=-1"):
        backdoor(digits, 10, seed=-1)


def test_backdoor_stamps_the_group_and_relabels_it(digits):
    n, target = 80, 4
    scenario = backdoor(digits, n, seed=0, target_class=target, patch_size=3, patch_value=1.0)
    assert scenario.name == "backdoor"
    assert_common_structure(scenario, digits, n)
    z, z_tilde = scenario.poisoned_group, scenario.corrected
    assert np.all(z.labels == target) and np.all(z_tilde.labels != target)
    np.testing.assert_array_equal(z_tilde.labels, digits.labels[scenario.group])
    # Bottom-right 3x3 of the 8x8 images: exactly the patch pixels are set, nothing else moves.
    region = np.zeros((8, 8, 1), bool)
    region[5:, 5:, :] = True
    assert np.all(z.inputs[:, region] == 1.0)
    np.testing.assert_array_equal(z.inputs[:, ~region], z_tilde.inputs[:, ~region])
    # The digits' corners are mostly dark, so the trigger really changes the group's inputs.
    assert np.mean(z_tilde.inputs[:, region] != 1.0) > 0.9


def test_backdoor_relabel_correction_keeps_the_trigger_and_restores_the_labels(digits):
    removed = backdoor(digits, 50, seed=1, target_class=2)
    relabelled = backdoor(digits, 50, seed=1, target_class=2, correction="relabel")
    assert relabelled.params["correction"] == "relabel" and removed.params["correction"] == "remove-trigger"
    assert_batches_identical(relabelled.train, removed.train)  # the same poisoned data either way
    np.testing.assert_array_equal(relabelled.corrected.labels, removed.corrected.labels)
    np.testing.assert_array_equal(relabelled.corrected.inputs, relabelled.poisoned_group.inputs)  # trigger kept
    assert not np.array_equal(relabelled.corrected.inputs, removed.corrected.inputs)
    # The retrained reference sees the triggered images with their true labels: the patch never means the target.
    clean = relabelled.clean
    assert np.all(clean.labels[relabelled.group] != 2)
    np.testing.assert_array_equal(clean.inputs[relabelled.group], relabelled.poisoned_group.inputs)
    with pytest.raises(ValueError, match="correction='erase'"):
        backdoor(digits, 50, seed=1, correction="erase")


@pytest.mark.parametrize(
    "location, rows, cols",
    [
        ("top_left", slice(0, 2), slice(0, 2)),
        ("top_right", slice(0, 2), slice(3, 5)),
        ("bottom_left", slice(4, 6), slice(0, 2)),
        ("bottom_right", slice(4, 6), slice(3, 5)),
        ((1, 2), slice(1, 3), slice(2, 4)),
    ],
)
def test_stamp_trigger_writes_exactly_the_patch(location, rows, cols):
    images = synthetic(n=3, shape=(6, 5, 2)).inputs
    stamped = stamp_trigger(images, patch_size=2, patch_value=0.75, location=location)
    region = np.zeros((6, 5, 2), bool)
    region[rows, cols, :] = True
    assert stamped.dtype == images.dtype and stamped.shape == images.shape
    assert np.all(stamped[:, region] == np.float32(0.75))
    np.testing.assert_array_equal(stamped[:, ~region], images[:, ~region])
    assert np.all(images[:, region] < 0.5)  # the input was copied, not written


def test_triggered_test_set_keeps_true_labels_of_non_target_samples():
    data, test = synthetic(seed=0), synthetic(n=20, seed=1)
    scenario = backdoor(data, 6, seed=2, target_class=1, patch_size=2, location="top_left")
    attack = triggered_test_set(test, scenario)
    keep = test.labels != 1
    assert len(attack.labels) == keep.sum() == 15
    np.testing.assert_array_equal(attack.labels, test.labels[keep])
    np.testing.assert_array_equal(attack.inputs, stamp_trigger(test.inputs[keep], patch_size=2, location="top_left"))
    # The training group carries the same trigger.
    np.testing.assert_array_equal(scenario.poisoned_group.inputs[:, :2, :2, :], 1.0)


def test_backdoor_is_deterministic_per_seed(digits):
    a, b, c = (backdoor(digits, 30, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.group, b.group)
    assert_batches_identical(a.train, b.train)
    assert not np.array_equal(a.group, c.group)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n=0"),
        ({"n": 1797}, "exceeds the 1619 eligible samples"),  # 178 zeros in digits
        ({"target_class": 10}, "target_class=10"),
        ({"patch_size": 9}, "patch_size=9 does not fit in 8x8 images; use at most 8"),
        ({"patch_size": 0}, "patch_size=0 must be a positive int"),
        ({"location": "middle"}, "location='middle' is unknown"),
        ({"location": (6, 0)}, r"location=\(6, 0\) puts the 3x3 patch outside"),
        ({"location": (1,)}, "must be one of"),
    ],
)
def test_backdoor_rejects_bad_input(digits, kwargs, match):
    kwargs = {"n": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        backdoor(digits, seed=0, **kwargs)


def test_backdoor_needs_images_and_aligned_labels():
    flat = jf.Batch(np.zeros((10, 64), np.float32), np.arange(10, dtype=np.int32) % 2)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        backdoor(flat, 2, seed=0)
    ragged = jf.Batch(np.zeros((10, 4, 4, 1), np.float32), np.zeros(9, np.int32))
    with pytest.raises(ValueError, match="align them"):
        backdoor(ragged, 2, seed=0)


def test_triggered_test_set_rejects_other_scenarios_and_shapes(digits):
    with pytest.raises(ValueError, match="made by backdoor"):
        triggered_test_set(digits, label_flip(digits, 5, seed=0))
    scenario = backdoor(digits, 5, seed=0)
    with pytest.raises(ValueError, match="test images have shape"):
        triggered_test_set(synthetic(), scenario)
    only_target = jf.Batch(digits.inputs[:3], np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="would be empty"):
        triggered_test_set(only_target, scenario)


def test_scenario_is_generic_over_inputs():
    """A text-like scenario: token sequences as inputs and targets, one secret replaced in two of them."""
    tokens = np.arange(5 * 7, dtype=np.int32).reshape(5, 7)
    train = jf.Batch(tokens, np.roll(tokens, -1, axis=1))
    corrected = jf.Batch(np.zeros((2, 7), np.int32), np.ones((2, 7), np.int32))
    scenario = Scenario("canary", train, np.array([1, 3]), corrected, {"secret": "1234"})
    np.testing.assert_array_equal(scenario.clean.inputs[[1, 3]], 0)
    np.testing.assert_array_equal(scenario.clean.inputs[[0, 2, 4]], tokens[[0, 2, 4]])
    np.testing.assert_array_equal(scenario.poisoned_group.labels, train.labels[[1, 3]])
    assert scenario.group.dtype == np.int64
    with pytest.raises(ValueError, match="sorted, distinct"):
        Scenario("canary", train, np.array([3, 1]), corrected)
    with pytest.raises(ValueError, match="one row per group index"):
        Scenario("canary", train, np.array([1, 2, 3]), corrected)
    with pytest.raises(ValueError, match="non-empty"):
        Scenario("canary", train, np.array([], np.int64), jf.Batch(tokens[:0], tokens[:0]))


def test_scenarios_accept_jax_arrays_and_return_numpy():
    import jax.numpy as jnp

    data = synthetic()
    on_device = jf.Batch(jnp.asarray(data.inputs), jnp.asarray(data.labels))
    for make in (lambda d: label_flip(d, 5, seed=0), lambda d: backdoor(d, 5, seed=0, patch_size=2)):
        scenario = make(on_device)
        assert all(isinstance(field, np.ndarray) for field in (*scenario.train, *scenario.corrected, *scenario.clean))
        assert_batches_identical(scenario.train, make(data).train)


def test_poison_like_applies_the_same_poisoning_to_held_out_samples():
    data = jf.embedded_dataset("digits")
    door = backdoor(data, 20, 0, target_class=2)
    twin = poison_like(data, door)
    keep = np.asarray(data.labels) != 2
    np.testing.assert_array_equal(twin.labels, np.full(keep.sum(), 2))
    np.testing.assert_array_equal(twin.inputs, stamp_trigger(np.asarray(data.inputs)[keep]))
    flip = label_flip(data, 10, 0, mode="pair", source_class=3, target_class=8)
    twin = poison_like(data, flip)
    assert len(twin.labels) == int(np.sum(np.asarray(data.labels) == 3)) and set(twin.labels) == {8}
    shift = label_flip(data, 10, 0)
    twin = poison_like(data, shift)
    np.testing.assert_array_equal(twin.labels, (np.asarray(data.labels) + 1) % 10)
    with pytest.raises(ValueError, match="shape"):
        poison_like(jf.Batch(np.zeros((3, 4, 4, 1), np.float32), np.zeros(3, np.int32)), shift)
