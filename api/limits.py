"""Limits on admission into the app, as pure ASGI middleware, in the order a request meets
them:

1. `AdmissionMiddleware` finds the route and applies its policy before the application sees
   anything:
   - the key the route needs (read or admin) is checked from the headers, so a client
     without a valid key is answered 401/403 before one byte of its body is read;
   - the route's own body cap (a text query needs kilobytes, an upload megabytes): a declared
     Content-Length over it is refused with 413 at once, a streamed body as soon as it passes;
   - on JSON routes that take images as base64 strings, a second, smaller cap on the bytes
     outside the JSON's strings (numbers, brackets), checked as they stream: parsing turns
     those into many small objects (10 MB of numbers are ~1 GB of floats and lists), while a
     string stays one object;
   - a multipart form may hold at most MAX_FORM_DELIMITERS boundary delimiters: the form
     parser steps through each one in Python on the event loop (a 10 MB part made of them
     held the loop for 1.5 s);
   - the whole body is read before the request counts as in flight, within the
     `BodyLimits`: an idle timeout and a total deadline (408 past either), and a byte budget
     shared by every body being received (503 past it). A stalled or trickling upload
     therefore holds only its connection and the bytes it sent, never a place that complete
     requests need.
2. `InFlightLimitMiddleware` admits at most `max_in_flight` complete requests into the
   application and answers the next one 503 with Retry-After, before routing.

Refusals keep the connection open (but a body timeout's): uvicorn reads and discards the
unread rest of the body without buffering it, so the client gets its 401, 413 or 503 instead
of a connection reset (closing with unread bytes in the socket makes the kernel send RST, and
the client loses the answer). What a refused client can still do is spend its own bandwidth.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match

from api.errors import Problem, send_problem

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
AccessCheck = Callable[[str, Headers], None]  # (need, headers) -> raises Problem

BODY_LIMIT_KEY = "x-max-body-bytes"  # in a route's openapi_extra: its body cap
STRUCTURE_LIMIT_KEY = "x-max-json-structure-bytes"  # ... and its cap outside JSON strings
NO_BODY_LIMIT = 4 * 1024  # routes without a request body (GET, DELETE)
# A form here has at most ~110 parts (an image, 100 labels, a few fields); each part costs
# one delimiter, the end one more.
MAX_FORM_DELIMITERS = 256


def body_limit(max_bytes: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A route's `openapi_extra` naming its body cap (AdmissionMiddleware enforces it; /docs
    shows it)."""
    return {**(extra or {}), BODY_LIMIT_KEY: max_bytes}


def structure_limit(max_bytes: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON route's `openapi_extra` capping the bytes outside its strings: its numbers and
    brackets may take `max_bytes`, its strings (base64 images) the whole body cap."""
    return {**(extra or {}), STRUCTURE_LIMIT_KEY: max_bytes}


@dataclass(frozen=True)
class BodyLimits:
    """How large request bodies may be, how fast they must arrive, and how many bytes of
    bodies being received the service holds at once."""

    max_body_bytes: int  # cap of routes that take uploads, and default of body routes
    body_idle_s: float = 10.0  # longest silence while a body arrives, then 408
    body_deadline_s: float = 60.0  # longest time for a whole body, then 408
    max_buffered_bytes: int = 256 * 1024 * 1024  # bodies being received, all together


@dataclass(frozen=True)
class RoutePolicy:
    need: str | None  # "read", "admin" or None (public)
    max_body: int
    max_structure: int | None = None  # bytes outside JSON strings; None: no such cap


class BodyTooLarge(Exception):
    def __init__(self, detail: str | None = None):
        super().__init__(detail)
        self.detail = detail


class BodyTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


class AdmissionMiddleware:
    """Admits a request into the app once its route's key is checked and its whole body has
    arrived within its caps and the `BodyLimits` (the module docstring lists each check)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits, routes: Sequence[BaseRoute],
                 policy_of: Callable[[BaseRoute, int], RoutePolicy], check: AccessCheck):
        self.app, self.limits, self.routes = app, limits, routes
        self.policy_of, self.check = policy_of, check
        self.buffered = 0  # bytes of bodies being received now (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self._policy(scope)
        declared = _content_length(scope)
        headers = Headers(scope=scope)
        try:
            if policy.need is not None:
                self.check(policy.need, headers)
            if declared is not None and declared > policy.max_body:
                raise BodyTooLarge
            body = await self._read_body(receive, declared, policy)
        except Problem as problem:
            await send_problem(send, problem)
            return
        except BodyTooLarge as error:
            await send_problem(send, Problem(413, "Request too large",
                                             error.detail or too_large_detail(policy.max_body)))
            return
        except ClientGone:
            return  # nobody to answer
        except BodyTimeout:
            await send_problem(send, Problem(
                408, "Request timeout", f"the request body did not arrive in time (no byte "
                f"for {self.limits.body_idle_s:g} s, or not all of it in "
                f"{self.limits.body_deadline_s:g} s)"), close=True)
            return
        if _too_many_parts(headers, body):
            await send_problem(send, Problem(
                400, "Malformed form", f"the multipart body holds more than "
                f"{MAX_FORM_DELIMITERS} boundary delimiters; a form here has a few parts"))
            return
        scope[UPLOAD_SCOPE_KEY] = _is_upload(headers, body)
        await self.app(scope, _replay(body, receive), send)

    def _policy(self, scope: Scope) -> RoutePolicy:
        route = self._route(scope)
        if route is None:
            return RoutePolicy(None, NO_BODY_LIMIT)
        extra = getattr(route, "openapi_extra", None) or {}
        return replace(self.policy_of(route, self.limits.max_body_bytes),
                       max_structure=extra.get(STRUCTURE_LIMIT_KEY))

    def _route(self, scope: Scope) -> BaseRoute | None:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
            if match is Match.PARTIAL and partial is None:
                partial = route
        return partial  # the path exists, not with this method: 405 follows

    async def _read_body(self, receive: Receive, declared: int | None,
                         policy: RoutePolicy) -> bytes:
        """The whole body, or BodyTooLarge / BodyTimeout / a 503 Problem (budget spent)."""
        reserved, cap = 0, policy.max_body
        shape = JsonShape(policy.max_structure) if policy.max_structure else None
        chunks: list[bytes] = []
        started = time.monotonic()
        try:
            if declared:
                reserved = self._reserve(declared)
            received, more = 0, True
            while more:
                left = self.limits.body_deadline_s - (time.monotonic() - started)
                try:
                    message = await asyncio.wait_for(
                        receive(), min(self.limits.body_idle_s, max(left, 0.0)))
                except asyncio.TimeoutError:
                    raise BodyTimeout from None
                if message["type"] != "http.request":
                    raise ClientGone
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > cap:
                    raise BodyTooLarge
                if shape is not None:
                    shape.feed(chunk)
                if received > reserved:
                    reserved += self._reserve(received - reserved)
                chunks.append(chunk)
                more = message.get("more_body", False)
            return b"".join(chunks)
        finally:
            self.buffered -= reserved

    def _reserve(self, count: int) -> int:
        if self.buffered + count > self.limits.max_buffered_bytes:
            raise Problem(503, "Service busy", "too many request bodies are arriving at once; "
                          "retry after 1 s", slug="service-busy", headers={"Retry-After": "1"})
        self.buffered += count
        return count


