"""Ensembles: K models that differ in initialization and batch order (and optionally data subset), as one program.

Every leaf of a *stacked* pytree carries a leading model axis of size K: a stacked :class:`~jaxforget.train.TrainState`
holds K models' params, optimizer states, batch-norm statistics and step counters. Model ``k`` with seed ``s`` is
initialized from ``jax.random.key(s)`` and trained on the batches ``jaxforget.batches(data, batch_size, seed=s, ...)``
yields, as the single-model path (``pipeline``'s train stage) does, so it equals that model trained alone up to the
order of floating-point summation (XLA batches the K matrix products into one, which may sum in another order)::

    seeds = [0, 1, 2, 3]
    init = jax.jit(create_stacked_states, static_argnums=(0, 2, 3))
    state = init(MLP(), keys_for_seeds(seeds), (1, 8, 8, 1), optax.adam(1e-3))
    state, history = train_stacked(state, train, 64, seeds, jax.jit(indexed_train_step), num_steps=500)
    model_2 = unstack(state, 2)  # a plain TrainState

For convolutional models on CPU pass ``functools.partial(indexed_train_step, unrolled=True)``: vmapped convolutions
with per-model kernels run several times slower there (see :func:`stacked_train_step`).

Nothing here jits (callers jit, as everywhere in jaxforget). With several devices, :func:`shard_models` puts the model
axis on a mesh axis ``"models"``; the jitted steps then run each device's models on that device
(``train_stacked(..., mesh=mesh)`` also shards the batch indices).

**Unlearning on stacked models** is ``jax.vmap`` over the model axis of the existing pure functions: the estimators,
the selections and the updates take no model axis themselves, and vmapping them gives each model its own curvature,
its own mask and its own update. Build ``logits_fn`` / ``loss_fn`` *inside* the mapped function from that model's
batch-norm statistics (``models.logits_fn_for(model, stats)``); pass data shared by all models with ``in_axes=None``
and per-model data (keys, groups) with a leading K axis. Static arguments (``fraction``, ``tau``, ``num_probes``...)
are bound with Python closures or ``functools.partial``::

    def ggn(params, stats, inputs):
        return ggn_diagonal(logits_fn_for(model, stats), params, inputs)

    curvature = jax.jit(jax.vmap(ggn, in_axes=(0, 0, None)))(state.params, state.batch_stats, batch.inputs)
    masks = jax.jit(jax.vmap(lambda c: select_top(c, 0.01)))(curvature)  # one mask per model, [K, ...] per leaf

    def first_order(params, stats, mask, old, new):
        return first_order_update(loss_fn_for(model, stats), params, old, new, tau=1e-4, mask=mask)

    new_params, diagnostics = jax.jit(jax.vmap(first_order, in_axes=(0, 0, 0, None, None)))(
        state.params, state.batch_stats, masks, old_batch, new_batch
    )  # diagnostics: one [K] array per entry

    def hutchinson(params, stats, key, batch):
        return hutchinson_diagonal(loss_fn_for(model, stats), params, batch, key, num_probes=8)

    estimates = jax.jit(jax.vmap(hutchinson, in_axes=(0, 0, 0, None)))(
        state.params, state.batch_stats, jax.random.split(key, K), batch
    )  # one key per model

``diagonal_newton_update`` maps the same way with the curvature as one more mapped argument, and the random
estimators (``gnb_diagonal``, ``hutchinson_diagonal``) take one key per model, as above. With
JAX's default threefry keys a vmapped estimator draws the same numbers as one model at a time; the "rbg" key
implementations do not. Masked fine-tuning needs an optimizer state initialized per model, under its own mask:
:func:`with_stacked_optimizer` builds it, after which ``jax.vmap(unlearn.finetune_step)`` steps all models at once.
:func:`map_models` is ``jax.jit(jax.vmap(fn, in_axes))`` with a switch to one model at a time (convolutional models
on CPU); ``jaxforget run --forgetting K`` runs every stage through it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxforget import data as data_lib
from jaxforget import train
from jaxforget.masking import freeze_unselected, frozen_update
from jaxforget.models import Batch
from jaxforget.selection import check_mask

__all__ = [
    "MODELS_AXIS",
    "keys_for_seeds",
    "num_models",
    "stack",
    "unstack",
    "create_stacked_states",
    "stacked_batch_indices",
    "stacked_batches",
    "stacked_train_step",
    "indexed_train_step",
    "train_stacked",
    "models_mesh",
    "models_sharding",
    "shard_models",
    "with_stacked_optimizer",
    "map_models",
]

PyTree = Any

MODELS_AXIS = "models"  # the mesh axis that holds the model axis


# ----------------------------------------------------------------------------------------------------------------
# Checks (on Python values and shapes only: they raise before any compute).


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence | np.ndarray):
        raise ValueError(f"seeds must be a sequence of integers, one per model, e.g. [0, 1, 2, 3]; got {seeds!r}.")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; pass one integer seed per model, e.g. seeds=range(8).")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
    if bad:
        raise ValueError(f"seeds must be integers (one per model); got {bad[0]!r}. Pass e.g. seeds=[0, 1, 2, 3].")
    return [int(s) for s in seeds]


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer of at least 1.")
    return int(value)


def _check_subsets(subsets: Sequence[np.ndarray], num_rows: int, num_models_: int) -> list[np.ndarray]:
    subsets = list(subsets)
    if len(subsets) != num_models_:
        raise ValueError(
            f"subsets has {len(subsets)} index arrays but there are {num_models_} seeds; pass one array of row "
            "indices per model (or subsets=None to train every model on all rows)."
        )
    checked = []
    for k, subset in enumerate(subsets):
        subset = np.asarray(subset)
        if subset.ndim != 1 or not (np.issubdtype(subset.dtype, np.integer) or subset.size == 0):
            raise ValueError(
                f"subsets[{k}] must be a 1-D array of integer row indices; got shape {subset.shape}, dtype "
                f"{subset.dtype}. Use e.g. np.flatnonzero(keep) for a boolean selection."
            )
        if subset.size and (subset.min() < 0 or subset.max() >= num_rows):
            raise ValueError(
                f"subsets[{k}] holds row indices outside [0, {num_rows}) (min {subset.min()}, max {subset.max()}); "
                "index the rows of `data`."
            )
        checked.append(subset.astype(np.int64))
    return checked


def _epochs_per_model(epochs: int | Sequence[int], num_models_: int) -> list[int]:
    if isinstance(epochs, Sequence):
        if len(epochs) != num_models_:
            raise ValueError(
                f"epochs has {len(epochs)} entries for {num_models_} models; pass one per model or an int."
            )
        return [_check_positive_int(e, "epochs") for e in epochs]
    return [_check_positive_int(epochs, "epochs")] * num_models_


# ----------------------------------------------------------------------------------------------------------------
# Stacked pytrees.


def keys_for_seeds(seeds: Sequence[int]) -> jax.Array:
    """The PRNG keys ``jax.random.key(s)`` for each seed, stacked: a key array of shape [K].

    Model ``k``'s key is bitwise the key a single run with seed ``seeds[k]`` starts from.
    """
    seeds = _check_seeds(seeds)
    return jnp.stack([jax.random.key(s) for s in seeds])


def num_models(tree: PyTree) -> int:
    """K, the size of the leading model axis shared by every array leaf of ``tree``.

    Raises:
      ValueError: ``tree`` has no array leaves, a scalar leaf, or leaves whose leading sizes differ.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError("tree has no leaves; pass a stacked pytree (every leaf [K, ...]).")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"tree leaf {jax.tree_util.keystr(path)} is a scalar, so it has no model axis; every leaf of a "
                "stacked tree is [K, ...] (build it with stack or create_stacked_states)."
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        described = ", ".join(f"{size} ({where})" for size, where in sizes.items())
        raise ValueError(f"tree's leaves have different leading sizes {described}; a stacked tree shares one K.")
    return next(iter(sizes))


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks K pytrees of one structure into one with a leading model axis: [K, ...] per leaf.

    For :class:`~jaxforget.train.TrainState` s the static fields (``apply_fn``, ``tx``) must be the same objects, e.g.
    states created with one ``tx`` (two calls of ``optax.adam(1e-3)`` give two different transformations).
    """
    trees = list(trees)
    if not trees:
        raise ValueError("trees is empty; stack needs at least one pytree.")
    structures = [jax.tree.structure(tree) for tree in trees]
    for k, structure in enumerate(structures[1:], start=1):
        if structure != structures[0]:
            raise ValueError(
                f"trees[{k}] has another structure than trees[0] ({structure} vs {structures[0]}); stack pytrees of "
                "one structure (for TrainStates, created with the same model and the same tx object)."
            )
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: PyTree, k: int) -> PyTree:
    """Model ``k`` of a stacked pytree (the leading axis removed); ``k`` may be negative, as in Python indexing."""
    size = num_models(tree)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not -size <= k < size:
        raise ValueError(f"k={k!r} must be an integer model index in [-{size}, {size}) for this tree of K={size}.")
    return jax.tree.map(lambda leaf: leaf[k], tree)


def create_stacked_states(
    model: nn.Module, keys: jax.Array, input_shape: Sequence[int], tx: optax.GradientTransformation
) -> train.TrainState:
    """K models initialized from ``keys`` (one each) and wrapped with optimizer ``tx``: a stacked ``TrainState``.

    ``jax.vmap`` of :func:`jaxforget.train.create_train_state` over the keys: ``params``, ``opt_state``,
    ``batch_stats`` and ``step`` get a leading model axis K, and model ``k`` equals
    ``create_train_state(model, keys[k], input_shape, tx)``. Jit it as ``jax.jit(create_stacked_states,
    static_argnums=(0, 2, 3))``.

    Args:
      model: the Flax model (one architecture for all K).
      keys: a PRNG key array of shape [K], e.g. :func:`keys_for_seeds` or ``jax.random.split(key, K)``.
      input_shape: the shape [B, ...] of a dummy input batch.
      tx: the optimizer.

    Returns:
      A :class:`~jaxforget.train.TrainState` whose every array leaf is [K, ...].
    """
    if not isinstance(keys, jax.Array) or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"keys must be a typed PRNG key array of shape [K] (got {type(keys).__name__} "
            f"{getattr(keys, 'dtype', '')}); build it with keys_for_seeds(seeds) or jax.random.split(key, K)."
        )
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"keys must have shape [K] with K >= 1, one key per model; got shape {keys.shape}.")
    return jax.vmap(lambda key: train.create_train_state(model, key, input_shape, tx))(keys)


# ----------------------------------------------------------------------------------------------------------------
# One data pipeline for K models.


def _index_streams(
    num_rows: int, batch_size: int, seeds: list[int], epochs: list[int], subsets: list[np.ndarray] | None
) -> Iterator[np.ndarray]:
    rows = [np.arange(num_rows)] * len(seeds) if subsets is None else subsets
    # data.batches over the row indices themselves: each model's order is by construction the one it gives.
    streams = [
        data_lib.batches(Batch(r, r), batch_size, seed=s, epochs=e) for r, s, e in zip(rows, seeds, epochs, strict=True)
    ]
    for per_model in zip(*streams, strict=False):  # ends with the shortest stream
        yield np.stack([batch.inputs for batch in per_model])


def stacked_batch_indices(
    num_rows: int,
    batch_size: int,
    seeds: Sequence[int],
    *,
    epochs: int | Sequence[int] = 1,
    subsets: Sequence[np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Row indices [K, B] of each step's batches: row ``k`` is the batch :func:`jaxforget.batches` gives model ``k``.

    Model ``k`` gets, step by step, the rows of ``jaxforget.batches(data, batch_size, seed=seeds[k],
    epochs=epochs)`` (full batches only: ``drop_remainder``), or, with ``subsets``, those of
    ``jaxforget.batches(data[subsets[k]], ...)`` mapped back to rows of ``data``. The stream ends when the first
    model's stream does (they differ in length only when subsets differ in size or ``epochs`` differ).

    Args:
      num_rows: N, the number of rows of the data.
      batch_size: B, rows per batch and model.
      seeds: one integer seed per model (K of them); the batch order of model ``k`` depends on ``seeds[k]`` only.
      epochs: passes over the data, one int for all models or one per model.
      subsets: optional, one 1-D array of row indices per model (data-subset ensembles), each of at least B rows.

    Returns:
      An iterator of int64 arrays [K, B]. The arguments are checked at the call, before the first batch.
    """
    seeds = _check_seeds(seeds)
    num_rows = _check_positive_int(num_rows, "num_rows")
    batch_size = _check_positive_int(batch_size, "batch_size")
    epochs = _epochs_per_model(epochs, len(seeds))
    if subsets is not None:
        subsets = _check_subsets(subsets, num_rows, len(seeds))
    smallest = min(s.size for s in subsets) if subsets is not None else num_rows
    if batch_size > smallest:
        where = "the smallest subset" if subsets is not None else "the data"
        raise ValueError(f"batch_size={batch_size} exceeds the {smallest} rows of {where}; lower batch_size.")
    return _index_streams(num_rows, batch_size, seeds, epochs, subsets)


