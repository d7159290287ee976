"""Masks as optax transformations: updates outside an element-wise mask are zero, whatever the optimizer does.

Which tool for which mask:

- An element-wise mask (:func:`jaxforget.select_top`, :func:`jaxforget.select_random`): :func:`freeze_unselected`
  around any optax transformation. Frozen entries stay bitwise unchanged, through momentum, Adam moments, decoupled
  weight decay (``optax.adamw``, ``optax.lion``) and ``optax.inject_hyperparams``; the optimizer keeps state for
  every entry.
- A leaf-level mask (:func:`jaxforget.select_layers`, e.g. the last-layer baseline): :func:`freeze_unselected` works
  the same way; or, to keep optimizer state only for the trained leaves, ``optax.multi_transform`` with
  ``optax.set_to_zero()`` for the frozen ones::

      labels = jax.tree.map(lambda train: "train" if train else "freeze", leaf_mask(mask))
      tx = optax.multi_transform({"train": optax.adamw(1e-3), "freeze": optax.set_to_zero()}, labels)

  (``set_to_zero`` adds ``+0.0``, which turns a ``-0.0`` parameter into ``+0.0``: equal, but not bitwise.)
- Not ``optax.masked(tx, leaf_mask(mask))`` on its own: it applies ``tx`` to the masked leaves and passes the
  *raw gradients* of the others through as their updates, so those leaves move. It restricts one stage of a chain
  (say, weight decay to some leaves); it does not freeze.

Flax NNX: ``nnx.Optimizer(model, freeze_unselected(tx, mask), wrt=nnx.Param)``, with ``mask`` an ``nnx.State``
shaped like ``nnx.state(model, nnx.Param)`` (e.g. :func:`jaxforget.select_top` of a diagonal computed on the state
from :func:`jaxforget.nnx_logits_fn`), with ``nnx.Param`` leaves or the plain arrays of ``nnx.as_pure``.

Zero updates are ``-0.0``: ``p + (-0.0)`` is ``p`` bit for bit for every number ``p``, ``-0.0`` included (where
``p + 0.0`` gives ``+0.0``), so ``optax.apply_updates`` and ``TrainState.apply_gradients`` leave frozen entries
exactly as they were. Keep :func:`freeze_unselected` outermost: a later ``optax.scale`` by a negative factor would
flip those zeros to ``+0.0``.

The mask lives in the transformation's state rather than in a closure, so a jitted training step receives it as an
argument; a mask captured by a closure becomes a constant of the compiled program (5 s to compile for 100M entries
on CPU, and a second copy of the mask).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxforget.curvature import check_tree_matches
from jaxforget.selection import check_mask

__all__ = [
    "MaskedUpdatesState",
    "FreezeState",
    "masked_updates",
    "freeze_unselected",
    "frozen_update",
    "leaf_mask",
    "with_optimizer",
]

PyTree = Any


class MaskedUpdatesState(NamedTuple):
    """State of :func:`masked_updates`: only the mask (boolean arrays shaped like the params).

    Attributes:
      mask: boolean arrays shaped like the params; ``True`` marks an entry whose update passes.
    """

    mask: PyTree


class FreezeState(NamedTuple):
    """State of :func:`freeze_unselected`: the mask and the wrapped transformation's state.

    Attributes:
      mask: boolean arrays shaped like the params; ``True`` marks an entry the optimizer may update.
      inner_state: the state of the wrapped transformation.
    """

    mask: PyTree
    inner_state: optax.OptState


def _plain(tree: PyTree) -> PyTree:
    """``tree`` with every NNX ``Variable`` replaced by the array it holds (what ``nnx.as_pure`` does to a state).

    ``nnx.Optimizer`` initializes its transformation on the model's ``nnx.Param`` state but updates it with the plain
    arrays, and a mask may come either way (from ``select_top`` over either form), so masks and updates are matched
    leaf for leaf, whichever wraps its arrays.
    """
    return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree, is_leaf=_is_variable)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _as_mask(mask: PyTree, params: PyTree) -> PyTree:
    check_mask(_plain(mask), _plain(params), "mask")
    return jax.tree.map(jnp.asarray, mask)


def _zero_outside(updates: PyTree, mask: PyTree, zero: float) -> PyTree:
    """``updates`` with the entries outside ``mask`` set to ``zero``, in the tree structure of ``updates``."""
    # where, not a product: a NaN or inf outside the mask must not leak through as 0 * inf.
    leaves = [
        jnp.where(m, u, jnp.full_like(u, zero))
        for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(updates), leaves)


def masked_updates(mask: PyTree) -> optax.GradientTransformation:
    """Sets the updates of the entries outside ``mask`` to ``-0.0``, so that applying them changes nothing there.

    It keeps no per-parameter state: its state holds the mask only (see the module docstring for why). Placed last in
    a chain it stops the entries from moving, but a stateful optimizer before it still accumulates their gradients
    (momentum that would leak if the mask later grew): :func:`freeze_unselected` also masks what goes in.

    Args:
      mask: a boolean pytree shaped like the params; ``True`` entries pass through.

    Returns:
      An ``optax.GradientTransformation``; its ``init`` raises ``ValueError`` if ``mask`` does not match the params.

    >>> tx = optax.chain(optax.sgd(0.1), masked_updates({"w": jnp.array([True, False])}))
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> updates, _ = tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params))
    >>> optax.apply_updates(params, updates)
    {'w': Array([0.9, 1. ], dtype=float32)}
    """
    check_mask(mask)

    def init_fn(params):
        return MaskedUpdatesState(_as_mask(mask, params))

    def update_fn(updates, state, params=None):
        del params
        check_tree_matches(_plain(updates), _plain(state.mask), "updates")
        return _zero_outside(updates, state.mask, -0.0), state

    return optax.GradientTransformation(init_fn, update_fn)


def freeze_unselected(tx: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that the entries outside ``mask`` never move and ``tx`` never sees their gradients.

    Gradients outside the mask are set to zero before ``tx`` sees them, and ``tx``'s updates there are set to
    ``-0.0`` after it (which removes weight decay and anything else ``tx`` adds), so ``optax.apply_updates`` leaves
    those entries bitwise unchanged for any ``tx``. Because ``tx`` only ever sees zero gradients there, its
    per-entry state stays at its initial value whenever a zero gradient leaves that state unchanged: true of SGD
    momentum, Adam and AdamW moments, Lion, RMSProp and Adagrad accumulators, and their ``inject_hyperparams``
    forms. A mask that later grows therefore starts the newly selected entries from fresh state, with no leaked
    momentum. (Optimizers whose state changes without a gradient, e.g. ``optax.rmsprop`` with a nonzero
    ``initial_scale``, which decays it, still do not move frozen entries.)

    Args:
      tx: any optax transformation; extra arguments to ``update`` are passed through to it.
      mask: a boolean pytree shaped like the params; ``True`` marks the entries ``tx`` may update.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`FreezeState`. ``init`` raises ``ValueError``
      if ``mask`` does not match the params.

    Example, unlearning from a trained Flax ``TrainState`` with the top 1% of a curvature diagonal::

        mask = select_top(diagonal, 0.01)
        state = with_optimizer(state, freeze_unselected(optax.adamw(1e-3, weight_decay=1e-2), mask))
        state = state.apply_gradients(grads=grads)  # in a jitted step
    """
    check_mask(mask)
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        return FreezeState(_as_mask(mask, params), tx.init(params))

    return optax.GradientTransformationExtraArgs(init_fn, frozen_update(tx))


