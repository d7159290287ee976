"""Unlearning updates: first-order, second-order (CG or LiSSA), diagonal Newton and masked fine-tuning.

The group Z (``old_batch``, n samples as they were trained on) is replaced by its corrected version Z~
(``new_batch``, the same n samples corrected). Following Warnecke et al. (NDSS 2023), with sums over the group,

    g = ∇L(Z~; θ*) − ∇L(Z; θ*),    L(S; θ) = Σ_{z∈S} ℓ(z; θ),

and the second-order update is the Newton step θ* − H⁻¹ g of the training objective L(D; θ), whose Hessian H is a
sum over the N training samples.

**Scale.** ``loss_fn(params, batch)`` is a *mean* over its batch, as everywhere in jaxforget, and N · ``loss_fn`` over
the whole training set is the training objective (an L2 term belongs inside ``loss_fn`` as ``λ/(2N)·‖θ‖²``). The
second-order updates divide both sides of the Newton system by N: they solve

    (M H̄ M + λ I) Δ = M ḡ,    ḡ = g / N = (n / N) · (∇loss_fn(θ*, Z~) − ∇loss_fn(θ*, Z)),

where H̄ is the Hessian of the mean loss (the mean of ``loss_fn``'s Hessians over ``hessian_batches``, or the
curvature diagonal from :mod:`jaxforget.curvature`, which is on the same mean scale) and M the mask, and return
θ* − Δ. So ``damping`` λ is in units of the *mean* loss's curvature, and N is ``num_train`` (by default the number
of samples in ``hessian_batches``: pass the training-set size when the Hessian is taken on a subsample). The
first-order update keeps the sum scale of the prior work: θ* − τ · M ⊙ g.

**Masks.** Every update takes an optional boolean mask shaped like ``params`` (from :mod:`jaxforget.selection`);
entries outside it are returned bit for bit as they were.

**Diagnostics.** Each update also returns a dict of scalars (jax arrays, so the updates can be jitted):
``update_norm``, ``gradient_evals`` and ``hvp_evals`` (per-batch gradient and Hessian-vector evaluations), and for
the iterative solvers ``iterations``, ``residual`` (the true relative residual ‖A x − b‖ / ‖b‖ of the damped masked
system, measured after the solve), ``converged``, ``negative_curvature`` (CG met a direction with pᵀAp ≤ 0: H is not
positive definite on the selection; raise ``damping``; CG then returns its last iterate, as truncated CG does) and
``diverged`` (a non-finite iterate, or, for LiSSA, a residual above that of no update at all). A solve that diverged
returns ``params`` unchanged, never NaN weights; any solve that did not converge also emits a ``RuntimeWarning``
(through ``jax.debug.callback``, so under ``jit`` as well).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from jaxforget.curvature import _check_choice, _check_positive, check_tree_matches, hvp
from jaxforget.masking import freeze_unselected, frozen_update
from jaxforget.models import Batch
from jaxforget.selection import check_mask
from jaxforget.train import fit

__all__ = [
    "stack_batches",
    "gradient_difference",
    "first_order_update",
    "second_order_update",
    "diagonal_newton_update",
    "finetune_step",
    "finetune_unlearn",
]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

_SOLVERS = ("cg", "lissa")
# The LiSSA scale is this factor times (the estimated largest eigenvalue + damping): power iteration underestimates
# the eigenvalue, and the Neumann series converges only while every eigenvalue of the damped Hessian is below 2x the
# scale, so 1.5 leaves room for a 25% underestimate on either side.
_LISSA_SAFETY = 1.5


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (all on shapes and Python values, before any compute).


def _group_size(tree: PyTree, name: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError(f"{name} must be a batch whose leaves have a leading sample axis, e.g. Batch(inputs, labels).")
    sizes = {jnp.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"{name} has leaves with different numbers of samples {sorted(sizes)}; align them.")
    return sizes.pop()


def _check_group(old_batch: PyTree, new_batch: PyTree) -> int:
    n_old, n_new = _group_size(old_batch, "old_batch"), _group_size(new_batch, "new_batch")
    if n_old == 0:
        raise ValueError("old_batch is empty: the group Z to unlearn needs at least one sample.")
    if n_old != n_new:
        raise ValueError(
            f"old_batch has {n_old} samples but new_batch has {n_new}: new_batch must hold the corrected version of "
            f"each sample of old_batch, in the same order."
        )
    if jax.tree.structure(old_batch) != jax.tree.structure(new_batch):
        raise ValueError("old_batch and new_batch must have the same tree structure (e.g. both Batch(inputs, labels)).")
    return n_old


def _check_nonnegative(value: float, name: str) -> None:
    if not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name}={value!r} must be a non-negative number.")


def _check_positive_number(value: float, name: str) -> None:
    """A positive Python number, or a scalar jax array: traced (so that one compilation serves every value, which
    the caller then checks) or concrete and positive."""
    if isinstance(value, jax.Array) and jnp.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.floating):
        if isinstance(value, jax.core.Tracer) or value > 0:
            return
    elif isinstance(value, int | float) and value > 0 and math.isfinite(value):
        return
    raise ValueError(f"{name}={value!r} must be a positive, finite number.")


def _stacked_hessian_batches(hessian_batches: PyTree | Sequence[PyTree], old_batch: PyTree) -> PyTree:
    """``hessian_batches`` as one stacked pytree [K, B, ...]: a list or tuple of batches shaped like ``old_batch`` is
    stacked (:func:`stack_batches`); a pytree with ``old_batch``'s structure is taken as already stacked."""
    structure = jax.tree.structure(old_batch)
    if jax.tree.structure(hessian_batches) == structure:
        return hessian_batches
    if isinstance(hessian_batches, list | tuple) and hessian_batches:
        if all(jax.tree.structure(batch) == structure for batch in hessian_batches):
            return stack_batches(hessian_batches)
    raise ValueError(
        "hessian_batches must be a list of batches with the tree structure of old_batch (e.g. [Batch(inputs, "
        "labels), ...], equal-sized), or those batches stacked with a leading axis of batches "
        "(stack_batches([batch_1, ..., batch_K]))."
    )


