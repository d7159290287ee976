"""Secret exposure (jaxforget.exposure) and the TransformerLM it is meant for, against hand-computed values."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_jitted, to_float64

import jaxforget as jf
from jaxforget import exposure as ex
from jaxforget.models import TransformerLM

DIGITS = np.arange(10)  # the alphabet: token ids 0..9 of a 12-token vocabulary
VOCAB = 12
PREFIX = np.array([11, 10])


def positional_model(table):
    """A hand-written log_probs_fn: at the position that predicts secret symbol j, log-probabilities ``table[j]``.

    Position t predicts token t + 1, so symbol j (token P + j) is scored at position P - 1 + j.
    """
    table = jnp.asarray(table)

    @jax.jit
    def log_probs_fn(tokens):
        rows = jnp.clip(jnp.arange(tokens.shape[1]) - (PREFIX.size - 1), 0, table.shape[0] - 1)
        return jnp.broadcast_to(table[rows], (tokens.shape[0], tokens.shape[1], table.shape[1]))

    return log_probs_fn


@jax.jit
def successor_model(tokens):
    """Puts most of its mass (e^5 against 1 for each other token) on (previous token + 1) mod 12."""
    return jax.nn.log_softmax(5.0 * jax.nn.one_hot((tokens + 1) % VOCAB, VOCAB), axis=-1)


SUCCESSOR_HIT = 5.0 - math.log(math.exp(5.0) + VOCAB - 1)  # log-probability of the favoured token
SUCCESSOR_MISS = -math.log(math.exp(5.0) + VOCAB - 1)


def tiny_lm(vocab_size=8, seed=0):
    model = TransformerLM(vocab_size=vocab_size, max_length=8, features=8, heads=2, layers=1, mlp_ratio=2)
    params = to_float64(init_jitted(model, jax.random.key(seed), (1, 8))["params"])
    return model, params


# ---------------------------------------------------------------------------------------------- hand-computed models


def test_a_model_with_all_its_mass_on_the_secret_exposes_it_fully():
    secret = np.array([7, 0, 3])
    table = np.full((3, VOCAB), -np.inf)
    table[np.arange(3), secret] = 0.0  # P(secret) = 1, every other candidate has probability 0
    result = ex.exact_rank_and_exposure(positional_model(table), PREFIX, secret, DIGITS)
    assert result["rank"] == 1.0
    assert result["higher"] == 0 and result["ties"] == 0
    assert result["log2_space"] == pytest.approx(math.log2(1000))
    assert result["exposure"] == pytest.approx(math.log2(1000), abs=1e-12)
    assert result["secret_log_likelihood"] == 0.0
    greedy = ex.greedy_extraction(positional_model(table), PREFIX, secret, DIGITS)
    np.testing.assert_array_equal(greedy["decoded"], secret)
    assert greedy["digits_correct"] == 3 and greedy["leading_correct"] == 3 and greedy["complete"]
    # The estimate needs finite log-likelihoods; with a finite margin it saturates at log2 |R| (the clip).
    with pytest.raises(ValueError, match="probability 0"):
        ex.estimated_exposure(positional_model(table), PREFIX, secret, DIGITS, jax.random.key(0), samples=100)
    table = np.where(np.isfinite(table), 0.0, -60.0)
    estimate = ex.estimated_exposure(positional_model(table), PREFIX, secret, DIGITS, jax.random.key(0), samples=500)
    assert estimate["exposure"] == pytest.approx(math.log2(1000))


def test_a_uniform_model_ranks_the_secret_in_the_middle_with_exposure_one_bit():
    """Every candidate ties, so the tie rule gives rank (|R| + 1) / 2 and exposure log2(2 |R| / (|R| + 1)): 1 bit less
    1.44 / |R| or so. The estimate's point mass at the common score gives a tail of exactly 1/2, so 1 bit."""
    uniform = positional_model(np.full((4, VOCAB), -math.log(VOCAB)))
    secret = np.array([5, 5, 0, 9])
    size = 10**4
    result = ex.exact_rank_and_exposure(uniform, PREFIX, secret, DIGITS)
    assert result["rank"] == (size + 1) / 2
    assert result["higher"] == 0 and result["ties"] == size - 1
    assert result["exposure"] == pytest.approx(math.log2(2 * size / (size + 1)), abs=1e-12)
    assert abs(result["exposure"] - 1.0) < 1.5 / size
    assert result["secret_log_likelihood"] == pytest.approx(-4 * math.log(VOCAB))
    estimate = ex.estimated_exposure(uniform, PREFIX, secret, DIGITS, jax.random.key(0), samples=1000)
    assert estimate["distribution"] == "point"
    assert estimate["exposure"] == 1.0
    assert estimate["empirical_rank"] == 1 + 1000 / 2
    greedy = ex.greedy_extraction(uniform, PREFIX, secret, DIGITS)
    np.testing.assert_array_equal(greedy["decoded"], [0, 0, 0, 0])  # the first of equals
    assert greedy["digits_correct"] == 1 and greedy["leading_correct"] == 0 and not greedy["complete"]


