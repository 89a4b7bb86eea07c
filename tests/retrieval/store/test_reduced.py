"""The reduced copy an HNSW generation keeps for filtered searches of middling selectivity:
tuned on the generation's own vectors when it is written, and checked here against brute
force over the filtered subset, like every other filtered path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from retrieval.errors import IndexCorruptError
from retrieval.fields.filters import parse_filter
from retrieval.models.identity import ModelIdentity
from retrieval.store import ItemRecord, StoreOptions, layout, open_generation, reduced
from retrieval.store import write_generation as write

DIM, COUNT, K = 64, 20_000, 10
MODEL = ModelIdentity(sha256="cd" * 32, arch="synthetic", embed_dim=DIM)
MATCHES = [10_000, 1_000, 100, 10, 2]  # 50 %, 5 %, 0.5 %, 0.05 %, 0.01 %


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clip_like(count: int, captions: int, rng: np.random.Generator):
    """Images on a low-dimensional concept space plus a little noise, and noisy captions of
    some of them across a modality gap (what real embeddings look like, unlike i.i.d. noise)."""
    concepts = rng.normal(size=(count, 8)) @ rng.normal(size=(8, DIM))
    concepts += 0.3 * rng.normal(size=(count, DIM))
    gap = rng.normal(size=DIM)
    picked = rng.choice(count, captions, replace=False)
    return (unit(concepts + gap),
            unit(concepts[picked] + rng.normal(size=(captions, DIM)) - gap))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images, captions = clip_like(COUNT, 320, rng)
    return images, captions[:300], captions[300:], rng.permutation(COUNT)


@pytest.fixture(scope="module")
def generation(data, tmp_path_factory):
    images, texts, _, rank = data
    records = [ItemRecord(i, "image", metadata={"r": int(rank[i])}) for i in range(COUNT)]
    records += [ItemRecord(COUNT + i, "text", text=f"caption {i}") for i in range(len(texts))]
    root = tmp_path_factory.mktemp("reduced")
    write(root, MODEL, records, {"image": images, "text": texts},
          StoreOptions(index_kind="hnsw"))
    with open_generation(root) as generation:
        yield generation


def test_an_hnsw_generation_keeps_a_reduced_copy_tuned_on_its_own_cross_modal_queries(
        generation):
    section = generation.manifest["modalities"]["image"]["reduced"]
    assert section["components"] in reduced.DIMS and section["components"] <= DIM // 2
    assert section["rerank"] in reduced.RERANK_GRID
    assert section["query_source"] == "cross-modal"
    assert section["recall_at_10"] >= 0.9 and section["tuning_recall_at_10"] >= 0.95


@pytest.mark.parametrize("matches", MATCHES)
def test_a_filtered_search_through_the_reduced_copy_finds_the_exact_top_k(
        generation, data, matches, monkeypatch):
    images, _, queries, _ = data
    scanned = []
    search = reduced.Reduced.search

    def spy(self, *args):
        scanned.append(len(args[-1]))
        return search(self, *args)

    monkeypatch.setattr(reduced.Reduced, "search", spy)
    within = generation.matching_ids("image", parse_filter({"field": "r", "lt": matches},
                                                           generation.fields()))
    scores, ids = generation.search("image", queries, K, within=within)
    assert scanned == [matches]  # the reduced scan answered, over the matches only
    assert ids.shape == (len(queries), min(K, matches)) and np.isin(ids, within).all()
    np.testing.assert_allclose(scores, np.sum(queries[:, None, :] * images[ids], axis=2),
                               rtol=1e-4, atol=1e-5)  # exact scores, best first
    assert (np.diff(scores, axis=1) <= 0).all()
    truth = within[np.argsort(-(queries @ images[within].T), axis=1)[:, :K]]
    found = sum(len(set(a) & set(b)) for a, b in zip(ids, truth)) / truth.size
    assert found >= 0.95


def test_a_page_deeper_than_the_re_rank_is_still_whole_and_exact(generation, data):
    images, _, queries, rank = data
    within = np.flatnonzero(rank < 5_000)
    scores, ids = generation.search("image", queries[:2], 300, within=within)
    assert ids.shape == (2, 300) and all(len(set(row)) == 300 for row in ids)
    np.testing.assert_allclose(scores, np.sum(queries[:2, None, :] * images[ids], axis=2),
                               rtol=1e-4, atol=1e-5)


def test_without_captions_the_copy_is_tuned_on_the_images_themselves(data, tmp_path):
    images = data[0]
    section = reduced.build(images, np.arange(COUNT), np.zeros((0, DIM), np.float32), "hnsw",
                            (tmp_path / "p.npz", tmp_path / "r.npy"))
    assert section is not None and section["query_source"] == "own rows"
    loaded = reduced.load((tmp_path / "p.npz", tmp_path / "r.npy"), section)
    assert loaded.rows.shape == (COUNT, section["components"])


def test_no_copy_when_reduced_scores_cannot_hold_the_neighbours(tmp_path):
    noise = unit(np.random.default_rng(1).normal(size=(COUNT, DIM)))  # variance everywhere
    files = (tmp_path / "p.npz", tmp_path / "r.npy")
    assert reduced.build(noise, np.arange(COUNT), noise[:100], "hnsw", files) is None
    assert not files[1].exists()
    assert reduced.build(noise, np.arange(COUNT), noise[:100], "ivfpq", files) is None


def test_no_copy_beyond_what_the_memory_budget_leaves_beside_the_index(data, tmp_path):
    images, texts = data[0], data[1]
    files = (tmp_path / "p.npz", tmp_path / "r.npy")
    smallest = 4 * reduced.DIMS[0] * COUNT  # bytes of the smallest copy
    assert reduced.build(images, np.arange(COUNT), texts, "hnsw", files, smallest - 1) is None
    section = reduced.build(images, np.arange(COUNT), texts, "hnsw", files, smallest)
    assert section is not None and section["components"] == reduced.DIMS[0]


def test_a_reduced_copy_that_does_not_fit_its_generation_is_reported_as_corrupt(generation,
                                                                               tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(generation.root, root)
    path = layout.modality_files(layout.generation_dir(root, generation.name), "image").reduced
    np.save(path, np.load(path)[:-1])  # one row short
    with pytest.raises(IndexCorruptError, match="images.reduced.npy has 19999 rows"):
        open_generation(root, verify_checksums=False)
    path.write_bytes(b"not an array")
    with pytest.raises(IndexCorruptError, match="images.reduced.npy: unreadable"):
        open_generation(root, verify_checksums=False)
