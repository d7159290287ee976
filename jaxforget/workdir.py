"""The files of one seed's workdir: keyed, checksummed, locked reads and writes of the stages' outputs.

Every output's name carries the key of the settings it was computed with (:func:`jaxforget.settings.stage_key`), so
two configurations never share a path and switching back to earlier settings reuses their outputs::

    seed-0/
      .lock                                   the advisory lock of the run using this directory (its pid inside)
      train.<key>.json                        a stage record (below)
      poisoned.<key>/, retrained.<key>/       orbax checkpoints, verified by their own manifests
      poisoned.<key>.json, retrained.<key>.json   one record per model: a killed train stage resumes after the last
      curvature.<key>.json, curvature.<key>.npz
      select.<key>.json, masks.<key>.npz
      unlearn.<key>.json, unlearned/<selection>--<update>.<key>.{json,npz}
      evaluate.<key>.json

A record is JSON: ``{"key": ..., "files": {path: digest}, "inputs": {record: sha256}, ...}``. ``files`` are the
outputs it describes (the SHA-256 of an array file, the digest of a checkpoint); ``inputs`` are the records of the
outputs it was computed from, by the SHA-256 of their bytes, so a recomputed input makes it stale. :meth:`record`
returns a record only if all of these still hold; a record that is unreadable, belongs to other settings, or
describes a file that is missing or changed is reported in one line and treated as absent, so the stage that wrote
it is recomputed (and, as their inputs changed, the stages after it).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pathlib
import sys
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxforget import checkpoint
from jaxforget.atomic import CorruptFileError, open_atomic, sha256_file, write_json_atomic

__all__ = ["Workdir", "WorkdirBusyError", "print_notice"]

PyTree = Any
_LOCK = ".lock"
_HELD: dict[str, int] = {}  # lock files this process holds, by path, with their nesting depth


class WorkdirBusyError(ValueError):
    """Another process holds the workdir's lock and the caller chose not to wait."""


def print_notice(message: str) -> None:
    """Prints ``jaxforget: <message>`` on standard error: the one-line notices of the workdir and the stages."""
    print(f"jaxforget: {message}", file=sys.stderr, flush=True)


