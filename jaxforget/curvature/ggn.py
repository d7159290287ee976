"""The exact and Monte Carlo Gauss-Newton diagonals' driver: logit-space factors, the naive per-example path, the
layerwise path (a tape over the registered layers of :mod:`jaxforget.curvature.layers`) and the choice between them.

The tape works for linen and NNX models alike. A layer's parameters are found in ``params`` by path: a linen module
by its own path (``module.path``), an NNX module by identity, looking its parameter arrays up among the leaves of
``params`` (an ``nnx.State`` of ``nnx.Param`` leaves, wrapped or pure), whose path in the state names the layer.
Either way a layer counts only if its parameters are the very arrays passed in as ``params``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxforget.curvature._base import (
    LogitsFn,
    PyTree,
    _check_choice,
    _check_logits,
    _check_positive,
    _chunked_sum,
)
from jaxforget.curvature._intercept import layer_calls
from jaxforget.curvature.layers import LayerRule, rule_for

_METHODS = ("auto", "layerwise", "naive")

# ----------------------------------------------------------------------------------------------------------------
# Gauss-Newton diagonals for softmax cross-entropy.
#
# Logits are [B, C] or, for sequences, [B, T, C] (T stands for all middle axes; T = 1 for [B, C]). For the mean
# loss over the N = B * T predictions, GGN = (1/N) sum_n J_n^T H_n J_n, with J_n the Jacobian of example n's logits
# (all T positions) and H_n block diagonal, one block diag(p_t) - p_t p_t^T per position. Writing H_n as a sum of K
# outer products u u^T (each u shaped like one example's logits) turns the diagonal into
# (1/N) sum_n sum_k (J_n^T u_{n,k})^2: squared per-example vector-Jacobian products. Two factorizations are used:
#   exact (ggn_diagonal):  u_{n,t,c} = sqrt(p_tc) (e_c - p_t) at position t, zero elsewhere; K = T * C columns
#                          (sum_{t,c} u u^T = H_n exactly)
#   sampled (gnb_diagonal): u_{n,k} = (p_t - e_{y_tk})_{t=1..T} / sqrt(K), with y_tk ~ p_t drawn independently at
#                          every position; K = num_samples (unbiased for H_n: cross-position terms have mean zero)
# J_n^T u sums over all positions (a weight shared by positions gets the sum of their contributions) before it is
# squared. The squares are formed either layer by layer in closed form ("layerwise", the fast path) or from
# materialized per-example gradients ("naive", for any logits_fn).


def _ggn_factor(logits: jax.Array, aux: None) -> jax.Array:
    """[K = T * C, b, ..., C] columns of the symmetric factor of the block-diagonal logit-space Hessian: column
    (t, c) is sqrt(p_tc) (e_c - p_t) at position t and zero at the other positions."""
    del aux
    probs = jax.nn.softmax(logits, axis=-1)
    batch_size, classes = logits.shape[0], logits.shape[-1]
    by_position = jnp.swapaxes(probs.reshape(batch_size, -1, classes), 0, 1)  # [T, b, C]
    eye = jnp.eye(classes, dtype=logits.dtype)
    blocks = jnp.moveaxis(jnp.sqrt(by_position), 1, 2)[..., None] * (eye[:, None, :] - by_position[:, None])
    positions = by_position.shape[0]  # blocks: [T, C, b, C], the factor of each position's block
    if positions == 1:
        return blocks.reshape(classes, *logits.shape)
    spread = jnp.eye(positions, dtype=logits.dtype)[:, None, None, :, None] * blocks[:, :, :, None, :]
    return spread.reshape(positions * classes, *logits.shape)


def _gnb_factor(num_samples: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def factor(logits: jax.Array, keys: jax.Array) -> jax.Array:
        """[K=num_samples, b, ..., C]: (p - e_y) / sqrt(K) for labels y sampled from the model at every position,
        one key per example."""
        probs = jax.nn.softmax(logits, axis=-1)
        draw = lambda k, z: jax.random.categorical(k, z, shape=(num_samples, *z.shape[:-1]))
        labels = jnp.moveaxis(jax.vmap(draw)(keys, logits), 1, 0)  # [K, b, ...]
        onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        return (probs[None] - onehot) / jnp.sqrt(jnp.asarray(num_samples, logits.dtype))

    return factor


def _naive_sum_of_squares(logits_fn, params, factor, inputs, aux):
    """sum_n sum_k (J_n^T u_{n,k})^2 from per-example vector-Jacobian products (any logits_fn)."""

    def one_example(x, a):
        logits, vjp_fn = jax.vjp(lambda p: logits_fn(p, x[None])[0], params)
        columns = factor(logits[None], None if a is None else a[None])[:, 0]  # [K, C]
        grads = jax.vmap(lambda u: vjp_fn(u)[0])(columns)
        return jax.tree.map(lambda g: (g * g).sum(0), grads)

    per_example = jax.vmap(one_example, in_axes=(0, None if aux is None else 0))(inputs, aux)
    return jax.tree.map(lambda s: s.sum(0), per_example)


# The layerwise path. Each supported layer is intercepted when called: its input (or, for batch norm, its normalized
# input) is recorded and a zero perturbation is added to its output, so that one vector-Jacobian product with respect
# to the perturbations back-propagates the signal at every layer output.


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _key_name(key):
    return getattr(key, "key", getattr(key, "name", key))


def _params_by_path(params: PyTree) -> dict[tuple, jax.Array]:
    """Leaf path -> array, in ``jax.tree.leaves(params)`` order; an NNX ``Variable`` counts as the leaf it holds."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    return {tuple(map(_key_name, path)): leaf.get_value() if _is_variable(leaf) else leaf for path, leaf in flat}


