"""Schemathesis hooks for the clipdex schema fuzz, loaded through SCHEMATHESIS_HOOKS.

- Image strategies: the schema says an upload is "image/png, image/jpeg, ..."; these draw small
  real images of those types, so schema-valid uploads decode (negative cases still send junk).
- `valid_requests_pass_validation`: a check that a schema-valid request never fails the
  service's own request validation (see schemathesis.toml for why it is needed).
- `filter_failure`: drops exactly two Schemathesis 4.x false positives, each recognised from
  the case itself (they show up as `filtered` in the run report, never silently).
"""

from __future__ import annotations

import io
import json
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import jsonschema_rs
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
VALIDATION_PROBLEM = "https://clipdex.dev/problems/invalid-request"  # request validation failed
MULTIPART = "multipart/form-data"


def _encode(size: tuple[int, int], colour: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    """A small solid-colour image file in `fmt`, 1..64 pixels a side."""
    sides = st.tuples(st.integers(1, 64), st.integers(1, 64))
    colours = st.tuples(*[st.integers(0, 255)] * 3)
    return st.builds(_encode, sides, colours, st.just(fmt))


for media_type, fmt in FORMATS.items():
    schemathesis.openapi.media_type(media_type, images(fmt))


@schemathesis.check
def valid_requests_pass_validation(ctx: Any, response: Any, case: Any) -> None:
    """A schema-valid request answered 422 "invalid-request" means the published schema and
    the service's validator disagree. Narrower than positive_data_acceptance, which the config
    relaxes where a rule cannot be written in JSON Schema (then 422 has another problem type)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return
    try:
        problem_type = response.json().get("type")
    except (ValueError, AttributeError):
        return
    if problem_type == VALIDATION_PROBLEM:
        raise AssertionError(f"a schema-valid request failed validation: {response.text[:300]}")


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but the two known false positives below."""
    return not (_form_valid_as_sent(failure, case, response)
                or _unfilled_multipart_example(failure, case))


def _form_valid_as_sent(failure: Any, case: Any, response: Any) -> bool:
    """ST201 on a multipart body whose parts, read the way a server reads a form, satisfy the
    schema: the "invalid" case was valid on the wire. A form has no types (k=[5] and k=5 both
    send the part "5"; labels=[null] sends the label "null") and repeated parts make an array.
    Schemathesis reads a form the same way but takes one part per field, so any array field
    defeats its own allowance (and its negated patterns are not always non-matching)."""
    meta = case.meta
    if failure.code != "ST201" or case.media_type != MULTIPART or meta is None:
        return False
    if any(component.mode.is_negative and location.value != "body"
           for location, component in meta.components.items()):
        return False  # another part of the request was made invalid too
    fields = _sent_fields(response)
    body = case.operation.get_body_for_media_type(case.media_type)
    schema = body.resolved_schema if body is not None else None
    if fields is None or not schema or schema.get("additionalProperties") is False:
        return False
    properties = body.form_properties
    sent: dict[str, Any] = {}
    for name, texts in fields.items():
        if name not in properties:
            continue  # an extra field, which the schema allows and the service ignores
        items = _array_items(properties[name])
        if items is not None:
            sent[name] = [_reading(text, items) for text in texts]
        else:
            sent[name] = _reading(texts[-1], properties[name])
    whole = {"type": "object", "properties": properties, "required": schema.get("required", [])}
    return _valid(whole, sent)


def _sent_fields(response: Any) -> dict[str, list[str]] | None:
    """The multipart body actually sent: field -> its parts' texts ("" for a file part)."""
    content = response.request.body
    content = content.encode() if isinstance(content, str) else content
    if not isinstance(content, bytes):
        return None
    header = f"Content-Type: {response.request.headers.get('Content-Type', '')}\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(header.encode() + content)
    fields: dict[str, list[str]] = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True) or b""
        text = "" if part.get_filename() is not None else payload.decode(errors="replace")
        fields.setdefault(part.get_param("name", header="content-disposition"), []).append(text)
    return fields


def _array_items(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The item schema when a form field may be an array (directly or in an anyOf)."""
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") == "array":
            return option.get("items", {})
    return None


def _reading(text: str, schema: dict[str, Any]) -> Any:
    """The text, or its JSON value (a number, a boolean) where only that fits the schema."""
    if _valid(schema, text):
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if _valid(schema, parsed) else text


def _unfilled_multipart_example(failure: Any, case: Any) -> bool:
    """A "positive" coverage case that is not schema-valid: for multipart bodies with custom
    encodings Schemathesis fills every other required field with "" whatever its schema says
    (coverage/_operation.py, _generate_multipart_body_from_custom_strategies)."""
    meta = case.meta
    data = meta.phase.data if meta is not None else None
    if (failure.code not in ("ST202", "ST901") or case.media_type != MULTIPART
            or getattr(data, "description", None) != "Multipart body with custom encoding"):
        return False
    properties = _form_properties(case)
    return any(value == "" and not _valid(properties.get(name, {}), value)
               for name, value in case.body.items())


def _form_properties(case: Any) -> dict[str, Any]:
    body = case.operation.get_body_for_media_type(case.media_type)
    return body.form_properties if body is not None else {}


def _valid(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema_rs.validator_for(schema).is_valid(value)