def stacked_batches(
    data: Batch,
    batch_size: int,
    seeds: Sequence[int],
    *,
    epochs: int | Sequence[int] = 1,
    subsets: Sequence[np.ndarray] | None = None,
) -> Iterator[Batch]:
    """Batches stacked over models, ``Batch(inputs [K, B, ...], labels [K, B])``, gathered on the host.

    Slice ``k`` equals, bitwise, the batch ``jaxforget.batches(data, batch_size, seed=seeds[k], epochs=epochs)`` (or
    that of ``data[subsets[k]]``) yields at the same step; see :func:`stacked_batch_indices` for the arguments.
    :func:`train_stacked` gathers on the device instead, from the indices.
    """
    indices = stacked_batch_indices(len(data.labels), batch_size, seeds, epochs=epochs, subsets=subsets)
    return (Batch(data.inputs[index], data.labels[index]) for index in indices)


# ----------------------------------------------------------------------------------------------------------------
# Training.


def stacked_train_step(
    state: train.TrainState, batch: Batch, *, unrolled: bool = False
) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """:func:`jaxforget.train.train_step` for every model at once: ``jax.vmap`` over the model axis.

    ``unrolled=True`` writes the K single-model steps one after the other into the program instead (static: bind it
    with ``functools.partial`` before jitting). Each model then runs the single-model step's own operations, and the
    program, and its compile time, grow with K. Use it for convolutional models on CPU, where the vmapped step is
    slow: XLA lowers a convolution batched over per-model kernels to a grouped convolution, which its CPU backend
    runs far slower than K separate ones (measured on 2 cores, the main job's CNN at K = 4: 0.16 s per model and
    step vmapped, 0.04 unrolled, 0.03 alone).

    Args:
      state: a stacked ``TrainState`` (K models).
      batch: ``Batch(inputs [K, B, ...], labels [K, B])``, model ``k``'s batch in slice ``k``.
      unrolled: K single-model steps instead of one vmapped step.

    Returns:
      ``(state, metrics)``, metrics ``{"loss", "accuracy"}`` each [K], per model, before the step.
    """
    if not unrolled:
        return jax.vmap(train.train_step)(state, batch)
    steps = [train.train_step(unstack(state, k), unstack(batch, k)) for k in range(num_models(batch))]
    return stack([new for new, _ in steps]), stack([metrics for _, metrics in steps])


