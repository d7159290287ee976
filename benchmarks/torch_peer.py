"""The PyTorch/BackPACK peer for the exact GGN diagonal of :class:`jaxforget.models.CNN`.

A torch twin of the CNN (an ``nn.Sequential`` that BackPACK can extend) is loaded with the Flax weights,
and BackPACK's ``DiagGGNExact`` is converted back into the Flax parameter layout, so the two libraries are
compared on the same weights and batch. Timings are ``repeats`` runs after one warm-up run.

Flax flattens NHWC feature maps and torch flattens NCHW ones, so the rows of the first dense kernel are
permuted (not the activations: BackPACK has no extension for a permute module).

Needs ``torch`` and ``backpack-for-pytorch`` (the ``peers`` extra); it never imports JAX and takes numpy
arrays (or anything ``np.asarray`` accepts).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact
from torch import nn

__all__ = [
    "torch_cnn",
    "params_to_torch",
    "torch_diag_to_flax",
    "torch_logits",
    "backpack_diag_ggn_exact",
    "time_backpack_diag_ggn_exact",
    "time_torch_gradient",
]

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _feature_side(params: Mapping) -> int:
    """Side of the last (square) feature map: the first dense layer reads side * side * channels inputs."""
    channels = np.shape(params["Conv_1"]["kernel"])[-1]
    side = round((np.shape(params["Dense_0"]["kernel"])[0] // channels) ** 0.5)
    if side * side * channels != np.shape(params["Dense_0"]["kernel"])[0]:
        raise ValueError("params do not come from jaxforget.models.CNN on square inputs.")
    return side


def _same_padding(kernel_shape: tuple[int, ...]) -> int:
    """Symmetric padding equal to Flax's SAME for a square odd stride-1 kernel.

    BackPACK cannot unfold torch's ``padding="same"``, so the twin pads explicitly.
    """
    height, width = kernel_shape[:2]
    if height != width or height % 2 == 0:
        raise ValueError(f"kernel {height}x{width} is not square and odd, so SAME padding is not symmetric.")
    return height // 2


def torch_cnn(params: Mapping) -> nn.Sequential:
    """The torch twin of ``jaxforget.models.CNN`` (no batch norm), shaped after the Flax ``params`` tree.

    Layers with parameters carry the Flax names (``Conv_0``, ``Conv_1``, ``Dense_0``, ``Dense_1``), so
    ``state_dict`` keys read ``Conv_0.weight`` and so on. Input is NCHW.
    """
    c0 = np.shape(params["Conv_0"]["kernel"])
    c1 = np.shape(params["Conv_1"]["kernel"])
    d0 = np.shape(params["Dense_0"]["kernel"])
    d1 = np.shape(params["Dense_1"]["kernel"])
    return nn.Sequential(
        OrderedDict(
            [
                ("Conv_0", nn.Conv2d(c0[2], c0[3], c0[:2], padding=_same_padding(c0))),
                ("relu_0", nn.ReLU()),
                ("pool_0", nn.MaxPool2d(2, 2)),
                ("Conv_1", nn.Conv2d(c1[2], c1[3], c1[:2], padding=_same_padding(c1))),
                ("relu_1", nn.ReLU()),
                ("pool_1", nn.MaxPool2d(2, 2)),
                ("flatten", nn.Flatten()),
                ("Dense_0", nn.Linear(d0[0], d0[1])),
                ("relu_2", nn.ReLU()),
                ("Dense_1", nn.Linear(d1[0], d1[1])),
            ]
        )
    )


def _dense0_rows_nhwc_to_nchw(kernel: np.ndarray, side: int) -> np.ndarray:
    """Reorders [side*side*C, out] rows from Flax's (h, w, c) flattening to torch's (c, h, w)."""
    out = kernel.shape[-1]
    return kernel.reshape(side, side, -1, out).transpose(2, 0, 1, 3).reshape(-1, out)


def _dense0_rows_nchw_to_nhwc(kernel: np.ndarray, side: int) -> np.ndarray:
    """Inverse of :func:`_dense0_rows_nhwc_to_nchw`."""
    out = kernel.shape[-1]
    return kernel.reshape(-1, side, side, out).transpose(1, 2, 0, 3).reshape(-1, out)


def params_to_torch(params: Mapping, dtype: str = "float64") -> dict[str, torch.Tensor]:
    """Flax CNN ``params`` -> a ``state_dict`` for :func:`torch_cnn`.

    Conv kernels HWIO -> OIHW; dense kernels [in, out] -> weights [out, in], the first one with its input rows
    reordered from NHWC to NCHW flattening.
    """
    side = _feature_side(params)
    state = {}
    for name, leaves in params.items():
        kernel = np.asarray(leaves["kernel"], np.float64)
        if name.startswith("Conv"):
            weight = kernel.transpose(3, 2, 0, 1)
        else:
            weight = (_dense0_rows_nhwc_to_nchw(kernel, side) if name == "Dense_0" else kernel).T
        state[f"{name}.weight"] = torch.tensor(np.ascontiguousarray(weight), dtype=_TORCH_DTYPES[dtype])
        state[f"{name}.bias"] = torch.tensor(np.asarray(leaves["bias"]), dtype=_TORCH_DTYPES[dtype])
    return state


def torch_diag_to_flax(diag: Mapping[str, torch.Tensor], params: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """Per-parameter torch values keyed like ``state_dict`` (``Conv_0.weight`` ...) -> the Flax layout."""
    side = _feature_side(params)
    tree = {}
    for name in params:
        weight = diag[f"{name}.weight"].detach().cpu().numpy()
        if name.startswith("Conv"):
            kernel = weight.transpose(2, 3, 1, 0)
        else:
            kernel = weight.T
            if name == "Dense_0":
                kernel = _dense0_rows_nchw_to_nhwc(kernel, side)
        bias = diag[f"{name}.bias"].detach().cpu().numpy()
        tree[name] = {"kernel": np.ascontiguousarray(kernel), "bias": bias}
    return tree


def _setup(params: Mapping, images_nhwc, labels, dtype: str, *, extended: bool):
    """The twin, the mean cross-entropy and the NCHW batch as torch tensors.

    ``extended`` registers BackPACK's hooks on the model and the loss; plain gradients are timed without them.
    """
    model = torch_cnn(params).to(_TORCH_DTYPES[dtype])
    model.load_state_dict(params_to_torch(params, dtype))
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    inputs = torch.tensor(np.asarray(images_nhwc).transpose(0, 3, 1, 2), dtype=_TORCH_DTYPES[dtype])
    targets = torch.tensor(np.asarray(labels), dtype=torch.long)
    if extended:
        model, loss_fn = extend(model), extend(loss_fn)
    return model, loss_fn, inputs, targets


def torch_logits(params: Mapping, images_nhwc, dtype: str = "float64") -> np.ndarray:
    """Logits [B, C] of the torch twin on NHWC images, to check it against the Flax model."""
    model, _, inputs, _ = _setup(params, images_nhwc, np.zeros(len(images_nhwc)), dtype, extended=False)
    with torch.no_grad():
        return model(inputs).numpy()


def _run_diag_ggn_exact(model: nn.Module, loss_fn: nn.Module, inputs, targets) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = loss_fn(model(inputs), targets)
    with backpack(DiagGGNExact()), warnings.catch_warnings():
        # The input images need no gradient, which torch reports for BackPACK's hooks on the first layer.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    return {name: p.diag_ggn_exact for name, p in model.named_parameters()}


def _run_gradient(model: nn.Module, loss_fn: nn.Module, inputs, targets) -> None:
    model.zero_grad()
    loss_fn(model(inputs), targets).backward()


def backpack_diag_ggn_exact(params: Mapping, images_nhwc, labels, dtype: str = "float64") -> dict:
    """BackPACK's exact GGN diagonal of the mean cross-entropy, in the Flax ``params`` layout (numpy)."""
    diag = _run_diag_ggn_exact(*_setup(params, images_nhwc, labels, dtype, extended=True))
    return torch_diag_to_flax(diag, params)


def _run_times(run: Callable[[], object], repeats: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def time_backpack_diag_ggn_exact(params: Mapping, images_nhwc, labels, dtype: str, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` forward plus backward passes with BackPACK's ``DiagGGNExact``."""
    setup = _setup(params, images_nhwc, labels, dtype, extended=True)
    return _run_times(lambda: _run_diag_ggn_exact(*setup), repeats)


def time_torch_gradient(params: Mapping, images_nhwc, labels, dtype: str, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` plain torch gradients (forward plus backward) of the same loss."""
    setup = _setup(params, images_nhwc, labels, dtype, extended=False)
    return _run_times(lambda: _run_gradient(*setup), repeats)
