"""The answers the HTTP server writes itself, before any request reaches the app: each an
RFC 9457 problem on the wire (`api.errors.problem_http`; uvicorn's own are plain text)."""

from __future__ import annotations

from typing import Any

from api.errors import Problem, problem_http

REFUSALS = {  # status: (reason phrase, title, slug, detail with the limits' fields)
    400: ("Bad Request", "Malformed request", "malformed-request",
          ("the request is not well-formed HTTP/1.1 (its framing, a header line or the "
           "request line is invalid, or it sends both Content-Length and Transfer-Encoding); "
           "the connection is closed")),
    414: ("URI Too Long", "URI too long", "uri-too-long",
          "the request target is over the {max_url_bytes:,}-byte limit"),
    408: ("Request Timeout", "Request timeout", "request-timeout",
          "the request headers (or trailers) did not arrive within {head_timeout_s:g} s"),
    429: ("Too Many Requests", "Too many connections", "too-many-connections",
          ("this address has {max_connections_per_address:,} connections open; reuse them "
           "(keep-alive) or retry after 1 s")),
    431: ("Request Header Fields Too Large", "Request headers too large", "headers-too-large",
          ("the request line and headers are over the {max_head_bytes:,}-byte limit (a "
           "chunked body's trailers over {max_trailer_bytes:,})")),
    503: ("Service Unavailable", "Service busy", "service-busy",
          ("the service holds its maximum of connections; only health checks and requests "
           "with a key are served now; retry after 1 s")),
}
RETRY_AFTER = (429, 503)


def refusal(status: int, limits: dict[str, Any]) -> Problem:
    """The problem refusing a request or connection with `status`; its detail names the
    limit from `limits`."""
    _, title, slug, detail = REFUSALS[status]
    headers = {"Retry-After": "1"} if status in RETRY_AFTER else None
    return Problem(status, title, detail.format(**limits), slug=slug, headers=headers)


def refusal_bytes(status: int, limits: dict[str, Any]) -> bytes:
    """A whole response refusing a request or connection with `status` (closing it)."""
    return problem_http(refusal(status, limits), REFUSALS[status][0])