class _Tape:
    """Records, during one trace of ``logits_fn``, the supported layers and the parameter leaves they own."""

    def __init__(self, params: PyTree, perturbations: dict | None = None):
        self.set_params(params)
        self.perturbations = perturbations
        self.layers: dict[tuple, tuple[LayerRule, object, tuple[str, ...]]] = {}  # path -> (rule, module, names)
        self.output_shapes: dict[tuple, jax.ShapeDtypeStruct] = {}
        self.features: dict[tuple, jax.Array] = {}
        self.repeated: set[tuple] = set()

    def set_params(self, params: PyTree) -> None:
        self.by_path = _params_by_path(params)
        self.by_id = {id(leaf): path for path, leaf in self.by_path.items()}

    def _path(self, module, owned: dict) -> tuple | None:
        """The layer's path in params: linen's own, or for NNX the common prefix of its parameters' paths."""
        if isinstance(module, nn.Module):
            return tuple(module.path)
        paths = [self.by_id.get(id(leaf)) for leaf in owned.values()]
        if not paths or any(p is None for p in paths):
            return None
        prefixes = {p[:-1] for p in paths}
        return prefixes.pop() if len(prefixes) == 1 else None

    def __call__(self, module, call, args, kwargs):
        rule = rule_for(module)
        output = call(*args, **kwargs)
        owned = rule.owned(module)
        path = self._path(module, owned)
        if path is None:
            return output
        # A layer counts only if its parameters are the very arrays passed in as params (not copies or functions
        # of them) and it is called once; otherwise the closed forms would not be gradients with respect to params.
        if path in self.layers:
            self.repeated.add(path)
        names = tuple(n for n in owned if owned[n] is self.by_path.get(path + (n,)))
        if len(names) != len(owned) or not rule.supported(module, args, kwargs):
            return output
        self.layers[path] = (rule, module, names)
        self.output_shapes[path] = jax.ShapeDtypeStruct(output.shape, output.dtype)
        self.features[path] = rule.features(module, args, kwargs)
        if self.perturbations is not None:
            output = output + self.perturbations[path]
        return output

    def uncovered(self) -> list[tuple]:
        covered = {path + (name,) for path, (_, _, names) in self.layers.items() for name in names}
        covered -= {path + (name,) for path in self.repeated for name in self.layers[path][2]}
        return [path for path in self.by_path if path not in covered]


