"""Paths inside an index directory that are not generations: the images added through the
service's admin API. Stored item paths are relative to the index root for these (so the
directory can move, and no response shows the server's file system), absolute for files
the indexer read from their own folders."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

UPLOADS = "uploads"


def upload_path(data: bytes, suffix: str) -> str:
    """Where an uploaded image is kept, relative to the index root: named by its content, so
    the same bytes are the same file (and the same item)."""
    return f"{UPLOADS}/{hashlib.sha256(data).hexdigest()[:32]}{suffix}"


def keep_upload(root: Path, stored: str, data: bytes) -> None:
    """Write an upload atomically (temp file, fsync, rename): a crash leaves it whole or absent."""
    path = Path(root) / stored
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def resolve_stored(root: Path | None, stored: str | None) -> Path | None:
    """The file an item's stored path names (relative ones are under the index root), or
    None when it is gone."""
    if not stored:
        return None
    path = Path(stored)
    if not path.is_absolute():
        if root is None:
            return None
        path = Path(root) / path
    return path if path.is_file() else None
