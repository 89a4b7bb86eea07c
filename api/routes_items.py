"""Item lookup by id, and the item's image file (found through the index, never the URL)."""

from __future__ import annotations

import asyncio
import mimetypes
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from api.deps import Leased, ReadAccess, State
from api.errors import Problem, problem_responses
from api.query import hit_body
from api.schemas import MAX_ITEM_ID, ItemResponse
from retrieval.search import Hit, Searcher
from retrieval.store import resolve_stored

router = APIRouter(prefix="/items", tags=["items"], dependencies=[ReadAccess],
                   responses=problem_responses(401, 404, 422, 503))
# The indexer keeps whatever image formats Pillow read; unknown suffixes go out as octet-stream.
IMAGE_FILE = {200: {"description": "the image file as indexed", "content": {
    media_type: {"schema": {"type": "string", "format": "binary"}}
    for media_type in ("image/*", "application/octet-stream")}}}
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID, description="an id from a search hit")]


async def _record(searcher: Searcher, item_id: int):
    record = (await asyncio.to_thread(searcher.generation.items, [item_id]))[0]
    if record is None:
        raise Problem(404, "Not found", f"no item {item_id} in generation "
                      f"{searcher.generation.name}; ids come from search hits")
    return record


@router.get("/{item_id}", response_model=ItemResponse, summary="One indexed item's record")
async def get_item(item_id: ItemId, state: State, searcher: Leased) -> ItemResponse:
    record = await _record(searcher, item_id)
    body = hit_body(Hit(item_id, 0.0, record), state.settings.public_url)
    return ItemResponse(**{**body.model_dump(), "score": None})


@router.get("/{item_id}/image", response_class=FileResponse, responses=IMAGE_FILE,
            summary="The image file of an image item (or of a text item's image)")
async def get_item_image(item_id: ItemId, searcher: Leased) -> FileResponse:
    record = await _record(searcher, item_id)
    if record.modality != "image":
        if record.image_id is None:
            raise Problem(404, "Not found", f"item {item_id} is a text with no image")
        record = await _record(searcher, record.image_id)
    path = resolve_stored(searcher.generation.root, record.path)
    if path is None:
        raise Problem(404, "Not found", f"the image file of item {item_id} is no longer on disk")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)
