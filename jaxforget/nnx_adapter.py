"""Flax NNX models in the functional form the estimators take: ``logits_fn(params, inputs)`` and
``loss_fn(params, batch)``, pure functions of the ``nnx.State`` of the model's ``nnx.Param`` s.

An NNX user holds a stateful ``nnx.Module``; the estimators need its parameters as an explicit argument. The helpers
here split the module once (``nnx.split(model, nnx.Param, ...)``) into a graph definition, the parameter state and
the rest (batch statistics, RNG state), and return a function that merges them back (``nnx.merge``) and calls the
model in evaluation mode (``use_running_average=True``, ``deterministic=True``, the way curvature is computed),
together with a snapshot of the parameter state. Every estimator then returns a state shaped like that snapshot, and
:func:`jaxforget.select_top` turns it into a mask that :func:`jaxforget.freeze_unselected` takes inside
``nnx.Optimizer(model, tx, wrt=nnx.Param)``::

    logits_fn, params = nnx_logits_fn(model)
    diagonal = ggn_diagonal(logits_fn, params, inputs)           # an nnx.State shaped like params
    mask = select_top(diagonal, 0.01)
    optimizer = nnx.Optimizer(model, freeze_unselected(optax.adamw(1e-3), mask), wrt=nnx.Param)

The layerwise exact GGN (:func:`jaxforget.ggn_diagonal`, :func:`jaxforget.gnb_diagonal`) covers ``nnx.Linear``,
``nnx.Conv`` and ``nnx.BatchNorm`` in eval mode, as it covers linen's ``nn.Dense``, ``nn.Conv`` and ``nn.BatchNorm``.

The non-parameter state (batch statistics) is closed over as it was when the helper was called, so under
``jax.jit`` it becomes a constant of the compiled program. That is cheap for batch statistics; to pass it as an
argument instead, call the helper inside ``nnx.jit``, which hands the function the model's arrays as inputs::

    @nnx.jit
    def curvature(model, inputs):
        logits_fn, params = nnx_logits_fn(model)
        return ggn_diagonal(logits_fn, params, inputs)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["nnx_logits_fn", "nnx_loss_fn"]

LogitsFn = Callable[[nnx.State, jax.Array], jax.Array]
LossFn = Callable[[nnx.State, Any], jax.Array]


def _check_module(model: Any, name: str) -> None:
    if not isinstance(model, nnx.Module):
        hint = (
            " For a Flax linen model use jaxforget.logits_fn_for(model, batch_stats)."
            if hasattr(model, "apply")
            else ""
        )
        raise TypeError(f"{name} must be a flax.nnx.Module; got {type(model).__name__}.{hint}")


def nnx_logits_fn(model: nnx.Module) -> tuple[LogitsFn, nnx.State]:
    """``logits_fn(params, inputs)`` for an NNX model in evaluation mode, and the parameter state it takes.

    The model is viewed in evaluation mode (``nnx.view(model, use_running_average=True, deterministic=True)``;
    ``model`` itself is not changed) and split into its ``nnx.Param`` state and the rest. ``logits_fn`` merges
    ``params`` with that rest and calls the model, so it is a pure function of ``params`` (an ``nnx.State`` shaped
    like the returned one, with ``nnx.Param`` leaves or the plain arrays of ``nnx.as_pure``). Logits narrower than
    float32 are promoted to float32, as :func:`jaxforget.logits_fn_for` does.

    Args:
      model: an ``nnx.Module`` whose ``__call__(inputs)`` returns logits [B, C] (or [B, T, V] for sequences).

    Returns:
      ``(logits_fn, params)``: the function and a snapshot of the model's ``nnx.Param`` state (later updates of the
      model, e.g. by an ``nnx.Optimizer``, do not change it; call the helper again to see them). The rest of the
      state (batch statistics) is the model's at this call.

    Raises:
      TypeError: if ``model`` is not an ``nnx.Module``.
      ValueError: if ``model`` holds no ``nnx.Param``.

    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> logits_fn, params = nnx_logits_fn(model)
    >>> logits_fn(params, jnp.ones((4, 3))).shape
    (4, 2)
    """
    _check_module(model, "model")
    evaluation = nnx.view(model, use_running_average=True, deterministic=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(evaluation, nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise ValueError(
            f"model ({type(model).__name__}) holds no nnx.Param, so there is nothing to estimate curvature for; "
            "build its layers with nnx.Param variables (nnx.Linear, nnx.Conv, ...)."
        )
    # Snapshots: nnx.split returns the model's own Variable objects, which an optimizer step would update in place.
    params, rest = jax.tree.map(lambda x: x, (params, rest))

    def logits_fn(params: nnx.State, inputs: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest)(inputs)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    return logits_fn, params


def nnx_loss_fn(model: nnx.Module) -> tuple[LossFn, nnx.State]:
    """``loss_fn(params, batch) -> scalar``, the mean softmax cross-entropy of an NNX model in evaluation mode, and
    the parameter state it takes.

    Args:
      model: an ``nnx.Module`` returning logits, as for :func:`nnx_logits_fn`.

    Returns:
      ``(loss_fn, params)``; ``batch`` is ``(inputs, labels)`` (e.g. a :class:`jaxforget.Batch`) with integer
      labels [B] (or [B, T] for sequence logits), and ``params`` is the snapshot of :func:`nnx_logits_fn`.

    Raises:
      TypeError: if ``model`` is not an ``nnx.Module``.
      ValueError: if ``model`` holds no ``nnx.Param``.
    """
    logits_fn, params = nnx_logits_fn(model)

    def loss_fn(params: nnx.State, batch: Any) -> jax.Array:
        inputs, labels = batch
        logits = logits_fn(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss_fn, params