def test_sequence_log_likelihood_and_greedy_extraction_follow_the_context():
    prefix = np.array([11, 3])  # the successor model continues 4, 5, 6, 7
    candidates = np.array([[4, 5, 6, 7], [4, 5, 9, 7], [0, 0, 0, 0]])
    expected = [4 * SUCCESSOR_HIT, 2 * SUCCESSOR_HIT + 2 * SUCCESSOR_MISS, 4 * SUCCESSOR_MISS]
    np.testing.assert_allclose(ex.sequence_log_likelihood(successor_model, prefix, candidates), expected, rtol=1e-12)
    greedy = ex.greedy_extraction(successor_model, prefix, [4, 5, 9, 7], DIGITS)
    np.testing.assert_array_equal(greedy["decoded"], [4, 5, 6, 7])
    assert greedy["digits_correct"] == 3 and greedy["leading_correct"] == 2 and not greedy["complete"]
    assert greedy["log_likelihood"] == pytest.approx(4 * SUCCESSOR_HIT)
    assert ex.greedy_extraction(successor_model, prefix, [4, 5, 6, 7], DIGITS)["complete"]
    # In the candidate tree the successor chain is the unique most likely candidate: rank 1.
    assert ex.exact_rank_and_exposure(successor_model, prefix, [4, 5, 6, 7], DIGITS)["rank"] == 1.0


# --------------------------------------------------------------------------------------- enumeration = brute force


def test_tree_enumeration_equals_brute_force_scoring_on_a_random_transformer():
    model, params = tiny_lm()
    jitted = jax.jit(lambda tokens: jax.nn.log_softmax(model.apply({"params": params}, tokens), axis=-1))
    shapes = []

    def log_probs_fn(tokens):
        shapes.append(tokens.shape)
        return jitted(tokens)

    prefix, alphabet, length = np.array([0, 2]), np.array([1, 3, 5, 7]), 4
    tree = ex.candidate_log_likelihoods(log_probs_fn, prefix, alphabet, length, batch_size=7)
    # One model row per distinct prefix: 1 + 4 + 16 + 64 = 85; batches of 7 rows, the last of each level padded.
    assert shapes == [(1, 2), (4, 3)] + [(7, 4)] * 3 + [(7, 5)] * 10
    everything = np.array(list(itertools.product(alphabet, repeat=length)))
    brute = ex.sequence_log_likelihood(jitted, prefix, everything)
    assert tree.shape == (256,)
    np.testing.assert_allclose(tree, brute, rtol=0, atol=1e-12)
    assert np.ptp(brute) > 1.0  # a model that distinguishes candidates, so the comparison means something

    # sequence_log_likelihood itself, by hand for one candidate: teacher forcing over prefix + candidate.
    log_probs = np.asarray(jitted(jnp.asarray([[0, 2, 5, 1, 7, 7]])))[0]
    by_hand = log_probs[1, 5] + log_probs[2, 1] + log_probs[3, 7] + log_probs[4, 7]
    assert brute[everything.tolist().index([5, 1, 7, 7])] == pytest.approx(by_hand, rel=1e-12)

    secret = [3, 5, 1, 7]
    result = ex.exact_rank_and_exposure(log_probs_fn, prefix, secret, alphabet, max_length=model.max_length)
    score = brute[everything.tolist().index(secret)]
    assert result["secret_log_likelihood"] == pytest.approx(score, abs=1e-12)
    assert result["rank"] == 1 + np.sum(brute > score + 1e-9)
    assert result["model_rows"] == 85
    assert result["exposure"] == pytest.approx(8 - math.log2(result["rank"]))


# ------------------------------------------------------------------------------------------ estimate against exact


