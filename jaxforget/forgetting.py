"""Forgetting quality measured against many retrained models: the NeurIPS 2023 unlearning challenge's score, and a
U-LiRA-style likelihood-ratio attack.

The question is whether an unlearned model is distinguishable from models retrained without the forget set. Both
families are sampled (K models each, differing in seed), every forget example's logit-scaled confidence is recorded
under every model, and an attacker tries to tell the two confidence distributions apart, one example at a time.

The challenge's definitions follow its evaluation code, google-deepmind/unlearning_evaluation at commit ffae0ff
(``metric.py``, cited below by line; ``main.py`` for the final score), described in Triantafillou et al., "Are we
making progress in unlearning? Findings from the first NeurIPS unlearning competition", arXiv 2406.09073 (2024). The
arithmetic is re-implemented here in numpy, float64, sorted counts instead of dense comparisons; where the behaviour
departs from that code the docstring says so.

Everything here is a host-side summary: inputs are numpy or jax arrays of confidences laid out [models, examples],
outputs are numpy arrays or Python floats. Nothing is jitted.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DELTA",
    "EPSILON_CAP",
    "logit_scaled_confidence",
    "forgetting_epsilon",
    "forgetting_score",
    "forgetting_score_from_confidences",
    "final_score",
    "LiraResult",
    "lira_attack",
    "BootstrapInterval",
    "bootstrap_interval",
    "interval_width_by_models",
]

DELTA = 1e-5  # metric.py:24
EPSILON_CAP = 50.0  # metric.py:25
_THRESHOLDS_PER_UNIT = 100  # metric.py:26, grid density of both threshold families
_BUFFER = 2.0  # metric.py:77, how far the double-threshold grid reaches beyond the peakier distribution
_PEAKY_RATIO = 0.01  # metric.py:188
_BUCKET_WIDTH = 0.5  # metric.py:331
_PROBABILITY_FLOOR = 1e-45  # metric.py:57
_THREADED_EXAMPLES = 16  # from this many forget examples, forgetting_epsilon spreads them over threads
_MIN_VARIANCE = 1e-12  # keeps the LiRA Gaussians proper when a model family gives one example a constant confidence


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks (all raised before any compute).


def _confidences(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [models, examples]; got shape {array.shape}. Stack one row of forget-set "
            "confidences per model."
        )
    if array.shape[1] == 0:
        raise ValueError(f"{name} has no examples (shape {array.shape}); pass at least one forget example.")
    if not np.isfinite(array).all():
        raise ValueError(
            f"{name} contains NaN or infinite confidences; compute them with logit_scaled_confidence from logits."
        )
    return array


def _confidence_pair(unlearned: Any, retrained: Any, *, min_models: int) -> tuple[np.ndarray, np.ndarray]:
    u, r = _confidences("unlearned", unlearned), _confidences("retrained", retrained)
    for name, array in (("unlearned", u), ("retrained", r)):
        if array.shape[0] < min_models:
            raise ValueError(
                f"{name} holds {array.shape[0]} models; this measure needs at least {min_models}. Train more models "
                "(the leading axis is the model axis)."
            )
    if u.shape[1] != r.shape[1]:
        raise ValueError(
            f"unlearned has {u.shape[1]} examples but retrained has {r.shape[1]}; pass the same forget examples, "
            "in the same order, as columns of both."
        )
    return u, r


def _check_delta(delta: float) -> float:
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1); the challenge used {DELTA}.")
    return float(delta)


def _check_num_models(num_models: int) -> int:
    if isinstance(num_models, bool) or not isinstance(num_models, int | np.integer) or num_models < 2:
        raise ValueError(f"num_models={num_models!r} must be an int >= 2: the number of models per family.")
    return int(num_models)


# ----------------------------------------------------------------------------------------------------------------------
# Confidence.


def logit_scaled_confidence(logits_or_probs: Any, labels: Any, *, probabilities: bool = False) -> np.ndarray:
    """The logit-scaled confidence log p_y - log(1 - p_y) of the labelled class.

    From logits z it is computed exactly as z_y - logsumexp_{j != y} z_j (the softmax normalizer cancels), in
    float64, so it stays finite and accurate however close p_y is to 0 or 1. From probabilities it is
    log(p_y + 1e-45) - log(sum_{j != y} p_j + 1e-45), the challenge's formula (metric.py:29-57); summing the other
    classes instead of forming 1 - p_y avoids cancellation near p_y = 1.

    Departure: the challenge always went through float32 probabilities with that 1e-45 floor, so its values saturate
    near +-103.6 (and lose precision from about +-87); from logits these values do not saturate. Below that range the
    two agree to rounding.

    Args:
      logits_or_probs: logits (or, with ``probabilities=True``, probabilities) [..., C], C >= 2.
      labels: integer class ids [...], broadcastable to ``logits_or_probs.shape[:-1]`` (e.g. labels [N] against
        logits [K, N, C] from K models).
      probabilities: read ``logits_or_probs`` as probabilities instead of logits.

    Returns:
      float64 confidences, shape ``logits_or_probs.shape[:-1]``.

    Raises:
      ValueError: if the scores are not [..., C] with C >= 2, if probabilities lie outside [0, 1], if labels are not
        integers in [0, C), or if their shape does not broadcast.
    """
    scores = np.asarray(logits_or_probs)
    # jnp.issubdtype also knows bfloat16 and the other ml_dtypes floats, which numpy's does not.
    if scores.ndim < 1 or scores.shape[-1] < 2 or not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(
            f"logits_or_probs must be floating [..., C] with C >= 2 classes; got dtype {scores.dtype}, shape "
            f"{scores.shape}."
        )
    scores = scores.astype(np.float64)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}.")
    try:
        batch_shape = np.broadcast_shapes(labels.shape, scores.shape[:-1])
    except ValueError:
        batch_shape = None
    if batch_shape != scores.shape[:-1]:
        raise ValueError(
            f"labels of shape {labels.shape} do not broadcast to logits_or_probs.shape[:-1] = {scores.shape[:-1]}; "
            "pass one label per example."
        )
    num_classes = scores.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got values in [{labels.min()}, {labels.max()}].")
    if probabilities and not ((scores >= 0) & (scores <= 1)).all():
        raise ValueError("logits_or_probs holds values outside [0, 1] with probabilities=True; pass probabilities.")

    is_label = np.arange(num_classes) == np.broadcast_to(labels, batch_shape)[..., None]
    if probabilities:
        p_label = np.sum(np.where(is_label, scores, 0.0), axis=-1)
        p_other = np.sum(np.where(is_label, 0.0, scores), axis=-1)
        return np.log(p_label + _PROBABILITY_FLOOR) - np.log(p_other + _PROBABILITY_FLOOR)
    z_label = np.sum(np.where(is_label, scores, 0.0), axis=-1)
    others = np.where(is_label, -np.inf, scores)
    top = others.max(axis=-1, keepdims=True)
    log_other = top[..., 0] + np.log(np.sum(np.exp(others - top), axis=-1))
    return z_label - log_other


# ----------------------------------------------------------------------------------------------------------------------
# The challenge's epsilon.


def _epsilon_table(k_pos: int, k_neg: int, delta: float) -> np.ndarray:
    """Epsilon of every decision outcome: entry [tp, fp] for tp of k_pos positives and fp of k_neg negatives predicted
    positive (metric.py:219-266). +inf where FPR = FNR = 0; -inf where exactly one of them is 0 (the challenge drops
    such thresholds as a sign of too few samples) or where neither logarithm is defined."""
    tp = np.arange(k_pos + 1)[:, None]
    fp = np.arange(k_neg + 1)[None, :]
    fnr = (k_pos - tp) / k_pos
    fpr = fp / k_neg
    fnr_zero, fpr_zero = tp == k_pos, fp == 0

    def log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        ok = (numerator > 0) & (denominator > 0)
        value = np.log(np.where(ok, numerator, 1.0)) - np.log(np.where(ok, denominator, 1.0))
        return np.where(ok, value, -np.inf)

    eps = np.maximum(log_ratio(1 - delta - fpr, fnr), log_ratio(1 - delta - fnr, fpr))
    eps = np.where(fnr_zero != fpr_zero, -np.inf, eps)
    return np.where(fnr_zero & fpr_zero, np.inf, eps)


def _counts_at_or_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many values are >= each threshold."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")


def _single_threshold_grid(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Thresholds t of the rule "confidence >= t: positive" (metric.py:132-162): 100 per unit over the pooled range."""
    low = min(pos.min(), neg.min())
    high = max(pos.max(), neg.max())
    return np.linspace(low, high, math.ceil((high - low) * _THRESHOLDS_PER_UNIT))


