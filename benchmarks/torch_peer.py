"""The PyTorch peers of jaxforget's curvature: BackPACK's exact GGN diagonal of the CNN, torch.func's Hutchinson.

A torch twin of :class:`jaxforget.models.CNN` (an ``nn.Sequential`` that BackPACK can extend) is loaded with the Flax
weights, and BackPACK's ``DiagGGNExact`` is converted back into the Flax parameter layout, so the two libraries are
compared on the same weights and batch. Timings are ``repeats`` runs after one warm-up run, on ``device`` ("cpu" or
"cuda"), synchronized before and after each run on a GPU, where kernels run asynchronously.

Flax flattens NHWC feature maps and torch flattens NCHW ones, so the rows of the first dense kernel are
permuted (not the activations: BackPACK has no extension for a permute module).

:func:`torch_resnet18` and :func:`torch_func_hutchinson` are the torch side of the ResNet-18 Hutchinson comparison
in ``benchmarks/device_check.py``.

Needs ``torch``; ``backpack-for-pytorch`` (the ``peers`` extra) only for the functions that run BackPACK. It never
imports JAX and takes numpy arrays (or anything ``np.asarray`` accepts).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "torch_cnn",
    "params_to_torch",
    "torch_diag_to_flax",
    "torch_logits",
    "run_gradient",
    "run_diag_ggn_exact",
    "backpack_diag_ggn_exact",
    "time_backpack_diag_ggn_exact",
    "time_torch_gradient",
    "torch_resnet18",
    "torch_func_gradient",
    "torch_func_hutchinson",
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
    """Flax CNN ``params`` -> a ``state_dict`` for :func:`torch_cnn` (CPU tensors; ``load_state_dict`` copies them
    onto the model's device).

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


def _synchronize(device: str | torch.device) -> None:
    """Waits for the kernels queued on a CUDA ``device``; a no-op on the CPU, where torch runs synchronously."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _setup(params: Mapping, images_nhwc, labels, dtype: str, *, extended: bool, device: str | torch.device = "cpu"):
    """The twin, the mean cross-entropy and the NCHW batch as torch tensors, all on ``device``.

    ``extended`` registers BackPACK's hooks on the model and the loss; plain gradients are timed without them.
    """
    model = torch_cnn(params).to(device=device, dtype=_TORCH_DTYPES[dtype])
    model.load_state_dict(params_to_torch(params, dtype))
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    inputs = torch.tensor(np.asarray(images_nhwc).transpose(0, 3, 1, 2), dtype=_TORCH_DTYPES[dtype], device=device)
    targets = torch.tensor(np.asarray(labels), dtype=torch.long, device=device)
    if extended:
        from backpack import extend

        model, loss_fn = extend(model), extend(loss_fn)
    return model, loss_fn, inputs, targets


def torch_logits(
    params: Mapping, images_nhwc, dtype: str = "float64", device: str | torch.device = "cpu"
) -> np.ndarray:
    """Logits [B, C] of the torch twin on NHWC images, to check it against the Flax model."""
    labels = np.zeros(len(images_nhwc))
    model, _, inputs, _ = _setup(params, images_nhwc, labels, dtype, extended=False, device=device)
    with torch.no_grad():
        return model(inputs).cpu().numpy()


def run_diag_ggn_exact(model: nn.Module, loss_fn: nn.Module, inputs, targets) -> dict[str, torch.Tensor]:
    """One forward and backward pass with BackPACK's ``DiagGGNExact``: the GGN diagonal keyed like ``state_dict``.

    ``model`` and ``loss_fn`` must be BackPACK-extended (``backpack.extend``); the values stay on their device.
    """
    from backpack import backpack
    from backpack.extensions import DiagGGNExact

    model.zero_grad()
    loss = loss_fn(model(inputs), targets)
    with backpack(DiagGGNExact()), warnings.catch_warnings():
        # The input images need no gradient, which torch reports for BackPACK's hooks on the first layer.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    return {name: p.diag_ggn_exact for name, p in model.named_parameters()}


def run_gradient(model: nn.Module, loss_fn: nn.Module, inputs, targets) -> None:
    """One plain forward and backward pass: the gradient lands in each parameter's ``.grad``."""
    model.zero_grad()
    loss_fn(model(inputs), targets).backward()


def backpack_diag_ggn_exact(
    params: Mapping, images_nhwc, labels, dtype: str = "float64", device: str | torch.device = "cpu"
) -> dict:
    """BackPACK's exact GGN diagonal of the mean cross-entropy, in the Flax ``params`` layout (numpy)."""
    diag = run_diag_ggn_exact(*_setup(params, images_nhwc, labels, dtype, extended=True, device=device))
    return torch_diag_to_flax(diag, params)


def _run_times(run: Callable[[], object], repeats: int, device: str | torch.device) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        _synchronize(device)  # the timer must not start while earlier kernels still run
        start = time.perf_counter()
        run()
        _synchronize(device)  # nor stop before this run's kernels have finished
        times.append(time.perf_counter() - start)
    return times


def time_backpack_diag_ggn_exact(
    params: Mapping, images_nhwc, labels, dtype: str, repeats: int, device: str | torch.device = "cpu"
) -> list[float]:
    """Seconds of each of ``repeats`` forward plus backward passes with BackPACK's ``DiagGGNExact``."""
    setup = _setup(params, images_nhwc, labels, dtype, extended=True, device=device)
    return _run_times(lambda: run_diag_ggn_exact(*setup), repeats, device)


def time_torch_gradient(
    params: Mapping, images_nhwc, labels, dtype: str, repeats: int, device: str | torch.device = "cpu"
) -> list[float]:
    """Seconds of each of ``repeats`` plain torch gradients (forward plus backward) of the same loss."""
    setup = _setup(params, images_nhwc, labels, dtype, extended=False, device=device)
    return _run_times(lambda: run_gradient(*setup), repeats, device)


# ----------------------------------------------------------------------------------------------------------
# ResNet-18 and torch.func's Hutchinson.


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a strided 1x1 convolution where the shape changes)."""

    def __init__(self, inputs: int, features: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, features, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(features)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != features:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, features, 1, stride, bias=False), nn.BatchNorm2d(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


def torch_resnet18(width: int = 64, stage_sizes: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10) -> nn.Sequential:
    """A torch ResNet-18 with the CIFAR stem, shaped like ``jaxforget.models.ResNet18``: NCHW input, logits [B, C].

    The same layers and parameter count as the Flax model with the same ``width`` and ``stage_sizes``, but not the
    same function of its weights: stride-2 convolutions pad 1 on both sides where Flax's SAME pads 0 before and 1
    after. For timing, not for comparing values.
    """
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage, blocks in enumerate(stage_sizes):
        for block in range(blocks):
            layers.append(_BasicBlock(channels, width * 2**stage, 2 if stage > 0 and block == 0 else 1))
            channels = width * 2**stage
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def _functional_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    """The mean cross-entropy as a function of a parameter dict (buffers fixed), and the model's parameters."""
    from torch.func import functional_call

    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (inputs,)), labels)

    return loss, params


