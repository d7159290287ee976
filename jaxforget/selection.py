"""From scores to element-wise boolean masks: the top (or bottom) fraction, a random baseline, whole layers.

A mask is a pytree of boolean arrays shaped like ``params``: ``True`` marks an entry the unlearning step may update,
``False`` one it must leave untouched (see :mod:`jaxforget.masking`).

Ranking. :func:`select_top` ranks the entries of a pytree by one total order: by score, with ``-0.0`` equal to
``0.0`` and every NaN above ``+inf`` (as ``jnp.sort`` places them), and among equal scores the entry with the lower
flat index (position in ``jax.tree.leaves`` order, row-major within a leaf) ranks higher. ``largest=True`` takes the
``k`` highest-ranked entries and ``largest=False`` the ``k`` lowest, so among tied scores the first takes lower
indices first and the second higher indices first, and a largest and a smallest selection never overlap while their
sizes sum to at most ``n``.

Scale. The ``k``-th score is found by a bitwise bisection over an order-preserving unsigned-integer view of the
scores (the keys): one counting pass per key bit (32 for float32), each a compare-and-sum, with no sort, no host
round trip and no Python loop over entries. For a global selection the keys of all leaves are laid end to end (one
concatenation), so the search compiles to the same program whatever the number of leaves. Ties at the threshold
cost a second bisection over flat positions, run only when the budget ends inside them (rare for continuous
scores). Peak temporary memory is about twice the scores for a global selection (the keys, once per leaf and once
laid end to end) and about once for a per-layer one over large leaves (up to three times over leaves smaller than a
counting chunk, whose count buffers XLA's CPU backend may keep at once). A global top 1% of 100M float32 scores
took 3 to 6 s on two (shared) CPU cores, against 8 s for ``jax.lax.top_k`` and 50 to 75 s for sorting; see
``benchmarks/selection.py`` and its results.

Nothing here jits: wrap calls in ``jax.jit`` with ``fraction``, ``largest``, ``per_layer`` and ``magnitude`` static
(``names`` too for :func:`select_layers`). :func:`mask_summary` reads masks on the host, for reports.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxforget.curvature import check_tree_matches

__all__ = [
    "select_top",
    "select_random",
    "select_layers",
    "last_layer",
    "layers_in_call_order",
    "last_layers_holding",
    "mask_summary",
    "check_mask",
]

PyTree = Any

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
_CHUNK = 1 << 18  # entries counted at once (see _count_chunks)


# ----------------------------------------------------------------------------------------------------------------
# Input checks (shapes and dtypes only; they raise before any compute).


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], e.g. 0.01 for 1% of the entries; got {fraction!r}.")


def _check_nonempty(tree: PyTree, name: str) -> list:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no leaves; pass a pytree of arrays (e.g. the model's params).")
    return leaves


def check_mask(mask: PyTree, params: PyTree | None = None, name: str = "mask") -> None:
    """Raises ``ValueError`` naming ``name`` unless ``mask`` is a boolean pytree (shaped like ``params``, if given)."""
    leaves = _check_nonempty(mask, name)
    if params is not None:
        check_tree_matches(mask, params, name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
        dtype = jnp.result_type(leaf)
        if dtype != jnp.bool_:
            where = f" leaf {jax.tree_util.keystr(path)}" if len(leaves) > 1 else ""
            raise ValueError(
                f"{name}{where} has dtype {dtype}, but masks must be boolean (True = may be updated). "
                f"Build one with select_top / select_random / select_layers, or compare, e.g. scores > threshold."
            )


def _count_dtype(n: int) -> jnp.dtype:
    if n < 2**31:
        return jnp.int32
    if not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"the tree has {n} entries, more than 32-bit counts can hold; enable 64-bit ones with "
            "jax.config.update('jax_enable_x64', True)."
        )
    return jnp.int64


# ----------------------------------------------------------------------------------------------------------------
# Selection of the k largest keys, ties to the lower (or higher) flat index.


def _order_keys(x: jax.Array, *, largest: bool, magnitude: bool) -> jax.Array:
    """Unsigned integers whose order is the ranking of :func:`select_top` (largest first); same shape as ``x``.

    A float's bits, read as an unsigned integer with the sign bit flipped (all bits for negatives), increase with
    the float. -0.0 becomes 0.0 and every NaN the largest key; ``largest=False`` inverts the bits.
    """
    if magnitude:
        x = jnp.abs(x)
    unsigned = _UNSIGNED[x.dtype.itemsize]
    sign = jnp.asarray(1 << (8 * x.dtype.itemsize - 1), unsigned)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), unsigned)
    keys = jnp.where(bits >= sign, ~bits, bits | sign)
    keys = jnp.where(jnp.isnan(x), jnp.asarray(jnp.iinfo(unsigned).max, unsigned), keys)
    return keys if largest else ~keys


def _bisect_bits(
    num_bits: int, start: jax.Array, accept: Callable[[jax.Array], jax.Array], steps: jax.Array | int | None = None
) -> jax.Array:
    """The greatest ``t >= start`` (elementwise) with ``accept(t)``, for ``accept`` true on ``[start, T]`` only.

    Sets one bit per step, most significant first, over ``num_bits`` bits: one call of ``accept`` per step.
    ``steps`` (traced or not) stops after that many, so ``steps=0`` returns ``start`` at no cost.
    """

    def refine(bit, t):
        candidate = t | jnp.left_shift(jnp.ones_like(t), (num_bits - 1 - bit).astype(t.dtype))
        return jnp.where(accept(candidate), candidate, t)

    return jax.lax.fori_loop(0, num_bits if steps is None else steps, refine, start)


def _count_chunks(
    values: jax.Array, predicate: Callable[[jax.Array, jax.Array], jax.Array], dtype: jnp.dtype
) -> jax.Array:
    """The number of true ``predicate(values, flat positions)`` over the 1-D ``values``, ``_CHUNK`` at a time.

    In chunks because XLA's CPU backend writes the integer input of a reduction to memory: over all the values that
    is a buffer as large as the scores, per chunk a cache-sized one (and the passes run faster).
    """
    size = values.size
    width = min(_CHUNK, size)
    full, rest = divmod(size, width) if size else (0, 0)

    def chunk(start, length):
        at = jnp.asarray(start, dtype) + jnp.arange(length, dtype=dtype)
        return jnp.sum(predicate(jax.lax.dynamic_slice_in_dim(values, start, length), at), dtype=dtype)

    total = jnp.zeros((), dtype)
    if full == 1:
        total = chunk(0, width)
    elif full > 1:
        total = jax.lax.fori_loop(0, full, lambda row, t: t + chunk(row * width, width), total)
    return total + chunk(full * width, rest) if rest else total


def _take_largest(keys: list[jax.Array], budgets: list[int], *, lower_index_first: bool) -> list[jax.Array]:
    """For each 1-D array of unsigned ``keys``, a boolean mask of its ``budgets[i]`` largest keys, ties broken by
    flat index. All arrays are searched together: one counting pass over every array per bisection step.
    """
    sizes = [key.size for key in keys]
    count_dtype = _count_dtype(max(sizes))
    k = jnp.asarray(budgets, count_dtype)

    def counts(predicate: Callable[[int, jax.Array, jax.Array], jax.Array]) -> jax.Array:
        """Per array ``i``, the number of entries with ``predicate(i, keys, flat positions)``."""
        return jnp.stack(
            [
                _count_chunks(key, lambda chunk, at, i=i: predicate(i, chunk, at), count_dtype)
                for i, key in enumerate(keys)
            ]
        )

    def order(i: int, at: jax.Array) -> jax.Array:  # flat positions in tie-breaking order
        return at if lower_index_first else sizes[i] - 1 - at

    # The threshold: the greatest key t with #(keys >= t) >= k; every key above it is selected.
    threshold = _bisect_bits(
        8 * keys[0].dtype.itemsize,
        jnp.zeros(len(keys), keys[0].dtype),
        lambda t: counts(lambda i, key, at: key >= t[i]) >= k,
    )
    needed = k - counts(lambda i, key, at: key > threshold[i])

    # Ties at the threshold are all selected, unless the budget ends inside them (rare for continuous scores); then
    # the first in flat-index order (the last, if not lower_index_first) are, found by a second bisection: the
    # position of the needed-th tie is the greatest p with #(ties before p) < needed.
    index_bits = max(1, (max(sizes) - 1).bit_length())
    search = jnp.any(counts(lambda i, key, at: key == threshold[i]) != needed)
    last = _bisect_bits(
        index_bits,
        jnp.zeros(len(keys), count_dtype),
        lambda p: counts(lambda i, key, at: (key == threshold[i]) & (order(i, at) < p[i])) < needed,
        steps=jnp.where(search, index_bits, 0),
    )

    masks = []
    for i, key in enumerate(keys):
        at = jnp.arange(sizes[i], dtype=count_dtype)
        tie = (key == threshold[i]) & (needed[i] > 0) & (~search | (order(i, at) <= last[i]))
        masks.append((key > threshold[i]) | tie)
    return masks


def _select(keys: list[jax.Array], fraction: float, *, per_layer: bool, lower_index_first: bool) -> list[jax.Array]:
    """Masks shaped like ``keys`` of their ``round(fraction * n)`` largest entries, over all leaves together or
    within each leaf. Together, the leaves are laid end to end, so the search compiles alike for any number."""
    shapes = [key.shape for key in keys]
    if per_layer:
        budgets = [round(fraction * key.size) for key in keys]
        masks = _take_largest([key.ravel() for key in keys], budgets, lower_index_first=lower_index_first)
        return [mask.reshape(shape) for mask, shape in zip(masks, shapes, strict=True)]
    flat = keys[0].ravel() if len(keys) == 1 else jnp.concatenate([key.ravel() for key in keys])
    (mask,) = _take_largest([flat], [round(fraction * flat.size)], lower_index_first=lower_index_first)
    return _split(mask, shapes)


def _split(flat: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """The inverse of laying arrays of ``shapes`` end to end in ``flat``."""
    pieces = jnp.split(flat, np.cumsum([math.prod(s) for s in shapes])[:-1].tolist())
    return [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Public selections.


def select_top(
    scores: PyTree, fraction: float, *, largest: bool = True, per_layer: bool = False, magnitude: bool = False
) -> PyTree:
    """The ``fraction`` of entries with the largest (or smallest) scores, as a boolean mask shaped like ``scores``.

    Exactly ``k = round(fraction * n)`` entries are selected (Python's ``round``: halves go to the even integer),
    with ``n`` the number of entries in the whole tree, or in each leaf with ``per_layer=True`` (a leaf whose ``k``
    rounds to 0 gets none). Ties are broken by flat index: see the ranking in the module docstring.

    Args:
      scores: a pytree of floating-point arrays, e.g. a curvature diagonal. Leaves of different float dtypes are
        compared in their common dtype.
      fraction: the share of entries to select, in (0, 1] (static).
      largest: ``True`` selects the largest scores, ``False`` the smallest (static).
      per_layer: ``True`` selects the fraction within every leaf rather than over the whole tree (static).
      magnitude: ``True`` ranks by ``|score|``, e.g. for Hutchinson estimates, which can be negative (static).

    Returns:
      A boolean pytree shaped like ``scores``.

    >>> select_top({"a": jnp.array([3.0, -5.0, 1.0]), "b": jnp.array([2.0])}, 0.5, magnitude=True)
    {'a': Array([ True,  True, False], dtype=bool), 'b': Array([False], dtype=bool)}
    """
    _check_fraction(fraction)
    leaves, treedef = jax.tree.flatten(scores)
    _check_nonempty(scores, "scores")
    dtype = jnp.result_type(*leaves)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"scores must be floating point; got {dtype}. Cast them, e.g. with .astype(jnp.float32).")
    keys = [_order_keys(jnp.asarray(x, dtype), largest=largest, magnitude=magnitude) for x in leaves]
    return jax.tree.unflatten(treedef, _select(keys, fraction, per_layer=per_layer, lower_index_first=largest))


def select_random(params: PyTree, fraction: float, key: jax.Array, *, per_layer: bool = False) -> PyTree:
    """A uniformly random set of exactly ``k = round(fraction * n)`` entries: the baseline at an equal budget.

    The entries with the largest of ``n`` i.i.d. random 32-bit integers are taken (ties, about ``n / 2**32`` likely
    at the threshold, go to the lower flat index), drawn once for the whole tree. Peak memory is that of the draw
    (about four times the mask's entries in 32-bit words with JAX's default threefry keys).

    Args:
      params: any pytree of arrays; only the shapes are used.
      fraction: the share of entries to select, in (0, 1] (static).
      key: PRNG key; the same key gives the same mask.
      per_layer: ``True`` selects ``round(fraction * size)`` entries in every leaf, to match a per-layer
        :func:`select_top` (static).

    Returns:
      A boolean pytree shaped like ``params``.
    """
    _check_fraction(fraction)
    leaves, treedef = jax.tree.flatten(params)
    _check_nonempty(params, "params")
    shapes = [jnp.shape(x) for x in leaves]
    # One draw for all leaves: a random kernel per leaf compiles slowly.
    bits = jax.random.bits(key, (sum(math.prod(s) for s in shapes),), jnp.uint32)
    if per_layer:
        masks = _select(_split(bits, shapes), fraction, per_layer=True, lower_index_first=True)
    else:
        masks = _split(_select([bits], fraction, per_layer=False, lower_index_first=True)[0], shapes)
    return jax.tree.unflatten(treedef, masks)


def _path_name(path: tuple) -> str:
    """``('Dense_0', 'kernel')``-style key paths as ``"Dense_0/kernel"``."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _leaf_names(tree: PyTree) -> list[str]:
    return [_path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def select_layers(params: PyTree, names: str | Sequence[str]) -> PyTree:
    """Whole leaves or modules by path: the "last layer" and "all" baselines.

    Args:
      params: the parameter pytree.
      names: one name or several; each a leaf path (``"Dense_1/kernel"``) or a module path (``"Dense_1"``,
        ``"_BasicBlock_3/Conv_0"``), selecting every leaf at or under it (static). :func:`last_layer` names the
        model's last layer; ``list(params)`` names every top-level module of a Flax params dict (the "all"
        baseline).

    Returns:
      A boolean pytree shaped like ``params``: all ``True`` in the named leaves, all ``False`` elsewhere.

    Raises:
      ValueError: if a name matches no leaf or module; the message lists the available names.
    """
    names = [names] if isinstance(names, str) else list(names)
    leaves, treedef = jax.tree.flatten(params)
    _check_nonempty(params, "params")
    paths = _leaf_names(params)
    parts = [p.split("/") for p in paths]
    available = list(dict.fromkeys("/".join(part[:j]) for part in parts for j in range(1, len(part) + 1)))
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ValueError(
            f"names {unknown if names else names!r} match no module or leaf of params; available names: {available}."
        )
    chosen = [any(p == name or p.startswith(name + "/") for name in names) for p in paths]
    return jax.tree.unflatten(
        treedef, [jnp.full(jnp.shape(x), c, dtype=jnp.bool_) for x, c in zip(leaves, chosen, strict=True)]
    )


def layers_in_call_order(
    logits_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, inputs: jax.Array
) -> list[str]:
    """The paths of the modules holding parameters of their own, in the order they finish when ``logits_fn`` runs
    (a module called several times is placed at its last call), e.g. ``["Conv_0", "Conv_1", "Dense_0", "Dense_1"]``
    for :class:`jaxforget.models.CNN`.

    It traces ``logits_fn(params, inputs)`` with ``jax.eval_shape`` (no compute). Call order, not the order of the
    keys in ``params``, decides: ``jax.tree.map`` and checkpoint restores sort dict keys, so ``"Dense_10"`` would
    come before ``"Dense_2"``.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> [B, C]`` built on a Flax linen model (e.g.
        :func:`jaxforget.models.logits_fn_for`).
      params: the parameter pytree.
      inputs: a batch of inputs, or a ``jax.ShapeDtypeStruct`` of one.

    Raises:
      ValueError: if no Flax submodule holding parameters runs inside ``logits_fn``.
    """
    finished: list[str] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        owned = context.module.variables.get("params", {})
        if context.module.path and any(not isinstance(v, Mapping) for v in owned.values()):
            finished.append("/".join(map(str, context.module.path)))
        return out

    def run(params, inputs):
        with nn.intercept_methods(record):
            return logits_fn(params, inputs)

    jax.eval_shape(run, params, inputs)
    if not finished:
        raise ValueError(
            "logits_fn ran no Flax submodule that holds parameters; name the layer yourself for select_layers, "
            f"one of {_leaf_names(params)}."
        )
    last_call = {name: i for i, name in enumerate(finished)}
    return sorted(last_call, key=last_call.__getitem__)


def last_layer(logits_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, inputs: jax.Array) -> str:
    """The path of the model's last layer (the last of :func:`layers_in_call_order`), e.g. ``"Dense_1"`` for
    :class:`jaxforget.models.CNN`. Pass it to :func:`select_layers`.

    Raises:
      ValueError: if no Flax submodule holding parameters runs inside ``logits_fn``.
    """
    return layers_in_call_order(logits_fn, params, inputs)[-1]


def last_layers_holding(params: PyTree, layers: Sequence[str], count: int) -> list[str]:
    """The shortest suffix of ``layers`` (in call order) whose parameters number at least ``count``: the last layers
    that can hold a budget of ``count`` entries, for a "last layers" baseline at the same budget as a global rule.

    Args:
      params: the parameter pytree.
      layers: module paths in call order, e.g. from :func:`layers_in_call_order`.
      count: the number of entries the layers must hold (at least 1).

    Returns:
      The suffix of ``layers``, in call order (all of them if even all together hold fewer than ``count``).
    """
    if count < 1:
        raise ValueError(f"count={count} must be at least 1.")
    sizes = {}
    for name, leaf in zip(_leaf_names(params), jax.tree.leaves(params), strict=True):
        for layer in layers:
            if name == layer or name.startswith(layer + "/"):
                sizes[layer] = sizes.get(layer, 0) + int(np.size(leaf))
    held = 0
    for start in range(len(layers) - 1, -1, -1):
        held += sizes.get(layers[start], 0)
        if held >= count:
            return list(layers[start:])
    return list(layers)


def mask_summary(mask: PyTree) -> dict[str, Any]:
    """Per-leaf and total counts of a mask, as plain Python numbers for reports and plots (reads it on the host).

    Returns:
      ``{"selected": int, "total": int, "fraction": float, "layers": {path: {"selected", "total", "fraction"}}}``
      with paths such as ``"Dense_1/kernel"``, in ``jax.tree.leaves`` order.

    >>> mask_summary({"w": jnp.array([True, False, False, True])})["layers"]["w"]
    {'selected': 2, 'total': 4, 'fraction': 0.5}
    """
    check_mask(mask)
    layers = {}
    for name, leaf in zip(_leaf_names(mask), jax.device_get(jax.tree.leaves(mask)), strict=True):
        selected, total = int(np.count_nonzero(leaf)), int(np.size(leaf))
        layers[name] = {"selected": selected, "total": total, "fraction": selected / total if total else 0.0}
    selected = sum(layer["selected"] for layer in layers.values())
    total = sum(layer["total"] for layer in layers.values())
    return {"selected": selected, "total": total, "fraction": selected / total if total else 0.0, "layers": layers}
