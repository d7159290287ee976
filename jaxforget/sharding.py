"""Data parallelism on a 1-D device mesh: batches split over devices, parameters replicated or split (FSDP-style).

The estimators, selections and updates need no changes to run on several devices: pass them arrays placed with these
helpers inside a ``jax.jit`` and XLA partitions the program (each device computes its examples' share of a diagonal,
and the sums over examples become all-reduces). The results equal the single-device ones up to the order of
floating-point summation; the per-example labels :func:`jaxforget.gnb_diagonal` draws do not depend on the number of
devices. Nothing here jits::

    mesh = data_mesh()                                  # all of jax.devices(), one axis "data"
    params = replicate(params, mesh)                    # or shard_params(params, mesh) for FSDP-style splits
    batch = shard_batch(batch, mesh)                    # examples split over the devices
    diagonal = jax.jit(lambda p, b: ggn_diagonal(logits_fn, p, b.inputs))(params, batch)   # replicated
    mask = jax.jit(lambda d: select_top(d, 0.01))(shard_params(diagonal, mesh))      # split like the scores

Output placement (tested on 1, 2 and 8 host devices): a diagonal over a split batch with replicated parameters is
replicated; :func:`jaxforget.select_top` returns the mask split like its scores (no leaf is gathered onto one
device, see :mod:`jaxforget.selection`); :func:`jaxforget.freeze_unselected` keeps the mask and the optimizer state
split like the parameters when its ``init`` runs outside ``jit`` (under ``jit``, pass ``out_shardings``).

Caution, seen with jax 0.10.2 on CPU: per-example gradients through a convolution (``vmap`` of ``grad``, which XLA
turns into a grouped convolution), as in :func:`jaxforget.fisher_diagonal` of a conv net, come out zero for the
examples off the first device when the batch is split: wrong numbers, silently. The layerwise
:func:`jaxforget.ggn_diagonal` and :func:`jaxforget.gnb_diagonal` and :func:`jaxforget.hutchinson_diagonal` are
unaffected, and so are models without convolutions; ``tests/test_sharding.py`` tracks the fault (a strict xfail).
The layerwise GGN gathers the whole batch's convolution patches onto every device (its loop over examples slices
the split axis), so its memory per device stops shrinking past two devices (``benchmarks/sharding.py``).

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before JAX starts) gives 8 host devices for
tests; they share the machine's cores, so they check placement and numbers, not speed. For a model axis (many
models at once) see :mod:`jaxforget.ensembles`; multi-host runs start with ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "data_mesh",
    "usable_devices",
    "shard_batch",
    "replicate",
    "params_sharding",
    "shard_params",
]

PyTree = Any

DATA_AXIS = "data"  # the mesh axis that splits examples (and, FSDP-style, parameters)
"""The mesh axis that splits examples (and, FSDP-style, parameters)."""


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) with the one axis ``"data"``.

    Args:
      devices: the devices, in mesh order; ``None`` takes all of ``jax.devices()``.

    Raises:
      ValueError: if ``devices`` is empty.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device (or None for all of jax.devices()).")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def usable_devices(count: int, size: int) -> int:
    """The largest number of devices, at most ``count``, that splits ``size`` examples evenly (a divisor of ``size``).

    Args:
      count: the most devices to use, at least 1.
      size: the number of examples to split.

    >>> usable_devices(8, 100)
    5
    """
    for value, name in ((count, "count"), (size, "size")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return max(d for d in range(1, min(count, size) + 1) if size % d == 0)


def _devices_on(mesh: Mesh, name: str) -> int:
    if not isinstance(mesh, Mesh) or DATA_AXIS not in mesh.axis_names:
        axes = mesh.axis_names if isinstance(mesh, Mesh) else type(mesh).__name__
        raise ValueError(f"{name} has axes {axes} but no {DATA_AXIS!r} axis; build one with data_mesh().")
    return mesh.shape[DATA_AXIS]


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Places a batch with its leading (example) axis split over the mesh's ``"data"`` axis.

    Every leaf gets ``NamedSharding(mesh, PartitionSpec("data"))``: with D devices, device ``d`` holds examples
    ``[d * B / D, (d + 1) * B / D)`` of every leaf (its other axes whole).

    Args:
      batch: a pytree of arrays with a leading example axis, e.g. ``Batch(inputs [B, ...], labels [B])``.
      mesh: a mesh with an axis ``"data"`` (see :func:`data_mesh`).

    Returns:
      ``batch`` on the devices.

    Raises:
      ValueError: naming the leaf, if a leaf is a scalar or its leading size is not a multiple of the device count
        (checked for every leaf before any transfer).
    """
    count = _devices_on(mesh, "mesh")
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = np.shape(leaf)
        where = f"batch leaf {jax.tree_util.keystr(path)}" if path else "batch"
        if not shape:
            raise ValueError(f"{where} is a scalar; every leaf needs a leading example axis to split over devices.")
        if shape[0] % count:
            raise ValueError(
                f"{where} has {shape[0]} examples, which {count} devices cannot split evenly; pass a batch of a "
                f"multiple of {count} examples (drop or pad some), or a mesh over fewer devices, e.g. "
                f"data_mesh(jax.devices()[:usable_devices({count}, {shape[0]})])."
            )
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places a whole copy of every leaf of ``tree`` on every device of ``mesh`` (``PartitionSpec()``).

    Args:
      tree: a pytree of arrays.
      mesh: the mesh to copy them to.
    """
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _split_axis(shape: tuple[int, ...], count: int) -> int | None:
    """The longest axis whose length ``count`` divides (the first of equals), or ``None``."""
    fitting = [axis for axis, length in enumerate(shape) if length % count == 0 and length >= count]
    return max(fitting, key=lambda axis: shape[axis]) if fitting else None


def params_sharding(params: PyTree, mesh: Mesh) -> PyTree:
    """The FSDP-style placement :func:`shard_params` gives each leaf, as a pytree of ``NamedSharding``.

    The rule, leaf by leaf: with D devices on the ``"data"`` axis, the leaf is split along its longest axis whose
    length is a multiple of D (the first of equally long ones), each device holding ``1 / D`` of it; a leaf with no
    such axis (a scalar, a bias shorter than D, odd lengths) is replicated. A Dense kernel [3136, 128] on 8 devices
    is split along its 3136 rows, a conv kernel [3, 3, 32, 64] along its 64 output channels, a bias [10] replicated.

    Args:
      params: a pytree of arrays, or of anything with a ``.shape`` (e.g. ``jax.ShapeDtypeStruct``).
      mesh: a mesh with an axis ``"data"`` (see :func:`data_mesh`).

    Returns:
      A pytree of ``NamedSharding`` shaped like ``params``, e.g. for ``jax.jit(..., out_shardings=...)``.
    """
    count = _devices_on(mesh, "mesh")

    def place(leaf):
        shape = tuple(np.shape(leaf))
        axis = _split_axis(shape, count)
        spec = [None] * len(shape)
        if axis is not None:
            spec[axis] = DATA_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(place, params)


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """Places ``params`` (or anything shaped like them: scores, masks, curvature) split FSDP-style over the mesh's
    ``"data"`` axis, by the rule of :func:`params_sharding`.

    Jitted functions of split parameters keep elementwise results split alike; a forward pass gathers each layer's
    weights as it needs them (which XLA schedules), so memory per device for parameter-sized arrays is about ``1/D``.

    Args:
      params: a pytree of arrays shaped like the parameters.
      mesh: a mesh with an axis ``"data"`` (see :func:`data_mesh`).
    """
    return jax.device_put(params, params_sharding(params, mesh))
