"""Checkpoints of a :class:`~jaxforget.train.TrainState`, with extra pytrees (masks, curvature) and JSON metadata.

::

    save_checkpoint(workdir, state, extra={"mask": mask, "curvature": diagonal}, metadata={"config": config})
    target = create_train_state(model, jax.random.key(0), input_shape, tx)
    state, extra, metadata = restore_checkpoint(workdir, target)

On disk, ``directory`` holds one published checkpoint and a pointer to it::

    directory/
      LATEST            the name of the published checkpoint, e.g. "ckpt_000003"
      ckpt_000003/      an orbax-checkpoint composite checkpoint with four items:
        model/            {"step", "params", "batch_stats"} (orbax PyTree)
        opt_state/        the optimizer state (orbax PyTree; its jax treedef in the item's custom metadata)
        extra/            the ``extra`` dict (orbax PyTree; absent when there is none)
        metadata/         the metadata dict (JSON)

A save is atomic: a crash at any point leaves the previous checkpoint readable. Orbax writes the new checkpoint into
a temporary directory and renames it to ``ckpt_<n>`` when complete; :func:`save_checkpoint` then flushes it to disk
(orbax does not fsync), replaces ``LATEST`` with ``os.replace`` and only then deletes the older checkpoints. Readers
follow ``LATEST`` alone, so a half-written directory left by a crash is never read; the next save deletes it. Saves
block until the checkpoint is on disk. One process at a time may save to a directory.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxforget.atomic import write_text_atomic

__all__ = ["save_checkpoint", "restore_checkpoint", "latest_checkpoint", "CHECKPOINT_FORMAT"]

PyTree = Any

CHECKPOINT_FORMAT = "jaxforget.checkpoint/1"
_POINTER = "LATEST"
_PREFIX = "ckpt_"
# Our checkpoints and orbax's temporary directories for them (``ckpt_000003.orbax-checkpoint-tmp-...``).
_ENTRY = re.compile(rf"{_PREFIX}(\d+)(\..*)?")
_NAME = re.compile(rf"{_PREFIX}\d+")
_POINTER_TEMPORARY = re.compile(rf"\.{_POINTER}\..*\.tmp")
# Keys the saver writes into the metadata record, and the one restore adds.
_SAVED_KEYS = ("format", "created", "versions")
_RESTORE_KEY = "opt_state_restored"
_DISTRIBUTIONS = ("jaxforget", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _checkpointer() -> ocp.Checkpointer:
    # The synchronous Checkpointer: save returns once orbax has written and renamed the checkpoint. The handlers are
    # named up front because a fresh CompositeCheckpointHandler cannot read an item's metadata before it has seen
    # that item's save or restore arguments.
    handlers = {name: ocp.PyTreeCheckpointHandler() for name in ("model", "opt_state", "extra")}
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers, metadata=ocp.JsonCheckpointHandler()))


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _path_name(path: tuple) -> str:
    return "/".join(map(_key_name, path))


def _named_leaves(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/c": leaf}``, naming dict keys, attributes and indices alike: orbax stores NamedTuples as dicts and
    tuples as lists, so only the names survive a round trip."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    return {
        name: tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
        for name, leaf in _named_leaves(tree).items()
    }


def _mismatches(stored: PyTree, wanted: PyTree, name: str) -> list[str]:
    """How the leaf names and shapes of the saved tree ``stored`` (its metadata) differ from those of ``wanted``."""
    stored, wanted = _leaf_shapes(stored), _leaf_shapes(wanted)
    shared = sorted(stored.keys() & wanted.keys())
    problems = [
        f"{path} has shape {stored[path]} in the checkpoint but {wanted[path]} in {name}"
        for path in shared
        if stored[path] != wanted[path]
    ]
    problems += [f"{path} is in the checkpoint but not in {name}" for path in sorted(stored.keys() - wanted.keys())]
    problems += [f"{path} is in {name} but not in the checkpoint" for path in sorted(wanted.keys() - stored.keys())]
    return problems


def _check_matches(stored: PyTree, wanted: PyTree, name: str, checkpoint: pathlib.Path, fix: str) -> None:
    problems = _mismatches(stored, wanted, name)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{name} does not match the checkpoint {checkpoint}: {shown}. {fix}")


def _restore_args(leaf: Any) -> ocp.RestoreArgs:
    # No dtype, so orbax returns the saved one: casting to the target's would lose bits silently (batch norm
    # statistics computed from float64 inputs are float64, while a freshly initialized state holds float32 ones).
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        # Abstract leaves from jax.eval_shape carry no sharding: those go to the default device.
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if leaf.sharding is None else leaf.sharding
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape)
    if isinstance(leaf, int | float):
        return ocp.RestoreArgs(restore_type=type(leaf))
    return ocp.RestoreArgs(restore_type=np.ndarray)


def _restore_request(stored: PyTree, target: PyTree | None) -> ocp.args.PyTreeRestore:
    """Orbax arguments that restore each leaf of the saved tree ``stored`` (its metadata) with its saved dtype, as the
    array type and sharding of ``target``'s leaf of the same name (a NumPy array where ``target`` is ``None``).

    They give no ``item``: given one, orbax casts every leaf to the item's dtype whatever ``restore_args`` say.
    """
    leaves = {} if target is None else _named_leaves(target)
    return ocp.args.PyTreeRestore(
        restore_args=jax.tree_util.tree_map_with_path(
            lambda path, _: _restore_args(leaves.get(_path_name(path))), stored
        )
    )


def _rebuild(restored: PyTree, target: PyTree) -> PyTree:
    """``target``'s tree structure with the leaves of ``restored`` (orbax's dicts and lists) of the same names."""
    leaves = _named_leaves(restored)
    return jax.tree_util.tree_map_with_path(lambda path, _: leaves[_path_name(path)], target)


def _check_extra(extra: PyTree) -> None:
    if extra is None:
        return
    if not isinstance(extra, dict) or not all(isinstance(name, str) for name in extra):
        raise ValueError(
            f"extra must be a dict from names (str) to pytrees of arrays, e.g. {{'mask': mask}}; got {type(extra)}."
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(extra):
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic):
            raise ValueError(
                f"extra{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, but extra holds arrays only; "
                "put other values in metadata."
            )


def _metadata_record(metadata: dict[str, Any] | None) -> dict[str, Any]:
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict (or None); got {type(metadata)}.")
    reserved = sorted(set(metadata) & {*_SAVED_KEYS, _RESTORE_KEY})
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved for the checkpoint's own record; rename them.")
    versions = {}
    for distribution in _DISTRIBUTIONS:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    versions["python"] = platform.python_version()
    record = {
        **metadata,
        "format": CHECKPOINT_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serializable (str, numbers, lists, dicts): {error}") from error
    return record


def _fsync(path: pathlib.Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: pathlib.Path) -> None:
    """Flushes every file and directory under ``root``, and ``root`` itself, to disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(pathlib.Path(folder, name))
        _fsync(pathlib.Path(folder))


