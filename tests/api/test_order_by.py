"""`order_by` over HTTP: a text search's relevant hits newest first, paged by cursor, each
with its own score; the set is the best `candidates` by score (the tiny model has no
calibration)."""

from __future__ import annotations

import httpx

from api.app import create_app
from api.settings import Settings
from retrieval.models.identity import model_identity
from retrieval.store import write_generation
from tests.support.colours import colour_records, encode_records
from tests.support.server import ServerThread

CANDIDATES = 5


def test_a_text_search_in_date_order_pages_through_the_relevant_hits(tiny, images, tmp_path):
    resolved = {colour: path.resolve() for colour, path in images.items()}
    records = colour_records(resolved)
    for day, record in enumerate(r for r in records if r.modality == "image"):
        record.metadata["taken"] = f"2024-03-{day * 7 % 28 + 1:02d}T09:00:00"
    root = tmp_path / "index"
    write_generation(root, model_identity(tiny), records, encode_records(tiny, records, resolved),
                     media_roots={p.parent for p in resolved.values()})
    with ServerThread(create_app(Settings(index=root), clip=tiny)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        ranked = http.post("/search/text", json={"text": "a red square", "k": CANDIDATES})
        best = {hit["id"]: hit["score"] for hit in ranked.json()["hits"]}
        body = {"text": "a red square", "k": 2, "order_by": "taken", "candidates": CANDIDATES}
        seen, cursor = [], None
        while True:
            page = http.post("/search/text", json={**body, "cursor": cursor})
            assert page.status_code == 200, page.text
            seen += page.json()["hits"]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        wrong = http.post("/search/text", json={**body, "order_by": "label"})
    assert {hit["id"] for hit in seen} == set(best) and len(seen) == CANDIDATES
    taken = [hit["metadata"]["taken"] for hit in seen]
    assert taken == sorted(taken, reverse=True)
    assert all(abs(hit["score"] - best[hit["id"]]) < 1e-5 for hit in seen)
    assert wrong.status_code in (400, 422) and "date field" in wrong.text
