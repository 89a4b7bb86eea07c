"""What the service accepts as an image upload (and the JSON fields of an upload's form);
decoding itself is the core's one decoder (`retrieval.inputs.images.load_image`), shared with the
indexer."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from api.errors import Problem
from retrieval.errors import BadImageError
from retrieval.inputs.images import DecodeLimits

# GIF and animations: the first frame; MPO (phones' and cameras' multi-picture JPEG) and
# HEIF (phones' HEIC): the primary image; AVIF: the first frame of a sequence
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "HEIF", "AVIF")
UPLOAD_MEDIA_TYPES = "image/jpeg, image/png, image/webp, image/gif, image/heic, image/heif, " \
    "image/avif"


def upload_openapi(*fields: str) -> dict[str, Any]:
    """A multipart route's `openapi_extra`: the media types its file parts accept, so the schema
    says "an image file" rather than any bytes (the server sniffs the bytes, not this header)."""
    encoding = {name: {"contentType": UPLOAD_MEDIA_TYPES} for name in fields}
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}}}


def upload_limits(max_pixels: int, max_bytes: int, draft_side: int | None = None
                  ) -> DecodeLimits:
    """The core decoder's limits for uploads: the service's caps and the formats above, and
    reduced-size JPEG decoding down to what the model needs."""
    return DecodeLimits(max_pixels=max_pixels, max_bytes=max_bytes, formats=ALLOWED_FORMATS,
                        draft_side=draft_side)


def decode_base64(text: str) -> bytes:
    """A base64 image (a data: URL prefix is allowed) -> bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError("image_base64 is not valid base64; encode the file's bytes "
                            "with standard base64") from None


def form_json(text: str | None, name: str) -> dict[str, Any] | None:
    """A JSON object sent as a form field's text (multipart requests carry no JSON body); a
    problem titled after the field ("Bad filter"), which the form's schema cannot refuse."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise Problem(422, f"Bad {name}", f"{name}: not a JSON object; send one (e.g. "
                      '{"field": "label", "eq": "red"}) as the field\'s text')
    return value