class Workdir:
    """One seed's directory of stage outputs.

    Args:
      root: the directory (created by :meth:`lock` or the first write).
      notice: called with a one-line message when an output fails its check and will be recomputed, or when
        :meth:`lock` waits; default: printed to standard error.
    """

    def __init__(self, root: str | os.PathLike, notice: Callable[[str], None] = print_notice):
        self.root = pathlib.Path(root)
        self.notice = notice

    # ------------------------------------------------------------------------------------------------------------
    # Paths.

    def path(self, name: str, key: str, suffix: str = "") -> pathlib.Path:
        """The path of output ``name`` under settings ``key``: ``root/<name>.<key><suffix>``."""
        return self.root / f"{name}.{key}{suffix}"

    def _relative(self, path: pathlib.Path) -> str:
        return path.relative_to(self.root).as_posix()

    # ------------------------------------------------------------------------------------------------------------
    # Records.

    def record(self, name: str, key: str, *, then: str | None = None, report_stale: bool = True) -> dict | None:
        """The record of ``name`` under ``key`` if it exists and every check holds, else None.

        A record that exists but fails a check is reported through ``notice`` as one line ending in ``then``
        (default: ``"recomputing <name>"``; stale inputs only when ``report_stale``).
        """
        path = self.path(name, key, ".json")
        if not path.exists():
            return None
        record, problem, stale = self._check(path, key)
        if problem is not None:
            if report_stale or not stale:
                self.notice(f"{problem}; {then or f'recomputing {name}'}")
            return None
        return record

    def _check(self, path: pathlib.Path, key: str) -> tuple[dict | None, str | None, bool]:
        """``(record, problem, stale)``: the record and None if it holds, else a one-line problem."""
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return None, f"{path} is unreadable ({type(error).__name__}: {error})", False
        if not isinstance(record, dict) or record.get("key") != key:
            return None, f"{path} was not written for these settings", False
        try:
            for relative, digest in record.get("files", {}).items():
                self.verify(relative, digest)
        except CorruptFileError as error:
            return None, str(error), False
        for relative, digest in record.get("inputs", {}).items():
            source = self.root / relative
            if not source.is_file() or sha256_file(source) != digest:
                return None, f"{source} changed since {path.name} was computed from it", True
        return record, None, False

    def write_record(
        self,
        name: str,
        key: str,
        record: dict,
        *,
        files: dict[str, str] | None = None,
        inputs: tuple[tuple[str, str], ...] = (),
    ) -> dict:
        """Writes ``record`` as the record of ``name`` under ``key``, atomically, and returns what it wrote.

        Args:
          files: ``{path relative to root: digest}`` of the outputs it describes (from :meth:`save_trees` or
            :meth:`checkpoint_digest`).
          inputs: ``(name, key)`` of the records this output was computed from.
        """
        sources = {}
        for source_name, source_key in inputs:
            source = self.path(source_name, source_key, ".json")
            sources[self._relative(source)] = sha256_file(source)
        full = {"key": key, **record, "files": dict(files or {}), "inputs": sources}
        write_json_atomic(self.path(name, key, ".json"), full)
        return full

    # ------------------------------------------------------------------------------------------------------------
    # Arrays and checkpoints.

    def save_trees(self, name: str, key: str, trees: dict[str, PyTree]) -> tuple[str, str]:
        """Saves ``{name: pytree}`` as ``<name>.<key>.npz``, atomically; returns ``(relative path, sha256)``."""
        arrays = {}
        for tree_name, tree in trees.items():
            for index, leaf in enumerate(jax.tree.leaves(tree)):
                arrays[f"{tree_name}/{index}"] = np.asarray(leaf)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = self.path(name, key, ".npz")
        with open_atomic(path, "wb") as stream:
            stream.write(buffer.getvalue())
        return self._relative(path), sha256_file(path)

    def load_trees(self, relative: str, digest: str, like: PyTree) -> dict[str, PyTree]:
        """The pytrees saved by :meth:`save_trees` at ``relative``, each shaped like ``like``, after checking that
        the file's SHA-256 is ``digest``.

        Raises:
          CorruptFileError: if the file is missing, unreadable, or not the one recorded.
        """
        self.verify(relative, digest)
        return load_npz(self.root / relative, like)

    def checkpoint_dir(self, name: str, key: str) -> pathlib.Path:
        """The checkpoint directory of model ``name`` under ``key``."""
        return self.path(name, key)

    def checkpoint_digest(self, directory: pathlib.Path) -> tuple[str, str]:
        """``(relative path, digest)`` of the checkpoint in ``directory``, for a record's ``files``."""
        return self._relative(directory), checkpoint.verify_checkpoint(directory)

    def verify(self, relative: str, digest: str) -> None:
        """Checks that the output at ``relative`` has ``digest`` (a checkpoint directory: its manifest's digest).

        Raises:
          CorruptFileError: naming the file and what is wrong with it.
        """
        path = self.root / relative
        if path.is_dir():
            found = checkpoint.verify_checkpoint(path)
        elif path.is_file():
            found = sha256_file(path)
        else:
            raise CorruptFileError(path, "it is missing")
        if found != digest:
            raise CorruptFileError(path, "its content differs from the checksum recorded when it was written")

    # ------------------------------------------------------------------------------------------------------------
    # The lock.

    @contextlib.contextmanager
    def lock(self, *, wait: bool = True) -> Iterator[Workdir]:
        """Holds the directory's advisory lock (``fcntl.flock`` on ``root/.lock``) for the ``with`` block.

        A second process waits (with one ``notice``) or, with ``wait=False``, raises :class:`WorkdirBusyError`
        at once. The same process may nest ``lock`` calls. If the block fails and the directory holds nothing but
        the lock, the directory and the parents this call created are removed again.
        """
        path = self.root / _LOCK
        held = str(path.absolute())
        if held in _HELD:
            _HELD[held] += 1
            try:
                yield self
            finally:
                _HELD[held] -= 1
            return
        created = [folder for folder in (self.root, *self.root.parents) if not folder.exists()]
        descriptor = self._acquire(path, wait)
        _HELD[held] = 1
        try:
            yield self
        except BaseException:
            if created and {p.name for p in self.root.iterdir()} <= {_LOCK}:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    for folder in created:  # innermost first; stops at the first one that is not empty
                        folder.rmdir()
            raise
        finally:
            del _HELD[held]
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)

    def _acquire(self, path: pathlib.Path, wait: bool) -> int:
        while True:
            self.root.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
                if not wait:
                    os.close(descriptor)
                    raise WorkdirBusyError(
                        f"--workdir: {self.root} is in use by another jaxforget run (pid {holder}); wait for it "
                        "(drop --no-wait), or choose another --workdir."
                    ) from None
                self.notice(f"waiting for the jaxforget run with pid {holder}, which is using {self.root}")
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:  # the holder may have removed the lock file (and its empty directory) when it failed
                same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
                return descriptor
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)


def load_npz(path: pathlib.Path, like: PyTree) -> dict[str, PyTree]:
    """The pytrees in the ``.npz`` at ``path`` (as :meth:`Workdir.save_trees` writes them), by name, each with the
    structure of ``like``.

    Raises:
      CorruptFileError: if the file cannot be read as such an archive.
    """
    treedef = jax.tree.structure(like)
    try:
        with np.load(path) as stored:
            names = sorted({key.split("/")[0] for key in stored.files})
            return {
                name: jax.tree.unflatten(treedef, [stored[f"{name}/{i}"] for i in range(treedef.num_leaves)])
                for name in names
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise CorruptFileError(path, f"it cannot be read as saved arrays ({type(error).__name__}: {error})") from error
