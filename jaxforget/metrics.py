"""Metrics.

Selection quality of a curvature estimate (:func:`top_k_recall`, :func:`relative_error`), and the unlearning metrics
of the main table: accuracy, accuracy restored, attack success, fidelity to the retrained model, membership inference
and relearning. The unlearning metrics are host-side summaries: they take numpy or jax arrays, fetch them to the host
and return Python floats.

Where a metric takes "logits or predictions", floating arrays are logits [..., C] (argmax over the last axis) and
integer arrays are predicted class ids [...]; the dtype decides, never the shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "top_k_recall",
    "relative_error",
    "accuracy",
    "accuracy_restored",
    "attack_success_rate",
    "fidelity",
    "membership_inference_auc",
    "RelearningResult",
    "relearning_steps",
]


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def top_k_recall(estimate: Any, reference: Any, fraction: float) -> jax.Array:
    """Fraction of the reference's top-k entries (largest values, global over the tree) that the estimate's top-k
    also contains, with k = max(1, round(fraction * n)). 1.0 is a perfect selection; a random one scores about
    ``fraction``.

    Args:
      estimate: a pytree of scores, e.g. a curvature estimate.
      reference: a pytree of the same shapes, e.g. the exact diagonal.
      fraction: the share of entries in each top-k, in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1], e.g. 0.01 for the top 1%.")
    est, ref = _flat(estimate), _flat(reference)
    if est.shape != ref.shape:
        raise ValueError(f"estimate has {est.size} entries but reference has {ref.size}; pass trees shaped alike.")
    k = max(1, round(fraction * ref.size))
    chosen = jnp.zeros(ref.size, bool).at[jax.lax.top_k(est, k)[1]].set(True)
    return jnp.mean(chosen[jax.lax.top_k(ref, k)[1]])


def relative_error(estimate: Any, reference: Any) -> jax.Array:
    """||estimate - reference|| / ||reference|| over all entries of the two trees.

    Args:
      estimate: a pytree of arrays.
      reference: a pytree of the same shapes.
    """
    est, ref = _flat(estimate), _flat(reference)
    return jnp.linalg.norm(est - ref) / jnp.linalg.norm(ref)


def _class_ids(name: str, logits_or_predictions: Any) -> np.ndarray:
    values = np.asarray(logits_or_predictions)
    # jnp.issubdtype also knows bfloat16 and the other ml_dtypes floats, which numpy's does not.
    if jnp.issubdtype(values.dtype, jnp.floating):
        if values.ndim < 1 or values.shape[-1] == 0:
            raise ValueError(f"{name} is floating, so it is read as logits [..., C]; got shape {values.shape}.")
        values = values.argmax(axis=-1)
    elif not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be float logits [..., C] or integer class ids; got dtype {values.dtype}.")
    if values.size == 0:
        raise ValueError(f"{name} is empty; the metric needs at least one sample.")
    return values


def accuracy(logits_or_predictions: Any, labels: Any) -> float:
    """Fraction of samples whose predicted class equals the label.

    Args:
      logits_or_predictions: float logits [B, C] or integer predictions [B] (any leading shape matching ``labels``).
      labels: integer class ids [B].

    Returns:
      The accuracy in [0, 1].
    """
    predictions = _class_ids("logits_or_predictions", logits_or_predictions)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions have shape {predictions.shape} but labels have {labels.shape}; align them.")
    return float(np.mean(predictions == labels))


def accuracy_restored(after: float, poisoned: float, clean: float) -> float:
    """Fraction of the accuracy lost to poisoning that unlearning won back: (after - poisoned) / (clean - poisoned).

    1 means the unlearned model is as accurate as the retrained one, 0 means no better than the poisoned one; it is
    negative when unlearning lost accuracy and above 1 when it beat the retrained model.

    Args:
      after: accuracy of the unlearned model.
      poisoned: accuracy of the model trained on the poisoned data (before unlearning).
      clean: accuracy of the model retrained on the clean data.

    Returns:
      The fraction restored; ``nan`` when ``clean == poisoned`` (poisoning cost no accuracy, so there was nothing to
      restore and the ratio is undefined).
    """
    values = {"after": after, "poisoned": poisoned, "clean": clean}
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{name}={value} must be a finite accuracy.")
    after, poisoned, clean = (float(v) for v in values.values())
    if clean == poisoned:
        return math.nan
    return (after - poisoned) / (clean - poisoned)


def attack_success_rate(predictions_on_triggered: Any, target_class: int) -> float:
    """Fraction of triggered samples predicted as the attacker's target class.

    Args:
      predictions_on_triggered: float logits [M, C] or integer predictions [M] on the triggered test set, which holds
        only samples whose true label is not ``target_class`` (see :func:`jaxforget.scenarios.triggered_test_set`).
      target_class: the backdoor's target label.

    Returns:
      The attack success rate in [0, 1] (0 for a model the trigger does not move).
    """
    predictions = _class_ids("predictions_on_triggered", predictions_on_triggered)
    if isinstance(target_class, bool) or not isinstance(target_class, int | np.integer) or target_class < 0:
        raise ValueError(f"target_class={target_class!r} must be a non-negative int class id.")
    return float(np.mean(predictions == target_class))


