"""Exposure of a secret in a language model (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A secret is a sequence of ``length`` symbols from an alphabet (e.g. the ten digit tokens) that follows a known prefix
("my PIN is "). Its *rank* is its position among all ``|alphabet| ** length`` candidates ordered by the model's
likelihood of the candidate after the prefix (rank 1 is the most likely), and its *exposure* is

    exposure = log2 |R| - log2 rank,

0 bits for a secret the model finds no likelier than a typical candidate ... up to log2 |R| bits for one it ranks
first, i.e. has memorized. :func:`exact_rank_and_exposure` enumerates the candidates (spaces up to about 10**6);
:func:`estimated_exposure` samples them and extrapolates with a fitted distribution, as the paper does for large
spaces; :func:`greedy_extraction` checks whether greedy decoding after the prefix reproduces the secret.

Everything here is model-agnostic. The model is a ``log_probs_fn(tokens) -> log_probs``: token ids [B, T] (int32)
to next-token log-probabilities [B, T, V], position t scoring the token at t + 1, e.g. for a
:class:`jaxforget.models.TransformerLM`::

    log_probs_fn = jax.jit(lambda tokens: jax.nn.log_softmax(model.apply({"params": params}, tokens), axis=-1))

Jit it yourself (the library never jits); the functions here call it on batches of at most ``batch_size`` rows and
pad the last batch of each call to the same shape, so a jitted function compiles once per input length. The model
sees the prefix tokens followed by the candidate's; cropping or padding to the model's context is the caller's job
(pass ``max_length`` to have it checked). Results are host-side: numpy arrays and Python numbers, with
log-likelihoods accumulated in float64 whatever the model's precision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LogProbsFn",
    "sequence_log_likelihood",
    "candidate_log_likelihoods",
    "exact_rank_and_exposure",
    "estimated_exposure",
    "greedy_extraction",
]

LogProbsFn = Callable[[jax.Array], jax.Array]
"""``log_probs_fn(tokens [B, T] int32) -> [B, T, V]`` next-token log-probabilities."""

DEFAULT_MAX_SPACE = 10**6


# ---------------------------------------------------------------------------------------------------------- checks


def _token_ids(name: str, value: Any, ndim: int) -> np.ndarray:
    """``value`` as a non-empty, non-negative int64 array with ``ndim`` axes, or a ValueError naming ``name``."""
    array = np.asarray(value)
    if array.ndim != ndim:
        shape = "[n]" if ndim == 1 else "[N, L]"
        raise ValueError(f"{name} must be token ids of shape {shape}; got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty; it needs at least one token id (shape {array.shape}).")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids; got dtype {array.dtype}. Cast it with .astype(int).")
    if array.min() < 0:
        raise ValueError(f"{name} holds the negative token id {array.min()}; token ids start at 0.")
    return array.astype(np.int64)


def _alphabet(alphabet_tokens: Any) -> np.ndarray:
    alphabet = _token_ids("alphabet_tokens", alphabet_tokens, 1)
    if alphabet.size < 2:
        raise ValueError(f"alphabet_tokens={alphabet.tolist()} needs at least two distinct symbols to rank against.")
    if np.unique(alphabet).size != alphabet.size:
        raise ValueError(f"alphabet_tokens={alphabet.tolist()} repeats a token id; list each symbol once.")
    return alphabet


def _secret_indices(secret_tokens: Any, alphabet: np.ndarray) -> np.ndarray:
    """The positions in ``alphabet`` of the secret's symbols."""
    secret = _token_ids("secret_tokens", secret_tokens, 1)
    outside = np.setdiff1d(secret, alphabet)
    if outside.size:
        raise ValueError(
            f"secret_tokens holds token ids {outside.tolist()} that are not in alphabet_tokens={alphabet.tolist()}; "
            "every symbol of the secret must be a candidate symbol."
        )
    return np.array([int(np.flatnonzero(alphabet == t)[0]) for t in secret])


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer, e.g. 4096.")


def _check_fits(prefix: np.ndarray, length: int, max_length: int | None) -> None:
    if max_length is not None and prefix.size + length > max_length:
        raise ValueError(
            f"prefix_tokens ({prefix.size} tokens) plus the secret ({length} symbols) is {prefix.size + length} "
            f"tokens, more than max_length={max_length}; shorten prefix_tokens."
        )


# ------------------------------------------------------------------------------------------------------- the model


