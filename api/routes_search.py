"""Search endpoints: text, image upload, vector and weighted multi-queries, zero-shot
classification and captioning by retrieval."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import AfterValidator, Field, WithJsonSchema

from api.deps import Leased, ReadAccess, State
from api.errors import Problem, problem_responses
from api.images import decode_base64, form_json, upload_openapi
from api.limits import body_limit, structure_limit
from api.responses import browse_response, hit_body, search_response
from api.schemas import (
    FILTER_DESCRIPTION,
    LABELS_DESCRIPTION,
    MAX_LABEL_CHARS,
    NOT_BLANK,
    BrowseRequest,
    BrowseResponse,
    CaptionResponse,
    ClassifyResponse,
    LabelProbability,
    QueryTerm,
    SearchMultiRequest,
    SearchResponse,
    SearchTextRequest,
    SearchVectorRequest,
    Target,
    not_blank,
)
from api.settings import MAX_K, MAX_LABELS, TEXT_QUERY_BODY_BYTES, VECTOR_QUERY_BODY_BYTES
from retrieval.search.query import ZERO_SHOT_TEMPLATE, Listing, Query, Term

# Every search can meet these; routes add what their inputs make possible (cursors and
# texts or images against an index of external embeddings: 409, uploads: 415, item ids: 404).
router = APIRouter(tags=["search"], dependencies=[ReadAccess],
                   responses=problem_responses(400, 401, 413, 422, 503))

ImageFile = Annotated[UploadFile, File(description="JPEG, PNG, WebP or GIF (first frame)")]
FormK = Annotated[int, Form(ge=1, le=MAX_K, description="hits per page")]
FormTarget = Annotated[Target, Form(description="search images or texts")]
# A form has no null (a field left out is None), so these optional fields' schemas are not
# nullable: a client sending "null" would be sending a string.
FormThreshold = Annotated[float | None, Form(ge=-1.0, le=1.0, description="minimum score"),
                          WithJsonSchema({"type": "number", "minimum": -1.0, "maximum": 1.0})]
FormCursor = Annotated[str | None, Form(max_length=512, description="next_cursor to continue"),
                       WithJsonSchema({"type": "string", "maxLength": 512})]
MAX_FILTER_CHARS = 16_384
FormFilter = Annotated[str | None, Form(max_length=MAX_FILTER_CHARS,
                                        description="JSON text of " + FILTER_DESCRIPTION),
                       WithJsonSchema({"type": "string", "maxLength": MAX_FILTER_CHARS})]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS,
                             json_schema_extra=NOT_BLANK), AfterValidator(not_blank)]
UPLOAD = upload_openapi("image")


@router.post("/search/text", response_model=SearchResponse, responses=problem_responses(409),
             openapi_extra=body_limit(TEXT_QUERY_BODY_BYTES),
             summary="Text query: top-k images (or texts) with scores")
async def search_text(body: SearchTextRequest, state: State,
                      searcher: Leased) -> SearchResponse:
    query = Query.text(body.text, **_paging(body))
    return search_response(await state.run(searcher.search, query), state.settings.public_url)


@router.post("/search/image", response_model=SearchResponse,
             responses=problem_responses(409, 415), openapi_extra=UPLOAD,
             summary="Image upload: top-k texts (target=text) or similar images (target=image)")
async def search_image(state: State, searcher: Leased, image: ImageFile,
                       target: FormTarget = "text", k: FormK = 10,
                       threshold: FormThreshold = None, cursor: FormCursor = None,
                       filter: FormFilter = None) -> SearchResponse:
    query = Query.image(await image.read(), target=target, k=k, threshold=threshold,
                        cursor=cursor, filter=form_json(filter, "filter"))
    return search_response(await state.run(searcher.search, query), state.settings.public_url)


@router.post("/search/vector", response_model=SearchResponse,
             openapi_extra=body_limit(VECTOR_QUERY_BODY_BYTES),
             responses=problem_responses(409),
             summary="Embedding query: a vector in, results out (normalised first)")
async def search_vector(body: SearchVectorRequest, state: State,
                        searcher: Leased) -> SearchResponse:
    query = Query.vector(body.vector, **_paging(body))
    return search_response(await state.run(searcher.search, query), state.settings.public_url)


@router.post("/search/multi", response_model=SearchResponse,
             responses=problem_responses(404, 409, 415),
             openapi_extra=structure_limit(VECTOR_QUERY_BODY_BYTES),
             summary="Weighted multi-query: sum of weight x unit embedding, normalised")
async def search_multi(body: SearchMultiRequest, state: State,
                       searcher: Leased) -> SearchResponse:
    query = Query(tuple(_term(term) for term in body.terms), **_paging(body))
    return search_response(await state.run(searcher.search, query), state.settings.public_url)


@router.post("/search/browse", response_model=BrowseResponse,
             openapi_extra=body_limit(TEXT_QUERY_BODY_BYTES),
             summary="Browse by filter: the items a filter matches, newest first or by a field")
async def browse(body: BrowseRequest, state: State, searcher: Leased) -> BrowseResponse:
    listing = Listing(filter=body.filter, target=body.target, order_by=body.order_by,
                      descending=body.descending, k=body.k, cursor=body.cursor)
    return browse_response(await state.run(searcher.browse, listing),
                           state.settings.public_url)


def _term(term: QueryTerm) -> Term:
    image = decode_base64(term.image_base64) if term.image_base64 is not None else None
    return Term(weight=term.weight, text=term.text, image=image, vector=term.vector,
                item_id=term.item_id)


@router.post("/classify", response_model=ClassifyResponse,
             responses=problem_responses(409, 415),
             openapi_extra=UPLOAD,
             summary="Zero-shot classification: label probabilities for an image")
async def classify(state: State, searcher: Leased, image: ImageFile,
                   labels: Annotated[list[Label], Form(
                       min_length=1, max_length=MAX_LABELS, description=LABELS_DESCRIPTION,
                       json_schema_extra={"uniqueItems": True})]
                   ) -> ClassifyResponse:
    ranked = await state.run(searcher.classify, await image.read(), _check_labels(labels))
    return ClassifyResponse(labels=[LabelProbability(label=label, probability=p)
                                    for label, p in ranked], template=ZERO_SHOT_TEMPLATE)


def _check_labels(labels: list[str]) -> list[str]:
    cleaned = [label.strip() for label in labels]  # Label has checked length and blankness
    if len(set(cleaned)) != len(cleaned):
        # Duplicates after trimming: a rule the schema's uniqueItems cannot state exactly.
        raise Problem(422, "Duplicate labels", "labels: each label may appear only once")
    return cleaned


@router.post("/caption", response_model=CaptionResponse,
             responses=problem_responses(409, 415),
             openapi_extra=UPLOAD,
             summary="Caption by retrieval: the indexed texts that best match an image")
async def caption(state: State, searcher: Leased, image: ImageFile,
                  k: Annotated[int, Form(ge=1, le=100, description="captions to return")] = 5,
                  filter: FormFilter = None) -> CaptionResponse:
    hits = await state.run(searcher.caption, await image.read(), k, form_json(filter, "filter"))
    base = state.settings.public_url
    return CaptionResponse(captions=[hit_body(hit, base) for hit in hits],
                           generation=searcher.generation.name)


def _paging(body: SearchTextRequest | SearchVectorRequest | SearchMultiRequest
            ) -> dict[str, Any]:
    return {"target": body.target, "k": body.k, "threshold": body.threshold,
            "cursor": body.cursor, "filter": body.filter, "mode": body.mode,
            "keywords": body.keywords, "dedup": body.dedup, "min_relevance": body.min_relevance,
            "order_by": body.order_by, "descending": body.descending,
            "candidates": body.candidates}

