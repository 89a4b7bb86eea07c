"""Limits at the door, as pure ASGI middleware: a request body cap counted while the body
streams in, and a cap on requests in flight.

The body cap wraps `receive`, adds up the bytes of each http.request message and answers 413 as
soon as the total passes the cap, before the application has buffered the whole body.

The in-flight cap answers 503 with Retry-After, before routing or reading the body, once
`max_in_flight` requests are inside the application. The batchers already shed encode work by
expected wait; this bounds everything else a request can hold while it waits (an upload being
decoded on a pool thread, a search, its body), so memory stays bounded under any load. Health,
readiness and metrics are exempt: an overloaded service must still say that it is alive.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

from api.errors import PROBLEM_TYPE

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_BYTES = 64 * 1024  # a refused request with a bigger body gets its connection closed


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing re-raises it instead of answering 400."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is over the {max_bytes:,}-byte limit; send a "
                              "smaller image (downscale or recompress it) or fewer terms")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await send_problem(send, 413, "Request too large", "request-too-large",
                           BodyTooLarge(self.max_bytes).detail, close=True)


class InFlightLimitMiddleware:
    """At most `max_in_flight` requests inside the app; the next one gets 503 at once."""

    def __init__(self, app: ASGIApp, max_in_flight: int, retry_after_s: int,
                 exempt: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.app, self.max_in_flight, self.exempt = app, max_in_flight, exempt
        self.retry_after = str(retry_after_s)
        self.in_flight = 0  # one event loop: a plain counter is race-free
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            self.refused += 1
            # Keep the connection for the client's retry unless a big body would need draining.
            await send_problem(send, 503, "Service busy", "service-busy",
                               f"{self.max_in_flight} requests are already in progress; retry "
                               f"after {self.retry_after} s",
                               close=(_content_length(scope) or 0) > DRAIN_BYTES,
                               extra_headers=[(b"retry-after", self.retry_after.encode())])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def send_problem(send: Send, status: int, title: str, slug: str, detail: str,
                       close: bool = False,
                       extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An RFC 9457 problem straight onto the ASGI channel, for middleware below the app's
    exception handlers; `close` when the rest of the request body will not be read."""
    body = json.dumps({"type": PROBLEM_TYPE + slug, "title": title, "status": status,
                       "detail": detail}).encode()
    headers = [(b"content-type", b"application/problem+json"),
               (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
