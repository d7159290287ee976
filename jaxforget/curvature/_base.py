"""What every curvature module shares: the callable types, input checks that raise before any compute, and small
pure pieces on pytrees (chunked sums, probes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# Input checks: run on shapes only (jax.eval_shape), so they cost no compute and raise before any.


def check_tree_matches(tree: PyTree, params: PyTree, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``tree`` has the structure and leaf shapes of ``params``."""
    tree_def, params_def = jax.tree.structure(tree), jax.tree.structure(params)
    if tree_def != params_def:
        raise ValueError(
            f"{name} must have the same tree structure as params; got {tree_def}, expected {params_def}. "
            f"Build it with jax.tree.map over params."
        )
    for (path, leaf), ref in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params), strict=True):
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, but the matching "
                f"params leaf has shape {jnp.shape(ref)}."
            )


def _check_scalar_loss(loss_fn: LossFn, params: PyTree, batch: PyTree) -> None:
    out = jax.eval_shape(loss_fn, params, batch)
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"loss_fn must return a scalar (the mean loss over the batch); it returned {shape}. Reduce it with .mean()."
        )


def _check_logits(logits_fn: LogitsFn, params: PyTree, inputs: jax.Array) -> tuple[int, ...]:
    """The shape of ``logits_fn(params, inputs)``; raises unless it is [B, C] or [B, ..., V] with B examples."""
    out = jax.eval_shape(logits_fn, params, inputs)
    batch_size = jax.tree.leaves(inputs)[0].shape[0]
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.ndim >= 2 and out.shape[0] == batch_size):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"logits_fn must return logits of shape [batch, classes] = [{batch_size}, C], or [batch, ..., classes] "
            f"for sequences (e.g. [{batch_size}, T, V]); it returned {shape}."
        )
    return out.shape


def _check_positive(value: int | None, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        hint = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{hint}; got {value!r}.")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}.")


# ----------------------------------------------------------------------------------------------------------------
# Small pure pieces.


def _leading_size(tree: PyTree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _chunked_sum(fn: Callable[[PyTree], PyTree], xs: PyTree, chunk_size: int | None) -> PyTree:
    """``fn(xs)`` where ``fn`` sums over the leading axis of ``xs``, evaluated ``chunk_size`` rows at a time.

    Peak memory is that of one chunk; the result differs from the unchunked one only in summation order.
    """
    n = _leading_size(xs)
    if chunk_size is None or chunk_size >= n:
        return fn(xs)
    num_full = n // chunk_size
    head = jax.tree.map(lambda a: a[: num_full * chunk_size].reshape(num_full, chunk_size, *a.shape[1:]), xs)
    out = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], head))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
    total, _ = jax.lax.scan(lambda acc, chunk: (_tree_add(acc, fn(chunk)), None), init, head)
    if n % chunk_size:
        total = _tree_add(total, fn(jax.tree.map(lambda a: a[num_full * chunk_size :], xs)))
    return total


def _probe(key: jax.Array, params: PyTree, distribution: str) -> PyTree:
    """A random probe shaped like ``params``: i.i.d. Rademacher (+-1) or standard normal entries.

    One draw covers all leaves: a random-number kernel per leaf multiplies compile time (seconds per leaf on CPU).
    """
    leaves, treedef = jax.tree.flatten(params)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    dtype = jnp.result_type(*leaves)
    sample = jax.random.rademacher if distribution == "rademacher" else jax.random.normal
    draw = sample(key, (sum(sizes),), dtype)
    pieces = jnp.split(draw, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(
        treedef,
        [piece.reshape(jnp.shape(x)).astype(jnp.result_type(x)) for piece, x in zip(pieces, leaves, strict=True)],
    )


def _example(tree: PyTree) -> PyTree:
    """Adds a leading batch axis of size one to every leaf (one example as a batch)."""
    return jax.tree.map(lambda a: a[None], tree)
