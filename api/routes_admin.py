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
from pydantic import Field

from api.deps import AdminAccess, State
from api.errors import Problem, problem_responses
from api.images import decode_upload, upload_openapi
from api.query import encode_image, encode_texts
from api.schemas import MAX_ITEM_ID, AddTextsRequest, ReloadResponse, WriteResponse
from api.settings import MAX_TEXT_CHARS
from api.state import ServiceState
from retrieval.store import ItemRecord, open_generation, update_generation

# Any write can meet these: no or a wrong key, writes disabled, an index that no longer
# fits the model or cannot be read (a core error); bodies add 400/413, uploads 415.
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAccess],
                   responses=problem_responses(401, 403, 409, 422, 503))
UPLOADS = "uploads"  # under the index root: where images added through the API are kept
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
Caption = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


@router.post("/reload", response_model=ReloadResponse,
             summary="Serve the index root's current generation; in-flight requests finish "
                     "on the old one")
async def reload(state: State) -> ReloadResponse:
    previous, current = await state.reload()
    return ReloadResponse(generation=current, previous=previous, changed=previous != current)


@router.post("/items/texts", response_model=WriteResponse, summary="Add caption texts",
             responses=problem_responses(400, 413))
async def add_texts(body: AddTextsRequest, state: State) -> WriteResponse:
    vectors = await encode_texts(state, body.texts)
    async with state.write_lock:
        first = await asyncio.to_thread(_next_id, state)
        records = [ItemRecord(first + n, "text", text=text, image_id=body.image_id)
                   for n, text in enumerate(body.texts)]
        return await _commit(state, records, {"text": np.stack(vectors)})


@router.post("/items/image", response_model=WriteResponse,
             responses=problem_responses(400, 413, 415), openapi_extra=upload_openapi("image"),
             summary="Add an image (kept under the index root) with optional captions")
async def add_image(state: State, image: Annotated[UploadFile, File()],
                    captions: Annotated[list[Caption] | None, Form(max_length=20, description=(
                        f"0 to 20 captions, each up to {MAX_TEXT_CHARS} characters; blank ones "
                        "are dropped"))] = None
                    ) -> WriteResponse:
    data = await image.read()
    captions = [c.strip() for c in captions or [] if c.strip()]
    image_vector, caption_vectors = await asyncio.gather(encode_image(state, data),
                                                         encode_texts(state, captions))
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


# `:int` keeps /items/image (POST) apart: DELETE /admin/items/image is then 405, not a bad id.
@router.delete("/items/{item_id:int}", response_model=WriteResponse,
               responses=problem_responses(404),
               summary="Delete an item (an image takes its captions along)")
async def delete_item(state: State, item_id: Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID)]
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
