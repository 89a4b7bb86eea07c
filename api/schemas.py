"""Request and response bodies, named by role; every field carries its bounds for OpenAPI."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.settings import MAX_K, MAX_LABELS, MAX_MULTI_TERMS, MAX_TEXT_CHARS

Target = Literal["image", "text"]
K = Annotated[int, Field(ge=1, le=MAX_K, description="hits per page (more than the index "
                                                     "holds is fine)")]
Threshold = Annotated[float | None, Field(ge=-1.0, le=1.0, description="drop hits whose cosine "
                                                                       "score is below this")]
Cursor = Annotated[str | None, Field(max_length=512, description="next_cursor of the previous "
                                                                 "page, to continue the list")]
QueryText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, description=(
    "1 to 1000 characters, not only spaces; tokens past the model's context are truncated"))]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the text is empty or only whitespace; type some words")
    return text


class _Paged(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: K = 10
    threshold: Threshold = None
    cursor: Cursor = None


class SearchTextRequest(_Paged):
    text: QueryText
    target: Target = Field("image", description="which side of the index to search")
    _blank = field_validator("text")(_not_blank)


class SearchVectorRequest(_Paged):
    vector: list[float] = Field(min_length=1, max_length=4096,
                                description="a query embedding of the index's dimension; "
                                            "normalised before search")
    target: Target = "image"


class QueryTerm(BaseModel):
    """One weighted term: exactly one of text, image_base64, item_id or vector."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(ge=-10.0, le=10.0, description="negative weights steer away")
    text: QueryText | None = None
    image_base64: str | None = Field(None, max_length=14_000_000,
                                     description="a JPEG/PNG/WebP/GIF file, base64-encoded")
    item_id: int | None = Field(None, ge=0, description="an indexed item's stored embedding")
    vector: list[float] | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _exactly_one(self) -> QueryTerm:
        given = [name for name in ("text", "image_base64", "item_id", "vector")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("each term needs exactly one of text, image_base64, item_id, "
                             f"vector (got {given or 'none'})")
        if self.text is not None:
            _not_blank(self.text)
        return self


class SearchMultiRequest(_Paged):
    terms: list[QueryTerm] = Field(min_length=1, max_length=MAX_MULTI_TERMS)
    target: Target = "image"


class SearchHit(BaseModel):
    id: int
    score: float = Field(description="cosine similarity, -1..1")
    modality: Target | None = None
    text: str | None = Field(None, description="the caption, for a text item")
    captions: list[str] = Field(default_factory=list, description="an image's captions")
    image_id: int | None = Field(None, description="the image a text item belongs to")
    image_url: str | None = Field(None, description="where to GET the image")
    metadata: dict[str, Any] = Field(default_factory=dict)


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


class ReloadResponse(BaseModel):
    generation: str
    previous: str | None
    changed: bool


class AddTextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[QueryText] = Field(min_length=1, max_length=1000)
    image_id: int | None = Field(None, ge=0, description="the indexed image they caption")


class WriteResponse(BaseModel):
    ids: list[int]
    generation: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    embed_dim: int
    generation: str
    images: int
    texts: int


MAX_LABEL_CHARS = 100
LABELS_DESCRIPTION = f"1 to {MAX_LABELS} labels, each 1 to {MAX_LABEL_CHARS} characters"
