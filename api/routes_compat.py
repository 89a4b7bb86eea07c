"""clip-retrieval back-end compatibility, so its ClipClient can query clipdex.

ClipClient posts a JSON body (without a content type) to /knn-service and reads a list of
{"id", "similarity", "url", "caption", ...}; modality "image" searches images, "text" texts.
A clipdex metadata `filter` may ride along (an extra field ClipClient does not send).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Leased, ReadAccess, State
from api.errors import Problem, problem_responses
from api.images import decode_base64
from api.limits import structure_limit
from api.responses import knn_results
from api.schemas import INTEGRAL
from api.settings import MAX_K, MAX_TEXT_CHARS, VECTOR_QUERY_BODY_BYTES
from retrieval.search.query import Query, Term

router = APIRouter(tags=["clip-retrieval compatibility"], dependencies=[ReadAccess],
                   responses=problem_responses(400, 401, 503), strict_content_type=False)


QUERY_FIELDS = ("text", "image", "embedding_input")  # the first one given is used


class KnnRequest(BaseModel):
    """clip-retrieval's request; filters it cannot apply here are accepted and ignored."""

    # Strict: the types ClipClient sends, nothing coerced; the schema says "at least one query".
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
        for name in QUERY_FIELDS]})
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    image: str | None = Field(None, min_length=1, description="base64 image file")
    image_url: str | None = Field(None, description="not fetched (422): send 'image' instead")
    embedding_input: list[float] | None = Field(None, min_length=1, max_length=4096)
    modality: str = Field("image", pattern="^(image|text)$")
    num_images: Annotated[int, Field(ge=1, le=MAX_K), INTEGRAL] = 40
    num_result_ids: Annotated[int, Field(ge=1, le=MAX_K), INTEGRAL] | None = None
    indice_name: str | None = None
    filter: dict[str, Any] | None = Field(None, description=(
        "clipdex's own: a metadata filter, as /search/text takes it (see its schema)"))
    deduplicate: bool = Field(True, description="collapse near-duplicate results (cosine >= "
                                                "0.95), as clip-retrieval does")
    # Accepted so ClipClient's requests validate, without effect here (clipdex has none of
    # these models); the response's X-Clipdex-Ignored header names those that were asked for.
    use_safety_model: bool = False
    use_violence_detector: bool = False
    use_mclip: bool = False
    aesthetic_score: Annotated[int, INTEGRAL] | None = None
    aesthetic_weight: float | None = None


IGNORED_OPTIONS = ("use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_score",
                   "aesthetic_weight")


@router.get("/indices-list", summary="clip-retrieval: the index names served")
async def indices_list(state: State) -> list[str]:
    return [state.settings.index_name]


# ClipClient sends its JSON without a content type; with strict_content_type off (on this
# router) FastAPI parses such a body as JSON, so the route shares every route's parsing path.
@router.post("/knn-service", summary="clip-retrieval: nearest neighbours of text/image/vector",
             responses=problem_responses(404, 409, 413, 415, 422),
             openapi_extra=structure_limit(VECTOR_QUERY_BODY_BYTES))
async def knn_service(body: KnnRequest, state: State, searcher: Leased,
                      response: Response) -> list[dict[str, Any]]:
    if body.indice_name not in (None, state.settings.index_name):
        raise Problem(404, "Not found", f"no index {body.indice_name!r}; this service serves "
                      f"{state.settings.index_name!r} (see /indices-list)")
    if body.image_url:
        raise Problem(422, "Bad query", "image_url is not fetched by this service (no outbound "
                      "requests); send the image itself base64-encoded as 'image'")
    query = Query((_term(body),), target=body.modality, k=body.num_images, filter=body.filter,
                  dedup=body.deduplicate)
    result = await state.run(searcher.search, query)
    ignored = [name for name in IGNORED_OPTIONS if getattr(body, name)]
    if ignored:
        response.headers["X-Clipdex-Ignored"] = ", ".join(ignored)
    return knn_results(result, state.settings.public_url)


def _term(body: KnnRequest) -> Term:
    """The first query clip-retrieval's request gives: text, then image, then embedding."""
    if body.text:
        return Term(text=body.text)
    if body.image:
        return Term(image=decode_base64(body.image))
    if body.embedding_input:
        return Term(vector=body.embedding_input)
    raise Problem(422, "Bad query", "send one of text, image or embedding_input")
