"""Checkpoints of a training state, with extra pytrees (masks, curvature) and JSON metadata.

The state is any Flax ``TrainState`` (jaxforget's, Flax's own, a subclass with fields of its own, with or without
batch statistics), any other ``flax.struct`` dataclass, or any pytree of arrays: a dict, an ``nnx.State``, an NNX
module or a tuple ``(model, optimizer)`` of NNX objects. ::

    save_checkpoint(workdir, state, extra={"mask": mask, "curvature": diagonal}, metadata={"config": config})
    target = create_train_state(model, jax.random.key(0), input_shape, tx)
    state, extra, metadata = restore_checkpoint(workdir, target)
    digest = verify_checkpoint(workdir)  # checks every file; the same digest means the same checkpoint

On disk, ``directory`` holds one published checkpoint and a pointer to it::

    directory/
      LATEST            JSON naming the published checkpoint and the SHA-256 and size of each of its files:
                        {"checkpoint": "ckpt_000003", "sha256": {"model/_METADATA": "ab12...", ...},
                         "size": {"model/_METADATA": 4394, ...}}
      ckpt_000003/      an orbax-checkpoint composite checkpoint with up to four items:
        model/            the state's arrays but its optimizer state, as nested dicts named by their pytree paths:
                          {"step", "params", "batch_stats"} for jaxforget's TrainState, every data field for
                          another dataclass, the whole tree for any other pytree (orbax PyTree)
        opt_state/        a dataclass state's ``opt_state`` field, where it has one (orbax PyTree; its jax treedef in
                          the item's custom metadata)
        extra/            the ``extra`` dict (orbax PyTree; absent when there is none)
        metadata/         the metadata dict (JSON)

A save is atomic: a crash at any point leaves the previous checkpoint readable. Orbax writes the new checkpoint into
a temporary directory and renames it to ``ckpt_<n>`` when complete; :func:`save_checkpoint` then flushes it to disk
(orbax does not fsync), hashes every file in it, replaces ``LATEST`` with ``os.replace`` and only then deletes the
older checkpoints. Readers follow ``LATEST`` alone, so a half-written directory left by a crash is never read; the
next save deletes it. Saves block until the checkpoint is on disk. One process at a time may save to a directory.

A checkpoint is verified before it is used: :func:`restore_checkpoint` first checks every file ``LATEST`` lists
against its recorded size and SHA-256 (as :func:`verify_checkpoint` does), so flipped bits, truncated or deleted files
raise :class:`~jaxforget.atomic.CorruptFileError` naming the file instead of loading as wrong weights. Files in the
checkpoint that ``LATEST`` does not list (an orbax leftover) are ignored. Checkpoints published before ``LATEST``
held hashes (it held just the name, e.g. ``ckpt_000003``) still restore, without verification of their files; the
next save publishes a verifiable one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxforget.atomic import CorruptFileError, sha256_file, write_text_atomic

__all__ = ["save_checkpoint", "restore_checkpoint", "latest_checkpoint", "verify_checkpoint", "CHECKPOINT_FORMAT"]

PyTree = Any
T = TypeVar("T")

CHECKPOINT_FORMAT = "jaxforget.checkpoint/1"
_POINTER = "LATEST"
_PREFIX = "ckpt_"
# Our checkpoints and orbax's temporary directories for them (``ckpt_000003.orbax-checkpoint-tmp-...``).
_ENTRY = re.compile(rf"{_PREFIX}(\d+)(\..*)?")
_NAME = re.compile(rf"{_PREFIX}\d+")
_POINTER_TEMPORARY = re.compile(rf"\.{_POINTER}\..*\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POINTER_KEYS = ("checkpoint", "sha256", "size")
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


def _is_key(leaf: Any) -> bool:
    """Whether ``leaf`` is a typed PRNG key array (``jax.random.key``; an NNX module's ``Rngs`` hold them), which a
    checkpoint stores as its ``jax.random.key_data``."""
    return isinstance(leaf, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stored_form(leaf: Any) -> Any:
    """``leaf`` as a checkpoint stores it: a typed key as its raw data, anything else as it is."""
    return jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf


def _from_stored(restored: Any, target_leaf: Any) -> Any:
    """The restored leaf in the form of ``target_leaf``: raw key data wrapped back into a typed key of its impl."""
    if not _is_key(target_leaf):
        return restored
    return jax.random.wrap_key_data(restored, impl=getattr(target_leaf.dtype, "_impl", None))


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, leaf in _named_leaves(tree).items():
        leaf = _stored_form(leaf)
        shapes[name] = tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
    return shapes


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
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=_stored_form(leaf).shape)
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
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _from_stored(leaves[_path_name(path)], leaf), target)


def _data_fields(state: Any) -> list[str] | None:
    """The names of a dataclass state's pytree fields (``apply_fn`` and ``tx`` of a Flax ``TrainState`` are not),
    or ``None`` for any other pytree."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return None
    return [field.name for field in dataclasses.fields(state) if field.metadata.get("pytree_node", True)]


def _state_parts(state: Any) -> tuple[dict[str, Any], Any]:
    """``(model, opt_state)``: what the "model" item holds (a dict: the data fields but ``opt_state``, or the whole
    tree under "pytree") and the optimizer state of a dataclass with an ``opt_state`` field (else ``None``)."""
    fields = _data_fields(state)
    if fields is None:
        return {"pytree": state}, None
    model = {name: getattr(state, name) for name in fields if name != "opt_state"}
    opt_state = state.opt_state if "opt_state" in fields else None
    # An optimizer state with no arrays (plain SGD's) is no item: orbax stores no empty tree.
    return model, opt_state if jax.tree.leaves(opt_state) else None


def _nested(tree: PyTree) -> dict[str, Any]:
    """``tree``'s leaves in nested dicts keyed by the names of their path entries (dict keys, attributes, indices),
    the form in which orbax stores any pytree; empty subtrees (``batch_stats={}``, ``None``) hold no leaf and drop."""
    nested: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [_key_name(key) for key in path]
        node = nested
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return nested


def _check_state(state: Any, name: str) -> None:
    """Raises ValueError, before anything is written or read, on what a checkpoint cannot store."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if not leaves:
        raise ValueError(f"{name} holds no arrays: a checkpoint stores a pytree of arrays (params, optimizer state).")
    for path, leaf in leaves:
        if not isinstance(leaf, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic | int | float):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, but a checkpoint stores arrays and "
                "numbers only: declare a field that holds code or configuration with "
                "flax.struct.field(pytree_node=False), or put such values in metadata."
            )
    names = [_path_name(path) for path, _ in leaves]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(
            f"{name} has two leaves named {duplicate!r} (a dict key and an index or attribute of the same name); "
            "rename one, since a checkpoint stores leaves by name."
        )


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


@dataclasses.dataclass(frozen=True)
class _Pointer:
    """What ``LATEST`` says: the published checkpoint's name and, unless it is an old plain-name pointer, the
    SHA-256 and size in bytes of each of its files (paths relative to the checkpoint, ``/``-separated)."""

    name: str
    sha256: dict[str, str] | None
    size: dict[str, int] | None
    text: bytes


def _file_records(path: pathlib.Path) -> tuple[dict[str, str], dict[str, int]]:
    """The SHA-256 and size of every file under ``path``, keyed by sorted relative path."""
    files = sorted(file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file())
    return {name: sha256_file(path / name) for name in files}, {name: (path / name).stat().st_size for name in files}


def _pointer_text(name: str, sha256: dict[str, str], size: dict[str, int]) -> str:
    return json.dumps({"checkpoint": name, "sha256": sha256, "size": size}, indent=1) + "\n"


def _is_relative_file(name: Any) -> bool:
    """Whether ``name`` is a plain relative path (no ``..``, nothing absolute): one that stays in the checkpoint."""
    if not isinstance(name, str) or not name:
        return False
    pure = pathlib.PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts and pure.as_posix() == name and "\\" not in name


def _manifest_problem(record: Any) -> str | None:
    """Why the parsed JSON ``record`` is not a pointer :func:`save_checkpoint` writes, or ``None`` if it is one."""
    if not isinstance(record, dict) or not set(_POINTER_KEYS) <= record.keys():
        return f"it is not a JSON object with the keys {list(_POINTER_KEYS)}"
    name, sha256, size = (record[key] for key in _POINTER_KEYS)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return f"its checkpoint {name!r} is not a checkpoint name like {_PREFIX}000003"
    if not isinstance(sha256, dict) or not isinstance(size, dict) or not sha256 or sha256.keys() != size.keys():
        return "its sha256 and size are not two objects over the same, non-empty set of files"
    for file in sorted(sha256):
        if not _is_relative_file(file):
            return f"it lists {file!r}, which is not a relative path inside the checkpoint"
        if not isinstance(sha256[file], str) or not _SHA256.fullmatch(sha256[file]):
            return f"its sha256 of {file} is not 64 lowercase hex digits"
        if type(size[file]) is not int or size[file] < 0:
            return f"its size of {file} is not a number of bytes"
    return None


def _parse_pointer(file: pathlib.Path, text: bytes) -> _Pointer:
    """Reads the pointer ``file`` with content ``text``: the JSON that :func:`save_checkpoint` writes, or the plain
    checkpoint name of the format before it (which carries no hashes).

    Raises:
      CorruptFileError: if ``text`` is neither.
    """
    try:
        decoded = text.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise CorruptFileError(file, f"it is not UTF-8 text: {error}") from error
    if _NAME.fullmatch(decoded):
        return _Pointer(decoded, None, None, text)
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        raise CorruptFileError(file, f"it is neither a checkpoint name nor JSON: {error}") from error
    problem = _manifest_problem(record)
    if problem is not None:
        raise CorruptFileError(file, problem)
    return _Pointer(record["checkpoint"], record["sha256"], record["size"], text)


def _read_pointer(directory: pathlib.Path) -> _Pointer | None:
    """``directory``'s pointer, or ``None`` if it has none.

    Raises:
      CorruptFileError: if the pointer cannot be read or parsed.
    """
    file = directory / _POINTER
    try:
        text = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise CorruptFileError(file, f"it is unreadable: {error}") from error
    return _parse_pointer(file, text)


def _checkpoint_path(directory: pathlib.Path, pointer: _Pointer) -> pathlib.Path:
    path = directory / pointer.name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{directory / _POINTER} names checkpoint {pointer.name!r}, which is not in {directory}."
        )
    return path


def _published(directory: pathlib.Path) -> tuple[pathlib.Path, _Pointer]:
    """The published checkpoint of ``directory`` and the pointer to it.

    Raises:
      FileNotFoundError: if ``directory`` holds no checkpoint, or ``LATEST`` names one that is not there.
      CorruptFileError: if ``LATEST`` cannot be read or parsed.
    """
    pointer = _read_pointer(directory)
    if pointer is None:
        reason = (
            f"it has no {_POINTER} file, which save_checkpoint writes" if directory.is_dir() else "no such directory"
        )
        raise FileNotFoundError(f"no checkpoint in {directory}: {reason}.")
    return _checkpoint_path(directory, pointer), pointer


def _check_file(file: pathlib.Path, sha256: str, size: int) -> None:
    """Raises :class:`CorruptFileError` unless ``file`` is a readable file of ``size`` bytes and SHA-256 ``sha256``."""
    try:
        actual = file.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        raise CorruptFileError(file, f"it is missing (save_checkpoint wrote {size} bytes)") from None
    except OSError as error:
        raise CorruptFileError(file, f"it is unreadable: {error}") from error
    if not file.is_file():
        raise CorruptFileError(file, "it is not a regular file")
    if actual != size:
        raise CorruptFileError(file, f"it has {actual} bytes, but save_checkpoint wrote {size} (truncated or replaced)")
    try:
        digest = sha256_file(file)
    except OSError as error:
        raise CorruptFileError(file, f"it is unreadable: {error}") from error
    if digest != sha256:
        raise CorruptFileError(
            file, f"its SHA-256 is {digest}, not the {sha256} recorded in {_POINTER} when it was saved"
        )


def _verify_files(path: pathlib.Path, pointer: _Pointer) -> None:
    """Checks each file ``pointer`` lists in the checkpoint ``path``, in sorted order; nothing for an old plain-name
    pointer, which lists none."""
    if pointer.sha256 is None:
        return
    for name in sorted(pointer.sha256):
        _check_file(path / name, pointer.sha256[name], pointer.size[name])


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """The published checkpoint in ``directory`` (the one ``LATEST`` names), or ``None`` if there is none yet.

    Its files are not checked; :func:`verify_checkpoint` does that.

    Args:
      directory: the directory :func:`save_checkpoint` writes to.

    Raises:
      FileNotFoundError: if ``LATEST`` names a checkpoint that is not there (it was deleted by hand).
      CorruptFileError: if ``LATEST`` is unreadable, or neither the JSON :func:`save_checkpoint` writes nor a plain
        checkpoint name (the format before it).
    """
    directory = pathlib.Path(directory)
    pointer = _read_pointer(directory)
    return None if pointer is None else _checkpoint_path(directory, pointer)


def verify_checkpoint(directory: str | os.PathLike) -> str:
    """Checks that every file of ``directory``'s published checkpoint is there with the size and SHA-256 recorded in
    ``LATEST`` when it was saved, and returns a digest of the checkpoint's content.

    Files in the checkpoint that ``LATEST`` does not list (orbax leftovers) are ignored. A checkpoint published
    before ``LATEST`` held hashes (a plain-name pointer) has nothing to check against: its files are not verified,
    and the digest is that of the pointer :func:`save_checkpoint` would write for them as they are now.

    Args:
      directory: a directory written by :func:`save_checkpoint`.

    Returns:
      The SHA-256 (hex) of ``LATEST``, which names the checkpoint and the SHA-256 of each of its files: equal
      digests mean the same checkpoint, bit for bit (for a plain-name pointer, see above).

    Raises:
      FileNotFoundError: if ``directory`` holds no checkpoint, or ``LATEST`` names one that is not there.
      CorruptFileError: naming the first file (in sorted order) that is missing, unreadable, or of another size or
        SHA-256 than recorded, or ``LATEST`` itself if it cannot be read or parsed.
    """
    directory = pathlib.Path(directory).absolute()
    path, pointer = _published(directory)
    if pointer.sha256 is None:
        return hashlib.sha256(_pointer_text(pointer.name, *_file_records(path)).encode()).hexdigest()
    _verify_files(path, pointer)
    return hashlib.sha256(pointer.text).hexdigest()


def _one_line(error: BaseException, limit: int = 500) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _orbax_read(path: pathlib.Path, read: Callable[[], T]) -> T:
    """``read()``, an orbax read of the checkpoint ``path``, with whatever it raises as a :class:`CorruptFileError`."""
    try:
        return read()
    except Exception as error:
        raise CorruptFileError(path, f"orbax could not read it: {_one_line(error)}") from error


def _stored_items(checkpointer: ocp.Checkpointer, path: pathlib.Path) -> dict[str, Any]:
    """The orbax metadata of each item of the checkpoint ``path``.

    Raises:
      CorruptFileError: if orbax cannot read it, or the model item is missing.
    """
    stored = _orbax_read(path, lambda: checkpointer.metadata(path).item_metadata)
    if stored.get("model") is None:
        raise CorruptFileError(path, "it has no model item")
    return stored


def save_checkpoint(
    directory: str | os.PathLike,
    state: Any,
    *,
    extra: dict[str, PyTree] | None = None,
    metadata: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Saves ``state``, ``extra`` and ``metadata`` as the new checkpoint of ``directory``, atomically.

    Once orbax has written the checkpoint and it is on disk, the SHA-256 and size of each of its files are published
    with its name in ``LATEST``, so that :func:`restore_checkpoint` and :func:`verify_checkpoint` can check them.
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
    _check_state(state, "state")
    _check_extra(extra)
    record = _metadata_record(metadata)
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    # Numbered past every entry, half-written ones included, so a new save never collides with a crash's leftovers.
    number = 1 + max((number for number, _ in _entries(directory)), default=0)
    path = directory / f"{_PREFIX}{number:06d}"

    model, opt_state = _state_parts(state)
    items = {"model": ocp.args.PyTreeSave(_nested(model)), "metadata": ocp.args.JsonSave(record)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.PyTreeSave(
            opt_state, custom_metadata={"treedef": str(jax.tree.structure(opt_state))}
        )
    if extra is not None:
        items["extra"] = ocp.args.PyTreeSave(extra)
    with _checkpointer() as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**items))
    _fsync_tree(path)
    _fsync(directory)  # makes orbax's rename of the temporary directory durable

    write_text_atomic(directory / _POINTER, _pointer_text(path.name, *_file_records(path)))
    _fsync(directory)
    for _, old in _entries(directory):
        if old != path:
            _remove(old)
    for leftover in directory.iterdir():
        if _POINTER_TEMPORARY.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)
    return path


def _restored_opt_state(stored: dict[str, Any], target: Any) -> tuple[bool, Any]:
    """``(restorable, wanted)``: whether the saved optimizer state fits ``target``'s (the same jax tree structure,
    that is the same optimizer, and leaf shapes), and ``target``'s optimizer state (``None`` when it has none)."""
    fields = _data_fields(target)
    wanted = target.opt_state if fields is not None and "opt_state" in fields else None
    saved = stored.get("opt_state")
    if saved is None:  # none saved, or one without arrays (plain SGD's)
        return not jax.tree.leaves(wanted), wanted
    if wanted is None:
        return False, None
    same_optimizer = saved.custom_metadata.get("treedef") == str(jax.tree.structure(wanted))
    return same_optimizer and not _mismatches(saved.tree, wanted, "target"), wanted