def indexed_train_step(
    state: train.TrainState, data: Batch, index: jax.Array, *, unrolled: bool = False
) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """:func:`stacked_train_step` on the rows ``index`` [K, B] of ``data`` (all N rows, on the device).

    The gather happens inside the step, so one copy of the data stays on the device and each step moves only the
    indices. Pass ``data`` as an argument of the jitted step, never closed over (it would become a constant).
    ``unrolled`` is :func:`stacked_train_step`'s.
    """
    return stacked_train_step(state, Batch(data.inputs[index], data.labels[index]), unrolled=unrolled)


def _epochs_for(num_steps: int, rows: int, batch_size: int) -> int:
    """The epochs the single-model train stage draws for ``num_steps`` steps over ``rows`` rows (full batches)."""
    return math.ceil(num_steps / (rows // batch_size))


def train_stacked(
    state: train.TrainState,
    data: Batch,
    batch_size: int,
    seeds: Sequence[int],
    step_fn: Any,
    *,
    num_steps: int,
    subsets: Sequence[np.ndarray] | None = None,
    mesh: Mesh | None = None,
) -> tuple[train.TrainState, dict[str, np.ndarray]]:
    """Trains the K stacked models for ``num_steps`` steps, each as the single-model train stage trains one.

    Model ``k`` takes ``num_steps`` steps of ``step_fn`` over ``jaxforget.batches(data, batch_size, seed=seeds[k],
    epochs=ceil(num_steps / (N // batch_size)))`` (N: its rows), exactly the stream and step count of
    ``pipeline``'s train stage with ``jax.jit(train.train_step)`` and ``train.fit``.

    Args:
      state: a stacked ``TrainState``, e.g. from :func:`create_stacked_states` with ``keys_for_seeds(seeds)``.
      data: the training set, ``Batch(inputs [N, ...], labels [N])``; copied to the device once.
      batch_size: rows per batch and model.
      seeds: the batch-order seed of each model (K of them).
      step_fn: a jitted :func:`indexed_train_step` (or any step with its signature).
      num_steps: optimizer steps per model (>= 1).
      subsets: optional, one array of row indices of ``data`` per model (see :func:`stacked_batch_indices`).
      mesh: optional mesh with a ``"models"`` axis: the state and the indices are sharded over it
        (:func:`shard_models`) and the data replicated.

    Returns:
      ``(state, history)``: the trained stacked state, and each metric as a numpy array [num_steps, K].
    """
    seeds = _check_seeds(seeds)
    size = num_models(state)
    if len(seeds) != size:
        raise ValueError(f"seeds has {len(seeds)} entries but state holds K={size} models; pass one seed per model.")
    num_steps = _check_positive_int(num_steps, "num_steps")
    num_rows = len(data.labels)
    checked = None if subsets is None else _check_subsets(subsets, num_rows, size)
    rows = [num_rows] * size if checked is None else [s.size for s in checked]
    batch_size = _check_positive_int(batch_size, "batch_size")
    if batch_size > min(rows):
        raise ValueError(f"batch_size={batch_size} exceeds the {min(rows)} rows some model trains on; lower it.")
    epochs = [_epochs_for(num_steps, r, batch_size) for r in rows]
    indices = stacked_batch_indices(num_rows, batch_size, seeds, epochs=epochs, subsets=checked)
    if mesh is None:
        on_device, place = jax.device_put(data), jnp.asarray
    else:
        state = shard_models(state, mesh)
        on_device = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
        place = lambda index: jax.device_put(index, models_sharding(mesh))  # noqa: E731
    records = []
    for index in indices:
        if len(records) == num_steps:
            break
        state, metrics = step_fn(state, on_device, place(index))
        records.append(metrics)
    history = {name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}
    return state, history


# ----------------------------------------------------------------------------------------------------------------
# Sharding the model axis.


def models_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) with the one axis ``"models"``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device (or None for all of jax.devices()).")
    return Mesh(np.asarray(devices), (MODELS_AXIS,))


def models_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, PartitionSpec("models"))``: the leading axis split over the mesh's ``"models"`` axis."""
    return NamedSharding(mesh, PartitionSpec(MODELS_AXIS))