def _run(log_probs_fn: LogProbsFn, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """``log_probs_fn`` on ``tokens`` [N, T] in batches of at most ``batch_size`` rows; float64 [N, T, V].

    Every batch has the same number of rows (the last is padded with copies of its first row, whose outputs are
    dropped), so a jitted ``log_probs_fn`` compiles once per call.
    """
    n, length = tokens.shape
    rows = min(n, batch_size)
    outputs = []
    for start in range(0, n, rows):
        chunk = tokens[start : start + rows]
        used = chunk.shape[0]
        if used < rows:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], rows - used, axis=0)])
        out = np.asarray(log_probs_fn(jnp.asarray(chunk, jnp.int32)), np.float64)
        if out.ndim != 3 or out.shape[:2] != (rows, length):
            raise ValueError(
                f"log_probs_fn must map tokens [B, T] to log-probabilities [B, T, V]; on tokens of shape "
                f"{(rows, length)} it returned shape {out.shape}."
            )
        if np.isnan(out).any():
            raise ValueError("log_probs_fn returned NaN log-probabilities; check the model and its parameters.")
        outputs.append(out[:used])
    return np.concatenate(outputs)


def _check_vocabulary(name: str, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.max() >= vocab_size:
        raise ValueError(
            f"{name} holds token id {tokens.max()}, but log_probs_fn scores only {vocab_size} tokens (ids 0.."
            f"{vocab_size - 1}); use ids of the model's vocabulary."
        )


def _next_symbol_log_probs(
    log_probs_fn: LogProbsFn, sequences: np.ndarray, alphabet: np.ndarray, batch_size: int
) -> np.ndarray:
    """Log-probabilities [N, |A|] of each alphabet symbol following each of ``sequences`` [N, T].

    Checks that ``sequences`` and ``alphabet`` are in the model's vocabulary, which is known only once it has run;
    ``sequences`` are a prefix followed by alphabet symbols, so a token id outside it is the prefix's.
    """
    log_probs = _run(log_probs_fn, sequences, batch_size)
    _check_vocabulary("alphabet_tokens", alphabet, log_probs.shape[-1])
    _check_vocabulary("prefix_tokens", sequences, log_probs.shape[-1])
    return log_probs[:, -1, alphabet]


# ----------------------------------------------------------------------------------------------------- likelihoods


def sequence_log_likelihood(
    log_probs_fn: LogProbsFn,
    prefix_tokens: Any,
    candidates: Any,
    *,
    batch_size: int = 4096,
    max_length: int | None = None,
) -> np.ndarray:
    """Log-likelihood of each candidate after the prefix, by teacher forcing.

    The model runs once on every ``prefix + candidate`` sequence; candidate symbol j is scored by the log-probability
    at position ``len(prefix) + j - 1``, and the scores are summed over j.

    Args:
      log_probs_fn: token ids [B, T] -> next-token log-probabilities [B, T, V].
      prefix_tokens: token ids [P], P >= 1 (the first candidate symbol is scored at the prefix's last position).
      candidates: token ids [N, L].
      batch_size: most sequences per call of ``log_probs_fn``.
      max_length: the model's context length, if it has one; ``P + L`` must not exceed it.

    Returns:
      float64 [N]: log P(candidate | prefix), natural logarithm.

    Raises:
      ValueError: if an argument is not token ids of the right shape, a token id is outside the model's vocabulary,
        the sequences do not fit ``max_length``, or ``log_probs_fn`` returns the wrong shape or NaN.
    """
    prefix = _token_ids("prefix_tokens", prefix_tokens, 1)
    candidates = _token_ids("candidates", candidates, 2)
    _check_batch_size(batch_size)
    n, length = candidates.shape
    _check_fits(prefix, length, max_length)
    sequences = np.concatenate([np.broadcast_to(prefix, (n, prefix.size)), candidates], axis=1)
    log_probs = _run(log_probs_fn, sequences, batch_size)
    _check_vocabulary("prefix_tokens", prefix, log_probs.shape[-1])
    _check_vocabulary("candidates", candidates, log_probs.shape[-1])
    positions = prefix.size - 1 + np.arange(length)
    picked = log_probs[:, positions, :][np.arange(n)[:, None], np.arange(length)[None, :], candidates]
    total = np.zeros(n)
    for j in range(length):  # left to right, as candidate_log_likelihoods adds them
        total = total + picked[:, j]
    return total


def candidate_log_likelihoods(
    log_probs_fn: LogProbsFn,
    prefix_tokens: Any,
    alphabet_tokens: Any,
    length: int,
    *,
    batch_size: int = 4096,
    max_space: int = DEFAULT_MAX_SPACE,
    max_length: int | None = None,
) -> np.ndarray:
    """Log-likelihood after the prefix of every candidate of ``length`` symbols, by walking the candidate tree.

    Level k (k = 0 .. length - 1) runs the model once on each of the ``|A| ** k`` distinct k-symbol prefixes and
    extends each one's score by the log-probabilities of the ``|A|`` symbols that can follow it, so a shared prefix is
    run once: ``(|A| ** length - 1) / (|A| - 1)`` model rows in all, fewer than the ``|A| ** length`` of scoring every
    candidate with :func:`sequence_log_likelihood`, and each row is shorter. For a causal model both give the same
    numbers.

    Args:
      log_probs_fn: token ids [B, T] -> next-token log-probabilities [B, T, V].
      prefix_tokens: token ids [P], P >= 1.
      alphabet_tokens: the candidate symbols' token ids [|A|], distinct, |A| >= 2.
      length: symbols per candidate, >= 1.
      batch_size: most sequences per call of ``log_probs_fn``.
      max_space: the most candidates to enumerate.
      max_length: the model's context length, if it has one; ``P + length`` must not exceed it.

    Returns:
      float64 [|A| ** length]: the log-likelihoods, candidate ``(a_0, ..., a_{L-1})`` (indices into
      ``alphabet_tokens``) at index ``sum_j a_j * |A| ** (L - 1 - j)``, i.e. the order of
      ``itertools.product(alphabet_tokens, repeat=length)``.

    Raises:
      ValueError: if the space exceeds ``max_space`` (use :func:`estimated_exposure`), or an argument is out of
        range as in :func:`sequence_log_likelihood`.
    """
    prefix = _token_ids("prefix_tokens", prefix_tokens, 1)
    alphabet = _alphabet(alphabet_tokens)
    _check_batch_size(batch_size)
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"length={length!r} must be a positive integer number of symbols.")
    space = alphabet.size**length
    if space > max_space:
        raise ValueError(
            f"the candidate space |alphabet_tokens| ** length = {alphabet.size} ** {length} = {space:,} exceeds "
            f"max_space={max_space:,}; use estimated_exposure (sampling and a fitted distribution) instead, or raise "
            "max_space if you can afford to run the model on that many candidates."
        )
    _check_fits(prefix, length, max_length)
    sequences = prefix[None, :]
    scores = np.zeros(1)
    for level in range(length):
        step = _next_symbol_log_probs(log_probs_fn, sequences, alphabet, batch_size)
        scores = (scores[:, None] + step).reshape(-1)
        if level < length - 1:
            sequences = np.concatenate(
                [np.repeat(sequences, alphabet.size, axis=0), np.tile(alphabet, sequences.shape[0])[:, None]], axis=1
            )
    return scores


