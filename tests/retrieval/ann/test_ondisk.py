"""Indexes larger than RAM: IVF-PQ whose inverted lists live in a file beside the index,
built in blocks and merged, opened memory-mapped, grown and tombstoned without loading the
corpus; every answer checked against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.ann import coarse, ondisk, rowscan, tuning
from retrieval.ann import engines as ann
from retrieval.errors import IndexCorruptError, IndexStoreError
from retrieval.models.identity import ModelIdentity
from retrieval.store import (
    ItemRecord,
    StoreOptions,
    layout,
    open_generation,
    update_generation,
    write_generation,
)
from tests.support.oracles import modality_gap_data

DIM = 32
MODEL = ModelIdentity(sha256="cd" * 32, arch="synthetic", embed_dim=DIM)
DISK = StoreOptions(index_kind="ivfpq-disk")


def disk_index(root, count: int = 4000, queries: int = 200):
    """Images 1..count and `queries` texts from the other side of the modality gap."""
    images, captions = modality_gap_data(count, queries, dim=DIM)
    records = [ItemRecord(i + 1, "image", path=f"/img/{i}.png") for i in range(count)]
    records += [ItemRecord(count + i + 1, "text", text=f"caption {i}") for i in range(queries)]
    write_generation(root, MODEL, records, {"image": images, "text": captions}, DISK)
    return images, captions


def recall_against_exact(generation, images, ids, captions, k: int = 10) -> float:
    truth = ids[rowscan.exact_neighbours(images, captions, k)]
    return tuning.recall_at(generation.search("image", captions, k)[1], truth)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(ondisk, "BLOCK_ROWS", 1500)  # several blocks to merge, even here
    monkeypatch.setattr(ondisk, "DISK_PQ_BYTES", (8,))  # 32 codebooks train too long here


def test_a_budget_below_any_in_memory_index_chooses_lists_on_disk():
    # 10M 8-byte codes with their ids (and IndexIDMap2's) need 680 MB in RAM: under that,
    # the codes go to disk
    spec = ann.choose_index(10_000_000, 512, "600MB")
    assert spec.kind == "ivfpq-disk" and spec.memory_bytes <= ann.parse_memory("600MB")
    assert spec.params["lists_bytes"] > ann.parse_memory("600MB")  # the codes live on disk
    assert ann.choose_index(10_000_000, 512, "700MB").kind == "ivfpq"
    with pytest.raises(IndexStoreError, match="even an index with its lists on disk"):
        ann.choose_index(10_000_000, 512, "1MB")


def test_an_on_disk_index_is_built_in_blocks_and_answers_like_exact_search(tmp_path,
                                                                             small_blocks):
    images, captions = disk_index(tmp_path)
    folder = layout.generation_dir(tmp_path, "000001")
    assert (folder / "images.ivfdata").is_file() and not list(folder.glob("*.block-*"))
    with open_generation(tmp_path, MODEL.sha256, DIM) as generation:
        assert ondisk.lists_on_disk(generation.index("image"))
        assert generation.index_spec("image").kind == "ivfpq-disk"
        ids = np.arange(1, len(images) + 1)
        assert recall_against_exact(generation, images, ids, captions) >= 0.9
        tuning = generation.manifest["modalities"]["image"]["tuning"]
        assert tuning["param"] == "nprobe" and tuning["recall_at_10"] >= 0.9


def test_more_lists_than_the_budget_can_train_come_from_two_level_kmeans(tmp_path,
                                                                          small_blocks,
                                                                          monkeypatch):
    # 20,000 vectors want 256 lists and 16,384 training rows; a 1 MB budget leaves a sample
    # of 10,000: the centroids come from two levels over the 16,384, read a chunk at a time
    calls = []
    two_level = coarse.centroids
    monkeypatch.setattr(coarse, "centroids", lambda *a: calls.append(a[1]) or two_level(*a))
    images, captions = modality_gap_data(20_000, 200, dim=DIM)
    records = [ItemRecord(i + 1, "image", path=f"/img/{i}.png") for i in range(len(images))]
    records += [ItemRecord(30_000 + i, "text", text=f"c {i}") for i in range(len(captions))]
    write_generation(tmp_path, MODEL, records, {"image": images, "text": captions},
                     StoreOptions(index_kind="ivfpq-disk", max_memory="1MB"))
    [rows] = calls  # the image index (200 captions are too few for two levels)
    assert len(rows) == 16_384 and (np.diff(rows) > 0).all()
    with open_generation(tmp_path, MODEL.sha256, DIM) as generation:
        index = generation.index("image")
        ivf = faiss.extract_index_ivf(index)
        assert ivf.nlist == 256 and ivf.quantizer.ntotal == 256
        assert ivf.parallel_mode == ann.IVF_PARALLEL_OVER_LISTS  # one query: every core
        ids = np.arange(1, len(images) + 1)
        assert recall_against_exact(generation, images, ids, captions) >= 0.9
        one_by_one = np.vstack([generation.search("image", c[None], 10)[1] for c in captions])
        np.testing.assert_array_equal(one_by_one, generation.search("image", captions, 10)[1])
    assert not list(layout.generation_dir(tmp_path, "000001").glob("*.coarse*"))


def test_the_merge_in_groups_writes_the_file_faiss_own_merge_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ondisk, "MERGE_LISTS", 7)  # several groups, pages released between
    images, _ = modality_gap_data(5000, 1, dim=DIM)
    trained = tmp_path / "trained"
    faiss.write_index(ondisk.train("IVF64,PQ8np", images, ondisk.Training(5000)), str(trained))
    blocks = [tmp_path / f"block-{n}" for n in range(5)]
    for n, block in enumerate(blocks):
        rows = slice(n * 1000, (n + 1) * 1000)
        ondisk.fill_block(trained, images[rows], np.arange(5000)[rows] * 3, block)
    ondisk.merge_blocks(trained, blocks, ondisk.DiskFiles(tmp_path / "m.faiss",
                                                          tmp_path / "m.ivfdata"))
    theirs = faiss.OnDiskInvertedLists(64, 8, str(tmp_path / "theirs.ivfdata"))
    held = [ondisk._block_lists(block) for block in blocks]
    pointers = faiss.InvertedListsPtrVector()
    for holder in held:
        pointers.push_back(faiss.extract_index_ivf(holder).invlists)
    theirs.merge_from_multiple(pointers.data(), pointers.size(), False, False)
    assert (tmp_path / "m.ivfdata").read_bytes() == (tmp_path / "theirs.ivfdata").read_bytes()
    merged = ondisk.load(ondisk.DiskFiles(tmp_path / "m.faiss", tmp_path / "m.ivfdata"))
    assert merged.ntotal == 5000


def test_adding_and_deleting_keep_the_lists_on_disk_and_the_answers_exact(tmp_path,
                                                                            small_blocks):
    images, captions = disk_index(tmp_path)
    extra, _ = modality_gap_data(500, 1, dim=DIM, seed=5)
    name = update_generation(tmp_path, MODEL, add=[
        ItemRecord(10_000 + i, "image", path=f"/new/{i}.png") for i in range(len(extra))],
        add_vectors={"image": extra, "text": np.zeros((0, DIM), np.float32)},
        delete_ids=[1, 2, 3], options=DISK)
    assert not layout.stale_scratch(tmp_path)  # the staged rows are gone
    with open_generation(tmp_path, MODEL.sha256, DIM) as generation:
        assert generation.name == name and ondisk.lists_on_disk(generation.index("image"))
        assert generation.count("image") == len(images) + len(extra) - 3
        found = generation.search("image", extra[:20], 1)[1]
        assert (found[:, 0] == np.arange(10_000, 10_020)).mean() >= 0.9
        all_ids = np.concatenate([np.arange(4, len(images) + 1), np.arange(10_000, 10_500)])
        live = np.concatenate([images[3:], extra])
        assert recall_against_exact(generation, live, all_ids, captions) >= 0.9
        assert not {1, 2, 3} & set(generation.search("image", images[:3], 5)[1].ravel())


def test_big_files_are_sized_at_open_and_hashed_by_verify(tmp_path, small_blocks, monkeypatch,
                                                           capsys):
    from clipdex.main import main
    from retrieval.store import manifest as manifests

    disk_index(tmp_path, count=2000)
    lists = layout.generation_dir(tmp_path, "000001") / "images.ivfdata"
    assert main(["index", "verify", str(tmp_path)]) == 0
    assert main(["index", "info", str(tmp_path)]) == 0
    said = capsys.readouterr().err
    assert "all 8 files match their SHA-256" in said and "image: ivfpq-disk index" in said
    assert "inverted lists on disk, memory-mapped (images.ivfdata" in said
    # one flipped byte in a file above the open-time hashing size: opening checks its size
    # (it passes), `index verify` reads it all and names it
    monkeypatch.setattr(manifests, "HASH_ON_OPEN_BYTES", 1000)
    data = bytearray(lists.read_bytes())
    data[-1] ^= 0xFF
    lists.write_bytes(bytes(data))
    open_generation(tmp_path, MODEL.sha256, DIM).close()
    assert main(["index", "verify", str(tmp_path)]) == 2
    assert "images.ivfdata: SHA-256" in capsys.readouterr().err
    # a truncated one is refused at open, by its size, before anything maps it
    lists.write_bytes(bytes(data[:100]))
    with pytest.raises(IndexCorruptError, match="images.ivfdata has 100 bytes"):
        open_generation(tmp_path, MODEL.sha256, DIM)


def test_exact_neighbours_stream_over_chunks_like_one_scan():
    images, captions = modality_gap_data(3000, 40, dim=DIM)
    whole = rowscan.exact_neighbours(images, captions, 10, chunk=len(images))
    assert (rowscan.exact_neighbours(images, captions, 10, chunk=700) == whole).all()


def test_compacting_keeps_the_index_on_disk_and_deleting_never_compacts_by_itself(
        tmp_path, small_blocks):
    images, _ = disk_index(tmp_path, count=2000)
    many = list(range(1, 800))  # 40 % tombstones: past the automatic compaction ratio
    update_generation(tmp_path, MODEL, delete_ids=many)
    with open_generation(tmp_path, MODEL.sha256, DIM) as generation:
        assert generation.index_spec("image").kind == "ivfpq-disk"
        assert not generation.manifest["build"]["compacted"]
    update_generation(tmp_path, MODEL, compact=True)
    with open_generation(tmp_path, MODEL.sha256, DIM) as generation:
        assert generation.index_spec("image").kind == "ivfpq-disk"
        assert generation.manifest["modalities"]["image"]["rows"] == len(images) - len(many)
        ids, kept = generation.all_vectors("image")  # copied a chunk at a time, in order
        assert ids.tolist() == list(range(len(many) + 1, len(images) + 1))
        np.testing.assert_array_equal(kept, images[len(many):])
    assert not layout.stale_scratch(tmp_path)  # the live rows' scratch copy is gone


def test_a_refused_budget_leaves_no_half_written_generation(tmp_path):
    images, _ = modality_gap_data(2000, 1, dim=DIM)
    records = [ItemRecord(i + 1, "image", path=f"/img/{i}.png") for i in range(len(images))]
    with pytest.raises(IndexStoreError, match="raise --max-memory"):
        write_generation(tmp_path, MODEL, records, {"image": images},
                         StoreOptions(max_memory="1KB"))
    assert list(layout.generations_dir(tmp_path).iterdir()) == []