def shard_models(tree: PyTree, mesh_or_devices: Mesh | Sequence[jax.Device] | None = None) -> PyTree:
    """Places a stacked pytree with its model axis split over devices: each device holds K / D consecutive models.

    Every leaf gets ``NamedSharding(mesh, PartitionSpec("models"))`` (:func:`models_sharding`); jitted steps on the
    result keep that sharding, so each device trains, curves and unlearns its own models.

    Args:
      tree: a stacked pytree (every leaf [K, ...]), e.g. a stacked ``TrainState`` or masks.
      mesh_or_devices: a ``jax.sharding.Mesh`` with an axis ``"models"`` (see :func:`models_mesh`), a sequence of
        devices for a 1-D one, or ``None`` for all of ``jax.devices()``.

    Returns:
      ``tree`` on the devices, sharded along its leading axis.

    Raises:
      ValueError: the mesh has no ``"models"`` axis, or K is not a multiple of the number of devices on it.
    """
    mesh = mesh_or_devices if isinstance(mesh_or_devices, Mesh) else models_mesh(mesh_or_devices)
    if MODELS_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh_or_devices has axes {mesh.axis_names} but no {MODELS_AXIS!r} axis; build one with models_mesh()."
        )
    size, count = num_models(tree), mesh.shape[MODELS_AXIS]
    if size % count:
        raise ValueError(
            f"K={size} models cannot be split evenly over {count} devices; choose K a multiple of {count}, or pass "
            f"fewer devices (a divisor of {size})."
        )
    return jax.device_put(tree, models_sharding(mesh))


