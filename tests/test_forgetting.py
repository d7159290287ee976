"""Tests for jaxforget.forgetting: the NeurIPS 2023 challenge's epsilon and score, U-LiRA, and the bootstrap."""

import math

import jax
import numpy as np
import pytest
from scipy.special import softmax

from jaxforget import forgetting as fg

# ----------------------------------------------------------------------------------------------------------------------
# Logit-scaled confidence.


def test_confidence_equals_direct_formula_from_logits_and_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4, 6, 5))  # 4 models, 6 examples, 5 classes
    labels = rng.integers(0, 5, size=6)  # one label per example, broadcast over models
    p = np.take_along_axis(softmax(logits, axis=-1), np.broadcast_to(labels, (4, 6))[..., None], axis=-1)[..., 0]
    direct = np.log(p) - np.log(1 - p)
    np.testing.assert_allclose(fg.logit_scaled_confidence(logits, labels), direct, rtol=1e-10)
    np.testing.assert_allclose(
        fg.logit_scaled_confidence(softmax(logits, axis=-1), labels, probabilities=True), direct, rtol=1e-10
    )


def test_confidence_stays_finite_when_p_is_near_one_and_zero():
    logits = np.array([[50.0, -50.0, -50.0], [50.0, -50.0, -50.0]], np.float32)
    labels = np.array([0, 1])
    conf = fg.logit_scaled_confidence(logits, labels)
    # Label 0: 50 - logsumexp(-50, -50) = 100 - log 2. Label 1: -50 - logsumexp(50, -50) = -100 - log(1 + e^-100).
    np.testing.assert_allclose(conf, [100.0 - math.log(2.0), -100.0], rtol=1e-12)
    # The naive float32 route loses both ends: p_y rounds to 1, so log(1 - p) = -inf, and p_y = e^-100 is a float32
    # denormal with two significant digits left.
    p = softmax(logits, axis=-1)[np.arange(2), labels]
    with np.errstate(divide="ignore"):
        naive = np.log(p) - np.log1p(-p)
    assert np.isinf(naive[0]) and abs(naive[1] + 100.0) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# The challenge's epsilon and score.


def _dense_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float) -> float:
    """One example's epsilon written out as the challenge's metric.py does it: every rule compared with every model,
    rates as means, discarded thresholds as NaN, nanmax. Slow; an independent reference for the binary-search
    version."""
    pos, neg = (retrained, unlearned) if np.median(retrained) > np.median(unlearned) else (unlearned, retrained)
    ranges = np.ptp(pos), np.ptp(neg)
    if max(ranges) > 0 and min(ranges) / max(ranges) < 0.01:
        return 50.0
    rates = []  # (tpr, fpr, tnr, fnr) per rule
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    for t in np.linspace(lo, hi, math.ceil((hi - lo) * 100)):
        tpr, fpr = np.mean(pos >= t), np.mean(neg >= t)
        rates.append((tpr, fpr, np.mean(neg < t), np.mean(pos < t)))
    peaky, other = (neg, pos) if ranges[0] >= ranges[1] else (pos, neg)
    width = min(ranges)
    lo, hi = peaky.min() + width - 2.0, peaky.max() + 2.0
    for right in np.linspace(lo, hi, math.ceil((hi - lo) * 100)):
        left = np.linspace(right - width - 2.0, right - width + 2.0, 400)[:, None]
        in_peaky = ((left <= peaky) & (peaky <= right)).mean(axis=1)
        in_other = ((left <= other) & (other <= right)).mean(axis=1)
        rates.extend(zip(in_peaky, in_other, 1 - in_other, 1 - in_peaky, strict=True))
    tpr, fpr, tnr, fnr = np.array(rates).T
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.clip(np.fmax(np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)), 0, None)
    eps = np.where((fpr * fnr == 0) & (fpr + fnr != 0), np.nan, eps)
    eps = np.where((fpr + fnr == 0) & (tpr + tnr == 2), np.inf, eps)
    return float(np.clip(np.nanmax(eps), 0, 50))