def _double_threshold_rights(peaky: np.ndarray, width: float) -> np.ndarray:
    """Right ends of the intervals of the rule "left <= confidence <= right: the peakier family" (metric.py:64-129):
    100 per unit from peaky.min + width - 2 to peaky.max + 2."""
    low, high = peaky.min() + width - _BUFFER, peaky.max() + _BUFFER
    return np.linspace(low, high, math.ceil((high - low) * _THRESHOLDS_PER_UNIT))


def _double_threshold_lefts(rights: np.ndarray, width: float) -> np.ndarray:
    """For each right end, 400 left ends from right - width - 2 to right - width + 2: [len(rights), 400]."""
    num_left = math.ceil(2 * _BUFFER * _THRESHOLDS_PER_UNIT)
    left = np.linspace(rights - width - _BUFFER, rights - width + _BUFFER, num_left, axis=-1)
    # linspace lays the new axis out first; binary search over a contiguous copy runs about twice as fast.
    return np.ascontiguousarray(left)


# Right ends per block of the double-threshold search. In one pass the search makes temporaries of 160,000 entries
# (over 1 MB each), which the allocator serves from fresh memory maps, paying a page fault per page (most of the time
# went to the kernel). Measured on 200 examples x 32 models (2 CPU cores): one pass 1.20 s, blocks of 16 right ends
# 0.63 s, 64 0.53 s, 128 0.71 s; the results are bitwise the same.
_RIGHTS_PER_BLOCK = 64


