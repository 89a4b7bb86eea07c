"""A generation written from records produced batch by batch and vectors read memory-mapped:
how an import of millions of embeddings stays within its memory."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import IndexStoreError
from retrieval.models.identity import ModelIdentity
from retrieval.store import (
    ItemRecord,
    StagedRows,
    StreamedRecords,
    current_name,
    layout,
    open_generation,
    write_generation,
)

DIM = 8
MODEL = ModelIdentity(sha256="cd" * 32, arch="synthetic", embed_dim=DIM)


def staged(root, name, rows: np.ndarray) -> StagedRows:
    rows_file = StagedRows(root, name, DIM, capacity=len(rows) + 3)  # room left over
    with rows_file:
        rows_file.write(rows[:2])
        rows_file.write(rows[2:])
    return rows_file


def test_streamed_records_and_mapped_vectors_make_the_same_generation(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, DIM)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images[:2].copy()
    vectors = {"image": staged(tmp_path, "i", images).rows(),
               "text": staged(tmp_path, "t", texts).rows()}
    assert isinstance(vectors["image"], np.memmap) and len(vectors["image"]) == 4

    def batches():  # in any order, records of both modalities mixed
        yield [ItemRecord(3, "image", path="/p/3.jpg"), ItemRecord(5, "text", text="one",
                                                                   image_id=1)]
        yield [ItemRecord(i, "image", path=f"/p/{i}.jpg") for i in (1, 2, 4)]
        yield [ItemRecord(6, "text", text="two", metadata={"album": "x"})]

    ids = {"image": np.arange(1, 5), "text": np.array([5, 6])}
    write_generation(tmp_path, MODEL, StreamedRecords(ids, batches), vectors)
    with open_generation(tmp_path) as generation:
        assert generation.next_id == 7 and generation.count("image") == 4
        scores, found = generation.search("image", images[2:3], 1)
        assert found[0, 0] == 3 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        text, = generation.items([6])
        assert text.text == "two" and text.metadata == {"album": "x"}


def test_streamed_records_that_miss_their_announced_ids_are_refused(tmp_path):
    vectors = {"image": np.eye(DIM, dtype=np.float32)[:3], "text": np.zeros((0, DIM))}
    ids = {"image": np.array([1, 2, 3]), "text": np.zeros(0, np.int64)}
    short = StreamedRecords(ids, lambda: [[ItemRecord(1, "image"), ItemRecord(2, "image")]])
    with pytest.raises(IndexStoreError, match="do not match their ids"):
        write_generation(tmp_path, MODEL, short, vectors)
    assert not layout.current_file(tmp_path).exists()
    unsorted = StreamedRecords({"image": np.array([2, 1, 3])}, list)
    with pytest.raises(IndexStoreError, match="ascending"):
        write_generation(tmp_path, MODEL, unsorted, vectors)
    write_generation(tmp_path, MODEL, StreamedRecords(ids, lambda: [
        [ItemRecord(i, "image") for i in (1, 2, 3)]]), vectors)
    assert current_name(tmp_path) is not None


def test_staged_rows_refuse_more_than_their_capacity(tmp_path):
    rows = StagedRows(tmp_path, "x", DIM, capacity=2)
    with rows, pytest.raises(IndexStoreError, match="more than 2 rows"):
        rows.write(np.zeros((3, DIM), np.float32))
    rows.remove()
    assert not rows.path.exists()
