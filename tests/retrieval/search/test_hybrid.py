"""Keyword (BM25 over SQLite FTS5) and hybrid (reciprocal rank fusion) search on a real
generation: a rare word only in a caption or a file name finds its item at rank 1 where vector
search does not, fusion is deterministic and follows its formula, and filters apply to all
three modes."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InvalidQueryError
from retrieval.models.identity import ModelIdentity
from retrieval.search.hybrid import RRF_K, fuse
from retrieval.search.query import Query
from retrieval.search.searcher import Searcher
from retrieval.store import ItemRecord, open_generation, write_generation

DIM, COUNT = 8, 150  # fewer than HYBRID_DEPTH: every item has a vector rank
MODEL = ModelIdentity(sha256="12" * 32, arch="synthetic", embed_dim=DIM)
NAMED, CAPTIONED = 123, 77  # the file name / the caption holding a rare word


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("hybrid")
    records = []
    for i in range(COUNT):
        name = "beach_zyzzyva.png" if i == NAMED else f"img_{i}.png"
        caption = "a quokka on a bench" if i == CAPTIONED else f"a photo of a beach, number {i}"
        records.append(ItemRecord(i, "image", path=f"/photos/{name}", captions=[caption],
                                  metadata={"even": i % 2 == 0}))
    write_generation(root, MODEL, records, {"image": unit(rng.normal(size=(COUNT, DIM)))})
    with open_generation(root) as generation:
        yield Searcher(generation)


@pytest.fixture(scope="module")
def query_vector(searcher):
    """A query whose vector ranking puts neither rare-word item first."""
    rng = np.random.default_rng(9)
    while True:
        vector = unit(rng.normal(size=(1, DIM)))[0]
        top = searcher.search(Query.vector(vector.tolist(), k=1)).hits[0].id
        if top not in (NAMED, CAPTIONED):
            return vector.tolist()


@pytest.mark.parametrize("word,item", [("zyzzyva", NAMED), ("Quokka!", CAPTIONED)])
def test_a_rare_word_wins_in_hybrid_where_vector_search_misses_it(searcher, query_vector,
                                                                  word, item):
    vector = searcher.search(Query.vector(query_vector, k=5)).hits
    assert vector[0].id != item
    hybrid = searcher.search(Query.vector(query_vector, k=5, mode="hybrid", keywords=word))
    top = hybrid.hits[0]
    assert top.id == item and top.keyword_rank == 1 and top.vector_rank is not None
    assert top.score == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + top.vector_rank))
    second = hybrid.hits[1]  # the vector ranking's first, which has no keyword rank
    assert (second.id, second.vector_rank, second.keyword_rank) == (vector[0].id, 1, None)
    again = searcher.search(Query.vector(query_vector, k=5, mode="hybrid", keywords=word))
    assert [(h.id, h.score) for h in again.hits] == [(h.id, h.score) for h in hybrid.hits]
    keyword = searcher.search(Query.vector(query_vector, mode="keyword", keywords=word)).hits
    assert [hit.id for hit in keyword] == [item] and keyword[0].score > 0


def test_filters_apply_to_keyword_and_hybrid_modes(searcher, query_vector):
    odd = {"field": "even", "eq": False}  # NAMED (123) is odd, CAPTIONED (77) odd too
    even = {"field": "even", "eq": True}
    hits = searcher.search(Query.vector(query_vector, mode="keyword", keywords="zyzzyva",
                                        filter=odd)).hits
    assert [hit.id for hit in hits] == [NAMED]
    assert searcher.search(Query.vector(query_vector, mode="keyword", keywords="zyzzyva",
                                        filter=even)).hits == []
    hybrid = searcher.search(Query.vector(query_vector, k=50, mode="hybrid",
                                          keywords="zyzzyva", filter=even)).hits
    assert hybrid and all(hit.id % 2 == 0 for hit in hybrid)


def test_bm25_ranks_more_matching_words_first_and_pages_cover_it_once(searcher):
    query = {"mode": "keyword", "keywords": "photo beach number 42"}
    whole = searcher.search(Query.vector([1.0] * DIM, k=400, **query)).hits
    assert whole[0].id == 42 and len(whole) == COUNT - 1  # every caption but the quokka's
    seen, cursor = [], None
    while True:
        page = searcher.search(Query.vector([1.0] * DIM, k=32, cursor=cursor, **query))
        seen += [hit.id for hit in page.hits]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [hit.id for hit in whole]


def test_fusion_follows_its_formula_and_breaks_ties_by_id():
    fused = fuse([5, 3, 9], [9, 7])
    scores = {hit.id: hit.score for hit in fused}
    assert scores[9] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[5] == pytest.approx(1 / 61) and scores[3] == scores[7] == 1 / 62
    assert [hit.id for hit in fused] == [9, 5, 3, 7]  # 3 and 7 tie: the lower id first
    assert [(hit.vector_rank, hit.keyword_rank) for hit in fused] == [
        (3, 1), (1, None), (2, None), (None, 2)]


@pytest.mark.parametrize("options,words", [
    ({"mode": "fuzzy"}, "mode must be one of"),
    ({"mode": "hybrid", "threshold": 0.3}, "vector mode only"),
    ({"mode": "keyword"}, "needs words"),
])
def test_mode_mistakes_are_refused(options, words):
    with pytest.raises(InvalidQueryError, match=words):
        Query.vector([1.0] * DIM, **options)


def test_a_query_of_punctuation_only_is_refused(searcher):
    with pytest.raises(InvalidQueryError, match="at least one word"):
        searcher.search(Query.vector([1.0] * DIM, mode="keyword", keywords="!!! ?"))


def test_the_keyword_index_follows_appends_deletes_and_compaction(tmp_path):
    from retrieval.store import append_items, update_generation
    rng = np.random.default_rng(1)
    records = [ItemRecord(i, "image", path=f"/p/{i}.png", captions=[caption])
               for i, caption in enumerate(["a wombat", "a cat", "a dog"])]
    write_generation(tmp_path, MODEL, records, {"image": unit(rng.normal(size=(3, DIM)))})
    append_items(tmp_path, MODEL, [ItemRecord(-1, "image", path="/p/x.png",
                                              captions=["another wombat"])],
                 {"image": unit(rng.normal(size=(1, DIM)))})
    query = Query.vector([1.0] * DIM, mode="keyword", keywords="wombat")
    for compact in (False, True):
        update_generation(tmp_path, MODEL, delete_ids=[] if compact else [0], compact=compact)
        with open_generation(tmp_path) as generation:
            assert [hit.id for hit in Searcher(generation).search(query).hits] == [3]
