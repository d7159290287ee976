"""Unlearning metrics on hand-computed cases, the AUC against scikit-learn, and relearning steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxforget as jf
from jaxforget.metrics import (
    RelearningResult,
    accuracy,
    accuracy_restored,
    attack_success_rate,
    fidelity,
    membership_inference_auc,
    relearning_steps,
)
from jaxforget.scenarios import backdoor, triggered_test_set
from jaxforget.train import create_train_state, fit, predict_logits, train_step


def test_accuracy_reads_logits_by_dtype_and_predictions_as_ids():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 0, 1])
    assert accuracy(logits, labels) == 0.5
    assert accuracy(jnp.asarray(logits), jnp.asarray(labels)) == 0.5
    assert accuracy(np.array([0, 2, 0, 1]), labels) == 1.0
    assert accuracy(jnp.asarray(logits, jnp.bfloat16), labels) == 0.5
    with pytest.raises(ValueError, match="align them"):
        accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(ValueError, match="dtype"):
        accuracy(np.array(["a", "b"]), np.array([0, 1]))


def test_accuracy_restored_hand_cases():
    assert accuracy_restored(0.783, 0.738, 0.879) == pytest.approx(0.045 / 0.141)
    assert accuracy_restored(0.879, 0.738, 0.879) == 1.0
    assert accuracy_restored(0.738, 0.738, 0.879) == 0.0
    assert accuracy_restored(0.70, 0.80, 0.90) == pytest.approx(-1.0)
    assert math.isnan(accuracy_restored(0.9, 0.8, 0.8))
    with pytest.raises(ValueError, match="after=nan"):
        accuracy_restored(float("nan"), 0.8, 0.9)


def test_attack_success_rate_hand_case():
    assert attack_success_rate(np.array([3, 3, 1, 0, 3]), 3) == 0.6
    logits = np.array([[0.0, 5.0], [5.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert attack_success_rate(logits, 1) == 0.5
    assert attack_success_rate(np.array([0, 2]), 1) == 0.0
    with pytest.raises(ValueError, match="target_class"):
        attack_success_rate(np.array([0, 1]), -1)
    with pytest.raises(ValueError, match="empty"):
        attack_success_rate(np.zeros(0, int), 0)


def test_fidelity():
    logits = np.random.default_rng(0).normal(size=(50, 10))
    assert fidelity(logits, logits) == 1.0
    assert fidelity(logits, 3.0 * logits + 1.0) == 1.0  # same argmax
    assert fidelity(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    assert fidelity(logits, logits.argmax(-1)) == 1.0  # logits against predictions
    with pytest.raises(ValueError, match="same samples"):
        fidelity(np.array([1, 2]), np.array([1, 2, 3]))


def test_membership_auc_extremes_and_ties():
    members, nonmembers = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.7, 0.8])
    assert membership_inference_auc(members, nonmembers) == 1.0
    assert membership_inference_auc(nonmembers, members) == 0.0
    same = np.array([0.1, 0.5, 0.5, 0.9])
    assert membership_inference_auc(same, same) == 0.5
    assert membership_inference_auc(np.ones(4), np.ones(7)) == 0.5
    # One member at 0.5: below 0.9 (1), tied with 0.5 (1/2), above 0.1 (0) -> (1 + 0.5 + 0) / 3.
    assert membership_inference_auc([0.5], [0.1, 0.5, 0.9]) == pytest.approx(0.5)
    assert membership_inference_auc([0.2, 0.5], [0.1, 0.5, 0.9]) == pytest.approx(
        (2 + 1.5) / 6
    )  # 0.2 is below two of them


def test_membership_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(5):
        members = rng.gamma(2.0, 0.5, size=37 + trial)
        nonmembers = rng.gamma(2.0, 0.7, size=53)
        if trial % 2:  # heavy ties
            members, nonmembers = np.round(members, 1), np.round(nonmembers, 1)
        scores = -np.concatenate([members, nonmembers])
        truth = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
        assert membership_inference_auc(members, nonmembers) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_membership_auc_ranks_infinite_losses_last():
    # An overflowed loss is the least member-like of all; scikit-learn's roc_auc_score refuses infinities.
    assert membership_inference_auc([np.inf, 1.0], [0.5, 2.0]) == 0.25
    assert membership_inference_auc([1.0, 2.0], [np.inf, np.inf]) == 1.0
    assert membership_inference_auc([np.inf], [np.inf]) == 0.5


def test_membership_auc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="member_losses is empty"):
        membership_inference_auc([], [1.0])
    with pytest.raises(ValueError, match="nonmember_losses contains NaN"):
        membership_inference_auc([1.0], [np.nan])


class CountingStep:
    """A deterministic fake step: the state is the number of steps taken; records the batches it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, state, batch):
        self.seen.append(batch)
        return state + 1, {}