def _double_threshold_best(peaky: np.ndarray, other: np.ndarray, width: float, table: np.ndarray) -> float:
    """The largest epsilon of any interval of the double-threshold rule, ``table[count of peaky, count of other]``
    over the intervals [left, right] of the grid (``peaky`` and ``other`` sorted).

    One binary search into the pooled sorted values serves both families: a running count says how many of
    ``peaky`` lie below any position."""
    pooled = np.concatenate([peaky, other])
    order = np.argsort(pooled, kind="stable")
    pooled_sorted = pooled[order]
    peaky_below = np.concatenate([[0], np.cumsum(order < peaky.size)])
    rights = _double_threshold_rights(peaky, width)
    best = -np.inf
    for first in range(0, rights.size, _RIGHTS_PER_BLOCK):
        right = rights[first : first + _RIGHTS_PER_BLOCK]
        start = np.searchsorted(pooled_sorted, _double_threshold_lefts(right, width), side="left")
        stop = np.searchsorted(pooled_sorted, right, side="right")[:, None]
        in_peaky = np.maximum(peaky_below[stop] - peaky_below[start], 0)  # 0 where left > right
        in_other = np.maximum((stop - start) - in_peaky, 0)
        best = max(best, float(table[in_peaky, in_other].max()))
    return best


