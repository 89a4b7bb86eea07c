"""Which files a generation may serve: the media roots the operator named, and the checks an
item's stored path must pass before its bytes leave the service.

A stored path is data, and data can come from strangers: an embedding pack's metadata
(LAION's are public) names whatever it likes, `/etc/passwd` or `../../key` included. So a
file is served only when, after links and `..` are resolved, it lies under a media root and
its first bytes sniff as an image:

- the folders an index was built from (each indexing job adds its folders; a manifest adds
  the folders of the images it names), inherited by every later generation;
- the `--media-root` folders an import of embeddings was given;
- the index's own `uploads/` (images added through the service).

A generation written before roots were recorded serves from its build's source folders.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from retrieval.inputs import images as _registers_heic  # noqa: F401  (sniff opens HEIC)
from retrieval.store import layout

# Formats the indexer decodes and browsers show; anything else is not served as an image.
SERVABLE_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png",
                    "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp",
                    "TIFF": "image/tiff", "HEIF": "image/heic", "AVIF": "image/avif"}


def real(path: str | Path) -> Path:
    """`path` with every link and `..` resolved (strict=False: it need not exist)."""
    return Path(os.path.realpath(path))


def cover(folders: Iterable[str | Path]) -> list[str]:
    """The fewest resolved folders that hold all of `folders` (a folder inside another one
    is dropped), sorted: what a manifest records."""
    kept: list[Path] = []
    for folder in sorted({real(f) for f in folders}, key=lambda p: len(p.parts)):
        if not any(folder.is_relative_to(top) for top in kept):
            kept.append(folder)
    return sorted(str(folder) for folder in kept)


def within(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether `path`, resolved, lies under one of `roots`, resolved."""
    resolved = real(path)
    return any(resolved.is_relative_to(real(root)) for root in roots)


def recorded_roots(data: dict[str, Any]) -> list[str]:
    """A manifest's media roots; for a generation written before they were recorded, the
    folders among its build's sources (never an import's embedding folder)."""
    if "media_roots" in data:
        return list(data["media_roots"])
    build = data.get("build") or {}
    return cover(s for s in build.get("sources", []) if Path(s).is_dir())


def servable(index_root: Path, stored: str | None, roots: Iterable[str | Path]
             ) -> tuple[Path, str] | None:
    """(file, media type) of an item's stored path when it may be served, else None: the
    path resolves under a media root (or the index's uploads), is a regular file, and its
    header is an accepted image format. Only the header is read."""
    if not stored:
        return None
    path = Path(stored)
    if not path.is_absolute():
        path = Path(index_root) / path
    if not within(path, [*roots, Path(index_root) / layout.UPLOADS]):
        return None
    resolved = real(path)
    if not resolved.is_file():
        return None
    media_type = sniff(resolved)
    return None if media_type is None else (resolved, media_type)


def sniff(path: Path) -> str | None:
    """The media type of an image file by its header (None: not an accepted image)."""
    try:
        with warnings.catch_warnings():  # a huge image is not served decoded: size is moot
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return SERVABLE_FORMATS.get(str(image.format))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