_STRING_CONTENT = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # up to a quote


class JsonShape:
    """Counts the bytes of a JSON text outside its strings (numbers, brackets, commas, quotes,
    backslashes) chunk by chunk, and raises BodyTooLarge past `limit`. Strings are skipped by
    one regular expression each, so the Python work is bounded by the bytes counted."""

    def __init__(self, limit: int):
        self.limit, self.outside = limit, 0
        self.in_string = self.escaped = False

    def feed(self, chunk: bytes) -> None:
        at, size = 0, len(chunk)
        if self.escaped and size:  # the byte a backslash at the last chunk's end escaped
            self.escaped, at = False, 1
            self.outside += chunk[0] == 0x5C
        while at < size and self.outside <= self.limit:
            if self.in_string:
                end = _STRING_CONTENT.match(chunk, at).end()  # type: ignore[union-attr]
                self.outside += chunk.count(b"\\", at, end) + (end < size)
                if end == size:
                    break
                if chunk[end] == 0x5C:  # a backslash whose escaped byte comes next chunk
                    self.escaped = True
                    break
                self.in_string, at = False, end + 1
            else:
                quote = chunk.find(b'"', at)
                self.outside += (size if quote == -1 else quote + 1) - at
                if quote == -1:
                    break
                self.in_string, at = True, quote + 1
        if self.outside > self.limit:
            raise BodyTooLarge(
                f"the request's JSON holds over {self.limit:,} bytes outside its strings "
                "(numbers, brackets, keys); only base64 images (strings) may use the rest of "
                "the body limit")


def _too_many_parts(headers: Headers, body: bytes) -> bool:
    media, options = parse_options_header(headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        return False
    return body.count(b"\r\n--" + boundary) > MAX_FORM_DELIMITERS


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message; later calls wait on the client (disconnects)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def too_large_detail(max_bytes: int) -> str:
    return (f"the request body is over this endpoint's {max_bytes:,}-byte limit; send a "
            "smaller image (downscale or recompress it) or fewer terms")


UPLOAD_SCOPE_KEY = "clipdex.upload"  # set on admission: the request carries an image (or more)
UPLOAD_MIN_BYTES = 64 * 1024  # a JSON body this large holds base64 images, not a query


def _is_upload(headers: Headers, body: bytes) -> bool:
    content_type = headers.get("content-type", "")
    return content_type.startswith("multipart/") or len(body) > UPLOAD_MIN_BYTES


class InFlightLimitMiddleware:
    """At most `max_in_flight` requests inside the app, and of them at most half carrying
    uploads (AdmissionMiddleware marks those); the next one gets 503 at once.

    The uploads' own cap is a bulkhead: forty clients resending scan bombs held every place
    and the text searches beside them got 503. Each bomb is refused cheaply now, but the
    places they held were the ones queries need; with half reserved for requests without
    an upload, a flood of uploads slows queries but never refuses them."""

    def __init__(self, app: ASGIApp, max_in_flight: int, retry_after_s: int,
                 exempt: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.app, self.max_in_flight, self.exempt = app, max_in_flight, exempt
        self.max_uploads = max(1, max_in_flight // 2)
        self.retry_after = str(retry_after_s)
        self.in_flight = self.uploads = 0  # one event loop: plain counters are race-free
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        upload = bool(scope.get(UPLOAD_SCOPE_KEY))
        if self.in_flight >= self.max_in_flight or (upload and self.uploads >= self.max_uploads):
            self.refused += 1
            held, what = ((self.max_uploads, "requests with uploads") if upload and
                          self.in_flight < self.max_in_flight else (self.max_in_flight,
                                                                    "requests"))
            # The connection stays open: uvicorn discards any unread body, the client reads
            # its 503 (closing with unread bytes would reset the connection).
            await send_problem(send, Problem(
                503, "Service busy", f"{held} {what} are already in progress; retry after "
                f"{self.retry_after} s", headers={"Retry-After": self.retry_after}))
            return
        self.in_flight += 1
        self.uploads += upload
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.uploads -= upload


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) < 19 else None
    return None