@pytest.mark.parametrize(
    "succeeds_at, check_every, max_steps, expected",
    [
        (7, 1, 100, (7, True)),
        (7, 3, 100, (9, True)),  # checks at 3, 6, 9
        (7, 3, 7, (7, True)),  # the last step is always checked
        (7, 1, 6, (6, False)),  # capped
        (0, 1, 5, (0, True)),  # already successful: no step
    ],
)
def test_relearning_steps_counts_exactly(succeeds_at, check_every, max_steps, expected):
    step = CountingStep()
    result = relearning_steps(
        step, 0, ["a", "b"], lambda s: float(s >= succeeds_at), max_steps=max_steps, check_every=check_every
    )
    assert isinstance(result, RelearningResult)
    assert tuple(result) == expected
    assert len(step.seen) == result.steps  # never steps past success or the cap
    assert step.seen == ["a", "b"] * (result.steps // 2) + ["a"] * (result.steps % 2)  # batches cycled


def test_relearning_steps_threshold_and_generator_batches():
    step = CountingStep()
    # success_fn rises 0.1 per step; threshold 0.35 is first reached at step 4.
    result = relearning_steps(step, 0, (b for b in range(3)), lambda s: 0.1 * s, threshold=0.35)
    assert result == (4, True) and step.seen == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": 0}, "max_steps=0"),
        ({"check_every": 0}, "check_every=0"),
        ({"threshold": float("inf")}, "threshold=inf"),
        ({"batches": []}, "batches is empty"),
    ],
)
def test_relearning_steps_rejects_bad_input(kwargs, match):
    step = CountingStep()
    kwargs = {"batches": [1], **kwargs}
    with pytest.raises(ValueError, match=match):
        relearning_steps(step, 0, success_fn=lambda s: 1.0, **kwargs)
    assert step.seen == []


def test_relearning_a_backdoor_into_a_clean_mlp():
    """A small MLP trained on clean digits ignores the trigger; fine-tuning on Z brings the backdoor in, and the
    returned count is the first step at which attack success crosses the threshold."""
    data = jf.embedded_dataset("digits")
    train_index, test_index = jf.stratified_split(data.labels, 0.2, seed=0)
    train, test = (jf.Batch(data.inputs[i], data.labels[i]) for i in (train_index, test_index))
    scenario = backdoor(train, 64, seed=0, target_class=0, patch_size=3)
    attack = triggered_test_set(test, scenario)

    step = jax.jit(train_step)
    predict = jax.jit(predict_logits)
    state = create_train_state(jf.MLP(hidden=(8,)), jax.random.key(0), (1, 8, 8, 1), optax.adam(1e-2))
    state, _ = fit(state, jf.batches(scenario.clean, 64, seed=0, epochs=3), step, progress=False)
    assert accuracy(predict(state, test.inputs), test.labels) > 0.8
    success = lambda s: attack_success_rate(predict(s, attack.inputs), 0)
    assert success(state) < 0.3

    group_batches = list(jf.batches(scenario.poisoned_group, 16, seed=0))
    result = relearning_steps(step, state, group_batches, success, threshold=0.5, max_steps=200)
    assert result.reached and result.steps >= 1

    # Replay: success is below the threshold after steps - 1 steps and at or above it after `steps`.
    replay = state
    for i in range(result.steps):
        assert success(replay) < 0.5
        replay, _ = step(replay, group_batches[i % len(group_batches)])
    assert success(replay) >= 0.5
    if result.steps > 1:
        capped = relearning_steps(step, state, group_batches, success, threshold=0.5, max_steps=result.steps - 1)
        assert capped == (result.steps - 1, False)
