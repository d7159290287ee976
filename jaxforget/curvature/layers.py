"""Closed-form per-example squared gradients for the layerwise exact GGN: one rule per layer type, in a registry
keyed by the layer's type (linen ``nn.Dense``, ``nn.Conv``, ``nn.BatchNorm``; NNX ``nnx.Linear``, ``nnx.Conv``,
``nnx.BatchNorm``).

A rule turns what one batched forward pass records at a layer (its input, or for batch norm its normalized input:
``features`` [b, ..., F]) and the back-propagated signals at its output (``delta`` [K, b, ..., O], one per factor
column) into the sum over examples and columns of each parameter's squared per-example gradient. Supporting a new
layer type is one rule and one :func:`_register` call; the driver (:mod:`jaxforget.curvature.ggn`) and the call
interception (:mod:`jaxforget.curvature._intercept`) read the registry and need no change.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class LayerRule(NamedTuple):
    """How the layerwise exact GGN treats one layer type.

    Attributes:
      owned: ``owned(module) -> {name: array}``, the parameters this layer instance holds itself.
      supported: ``supported(module, args, kwargs) -> bool``, whether this call has the closed form (e.g. a
        convolution without feature groups, batch norm in eval mode).
      features: ``features(module, args, kwargs) -> [b, ..., F]``, what the squares need from the forward pass.
      squares: ``squares(module, features, delta, names) -> {name: sum of squares}`` for features [b, ..., F] and
        output signals ``delta`` [K, b, ..., O], one entry per name in ``names`` (the owned parameters).
    """

    owned: Callable[[Any], dict[str, jax.Array]]
    supported: Callable[[Any, tuple, dict], bool]
    features: Callable[[Any, tuple, dict], jax.Array]
    squares: Callable[[Any, jax.Array, jax.Array, tuple[str, ...]], dict[str, jax.Array]]


_RULES: dict[type, LayerRule] = {}


def _register(layer_type: type, rule: LayerRule) -> None:
    _RULES[layer_type] = rule


def rule_for(module: Any) -> LayerRule | None:
    """The rule for ``module``'s exact type (a subclass may change the call, so it is not covered), or ``None``."""
    return _RULES.get(type(module))


def nnx_layer_types() -> tuple[type, ...]:
    """The registered NNX layer classes (their ``__call__`` is routed through the tape during a trace)."""
    return tuple(t for t in _RULES if issubclass(t, nnx.Module))


# ----------------------------------------------------------------------------------------------------------------
# Squares shared by the layer types.


def _as_tuple(value, ndim):
    if value is None:
        return (1,) * ndim
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim


def _sum_of_squared_products(inputs: jax.Array, signals: jax.Array) -> jax.Array:
    """sum_n sum_k (inputs_n^T signals_{k,n})^2 for inputs [b, P, F] and signals [K, b, P, O]; returns [F, O].

    Each term is one example's weight gradient for one factor column (a sum over the P positions that share the
    weight), so it must be formed before squaring. A loop over examples keeps memory at K * F * O and reads each
    example's signals in place; on 2 CPU cores it measured 1.4x to 5x faster than transposing the signals first or
    forming all examples' products in one batched contraction.
    """

    def add_example(index, total):
        signal = jax.lax.dynamic_index_in_dim(signals, index, axis=1, keepdims=False)  # [K, P, O]
        grads = jnp.einsum("pf,kpo->fko", inputs[index], signal)
        return total + (grads * grads).sum(1)

    init = jnp.zeros((inputs.shape[-1], signals.shape[-1]), jnp.result_type(inputs, signals))
    return jax.lax.fori_loop(0, inputs.shape[0], add_example, init)


def _bias_squares(delta: jax.Array) -> jax.Array:
    """delta [K, b, ..., O] -> sum over K and b of the squared per-example bias gradients (sums over positions)."""
    grads = delta.reshape(delta.shape[0], delta.shape[1], -1, delta.shape[-1]).sum(2)
    return (grads * grads).sum((0, 1))


def _dense_squares(module, x, delta, names):
    """x [b, ..., I], delta [K, b, ..., O] -> per-parameter sums of squared per-example gradients."""
    del module
    if x.ndim == 2:  # no weight sharing: the square of an outer product is the outer product of squares
        out = {"kernel": jnp.einsum("bi,kbo->io", x * x, delta * delta)}
    else:
        b = x.shape[0]
        inputs = x.reshape(b, -1, x.shape[-1])
        out = {"kernel": _sum_of_squared_products(inputs, delta.reshape(delta.shape[0], b, -1, delta.shape[-1]))}
    if "bias" in names:
        out["bias"] = _bias_squares(delta)
    return out


