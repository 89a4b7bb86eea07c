"""Filtered search checked against brute force over the filtered subset, for every index kind,
both execution paths (exact scan of the matches, FAISS with an id selector), at selectivities
from 50 % down to 0.01 %: k hits whenever k items match, and recall no worse than the index's
own unfiltered recall."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.errors import BadCursorError
from retrieval.fields.filters import parse_filter
from retrieval.models.identity import ModelIdentity
from retrieval.search.query import Listing, Query
from retrieval.search.searcher import Searcher
from retrieval.store import (
    ItemRecord,
    StoreOptions,
    filtered,
    open_generation,
    update_generation,
    write_generation,
)

DIM, COUNT, K = 8, 20_000, 10  # 8-d: IVF-PQ trains 8 sub-quantizers, fast
MODEL = ModelIdentity(sha256="ef" * 32, arch="synthetic", embed_dim=DIM)
MATCHES = [10_000, 1_000, 100, 10, 2]  # 50 %, 5 %, 0.5 %, 0.05 %, 0.01 %


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(COUNT, DIM)))
    rank = rng.permutation(COUNT)  # "r" < m picks m items scattered over ids and space
    queries = unit(rng.normal(size=(20, DIM)))
    return vectors, rank, queries


@pytest.fixture(scope="module", params=["flat", "hnsw", "ivfpq"])
def generation(request, data, tmp_path_factory):
    vectors, rank, _ = data
    root = tmp_path_factory.mktemp(request.param)
    records = [ItemRecord(i, "image", metadata={"r": int(rank[i]), "odd": bool(i % 2)})
               for i in range(COUNT)]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # training on 2 busy cores: one thread is 2x faster here
    try:
        write_generation(root, MODEL, records, {"image": vectors},
                         StoreOptions(index_kind=request.param))
    finally:
        faiss.omp_set_num_threads(threads)
    with open_generation(root) as generation:
        assert generation.index_spec("image").kind == request.param
        yield generation


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors[ids].T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found, truth)) / truth.size


@pytest.mark.parametrize("path", ["exact", "indexed"])
@pytest.mark.parametrize("matches", MATCHES)
def test_filtered_search_finds_the_exact_top_k_of_the_filtered_set(generation, data, matches,
                                                                   path, monkeypatch):
    vectors, rank, queries = data
    if path == "indexed":  # every filter through FAISS's selector, however few match
        monkeypatch.setitem(filtered.EXACT_BELOW, generation.index_spec("image").kind, 0)
    else:
        monkeypatch.setitem(filtered.EXACT_BELOW, generation.index_spec("image").kind, 10**9)
    where = parse_filter({"field": "r", "lt": matches}, generation.fields())
    within = generation.matching_ids("image", where)
    assert within.tolist() == np.flatnonzero(rank < matches).tolist()
    scores, ids = generation.search("image", queries, K, within=within)
    assert ids.shape == (len(queries), min(K, matches)) and (ids >= 0).all()
    assert all(len(set(row)) == len(row) for row in ids) and np.isin(ids, within).all()
    np.testing.assert_allclose(scores, np.sum(queries[:, None, :] * vectors[ids], axis=2),
                               rtol=1e-4, atol=1e-5)
    truth = exact_top(vectors, within, queries, K)
    unfiltered = generation.search("image", queries, K)[1]
    own_recall = recall(unfiltered, exact_top(vectors, np.arange(COUNT), queries, K))
    if path == "exact" or generation.index_spec("image").kind == "flat":
        assert ids.tolist() == truth.tolist()
    else:
        assert recall(ids, truth) >= min(own_recall, 0.95) - 0.02, (recall(ids, truth),
                                                                     own_recall)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("small")
    records = [ItemRecord(i, "image", metadata={"odd": bool(i % 2), "n": i}) for i in range(60)]
    write_generation(root, MODEL, records, {"image": unit(rng.normal(size=(60, DIM)))})
    update_generation(root, MODEL, delete_ids=[1, 3, 5], compact=False)
    with open_generation(root) as generation:
        yield Searcher(generation, max_depth=100)


def test_pages_of_a_filtered_query_cover_the_filtered_ranking_once(small):
    vector = unit(np.ones((1, DIM)))[0].tolist()
    odd = {"field": "odd", "eq": True}
    whole = small.search(Query.vector(vector, k=100, filter=odd)).hits
    assert [hit.id for hit in whole] and all(hit.item.metadata["odd"] for hit in whole)
    assert len(whole) == 27 and not {1, 3, 5} & {hit.id for hit in whole}  # tombstones stay out
    seen, cursor = [], None
    while True:
        page = small.search(Query.vector(vector, k=4, filter=odd, cursor=cursor))
        seen += [hit.id for hit in page.hits]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [hit.id for hit in whole]
    first = small.search(Query.vector(vector, k=4, filter=odd))
    with pytest.raises(BadCursorError):  # a cursor is bound to its filter
        small.search(Query.vector(vector, k=4, filter={"field": "odd", "eq": False},
                                  cursor=first.next_cursor))


def test_a_filter_with_no_matches_answers_no_hits_and_one_match_exactly_it(small):
    vector = unit(np.ones((1, DIM)))[0].tolist()
    assert small.search(Query.vector(vector, filter={"field": "n", "gt": 100})).hits == []
    hits = small.search(Query.vector(vector, filter={"field": "n", "eq": 42})).hits
    assert [hit.id for hit in hits] == [42]


def test_browse_pages_through_a_filter_newest_first_or_by_a_field(small):
    odd = {"field": "odd", "eq": True}
    newest = small.browse(Listing(filter=odd, k=5))
    assert [hit.id for hit in newest.hits] == [59, 57, 55, 53, 51]
    assert all(hit.score is None for hit in newest.hits)
    seen, cursor = [], None
    while True:
        page = small.browse(Listing(filter=odd, order_by="n", descending=False, k=10,
                                    cursor=cursor))
        seen += [hit.id for hit in page.hits]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [i for i in range(60) if i % 2 and i not in (1, 3, 5)]
    with pytest.raises(BadCursorError):  # bound to its listing
        small.browse(Listing(filter=odd, k=5, descending=False, cursor=newest.next_cursor))