def _example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, tables: dict[tuple[int, int], np.ndarray]) -> float:
    """The challenge's epsilon for one forget example (metric.py:165-301; the positive family: 317-321)."""
    # The positive family is the one with the larger median (ties: unlearned).
    pos, neg = (retrained, unlearned) if np.median(retrained) > np.median(unlearned) else (unlearned, retrained)
    pos_range, neg_range = np.ptp(pos), np.ptp(neg)
    largest, smallest = max(pos_range, neg_range), min(pos_range, neg_range)
    if largest > 0 and smallest / largest < _PEAKY_RATIO:
        return EPSILON_CAP
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)

    thresholds = _single_threshold_grid(pos, neg)
    single = tables[pos.size, neg.size][
        _counts_at_or_above(pos_sorted, thresholds), _counts_at_or_above(neg_sorted, thresholds)
    ]

    # The challenge calls the family with the smaller range the positive one here (ties: the lower-median family).
    peaky, other = (neg_sorted, pos_sorted) if pos_range >= neg_range else (pos_sorted, neg_sorted)
    double = _double_threshold_best(peaky, other, smallest, tables[peaky.size, other.size])

    best = max(single.max(initial=-np.inf), double)
    # Each kept threshold's epsilon is clipped at 0 (metric.py:264), so the max is at least 0. The challenge asserts
    # when no threshold is kept (both families the same constant); that is no evidence of a difference: 0.
    return float(np.clip(best, 0.0, EPSILON_CAP))


def forgetting_epsilon(unlearned: Any, retrained: Any, *, delta: float = DELTA) -> np.ndarray:
    """Per forget example, the challenge's privacy epsilon from threshold attacks on its confidence.

    For one example, the confidences under the K_u unlearned and the K_r retrained models are two samples; the
    family with the larger median is "positive" (ties: unlearned). Two families of decision rules are tried
    (metric.py:64-162):

    * single threshold: predict positive when confidence >= t, for t on a grid of 100 points per unit spanning the
      pooled range of both samples;
    * double threshold: predict "the peakier family" (smaller range; ties: the lower-median family) when
      left <= confidence <= right, with right on a grid of 100 per unit from peaky.min + w - 2 to peaky.max + 2 and,
      for each, 400 values of left from right - w - 2 to right - w + 2, where w is the smaller range.

    Every rule gives FPR and FNR (fractions of each sample), and (metric.py:219-266)

        eps(rule) = max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)), clipped below at 0,

    a logarithm being skipped where its argument is undefined. A rule with FPR = FNR = 0 (perfect separation) gives
    infinity; a rule with exactly one of them 0 is discarded, as the challenge does (too few samples to trust it).
    The example's epsilon is the largest over all rules, capped at 50 (metric.py:300). Before any rule, if the
    smaller range is under 1% of the larger (one family nearly a point mass), epsilon is 50 outright
    (metric.py:184-200).

    Departures: float64 grids and rates (the challenge used float32 single thresholds and float32 rates) and counts
    by binary search instead of dense comparisons, which can change a value only where a confidence ties with a
    grid point; K_u and K_r may differ (the challenge took them equal); epsilon 0 where the challenge would stop at
    an assertion because no rule is kept (both families one and the same constant).

    Cost: about 160,000 double-threshold intervals per example whatever K: about 2.6 ms per example on one CPU core,
    spread over threads from 16 examples (1.8 ms per example on 2 cores).

    Args:
      unlearned: confidences [K_u, N] of the N forget examples under K_u >= 2 unlearned models.
      retrained: confidences [K_r, N] of the same examples under K_r >= 2 retrained models.
      delta: the delta of (epsilon, delta); the challenge used 1e-5.

    Returns:
      float64 epsilons [N] in [0, 50]; 0 means the attacks cannot tell the families apart.

    Raises:
      ValueError: for arrays that are not 2-D, hold fewer than 2 models, differ in N, or contain NaN or infinity, or
        for delta outside (0, 1).
    """
    u, r = _confidence_pair(unlearned, retrained, min_models=2)
    delta = _check_delta(delta)
    sizes = {(u.shape[0], r.shape[0]), (r.shape[0], u.shape[0])}
    tables = {size: _epsilon_table(*size, delta) for size in sizes}

    def one(i: int) -> float:
        return _example_epsilon(u[:, i], r[:, i], tables)

    if u.shape[1] < _THREADED_EXAMPLES:
        return np.array([one(i) for i in range(u.shape[1])])
    # numpy's binary searches and gathers release the GIL: threads over examples ran 1.5x faster on 2 cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
        return np.array(list(pool.map(one, range(u.shape[1]))))


