"""Safe files: atomic writes (a reader sees the old file or the new one, never half of one), created with the
permissions the umask allows, content checksums, and the error for a file that fails its check."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["open_atomic", "write_text_atomic", "write_json_atomic", "sha256_file", "CorruptFileError"]


class CorruptFileError(ValueError):
    """A file that is unreadable, truncated, or whose content differs from the checksum recorded when it was written.

    Attributes:
      path: the file (or checkpoint directory) that failed its check.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = pathlib.Path(path)
        super().__init__(f"{self.path} is corrupt: {reason}")


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would create files with: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing; on a clean exit flushes it to disk and renames it over
    ``path``, on an exception removes it and leaves ``path`` as it was. The file gets the permissions a plain
    ``open`` would give it under the current umask (not ``mkstemp``'s private 0600)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, _file_mode())
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` to a temporary file beside ``path``, flushes it to disk, then renames it over ``path``."""
    with open_atomic(path, "w") as stream:
        stream.write(text)
    return pathlib.Path(path)


def write_json_atomic(path: str | os.PathLike, record: Any) -> pathlib.Path:
    """Writes ``record`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of the bytes of the file at ``path``, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