def moderate_table():
    """Random per-position preferences plus a bias of 1 nat toward each of the secret's digits: the secret ranks 405th
    of 10**4 (exposure 4.6 bits), and candidate scores take ~10**4 distinct values, so a continuous fit makes sense."""
    logits = np.random.default_rng(0).normal(size=(4, VOCAB))
    logits[np.arange(4), MODERATE_SECRET] += 1.0
    return np.array(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


MODERATE_SECRET = np.array([3, 1, 4, 1])


def test_exact_rank_matches_a_hand_count_and_the_estimate_agrees():
    """Tolerance 0.5 bits for the fit: its error is the skew-normal's misfit in the upper 4% tail (the scores are a sum
    of four discrete variables), observed at 0.01-0.14 bits over keys, plus sampling noise of ~0.07 bits (the tail
    fraction's relative error sqrt((1 - p) / (n p)) at p = 0.04, n = 10**4, over ln 2). The samples' own ranking has
    only the sampling noise, ~0.1 bits; it gets 0.3 (3 sigma)."""
    table = moderate_table()
    log_probs_fn = positional_model(table)
    digits = table[:, DIGITS]
    scores = digits[0][:, None, None, None] + digits[1][:, None, None] + digits[2][:, None] + digits[3]
    secret_score = sum(table[j, d] for j, d in enumerate(MODERATE_SECRET))
    hand_rank = 1 + np.sum(scores > secret_score + 1e-12)
    exact = ex.exact_rank_and_exposure(log_probs_fn, PREFIX, MODERATE_SECRET, DIGITS)
    assert exact["rank"] == hand_rank == 405
    assert exact["exposure"] == pytest.approx(math.log2(1e4 / 405), abs=1e-12)
    for seed in range(3):
        estimate = ex.estimated_exposure(log_probs_fn, PREFIX, MODERATE_SECRET, DIGITS, jax.random.key(seed))
        assert estimate["distribution"] == "skewnorm"
        assert estimate["secret_log_likelihood"] == pytest.approx(secret_score, abs=1e-12)
        assert abs(estimate["exposure"] - exact["exposure"]) < 0.5
        assert abs(estimate["empirical_exposure"] - exact["exposure"]) < 0.3


def test_estimate_extrapolates_beyond_the_samples_and_is_clipped_to_the_space():
    """A secret likelier than every sample: the empirical exposure stops at log2(samples + 1), the fit goes beyond."""
    table = moderate_table()
    table[np.arange(4), MODERATE_SECRET] += 2.0  # unnormalised scores are fine for ranking
    estimate = ex.estimated_exposure(
        positional_model(table), PREFIX, MODERATE_SECRET, DIGITS, jax.random.key(0), samples=200
    )
    assert estimate["empirical_rank"] == 1.0
    assert estimate["empirical_exposure"] == pytest.approx(math.log2(201))
    assert math.log2(201) < estimate["exposure"] <= estimate["log2_space"] == pytest.approx(math.log2(1e4))


# --------------------------------------------------------------------------------------------------- bad input


def test_out_of_range_inputs_raise_naming_the_argument():
    table = moderate_table()
    fn = positional_model(table)
    key = jax.random.key(0)

    def never_called(tokens):
        raise AssertionError("the model must not run on refused input")

    with pytest.raises(ValueError, match=r"max_space=1,000,000.*estimated_exposure"):
        ex.exact_rank_and_exposure(never_called, PREFIX, [1] * 7, DIGITS)
    with pytest.raises(ValueError, match="max_space=100"):
        ex.exact_rank_and_exposure(never_called, PREFIX, [1, 2, 3], DIGITS, max_space=100)
    with pytest.raises(ValueError, match="prefix_tokens is empty"):
        ex.exact_rank_and_exposure(never_called, [], [1, 2], DIGITS)
    with pytest.raises(ValueError, match=r"prefix_tokens must be token ids of shape \[n\]"):
        ex.greedy_extraction(never_called, [[1, 2]], [1, 2], DIGITS)
    with pytest.raises(ValueError, match="alphabet_tokens=.*at least two"):
        ex.exact_rank_and_exposure(never_called, PREFIX, [1, 1], [1])
    with pytest.raises(ValueError, match="alphabet_tokens=.*repeats"):
        ex.greedy_extraction(never_called, PREFIX, [1, 2], [1, 2, 2])
    with pytest.raises(ValueError, match=r"secret_tokens holds token ids \[11\]"):
        ex.exact_rank_and_exposure(never_called, PREFIX, [1, 11], DIGITS)
    with pytest.raises(ValueError, match="secret_tokens must hold integer"):
        ex.estimated_exposure(never_called, PREFIX, [1.0, 2.0], DIGITS, key)
    with pytest.raises(ValueError, match="candidates holds the negative token id -1"):
        ex.sequence_log_likelihood(never_called, PREFIX, [[1, -1]])
    with pytest.raises(ValueError, match="max_length=5; shorten prefix_tokens"):
        ex.exact_rank_and_exposure(never_called, PREFIX, [1, 2, 3, 4], DIGITS, max_length=5)
    with pytest.raises(ValueError, match="samples=5 must be"):
        ex.estimated_exposure(never_called, PREFIX, [1, 2], DIGITS, key, samples=5)
    with pytest.raises(ValueError, match="batch_size=0 must be"):
        ex.sequence_log_likelihood(never_called, PREFIX, [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="length=0 must be"):
        ex.candidate_log_likelihoods(never_called, PREFIX, DIGITS, 0)
    # Vocabulary checks need the model's output: 12 tokens here.
    with pytest.raises(ValueError, match="alphabet_tokens holds token id 12, but log_probs_fn scores only 12"):
        ex.exact_rank_and_exposure(fn, PREFIX, [1, 2], [1, 2, 12])
    with pytest.raises(ValueError, match="prefix_tokens holds token id 20"):
        ex.greedy_extraction(fn, [20], [1, 2], DIGITS)
    with pytest.raises(ValueError, match="candidates holds token id 13"):
        ex.sequence_log_likelihood(fn, PREFIX, [[1, 13]])
    with pytest.raises(ValueError, match=r"log_probs_fn must map tokens \[B, T\]"):
        ex.exact_rank_and_exposure(lambda t: jnp.zeros((t.shape[0], VOCAB)), PREFIX, [1, 2], DIGITS)
    with pytest.raises(ValueError, match="log_probs_fn returned NaN"):
        ex.sequence_log_likelihood(lambda t: jnp.full((*t.shape, VOCAB), jnp.nan), PREFIX, [[1, 2]])


# ------------------------------------------------------------------------------------------------- TransformerLM


def test_transformer_lm_is_causal():
    model, params = tiny_lm(vocab_size=6, seed=1)
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 6)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 6)
    before, after = np.asarray(apply(tokens)), np.asarray(apply(changed))
    assert before.shape == (2, 8, 6)
    np.testing.assert_allclose(after[:, :5], before[:, :5], rtol=0, atol=1e-12)
    assert np.all(np.abs(after[:, 5:] - before[:, 5:]).max(axis=-1) > 1e-6)  # position 5 onwards sees the change
    with pytest.raises(ValueError, match="max_length=8"):
        model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))


