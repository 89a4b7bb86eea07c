"""Request and response bodies, named by role; every field carries its bounds for OpenAPI."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from api.settings import MAX_K, MAX_LABELS, MAX_MULTI_TERMS, MAX_TEXT_CHARS


def _integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; strict mode would not, so convert it first."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# One character that is whitespace neither in JSON Schema's (ECMA-262) regexes nor to Python's
# str.isspace(); spelled out so the schema's pattern and the server's check agree exactly.
VISIBLE = (r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
           r"\ufeff]")
NOT_BLANK = {"pattern": VISIBLE}  # for json_schema_extra; not_blank enforces it


def not_blank(text: str) -> str:
    """Refuse text without a visible character, with a friendlier message than a pattern's."""
    if not re.search(VISIBLE, text):
        raise ValueError("the text is empty or only whitespace; type some words")
    return text


# Strict: a JSON body must use the schema's types (no false -> 0.0, no "10" -> 10).
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)
INTEGRAL = BeforeValidator(_integral)  # after the Field, so its bounds stay in the schema
Target = Literal["image", "text"]
K = Annotated[int, Field(ge=1, le=MAX_K, description="hits per page (more than the index "
                                                     "holds is fine)"), INTEGRAL]
# Ids are SQLite INTEGERs; capped where JSON numbers stop being exact (doubles, JavaScript), so a
# schema validator and the service agree on the boundary.
MAX_ITEM_ID = 2**53 - 1
ItemId = Annotated[int, Field(ge=0, le=MAX_ITEM_ID), INTEGRAL]
Threshold = Annotated[float | None, Field(ge=-1.0, le=1.0, description="drop hits whose cosine "
                                                                       "score is below this")]
Cursor = Annotated[str | None, Field(max_length=512, description="next_cursor of the previous "
                                                                 "page, to continue the list")]
FILTER_DESCRIPTION = (
    'a metadata filter, e.g. {"and": [{"field": "folder", "eq": "2024/trip"}, '
    '{"field": "taken", "gte": "2024-06-01"}]}: conditions {"field": NAME, OP: VALUE} with OP '
    "one of eq, ne, in, nin, gt, gte, lt, lte, exists, prefix, combined by and, or, not; an "
    "unknown field or a value of the wrong type is a 422 naming the field and its type")
MetadataFilter = Annotated[dict[str, Any] | None, Field(description=FILTER_DESCRIPTION)]
QueryText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, description=(
    "1 to 1000 characters, not only spaces; tokens past the model's context are truncated"),
    json_schema_extra=NOT_BLANK), AfterValidator(not_blank)]


class _Paged(BaseModel):
    model_config = REQUEST_CONFIG
    k: K = 10
    threshold: Threshold = None
    cursor: Cursor = None
    filter: MetadataFilter = None
    mode: Literal["vector", "keyword", "hybrid"] = Field("vector", description=(
        "vector: by embedding; keyword: BM25 over captions, texts, file names and string "
        "metadata; hybrid: reciprocal rank fusion of both (k = 60), with both ranks in each "
        "hit. keyword and hybrid take no threshold"))
    keywords: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS, description=(
        "the words for keyword and hybrid modes (default: the query's texts)"))
    dedup: bool = Field(False, description=(
        "collapse near-duplicates (cosine >= 0.95) among the page's hits into the best-scoring "
        "one, which lists the others in 'duplicates'"))
    min_relevance: float | None = Field(None, ge=0.0, le=1.0, description=(
        "vector mode, text to image or image to text, with a calibrated model: stop where a "
        "hit's relevance (the probability it truly matches) falls below this"))
    order_by: str | None = Field(None, min_length=1, max_length=64, description=(
        "vector mode: a date field (taken, modified, ...): the relevant hits (the best "
        "`candidates` by score, cut at min_relevance) in date order, each with its score "
        "and relevance"))
    descending: bool = Field(True, description="with order_by: newest first (false: oldest)")
    candidates: Annotated[int, Field(ge=1, le=10_000, description=(
        "with order_by: how many of the best hits by score are re-ordered")), INTEGRAL] = 500


class SearchTextRequest(_Paged):
    # Examples show in /docs and give Schemathesis's examples phase real requests to send.
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": "a red square", "k": 5}, {"text": "a cat", "target": "text", "threshold": 0.2},
        {"text": "a dog", "filter": {"field": "folder", "prefix": "2024/"}}]})
    text: QueryText
    target: Target = Field("image", description="which side of the index to search")


class SearchVectorRequest(_Paged):
    vector: list[float] = Field(min_length=1, max_length=4096,
                                description="a query embedding of the index's dimension; "
                                            "normalised before search")
    target: Target = "image"


TERM_KINDS = ("text", "image_base64", "item_id", "vector")


