"""Admin endpoints (admin key only): add and delete items, switch to a new generation.

Writes go through the index store (a new generation derived from CURRENT, under the store's
writer lock); the service then swaps to it while in-flight requests finish on the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, UploadFile
from fastapi import Path as PathParam

from api.deps import AdminAccess, State
from api.errors import Problem
from api.images import decode_upload
from api.query import encode_image, encode_text
from api.schemas import AddTextsRequest, ReloadResponse, WriteResponse
from api.settings import MAX_TEXT_CHARS
from api.state import ServiceState
from retrieval.store import ItemRecord, open_generation, update_generation

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAccess])
UPLOADS = "uploads"  # under the index root: where images added through the API are kept
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}


@router.post("/reload", response_model=ReloadResponse,
             summary="Serve the index root's current generation; in-flight requests finish "
                     "on the old one")
async def reload(state: State) -> ReloadResponse:
    previous, current = await state.reload()
    return ReloadResponse(generation=current, previous=previous, changed=previous != current)


@router.post("/items/texts", response_model=WriteResponse, summary="Add caption texts")
async def add_texts(body: AddTextsRequest, state: State) -> WriteResponse:
    vectors = await asyncio.gather(*(encode_text(state, text) for text in body.texts))
    async with state.write_lock:
        first = await asyncio.to_thread(_next_id, state)
        records = [ItemRecord(first + n, "text", text=text, image_id=body.image_id)
                   for n, text in enumerate(body.texts)]
        return await _commit(state, records, {"text": np.stack(vectors)})


@router.post("/items/image", response_model=WriteResponse,
             summary="Add an image (kept under the index root) with optional captions")
async def add_image(state: State, image: Annotated[UploadFile, File()],
                    captions: Annotated[list[str] | None, Form(max_length=20, description=(
                        f"0 to 20 captions, each up to {MAX_TEXT_CHARS} characters"))] = None
                    ) -> WriteResponse:
    data = await image.read()
    captions = [c.strip() for c in captions or [] if c.strip()]
    if any(len(c) > MAX_TEXT_CHARS for c in captions):
        raise Problem(422, "Invalid request", f"captions: at most {MAX_TEXT_CHARS} characters")
    image_vector, *caption_vectors = await asyncio.gather(
        encode_image(state, data), *(encode_text(state, c) for c in captions))
    async with state.write_lock:
        path = await asyncio.to_thread(_save_upload, state, data)
        first = await asyncio.to_thread(_next_id, state)
        records = [ItemRecord(first, "image", path=str(path), captions=captions)]
        records += [ItemRecord(first + 1 + n, "text", text=c, image_id=first)
                    for n, c in enumerate(captions)]
        vectors = {"image": image_vector[None, :]}
        if captions:
            vectors["text"] = np.stack(caption_vectors)
        return await _commit(state, records, vectors)


@router.delete("/items/{item_id}", response_model=WriteResponse,
               summary="Delete an item (an image takes its captions along)")
async def delete_item(state: State, item_id: Annotated[int, PathParam(ge=0, le=2**62)]
                      ) -> WriteResponse:
    async with state.write_lock:
        return await _commit(state, [], {}, delete=[item_id])


def _root(state: ServiceState) -> Path:
    if state.settings.index is None or state.model is None:
        raise Problem(409, "No index root", "this service was not started with --index; "
                      "it cannot write")
    return Path(state.settings.index)


def _next_id(state: ServiceState) -> int:
    generation = open_generation(_root(state), verify_checksums=False)
    try:
        return generation.next_id
    finally:
        generation.close()


def _save_upload(state: ServiceState, data: bytes) -> Path:
    """Keep a validated upload under the index root, named by its content hash."""
    suffix = SUFFIX[decode_upload(data, state.settings.max_image_pixels, keep_format=True)]
    folder = _root(state) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha256(data).hexdigest()[:32] + suffix)
    if not path.exists():
        path.write_bytes(data)
    return path.resolve()


async def _commit(state: ServiceState, records: list[ItemRecord],
                  vectors: dict[str, np.ndarray], delete: list[int] = ()) -> WriteResponse:
    root, model = _root(state), state.model
    await asyncio.to_thread(update_generation, root, model, add=records, add_vectors=vectors,
                            delete_ids=delete)
    _, current = await state.reload()
    return WriteResponse(ids=[r.id for r in records] or list(delete), generation=current)
