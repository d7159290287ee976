"""The paper's model families in Flax linen: a small ReLU CNN, ResNet-18 (CIFAR stem) and an MLP.

Every model takes ``train`` as a keyword. With ``train=False`` batch norm uses its running averages and nothing is
mutable, which is how curvature is computed. A model with batch norm is applied as::

    logits = model.apply({"params": params, "batch_stats": batch_stats}, inputs, train=False)

:func:`logits_fn_for` and :func:`loss_fn_for` build the ``logits_fn(params, inputs)`` and ``loss_fn(params, batch)``
that the estimators in :mod:`jaxforget.curvature` take. Build them *inside* the function you jit, with
``batch_stats`` as an argument of that function, so XLA sees the statistics as inputs rather than constants.

Mixed precision: every model takes a compute ``dtype`` (default ``None``: compute in the dtype of the inputs and
parameters, as plain Flax does). With ``dtype=jnp.bfloat16`` the inputs and the layers' arithmetic are bfloat16 while
the parameters stay float32 (Flax's ``param_dtype``), batch-norm statistics and normalization stay float32 (Flax's
``BatchNorm`` keeps them so), and the logits come back as float32, so the cross-entropy and every curvature estimate
built on them by differentiating with respect to the float32 parameters is float32::

    model = CNN(dtype=jnp.bfloat16)
    params = init_model(model, key, (1, 28, 28, 1))["params"]  # float32, the same as CNN()'s for this key
    diag = hutchinson_diagonal(loss_fn_for(model), params, batch, key, num_probes=8)  # float32 leaves

The layerwise path of ``ggn_diagonal`` and ``gnb_diagonal`` takes the layers' bfloat16 activations and signals and
forms its squares and sums in the parameters' dtype. ``benchmarks/precision.py`` measures what bfloat16 compute does
to each estimator's speed and selection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxforget.nnx_adapter import nnx_logits_fn

__all__ = [
    "CNN",
    "MLP",
    "ResNet18",
    "TransformerLM",
    "Batch",
    "init_model",
    "logits_fn_for",
    "loss_fn_for",
]


class Batch(NamedTuple):
    """A supervised batch: ``inputs`` [B, ...] and integer ``labels`` [B].

    Attributes:
      inputs: [B, ...] model inputs (images, or token ids [B, T]).
      labels: [B] integer labels (or [B, T] next-token targets).
    """

    inputs: jax.Array
    labels: jax.Array


def _compute(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in the compute ``dtype``; unchanged (not even traced through a cast) when ``dtype`` is ``None``."""
    return x if dtype is None else x.astype(dtype)