def _discover_layers(logits_fn: LogitsFn, params: PyTree, inputs: jax.Array) -> _Tape:
    tape = _Tape(params)

    def trace(p, x):
        tape.set_params(p)
        with layer_calls(tape):
            return logits_fn(p, x)

    jax.eval_shape(trace, params, inputs)
    return tape


def _layerwise_sum_of_squares(logits_fn, params, factor, inputs, aux):
    """sum_n sum_k (J_n^T u_{n,k})^2 with closed forms per layer: one batched forward, K batched backward passes
    with respect to the layer outputs only, and no per-example gradient of the whole network."""
    shapes = _discover_layers(logits_fn, params, inputs).output_shapes
    zeros = {path: jnp.zeros(s.shape, s.dtype) for path, s in shapes.items()}

    # The tape holds modules (not arrays), so it leaves jax.vjp through a closure rather than as aux output.
    taped = {}

    def forward(perturbations):
        tape = taped["tape"] = _Tape(params, perturbations)
        with layer_calls(tape):
            logits = logits_fn(params, inputs)
        return logits, tape.features

    logits, vjp_fn, features = jax.vjp(forward, zeros, has_aux=True)
    deltas = jax.vmap(lambda u: vjp_fn(u)[0])(factor(logits, aux))  # path -> [K, b, *output]
    tape = taped["tape"]
    squares = {}
    for path, (rule, module, names) in tape.layers.items():
        # Squares summed over examples and positions in the parameters' dtype: under bfloat16 compute the features
        # and signals are bfloat16, and so would the sums be.
        dtype = jnp.result_type(*(tape.by_path[path + (name,)] for name in names))
        x, delta = features[path].astype(dtype), deltas[path].astype(dtype)
        squares.update({path + (name,): value for name, value in rule.squares(module, x, delta, names).items()})
    return jax.tree.unflatten(jax.tree.structure(params), [squares[path] for path in _params_by_path(params)])


def _resolve_method(method: str, logits_fn: LogitsFn, params: PyTree, inputs: jax.Array) -> str:
    _check_choice(method, _METHODS, "method")
    if method == "naive":
        return method
    uncovered = _discover_layers(logits_fn, params, inputs).uncovered()
    if not uncovered:
        return "layerwise"
    if method == "layerwise":
        names = ", ".join("/".join(map(str, p)) for p in uncovered[:5])
        raise ValueError(
            f"method='layerwise' needs every parameter to belong to a Flax nn.Dense, nn.Conv or eval-mode "
            f"nn.BatchNorm (or NNX nnx.Linear, nnx.Conv or eval-mode nnx.BatchNorm) that logits_fn calls once, "
            f"with params passed through unchanged; not covered: {names}"
            f"{' ...' if len(uncovered) > 5 else ''}. Use method='auto' or 'naive' for this model."
        )
    return "naive"


def _gauss_newton_diagonal(logits_fn, params, inputs, factor, aux, example_batch_size, method):
    _check_positive(example_batch_size, "example_batch_size", allow_none=True)
    logits_shape = _check_logits(logits_fn, params, inputs)
    method = _resolve_method(method, logits_fn, params, inputs)
    body = _layerwise_sum_of_squares if method == "layerwise" else _naive_sum_of_squares

    def chunk(xs):
        x, a = xs
        return body(logits_fn, params, factor, x, a)

    total = _chunked_sum(chunk, (inputs, aux), example_batch_size)
    num_predictions = int(np.prod(logits_shape[:-1]))  # B, or B * T for sequences
    return jax.tree.map(lambda s: s / num_predictions, total)


def _ggn_vp(logits_fn: LogitsFn, params: PyTree, inputs: jax.Array, v: PyTree) -> PyTree:
    logits, jvp_fn = jax.linearize(lambda p: logits_fn(p, inputs), params)
    jv = jvp_fn(v)
    probs = jax.nn.softmax(logits, axis=-1)
    num_predictions = int(np.prod(logits.shape[:-1]))
    hjv = probs * (jv - jnp.sum(probs * jv, axis=-1, keepdims=True)) / num_predictions
    return jax.linear_transpose(jvp_fn, params)(hjv)[0]
