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
round trip and no Python loop over entries. For a global selection the leaves share one budget without being laid
end to end: a count is the sum of the leaves' counts, and an entry's flat index is its leaf's offset plus its
position in the leaf. No leaf is flattened, concatenated or copied, so scores split over devices (e.g. FSDP-style,
see :mod:`jaxforget.sharding`) are counted where they lie, with an all-reduce of one integer per leaf and step and no
gather, and the mask comes out split like the scores. Ties at the threshold cost a second bisection over flat
positions, run only when the budget ends inside them (rare for continuous scores). Counts run over pieces of about
``2**18`` entries of each large leaf (see ``_count``). Peak temporary memory is about once the scores (the keys)
plus a piece per leaf: 1.4 times 10M float32 scores in 10 leaves on CPU, global or per layer. See
``benchmarks/selection.py`` and its results for the times (a global top 1% of 100M float32 scores in seconds on two
CPU cores, against 8 s for ``jax.lax.top_k`` and 50 to 75 s for sorting).

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
from flax import nnx
from jax.extend.core import Literal

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
_CHUNK = 1 << 18  # entries counted at once (see _count)


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


def _divisors(n: int) -> list[int]:
    """The divisors of ``n >= 1``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _chunk_plan(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """How :func:`_count` splits a leaf of ``shape`` into pieces of about ``_CHUNK`` entries: ``(axis, steps,
    block)``, or ``None`` to count it at once (small leaves, and lengths without a fitting divisor).

    The longest axis, of length ``L``, is read as ``[L / (steps * block), steps, block]`` and piece ``j`` takes
    index ``j`` of the middle factor: runs of ``block`` rows (at least ``_CHUNK / 512`` entries, for contiguous
    reads) spaced ``steps * block`` apart. A piece thus holds a share of every block of the axis, so a leaf split
    over devices along any axis is counted where it lies, as long as the device count divides the outer factor
    ``L / (steps * block)`` (the block with the fewest factors of two keeps the most in it). Contiguous pieces (a
    dynamic slice along a split axis) would make XLA gather the whole leaf onto every device.
    """
    size = math.prod(shape)
    if size <= _CHUNK:
        return None
    axis = max(range(len(shape)), key=shape.__getitem__)
    length, inner = shape[axis], math.prod(shape[axis + 1 :])
    need = -(-size // _CHUNK)  # the fewest pieces

    def twos(n: int) -> int:
        return (n & -n).bit_length()

    # As few pieces as the length allows (each costs a loop iteration), but at most 16x the fewest.
    for steps in (d for d in _divisors(length) if need <= d <= 16 * need):
        blocks = [d for d in _divisors(length // steps) if d * inner >= max(1, _CHUNK >> 9)]
        if blocks:
            return axis, steps, min(blocks, key=lambda d: (twos(d), d))
    return None


def _positions(shape: tuple[int, ...], strides: list[int], dtype: jnp.dtype) -> jax.Array:
    """``sum_d index_d * strides[d]`` over an array of ``shape``: flat positions, built from iotas (so XLA fuses
    them into their use and partitions them like the values)."""
    at = jnp.zeros(shape, dtype)
    for axis, stride in enumerate(strides):
        at = at + jax.lax.broadcasted_iota(dtype, shape, axis) * jnp.asarray(stride, dtype)
    return at


def _count(values: jax.Array, predicate: Callable[[jax.Array, jax.Array], jax.Array], dtype: jnp.dtype) -> jax.Array:
    """The number of true ``predicate(values, flat positions)`` over a leaf of any shape, without reshaping it
    flat (which would move a leaf split over devices along a later axis); pieces as :func:`_chunk_plan` says.

    In pieces because XLA's CPU backend writes the integer input of a reduction to memory: over a whole leaf that is
    a buffer as large as the leaf, per piece a cache-sized one (and the passes run faster).
    """
    shape = values.shape
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    plan = _chunk_plan(shape)
    if plan is None:
        return jnp.sum(predicate(values, _positions(shape, strides, dtype)), dtype=dtype)
    axis, steps, block = plan
    outer = shape[axis] // (steps * block)
    split = values.reshape(*shape[:axis], outer, steps, block, *shape[axis + 1 :])
    piece_shape = (*shape[:axis], outer, block, *shape[axis + 1 :])
    piece_strides = [*strides[:axis], steps * block * strides[axis], strides[axis], *strides[axis + 1 :]]

    def add_piece(j, counts):
        piece = jax.lax.dynamic_index_in_dim(split, j, axis + 1, keepdims=False)
        at = _positions(piece_shape, piece_strides, dtype) + j.astype(dtype) * (block * strides[axis])
        return counts + predicate(piece, at).astype(dtype)

    # Per-entry counts summed once after the loop: a reduction per piece ran 2x slower on CPU (XLA splits a
    # reduction over several axes into reduce-windows).
    return jnp.sum(jax.lax.fori_loop(0, steps, add_piece, jnp.zeros(piece_shape, dtype)), dtype=dtype)


def _take_largest(
    keys: list[jax.Array], groups: list[list[int]], budgets: list[int], *, lower_index_first: bool
) -> list[jax.Array]:
    """Boolean masks shaped like ``keys`` (unsigned, any shapes): in each group of leaves (indices into ``keys``),
    its ``budgets[g]`` largest keys, ties broken by flat index over the group's leaves laid end to end.

    Nothing is laid end to end in memory: a group's counts are sums of per-leaf counts, and an entry's flat index is
    its leaf's offset in the group plus its position in the leaf, so each leaf keeps its own shape (and, on several
    devices, its own sharding). All groups are searched together: one counting pass over every leaf per step.
    """
    sizes = [key.size for key in keys]
    totals = [sum(sizes[i] for i in group) for group in groups]
    count_dtype = _count_dtype(max(totals))
    k = jnp.asarray(budgets, count_dtype)
    offsets = {}
    for group in groups:
        for i, offset in zip(group, np.cumsum([0] + [sizes[i] for i in group[:-1]]).tolist(), strict=True):
            offsets[i] = offset

    def counts(predicate: Callable[[int, int, jax.Array, jax.Array], jax.Array]) -> jax.Array:
        """Per group ``g``, the number of entries of its leaves ``i`` with ``predicate(g, i, keys, positions)``."""
        per_group = []
        for g, group in enumerate(groups):
            total = jnp.zeros((), count_dtype)
            for i in group:
                total = total + _count(keys[i], lambda key, at, g=g, i=i: predicate(g, i, key, at), count_dtype)
            per_group.append(total)
        return jnp.stack(per_group)

    def order(g: int, i: int, at: jax.Array) -> jax.Array:  # flat positions in the group, in tie-breaking order
        at = at + jnp.asarray(offsets[i], count_dtype)
        return at if lower_index_first else totals[g] - 1 - at

    # The threshold: the greatest key t with #(keys >= t) >= k; every key above it is selected.
    threshold = _bisect_bits(
        8 * keys[0].dtype.itemsize,
        jnp.zeros(len(groups), keys[0].dtype),
        lambda t: counts(lambda g, i, key, at: key >= t[g]) >= k,
    )
    needed = k - counts(lambda g, i, key, at: key > threshold[g])

    # Ties at the threshold are all selected, unless the budget ends inside them (rare for continuous scores); then
    # the first in flat-index order (the last, if not lower_index_first) are, found by a second bisection: the
    # position of the needed-th tie is the greatest p with #(ties before p) < needed.
    index_bits = max(1, (max(totals) - 1).bit_length())
    search = jnp.any(counts(lambda g, i, key, at: key == threshold[g]) != needed)
    last = _bisect_bits(
        index_bits,
        jnp.zeros(len(groups), count_dtype),
        lambda p: counts(lambda g, i, key, at: (key == threshold[g]) & (order(g, i, at) < p[g])) < needed,
        steps=jnp.where(search, index_bits, 0),
    )

    masks = [None] * len(keys)
    for g, group in enumerate(groups):
        for i in group:
            key = keys[i]
            at = _positions(key.shape, [math.prod(key.shape[a + 1 :]) for a in range(key.ndim)], count_dtype)
            tie = (key == threshold[g]) & (needed[g] > 0) & (~search | (order(g, i, at) <= last[g]))
            masks[i] = (key > threshold[g]) | tie
    return masks


def _select(keys: list[jax.Array], fraction: float, *, per_layer: bool, lower_index_first: bool) -> list[jax.Array]:
    """Masks shaped like ``keys`` of their ``round(fraction * n)`` largest entries, over all leaves together (one
    budget shared by the leaves, none flattened or concatenated) or within each leaf."""
    if per_layer:
        groups = [[i] for i in range(len(keys))]
        budgets = [round(fraction * key.size) for key in keys]
    else:
        groups = [list(range(len(keys)))]
        budgets = [round(fraction * sum(key.size for key in keys))]
    return _take_largest(keys, groups, budgets, lower_index_first=lower_index_first)


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
    masks = _select(_split(bits, shapes), fraction, per_layer=per_layer, lower_index_first=True)
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
    """The leaves' paths in ``jax.tree.leaves`` order; an NNX ``Variable`` (one leaf) is named by its own path, so an
    ``nnx.State`` gives ``"conv/kernel"``, not ``"conv/kernel/value"``."""
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return [_path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_variable)]


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

    It traces ``logits_fn(params, inputs)`` (no compute). Call order, not the order of the keys in ``params``,
    decides: ``jax.tree.map`` and checkpoint restores sort dict keys, so ``"Dense_10"`` would come before
    ``"Dense_2"``. For a Flax linen model the calls of its submodules are recorded. For any other ``logits_fn`` (an
    NNX model through :func:`jaxforget.nnx_logits_fn`, a plain function of a dict) a layer is the parent path of its
    parameter leaves (``"convs/0"`` for ``"convs/0/kernel"``), placed where the traced program last reads one of
    them.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> [B, C]``, e.g. :func:`jaxforget.models.logits_fn_for` of a linen
        model or :func:`jaxforget.nnx_logits_fn` of an NNX one.
      params: the parameter pytree (an ``nnx.State`` for NNX).
      inputs: a batch of inputs, or a ``jax.ShapeDtypeStruct`` of one.

    Raises:
      ValueError: if ``logits_fn`` reads none of ``params``.
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
        finished = _layers_by_last_read(logits_fn, params, inputs)
    if not finished:
        raise ValueError(
            f"logits_fn reads none of params; name the layer yourself for select_layers, one of {_leaf_names(params)}."
        )
    last_call = {name: i for i, name in enumerate(finished)}
    return sorted(last_call, key=last_call.__getitem__)


def _layers_by_last_read(
    logits_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, inputs: jax.Array
) -> list[str]:
    """Parent paths of the parameter leaves, each listed at every equation of the traced program that reads one of
    its leaves (so the last listing is its last read); empty if the program reads none."""
    jaxpr = jax.make_jaxpr(logits_fn)(params, inputs).jaxpr
    layers = [name.rpartition("/")[0] or name for name in _leaf_names(params)]
    layer_of = dict(zip(jaxpr.invars[: len(layers)], layers, strict=True))  # params come first among the inputs
    return [layer_of[v] for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal) and v in layer_of]


def last_layer(logits_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, inputs: jax.Array) -> str:
    """The path of the model's last layer (the last of :func:`layers_in_call_order`), e.g. ``"Dense_1"`` for
    :class:`jaxforget.models.CNN`. Pass it to :func:`select_layers`.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> [B, C]`` of a Flax model.
      params: its parameters.
      inputs: a batch to trace ``logits_fn`` on (only shapes matter).

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

    Args:
      mask: a boolean pytree, e.g. from :func:`select_top`.

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
