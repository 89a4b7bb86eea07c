"""Problem+json bodies have one renderer (`api.errors.problem_body`) and three writers: the
app's exception handlers, ASGI middleware below them, and the server's own refusals written
before any ASGI. Each writer must carry the same body, as well-formed HTTP (read back by h11,
a client-side parser independent of the server's)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import pytest

from api.errors import (
    PROBLEM_TYPE,
    Problem,
    problem_body,
    problem_http,
    problem_response,
    send_problem,
)
from api.refusals import REFUSALS, refusal_bytes
from api.server import ConnectionLimits, HeadLimits

BUSY = Problem(503, "Service busy", "8 requests are already in progress; retry after 1 s",
               headers={"Retry-After": "1"}, extra={"in_flight": 8, "status": 200})


def read_http(raw: bytes) -> tuple[h11.Response, bytes]:
    """The response in `raw`, parsed as a client would, and its whole body."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")  # the server closed the connection after it
    response, body = client.next_event(), b""
    assert isinstance(response, h11.Response), response
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), event
        body += event.data
    return response, body


def asgi_messages(problem: Problem, close: bool) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(send_problem(send, problem, close=close))
    return sent


def test_the_body_has_the_four_members_then_extensions_that_replace_none():
    body = json.loads(problem_body(BUSY))
    assert list(body) == ["type", "title", "status", "detail", "in_flight"]
    assert body == {"type": PROBLEM_TYPE + "service-busy", "title": "Service busy",
                    "status": 503, "detail": BUSY.detail, "in_flight": 8}


def test_every_writer_carries_the_same_body_and_headers():
    body = problem_body(BUSY)
    handled = problem_response(BUSY)
    assert (handled.status_code, handled.body) == (503, body)
    assert handled.headers["content-type"] == "application/problem+json"
    assert handled.headers["retry-after"] == "1"
    for close in (False, True):
        start, sent = asgi_messages(BUSY, close)
        headers = dict(start["headers"])
        assert (start["status"], sent["body"], sent["more_body"]) == (503, body, False)
        assert headers[b"content-type"] == b"application/problem+json"
        assert headers[b"content-length"] == str(len(body)).encode()
        assert headers[b"retry-after"] == b"1"
        assert headers.get(b"connection") == (b"close" if close else None)
    response, wired = read_http(problem_http(BUSY, "Service Unavailable"))
    headers = dict(response.headers)
    assert (response.status_code, response.reason, wired) == (503, b"Service Unavailable", body)
    assert headers[b"content-type"] == b"application/problem+json"
    assert (headers[b"retry-after"], headers[b"connection"]) == (b"1", b"close")


def test_a_non_ascii_detail_is_counted_in_bytes():
    problem = Problem(422, "Bad filter", "no field 'café' (did you mean 'cafe'?)")
    response, body = read_http(problem_http(problem, "Unprocessable Content"))
    assert json.loads(body)["detail"] == problem.detail
    assert dict(response.headers)[b"content-length"] == str(len(body)).encode()


@pytest.mark.parametrize("status", sorted(REFUSALS))
def test_every_server_refusal_is_a_problem_naming_its_limit(status):
    limits = {**vars(HeadLimits()), **vars(ConnectionLimits(max_connections=1000))}
    response, body = read_http(refusal_bytes(status, limits))
    reason, title, slug, _ = REFUSALS[status]
    problem = json.loads(body)
    assert (response.status_code, response.reason.decode()) == (status, reason)
    assert problem["type"] == PROBLEM_TYPE + slug and problem["title"] == title
    assert problem["status"] == status and "{" not in problem["detail"]
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert (headers.get(b"retry-after") == b"1") == (status in (429, 503))
