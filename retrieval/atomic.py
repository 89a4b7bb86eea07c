"""Atomic file writes: a file is replaced whole or not at all, and survives a power cut.

Every writer in clipdex goes through `replacing`: the new content goes to a temp file of its
own (a unique name beside the target, so two writers never share one), is fsynced, renamed
over the target, and the folder is fsynced so the rename itself is durable. A crash leaves
the old file (and at worst a stray `.NAME.*.tmp` beside it); readers never see half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A fresh temp path beside `path` for the caller (or a library) to write; on a clean exit
    it is fsynced and renamed over `path`, on an error removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(handle)` into a binary temp file that then replaces `path`."""
    with replacing(path) as temp, open(temp, "wb") as handle:
        write(handle)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