# ----------------------------------------------------------------------------------------------------------------
# Any function over the model axis.


def map_models(fn: Any, in_axes: Sequence[int | None], *, sequential: bool = False) -> Any:
    """``fn`` applied to each model of the stacked arguments, compiled: ``jax.jit(jax.vmap(fn, in_axes))``.

    Arguments whose ``in_axes`` entry is 0 carry a leading model axis; those with ``None`` are shared by every model.
    With ``sequential=True`` the jitted ``fn`` is called on one model at a time and the outputs are stacked: the
    same results, for backends where the vmapped program is slow (XLA's CPU backend runs convolutions with per-model
    kernels several times slower than one model at a time; ``jax.lax.map`` inside one program ran the main job's CNN
    Fisher 3x and its gradient 12x slower than this loop on 2 cores).

    Args:
      fn: a pure function of one model's arguments.
      in_axes: one entry per positional argument: 0 (stacked) or None (shared), at least one 0.
      sequential: loop over the models instead of vmapping them.

    Returns:
      A function of the same arguments returning ``fn``'s outputs stacked along a leading model axis.
    """
    in_axes = tuple(in_axes)
    if any(axis not in (0, None) for axis in in_axes) or 0 not in in_axes:
        raise ValueError(f"in_axes={in_axes} must hold 0 (stacked) or None (shared) per argument, at least one 0.")
    if not sequential:
        return jax.jit(jax.vmap(fn, in_axes=in_axes))
    single = jax.jit(fn)

    def looped(*args):
        count = num_models([arg for arg, axis in zip(args, in_axes, strict=True) if axis == 0])

        def model(k):
            return (jax.tree.map(lambda x: x[k], a) if axis == 0 else a for a, axis in zip(args, in_axes, strict=True))

        return stack([single(*model(k)) for k in range(count)])

    return looped


