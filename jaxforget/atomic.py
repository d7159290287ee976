"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["open_atomic", "write_text_atomic", "write_json_atomic"]


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing; on a clean exit flushes it to disk and renames it over
    ``path``, on an exception removes it and leaves ``path`` as it was."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