def test_identical_samples_give_zero_epsilon_and_full_score():
    confidences = np.random.default_rng(1).normal(size=(16, 5))
    eps = fg.forgetting_epsilon(confidences, confidences.copy())
    np.testing.assert_array_equal(eps, np.zeros(5))
    assert fg.forgetting_score(eps, num_models=16) == 1.0


def test_separable_samples_hit_the_cap_and_score_zero():
    rng = np.random.default_rng(2)
    retrained = rng.normal(size=(16, 5))
    unlearned = rng.normal(size=(16, 5)) + 10.0  # every unlearned confidence above every retrained one
    eps = fg.forgetting_epsilon(unlearned, retrained)
    np.testing.assert_array_equal(eps, np.full(5, fg.EPSILON_CAP))
    assert fg.forgetting_score(eps, num_models=16) == 0.0
    # The unlearned family nearly a point mass (range 0.0003 against 2, under 1%) with retrained values 0.0005 to
    # either side: threshold grids 0.01 apart cannot isolate it (every rule gives 0 here), but the challenge caps it.
    point_mass, spread = np.array([[0.0], [1e-4], [2e-4], [3e-4]]), np.array([[-1.0], [-5e-4], [9e-4], [1.0]])
    assert fg.forgetting_epsilon(point_mass, spread)[0] == fg.EPSILON_CAP


# K = 4: buckets end at ceil(log 3) = 2, so 4 buckets worth 1, 1/2, 1/4, 1/8. log(3 - 4e-5) = 1.0986 is in bucket 2
# (1.0 to 1.5): 1/4 point; log(2.6) = 0.956 is in bucket 1: 1/2 point.
@pytest.mark.parametrize("delta, points", [(1e-5, 0.25), (0.1, 0.5)])
def test_hand_computed_threshold_attack(delta, points):
    # Retrained (higher median) is positive. The single-threshold rule "c >= t: retrained" gives, as t sweeps:
    #   t in (1, 1.5]: TP 4/4, FP 2/4: FNR = 0, FPR = 1/2       -> one rate 0, discarded
    #   t in (1.5, 2]: FNR = 1/4, FPR = 2/4 -> max(log((1-d-1/2)/(1/4)), log((1-d-1/4)/(1/2))) = log(2 - 4d)
    #   t in (2, 2.5]: FNR = 1/4, FPR = 1/4 -> log((1-d-1/4)/(1/4)) = log(3 - 4d)
    #   t in (2.5, 3]: FNR = 2/4, FPR = 1/4 -> log(2 - 4d);   t > 3: FPR = 0 < FNR, discarded.
    # The double-threshold rule (equal ranges, so "inside [l, r]: unlearned") cannot do better: 3 unlearned values
    # inside force 1.5 or 2.5 inside too, so the best is again FNR = FPR = 1/4. Epsilon = log(3 - 4 delta).
    unlearned = np.array([[0.0], [1.0], [2.0], [3.0]])
    retrained = np.array([[1.5], [2.5], [3.5], [4.5]])
    eps = fg.forgetting_epsilon(unlearned, retrained, delta=delta)
    np.testing.assert_allclose(eps, [math.log(3 - 4 * delta)], rtol=1e-12)
    np.testing.assert_allclose(_dense_epsilon(unlearned[:, 0], retrained[:, 0], delta), eps[0], rtol=1e-12)
    assert fg.forgetting_score(eps, num_models=4) == points


def test_rules_with_one_zero_rate_are_discarded():
    # As above, but the retrained values are 1.5, 3.5, 4.5, 5.5. The rule "c >= t: retrained" with t in (3, 3.5]
    # has FPR = 0 and FNR = 1/4, and would give log((1 - d) / (1/4)) = 1.386; so would the interval holding all four
    # unlearned values and 1.5 (FNR = 0, FPR = 1/4). The challenge discards rules with exactly one zero rate, which
    # leaves FNR = FPR = 1/4 at t in (2, 3] (or the interval around 1, 1.5, 2): log(3 - 4d) = 1.0986.
    unlearned = np.array([[0.0], [1.0], [2.0], [3.0]])
    retrained = np.array([[1.5], [3.5], [4.5], [5.5]])
    np.testing.assert_allclose(fg.forgetting_epsilon(unlearned, retrained), [math.log(3 - 4 * fg.DELTA)], rtol=1e-12)


