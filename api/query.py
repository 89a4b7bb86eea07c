"""From request to hits: encode through the batchers, search off the event loop, page with
cursors, and turn hits into response bodies. The routers stay thin on top of this."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from api.errors import Problem
from api.schemas import SearchHit, SearchResponse
from api.state import ServiceState
from retrieval.cursor import Cursor, decode_cursor, encode_cursor, query_fingerprint
from retrieval.images import DecodeLimits, load_image
from retrieval.search import Hit, Searcher

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
    clip, limits = state.clip, state.upload_limits
    # The decode pool's few threads bound how many uploads are decoded at once, and with the
    # decoder's byte cap, the memory that hostile images can take.
    pixels = await asyncio.get_running_loop().run_in_executor(
        state.decode_executor, _decode, clip.preprocess, data, limits)
    return await state.image_batcher.submit(pixels)


TRIM_AFTER_PIXELS = 4_000_000  # decodes bigger than this hand their freed memory back


def _decode(preprocess: Callable, data: bytes, limits: DecodeLimits) -> Any:
    image = load_image(data, limits=limits)
    large = image.width * image.height > TRIM_AFTER_PIXELS
    pixels = preprocess(image)
    del image
    if large:
        # glibc keeps large freed blocks in its heap once its mmap threshold has grown past
        # them: eight 40 MP uploads left 500 MB resident for good. A trim after the few big
        # decodes returns it; small ones (most) skip the cost.
        release_freed_memory()
    return pixels


def release_freed_memory() -> None:
    """malloc_trim(0) where the C library has it (glibc); a no-op elsewhere."""
    trim = _LIBC_TRIM
    if trim is not None:
        trim(0)


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_LIBC_TRIM = _libc_trim()


async def search_page(state: ServiceState, searcher: Searcher, query: Vector,
                      request: PageRequest, fingerprint: str) -> SearchResponse:
    started = time.perf_counter()
    generation = searcher.generation.name
    fingerprint = query_fingerprint(fingerprint, request.target, request.threshold)
    after, served = (None, 0)
    if request.cursor:
        cursor = decode_cursor(request.cursor, generation, fingerprint, state.settings.max_depth)
        after, served = cursor.after, cursor.served
    if served + request.k > state.settings.max_depth:
        raise Problem(422, "Too deep", f"paging stops at {state.settings.max_depth} hits; "
                      "narrow the query or raise the threshold")
    page = await asyncio.to_thread(searcher.page, request.target, query, request.k,
                                   request.threshold, after, served)
    return SearchResponse(
        hits=[hit_body(hit, state.settings.public_url) for hit in page.hits],
        generation=generation,
        next_cursor=(encode_cursor(Cursor(generation, fingerprint, page.after, page.served))
                     if page.after is not None else None),
        took_ms=round((time.perf_counter() - started) * 1000, 3))


def hit_body(hit: Hit, public_url: str, score: bool = True) -> SearchHit:
    """A hit as clients see it. Links are built from the configured public URL (relative when
    none is set), never from the request's Host header, which any client can forge."""
    record = hit.item
    body = SearchHit(id=hit.id, score=hit.score)
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


def public_metadata(metadata: dict) -> dict:
    """Item metadata with any absolute server path cut to its file name. The indexer no
    longer stores such paths in metadata; generations built before it did (`image_path` of
    captions, `source` of corpus texts), and a response must not show the server's layout."""
    return {key: (PurePosixPath(value).name if isinstance(value, str) and value.startswith("/")
                  and "\n" not in value and len(value) < 4096 else value)
            for key, value in metadata.items()}