def _check_hessian_batches(hessian_batches: PyTree, old_batch: PyTree) -> tuple[int, int]:
    """(K, B) of stacked ``hessian_batches`` [K, B, ...], checked against a batch of the same kind."""
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(hessian_batches)]
    sample_shapes = [jnp.shape(leaf)[1:] for leaf in jax.tree.leaves(old_batch)]
    if any(len(shape) < 2 or shape[2:] != sample[:] for shape, sample in zip(shapes, sample_shapes, strict=True)):
        raise ValueError(
            f"hessian_batches leaves must have shape [K, B, *sample_shape] matching old_batch's samples; got {shapes} "
            f"for samples of shape {sample_shapes}. Build it with stack_batches([batch_1, ..., batch_K])."
        )
    if len({shape[:2] for shape in shapes}) != 1 or 0 in shapes[0][:2]:
        raise ValueError(f"hessian_batches leaves must share a non-empty leading [K, B]; got {shapes}.")
    return shapes[0][0], shapes[0][1]


def _full_mask(params: PyTree, mask: PyTree | None) -> PyTree:
    if mask is None:
        return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    check_mask(mask, params, "mask")
    return mask


def _check_num_train(num_train: int | None, default: int, group: int) -> int:
    if num_train is None:
        num_train = default
    _check_positive(num_train, "num_train")
    if num_train < group:
        raise ValueError(
            f"num_train={num_train} is smaller than the group of {group} samples; pass the size of the training set "
            f"the model was trained on (the group is part of it)."
        )
    return num_train


# ----------------------------------------------------------------------------------------------------------------
# Small pure pieces.


