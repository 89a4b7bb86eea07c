"""Core results as clients see them: hits with links and public metadata."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from api.schemas import SearchHit, SearchResponse
from retrieval.search.searcher import Hit, Result


def search_response(result: Result, public_url: str) -> SearchResponse:
    return SearchResponse(hits=[hit_body(hit, public_url) for hit in result.hits],
                          generation=result.generation, next_cursor=result.next_cursor,
                          took_ms=result.took_ms)


def hit_body(hit: Hit, public_url: str) -> SearchHit:
    """A hit as clients see it. Links are built from the configured public URL (relative when
    none is set), never from the request's Host header, which any client can forge."""
    record = hit.item
    body = SearchHit(id=hit.id, score=hit.score, vector_rank=hit.vector_rank,
                     keyword_rank=hit.keyword_rank, relevance=hit.relevance,
                     duplicates=list(hit.duplicates))
    if record is None:
        return body
    body.modality = record.modality
    body.text = record.text
    body.captions = list(record.captions or [])
    body.image_id = record.image_id
    body.metadata = public_metadata(record.metadata or {})
    base = public_url.rstrip("/")
    if record.modality == "image":
        body.image_url = f"{base}/items/{hit.id}/image"
    elif record.image_id is not None:
        body.image_url = f"{base}/items/{record.image_id}/image"
    return body


def public_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Item metadata with any absolute server path cut to its file name. The indexer no
    longer stores such paths in metadata; generations built before it did (`image_path` of
    captions, `source` of corpus texts), and a response must not show the server's layout."""
    return {key: (PurePosixPath(value).name if isinstance(value, str) and value.startswith("/")
                  and len(value) < 4096 else value)
            for key, value in metadata.items()}
