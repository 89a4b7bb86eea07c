"""What an indexing job's finished shards hold, read back without ever holding all of it: the
kept embeddings copied a shard at a time into the index's work folder (the store reads them
memory-mapped), and the item records made a batch of images at a time while the store writes
its items table. A build of 10,000,000 images would otherwise gather 20 GB of float32 vectors
and ten million records in memory before writing a byte.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.inputs.captions import Skipped
from retrieval.store import (
    ItemRecord,
    JobFolder,
    NewImage,
    NewText,
    Shard,
    StagedRows,
    StreamedRecords,
    linked_records,
)

RECORD_BATCH = 1 << 16  # image positions whose records (and captions) make one batch
PREFIXES = {"images": "image", "texts": "text"}  # a job's shard prefix -> the store's modality

# (text, metadata, position of the image it captions or None); captions come first, in image
# order, then the free texts
JobText = tuple[str, dict[str, Any], int | None]


@dataclass(frozen=True)
class FinishedShards:
    """A job's finished shards of each prefix (number -> kept positions and problems)."""

    shards: dict[str, dict[int, Shard]]

    def positions(self, prefix: str) -> np.ndarray:
        """The kept positions of `prefix`, ascending (shards hold consecutive positions)."""
        parts = [self.shards[prefix][n].positions for n in sorted(self.shards[prefix])]
        return np.array([p for part in parts for p in part], dtype=np.int64)

    def problems(self) -> list[Skipped]:
        return [x for prefix in PREFIXES
                for n in sorted(self.shards[prefix]) for x in self.shards[prefix][n].problems]


@contextmanager
def staged(work: JobFolder, root: Path, encoded: FinishedShards, dim: int
           ) -> Iterator[dict[str, np.ndarray]]:
    """Each modality's kept embeddings, in position order, copied a shard at a time into
    DIR/work/staged-<job>-<modality>.npy and yielded memory-mapped; removed on the way out."""
    files = {}
    try:
        for prefix, modality in PREFIXES.items():
            shards = encoded.shards[prefix]
            files[modality] = StagedRows(root, f"{work.path.name}-{modality}", dim,
                                         sum(len(s.positions) for s in shards.values()))
            with files[modality] as rows:
                for number in sorted(shards):
                    kept = len(shards[number].positions)
                    if kept:
                        rows.write(work.vectors(prefix, number, kept))
        yield {modality: rows.rows() for modality, rows in files.items()}
    finally:
        for rows in files.values():
            rows.remove()


def streamed_records(images: Sequence[Any], texts: Sequence[JobText], encoded: FinishedShards,
                     first_id: int) -> StreamedRecords:
    """The records of a new generation, ids from `first_id` (kept images in input order,
    then kept texts), made a batch at a time as the store asks for them."""
    image_pos, text_pos = encoded.positions("images"), encoded.positions("texts")
    ids = {"image": first_id + np.arange(len(image_pos), dtype=np.int64),
           "text": first_id + len(image_pos) + np.arange(len(text_pos), dtype=np.int64)}
    return StreamedRecords(ids, lambda: record_batches(images, texts, image_pos, text_pos,
                                                       first_id))


def record_batches(images: Sequence[Any], texts: Sequence[JobText], image_pos: np.ndarray,
                   text_pos: np.ndarray, first_id: int) -> Iterator[list[ItemRecord]]:
    """Records RECORD_BATCH image positions at a time, with their captions (a contiguous run
    of texts), then the free texts as many at a time. A caption links to its image when the
    image was kept, else it stays as a text of its own."""
    captions = np.zeros(len(images) + 1, np.int64)  # text position of each image's first
    np.cumsum([len(entry.captions) for entry in images], out=captions[1:])
    spans = [(start, min(start + RECORD_BATCH, len(images)))
             for start in range(0, len(images), RECORD_BATCH)]
    runs = [(int(captions[a]), int(captions[b])) for a, b in spans]
    runs += [(start, min(start + RECORD_BATCH, len(texts)))
             for start in range(int(captions[-1]), len(texts), RECORD_BATCH)]
    spans += [(len(images), len(images))] * (len(runs) - len(spans))  # free texts: no images
    for (start, end), (first, last) in zip(spans, runs):
        low, high = np.searchsorted(image_pos, [start, end])
        t_low, t_high = np.searchsorted(text_pos, [first, last])
        kept = image_pos[low:high]
        new_texts = [_text(texts[position], kept) for position in text_pos[t_low:t_high].tolist()]
        new_images = [NewImage(str(images[p].path), images[p].metadata) for p in kept.tolist()]
        if new_images or new_texts:
            yield linked_records(new_images, new_texts, start_id=first_id + int(low),
                                 text_start_id=first_id + len(image_pos) + int(t_low))


def _text(text: JobText, kept: np.ndarray) -> NewText:
    """A job's text as a record's: linked to its image's place among `kept` when kept."""
    words, metadata, owner = text
    at = int(np.searchsorted(kept, owner)) if owner is not None else len(kept)
    return NewText(words, metadata, at if at < len(kept) and kept[at] == owner else None)
