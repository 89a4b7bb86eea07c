"""Admin endpoints (admin key only): add and delete items, switch to a new generation.

Writes go through the index store (a new generation derived from CURRENT, under the store's
writer lock); the service then swaps to it while in-flight requests finish on the old one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, UploadFile
from fastapi import Path as PathParam
from pydantic import Field

from api.deps import AdminAccess, Leased, State
from api.errors import Problem, problem_responses
from api.images import form_json, upload_openapi
from api.limits import body_limit
from api.schemas import MAX_ITEM_ID, AddTextsRequest, ReloadResponse, WriteResponse
from api.settings import EMPTY_BODY_BYTES, MAX_TEXT_CHARS
from api.state import ServiceState
from retrieval.errors import DuplicateItemError
from retrieval.fields.values import check_metadata
from retrieval.inputs.images import image_format
from retrieval.store import (
    ItemRecord,
    append_items,
    image_with_captions,
    keep_upload,
    text_records,
    update_generation,
    upload_path,
)

# Any write can meet these: no or a wrong key, writes disabled, an index that no longer
# fits the model or cannot be read (a core error); bodies add 400/413, uploads 415.
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAccess],
                   responses=problem_responses(401, 403, 409, 422, 503))
SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
Caption = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
MAX_METADATA_CHARS = 16_384


@router.post("/reload", response_model=ReloadResponse, openapi_extra=body_limit(EMPTY_BODY_BYTES),
             summary="Serve the index root's current generation; in-flight requests finish "
                     "on the old one")
async def reload(state: State) -> ReloadResponse:
    previous, current = await state.reload()
    return ReloadResponse(generation=current, previous=previous, changed=previous != current)


@router.post("/items/texts", response_model=WriteResponse, summary="Add caption texts",
             responses=problem_responses(400, 413))
async def add_texts(body: AddTextsRequest, state: State, searcher: Leased) -> WriteResponse:
    if body.metadata and body.image_id is not None:
        raise Problem(422, "Bad metadata", "metadata: captions (texts with image_id) are "
                      "filtered by their image's metadata and take none of their own")
    vectors = await state.run(searcher.encoder.texts, body.texts)
    records = text_records(body.texts, image_id=body.image_id, metadata=body.metadata)
    return await _append(state, records, {"text": vectors})


@router.post("/items/image", response_model=WriteResponse,
             responses=problem_responses(400, 413, 415), openapi_extra=upload_openapi("image"),
             summary="Add an image (kept under the index root) with optional captions; the "
                     "same bytes again answer the existing item (duplicate: true)")
async def add_image(state: State, searcher: Leased, image: Annotated[UploadFile, File()],
                    captions: Annotated[list[Caption] | None, Form(max_length=20, description=(
                        f"0 to 20 captions, each up to {MAX_TEXT_CHARS} characters; blank ones "
                        "are dropped"))] = None,
                    metadata: Annotated[str | None, Form(
                        max_length=MAX_METADATA_CHARS, description=(
                            "a JSON object: the image's metadata, whose keys become "
                            "filterable fields"))] = None
                    ) -> WriteResponse:
    data = await image.read()
    fields = form_json(metadata, "metadata") or {}
    check_metadata(fields)  # before the upload is decoded, encoded or kept
    captions = [c.strip() for c in captions or [] if c.strip()]
    root = _root(state)
    suffix = SUFFIX[await asyncio.to_thread(image_format, data, state.upload_limits)]
    stored = upload_path(data, suffix)
    existing = (await asyncio.to_thread(searcher.generation.ids_for_paths, [stored])).get(stored)
    if existing is not None:
        return _duplicate(existing, captions, searcher.generation.name)
    image_vectors = await state.run(searcher.encoder.images, [data])  # (1, d)
    caption_vectors = await state.run(searcher.encoder.texts, captions)  # (n, d)
    await asyncio.to_thread(keep_upload, root, stored, data)
    records = image_with_captions(stored, captions, fields)
    vectors = {"image": image_vectors}
    if captions:
        vectors["text"] = caption_vectors
    try:  # the check above is a shortcut; the store's, under its lock, is the one that holds
        return await _append(state, records, vectors, unique_paths=True)
    except DuplicateItemError as duplicate:
        _, current = await state.reload()
        return _duplicate(duplicate.item_id, captions, current)


def _duplicate(existing: int, captions: list[str], generation: str) -> WriteResponse:
    """Uploads are kept by content hash, so the same bytes are the same item: adding them
    again would make two items of one file. Captions sent with a duplicate are refused rather
    than dropped: they belong to POST /admin/items/texts with the existing image's id."""
    if captions:
        raise Problem(409, "Already indexed", f"this image is already item {existing}; add "
                      "its captions with POST /admin/items/texts and "
                      f'{{"image_id": {existing}}}')
    return WriteResponse(ids=[existing], generation=generation, duplicate=True)


# `:int` keeps /items/image (POST) apart: DELETE /admin/items/image is then 405, not a bad id.
@router.delete("/items/{item_id:int}", response_model=WriteResponse,
               responses=problem_responses(404),
               summary="Delete an item (an image takes its captions along)")
async def delete_item(state: State, item_id: Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID)]
                      ) -> WriteResponse:
    root, model = _root(state), state.write_model()
    async with state.write_lock:
        await asyncio.to_thread(update_generation, root, model, delete_ids=[item_id])
        _, current = await state.reload()
    return WriteResponse(ids=[item_id], generation=current)


def _root(state: ServiceState) -> Path:
    if state.settings.index is None:
        raise Problem(409, "No index root", "this service was not started with --index; "
                      "it cannot write")
    return Path(state.settings.index)


async def _append(state: ServiceState, records: list[ItemRecord],
                  vectors: dict[str, np.ndarray], unique_paths: bool = False) -> WriteResponse:
    """The store allocates the ids under its writer lock (the records carry provisional ones),
    so this never conflicts with an `index add` running beside the service."""
    root, model = _root(state), state.write_model()
    async with state.write_lock:
        appended = await asyncio.to_thread(append_items, root, model, records, vectors,
                                           unique_paths=unique_paths)
        _, current = await state.reload()
    return WriteResponse(ids=appended.ids, generation=current)
