"""Item records and the one builder of linked records (images with their captions), plus
their rows in a generation's items table (schema in `layout.SCHEMA`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.fields.values import check_metadata, storable

# Provisional ids of records built for `append_items` count up from here: below every stored
# id (ids are >= 0), so a link to an item already in the index is never taken for one into
# the new block.
PROVISIONAL_BASE = -(1 << 40)
COLUMNS = "id, modality, path, text, captions, metadata, image_id"


@dataclass
class ItemRecord:
    """One searchable item; caption texts point at their image through `image_id`."""

    id: int
    modality: str  # "image" or "text"
    path: str | None = None
    text: str | None = None
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    image_id: int | None = None


@dataclass(frozen=True)
class NewImage:
    # absolute for indexed files, relative to the index root for uploads; None for an image
    # known only by its embedding and metadata (imported from elsewhere without its file)
    path: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewText:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    image: int | None = None  # position in `images` of the image this captions, if any


@dataclass(frozen=True)
class StreamedRecords:
    """Records too many to hold at once (millions imported from elsewhere): each modality's
    ids, ascending, known up front, and the records themselves produced batch by batch, in
    any order, while the generation's items table is written (`write_generation` checks
    that they were exactly the ids announced)."""

    ids: dict[str, np.ndarray]  # modality -> (n,) ascending int64 ids
    batches: Callable[[], Iterable[Sequence[ItemRecord]]]


def linked_records(images: Sequence[NewImage], texts: Sequence[NewText] = (),
                   start_id: int | None = None,
                   text_start_id: int | None = None) -> list[ItemRecord]:
    """Records with ids from `start_id` (None: provisional ids, for `append_items` to
    allocate) in input order, images first, then texts (from `text_start_id` when given: a
    batch of an import whose texts are numbered after all its images). A text
    naming an image's position is its caption: linked by `image_id`, and listed (in text
    order) in the image record's `captions`. Captions carry no metadata of their own, since
    item metadata reaches clients and must not show the server's layout."""
    start_id = PROVISIONAL_BASE if start_id is None else start_id
    captions: list[list[str]] = [[] for _ in images]
    for text in texts:
        if text.image is not None:
            captions[text.image].append(text.text)
    records = [ItemRecord(start_id + n, "image", path=image.path, captions=captions[n],
                          metadata=image.metadata) for n, image in enumerate(images)]
    first_text = start_id + len(images) if text_start_id is None else text_start_id
    records += [ItemRecord(first_text + n, "text", text=text.text,
                           metadata={} if text.image is not None else text.metadata,
                           image_id=None if text.image is None else start_id + text.image)
                for n, text in enumerate(texts)]
    return records


def image_with_captions(path: str, captions: Sequence[str] = (),
                        metadata: dict[str, Any] | None = None,
                        start_id: int | None = None) -> list[ItemRecord]:
    """One image and its caption texts, linked (ids `start_id`, `start_id + 1`, ...).
    MetadataError when `metadata` holds a value no field can store (it comes from a client)."""
    check_metadata(metadata or {})
    return linked_records([NewImage(path, metadata or {})],
                          [NewText(caption, image=0) for caption in captions], start_id)


def text_records(texts: Sequence[str], image_id: int | None = None,
                 start_id: int | None = None,
                 metadata: dict[str, Any] | None = None) -> list[ItemRecord]:
    """Texts, each a caption of the stored image `image_id` when given, else free texts
    (each with `metadata`: a caption is filtered by its image's). MetadataError when
    `metadata` holds a value no field can store (it comes from a client)."""
    check_metadata(metadata or {})
    start_id = PROVISIONAL_BASE if start_id is None else start_id
    return [ItemRecord(start_id + n, "text", text=text, image_id=image_id,
                       metadata=dict(metadata or {}) if image_id is None else {})
            for n, text in enumerate(texts)]


def insert(db: sqlite3.Connection, records: Iterable[ItemRecord]) -> None:
    db.executemany(
        f"INSERT INTO items ({COLUMNS}, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
        ((r.id, r.modality, r.path, storable(r.text) if r.text is not None else None,
          json.dumps(r.captions),
          json.dumps(r.metadata, default=str), r.image_id) for r in records))


def from_row(row: tuple) -> ItemRecord:
    """A record from a row selected as `COLUMNS`."""
    return ItemRecord(id=row[0], modality=row[1], path=row[2], text=row[3],
                      captions=json.loads(row[4]), metadata=json.loads(row[5]), image_id=row[6])