# ----------------------------------------------------------------------------------------------------------------
# Masked fine-tuning on stacked models.


def with_stacked_optimizer(
    state: train.TrainState, tx: optax.GradientTransformation, masks: PyTree
) -> train.TrainState:
    """A stacked ``TrainState`` whose optimizer is ``freeze_unselected(tx, mask_k)`` for each model ``k``.

    The stacked counterpart of ``with_optimizer(state, freeze_unselected(tx, mask))``: each model's optimizer state
    is initialized on its own parameters and holds its own mask, so ``jax.vmap(unlearn.finetune_step)(state, ...)``
    fine-tunes model ``k`` with only ``masks[k]`` free, as :func:`jaxforget.finetune_unlearn` would.

    Args:
      state: a stacked ``TrainState``.
      tx: the optimizer for the selected entries.
      masks: stacked boolean masks ([K, ...] per leaf, shaped like ``state.params``), e.g. a vmapped ``select_top``.

    Returns:
      ``state`` with the new optimizer and a fresh stacked optimizer state; ``step`` and the params unchanged.
    """
    check_mask(masks, state.params, "masks")
    size = num_models(state.params)
    if num_models(masks) != size:
        raise ValueError(f"masks hold {num_models(masks)} models but state holds K={size}; pass one mask per model.")
    opt_state = jax.vmap(lambda mask, params: freeze_unselected(tx, mask).init(params))(masks, state.params)
    return state.replace(tx=_stacked_frozen(tx), opt_state=opt_state)


def _stacked_frozen(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``freeze_unselected``'s update, which reads the mask from each model's own state; its init cannot know the
    masks, so it says where the state comes from."""

    def init_fn(params: PyTree) -> optax.OptState:
        del params
        raise ValueError(
            "a stacked masked optimizer's state is built per model with its mask: call "
            "with_stacked_optimizer(state, tx, masks) again instead of tx.init."
        )

    return optax.GradientTransformationExtraArgs(init_fn, frozen_update(tx))