def test_epsilon_matches_the_dense_reference_on_random_families():
    rng = np.random.default_rng(3)
    unlearned = rng.normal(0.3, 1.0, size=(7, 4)) * np.array([0.05, 1.0, 3.0, 1.0])
    retrained = rng.normal(0.0, 1.0, size=(5, 4)) * np.array([0.05, 1.5, 3.0, 0.2])  # K_u = 7, K_r = 5
    eps = fg.forgetting_epsilon(unlearned, retrained)
    reference = [_dense_epsilon(unlearned[:, i], retrained[:, i], fg.DELTA) for i in range(4)]
    np.testing.assert_allclose(eps, reference, rtol=1e-12)
    assert len(set(eps.round(6))) > 1  # the columns exercise different outcomes


def test_forgetting_score_buckets():
    # 512 models: buckets of 0.5 up to ceil(log 511) = 7, worth 1, 1/2, ..., 2^-13; 7 and beyond earn nothing.
    eps = np.array([0.0, 0.49, 0.5, 1.2, 6.9, 7.0, 50.0])
    expected = (1 + 1 + 0.5 + 0.25 + 2.0**-13 + 0 + 0) / 7
    assert fg.forgetting_score(eps, num_models=512) == pytest.approx(expected, rel=1e-15)
    assert fg.forgetting_score(np.zeros(3), num_models=2) == 0.0  # ceil(log 1) = 0: no bucket at all


def test_score_from_confidences_uses_the_smaller_model_count():
    rng = np.random.default_rng(4)
    unlearned, retrained = rng.normal(size=(6, 3)), rng.normal(size=(9, 3))
    eps = fg.forgetting_epsilon(unlearned, retrained)
    assert fg.forgetting_score_from_confidences(unlearned, retrained) == fg.forgetting_score(eps, num_models=6)


def test_final_score_arithmetic():
    assert fg.final_score(0.5, 0.9, 0.95, 0.8, 0.85) == pytest.approx(0.5 * (0.9 / 0.95) * (0.8 / 0.85), rel=1e-15)
    assert fg.final_score(1.0, 0.9, 0.9, 0.7, 0.7) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# U-LiRA.