def frozen_update(tx: optax.GradientTransformation) -> optax.TransformUpdateExtraArgsFn:
    """The ``update`` of :func:`freeze_unselected` for ``tx``; the mask comes from its :class:`FreezeState`.

    It does not depend on the mask, so a loop over many masks can compile one step around it (a Flax
    ``TrainState`` holds its ``tx`` as a static field, so a new ``freeze_unselected(tx, mask)`` per mask would
    recompile the step each time).

    Args:
      tx: the wrapped optax transformation.
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra_args):
        check_tree_matches(_plain(updates), _plain(state.mask), "updates")
        grads = _zero_outside(updates, state.mask, 0.0)
        updates, inner_state = tx.update(grads, state.inner_state, params, **extra_args)
        return _zero_outside(updates, state.mask, -0.0), FreezeState(state.mask, inner_state)

    return update_fn


def leaf_mask(mask: PyTree) -> PyTree:
    """One Python bool per leaf, for ``optax.masked`` and ``optax.multi_transform`` labels (see the module docstring).

    Args:
      mask: a boolean pytree whose every leaf is all ``True`` or all ``False``, e.g. from ``select_layers``.

    Raises:
      ValueError: naming the first leaf that is partly selected (an element-wise mask needs
        :func:`freeze_unselected`).
    """
    check_mask(mask)

    def whole(path, leaf):
        leaf = jax.device_get(leaf)
        if leaf.any() and not leaf.all():
            raise ValueError(
                f"mask leaf {jax.tree_util.keystr(path)} is partly selected, so it has no leaf-level equivalent; "
                "use freeze_unselected(tx, mask) for element-wise masks."
            )
        return bool(leaf.all())

    return jax.tree_util.tree_map_with_path(whole, mask)


def with_optimizer(state: Any, tx: optax.GradientTransformation) -> Any:
    """A Flax ``TrainState`` with its optimizer swapped for ``tx`` and a fresh ``opt_state`` for its params.

    ``tx`` is a static field of ``TrainState``, so unlearning with a new optimizer needs a new state; ``step``,
    ``params`` and every other field are kept. See :func:`freeze_unselected` for an example.

    Args:
      state: a Flax ``TrainState`` (e.g. :class:`jaxforget.train.TrainState`).
      tx: the new optimizer, e.g. ``freeze_unselected(optax.adam(1e-3), mask)``.
    """
    return state.replace(tx=tx, opt_state=tx.init(state.params))