def forgetting_score(epsilons: Any, *, num_models: int) -> float:
    """The challenge's forgetting score from per-example epsilons (metric.py:324-349).

    Epsilon is binned into buckets of width 0.5; bucket b = floor(epsilon / 0.5) earns 2^-b points (1 for epsilon
    below 0.5, 1/2 below 1, ...), for buckets that end at or below ceil(log(num_models - 1)), the largest epsilon the
    challenge deemed measurable with that many models; epsilons beyond earn 0. The score is the mean over examples.
    With the challenge's 512 models the last bucket ends at 7. Scores are comparable only at equal ``num_models``.

    Args:
      epsilons: per-example epsilons [N] from :func:`forgetting_epsilon`.
      num_models: models per family, K (the challenge used the unlearned count with K_u = K_r; with unequal counts
        pass the smaller). With K = 2 no bucket exists and the score is 0.

    Returns:
      The score in [0, 1]; 1 means every example is indistinguishable (epsilon < 0.5).

    Raises:
      ValueError: if epsilons is not a non-empty 1-D array of non-negative numbers, or num_models is not an int >= 2.
    """
    eps = np.asarray(epsilons, np.float64)
    if eps.ndim != 1 or eps.size == 0:
        raise ValueError(f"epsilons must be a non-empty 1-D array, one per forget example; got shape {eps.shape}.")
    if np.isnan(eps).any() or (eps < 0).any():
        raise ValueError("epsilons must be non-negative numbers; pass the output of forgetting_epsilon.")
    num_models = _check_num_models(num_models)
    num_buckets = int(np.ceil(np.log(num_models - 1)) / _BUCKET_WIDTH)
    bucket = np.floor(eps / _BUCKET_WIDTH)
    points = np.where(bucket < num_buckets, 0.5**bucket, 0.0)
    return float(points.mean())


def forgetting_score_from_confidences(unlearned: Any, retrained: Any, *, delta: float = DELTA) -> float:
    """The challenge's forgetting score straight from confidences: :func:`forgetting_epsilon`, then
    :func:`forgetting_score` with num_models = min(K_u, K_r) (compute_forget_score_from_confs, metric.py:304-349).

    Args:
      unlearned: confidences [K_u, N] under the unlearned models.
      retrained: confidences [K_r, N] under the retrained models.
      delta: as in :func:`forgetting_epsilon`.

    Returns:
      The score in [0, 1].

    Raises:
      ValueError: as :func:`forgetting_epsilon`.
    """
    eps = forgetting_epsilon(unlearned, retrained, delta=delta)
    return forgetting_score(eps, num_models=min(np.shape(unlearned)[0], np.shape(retrained)[0]))