def test_leave_one_out_gaussians_equal_explicit_deletion():
    values = np.random.default_rng(5).normal(100.0, 0.01, size=(6, 3))  # large mean, small spread
    mean, var = fg._leave_one_out_gaussians(values)
    for k in range(6):
        rest = np.delete(values, k, axis=0)
        np.testing.assert_allclose(mean[k], rest.mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(var[k], rest.var(axis=0, ddof=1), rtol=1e-7)


def test_lira_is_chance_on_identical_distributions_and_perfect_on_separated_ones():
    rng = np.random.default_rng(6)
    retrained = rng.normal(size=(32, 50))
    # Same distribution: over 200 seeds of this setting the AUC had mean 0.498 and standard deviation 0.015 (the
    # 1600 + 1600 pooled scores share their fitted Gaussians, so more than the 0.010 of independent scores); 0.05 is
    # over 3 standard deviations.
    same = fg.lira_attack(rng.normal(size=(32, 50)), retrained)
    assert abs(same.auc - 0.5) < 0.05
    assert same.tpr_at_fpr < 0.05
    # K = 8, N = 400: mean 0.488, standard deviation 0.010, range 0.451-0.512 over 200 seeds (slightly below 0.5: a
    # model's own family is fitted on one model fewer). Fitting the Gaussians with the scored model included gives
    # about 0.68, and doing so for the unlearned family alone 0.58 (lowest of 50 seeds 0.566): a model looks like its
    # own family because it is in the fit.
    assert abs(fg.lira_attack(rng.normal(size=(8, 400)), rng.normal(size=(8, 400))).auc - 0.5) < 0.05
    apart = fg.lira_attack(rng.normal(size=(32, 50)) + 5.0, retrained)
    assert apart.auc > 0.99 and apart.tpr_at_fpr > 0.9


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap over models.


def test_bootstrap_over_models_covers_the_truth():
    # Each model shifts all its confidences together (a per-model effect), so models, not examples, are the unit.
    # The statistic is the mean difference, whose truth is the shift 0.3.
    rng = np.random.default_rng(7)

    def mean_difference(u, r):
        return u.mean() - r.mean()

    def draw(k=12, n=20):
        u = rng.normal(size=(k, 1)) + rng.normal(scale=0.3, size=(k, n)) + 0.3
        return u, rng.normal(size=(k, 1)) + rng.normal(scale=0.3, size=(k, n))

    by_models = by_examples = 0
    for rep in range(50):
        u, r = draw()
        key = jax.random.key(rep)
        interval = fg.bootstrap_interval(mean_difference, u, r, key, resamples=200)
        by_models += interval.low <= 0.3 <= interval.high
        wrong = fg.bootstrap_interval(mean_difference, u.T, r.T, key, resamples=200)  # resamples examples instead
        by_examples += wrong.low <= 0.3 <= wrong.high
    assert by_models >= 40  # nominal 95%: 47.5 of 50
    assert by_examples <= 25  # ignoring the per-model effect makes the interval far too narrow


def test_forgetting_score_interval_narrows_with_more_models():
    intervals = fg.interval_width_by_models((6, 40), jax.random.key(0), num_examples=4, resamples=30)
    widths = {k: v.high - v.low for k, v in intervals.items()}
    assert widths[6] > widths[40] > 0
    for v in intervals.values():
        assert v.low <= v.estimate <= v.high and v.resampled.shape == (30,)


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks.

_OK = np.zeros((4, 3))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fg.forgetting_epsilon(np.zeros(4), _OK), "unlearned must be 2-D"),
        (lambda: fg.forgetting_epsilon(_OK, np.zeros((1, 3))), "retrained holds 1 models"),
        (lambda: fg.forgetting_epsilon(_OK, np.zeros((4, 2))), "unlearned has 3 examples but retrained has 2"),
        (lambda: fg.forgetting_epsilon(_OK, np.full((4, 3), np.nan)), "retrained contains NaN"),
        (lambda: fg.forgetting_epsilon(_OK, _OK, delta=0.0), "delta=0.0 must lie in"),
        (lambda: fg.forgetting_epsilon(_OK, _OK, delta=1.0), "delta=1.0 must lie in"),
        (lambda: fg.forgetting_score(np.zeros(3), num_models=1), "num_models=1"),
        (lambda: fg.forgetting_score(np.array([-1.0]), num_models=4), "epsilons must be non-negative"),
        (lambda: fg.forgetting_score(np.zeros((2, 2)), num_models=4), "epsilons must be a non-empty 1-D"),
        (lambda: fg.final_score(0.5, 1.5, 0.9, 0.8, 0.8), "retain_accuracy=1.5"),
        (lambda: fg.final_score(0.5, 0.9, 0.9, 0.8, 0.0), "test_accuracy_retrained is 0"),
        (lambda: fg.lira_attack(np.zeros((2, 3)), _OK), "unlearned holds 2 models; this measure needs at least 3"),
        (lambda: fg.lira_attack(_OK, _OK, fpr=0.0), "fpr=0.0"),
        (lambda: fg.bootstrap_interval(np.mean, _OK, _OK, jax.random.key(0), resamples=1), "resamples=1"),
        (lambda: fg.bootstrap_interval(np.mean, _OK, _OK, jax.random.key(0), confidence=1.0), "confidence=1.0"),
        (lambda: fg.interval_width_by_models((), jax.random.key(0)), "num_models is empty"),
        (lambda: fg.logit_scaled_confidence(np.zeros((2, 3)), np.array([0, 3])), r"labels must lie in \[0, 3\)"),
        (lambda: fg.logit_scaled_confidence(np.zeros((2, 3)), np.array([0, 1, 2])), "labels of shape"),
        (lambda: fg.logit_scaled_confidence(np.zeros((2, 1)), np.array([0, 0])), "C >= 2"),
        (lambda: fg.logit_scaled_confidence(np.zeros((2, 3)), np.array([0.0, 1.0])), "labels must be integer"),
        (lambda: fg.logit_scaled_confidence(np.full((1, 2), 2.0), [0], probabilities=True), "outside \\[0, 1\\]"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