class QueryTerm(BaseModel):
    """One weighted term: exactly one of text, image_base64, item_id or vector."""

    # The schema says "exactly one" as oneOf; _exactly_one enforces it with a clear message.
    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra={"oneOf": [
        {"required": [kind], "properties": {kind: {"not": {"type": "null"}}}}
        for kind in TERM_KINDS]})
    weight: float = Field(ge=-10.0, le=10.0, description="negative weights steer away")
    text: QueryText | None = None
    image_base64: str | None = Field(None, min_length=1, max_length=14_000_000,
                                     description="a JPEG/PNG/WebP/GIF file, base64-encoded")
    item_id: ItemId | None = Field(None, description="an indexed item's stored embedding")
    vector: list[float] | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _exactly_one(self) -> QueryTerm:
        given = [name for name in TERM_KINDS
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("each term needs exactly one of text, image_base64, item_id, "
                             f"vector (got {given or 'none'})")
        return self


class SearchMultiRequest(_Paged):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"terms": [{"text": "a red square", "weight": 1.0}, {"item_id": 0, "weight": -0.5}],
         "k": 3}]})
    terms: list[QueryTerm] = Field(min_length=1, max_length=MAX_MULTI_TERMS)
    target: Target = "image"


class SearchHit(BaseModel):
    id: int
    score: float = Field(description="vector mode: cosine similarity, -1..1; keyword: BM25, "
                                     "higher is better; hybrid: the fused (RRF) score")
    modality: Target | None = None
    text: str | None = Field(None, description="the caption, for a text item")
    captions: list[str] = Field(default_factory=list, description="an image's captions")
    image_id: int | None = Field(None, description="the image a text item belongs to")
    image_url: str | None = Field(None, description="where to GET the image")
    metadata: dict[str, Any] = Field(default_factory=dict)
    vector_rank: int | None = Field(None, description="hybrid: the rank by embedding")
    keyword_rank: int | None = Field(None, description="keyword and hybrid: the BM25 rank")
    relevance: float | None = Field(None, description=(
        "calibrated probability that the hit truly matches (models with a calibration; "
        "text to image and image to text queries)"))
    duplicates: list[int] = Field(default_factory=list, description=(
        "dedup: ids of the near-duplicates this hit stands for"))


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    generation: str = Field(description="the index generation that answered")
    next_cursor: str | None = Field(None, description="pass as cursor for the next page; "
                                                      "null at the end")
    took_ms: float


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class ClassifyResponse(BaseModel):
    labels: list[LabelProbability] = Field(description="most probable first")
    template: str


class CaptionResponse(BaseModel):
    captions: list[SearchHit] = Field(description="indexed texts closest to the image")
    generation: str


class ItemResponse(SearchHit):
    score: float | None = None  # type: ignore[assignment]


class BrowseRequest(BaseModel):
    """The items a filter matches, with no query: newest first, or by a field."""

    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra={"examples": [
        {"filter": {"field": "label", "eq": "red"}, "k": 5},
        {"order_by": "label", "descending": False}]})
    filter: MetadataFilter = None
    target: Target = "image"
    order_by: str | None = Field(None, min_length=1, max_length=200, description=(
        "a field to sort by (items without it are left out); none: newest first"))
    descending: bool = True
    k: K = 10
    cursor: Cursor = None


class BrowseResponse(BaseModel):
    hits: list[ItemResponse] = Field(description="items in the order asked; score is null")
    generation: str
    next_cursor: str | None = None
    took_ms: float


class ReloadResponse(BaseModel):
    generation: str
    previous: str | None
    changed: bool


class AddTextsRequest(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra={"examples": [
        {"texts": ["a red square on white"], "image_id": 0}]})
    texts: list[QueryText] = Field(min_length=1, max_length=1000)
    image_id: ItemId | None = Field(None, description="the indexed image they caption")
    metadata: dict[str, Any] | None = Field(None, description=(
        "metadata of each free text (its keys become filterable fields); captions (with "
        "image_id) are filtered by their image's metadata and take none"))


class WriteResponse(BaseModel):
    ids: list[int]
    generation: str
    duplicate: bool = Field(False, description="the image was already indexed: ids names it")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    embed_dim: int
    generation: str
    images: int
    texts: int
    external_model: bool = Field(
        False, description="the index holds embeddings made by a model this service cannot "
                           "load: only vector and item queries are answered")
    queries: list[Literal["text", "image", "vector", "item"]] = Field(
        default_factory=lambda: ["text", "image", "vector", "item"],
        description="the kinds of query this service answers now")
    note: str | None = Field(None, description="why some kinds of query are not answered")


MAX_LABEL_CHARS = 100
LABELS_DESCRIPTION = f"1 to {MAX_LABELS} labels, each 1 to {MAX_LABEL_CHARS} characters"


class ProblemBody(BaseModel):
    """RFC 9457 problem details: the body of every error response (application/problem+json)."""

    type: str = Field(description="a URI naming the kind of problem (a documentation anchor)")
    title: str = Field(description="a short, fixed summary of the kind of problem")
    status: int = Field(ge=400, le=599, description="the HTTP status, repeated")
    detail: str = Field(description="what went wrong with this request and how to fix it")
