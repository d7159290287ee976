"""The paper's CNN as a Flax NNX module, and a copy of a trained linen :class:`jaxforget.models.CNN` into it.

It sits apart from :mod:`jaxforget.models` (the linen families, which the CLI and the pipeline use) and from
:mod:`jaxforget.nnx_adapter` (which works for any NNX model): it builds on the first and is used with the second.
The layers are those of the linen CNN, so the two compute the same function on the same weights, and every estimator
gives the same diagonal on either (the tests compare them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jaxforget.models import CNN, _compute, _output, max_pool_2x2

__all__ = ["NNXCNN", "nnx_cnn_from_linen"]


class NNXCNN(nnx.Module):
    """The paper's small ReLU CNN in NNX: two 3x3 conv (+ batch norm) + ReLU + 2x2 max-pool blocks and two dense
    layers, as :class:`jaxforget.models.CNN`.

    With the defaults it has the linen CNN's 421,642 parameters. Batch norm (``use_batch_norm=True``, momentum 0.9
    as in the linen CNN) starts in training mode, the NNX convention: ``model.eval()`` or
    ``nnx.view(model, use_running_average=True)`` switches it to the running averages, and
    :func:`jaxforget.nnx_logits_fn` always uses them.

    Parameter state: ``convs[i]`` (``nnx.Conv``), ``norms[i]`` (``nnx.BatchNorm``, with ``use_batch_norm``),
    ``hidden`` and ``head`` (``nnx.Linear``).

    Args:
      input_shape: one example's shape (H, W, C), H and W divisible by 4 (the dense layer's width depends on it).
      num_classes: number of logits.
      features: output channels of the two convolutions.
      hidden: width of the hidden dense layer.
      use_batch_norm: insert batch norm after each convolution.
      dtype: compute dtype (``None``: that of the inputs and parameters); parameters stay float32 and the logits
        come back at least float32, as in the linen CNN.
      rngs: ``nnx.Rngs`` for the initialization.

    Raises:
      ValueError: if ``input_shape`` is not (H, W, C) with H and W divisible by 4.

    >>> model = NNXCNN(input_shape=(8, 8, 1), features=(2, 3), hidden=4, rngs=nnx.Rngs(0))
    >>> model(jax.numpy.zeros((5, 8, 8, 1))).shape
    (5, 10)
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        features: Sequence[int] = (32, 64),
        hidden: int = 128,
        use_batch_norm: bool = False,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        height, width, channels = _check_input_shape(input_shape, len(features))
        self.dtype = dtype
        widths = [channels, *features]
        self.convs = nnx.List(
            [
                nnx.Conv(cin, cout, (3, 3), padding="SAME", dtype=dtype, rngs=rngs)
                for cin, cout in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.norms = nnx.List(
            [nnx.BatchNorm(c, momentum=0.9, dtype=dtype, rngs=rngs) for c in features] if use_batch_norm else []
        )
        scale = 2 ** len(features)
        flat = (height // scale) * (width // scale) * widths[-1]
        self.hidden = nnx.Linear(flat, hidden, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, num_classes] of images [B, H, W, C]."""
        x = _compute(x, self.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x)
            x = max_pool_2x2(nnx.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.hidden(x))
        return _output(self.head(x), self.dtype)


def _check_input_shape(input_shape: Sequence[int], blocks: int) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    scale = 2**blocks
    if len(shape) != 3 or shape[0] % scale or shape[1] % scale:
        raise ValueError(
            f"input_shape must be one example's (H, W, C) with H and W divisible by {scale}; got {shape}, e.g. "
            "(28, 28, 1) for MNIST."
        )
    return shape


def nnx_cnn_from_linen(
    model: CNN,
    variables: Mapping[str, Any],
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    rngs: nnx.Rngs | None = None,
) -> NNXCNN:
    """An :class:`NNXCNN` computing what a linen :class:`jaxforget.models.CNN` computes, with its weights.

    The parameters (and with batch norm the running statistics) are copied: the linen ``Conv_i``,
    ``BatchNorm_i``, ``Dense_0`` and ``Dense_1`` become ``convs[i]``, ``norms[i]``, ``hidden`` and ``head``. The
    batch norms are left in evaluation mode (``use_running_average=True``), the mode in which the two agree.

    Args:
      model: the linen CNN (its fields give the architecture).
      variables: its variables, ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` only with batch norm),
        e.g. from :func:`jaxforget.init_model` or a trained ``TrainState``.
      input_shape: one example's shape (H, W, C) the linen model was built for.
      rngs: for the throwaway initialization before the copy; ``nnx.Rngs(0)`` if ``None``.

    Returns:
      The NNX CNN, in evaluation mode.

    Raises:
      TypeError: if ``model`` is not a :class:`jaxforget.models.CNN`.
      ValueError: if ``variables`` lacks ``"params"`` (or ``"batch_stats"`` with batch norm), or a copied array's
        shape differs from the NNX layer's (a wrong ``input_shape``).
    """
    if not isinstance(model, CNN):
        raise TypeError(f"model must be a jaxforget.models.CNN; got {type(model).__name__}.")
    needed = ("params", "batch_stats") if model.use_batch_norm else ("params",)
    missing = [name for name in needed if name not in variables]
    if missing:
        raise ValueError(
            f"variables lacks {missing}; pass the linen model's full variables, e.g. "
            "{'params': state.params, 'batch_stats': state.batch_stats}."
        )
    nnx_model = NNXCNN(
        input_shape=input_shape,
        num_classes=model.num_classes,
        features=model.features,
        hidden=model.hidden,
        use_batch_norm=model.use_batch_norm,
        dtype=model.dtype,
        rngs=nnx.Rngs(0) if rngs is None else rngs,
    )
    params = variables["params"]
    copies = [(nnx_model.hidden.kernel, params["Dense_0"]["kernel"], "Dense_0/kernel")]
    copies += [(nnx_model.hidden.bias, params["Dense_0"]["bias"], "Dense_0/bias")]
    copies += [(nnx_model.head.kernel, params["Dense_1"]["kernel"], "Dense_1/kernel")]
    copies += [(nnx_model.head.bias, params["Dense_1"]["bias"], "Dense_1/bias")]
    for i, conv in enumerate(nnx_model.convs):
        copies += [(conv.kernel, params[f"Conv_{i}"]["kernel"], f"Conv_{i}/kernel")]
        copies += [(conv.bias, params[f"Conv_{i}"]["bias"], f"Conv_{i}/bias")]
    for i, norm in enumerate(nnx_model.norms):
        stats = variables["batch_stats"][f"BatchNorm_{i}"]
        copies += [(norm.scale, params[f"BatchNorm_{i}"]["scale"], f"BatchNorm_{i}/scale")]
        copies += [(norm.bias, params[f"BatchNorm_{i}"]["bias"], f"BatchNorm_{i}/bias")]
        copies += [(norm.mean, stats["mean"], f"BatchNorm_{i}/mean"), (norm.var, stats["var"], f"BatchNorm_{i}/var")]
    for target, value, name in copies:
        if target.get_value().shape != value.shape:
            raise ValueError(
                f"the linen {name} has shape {value.shape}, but the NNX CNN built for input_shape="
                f"{tuple(input_shape)} expects {target.get_value().shape}; pass the input_shape the linen CNN was "
                "built for."
            )
        target.set_value(value)
    nnx_model.eval()
    return nnx_model