def stack_batches(batches: Sequence[PyTree]) -> PyTree:
    """Stacks equal-sized batches into one pytree with a leading axis of batches, [K, B, ...] per leaf.

    This is the ``hessian_batches`` format of :func:`second_order_update`.

    Args:
      batches: a sequence of K pytrees with the same structure and leaf shapes.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; stack_batches needs at least one batch.")
    sizes = {_group_size(b, "each batch") for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"batches have different sizes {sorted(sizes)}; use equal-sized batches (drop_remainder).")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)


def gradient_difference(loss_fn: LossFn, params: PyTree, old_batch: PyTree, new_batch: PyTree) -> PyTree:
    """``g = ∇L(Z~; θ) − ∇L(Z; θ)`` with L a *sum* over the group: n · (∇loss_fn(θ, Z~) − ∇loss_fn(θ, Z)).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over ``batch``.
      params: θ, usually the trained parameters θ*.
      old_batch: the group Z as trained on, n samples.
      new_batch: its corrected version Z~, n samples in the same order.

    Returns:
      ``g``, shaped like ``params``. Costs two batch gradients.
    """
    n = _check_group(old_batch, new_batch)
    return _gradient_difference(loss_fn, params, old_batch, new_batch, n)


def _gradient_difference(loss_fn, params, old_batch, new_batch, n):
    grad_new = jax.grad(loss_fn)(params, new_batch)
    grad_old = jax.grad(loss_fn)(params, old_batch)
    return jax.tree.map(lambda a, b: n * (a - b), grad_new, grad_old)


def _apply_step(params: PyTree, step: PyTree, mask: PyTree) -> PyTree:
    """``params − step`` on the mask; ``params`` bit for bit elsewhere."""
    return jax.tree.map(lambda p, s, m: jnp.where(m, p - s.astype(p.dtype), p), params, step, mask)


def _masked(tree: PyTree, mask: PyTree) -> PyTree:
    return jax.tree.map(lambda t, m: jnp.where(m, t, jnp.zeros_like(t)), tree, mask)


def _is_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _batch_at(stacked: PyTree, index: jax.Array) -> PyTree:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stacked)


def _mean_hvp(loss_fn: LossFn, params: PyTree, stacked: PyTree, v: PyTree, num_batches: int) -> PyTree:
    """Mean over the K stacked batches of ``loss_fn``'s Hessian times ``v`` (equal sizes: the mean over samples)."""

    def one(batch):
        return hvp(loss_fn, params, batch, v)

    if num_batches == 1:
        return one(_batch_at(stacked, 0))

    def add(total, batch):
        return otu.tree_add(total, one(batch)), None

    total, _ = jax.lax.scan(add, otu.tree_zeros_like(v), stacked)
    return otu.tree_scale(1.0 / num_batches, total)


def _damped_operator(hessian_vector: Callable[[PyTree], PyTree], mask: PyTree, damping: float):
    """``v -> M ⊙ H(M ⊙ v) + λ v``: the damped Hessian restricted to the selected coordinates."""

    def apply(v):
        return otu.tree_add_scale(_masked(hessian_vector(_masked(v, mask)), mask), damping, v)

    return apply


def _relative_residual(operator, x, b, b_norm):
    residual = otu.tree_norm(otu.tree_sub(operator(x), b))
    return jnp.where(b_norm > 0, residual / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)


def _warn_unless_converged(solver: str, converged, diverged, negative_curvature, residual, iterations) -> None:
    if bool(converged):
        return
    if bool(diverged):
        detail = "diverged (a non-finite iterate, or a residual above that of no update); params are unchanged"
    elif bool(negative_curvature):
        detail = "met negative curvature (the Hessian is not positive definite on the selection); raise damping"
    else:
        detail = "stopped before reaching the tolerance; raise max_iterations / depth, or damping"
    warnings.warn(
        f"{solver} {detail} (relative residual {float(residual):.3g} after {int(iterations)} iterations).",
        RuntimeWarning,
        stacklevel=2,
    )


# ----------------------------------------------------------------------------------------------------------------
# Solvers for (M H̄ M + λ I) x = b on the selected coordinates.