def _rank(scores: np.ndarray, secret_score: float, *, includes_secret: bool) -> tuple[float, int, int]:
    """``(rank, higher, ties)``: 1 + (candidates scoring strictly higher) + half the other candidates tied."""
    higher = int(np.sum(scores > secret_score))
    ties = int(np.sum(scores == secret_score)) - int(includes_secret)
    return 1.0 + higher + 0.5 * ties, higher, ties


# -------------------------------------------------------------------------------------------------------- exposure


def exact_rank_and_exposure(
    log_probs_fn: LogProbsFn,
    prefix_tokens: Any,
    secret_tokens: Any,
    alphabet_tokens: Any,
    *,
    batch_size: int = 4096,
    max_space: int = DEFAULT_MAX_SPACE,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The secret's exact rank and exposure, scoring every candidate (see :func:`candidate_log_likelihoods`).

    Ties: ``rank = 1 + (candidates strictly likelier than the secret) + (other candidates exactly as likely) / 2``,
    the secret's mid-rank among its ties. A unique most likely secret has rank 1 and exposure ``log2 |R|``; under a
    model that scores every candidate alike the rank is ``(|R| + 1) / 2`` and the exposure
    ``log2(2 |R| / (|R| + 1))``, 1 bit less ``1.45 / |R|`` or so.

    Args:
      log_probs_fn: token ids [B, T] -> next-token log-probabilities [B, T, V].
      prefix_tokens: token ids [P], P >= 1.
      secret_tokens: the secret's token ids [L], each in ``alphabet_tokens``.
      alphabet_tokens: the candidate symbols' token ids [|A|], distinct, |A| >= 2.
      batch_size: most sequences per call of ``log_probs_fn``.
      max_space: the most candidates to enumerate (default 10**6); larger spaces raise.
      max_length: the model's context length, if it has one; ``P + L`` must not exceed it.

    Returns:
      A dict with ``rank`` (float; halves come from ties), ``exposure`` (bits), ``log2_space`` (log2 |R|),
      ``space_size`` (|R|), ``secret_log_likelihood`` (natural log), ``higher`` and ``ties`` (counts of other
      candidates strictly likelier and exactly as likely) and ``model_rows`` (sequences the model was run on).

    Raises:
      ValueError: if ``|A| ** L`` exceeds ``max_space`` (use :func:`estimated_exposure`), or an argument is out of
        range as in :func:`sequence_log_likelihood`.
    """
    alphabet = _alphabet(alphabet_tokens)
    indices = _secret_indices(secret_tokens, alphabet)
    length = indices.size
    scores = candidate_log_likelihoods(
        log_probs_fn,
        prefix_tokens,
        alphabet,
        length,
        batch_size=batch_size,
        max_space=max_space,
        max_length=max_length,
    )
    secret_index = int(np.dot(indices, alphabet.size ** np.arange(length - 1, -1, -1)))
    secret_score = float(scores[secret_index])
    rank, higher, ties = _rank(scores, secret_score, includes_secret=True)
    log2_space = length * math.log2(alphabet.size)
    return {
        "rank": rank,
        "exposure": log2_space - math.log2(rank),
        "log2_space": log2_space,
        "space_size": int(scores.size),
        "secret_log_likelihood": secret_score,
        "higher": higher,
        "ties": ties,
        "model_rows": (alphabet.size**length - 1) // (alphabet.size - 1),
    }


def _log_tail(scores: np.ndarray, secret_score: float) -> tuple[float, str, tuple[float, ...]]:
    """Natural log of P(X >= secret_score) under a skew-normal (else normal) fit to ``scores``.

    Returns the log tail, the distribution's name and its fitted parameters. A degenerate sample (every score equal
    to within rounding) is a point mass, with the tie rule of :func:`exact_rank_and_exposure`: tail 1 below it, 1/2
    at it, 0 above it.
    """
    center = float(np.mean(scores))
    if float(np.ptp(scores)) <= 1e-12 * max(1.0, abs(center)):
        gap = secret_score - center
        tolerance = 1e-12 * max(1.0, abs(center))
        tail = 1.0 if gap < -tolerance else 0.5 if gap <= tolerance else 0.0
        return (math.log(tail) if tail else -math.inf), "point", (center,)
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is a dependency; the normal fit is the fallback the docs name
        stats = None
    if stats is not None:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            params = stats.skewnorm.fit(scores)
            log_tail = float(stats.skewnorm.logsf(secret_score, *params))
        if not math.isnan(log_tail):
            return log_tail, "skewnorm", tuple(float(p) for p in params)
    mean, std = center, float(np.std(scores))
    tail = 0.5 * math.erfc((secret_score - mean) / (std * math.sqrt(2.0)))
    return (math.log(tail) if tail > 0 else -math.inf), "normal", (mean, std)


def estimated_exposure(
    log_probs_fn: LogProbsFn,
    prefix_tokens: Any,
    secret_tokens: Any,
    alphabet_tokens: Any,
    key: jax.Array,
    *,
    samples: int = 10_000,
    batch_size: int = 4096,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The secret's exposure estimated from uniformly sampled candidates, as in the paper (its Section 4.3).

    ``samples`` candidates are drawn uniformly (with replacement) from the ``|A| ** L`` and scored with
    :func:`sequence_log_likelihood`; a skew-normal (``scipy.stats.skewnorm.fit``; a normal if scipy is missing or its
    fit fails) is fitted to their log-likelihoods, and

        exposure = -log2 P(X >= secret's log-likelihood),   X ~ the fitted distribution,

    clipped to ``[0, log2 |R|]``. The extrapolation is what lets it reach exposures far beyond ``log2 samples``; its
    accuracy there rests on the fitted family describing the tail. The samples' own ranking is returned too: the
    secret's rank among them with the tie rule of :func:`exact_rank_and_exposure`, and the exposure that rank gives
    in a space of ``samples + 1`` (which cannot exceed ``log2(samples + 1)``).

    Args:
      log_probs_fn: token ids [B, T] -> next-token log-probabilities [B, T, V].
      prefix_tokens: token ids [P], P >= 1.
      secret_tokens: the secret's token ids [L], each in ``alphabet_tokens``.
      alphabet_tokens: the candidate symbols' token ids [|A|], distinct, |A| >= 2.
      key: PRNG key for the samples.
      samples: candidates to sample, >= 10 (the paper used thousands).
      batch_size: most sequences per call of ``log_probs_fn``.
      max_length: the model's context length, if it has one; ``P + L`` must not exceed it.

    Returns:
      A dict with ``exposure`` (bits, from the fit), ``log2_space``, ``secret_log_likelihood``, ``distribution``
      (``"skewnorm"``, ``"normal"`` or ``"point"`` for samples all scoring alike) and ``fit_params`` (its parameters,
      scipy's order), ``samples``, ``empirical_rank`` and ``empirical_exposure``.

    Raises:
      ValueError: if ``samples`` is below 10, a sampled log-likelihood is infinite (the fit needs finite values; use
        :func:`exact_rank_and_exposure`), or an argument is out of range as in :func:`sequence_log_likelihood`.
    """
    alphabet = _alphabet(alphabet_tokens)
    indices = _secret_indices(secret_tokens, alphabet)
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 10:
        raise ValueError(f"samples={samples!r} must be an integer >= 10 to fit a distribution; e.g. 10_000.")
    drawn = np.asarray(jax.random.randint(key, (samples, indices.size), 0, alphabet.size))
    # The secret is scored in the same call as the samples, so a sample equal to it gets bit-identical scores.
    candidates = alphabet[np.concatenate([indices[None], drawn])]
    scores = sequence_log_likelihood(
        log_probs_fn, prefix_tokens, candidates, batch_size=batch_size, max_length=max_length
    )
    secret_score, scores = float(scores[0]), scores[1:]
    if not np.all(np.isfinite(scores)) or not math.isfinite(secret_score):
        raise ValueError(
            "log_probs_fn gives some sampled candidate (or the secret) probability 0 (log-likelihood -inf), which no "
            "distribution can be fitted to; use exact_rank_and_exposure, or floor the model's log-probabilities."
        )
    log2_space = indices.size * math.log2(alphabet.size)
    log_tail, distribution, params = _log_tail(scores, secret_score)
    exposure = min(max(-log_tail / math.log(2.0), 0.0), log2_space)
    empirical_rank, _, _ = _rank(scores, secret_score, includes_secret=False)
    return {
        "exposure": exposure,
        "log2_space": log2_space,
        "secret_log_likelihood": secret_score,
        "distribution": distribution,
        "fit_params": params,
        "samples": int(samples),
        "empirical_rank": empirical_rank,
        "empirical_exposure": math.log2(samples + 1) - math.log2(empirical_rank),
    }


