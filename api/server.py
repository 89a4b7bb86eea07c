"""The HTTP server under the app: uvicorn's httptools protocol with limits on the request
head, enforced while the bytes arrive.

httptools buffers a header until its end, and uvicorn sets no cap, so a client could make the
service hold a 128 MB header line (and four of them stalled the event loop for seconds). The
protocol here counts the bytes of each request head before they reach the parser: past
`max_head_bytes` the request gets 431, a request target past `max_url_bytes` 414, each as
an RFC 9457 problem, and nothing more of the connection is parsed or kept. The connection
is then closed gracefully: our side is shut for writing and whatever the client still sends
is read and dropped for a moment, so it receives the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import PROBLEM_TYPE

LINGER_S = 2.0  # how long a refused connection's late bytes are read and dropped


@dataclass(frozen=True)
class HeadLimits:
    max_head_bytes: int = 32 * 1024  # request line + all headers
    max_url_bytes: int = 8 * 1024  # the request target (path and query)
    # From a connection's first byte (or a request's) to the end of its headers. Without it a
    # client sending a header byte now and then keeps a connection (and a file descriptor)
    # forever: enough of them and the process can accept no one else.
    head_timeout_s: float = 10.0


REFUSALS = {
    414: ("URI Too Long", "URI too long", "uri-too-long",
          "the request target is over the {max_url_bytes:,}-byte limit"),
    408: ("Request Timeout", "Request timeout", "request-timeout",
          "the request headers did not arrive within {head_timeout_s:g} s"),
    431: ("Request Header Fields Too Large", "Request headers too large",
          "headers-too-large",
          "the request line and headers are over the {max_head_bytes:,}-byte limit"),
}


class _Refusal(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized heads before buffering them."""

    limits = HeadLimits()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._refused = False
        self._pending: int | None = None  # a refusal raised inside a parser callback
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._pending = 414
            raise _Refusal(414)  # aborts the parse; httptools re-raises it wrapped

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # what follows is the next request's head
        if self.cycle is not None and self.cycle.response_complete and self._head_timer is None:
            # The body of a refused request has been read and dropped; uvicorn's keep-alive
            # timer was cancelled by its bytes, so this one bounds the idle connection.
            self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        if self._in_head and self._head_bytes + len(data) > self.limits.max_head_bytes:
            room = max(self.limits.max_head_bytes - self._head_bytes, 0)
            self._head_bytes += room
            super().data_received(data[:room])  # may complete the head
            if self._refused:
                return
            if self._in_head:
                self._refuse(431)
                return
            data = data[room:]
        elif self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers 400 when the parser fails; one of our refusals is reported so."""
        if self._pending is not None:
            self._refuse(self._pending)
        else:
            super().send_400_response(msg)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._in_head and not self._refused and not self.transport.is_closing():
            self._refuse(408)

    def _refuse(self, status: int) -> None:
        self._disarm_head_timer()
        self._refused = True
        reason, title, slug, detail = REFUSALS[status]
        body = json.dumps({"type": PROBLEM_TYPE + slug, "title": title, "status": status,
                           "detail": detail.format(**vars(self.limits))}).encode()
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def guarded_protocol(limits: HeadLimits) -> type[GuardedHttpToolsProtocol]:
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def server_config(app: Any, host: str, port: int, limits: HeadLimits = HeadLimits(),
                  **options: Any) -> uvicorn.Config:
    """uvicorn's config for clipdex: the guarded protocol, and the other options as given."""
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(limits), **options)