def _conjugate_gradients(operator, b, *, tol, max_iterations):
    """CG from x = 0. Stops at ‖r‖ ≤ tol ‖b‖, after ``max_iterations``, at pᵀAp ≤ 0, or at a non-finite value.

    Returns ``(x, iterations, reached_tolerance, negative_curvature)``.
    """
    b_norm = otu.tree_norm(b)
    # state: iteration, x, r, p, ‖r‖², reached tolerance, met negative curvature, broke down
    no = jnp.asarray(False)
    init = (jnp.asarray(0), otu.tree_zeros_like(b), b, b, otu.tree_vdot(b, b), b_norm == 0, no, no)

    def running(state):
        i, _, _, _, _, reached, negative, broken = state
        return (i < max_iterations) & ~reached & ~negative & ~broken

    def iterate(state):
        i, x, r, p, rs, _, _, _ = state
        ap = operator(p)
        curvature = otu.tree_vdot(p, ap)
        negative = curvature <= 0
        broken = ~jnp.isfinite(curvature)
        alpha = jnp.where(negative | broken, 0.0, rs / jnp.where(negative | broken, 1.0, curvature))
        x = otu.tree_add_scale(x, alpha, p)
        r = otu.tree_add_scale(r, -alpha, ap)
        rs_new = otu.tree_vdot(r, r)
        p = otu.tree_add_scale(r, rs_new / jnp.where(rs > 0, rs, 1.0), p)
        reached = jnp.sqrt(rs_new) <= tol * b_norm
        return i + 1, x, r, p, rs_new, reached, negative, broken | ~jnp.isfinite(rs_new)

    iterations, x, _, _, _, reached, negative, _ = jax.lax.while_loop(running, iterate, init)
    return x, iterations, reached, negative


def _lissa(operator_at, b, *, scale, depth, num_batches):
    """LiSSA: h_j = b + h_{j−1} − A_j h_{j−1} / scale, x = h_depth / scale, with A_j on batch j mod K.

    This is the stochastic Neumann series of Agarwal et al. as used by Koh & Liang and Warnecke et al. (their
    ``damping`` d corresponds to λ / scale here). Stops early at a non-finite iterate.
    """

    def running(state):
        j, h = state
        return (j < depth) & _is_finite(h)

    def iterate(state):
        j, h = state
        ah = operator_at(j % num_batches)(h)
        return j + 1, jax.tree.map(lambda bb, hh, aa: bb + hh - aa / scale, b, h, ah)

    iterations, h = jax.lax.while_loop(running, iterate, (jnp.asarray(0), b))
    return otu.tree_scale(1.0 / scale, h), iterations


def _largest_eigenvalue(operator, start, *, iterations):
    """Power iteration from ``start``: the Rayleigh quotient of the last iterate, in absolute value."""

    def step(_, v):
        w = operator(v)
        return otu.tree_scale(1.0 / jnp.maximum(otu.tree_norm(w), jnp.finfo(otu.tree_norm(w).dtype).tiny), w)

    v = otu.tree_scale(1.0 / jnp.maximum(otu.tree_norm(start), 1e-30), start)
    v = jax.lax.fori_loop(0, iterations, step, v)
    return jnp.abs(otu.tree_vdot(v, operator(v)))


# ----------------------------------------------------------------------------------------------------------------
# The updates.