def greedy_extraction(
    log_probs_fn: LogProbsFn,
    prefix_tokens: Any,
    secret_tokens: Any,
    alphabet_tokens: Any,
    *,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Greedy decoding after the prefix, restricted to the alphabet, compared with the secret.

    Each step appends the alphabet symbol with the highest log-probability after the prefix and the symbols decoded
    so far (the first of equals, in ``alphabet_tokens`` order), for as many steps as the secret has symbols.

    Args:
      log_probs_fn: token ids [B, T] -> next-token log-probabilities [B, T, V].
      prefix_tokens: token ids [P], P >= 1.
      secret_tokens: the secret's token ids [L], each in ``alphabet_tokens``.
      alphabet_tokens: the candidate symbols' token ids [|A|], distinct, |A| >= 2.
      max_length: the model's context length, if it has one; ``P + L`` must not exceed it.

    Returns:
      A dict with ``decoded`` (int64 token ids [L]), ``digits_correct`` (positions where it equals the secret),
      ``leading_correct`` (length of the secret's prefix it reproduces), ``complete`` (all L correct) and
      ``log_likelihood`` (of the decoded sequence, natural log).

    Raises:
      ValueError: if an argument is out of range as in :func:`sequence_log_likelihood`.
    """
    prefix = _token_ids("prefix_tokens", prefix_tokens, 1)
    alphabet = _alphabet(alphabet_tokens)
    indices = _secret_indices(secret_tokens, alphabet)
    _check_fits(prefix, indices.size, max_length)
    secret = alphabet[indices]
    sequence = prefix
    log_likelihood = 0.0
    for _ in range(indices.size):
        step = _next_symbol_log_probs(log_probs_fn, sequence[None], alphabet, 1)[0]
        best = int(np.argmax(step))
        log_likelihood += float(step[best])
        sequence = np.append(sequence, alphabet[best])
    decoded = sequence[prefix.size :]
    matches = decoded == secret
    leading = int(np.argmin(matches)) if not matches.all() else int(matches.size)
    return {
        "decoded": decoded,
        "digits_correct": int(matches.sum()),
        "leading_correct": leading,
        "complete": bool(matches.all()),
        "log_likelihood": log_likelihood,
    }
