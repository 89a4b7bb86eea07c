"""Every error leaves the service as an RFC 9457 problem: application/problem+json
{type, title, status, detail}. Core error types are mapped to HTTP statuses here, only here.

A problem's body is rendered by `problem_body` alone, and written by one of three writers,
whatever answers: `problem_response` (the app's exception handlers), `send_problem` (ASGI
middleware below them) and `problem_http` (the HTTP server's own refusals, before any ASGI).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from api.schemas import ProblemBody
from retrieval import errors as core_errors
from retrieval.search.batcher import QueueFullError

PROBLEM_TYPE = "https://clipdex.dev/problems/"  # + slug; documentation anchors, not fetched
PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("api")


class Problem(Exception):
    """An HTTP problem: raised by the service's own code, or built to refuse a request.
    `headers` go on the response (Retry-After, WWW-Authenticate); `extra` are RFC 9457
    extension members of the body."""

    def __init__(self, status: int, title: str, detail: str, slug: str | None = None,
                 headers: dict[str, str] | None = None, extra: Mapping[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = dict(extra or {})


def internal_error() -> Problem:
    """What a client hears when the service failed unexpectedly (the log has the rest)."""
    return Problem(500, "Internal error", "the service failed unexpectedly; the log has details")


# Core error class name -> (status, title); the most specific class in the MRO wins.
CORE_ERRORS: dict[str, tuple[int, str]] = {
    "BadImageError": (422, "Unreadable image"),
    "ImageTooLargeError": (413, "Image too large"),
    "UnsupportedImageError": (415, "Unsupported image format"),
    "BadCursorError": (422, "Bad cursor"),
    "FilterError": (422, "Bad filter"),
    "MetadataError": (422, "Bad metadata"),
    "StaleCursorError": (409, "Stale cursor"),
    "TooDeepError": (422, "Too deep"),
    "InvalidQueryError": (422, "Bad query"),
    "ManifestError": (422, "Bad manifest"),
    "UnknownItemError": (404, "Not found"),
    "ExternalModelError": (409, "Model not available"),
    "IndexMismatchError": (409, "Index and model mismatch"),
    "IndexNotFoundError": (503, "Index not available"),
    "IndexCorruptError": (503, "Index not available"),
    "IndexStoreError": (503, "Index not available"),
    "ModelLoadError": (503, "Model not loaded"),
    "CheckpointError": (503, "Model not loaded"),
    # The query is valid and may pass when the service is less loaded; the detail says how
    # to make it cheaper. 503, not 422: a client must not take a valid query for a bad one.
    "QueryTimeoutError": (503, "Query timed out"),
}


# What the service can still do, said after the core's message (which names no routes).
EXTERNAL_MODEL_HINT = "POST /search/vector, or /search/multi with item_id terms"
CORE_HINTS = {"ExternalModelError": EXTERNAL_MODEL_HINT}


def core_problem(error: core_errors.ClipdexError) -> Problem:
    """The one place a core error becomes an HTTP status."""
    detail = redact_paths(str(error))
    for cls in type(error).__mro__:
        if cls.__name__ in CORE_ERRORS:
            status, title = CORE_ERRORS[cls.__name__]
            hint = CORE_HINTS.get(cls.__name__)
            return Problem(status, title, f"{detail}; {hint}" if hint else detail)
    return Problem(422, "Cannot process request", detail)


# An absolute file system path: "/" then at least one "dir/" and a last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s/'\"(),;<>]+/)+([^\s/'\"(),;<>]*)")


def redact_paths(text: str) -> str:
    """Core errors name files with their full paths, which the CLI's user needs and a remote
    client must not see (the server's layout): each becomes its last part ("images.npy")."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "(a folder)", text)


def problem_body(problem: Problem) -> bytes:
    """The one rendering of a problem's body: type, title, status and detail, then its
    extension members (which never replace those four). Compact UTF-8 JSON, as Starlette's
    JSONResponse renders it."""
    members: dict[str, Any] = {"type": PROBLEM_TYPE + problem.slug, "title": problem.title,
                               "status": problem.status, "detail": problem.detail}
    members.update((key, value) for key, value in problem.extra.items() if key not in members)
    return json.dumps(members, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


def problem_response(problem: Problem) -> Response:
    """The problem as the app's exception handlers return it."""
    return Response(problem_body(problem), status_code=problem.status,
                    headers=problem.headers, media_type=PROBLEM_MEDIA_TYPE)


def problem_headers(problem: Problem, body: bytes,
                    close: bool = False) -> list[tuple[bytes, bytes]]:
    """The response headers of a problem written below the app: its type and length, its own
    headers, and `connection: close` when the connection ends after it."""
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
               (b"content-length", str(len(body)).encode()),
               *((name.lower().encode("latin-1"), value.encode("latin-1"))
                 for name, value in problem.headers.items())]
    if close:
        headers.append((b"connection", b"close"))
    return headers


async def send_problem(send: Send, problem: Problem, close: bool = False) -> None:
    """The problem straight onto an ASGI channel, for middleware below the app's exception
    handlers; `close` when the rest of the request body will not be read."""
    body = problem_body(problem)
    await send({"type": "http.response.start", "status": problem.status,
                "headers": problem_headers(problem, body, close)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def problem_http(problem: Problem, reason: str) -> bytes:
    """The problem as a whole HTTP/1.1 response that closes its connection, for the server's
    refusals written before any request reaches ASGI (`reason`: the status line's phrase)."""
    body = problem_body(problem)
    head = b"".join(name + b": " + value + b"\r\n"
                    for name, value in problem_headers(problem, body, close=True))
    return f"HTTP/1.1 {problem.status} {reason}\r\n".encode() + head + b"\r\n" + body


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        parts.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) + " (see the OpenAPI schema at /docs for the accepted values)"


# Why each problem status can happen, for the OpenAPI schema (`problem_responses`).
PROBLEM_STATUSES: dict[int, str] = {
    400: "The body is not well-formed JSON or multipart data",
    401: "A key is needed and was missing or not valid",
    403: "The key may not do this, or writes are disabled on this service",
    404: "No such item or index",
    409: "The index changed since the cursor was issued, does not fit the model (or holds "
         "embeddings of a model the service cannot load: text and image queries), or has no "
         "root",
    413: "The request body or the image is over the service's limit",
    415: "The image is in a format the service does not accept",
    422: "The request is well formed but its values are not valid; the detail says which",
    503: "Not ready, busy, the index is unavailable, or the query ran past the statement time "
         "limit; retry later",
}
RETRY_AFTER = {"description": "seconds to wait before retrying (when the state is temporary)",
               "schema": {"type": "string", "pattern": "^[0-9]+$"}}
WWW_AUTHENTICATE = {"description": "how to present a key", "required": True,
                    "schema": {"type": "string"}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the problems an operation can answer, so clients (and schema
    checkers) know every status and that error bodies are application/problem+json."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:  # fresh dicts each time: FastAPI merges into them in place
        body = {"application/problem+json": {"schema": ProblemBody.model_json_schema()}}
        responses[status] = {"description": PROBLEM_STATUSES[status], "content": body}
        if status == 401:
            responses[status]["headers"] = {"WWW-Authenticate": WWW_AUTHENTICATE}
        if status == 503:
            responses[status]["headers"] = {"Retry-After": RETRY_AFTER}
    return responses


HTTP_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
               405: "Method not allowed", 413: "Request too large"}


def install(app: FastAPI) -> None:
    async def on_problem(request: Request, error: Problem) -> Response:
        return problem_response(error)

    async def on_core(request: Request, error: core_errors.ClipdexError) -> Response:
        return problem_response(core_problem(error))

    async def on_validation(request: Request, error: RequestValidationError) -> Response:
        return problem_response(Problem(422, "Invalid request", _validation_detail(error)))

    async def on_http(request: Request, error: StarletteHTTPException) -> Response:
        title = HTTP_TITLES.get(error.status_code, "HTTP error")
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint {request.url.path}; see /docs for the API"
        return problem_response(Problem(error.status_code, title, detail,
                                        headers=dict(error.headers or {})))

    async def on_busy(request: Request, error: QueueFullError) -> Response:
        retry = str(request.app.state.settings.retry_after_s)
        return problem_response(Problem(503, "Service busy", f"{error}; retry after {retry} s",
                                        headers={"Retry-After": retry}))

    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(internal_error())

    handlers: list[tuple[Any, Any]] = [
        (Problem, on_problem), (core_errors.ClipdexError, on_core),
        (RequestValidationError, on_validation), (StarletteHTTPException, on_http),
        (QueueFullError, on_busy), (Exception, on_unexpected),
    ]
    for error_type, handler in handlers:
        app.add_exception_handler(error_type, handler)
