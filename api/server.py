"""The HTTP server under the app: uvicorn's httptools protocol with limits on each connection,
enforced on the bytes as they arrive, before httptools buffers them.

- Heads and trailers: httptools buffers a header until its end and uvicorn sets no cap, so a
  client could make the service hold a 128 MB header line (or trailer field). Each request's
  head is counted as it arrives (the parser is fed one head at a time, cut at its blank line,
  so pipelined requests are counted one by one); past `max_head_bytes` it gets 431, a request
  target past `max_url_bytes` 414. In a chunked body, the bytes that carry no body data (chunk
  lines and trailers) are counted the same way against `max_trailer_bytes`. Heads and
  trailers must also arrive within `head_timeout_s` (408).
- Pipelining: requests sent back to back are answered in order; at most `max_pipelined` wait
  parsed, the rest wait unparsed (reading pauses) until those are answered.
- Refused connections: a connection whose request was answered before its body arrived (401,
  413, 503) is read and dropped for at most `refused_drain_s`, then closed.
- Connections (`api.connections`): at most `max_connections` in all and
  `max_connections_per_address` from one client address; past either, `reserved_connections`
  more are let in for one request each, which must be a health check or carry a key. The
  rest are answered 503 (or 429) and closed.

Every refusal is an RFC 9457 problem (`api.refusals`), protocol errors (bad framing, smuggling
attempts, obsolete line folding) and uvicorn's own 500 included. A refused connection is closed
gracefully: our side is shut for writing and whatever the client still sends is read and
dropped for a moment, so it receives the answer rather than a reset (those turned away on
arrival are closed at once).

Why a subclass of uvicorn's httptools protocol, which uvicorn does not document for
extension: no uvicorn setting does this. With httptools it caps no head; the h11 parser's
`h11_max_incomplete_event_size` answers a plain-text 400; `limit_concurrency` has no
per-address cap or reserve and answers plain text; `timeout_keep_alive` bounds the silence
between requests, not a head arriving. ASGI middleware runs only once a head is parsed whole.
So the class goes to uvicorn through its `http=` option, and this module alone touches
uvicorn's internals: tests/api/test_uvicorn_guard.py pins what it relies on and the versions
read against (`UVICORN_CHECKED`), and says what to re-check after an upgrade.

Left to a reverse proxy in front of a public service: clients with many addresses (each gets
its own per-address cap, and together they can fill the total and its reserve, which they
enter by sending any key header), TLS, and rate limits over time. Behind a proxy every client
shares the proxy's address: turn the per-address cap off (`--max-connections-per-address 0`)
and let the proxy cap each client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from api.connections import ConnectionCounts, ConnectionLimits, admit
from api.errors import internal_error, send_problem
from api.refusals import refusal_bytes

UVICORN_CHECKED = ("0.55.0",)  # the uvicorn versions whose httptools_impl this was read against

LINGER_S = 2.0  # how long a refused connection's late bytes are read and dropped
# A chunked body is parsed this much at a time, so that bytes carrying no body data (trailers)
# are counted to within this many; a 10 MiB upload is ~1,300 parser calls (a few ms).
CHUNKED_PIECE = 8 * 1024
HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")
# A connection let in past a cap has this long to send its head: health checkers and keyed
# clients send theirs at once, and an idle one would hold a reserved place.
RESERVE_HEAD_S = 2.0
KEY_HEADERS = (b"authorization", b"x-api-key")


@dataclass(frozen=True)
class HeadLimits:
    """Limits on what one connection sends: its request heads, trailers and pipeline."""

    max_head_bytes: int = 32 * 1024  # request line + all headers
    max_url_bytes: int = 8 * 1024  # the request target (path and query)
    # From a connection's first byte (or a request's) to the end of its headers, and for the
    # trailers of a chunked body. Without it a client sending a header byte now and then keeps
    # a connection (and a file descriptor) forever: enough of them and the process can accept
    # no one else.
    head_timeout_s: float = 10.0
    # Chunk lines and trailers between two pieces of body data (legitimate ones are a few
    # bytes; httptools would buffer a trailer field whole).
    max_trailer_bytes: int = 8 * 1024
    # Parsed requests waiting behind the one being answered on a connection (each holds its
    # scope and task); uvicorn parses every pipelined request it has read.
    max_pipelined: int = 16


class _Refusal(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits the module docstring lists."""

    limits = HeadLimits()
    connection_limits = ConnectionLimits().resolved()
    counts = ConnectionCounts()  # replaced per server by `guarded_protocol`

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes of the head (or of the trailers) being received
        self._in_head = True
        self._refused = False
        self._pending: int | None = None  # a refusal raised inside a parser callback
        self._owed: int | None = None  # a refusal to send once earlier requests are answered
        self._head_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._address: str | None = None  # counted against the caps while open
        # Let in past a cap (the status it would have had): one health check or keyed request.
        self._reserve_only: int | None = None
        self._running: RequestResponseCycle | None = None  # the request being answered
        # Bytes read but not yet parsed, from _pos on; _tail: the last bytes of the head so far.
        self._buffer, self._pos, self._tail = b"", 0, b""
        self._body_left: int | None = None  # of a Content-Length body; None: chunked
        self._framing = 0  # bytes of a chunked body since its last body data
        self._saw_body = self._completed = False  # parser events during the current feed

    # --- connections ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal = self._admit()
        if refusal is not None:
            self._turn_away(refusal)
            return
        self._arm_head_timer()

    def _admit(self) -> int | None:
        """Count this connection in, or the status it is refused with."""
        address = self.client[0] if self.client else ""
        refusal, self._reserve_only = admit(self.counts, self.connection_limits, address)
        if refusal is None:
            self._address = address
        return refusal

    def _turn_away(self, status: int) -> None:
        """Answer a connection refused on arrival and close it at once: lingering would let a
        flood of them hold the very descriptors the cap protects."""
        self._refused = True
        self.transport.write(self._problem(status))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._disarm_drain_timer()
        if self._address is not None:
            self.counts.leave(self._address)
            self._address = None
        super().connection_lost(exc)

    # --- feeding the parser, one head (or body piece) at a time ---

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        self._buffer = self._buffer[self._pos:] + data if self._pos < len(self._buffer) else data
        self._pos = 0
        self._pump()

    def _pump(self) -> None:
        while self._pos < len(self._buffer) and not self._stopped():
            if len(self.pipeline) >= self.limits.max_pipelined:
                self.flow.pause_reading()  # the rest is parsed as these are answered
                return
            started_in_head, exact = self._in_head, True
            if self._in_head:
                room = self.limits.max_head_bytes - self._head_bytes
                if room <= 0:
                    self._refuse(431)
                    return
                end = self._head_end(min(len(self._buffer), self._pos + room))
            elif self._body_left:
                end = min(len(self._buffer), self._pos + self._body_left)
            else:
                end, exact = min(len(self._buffer), self._pos + CHUNKED_PIECE), False
            piece = memoryview(self._buffer)[self._pos:end]
            self._saw_body = self._completed = False
            self._pos = end
            super().data_received(piece)  # type: ignore[arg-type]
            if self._stopped():
                return
            self._account(len(piece), piece, started_in_head, exact)
        if self._pos >= len(self._buffer):
            self._buffer, self._pos = b"", 0

    def _stopped(self) -> bool:
        return (self._refused or self.parser is None or self.transport.is_closing()
                or self.transport.get_protocol() is not self)

    def _head_end(self, limit: int) -> int:
        """Where the head being received ends in the buffer (after its blank line), else
        `limit`: the parser then sees one head at a time, and bytes are counted per request."""
        seam = self._tail + self._buffer[self._pos:self._pos + 3]
        found = seam.find(b"\r\n\r\n")
        if found != -1:
            return self._pos + found + 4 - len(self._tail)
        found = self._buffer.find(b"\r\n\r\n", self._pos, limit)
        return limit if found == -1 else found + 4

    def _account(self, size: int, piece: memoryview, started_in_head: bool,
                 exact: bool) -> None:
        if self._in_head:
            # A piece cut where a request ended holds nothing of the next one; a chunked piece
            # in which one ended is counted whole to the next head (at most CHUNKED_PIECE over).
            if not (self._completed and exact):
                self._head_bytes += size
                self._tail = (self._tail + bytes(piece[-3:]))[-3:]
            return
        if started_in_head:
            return  # the head ended this piece: the body has not begun
        if self._saw_body:
            self._framing = 0
            self._disarm_head_timer()
            return
        self._framing += size  # chunk lines or trailers: no body data in this piece
        if self._framing > self.limits.max_trailer_bytes:
            self._refuse(431)
        elif self._head_timer is None:
            self._arm_head_timer()

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._pending = 414
            raise _Refusal(414)  # aborts the parse; httptools re-raises it wrapped

    def on_headers_complete(self) -> None:
        if self._reserve_only is not None and not self._may_use_reserve():
            self._pending = self._reserve_only
            raise _Refusal(self._pending)
        self._in_head, self._framing = False, 0
        self._disarm_head_timer()
        self._body_left = _declared_length(self.headers)
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.send_500_response = _problem_500(self.cycle)  # type: ignore[method-assign]
            if self._reserve_only is not None:
                self.cycle.keep_alive = False  # one request, then the place is free again

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _may_use_reserve(self) -> bool:
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        return path in HEALTH_PATHS or any(name in KEY_HEADERS for name, _ in self.headers)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._saw_body = True
        if self._body_left:
            self._body_left -= len(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._completed = True
        self._in_head, self._head_bytes, self._framing, self._tail = True, 0, 0, b""
        self._disarm_head_timer()
        self._disarm_drain_timer()
        if self.cycle is not None and self.cycle.response_complete:
            # The body of a refused request has been read and dropped; uvicorn's keep-alive
            # timer was cancelled by its bytes, so this one bounds the idle connection.
            self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if self._owed is not None and not self._answering():
            self._answer(self._owed)  # every request before the refused one is answered
        elif cycle.response_complete and cycle.more_body and self._drain_timer is None:
            # Answered before its body arrived (401, 413, 503): the rest is dropped, for a
            # bounded time only, or a client trickling it would hold the connection forever.
            self._drain_timer = self.loop.call_later(
                self.connection_limits.refused_drain_s, self._drain_late)
        if self._pos < len(self._buffer):
            self.loop.call_soon(self._pump)  # pipelined requests held back by the cap

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers 400 in plain text when the parser fails; this is a problem, or one
        of our refusals raised inside a parser callback."""
        self._refuse(self._pending or 400)

    # --- timers and refusals ---

    def _arm_head_timer(self) -> None:
        timeout = self.limits.head_timeout_s
        if self._reserve_only is not None:
            timeout = min(timeout, RESERVE_HEAD_S)
        self._head_timer = self.loop.call_later(timeout, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _disarm_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._refused and not self.transport.is_closing():
            self._refuse(408)

    def _drain_late(self) -> None:
        self._drain_timer = None
        if not self.transport.is_closing():
            self._refused = True
            self.transport.close()

    def _refuse(self, status: int) -> None:
        """Parse nothing more; answer `status` after the requests still being answered, or
        just close when the refused request has had its answer already."""
        self._refused = True
        self._disarm_head_timer()
        self._buffer, self._pos = b"", 0
        cycle = self.cycle
        if cycle is not None and cycle.more_body:  # the refused bytes are this request's
            if cycle.response_started:
                self.transport.close()  # it has (part of) its answer: nothing more to say
                return
            # Its body will never end now: the app hears a disconnect and answers nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        if self._answering():
            self._owed = status  # complete requests in the app: their answers come first
            return
        self._answer(status)

    def _answering(self) -> bool:
        """Whether answers are still owed to requests that arrived before the refused one."""
        running = self._running
        if running is not None and not (running.response_complete or running.disconnected):
            return True
        return any(not cycle.disconnected for cycle, _ in self.pipeline)

    def _answer(self, status: int) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(self._problem(status))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _problem(self, status: int) -> bytes:
        return refusal_bytes(status, {**vars(self.limits), **vars(self.connection_limits)})


def _problem_500(cycle: RequestResponseCycle) -> Callable[[], Awaitable[None]]:
    """uvicorn's answer when the app fails before responding (plain text there), as a
    problem."""

    async def send_500_response() -> None:
        await send_problem(cycle.send, internal_error(), close=True)  # type: ignore[arg-type]

    return send_500_response


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length the parser will read: None for a chunked body (llhttp refuses a
    request with both headers, and one with a malformed length)."""
    length = 0
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.strip().isdigit():
            length = int(value)
    return length


def guarded_protocol(limits: HeadLimits,
                     connections: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class of one server: its limits, and its own connection counts."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "limits": limits, "connection_limits": connections.resolved(),
        "counts": ConnectionCounts()})


def server_config(app: Any, host: str, port: int, limits: HeadLimits = HeadLimits(),
                  connections: ConnectionLimits | None = None,
                  **options: Any) -> uvicorn.Config:
    """uvicorn's config for clipdex: the guarded protocol, and the other options as given."""
    connections = connections or ConnectionLimits()
    return uvicorn.Config(app, host=host, port=port,
                          http=guarded_protocol(limits, connections), **options)
