"""Date order among the relevant hits: the same set a ranked search would choose, in date
order, against brute force over a real store; paging by cursor walks it once."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import Query, Searcher
from retrieval.errors import InvalidQueryError
from retrieval.models.identity import ModelIdentity
from retrieval.store import ItemRecord, open_generation, write_generation

DIM, COUNT, CANDIDATES = 16, 40, 12
MODEL = ModelIdentity("d" * 64, "dates-test", DIM)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(COUNT, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    days = rng.permutation(COUNT)
    records = [ItemRecord(i + 1, "image", path=f"/photos/{i}.jpg", metadata=(
        {"taken": f"2024-{1 + days[i] // 28:02d}-{1 + days[i] % 28:02d}T10:00:00"}
        if i % 7 else {"album": "scans"})) for i in range(COUNT)]  # every 7th has no date
    root = tmp_path_factory.mktemp("dates") / "index"
    write_generation(root, MODEL, records, {"image": vectors})
    return root, vectors, records


def brute_force(vectors, records, query, descending=True):
    scores = vectors @ query
    best = sorted(range(COUNT), key=lambda i: (-scores[i], i))[:CANDIDATES]
    dated = [i for i in best if "taken" in records[i].metadata]
    dated.sort(key=lambda i: records[i].metadata["taken"], reverse=descending)
    return [i + 1 for i in dated + [i for i in best if i not in dated]], scores


@pytest.mark.parametrize("descending", [True, False])
def test_the_relevant_hits_come_in_date_order_page_by_page(photos, descending):
    root, vectors, records = photos
    query_vector = vectors[3] + 0.5 * vectors[9]
    query_vector /= np.linalg.norm(query_vector)
    expected, scores = brute_force(vectors, records, query_vector, descending)
    with open_generation(root) as generation:
        searcher, cursor, seen = Searcher(generation), None, []
        while True:
            result = searcher.search(Query.vector(query_vector.tolist(), k=5, order_by="taken",
                                                  descending=descending,
                                                  candidates=CANDIDATES, cursor=cursor))
            seen += result.hits
            cursor = result.next_cursor
            if cursor is None:
                break
    assert [hit.id for hit in seen] == expected
    for hit in seen:  # each hit keeps its own score
        assert hit.score == pytest.approx(float(scores[hit.id - 1]), abs=1e-5)


def test_only_a_date_field_orders_and_only_in_vector_mode(photos):
    root, vectors, _ = photos
    with open_generation(root) as generation:
        searcher = Searcher(generation)
        with pytest.raises(InvalidQueryError, match="date fields: taken"):
            searcher.search(Query.vector(vectors[0].tolist(), order_by="album"))
    with pytest.raises(InvalidQueryError, match="order_by"):
        Query.text("a dog", mode="keyword", order_by="taken")