def torch_func_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], dict]:
    """``run() -> {name: gradient}``: torch.func's gradient of the mean cross-entropy, the Hutchinson's unit of cost.

    Like :func:`torch_func_hutchinson`, it reads the model as it is (eval mode: running batch-norm statistics).
    """
    from torch.func import grad

    loss, params = _functional_loss(model, inputs, labels)
    gradient = grad(loss)
    return lambda: gradient(params)


def torch_func_hutchinson(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, num_probes: int
) -> Callable[[], dict]:
    """``run() -> {name: estimate}``: torch.func's Hutchinson estimate of the diagonal of the mean cross-entropy's
    Hessian in the parameters, as ``jaxforget.hutchinson_diagonal`` computes it.

    Each run draws ``num_probes`` Rademacher probes v (torch's global generator, on the parameters' device), computes
    the Hessian-vector products as a ``vmap`` over probes of a ``jvp`` of ``grad`` (forward-over-reverse) and returns
    the mean of v * Hv, each entry shaped like its parameter. Put ``model`` in eval mode first (running batch-norm
    statistics), as the Flax model is evaluated.

    Args:
      model: a torch module on the device of ``inputs``.
      inputs: the batch the model takes, e.g. [B, 3, H, W].
      labels: integer classes [B].
      num_probes: probes per estimate, all vmapped at once.
    """
    from torch.func import grad, jvp, vmap

    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}.")
    loss, params = _functional_loss(model, inputs, labels)
    gradient = grad(loss)

    def run() -> dict[str, torch.Tensor]:
        probes = {n: torch.randint(0, 2, (num_probes, *p.shape), device=p.device).to(p.dtype) * 2 - 1
                  for n, p in params.items()}  # fmt: skip
        hvps = vmap(lambda v: jvp(gradient, (params,), (v,))[1])(probes)
        return {n: (probes[n] * hvps[n]).mean(0) for n in params}

    return run