def restore_checkpoint(
    directory: str | os.PathLike, target: Any, *, extra_target: dict[str, PyTree] | None = None
) -> tuple[Any, dict[str, PyTree] | None, dict[str, Any]]:
    """Restores the newest checkpoint of ``directory`` into the structure of ``target``.

    Every array of the state takes ``target``'s tree structure, array types and shardings, and keeps its saved dtype
    and value bit for bit: a fresh target's dtypes may differ from the trained state's (batch norm statistics of
    float64 inputs are float64, a fresh state's float32), and casting would lose bits silently; cast the result
    yourself if you want other dtypes. Fields that are not pytree nodes (a ``TrainState``'s ``apply_fn`` and
    ``tx``) are ``target``'s.

    A dataclass state's ``opt_state`` is restored only if the saved one has the same jax tree structure (the same
    optimizer: its state's NamedTuple types) and leaf shapes as ``target.opt_state``; otherwise it is
    ``target.tx.init(params)`` of the restored params, so a checkpoint trained with Adam can be fine-tuned with SGD.
    ``metadata["opt_state_restored"]`` says which happened. Any other pytree (an NNX optimizer's state among them)
    is restored whole or not at all.

    Args:
      directory: a directory written by :func:`save_checkpoint`.
      target: a state of the same kind and model as the saved one, e.g. ``create_train_state(model, key,
        input_shape, tx)`` with any key and any optimizer ``tx``, or a fresh ``nnx.state(model)``; only its
        structure, shapes, array types and shardings are used, so an abstract one from ``jax.eval_shape`` (or
        ``nnx.eval_shape``) saves initializing the model (its arrays land on the default device).
      extra_target: optional ``{name: pytree}`` giving the structure, array types and shardings of the saved extras
        (their dtypes are the saved ones, as for ``target``).
        Without it the extras come back as nested dicts (orbax turns tuples into lists and NamedTuples into dicts
        keyed by field name) of NumPy arrays.

    Returns:
      ``(state, extra, metadata)``: ``target`` with the restored arrays (a new object: an NNX module is rebuilt, not
      updated in place; ``nnx.update(model, state)`` does that); the extras (``None`` if none were saved); the saved
      metadata record (see :func:`save_checkpoint`) plus ``"opt_state_restored"`` (bool).

    Raises:
      FileNotFoundError: if ``directory`` holds no checkpoint.
      CorruptFileError: before anything is read, if a file of the checkpoint fails the check of
        :func:`verify_checkpoint` (skipped for a checkpoint published with a plain-name pointer), or ``LATEST``
        cannot be parsed; and if orbax cannot read the checkpoint (the error names the checkpoint and carries
        orbax's message).
      ValueError: if the saved arrays differ from ``target``'s in names or shapes (a different model, other
        widths, batch norm on one side only, a dataclass state against a plain pytree), if a target without a ``tx``
        does not take the saved optimizer state, or if the saved extras differ from ``extra_target``'s; nothing is
        restored.
    """
    _check_state(target, "target")
    directory = pathlib.Path(directory).absolute()  # orbax needs absolute paths
    path, pointer = _published(directory)
    _verify_files(path, pointer)
    model, _ = _state_parts(target)
    with _checkpointer() as checkpointer:
        stored = _stored_items(checkpointer, path)
        _check_matches(
            stored["model"].tree,
            model,
            "target",
            path,
            "Build target for the model the checkpoint was saved from (the same kind of state, layers and widths, "
            "batch norm on or off alike), e.g. with create_train_state(model, key, input_shape, tx).",
        )
        opt_state_matches, wanted_opt_state = _restored_opt_state(stored, target)
        if not opt_state_matches and not hasattr(target, "tx"):
            raise ValueError(
                f"target's opt_state does not match the checkpoint {path}'s, and target has no tx to initialize "
                "one; build target with the optimizer the checkpoint was saved with."
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

        items = {"model": _restore_request(stored["model"].tree, model), "metadata": ocp.args.JsonRestore()}
        if opt_state_matches and stored.get("opt_state") is not None:
            items["opt_state"] = _restore_request(stored["opt_state"].tree, wanted_opt_state)
        if stored_extra is not None:
            items["extra"] = _restore_request(stored_extra.tree, extra_target)
        restored = _orbax_read(path, lambda: checkpointer.restore(path, ocp.args.Composite(**items)))

    model = _rebuild(restored["model"], model)
    extra = None
    if stored_extra is not None:
        extra = restored["extra"] if extra_target is None else _rebuild(restored["extra"], extra_target)
    metadata = {**restored["metadata"], _RESTORE_KEY: opt_state_matches}
    if _data_fields(target) is None:
        return model["pytree"], extra, metadata
    if "opt_state" in _data_fields(target):
        if not opt_state_matches:
            model["opt_state"] = target.tx.init(model["params"])
        elif "opt_state" in items:
            model["opt_state"] = _rebuild(restored["opt_state"], wanted_opt_state)
    return dataclasses.replace(target, **model), extra, metadata