def _output(logits: jax.Array, dtype: Any) -> jax.Array:
    """Logits at least float32 when the compute ``dtype`` is narrower: the softmax and the curvature that callers take
    from them need float32's range and precision. Unchanged when ``dtype`` is ``None``."""
    return logits if dtype is None else logits.astype(jnp.promote_types(dtype, jnp.float32))


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
    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``; ``None``, the default, computes in the inputs' and
    parameters' dtype): parameters stay float32 and the logits [B, num_classes] come back at least float32 (see the
    module docstring).

    Attributes:
      num_classes: the number of logits.
      features: the output channels of the two convolutions.
      hidden: the width of the first dense layer.
      use_batch_norm: insert batch norm after each convolution.
      dtype: the compute dtype, or ``None`` for the inputs' and parameters' dtype.
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    hidden: int = 128
    use_batch_norm: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = _compute(x, self.dtype)
        for width in self.features:
            x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype)(x)
            if self.use_batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return _output(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


class MLP(nn.Module):
    """A fully connected network on flattened inputs; ``activation`` is ``"tanh"`` or ``"relu"``.

    ``dtype`` is the compute dtype (``None``, the default, computes in the inputs' and parameters' dtype); parameters
    stay float32 and the logits [B, num_classes] come back at least float32 (see the module docstring).

    Attributes:
      num_classes: the number of logits.
      hidden: the widths of the hidden layers.
      activation: ``"tanh"`` or ``"relu"``.
      dtype: the compute dtype, or ``None`` for the inputs' and parameters' dtype.
    """

    num_classes: int = 10
    hidden: Sequence[int] = (50,)
    activation: str = "tanh"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no train-time behaviour
        act = {"tanh": jnp.tanh, "relu": nn.relu}[self.activation]
        x = _compute(x.reshape((x.shape[0], -1)), self.dtype)
        for width in self.hidden:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
        return _output(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


class _BasicBlock(nn.Module):
    features: int
    strides: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)  # noqa: E731
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        y = conv(self.features, (3, 3), strides=self.strides, padding="SAME")(x)
        y = nn.relu(norm()(y))
        y = conv(self.features, (3, 3), padding="SAME")(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), strides=self.strides)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (one 3x3 convolution, no max-pool) and batch norm.

    ``width`` and ``stage_sizes`` shrink it for tests; the defaults are the standard network (11.2M parameters).
    ``dtype`` is the compute dtype (``None``, the default, computes in the inputs' and parameters' dtype): parameters
    stay float32, batch norm keeps float32 running statistics and normalizes in float32 (Flax's ``BatchNorm``
    promotes to float32 before casting its output to ``dtype``), and the logits [B, num_classes] come back at least
    float32 (see the module docstring).

    Attributes:
      num_classes: the number of logits.
      width: the channels of the first stage (doubled at each later stage).
      stage_sizes: residual blocks per stage.
      dtype: the compute dtype, or ``None`` for the inputs' and parameters' dtype.
    """

    num_classes: int = 10
    width: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = _compute(x, self.dtype)
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(self.width * 2**stage, strides, self.dtype)(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return _output(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


class _DecoderBlock(nn.Module):
    """A pre-LayerNorm decoder block: causal self-attention and a GELU MLP, each added back to its input."""

    features: int
    heads: int
    mlp_ratio: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype)(x)
        # A bfloat16 softmax over a long row loses the small weights; Flax can take that one step in float32.
        narrow = self.dtype is not None and jnp.finfo(self.dtype).bits < 32
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.features,
            deterministic=True,
            dtype=self.dtype,
            force_fp32_for_softmax=narrow,
        )(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.gelu(nn.Dense(self.mlp_ratio * self.features, dtype=self.dtype)(y))
        return x + nn.Dense(self.features, dtype=self.dtype)(y)


class TransformerLM(nn.Module):
    """A small decoder-only (causal) Transformer over token ids, for character-level language modelling.

    Token and learned position embeddings, ``layers`` pre-LayerNorm blocks (causal multi-head self-attention, then a
    GELU MLP of width ``mlp_ratio * features``, each with a residual connection), a final LayerNorm and a dense
    read-out to ``vocab_size`` logits. Position t's logits predict token t + 1, and depend only on tokens 0..t.
    ``dtype`` is the compute dtype (``None``, the default, computes in the parameters' dtype); parameters stay float32,
    layer norm and the attention softmax reduce in float32, and the logits come back at least float32. It has
    no dropout and no batch norm, so ``train`` changes nothing and :func:`init_model`, :func:`logits_fn_for`,
    :func:`loss_fn_for` and :mod:`jaxforget.train` work on it as on the other models, with inputs [B, T] and integer
    labels [B, T] (the inputs shifted by one)::

        state = create_train_state(TransformerLM(vocab_size=64), jax.random.key(0), (1, 32), optax.adam(1e-3))
        state, metrics = jax.jit(train_step)(state, Batch(text[:, :-1], text[:, 1:]))

    Attributes:
      vocab_size: the number of token ids, and of logits per position.
      max_length: the longest sequence (the number of learned positions).
      features: the embedding width.
      heads: attention heads per block.
      layers: the number of Transformer blocks.
      mlp_ratio: the MLP's width as a multiple of ``features``.
      dtype: the compute dtype, or ``None`` for the parameters' dtype.
    """

    vocab_size: int
    max_length: int = 128
    features: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: token ids [B, T] with T <= ``max_length``; float arrays are cast to int32 (:func:`init_model`
            initializes on float zeros).
          train: accepted for the common model interface; it changes nothing.

        Returns:
          Logits [B, T, vocab_size]; position t scores the token at t + 1.

        Raises:
          ValueError: if ``tokens`` is not [B, T], T exceeds ``max_length``, or ``features`` is not a multiple of
            ``heads``.
        """
        del train  # no train-time behaviour
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be token ids [B, T]; got shape {tokens.shape}. Add a batch axis.")
        if tokens.shape[1] > self.max_length:
            raise ValueError(
                f"tokens has length {tokens.shape[1]} > max_length={self.max_length}; crop the input or build the "
                "model with a larger max_length."
            )
        if self.features % self.heads:
            raise ValueError(f"features={self.features} must be a multiple of heads={self.heads}.")
        tokens = tokens.astype(jnp.int32)
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = nn.Embed(self.vocab_size, self.features, dtype=self.dtype, name="token_embed")(tokens)
        x = x + nn.Embed(self.max_length, self.features, dtype=self.dtype, name="position_embed")(positions)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = _DecoderBlock(self.features, self.heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return _output(nn.Dense(self.vocab_size, dtype=self.dtype)(x), self.dtype)


def init_model(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """Initialize ``model`` on a dummy batch of shape ``input_shape`` ([B, ...]); returns its variables.

    Args:
      model: a Flax linen module.
      key: PRNG key for the initialization.
      input_shape: the dummy batch's shape, [B, ...].
    """
    return model.init(key, jnp.zeros(tuple(input_shape), jnp.float32), train=False)


def logits_fn_for(model: nn.Module | nnx.Module, batch_stats: Any = None) -> Callable[[Any, jax.Array], jax.Array]:
    """``logits_fn(params, inputs) -> [B, C]`` for ``model`` in eval mode (running batch-norm averages).

    Logits narrower than float32 (a model of the caller's computing in bfloat16 without casting its output) are
    promoted to float32, so that the cross-entropy and the curvature estimates are formed in float32; float32 and
    float64 logits pass through unchanged.

    An NNX model (``nnx.Module``) gets :func:`jaxforget.nnx_adapter.nnx_logits_fn`'s function, which takes the
    ``nnx.State`` of its ``nnx.Param`` s (``nnx.state(model, nnx.Param)``) and holds its own batch statistics.

    Args:
      model: a Flax linen module, or an ``nnx.Module``.
      batch_stats: a linen model's ``batch_stats`` collection, or ``None``; must be ``None`` for an NNX model.

    Returns:
      ``logits_fn(params, inputs)``.

    Raises:
      ValueError: if ``batch_stats`` is given for an NNX model.
    """
    if isinstance(model, nnx.Module):
        _check_no_batch_stats(batch_stats)
        return nnx_logits_fn(model)[0]

    def logits_fn(params: Any, inputs: jax.Array) -> jax.Array:
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        logits = model.apply(variables, inputs, train=False)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    return logits_fn


def loss_fn_for(model: nn.Module | nnx.Module, batch_stats: Any = None) -> Callable[[Any, Batch], jax.Array]:
    """``loss_fn(params, batch) -> scalar``: mean softmax cross-entropy of ``model`` in eval mode.

    Takes the arguments of :func:`logits_fn_for`, linen or NNX model alike.

    Args:
      model: a Flax linen module, or an ``nnx.Module`` (as for :func:`logits_fn_for`).
      batch_stats: a linen model's ``batch_stats`` collection, or ``None``; must be ``None`` for an NNX model.

    Raises:
      ValueError: if ``batch_stats`` is given for an NNX model.
    """
    logits_fn = logits_fn_for(model, batch_stats)

    def loss_fn(params: Any, batch: Batch) -> jax.Array:
        inputs, labels = batch
        logits = logits_fn(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss_fn


def _check_no_batch_stats(batch_stats: Any) -> None:
    if batch_stats is not None:
        raise ValueError(
            "batch_stats is for linen models; an NNX model holds its own batch statistics. Pass batch_stats=None "
            "(the model's current statistics are used)."
        )