def final_score(
    forgetting: float,
    retain_accuracy: float,
    retain_accuracy_retrained: float,
    test_accuracy: float,
    test_accuracy_retrained: float,
) -> float:
    """The challenge's final score: forgetting x RA / RA_retrained x TA / TA_retrained (main.py, ``main``).

    In the challenge each accuracy is the mean over that family's models. The ratios are not capped, so the score can
    exceed the forgetting score when the unlearned models beat the retrained ones.

    Args:
      forgetting: the forgetting score in [0, 1].
      retain_accuracy: mean retain-set accuracy of the unlearned models.
      retain_accuracy_retrained: mean retain-set accuracy of the retrained models (> 0).
      test_accuracy: mean test accuracy of the unlearned models.
      test_accuracy_retrained: mean test accuracy of the retrained models (> 0).

    Returns:
      The final score.

    Raises:
      ValueError: if any value lies outside [0, 1] or is not finite, or a retrained accuracy is 0.
    """
    values = {
        "forgetting": forgetting,
        "retain_accuracy": retain_accuracy,
        "retain_accuracy_retrained": retain_accuracy_retrained,
        "test_accuracy": test_accuracy,
        "test_accuracy_retrained": test_accuracy_retrained,
    }
    for name, value in values.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}={value} must be a finite score or accuracy in [0, 1].")
    for name in ("retain_accuracy_retrained", "test_accuracy_retrained"):
        if float(values[name]) == 0.0:
            raise ValueError(f"{name} is 0, so the ratio is undefined; the retrained models must be evaluated.")
    return (
        float(forgetting)
        * float(retain_accuracy)
        / float(retain_accuracy_retrained)
        * float(test_accuracy)
        / float(test_accuracy_retrained)
    )


# ----------------------------------------------------------------------------------------------------------------------
# U-LiRA-style attack.


class LiraResult(NamedTuple):
    """What :func:`lira_attack` found.

    Attributes:
      auc: ROC AUC of telling unlearned from retrained models, pooled over (model, example) pairs; 0.5 means
        indistinguishable.
      tpr_at_fpr: the largest true-positive rate (unlearned flagged as unlearned) at a false-positive rate of at most
        ``fpr``.
      fpr: the false-positive rate at which ``tpr_at_fpr`` was read.
    """

    auc: float
    tpr_at_fpr: float
    fpr: float


