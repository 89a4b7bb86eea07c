"""Search endpoints: text, image upload, vector and weighted multi-queries, zero-shot
classification and captioning by retrieval."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, UploadFile
from pydantic import AfterValidator, Field, WithJsonSchema

from api.deps import Leased, ReadAccess, State
from api.errors import Problem, problem_responses
from api.images import decode_base64, upload_openapi
from api.limits import body_limit
from api.query import PageRequest, encode_image, encode_text, encode_texts, hit_body, search_page
from api.schemas import (
    LABELS_DESCRIPTION,
    MAX_LABEL_CHARS,
    NOT_BLANK,
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
from retrieval.search import (
    ZERO_SHOT_TEMPLATE,
    Searcher,
    combine,
    logit_scale,
    normalise,
    zero_shot_probabilities,
)

# Every search can meet these; routes add what their inputs make possible (cursors: 409,
# uploads: 415, item ids: 404).
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
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS,
                             json_schema_extra=NOT_BLANK), AfterValidator(not_blank)]
UPLOAD = upload_openapi("image")


@router.post("/search/text", response_model=SearchResponse, responses=problem_responses(409),
             openapi_extra=body_limit(TEXT_QUERY_BODY_BYTES),
             summary="Text query: top-k images (or texts) with scores")
async def search_text(body: SearchTextRequest, state: State,
                      searcher: Leased) -> SearchResponse:
    query = await encode_text(state, body.text)
    return await search_page(state, searcher, query, _paging(body, body.target),
                             f"text:{body.text}")


@router.post("/search/image", response_model=SearchResponse,
             responses=problem_responses(409, 415), openapi_extra=UPLOAD,
             summary="Image upload: top-k texts (target=text) or similar images (target=image)")
async def search_image(state: State, searcher: Leased, image: ImageFile,
                       target: FormTarget = "text", k: FormK = 10,
                       threshold: FormThreshold = None,
                       cursor: FormCursor = None) -> SearchResponse:
    data = await image.read()
    query = await encode_image(state, data)
    return await search_page(state, searcher, query, PageRequest(target, k, threshold, cursor),
                             "image:" + hashlib.sha256(data).hexdigest())


@router.post("/search/vector", response_model=SearchResponse,
             openapi_extra=body_limit(VECTOR_QUERY_BODY_BYTES),
             responses=problem_responses(409),
             summary="Embedding query: a vector in, results out (normalised first)")
async def search_vector(body: SearchVectorRequest, state: State,
                        searcher: Leased) -> SearchResponse:
    query = searcher.check_vector(body.vector)
    return await search_page(state, searcher, query, _paging(body, body.target),
                             "vector:" + hashlib.sha256(query.tobytes()).hexdigest())


@router.post("/search/multi", response_model=SearchResponse,
             responses=problem_responses(404, 409, 415),
             summary="Weighted multi-query: sum of weight x unit embedding, normalised")
async def search_multi(body: SearchMultiRequest, state: State,
                       searcher: Leased) -> SearchResponse:
    vectors = await asyncio.gather(*(_term_vector(state, searcher, term) for term in body.terms))
    query = combine([(term.weight, vector) for term, vector in zip(body.terms, vectors)])
    terms = json.dumps(body.model_dump(include={"terms"}), sort_keys=True)
    return await search_page(state, searcher, query, _paging(body, body.target),
                             "multi:" + hashlib.sha256(terms.encode()).hexdigest())


async def _term_vector(state: State, searcher: Searcher, term: QueryTerm) -> np.ndarray:
    if term.text is not None:
        return await encode_text(state, term.text)
    if term.image_base64 is not None:
        return await encode_image(state, decode_base64(term.image_base64))
    if term.item_id is not None:
        return await asyncio.to_thread(searcher.item_vector, term.item_id)
    return searcher.check_vector(term.vector)


@router.post("/classify", response_model=ClassifyResponse, responses=problem_responses(415),
             openapi_extra=UPLOAD,
             summary="Zero-shot classification: label probabilities for an image")
async def classify(state: State, searcher: Leased, image: ImageFile,
                   labels: Annotated[list[Label], Form(
                       min_length=1, max_length=MAX_LABELS, description=LABELS_DESCRIPTION,
                       json_schema_extra={"uniqueItems": True})]
                   ) -> ClassifyResponse:
    labels = _check_labels(labels)
    prompts = [ZERO_SHOT_TEMPLATE.format(label) for label in labels]
    image_vector, label_vectors = await asyncio.gather(encode_image(state, await image.read()),
                                                       encode_texts(state, prompts))
    assert state.clip is not None
    probabilities = zero_shot_probabilities(image_vector, np.stack(label_vectors),
                                            logit_scale(state.clip))
    ranked = sorted(zip(labels, probabilities.tolist()), key=lambda pair: -pair[1])
    return ClassifyResponse(labels=[LabelProbability(label=label, probability=p)
                                    for label, p in ranked], template=ZERO_SHOT_TEMPLATE)


def _check_labels(labels: list[str]) -> list[str]:
    cleaned = [label.strip() for label in labels]  # Label has checked length and blankness
    if len(set(cleaned)) != len(cleaned):
        # Duplicates after trimming: a rule the schema's uniqueItems cannot state exactly.
        raise Problem(422, "Duplicate labels", "labels: each label may appear only once")
    return cleaned


@router.post("/caption", response_model=CaptionResponse, responses=problem_responses(415),
             openapi_extra=UPLOAD,
             summary="Caption by retrieval: the indexed texts that best match an image")
async def caption(state: State, searcher: Leased, image: ImageFile,
                  k: Annotated[int, Form(ge=1, le=100, description="captions to return")] = 5
                  ) -> CaptionResponse:
    query = normalise(await encode_image(state, await image.read()))
    hits = (await asyncio.to_thread(searcher.search, "text", query[None, :], k))[0]
    base = state.settings.public_url
    return CaptionResponse(captions=[hit_body(hit, base) for hit in hits],
                           generation=searcher.generation.name)


def _paging(body, target: str) -> PageRequest:
    return PageRequest(target, body.k, body.threshold, body.cursor)
