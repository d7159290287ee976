"""Metrics. Selection quality of a curvature estimate: how many of the truly largest entries it finds."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["top_k_recall", "relative_error"]


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def top_k_recall(estimate: Any, reference: Any, fraction: float) -> jax.Array:
    """Fraction of the reference's top-k entries (largest values, global over the tree) that the estimate's top-k
    also contains, with k = max(1, round(fraction * n)). 1.0 is a perfect selection; a random one scores about
    ``fraction``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1], e.g. 0.01 for the top 1%.")
    est, ref = _flat(estimate), _flat(reference)
    if est.shape != ref.shape:
        raise ValueError(f"estimate has {est.size} entries but reference has {ref.size}; pass trees shaped alike.")
    k = max(1, round(fraction * ref.size))
    chosen = jnp.zeros(ref.size, bool).at[jax.lax.top_k(est, k)[1]].set(True)
    return jnp.mean(chosen[jax.lax.top_k(ref, k)[1]])


def relative_error(estimate: Any, reference: Any) -> jax.Array:
    """||estimate - reference|| / ||reference|| over all entries of the two trees."""
    est, ref = _flat(estimate), _flat(reference)
    return jnp.linalg.norm(est - ref) / jnp.linalg.norm(ref)
