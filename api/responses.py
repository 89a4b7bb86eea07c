"""Core results as clients see them: hits and items with links and public metadata.

An item record becomes a response here only (`_item_fields`): a search hit, a listed or
looked-up item, and a clip-retrieval result (made from the hit) all carry it.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from api.schemas import BrowseResponse, ItemResponse, SearchHit, SearchResponse
from retrieval.search.searcher import Hit, Result


def search_response(result: Result, public_url: str) -> SearchResponse:
    return SearchResponse(hits=[hit_body(hit, public_url) for hit in result.hits],
                          generation=result.generation, next_cursor=result.next_cursor,
                          took_ms=result.took_ms)


def browse_response(result: Result, public_url: str) -> BrowseResponse:
    """A listing: its items in the order asked, without scores (a listing ranks nothing)."""
    return BrowseResponse(hits=[item_body(hit.id, hit.item, public_url) for hit in result.hits],
                          generation=result.generation, next_cursor=result.next_cursor,
                          took_ms=result.took_ms)


def hit_body(hit: Hit, public_url: str) -> SearchHit:
    """A hit as clients see it: the item, and how the search ranked it."""
    return SearchHit(id=hit.id, score=hit.score, vector_rank=hit.vector_rank,
                     keyword_rank=hit.keyword_rank, relevance=hit.relevance,
                     duplicates=list(hit.duplicates),
                     **_item_fields(hit.id, hit.item, public_url))


def knn_results(result: Result, public_url: str) -> list[dict[str, Any]]:
    """Hits in clip-retrieval's shape, as its ClipClient reads them: each hit's metadata, then
    its id, score, link and caption (a text's own, or an image's first)."""
    shaped = []
    for hit in (hit_body(hit, public_url) for hit in result.hits):
        caption = hit.text or (hit.captions[0] if hit.captions else None)
        folded = {"duplicates": hit.duplicates} if hit.duplicates else {}
        shaped.append({**hit.metadata, "id": hit.id, "similarity": hit.score,
                       "url": hit.image_url, "caption": caption, **folded})
    return shaped


def item_body(item_id: int, record: Any, public_url: str) -> ItemResponse:
    """An item (an ItemRecord, or None when its metadata row is gone) as clients see it."""
    return ItemResponse(id=item_id, **_item_fields(item_id, record, public_url))


def _item_fields(item_id: int, record: Any, public_url: str) -> dict[str, Any]:
    """The response fields an item record gives. Links are built from the configured public
    URL (relative when none is set), never from the request's Host header, which any client
    can forge."""
    if record is None:
        return {}
    fields = {"modality": record.modality, "text": record.text,
              "captions": list(record.captions or []), "image_id": record.image_id,
              "metadata": public_metadata(record.metadata or {})}
    base = public_url.rstrip("/")
    if record.modality == "image":
        fields["image_url"] = f"{base}/items/{item_id}/image"
    elif record.image_id is not None:
        fields["image_url"] = f"{base}/items/{record.image_id}/image"
    return fields


def public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Item metadata with any absolute server path cut to its file name. The indexer no
    longer stores such paths in metadata; generations built before it did (`image_path` of
    captions, `source` of corpus texts), and a response must not show the server's layout."""
    return {key: (PurePosixPath(value).name if isinstance(value, str) and value.startswith("/")
                  and len(value) < 4096 else value)
            for key, value in metadata.items()}
