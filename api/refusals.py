"""The answers the HTTP server writes itself, before or outside the app: each an RFC 9457
problem on the wire (uvicorn's own are plain text)."""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from api.errors import PROBLEM_TYPE

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


def refusal_bytes(status: int, limits: dict[str, Any]) -> bytes:
    """A whole response refusing a request or connection with `status` (closing it); the
    detail names the limit from `limits`."""
    reason, title, slug, detail = REFUSALS[status]
    body = json.dumps({"type": PROBLEM_TYPE + slug, "title": title, "status": status,
                       "detail": detail.format(**limits)}).encode()
    retry = "retry-after: 1\r\n" if status in RETRY_AFTER else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n".encode()
            + body)


def problem_500(cycle: RequestResponseCycle) -> Any:
    """uvicorn's answer when the app fails before responding, as a problem (it is plain text)."""

    async def send_500_response() -> None:
        body = json.dumps({"type": PROBLEM_TYPE + "internal-error", "title": "Internal error",
                           "status": 500, "detail": "the service failed unexpectedly; the log "
                           "has details"}).encode()
        await cycle.send({"type": "http.response.start", "status": 500, "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await cycle.send({"type": "http.response.body", "body": body, "more_body": False})

    return send_500_response