def fidelity(predictions_a: Any, predictions_b: Any) -> float:
    """Prediction agreement of two models on the same samples, e.g. the unlearned and the retrained one.

    Args:
      predictions_a: float logits [B, C] or integer predictions [B] of the first model.
      predictions_b: the same for the second model, on the same samples in the same order.

    Returns:
      The fraction of samples on which the predicted classes agree, in [0, 1].
    """
    a = _class_ids("predictions_a", predictions_a)
    b = _class_ids("predictions_b", predictions_b)
    if a.shape != b.shape:
        raise ValueError(f"predictions_a has shape {a.shape} but predictions_b has {b.shape}; use the same samples.")
    return float(np.mean(a == b))


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n in ascending order, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1
    return (first + (counts - 1) / 2.0)[inverse]


def membership_inference_auc(member_losses: Any, nonmember_losses: Any) -> float:
    """ROC AUC of the loss-threshold membership attack: a lower loss is taken as evidence of membership.

    Computed exactly as the Mann-Whitney U statistic: the probability that a random member has a lower loss than a
    random non-member, ties counted 1/2. 1 means members are perfectly separable (the model remembers them), 0.5 means
    indistinguishable (what a model that never saw the members scores against non-members from the same
    distribution), below 0.5 means members have the higher losses.

    It equals ``sklearn.metrics.roc_auc_score`` with members as the positive class and ``-loss`` as the score (to
    1e-12, tested), but takes infinite losses (an overflowed cross-entropy ranks last, as it should), which
    scikit-learn refuses, and needs no label vector; it is also faster (NumPy midranks, no ROC curve).

    Args:
      member_losses: per-sample losses [m] of samples the attack should flag (e.g. the group Z, with its training
        labels).
      nonmember_losses: per-sample losses [k] of samples never trained on (e.g. held-out test samples).

    Returns:
      The AUC in [0, 1].
    """
    members = np.asarray(member_losses, np.float64).ravel()
    nonmembers = np.asarray(nonmember_losses, np.float64).ravel()
    for name, losses in (("member_losses", members), ("nonmember_losses", nonmembers)):
        if losses.size == 0:
            raise ValueError(f"{name} is empty; the attack needs at least one member and one non-member.")
        if np.isnan(losses).any():
            raise ValueError(f"{name} contains NaN; compute the losses in a precision that does not overflow.")
    # Score = -loss, so members rank high when their losses are low.
    ranks = _midranks(-np.concatenate([members, nonmembers]))
    m, k = members.size, nonmembers.size
    u = ranks[:m].sum() - m * (m + 1) / 2.0
    return float(u / (m * k))


class RelearningResult(NamedTuple):
    """What :func:`relearning_steps` found.

    Attributes:
      steps: optimizer steps taken when success was first observed, or ``max_steps`` when it never was.
      reached: whether ``success_fn`` reached the threshold within ``max_steps`` steps.
    """

    steps: int
    reached: bool


def relearning_steps(
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    state: Any,
    batches: Iterable[Any],
    success_fn: Callable[[Any], Any],
    *,
    threshold: float = 0.5,
    max_steps: int = 100,
    check_every: int = 1,
) -> RelearningResult:
    """How many fine-tuning steps on the forgotten data bring its effect back (fewer = more shallowly forgotten).

    Success is checked before the first step (a model that still shows the effect returns 0 steps), then after every
    ``check_every``-th step and after step ``max_steps``. With ``check_every=k`` the count is therefore exact to
    within k - 1 steps: it is the first checked step at which ``success_fn(state) >= threshold``.

    Args:
      step_fn: ``step_fn(state, batch) -> (state, metrics)``, e.g. a jitted :func:`jaxforget.train.train_step`;
        ``metrics`` is ignored.
      state: the model state to start from (the unlearned model); it is not modified.
      batches: batches of the poisoned group Z; cycled (the first pass is kept in memory) until the step budget is
        spent, so one pass over Z is enough.
      success_fn: ``success_fn(state) -> scalar``, e.g. the attack success rate on the triggered test set.
      threshold: success means ``success_fn(state) >= threshold``.
      max_steps: the step budget, at least 1.
      check_every: steps between checks, at least 1.

    Returns:
      ``RelearningResult(steps, reached)``; ``(max_steps, False)`` when the budget ran out first.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} must be a positive int, the step budget.")
    if isinstance(check_every, bool) or not isinstance(check_every, int | np.integer) or check_every < 1:
        raise ValueError(f"check_every={check_every!r} must be a positive int (1 checks after every step).")
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold={threshold} must be finite, e.g. 0.5.")
    stream = itertools.cycle(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError("batches is empty; pass at least one batch of the group Z.")
    stream = itertools.chain([first], stream)
    if float(success_fn(state)) >= threshold:
        return RelearningResult(0, True)
    for step in range(1, max_steps + 1):
        state, _ = step_fn(state, next(stream))
        if (step % check_every == 0 or step == max_steps) and float(success_fn(state)) >= threshold:
            return RelearningResult(step, True)
    return RelearningResult(int(max_steps), False)