def _conv_patches(module, x, out_spatial):
    """Unfolded input patches [b, prod(out_spatial), prod(kernel_size) * Cin], features ordered like the Flax
    kernel (*kernel_size, Cin); built from strided slices, which XLA runs far faster than a patches convolution."""
    ndim = x.ndim - 2
    kernel_size = _as_tuple(module.kernel_size, ndim)
    strides = _as_tuple(module.strides, ndim)
    dilation = _as_tuple(module.kernel_dilation, ndim)
    padding = module.padding
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    elif isinstance(padding, int):
        padding = [(padding, padding)] * ndim
    else:
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    padded = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [0] + [o * d for o, d in zip(offset, dilation, strict=True)] + [0]
        limit = (
            [x.shape[0]]
            + [s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], out_spatial, strides, strict=True)]
            + [x.shape[-1]]
        )
        slices.append(jax.lax.slice(padded, start, limit, [1, *strides, 1]))
    patches = jnp.stack(slices, axis=-2)  # [b, *out_spatial, prod(kernel_size), Cin]
    return patches.reshape(x.shape[0], -1, len(slices) * x.shape[-1]), kernel_size


def _conv_squares(module, x, delta, names):
    """Per-example conv kernel gradients from unfolded input patches, squared and summed."""
    patches, kernel_size = _conv_patches(module, x, delta.shape[2:-1])
    num_k, b, out_features = delta.shape[0], delta.shape[1], delta.shape[-1]
    squares = _sum_of_squared_products(patches, delta.reshape(num_k, b, -1, out_features))
    out = {"kernel": squares.reshape(*kernel_size, x.shape[-1], out_features)}
    if "bias" in names:
        out["bias"] = _bias_squares(delta)
    return out


def _batch_norm_squares(module, x_hat, delta, names):
    """Eval-mode batch norm: per-example gradients are sums over positions of delta * x_hat (scale), delta (bias)."""
    del module
    num_k, b, features = delta.shape[0], delta.shape[1], delta.shape[-1]
    delta = delta.reshape(num_k, b, -1, features)
    out = {}
    if "scale" in names:
        scale_grads = (delta * x_hat.reshape(1, b, -1, features)).sum(2)
        out["scale"] = (scale_grads * scale_grads).sum((0, 1))
    if "bias" in names:
        out["bias"] = _bias_squares(delta)
    return out


# ----------------------------------------------------------------------------------------------------------------
# When a call has the closed form, and what it records. Linen and NNX layers share the math; they differ in where
# the parameters and batch statistics live and in how a call is configured.


def _layer_input(module, args, kwargs):
    del module, kwargs
    return args[0]


def _any_call(module, args, kwargs):
    del module, args, kwargs
    return True


def _conv_supported(module, args, kwargs):
    del kwargs
    return (
        module.feature_group_count == 1
        and module.mask is None
        and not (isinstance(module.padding, str) and module.padding.upper() in ("CIRCULAR", "CAUSAL"))
        and (module.input_dilation is None or set(_as_tuple(module.input_dilation, 1)) == {1})
        and args[0].ndim == len(_as_tuple(module.kernel_size, 1)) + 2
    )


def _batch_norm_supported(module, args, kwargs):
    running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    running = module.use_running_average if running is None else running
    return running is True and module.axis in (-1, args[0].ndim - 1) and kwargs.get("mask") is None


def _normalized(x, mean, var, epsilon):
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


def _linen_params(module: nn.Module) -> dict[str, jax.Array]:
    return dict(module.variables.get("params", {}))


def _linen_batch_norm_features(module, args, kwargs):
    del kwargs
    stats = module.variables["batch_stats"]
    return _normalized(args[0], stats["mean"], stats["var"], module.epsilon)


def _nnx_params(module: nnx.Module) -> dict[str, jax.Array]:
    return {name: value.get_value() for name, value in vars(module).items() if isinstance(value, nnx.Param)}


def _nnx_batch_norm_features(module, args, kwargs):
    del kwargs
    return _normalized(args[0], module.mean.get_value(), module.var.get_value(), module.epsilon)


_register(nn.Dense, LayerRule(_linen_params, _any_call, _layer_input, _dense_squares))
_register(nn.Conv, LayerRule(_linen_params, _conv_supported, _layer_input, _conv_squares))
_register(
    nn.BatchNorm, LayerRule(_linen_params, _batch_norm_supported, _linen_batch_norm_features, _batch_norm_squares)
)
_register(nnx.Linear, LayerRule(_nnx_params, _any_call, _layer_input, _dense_squares))
_register(nnx.Conv, LayerRule(_nnx_params, _conv_supported, _layer_input, _conv_squares))
_register(nnx.BatchNorm, LayerRule(_nnx_params, _batch_norm_supported, _nnx_batch_norm_features, _batch_norm_squares))
