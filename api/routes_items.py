"""Item lookup by id, and the item's image file (found through the index, never the URL)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from api.deps import Leased, ReadAccess, State
from api.errors import problem_responses
from api.responses import item_body
from api.schemas import MAX_ITEM_ID, ItemResponse

router = APIRouter(prefix="/items", tags=["items"], dependencies=[ReadAccess],
                   responses=problem_responses(401, 404, 422, 503))
# Only files that sniff as an image under the index's media roots are served (`store.media`).
IMAGE_FILE = {200: {"description": "the image file as indexed", "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID, description="an id from a search hit")]


@router.get("/{item_id}", response_model=ItemResponse, summary="One indexed item's record")
async def get_item(item_id: ItemId, state: State, searcher: Leased) -> ItemResponse:
    record = await state.run(searcher.item, item_id)
    return item_body(item_id, record, state.settings.public_url)


@router.get("/{item_id}/image", response_class=FileResponse, responses=IMAGE_FILE,
            summary="The image file of an image item (or of a text item's image)")
async def get_item_image(item_id: ItemId, state: State, searcher: Leased) -> FileResponse:
    path, media_type = await state.run(searcher.image_file, item_id)
    return FileResponse(path, media_type=media_type)