def _leave_one_out_gaussians(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry of ``values`` [K, N], the mean and unbiased variance of its column without that entry (K >= 3).

    With d = x - column mean and D = sum(d^2): mean_{-k} = mean - d_k / (K - 1) and the sum of squares about it is
    D - d_k^2 K / (K - 1); centring first keeps the subtraction well conditioned."""
    k = values.shape[0]
    mean = values.mean(axis=0)
    d = values - mean
    loo_mean = mean - d / (k - 1)
    loo_ss = (d**2).sum(axis=0) - d**2 * k / (k - 1)
    return loo_mean, np.maximum(loo_ss, 0.0) / (k - 2) + _MIN_VARIANCE


def _gaussian_log_density(x: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * variance) + (x - mean) ** 2 / variance)


def lira_attack(unlearned: Any, retrained: Any, *, fpr: float = 0.01) -> LiraResult:
    """A U-LiRA-style likelihood-ratio attack: can a model's confidences tell whether it was unlearned or retrained?

    Per example, one Gaussian is fitted to the unlearned models' confidences and one to the retrained models'
    (mean and unbiased variance). Each model's confidence c on the example is scored by
    log N(c; unlearned fit) - log N(c; retrained fit), leaving the scored model out of the fit of its own family, so
    no model is judged by a Gaussian fitted to itself. The scores of all (model, example) pairs are pooled and ranked:
    the AUC and the TPR at ``fpr`` measure how well they separate unlearned models (positives) from retrained ones.

    This follows the per-example Gaussian likelihood ratio of LiRA (Carlini et al., 2022) as adapted to unlearning by
    U-LiRA (Hayes et al., "Inexact unlearning needs more careful evaluations to avoid a false sense of privacy",
    2024), with leave-one-model-out fits standing in for separate shadow and target models. With identical families
    the AUC sits slightly below 0.5 (about 0.49 at K = 8), each model's own family being fitted on one model fewer.

    Args:
      unlearned: confidences [K_u, N] under K_u >= 3 unlearned models.
      retrained: confidences [K_r, N] of the same examples under K_r >= 3 retrained models.
      fpr: the false-positive rate at which to read the true-positive rate, in (0, 1).

    Returns:
      A :class:`LiraResult`.

    Raises:
      ValueError: for arrays that are not 2-D, hold fewer than 3 models, differ in N, or contain NaN or infinity, or
        for fpr outside (0, 1).
    """
    u, r = _confidence_pair(unlearned, retrained, min_models=3)
    if not 0.0 < float(fpr) < 1.0:
        raise ValueError(f"fpr={fpr} must lie in (0, 1), e.g. 0.01 for the TPR at 1% FPR.")
    from sklearn.metrics import roc_auc_score, roc_curve

    u_mean, u_var = u.mean(axis=0), u.var(axis=0, ddof=1) + _MIN_VARIANCE
    r_mean, r_var = r.mean(axis=0), r.var(axis=0, ddof=1) + _MIN_VARIANCE
    u_loo_mean, u_loo_var = _leave_one_out_gaussians(u)
    r_loo_mean, r_loo_var = _leave_one_out_gaussians(r)
    u_scores = _gaussian_log_density(u, u_loo_mean, u_loo_var) - _gaussian_log_density(u, r_mean, r_var)
    r_scores = _gaussian_log_density(r, u_mean, u_var) - _gaussian_log_density(r, r_loo_mean, r_loo_var)

    scores = np.concatenate([u_scores.ravel(), r_scores.ravel()])
    is_unlearned = np.concatenate([np.ones(u_scores.size), np.zeros(r_scores.size)])
    false_pos, true_pos, _ = roc_curve(is_unlearned, scores, drop_intermediate=False)
    return LiraResult(
        auc=float(roc_auc_score(is_unlearned, scores)),
        tpr_at_fpr=float(true_pos[false_pos <= fpr].max()),
        fpr=float(fpr),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Uncertainty over models.


class BootstrapInterval(NamedTuple):
    """A statistic and its bootstrap interval over models.

    Attributes:
      estimate: the statistic on the models given.
      low: lower end of the interval.
      high: upper end of the interval.
      resampled: the statistic on each resample [resamples]; ``np.quantile(resampled, ...)`` gives the plain
        percentile interval.
    """

    estimate: float
    low: float
    high: float
    resampled: np.ndarray


def bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    unlearned: Any,
    retrained: Any,
    key: jax.Array,
    *,
    resamples: int = 200,
    confidence: float = 0.95,
) -> BootstrapInterval:
    """Bootstrap interval of a statistic over models (not examples), percentiles re-centred on the estimate.

    Each resample draws K_u unlearned and K_r retrained models with replacement, independently, keeping all
    examples, and recomputes ``statistic``. Models are the sampling unit: one model's confidences on different
    examples are not independent, and it is the number of models that limits the estimate. With q_lo, q_med, q_hi
    the (1 - confidence) / 2, 1/2 and (1 + confidence) / 2 quantiles of the resampled values and e the estimate, the
    interval is [e - (q_med - q_lo), e + (q_hi - q_med)]: the bootstrap's spread, placed around the estimate.

    Why not the plain percentile interval [q_lo, q_hi]: a resample repeats models, and the threshold attacks read
    repeated values as extra separation, so resampled forgetting scores sit well below the estimate (about one
    standard error) although fresh sets of K models would not. Measured on synthetic confidences (K = 16, 10
    examples, unit-variance Gaussian families 0.5 apart, 40 repetitions of 50 resamples), the plain 95% percentile
    interval covered the mean score of fresh K-model draws 45% of the time, the re-centred one 78%; the remaining
    shortfall is the bootstrap's spread, about 0.8x the true standard deviation there. Read the interval as the noise
    K models allow (it narrows as K grows: :func:`interval_width_by_models`), not as a calibrated 95% guarantee.

    Args:
      statistic: ``statistic(unlearned [K_u, N], retrained [K_r, N]) -> float``, e.g.
        :func:`forgetting_score_from_confidences` or ``lambda u, r: lira_attack(u, r).auc``.
      unlearned: confidences [K_u, N] under the unlearned models.
      retrained: confidences [K_r, N] under the retrained models.
      key: a ``jax.random`` key for the resampling.
      resamples: number of bootstrap resamples, >= 2.
      confidence: nominal coverage, in (0, 1).

    Returns:
      A :class:`BootstrapInterval`. The ends are not clipped to the statistic's range.

    Raises:
      ValueError: for confidences that are not [K, N] with K >= 2 and equal N, for ``resamples`` < 2, or for
        ``confidence`` outside (0, 1).
    """
    u, r = _confidence_pair(unlearned, retrained, min_models=2)
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 2:
        raise ValueError(f"resamples={resamples!r} must be an int >= 2; a few hundred give stable percentiles.")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95.")
    key_u, key_r = jax.random.split(key)
    rows_u = np.asarray(jax.random.randint(key_u, (resamples, u.shape[0]), 0, u.shape[0]))
    rows_r = np.asarray(jax.random.randint(key_r, (resamples, r.shape[0]), 0, r.shape[0]))
    resampled = np.array([float(statistic(u[iu], r[ir])) for iu, ir in zip(rows_u, rows_r, strict=True)])
    tail = (1.0 - float(confidence)) / 2.0
    q_lo, q_med, q_hi = np.quantile(resampled, [tail, 0.5, 1.0 - tail])
    estimate = float(statistic(u, r))
    return BootstrapInterval(estimate, estimate - float(q_med - q_lo), estimate + float(q_hi - q_med), resampled)


def interval_width_by_models(
    num_models: Sequence[int],
    key: jax.Array,
    *,
    num_examples: int = 20,
    shift: float = 0.5,
    resamples: int = 100,
    confidence: float = 0.95,
) -> dict[int, BootstrapInterval]:
    """How the forgetting score's bootstrap interval narrows with K, on synthetic confidences.

    For each K, K unlearned and K retrained "models" draw each example's confidence from N(shift, 1) and N(0, 1)
    (example-wise offsets shared by both families), and :func:`bootstrap_interval` of
    :func:`forgetting_score_from_confidences` is taken. A quick way to say what K a given precision needs.

    Args:
      num_models: the values of K to try, each >= 2.
      key: a ``jax.random`` key.
      num_examples: forget examples per draw, >= 1.
      shift: how far the unlearned family's mean sits from the retrained one's, in standard deviations.
      resamples: bootstrap resamples per K.
      confidence: coverage of each interval.

    Returns:
      ``{K: BootstrapInterval}``; ``high - low`` is the width.

    Raises:
      ValueError: for an empty ``num_models``, a K below 2, ``num_examples`` < 1 or a non-finite ``shift``; and as
        :func:`bootstrap_interval`.
    """
    ks = [_check_num_models(k) for k in num_models]
    if not ks:
        raise ValueError("num_models is empty; pass the K values to compare, e.g. (8, 32, 128).")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 1:
        raise ValueError(f"num_examples={num_examples!r} must be an int >= 1.")
    if not math.isfinite(float(shift)):
        raise ValueError(f"shift={shift} must be a finite number of standard deviations.")
    out = {}
    for k, k_key in zip(ks, jax.random.split(key, len(ks)), strict=True):
        k_offsets, k_u, k_r, k_boot = jax.random.split(k_key, 4)
        offsets = np.asarray(jax.random.normal(k_offsets, (num_examples,)), np.float64) * 3.0
        u = offsets + shift + np.asarray(jax.random.normal(k_u, (k, num_examples)), np.float64)
        r = offsets + np.asarray(jax.random.normal(k_r, (k, num_examples)), np.float64)
        out[k] = bootstrap_interval(
            forgetting_score_from_confidences, u, r, k_boot, resamples=resamples, confidence=confidence
        )
    return out
