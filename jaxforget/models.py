"""The paper's model families in Flax linen: a small ReLU CNN, ResNet-18 (CIFAR stem) and an MLP.

Every model takes ``train`` as a keyword. With ``train=False`` batch norm uses its running averages and nothing is
mutable, which is how curvature is computed. A model with batch norm is applied as::

    logits = model.apply({"params": params, "batch_stats": batch_stats}, inputs, train=False)

:func:`logits_fn_for` and :func:`loss_fn_for` build the ``logits_fn(params, inputs)`` and ``loss_fn(params, batch)``
that the estimators in :mod:`jaxforget.curvature` take. Build them *inside* the function you jit, with
``batch_stats`` as an argument of that function, so XLA sees the statistics as inputs rather than constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "CNN",
    "MLP",
    "ResNet18",
    "Batch",
    "init_model",
    "logits_fn_for",
    "loss_fn_for",
]


class Batch(NamedTuple):
    """A supervised batch: ``inputs`` [B, ...] and integer ``labels`` [B]."""

    inputs: jax.Array
    labels: jax.Array


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 on [B, H, W, C] (H and W even), as a reshape and a max.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``; its gradient splits ties evenly where
    ``nn.max_pool`` picks one entry, which changes nothing after a ReLU (tied zeros get no gradient) and makes the
    backward pass about 9x faster on XLA's CPU backend than the select-and-scatter that ``nn.max_pool`` lowers to.
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width; got an input of shape {x.shape}.")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
    """The paper's small ReLU CNN for 28x28x1 images: two conv + max-pool blocks and two dense layers.

    With the defaults it has 421,642 parameters. ``use_batch_norm`` inserts batch norm after each convolution.
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    hidden: int = 128
    use_batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for width in self.features:
            x = nn.Conv(width, (3, 3), padding="SAME")(x)
            if self.use_batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """A fully connected network on flattened inputs; ``activation`` is ``"tanh"`` or ``"relu"``."""

    num_classes: int = 10
    hidden: Sequence[int] = (50,)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no train-time behaviour
        act = {"tanh": jnp.tanh, "relu": nn.relu}[self.activation]
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
    features: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (one 3x3 convolution, no max-pool) and batch norm.

    ``width`` and ``stage_sizes`` shrink it for tests; the defaults are the standard network (11.2M parameters).
    """

    num_classes: int = 10
    width: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(self.width * 2**stage, strides)(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def init_model(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """Initialize ``model`` on a dummy batch of shape ``input_shape`` ([B, ...]); returns its variables."""
    return model.init(key, jnp.zeros(tuple(input_shape), jnp.float32), train=False)


def logits_fn_for(model: nn.Module, batch_stats: Any = None) -> Callable[[Any, jax.Array], jax.Array]:
    """``logits_fn(params, inputs) -> [B, C]`` for ``model`` in eval mode (running batch-norm averages)."""

    def logits_fn(params: Any, inputs: jax.Array) -> jax.Array:
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        return model.apply(variables, inputs, train=False)

    return logits_fn


def loss_fn_for(model: nn.Module, batch_stats: Any = None) -> Callable[[Any, Batch], jax.Array]:
    """``loss_fn(params, batch) -> scalar``: mean softmax cross-entropy of ``model`` in eval mode."""
    logits_fn = logits_fn_for(model, batch_stats)

    def loss_fn(params: Any, batch: Batch) -> jax.Array:
        inputs, labels = batch
        logits = logits_fn(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss_fn