def first_order_update(
    loss_fn: LossFn,
    params: PyTree,
    old_batch: PyTree,
    new_batch: PyTree,
    *,
    tau: float,
    mask: PyTree | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The first-order update θ* − τ · (M ⊙ g), g the gradient difference summed over the group.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over ``batch``.
      params: the trained parameters θ*.
      old_batch: the group Z as trained on (n samples).
      new_batch: its corrected version Z~ (the same n samples, in the same order).
      tau: the step size (> 0), on the sum scale of g: of order 1 / (N · curvature) (Warnecke et al. used ~1e-5).
      mask: optional boolean pytree shaped like ``params``; entries outside it are returned unchanged, bitwise.

    Returns:
      ``(new_params, diagnostics)`` with diagnostics ``update_norm``, ``gradient_evals`` (2) and ``hvp_evals`` (0).
    """
    n = _check_group(old_batch, new_batch)
    _check_positive_number(tau, "tau")
    mask = _full_mask(params, mask)
    g = _gradient_difference(loss_fn, params, old_batch, new_batch, n)
    new_params = _apply_step(params, otu.tree_scale(tau, g), mask)
    return new_params, {
        "update_norm": otu.tree_norm(otu.tree_sub(new_params, params)),
        "gradient_evals": jnp.asarray(2),
        "hvp_evals": jnp.asarray(0),
    }


def second_order_update(
    loss_fn: LossFn,
    params: PyTree,
    old_batch: PyTree,
    new_batch: PyTree,
    hessian_batches: PyTree | Sequence[PyTree],
    *,
    num_train: int | None = None,
    mask: PyTree | None = None,
    solver: str = "cg",
    damping: float = 1e-3,
    tol: float = 1e-6,
    max_iterations: int = 100,
    depth: int = 200,
    scale: float | None = None,
    power_iterations: int = 20,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The second-order update θ* − Δ, (M H̄ M + λ I) Δ = M ḡ, solved with Hessian-vector products only.

    See the module docstring for the scale: ḡ = (n / N) · (∇loss_fn(θ*, Z~) − ∇loss_fn(θ*, Z)) and H̄ the mean of
    ``loss_fn``'s Hessians over ``hessian_batches``, so the step is the Newton step of the training objective.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over ``batch`` (regularizers included).
      params: the trained parameters θ*.
      old_batch: the group Z as trained on (n samples).
      new_batch: its corrected version Z~ (the same n samples, in the same order).
      hessian_batches: the training data the Hessian is taken on: a list (or tuple) of K equal-sized batches like
        ``old_batch``, or the same stacked into leaves of shape [K, B, ...] (:func:`stack_batches`, which saves
        stacking again on every call). CG uses the mean over all K in every product; LiSSA uses batch ``j mod K``
        at step j, as a stochastic estimate.
      num_train: N, the number of training samples (defaults to K · B, right when ``hessian_batches`` is the whole
        training set; pass the training-set size when it is a subsample).
      mask: optional boolean pytree shaped like ``params``; entries outside it are returned unchanged, bitwise.
      solver: ``"cg"`` (conjugate gradients) or ``"lissa"``.
      damping: λ ≥ 0, added to the mean-loss Hessian (see the module docstring).
      tol: the relative residual ‖r‖ / ‖M ḡ‖ at which CG stops; LiSSA runs its full ``depth`` and counts as
        converged when its final residual is within ``tol`` (LiSSA users typically pass a looser one).
      max_iterations: CG's iteration cap.
      depth: LiSSA's number of steps.
      scale: LiSSA's scale; by default ``1.5 · (|μ| + λ)``, μ the largest eigenvalue of M H̄ M from
        ``power_iterations`` steps of power iteration started at M ḡ, which makes the series converge.
      power_iterations: steps of power iteration for the default LiSSA scale.

    Returns:
      ``(new_params, diagnostics)``; see the module docstring for the diagnostics, plus ``scale`` for LiSSA.
    """
    n = _check_group(old_batch, new_batch)
    hessian_batches = _stacked_hessian_batches(hessian_batches, old_batch)
    num_batches, batch_size = _check_hessian_batches(hessian_batches, old_batch)
    num_train = _check_num_train(num_train, num_batches * batch_size, n)
    _check_choice(solver, _SOLVERS, "solver")
    _check_nonnegative(damping, "damping")
    _check_positive_number(tol, "tol")
    _check_positive(max_iterations, "max_iterations")
    _check_positive(depth, "depth")
    _check_positive(power_iterations, "power_iterations")
    if scale is not None:
        _check_positive_number(scale, "scale")
    mask = _full_mask(params, mask)

    def mean_hvp(v):
        return _mean_hvp(loss_fn, params, hessian_batches, v, num_batches)

    def hvp_on(index):
        return lambda v: hvp(loss_fn, params, _batch_at(hessian_batches, index), v)

    g = _gradient_difference(loss_fn, params, old_batch, new_batch, n)
    b = _masked(otu.tree_scale(1.0 / num_train, g), mask)
    b_norm = otu.tree_norm(b)
    full = _damped_operator(mean_hvp, mask, damping)
    diagnostics = {"gradient_evals": jnp.asarray(2)}

    if solver == "cg":
        x, iterations, reached, negative = _conjugate_gradients(full, b, tol=tol, max_iterations=max_iterations)
        hvp_evals = num_batches * (iterations + 1)  # + 1: the residual check below
    else:
        power_evals = 0
        if scale is None:
            eigenvalue = _largest_eigenvalue(_damped_operator(mean_hvp, mask, 0.0), b, iterations=power_iterations)
            scale = _LISSA_SAFETY * (eigenvalue + damping)
            power_evals = num_batches * (power_iterations + 1)
        scale = jnp.asarray(scale, b_norm.dtype)
        x, iterations = _lissa(
            lambda index: _damped_operator(hvp_on(index), mask, damping),
            b,
            scale=scale,
            depth=depth,
            num_batches=num_batches,
        )
        reached, negative = None, jnp.asarray(False)  # LiSSA runs its full depth; judged by the residual below
        hvp_evals = power_evals + iterations + num_batches
        diagnostics["scale"] = scale

    residual = _relative_residual(full, x, b, b_norm)
    diverged = ~_is_finite(x) | ~jnp.isfinite(residual)
    if solver == "lissa":
        # CG's iterates improve on x = 0 in the energy norm even while the residual grows; LiSSA's carry no such
        # guarantee, and a growing Neumann series is exactly how it diverges.
        diverged = diverged | (residual > 1.0)
    if reached is None:
        reached = residual <= tol
    converged = reached & ~negative & ~diverged
    x = jax.tree.map(lambda leaf: jnp.where(diverged, jnp.zeros_like(leaf), leaf), x)
    new_params = _apply_step(params, x, mask)
    name = "CG" if solver == "cg" else "LiSSA"
    jax.debug.callback(
        lambda *flags: _warn_unless_converged(name, *flags), converged, diverged, negative, residual, iterations
    )
    diagnostics.update(
        update_norm=otu.tree_norm(otu.tree_sub(new_params, params)),
        hvp_evals=hvp_evals,
        iterations=iterations,
        residual=residual,
        converged=converged,
        negative_curvature=negative,
        diverged=diverged,
    )
    return new_params, diagnostics


def diagonal_newton_update(
    loss_fn: LossFn,
    params: PyTree,
    old_batch: PyTree,
    new_batch: PyTree,
    curvature: PyTree,
    *,
    num_train: int,
    mask: PyTree | None = None,
    damping: float = 1e-3,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The diagonal-Newton update θ* − M ⊙ ḡ / (max(d, 0) + λ), d a diagonal of the mean-loss Hessian.

    The cheap second-order update that the curvature stage makes possible: ``curvature`` is any estimate from
    :mod:`jaxforget.curvature` (on the mean scale of ``loss_fn``, as they all are), so the update costs two
    gradients beyond it. Negative entries (Hutchinson estimates can be negative) are clipped to zero, which is why
    ``damping`` must be positive. It equals :func:`second_order_update` when H̄ is diagonal and ``curvature`` is its
    diagonal.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over ``batch``.
      params: the trained parameters θ*.
      old_batch: the group Z as trained on (n samples).
      new_batch: its corrected version Z~ (the same n samples, in the same order).
      curvature: the diagonal d, shaped like ``params``.
      num_train: N, the number of training samples (see the module docstring for the scale).
      mask: optional boolean pytree shaped like ``params``; entries outside it are returned unchanged, bitwise.
      damping: λ > 0, added to the diagonal.

    Returns:
      ``(new_params, diagnostics)`` with ``update_norm``, ``gradient_evals`` (2), ``hvp_evals`` (0) and
      ``curvature_share``: the share of the masked entries whose step the curvature shrinks by more than 10%
      against ḡ / λ (max(d, 0) > λ / 9). Near 0 the update is a first-order step of size 1 / (N λ) in disguise.
    """
    n = _check_group(old_batch, new_batch)
    check_tree_matches(curvature, params, "curvature")
    num_train = _check_num_train(num_train, num_train, n)
    _check_positive_number(damping, "damping")
    mask = _full_mask(params, mask)
    g = _gradient_difference(loss_fn, params, old_batch, new_batch, n)
    step = jax.tree.map(lambda gi, d: gi / num_train / (jnp.maximum(d, 0) + damping), g, curvature)
    new_params = _apply_step(params, step, mask)
    shaped = jax.tree.map(lambda d, m: jnp.sum(m & (d > damping / 9)), curvature, mask)
    selected = sum(jnp.sum(m) for m in jax.tree.leaves(mask))
    return new_params, {
        "update_norm": otu.tree_norm(otu.tree_sub(new_params, params)),
        "gradient_evals": jnp.asarray(2),
        "hvp_evals": jnp.asarray(0),
        "curvature_share": sum(jax.tree.leaves(shaped)) / jnp.maximum(selected, 1),
    }


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning on the corrected group with the unselected parameters frozen.


def _finetune_loss(apply_fn, variables, params, batches, retain_weight, ascent_weight):
    """CE(Z~) + retain_weight · CE(retained) − ascent_weight · CE(Z) in eval mode, and CE(Z~) as aux."""
    new_batch, retain_batch, old_batch = batches

    def cross_entropy(batch):
        logits = apply_fn({**variables, "params": params}, batch.inputs, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()

    new_loss = cross_entropy(new_batch)
    total = new_loss
    if retain_batch is not None:
        total = total + retain_weight * cross_entropy(retain_batch)
    if old_batch is not None:
        total = total - ascent_weight * cross_entropy(old_batch)
    return total, new_loss


def finetune_step(
    state: Any,
    new_batch: Batch,
    retain_batch: Batch | None = None,
    old_batch: Batch | None = None,
    *,
    retain_weight: float = 1.0,
    ascent_weight: float = 0.0,
) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer step on CE(Z~) + retain_weight · CE(retained) − ascent_weight · CE(Z), in eval mode.

    ``state`` is a :class:`jaxforget.train.TrainState`; its batch-norm running averages are used and never updated,
    so only the parameters the optimizer moves change (with :func:`jaxforget.freeze_unselected`, the selected ones).
    The weights are Python floats: bind them with ``functools.partial`` before jitting.

    Args:
      state: the current state.
      new_batch: a batch of Z~.
      retain_batch: a batch of retained training data, or ``None``.
      old_batch: a batch of Z as trained on, for the ascent term, or ``None``.
      retain_weight: the weight of the retained-data loss.
      ascent_weight: the weight of the ascent term on Z (0 disables it).

    Returns:
      ``(state, metrics)`` with the ``loss`` and the ``new_loss`` on Z~ before the step.
    """
    batches = (new_batch, retain_batch, old_batch)
    objective = functools.partial(_finetune_loss, state.apply_fn, state.variables())
    (loss, new_loss), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, batches, retain_weight, ascent_weight
    )
    return state.apply_gradients(grads=grads), {"loss": loss, "new_loss": new_loss}


@functools.lru_cache(maxsize=32)
def _compiled_step(jit: Callable, tx: Any, apply_fn: Callable, retain_weight: float, ascent_weight: float):
    """One wrapped step per (optimizer, model, weights): calls with different masks reuse one compilation."""
    update = frozen_update(tx)

    def step(carry, batches):
        params, variables, opt_state = carry
        objective = functools.partial(_finetune_loss, apply_fn, variables)
        (loss, new_loss), grads = jax.value_and_grad(objective, has_aux=True)(
            params, batches, retain_weight, ascent_weight
        )
        updates, opt_state = update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), variables, opt_state), {"loss": loss, "new_loss": new_loss}

    return jit(step)


