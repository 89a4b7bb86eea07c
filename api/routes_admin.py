"""Admin endpoints (admin key only): add and delete items, switch to a new generation.

Writes go through the index store (a new generation derived from CURRENT, under the store's
writer lock); the service then swaps to it while in-flight requests finish on the old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
from retrieval.index import Added

# Any write can meet these: no or a wrong key, writes disabled, an index that no longer
# fits the model or cannot be read (a core error); bodies add 400/413, uploads 415.
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminAccess],
                   responses=problem_responses(401, 403, 409, 422, 503))
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
async def add_texts(body: AddTextsRequest, state: State, index: Leased) -> WriteResponse:
    if body.metadata and body.image_id is not None:
        raise Problem(422, "Bad metadata", "metadata: captions (texts with image_id) are "
                      "filtered by their image's metadata and take none of their own")
    _root(state)
    return await _written(state, await state.run(index.add_texts, body.texts, body.image_id,
                                                 body.metadata))


@router.post("/items/image", response_model=WriteResponse,
             responses=problem_responses(400, 413, 415), openapi_extra=upload_openapi("image"),
             summary="Add an image (kept under the index root) with optional captions; the "
                     "same bytes again answer the existing item (duplicate: true)")
async def add_image(state: State, index: Leased, image: Annotated[UploadFile, File()],
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
    _root(state)
    try:
        added = await state.run(index.add_image, data, captions or [], fields,
                                state.upload_limits)
    except DuplicateItemError as duplicate:  # the same bytes, with captions of their own
        raise Problem(409, "Already indexed", f"this image is already item "
                      f"{duplicate.item_id}; add its captions with POST /admin/items/texts "
                      f'and {{"image_id": {duplicate.item_id}}}') from duplicate
    return await _written(state, added)


# `:int` keeps /items/image (POST) apart: DELETE /admin/items/image is then 405, not a bad id.
@router.delete("/items/{item_id:int}", response_model=WriteResponse,
               responses=problem_responses(404),
               summary="Delete an item (an image takes its captions along)")
async def delete_item(state: State, index: Leased,
                      item_id: Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID)]) -> WriteResponse:
    _root(state)
    await state.run(index.delete, [item_id])
    return await _written(state, Added([item_id], ""))


def _root(state: ServiceState) -> Path:
    if state.settings.index is None:
        raise Problem(409, "No index root", "this service was not started with --index; "
                      "it cannot write")
    return Path(state.settings.index)


async def _written(state: ServiceState, added: Added) -> WriteResponse:
    """Serve what the write made (or, for a duplicate, what is current) before answering, so
    the caller's next search sees it. The store allocated the ids under its writer lock, so
    this never conflicts with an `index add` running beside the service."""
    _, current = await state.reload()
    return WriteResponse(ids=added.ids, generation=current, duplicate=added.duplicate)