def test_transformer_lm_learns_a_repeating_pattern_through_train_step():
    model = TransformerLM(vocab_size=5, max_length=16, features=16, heads=2, layers=1)
    text = np.stack([np.arange(offset, offset + 13) % 5 for offset in range(4)])  # 0 1 2 3 4 0 1 ... from 4 offsets
    batch = jf.Batch(jnp.asarray(text[:, :-1]), jnp.asarray(text[:, 1:]))
    state = jax.jit(jf.create_train_state, static_argnums=(0, 2, 3))(
        model, jax.random.key(0), (1, 12), optax.adam(3e-2)
    )
    assert jf.logits_fn_for(model)(state.params, batch.inputs).shape == (4, 12, 5)
    initial = float(jf.loss_fn_for(model)(state.params, batch))
    step = jax.jit(jf.train_step)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(initial, rel=1e-5)  # train_step's loss is loss_fn_for's, before the step
    assert initial > 1.0  # about log 5 at initialization
    assert float(jf.loss_fn_for(model)(state.params, batch)) < 0.2 * initial


def test_evaluate_scores_a_language_model_per_token():
    from jaxforget import models, train

    model = models.TransformerLM(vocab_size=5, max_length=6, features=8, heads=2, layers=1)
    state = train.create_train_state(model, jax.random.key(0), (1, 6), optax.adam(1e-3))
    tokens = np.tile(np.arange(7) % 5, (3, 1)).astype(np.int32)
    batch = models.Batch(tokens[:, :-1], tokens[:, 1:])
    result = train.evaluate(state, batch, jax.jit(train.eval_step))
    logits = model.apply({"params": state.params}, batch.inputs)
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == batch.labels))
    assert result["count"] == 18 and 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(expected)
