"""Limits at the door, as pure ASGI middleware, in the order a request meets them:

1. `Door` finds the route and applies its policy before the application sees anything:
   - the key the route needs (read or admin) is checked from the headers, so a client
     without a valid key is answered 401/403 before one byte of its body is read;
   - the route's own body cap (a text query needs kilobytes, an upload megabytes): a declared
     Content-Length over it is refused with 413 at once, a streamed body as soon as it passes;
   - the whole body is read before the request counts as in flight, within an idle timeout
     and a total deadline (408 past either), and within a byte budget shared by every body
     being received (503 past it). A stalled or trickling upload therefore holds only its
     connection and the bytes it sent, never a place that complete requests need.
2. `InFlightLimitMiddleware` admits at most `max_in_flight` complete requests into the
   application and answers the next one 503 with Retry-After, before routing.

Refusals keep the connection open (but a body timeout's): uvicorn reads and discards the
unread rest of the body without buffering it, so the client gets its 401, 413 or 503 instead
of a connection reset (closing with unread bytes in the socket makes the kernel send RST, and
the client loses the answer). What a refused client can still do is spend its own bandwidth.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match

from api.errors import PROBLEM_TYPE, Problem

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
AccessCheck = Callable[[str, Headers], None]  # (need, headers) -> raises Problem

BODY_LIMIT_KEY = "x-max-body-bytes"  # in a route's openapi_extra: its body cap
NO_BODY_LIMIT = 4 * 1024  # routes without a request body (GET, DELETE)


def body_limit(max_bytes: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A route's `openapi_extra` naming its body cap (the Door enforces it; /docs shows it)."""
    return {**(extra or {}), BODY_LIMIT_KEY: max_bytes}


@dataclass(frozen=True)
class DoorConfig:
    max_body_bytes: int  # cap of routes that take uploads, and default of body routes
    body_idle_s: float = 10.0  # longest silence while a body arrives, then 408
    body_deadline_s: float = 60.0  # longest time for a whole body, then 408
    max_buffered_bytes: int = 256 * 1024 * 1024  # bodies being received, all together


@dataclass(frozen=True)
class RoutePolicy:
    need: str | None  # "read", "admin" or None (public)
    max_body: int


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


class Door:
    def __init__(self, app: ASGIApp, config: DoorConfig, routes: Sequence[BaseRoute],
                 policy_of: Callable[[BaseRoute, int], RoutePolicy], check: AccessCheck):
        self.app, self.config, self.routes = app, config, routes
        self.policy_of, self.check = policy_of, check
        self.buffered = 0  # bytes of bodies being received now (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self._policy(scope)
        declared = _content_length(scope)
        try:
            if policy.need is not None:
                self.check(policy.need, Headers(scope=scope))
            if declared is not None and declared > policy.max_body:
                raise BodyTooLarge
            body = await self._read_body(receive, declared, policy.max_body)
        except Problem as problem:
            await send_problem(send, problem.status, problem.title, problem.slug,
                               problem.detail, extra_headers=[(k.lower().encode(), v.encode())
                                                              for k, v in problem.headers.items()])
            return
        except BodyTooLarge:
            await send_problem(send, 413, "Request too large", "request-too-large",
                               too_large_detail(policy.max_body))
            return
        except ClientGone:
            return  # nobody to answer
        except BodyTimeout:
            await send_problem(send, 408, "Request timeout", "request-timeout",
                               f"the request body did not arrive in time (no byte for "
                               f"{self.config.body_idle_s:g} s, or not all of it in "
                               f"{self.config.body_deadline_s:g} s)", close=True)
            return
        await self.app(scope, _replay(body, receive), send)

    def _policy(self, scope: Scope) -> RoutePolicy:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return self.policy_of(route, self.config.max_body_bytes)
            if match is Match.PARTIAL and partial is None:
                partial = route
        if partial is not None:  # the path exists, not with this method: 405 follows
            return self.policy_of(partial, self.config.max_body_bytes)
        return RoutePolicy(None, NO_BODY_LIMIT)

    async def _read_body(self, receive: Receive, declared: int | None, cap: int) -> bytes:
        """The whole body, or BodyTooLarge / BodyTimeout / a 503 Problem (budget spent)."""
        reserved = 0
        chunks: list[bytes] = []
        started = time.monotonic()
        try:
            if declared:
                reserved = self._reserve(declared)
            received, more = 0, True
            while more:
                left = self.config.body_deadline_s - (time.monotonic() - started)
                try:
                    message = await asyncio.wait_for(
                        receive(), min(self.config.body_idle_s, max(left, 0.0)))
                except asyncio.TimeoutError:
                    raise BodyTimeout from None
                if message["type"] != "http.request":
                    raise ClientGone
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > cap:
                    raise BodyTooLarge
                if received > reserved:
                    reserved += self._reserve(received - reserved)
                chunks.append(chunk)
                more = message.get("more_body", False)
            return b"".join(chunks)
        finally:
            self.buffered -= reserved

    def _reserve(self, count: int) -> int:
        if self.buffered + count > self.config.max_buffered_bytes:
            raise Problem(503, "Service busy", "too many request bodies are arriving at once; "
                          "retry after 1 s", slug="service-busy", headers={"Retry-After": "1"})
        self.buffered += count
        return count


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
            # The connection stays open: uvicorn discards any unread body, the client reads
            # its 503 (closing with unread bytes would reset the connection).
            await send_problem(send, 503, "Service busy", "service-busy",
                               f"{self.max_in_flight} requests are already in progress; retry "
                               f"after {self.retry_after} s",
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
            return int(value) if value.isdigit() and len(value) < 19 else None
    return None