def _repeat(batches: Batch | Iterable[Batch] | None) -> Iterable[Batch | None]:
    """A single Batch forever, a sequence of batches cyclically, any other iterable once, None forever."""
    if batches is None or isinstance(batches, Batch):
        return itertools.repeat(batches)
    if isinstance(batches, Sequence):
        return itertools.cycle(batches)
    return batches


def finetune_unlearn(
    state: Any,
    new_batches: Batch | Iterable[Batch],
    retain_batches: Batch | Iterable[Batch] | None = None,
    *,
    tx: optax.GradientTransformation,
    mask: PyTree | None,
    steps: int,
    old_batches: Batch | Iterable[Batch] | None = None,
    retain_weight: float = 1.0,
    ascent_weight: float = 0.0,
    jit: Callable[[Callable], Callable] = jax.jit,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tunes the selected parameters on Z~ (and optionally retained data, and ascent on Z) for ``steps`` steps.

    The optimizer is ``freeze_unselected(tx, mask)``, so entries outside ``mask`` stay bitwise as they were; batch
    norm runs in eval mode (:func:`finetune_step`), so its statistics stay as well.

    Args:
      state: a :class:`jaxforget.train.TrainState` (its optimizer is replaced; ``step`` keeps counting).
      new_batches: Z~, as one Batch used at every step, a sequence of batches cycled through, or an iterator.
      retain_batches: optional retained training data, in the same forms, paired step by step with Z~.
      tx: the optimizer for the selected parameters.
      mask: boolean pytree shaped like the params (``None``: every parameter).
      steps: the number of steps (≥ 1); fewer if an iterator runs out first (see ``diagnostics["steps"]``).
      old_batches: Z as trained on, for gradient ascent with weight ``ascent_weight``.
      retain_weight: the weight of the retained-data loss.
      ascent_weight: the weight of the ascent term on Z (0 disables it).
      jit: wraps the step function once before the loop; ``jax.jit`` by default, ``lambda f: f`` runs eagerly.
      progress: show a progress bar.

    Returns:
      ``(state, diagnostics)`` with ``steps``, ``gradient_evals`` (per-batch gradients: 1 to 3 per step),
      ``update_norm`` (‖θ_new − θ‖) and ``loss`` (the per-step objective, a numpy array).
    """
    _check_positive(steps, "steps")
    _check_nonnegative(retain_weight, "retain_weight")
    _check_nonnegative(ascent_weight, "ascent_weight")
    if ascent_weight > 0 and old_batches is None:
        raise ValueError("ascent_weight > 0 needs old_batches (the group Z as trained on) to ascend on.")
    mask = _full_mask(state.params, mask)
    use_retain, use_old = retain_batches is not None, ascent_weight > 0
    frozen = freeze_unselected(tx, mask)
    step = _compiled_step(jit, tx, state.apply_fn, retain_weight if use_retain else 0.0, ascent_weight)
    paired = zip(_repeat(new_batches), _repeat(retain_batches), _repeat(old_batches if use_old else None), strict=False)
    variables = {name: value for name, value in state.variables().items() if name != "params"}
    carry = (state.params, variables, frozen.init(state.params))
    carry, history = fit(carry, paired, step, num_steps=steps, progress=progress, description="fine-tuning")
    done = len(history.get("loss", ()))
    final = state.replace(params=carry[0], tx=frozen, opt_state=carry[2], step=state.step + done)
    return final, {
        "steps": done,
        "gradient_evals": done * (1 + use_retain + use_old),
        "update_norm": otu.tree_norm(otu.tree_sub(final.params, state.params)),
        "loss": history.get("loss"),
    }
