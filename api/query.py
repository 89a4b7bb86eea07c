"""From request to hits: encode through the batchers, search off the event loop, page with
cursors, and turn hits into response bodies. The routers stay thin on top of this."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from api.errors import Problem
from api.images import decode_upload
from api.schemas import SearchHit, SearchResponse
from api.state import ServiceState
from retrieval.search import Hit, Page, Searcher, query_fingerprint

Vector = np.ndarray  # (d,) float32, unit length


@dataclass(frozen=True)
class PageRequest:
    target: str
    k: int
    threshold: float | None
    cursor: str | None


async def encode_text(state: ServiceState, text: str) -> Vector:
    assert state.text_batcher is not None
    return await state.text_batcher.submit(text)


async def encode_texts(state: ServiceState, texts: Sequence[str]) -> list[Vector]:
    """The texts of one request (labels, captions), submitted a batch at a time: all at once,
    one request could fill the batcher's queue by itself and be refused as busy."""
    config = state.settings.batching
    wave = min(config.max_batch, config.queue_size)
    vectors: list[Vector] = []
    for start in range(0, len(texts), wave):
        chunk = texts[start:start + wave]
        vectors += await asyncio.gather(*(encode_text(state, text) for text in chunk))
    return vectors


async def encode_image(state: ServiceState, data: bytes) -> Vector:
    """Decode and preprocess on a pool thread (per-request errors), encode in a batch."""
    assert state.image_batcher is not None and state.clip is not None
    clip, max_pixels = state.clip, state.settings.max_image_pixels
    pixels = await asyncio.to_thread(lambda: clip.preprocess(decode_upload(data, max_pixels)))
    return await state.image_batcher.submit(pixels)


def encode_cursor(generation: str, fingerprint: str, page: Page) -> str | None:
    if page.after is None:
        return None
    score, item_id = page.after
    payload = {"g": generation, "f": fingerprint, "s": score, "i": item_id, "n": page.served}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, generation: str, fingerprint: str) -> tuple[tuple[float, int], int]:
    """-> ((score, id) of the last hit served, hits served so far)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = (float(payload["s"]), int(payload["i"]))
        served, cursor_generation, cursor_query = int(payload["n"]), payload["g"], payload["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise Problem(422, "Bad cursor", "the cursor is not one this service issued; pass "
                      "next_cursor from the previous response unchanged") from None
    if cursor_query != fingerprint:
        raise Problem(422, "Bad cursor", "this cursor belongs to a different query; send the "
                      "same query (text, target, threshold) with its cursor")
    if cursor_generation != generation:
        raise Problem(409, "Stale cursor", f"the index changed (generation {cursor_generation} "
                      f"-> {generation}) since this cursor was issued; start the search again")
    return after, served


async def search_page(state: ServiceState, searcher: Searcher, query: Vector,
                      request: PageRequest, fingerprint: str, base_url: str) -> SearchResponse:
    started = time.perf_counter()
    generation = searcher.generation.name
    fingerprint = query_fingerprint(fingerprint, request.target, request.threshold)
    after, served = (None, 0)
    if request.cursor:
        after, served = decode_cursor(request.cursor, generation, fingerprint)
    if served + request.k > state.settings.max_depth:
        raise Problem(422, "Too deep", f"paging stops at {state.settings.max_depth} hits; "
                      "narrow the query or raise the threshold")
    page = await asyncio.to_thread(searcher.page, request.target, query, request.k,
                                   request.threshold, after, served)
    return SearchResponse(
        hits=[hit_body(hit, base_url) for hit in page.hits], generation=generation,
        next_cursor=encode_cursor(generation, fingerprint, page),
        took_ms=round((time.perf_counter() - started) * 1000, 3))


def hit_body(hit: Hit, base_url: str, score: bool = True) -> SearchHit:
    record = hit.item
    body = SearchHit(id=hit.id, score=hit.score)
    if record is None:
        return body
    body.modality = record.modality
    body.text = record.text
    body.captions = list(record.captions or [])
    body.image_id = record.image_id
    body.metadata = dict(record.metadata or {})
    if record.modality == "image":
        body.image_url = f"{base_url}items/{hit.id}/image"
    elif record.image_id is not None:
        body.image_url = f"{base_url}items/{record.image_id}/image"
    return body