def _entries(directory: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """``(number, path)`` of every checkpoint and orbax temporary directory in ``directory``."""
    matches = ((_ENTRY.fullmatch(path.name), path) for path in directory.iterdir())
    return [(int(match.group(1)), path) for match, path in matches if match]


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """The published checkpoint in ``directory`` (the one ``LATEST`` names), or ``None`` if there is none yet.

    Raises:
      FileNotFoundError: if ``LATEST`` names a checkpoint that is not there (it was deleted by hand).
    """
    directory = pathlib.Path(directory)
    try:
        name = (directory / _POINTER).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    path = directory / name
    if not (_NAME.fullmatch(name) and path.is_dir()):
        raise FileNotFoundError(f"{directory / _POINTER} names checkpoint {name!r}, which is not in {directory}.")
    return path


def save_checkpoint(
    directory: str | os.PathLike,
    state: Any,
    *,
    extra: dict[str, PyTree] | None = None,
    metadata: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Saves ``state``, ``extra`` and ``metadata`` as the new checkpoint of ``directory``, atomically.

    Older checkpoints in ``directory`` (and any left half-written by a crash) are deleted once the new one is
    published, so ``directory`` keeps only the newest. Files there that are not checkpoints are left alone.

    Args:
      directory: the checkpoint directory; created if missing.
      state: a :class:`~jaxforget.train.TrainState` (any Flax ``TrainState`` with ``batch_stats``); its ``step``,
        ``params``, ``batch_stats`` and ``opt_state`` are saved (``apply_fn`` and ``tx`` are code, not data).
      extra: optional ``{name: pytree of arrays}``, e.g. ``{"mask": mask, "curvature": diagonal}``; dtypes
        (booleans included) and values are kept bit for bit.
      metadata: optional JSON-serializable dict (config, data seed, ...). The saved record adds ``"format"``
        (:data:`CHECKPOINT_FORMAT`), ``"created"`` (UTC, ISO 8601) and ``"versions"`` (of jaxforget, jax, jaxlib,
        flax, optax, orbax-checkpoint, numpy and python); these keys and ``"opt_state_restored"`` are reserved.

    Returns:
      The path of the new checkpoint, ``directory/ckpt_<n>``.

    Raises:
      ValueError: if ``extra`` is not a dict of pytrees of arrays or ``metadata`` is not a JSON-serializable dict;
        nothing is written.
    """
    _check_extra(extra)
    record = _metadata_record(metadata)
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    # Numbered past every entry, half-written ones included, so a new save never collides with a crash's leftovers.
    number = 1 + max((number for number, _ in _entries(directory)), default=0)
    path = directory / f"{_PREFIX}{number:06d}"

    items = {
        "model": ocp.args.PyTreeSave({"step": state.step, "params": state.params, "batch_stats": state.batch_stats}),
        "opt_state": ocp.args.PyTreeSave(
            state.opt_state, custom_metadata={"treedef": str(jax.tree.structure(state.opt_state))}
        ),
        "metadata": ocp.args.JsonSave(record),
    }
    if extra is not None:
        items["extra"] = ocp.args.PyTreeSave(extra)
    with _checkpointer() as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**items))
    _fsync_tree(path)
    _fsync(directory)  # makes orbax's rename of the temporary directory durable

    write_text_atomic(directory / _POINTER, path.name + "\n")
    _fsync(directory)
    for _, old in _entries(directory):
        if old != path:
            _remove(old)
    for leftover in directory.iterdir():
        if _POINTER_TEMPORARY.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)
    return path


def restore_checkpoint(
    directory: str | os.PathLike, target: Any, *, extra_target: dict[str, PyTree] | None = None
) -> tuple[Any, dict[str, PyTree] | None, dict[str, Any]]:
    """Restores the newest checkpoint of ``directory`` into the structure of ``target``.

    ``params``, ``batch_stats`` and ``step`` take ``target``'s tree structure, array types and shardings, and keep
    their saved dtypes and values bit for bit: a fresh target's dtypes may differ from the trained state's (batch
    norm statistics of float64 inputs are float64, a fresh state's float32), and casting would lose bits silently;
    cast the result yourself if you want other dtypes.

    ``opt_state`` is restored only if the saved one has the same jax tree structure (the same optimizer: its state's
    NamedTuple types) and leaf shapes as ``target.opt_state``; otherwise it is ``target.tx.init(params)`` of the
    restored params, so a checkpoint trained with Adam can be fine-tuned with SGD.
    ``metadata["opt_state_restored"]`` says which happened.

    Args:
      directory: a directory written by :func:`save_checkpoint`.
      target: a :class:`~jaxforget.train.TrainState` for the same model, e.g.
        ``create_train_state(model, key, input_shape, tx)`` with any key and any optimizer ``tx``; only its
        structure, shapes, array types and shardings are used, so an abstract one from ``jax.eval_shape`` saves
        initializing the model (its arrays land on the default device).
      extra_target: optional ``{name: pytree}`` giving the structure, array types and shardings of the saved extras
        (their dtypes are the saved ones, as for ``target``).
        Without it the extras come back as nested dicts (orbax turns tuples into lists and NamedTuples into dicts
        keyed by field name) of NumPy arrays.

    Returns:
      ``(state, extra, metadata)``: ``target`` with the restored fields; the extras (``None`` if none were saved);
      the saved metadata record (see :func:`save_checkpoint`) plus ``"opt_state_restored"`` (bool).

    Raises:
      FileNotFoundError: if ``directory`` holds no checkpoint.
      ValueError: if the saved params or batch stats differ from ``target``'s in keys or shapes (a different model,
        other widths, batch norm on one side only), or the saved extras from ``extra_target``'s; nothing is
        restored.
    """
    directory = pathlib.Path(directory).absolute()  # orbax needs absolute paths
    path = latest_checkpoint(directory)
    if path is None:
        reason = (
            f"it has no {_POINTER} file, which save_checkpoint writes" if directory.is_dir() else "no such directory"
        )
        raise FileNotFoundError(f"no checkpoint in {directory}: {reason}.")
    model = {"step": target.step, "params": target.params, "batch_stats": target.batch_stats}
    with _checkpointer() as checkpointer:
        stored = checkpointer.metadata(path).item_metadata
        _check_matches(
            stored["model"].tree,
            model,
            "target",
            path,
            "Build target for the model the checkpoint was saved from (same layers and widths, batch norm on or "
            "off alike), e.g. with create_train_state(model, key, input_shape, tx).",
        )
        stored_extra = stored.get("extra")
        if extra_target is not None:
            if stored_extra is None:
                raise ValueError(f"extra_target was given, but the checkpoint {path} has no extra; pass None.")
            _check_matches(
                stored_extra.tree,
                extra_target,
                "extra_target",
                path,
                "Pass extra_target=None to restore the extras as they were saved.",
            )
        opt_state_matches = stored["opt_state"].custom_metadata.get("treedef") == str(
            jax.tree.structure(target.opt_state)
        ) and not _mismatches(stored["opt_state"].tree, target.opt_state, "target")

        items = {"model": _restore_request(stored["model"].tree, model), "metadata": ocp.args.JsonRestore()}
        if opt_state_matches:
            items["opt_state"] = _restore_request(stored["opt_state"].tree, target.opt_state)
        if stored_extra is not None:
            items["extra"] = _restore_request(stored_extra.tree, extra_target)
        restored = checkpointer.restore(path, ocp.args.Composite(**items))

    model = _rebuild(restored["model"], model)
    opt_state = _rebuild(restored["opt_state"], target.opt_state) if opt_state_matches else None
    extra = None
    if stored_extra is not None:
        extra = restored["extra"] if extra_target is None else _rebuild(restored["extra"], extra_target)
    state = target.replace(
        step=model["step"],
        params=model["params"],
        batch_stats=model["batch_stats"],
        opt_state=target.tx.init(model["params"]) if opt_state is None else opt_state,
    )
    return state, extra, {**restored["metadata"], _RESTORE_KEY: opt_state_matches}
