"""The HTTP protocol against hostile clients (issue 32's findings 4, 5, 9, 10, 11 and 12): a
real uvicorn server on loopback with the service's own protocol, short limits, and raw
sockets. Every attack is scaled down and bounded in bytes and time."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

from api.app import create_app
from api.limits import BodyTooLarge, JsonShape
from api.server import ConnectionLimits, HeadLimits
from api.settings import Settings
from retrieval.search.batcher import BatcherConfig
from tests.api.helpers import (
    ADMIN,
    AUTH,
    READ,
    ServerThread,
    raw_socket,
    read_response,
    status_of,
)

LIMITS = HeadLimits(head_timeout_s=1.0)
CONNECTIONS = ConnectionLimits(refused_drain_s=1.0)
KEYED = b"Authorization: Bearer " + READ.encode() + b"\r\n"


def serve(tiny, root, limits: HeadLimits = LIMITS,
          connections: ConnectionLimits = CONNECTIONS) -> ServerThread:
    # Body timeouts well above the protocol's 1 s, so a test sees which of them answered.
    settings = Settings(index=root, read_keys=(READ,), admin_key=ADMIN, max_in_flight=8,
                        batching=BatcherConfig(8, 0, 64), body_idle_s=5.0, body_deadline_s=10.0)
    return ServerThread(create_app(settings, clip=tiny), limits, connections)


@pytest.fixture(scope="module")
def server(tiny, index_root):
    with serve(tiny, index_root) as running:
        yield running


def problem(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), head
    return json.loads(body)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `seconds` while the client sends `trickle`
    every 0.1 s (responses already sent are read and ignored)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def read_responses(sock: socket.socket, count: int, limit_s: float = 10.0) -> list[bytes]:
    """Up to `count` whole responses (each with a Content-Length), in order."""
    sock.settimeout(limit_s)
    data, responses = b"", []
    while len(responses) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end != -1:
            length = next(int(line.split(b":")[1]) for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(data) >= head_end + 4 + length:
                responses.append(data[:head_end + 4 + length])
                data = data[head_end + 4 + length:]
                continue
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return responses


def send_in_pieces(sock: socket.socket, data: bytes, piece: int = 65536) -> None:
    try:
        for at in range(0, len(data), piece):
            sock.sendall(data[at:at + piece])
    except OSError:
        pass  # refused and closed before the end: what the test wants to see


@contextmanager
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """The errors uvicorn logs meanwhile (its loggers do not propagate to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def server_error_count(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("clipdex_requests_total") and 'status="500"' in line)


# --- 4. trailers are bounded like headers ---


CHUNKED_SEARCH = (b"POST /search/text HTTP/1.1\r\nHost: x\r\n" + KEYED
                  + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"1\r\n{\r\n0\r\n")


def test_a_huge_trailer_is_refused_with_431_before_it_ends(server):
    with raw_socket(server) as sock:
        send_in_pieces(sock, CHUNKED_SEARCH + b"X-Trailer: " + b"a" * 2**20)  # never ends
        response = read_response(sock, 3.0)
    assert status_of(response) == 431
    assert problem(response)["status"] == 431
    assert server_error_count(server.url) == 0  # the request that lost its body is no 500


def test_a_trickled_trailer_gets_408_at_the_head_timeout(server):
    with raw_socket(server) as sock:
        sock.sendall(CHUNKED_SEARCH + b"X-Trailer: a")
        started, response = time.monotonic(), b""
        sock.settimeout(0.2)
        while not response and time.monotonic() - started < 4:
            try:
                sock.sendall(b"a")
                response = sock.recv(65536)
            except TimeoutError:
                continue
    assert status_of(response) == 408  # the head timer (1 s), not the body's (5 s)
    assert time.monotonic() - started < 3


def test_a_refused_requests_trailer_does_not_keep_its_connection(server):
    with raw_socket(server) as sock:
        sock.sendall(CHUNKED_SEARCH.replace(KEYED, b""))
        assert status_of(read_response(sock, 3.0)) == 401
        send_in_pieces(sock, b"X-Trailer: " + b"a" * 2**20)
        assert closed_within(sock, 3.0, trickle=b"a")


# --- 5. refused connections are closed promptly; connections are capped ---


def test_a_refused_client_trickling_its_body_is_closed(server):
    with raw_socket(server) as sock:
        sock.sendall(b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        assert status_of(read_response(sock, 3.0)) == 401
        started = time.monotonic()
        assert closed_within(sock, 4.0, trickle=b" ")  # the drain time here is 1 s
    assert time.monotonic() - started < 3
    with raw_socket(server) as sock:  # a refused body sent whole is dropped; the rest is kept
        sock.sendall(b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{}{}{")
        assert status_of(read_response(sock, 3.0)) == 401
        time.sleep(1.2)  # past the drain time
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock, 3.0)) == 200


@pytest.mark.parametrize("caps,status", [
    (ConnectionLimits(max_connections_per_address=3, reserved_connections=1), 429),
    (ConnectionLimits(max_connections=3, max_connections_per_address=None,
                      reserved_connections=1), 503)])
def test_connections_are_capped_with_room_for_health_checks_and_keys(tiny, index_root, caps,
                                                                     status):
    with serve(tiny, index_root, HeadLimits(), caps) as running, ExitStack() as stack:
        held = [stack.enter_context(raw_socket(running)) for _ in range(3)]  # at the cap
        answers = []
        for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /items/0 HTTP/1.1\r\nHost: x\r\n" + KEYED + b"\r\n",
                        b"GET /items/0 HTTP/1.1\r\nHost: x\r\n\r\n"):  # no key: refused
            with raw_socket(running) as extra:  # a reserved place: one request, then closed
                extra.sendall(request)
                answers.append(read_response(extra, 3.0))
                assert closed_within(extra, 3.0)
        with raw_socket(running), raw_socket(running) as two:  # the reserve is full:
            two.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # turned away at once
            turned_away = read_response(two, 3.0)
        for sock in held:
            sock.close()
        time.sleep(0.2)
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=10) as http:
            again = [http.get("/items/0").status_code for _ in range(3)]  # one kept connection
    assert [status_of(answer) for answer in answers] == [200, 200, status]
    assert problem(answers[2])["status"] == status
    assert status_of(turned_away) == status and problem(turned_away)["status"] == status
    assert again == [200, 200, 200]


# --- 9. a multipart body's boundary work is bounded ---


def test_a_form_full_of_boundary_delimiters_is_refused_quickly(client, images):
    labels = {"labels": [f"label {n}" for n in range(100)]}  # a big real form: 102 parts
    answer = client.post("/classify", data=labels,
                         files={"image": ("red.png", images["red"].read_bytes())})
    assert answer.status_code == 200, answer.text
    junk = b"\r\n--Bx" * 150_000  # 900 KB of near-delimiters inside one part
    body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + junk + b"\r\n--B--\r\n")
    started = time.monotonic()
    answer = client.post("/search/image", content=body,
                         headers={"content-type": "multipart/form-data; boundary=B"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["type"].endswith("malformed-form")
    assert time.monotonic() - started < 2


# --- 10. numbers in JSON bodies that may carry images get the vector cap ---


@pytest.fixture(scope="module")
def big_image() -> str:
    """A PNG over the 256 KiB vector cap once base64-encoded."""
    pixels = np.random.default_rng(0).integers(0, 255, (320, 320, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    assert len(image) > 300_000
    return image


@pytest.mark.parametrize("route,body,with_image", [
    ("/knn-service", {"embedding_input": [0.5] * 200_000, "modality": "image"},
     {"image": "", "modality": "image"}),
    ("/search/multi", {"terms": [{"vector": [0.5] * 200_000, "weight": 1.0}]},
     {"terms": [{"image_base64": "", "weight": 1.0}]}),
    ("/search/multi", {"terms": [{"text": "red", "weight": 1.0}] * 30_000},
     {"terms": [{"image_base64": "", "weight": 1.0}, {"text": "red", "weight": 1.0}]})])
def test_a_big_json_structure_is_refused_while_streaming(client, big_image, route, body,
                                                          with_image):
    def chunks() -> Iterator[bytes]:  # chunked: no declared length to refuse up front
        data = json.dumps(body).encode()  # ~1 MB
        yield from (data[at:at + 16384] for at in range(0, len(data), 16384))

    answer = client.post(route, content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert "outside its strings" in answer.json()["detail"]
    # An image, a string, may still use the whole body cap.
    image = json.dumps(with_image).replace('""', json.dumps(big_image), 1)
    answer = client.post(route, content=image, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text


def reference_outside(text: bytes) -> int:
    """Bytes outside JSON strings, one byte at a time: quotes and backslashes count."""
    outside, in_string, escaped = 0, False, False
    for byte in text:
        if not in_string:
            outside, in_string = outside + 1, byte == ord('"')
        elif escaped:
            outside, escaped = outside + (byte == ord("\\")), False
        elif byte in b'"\\':
            outside, escaped, in_string = outside + 1, byte == ord("\\"), byte != ord('"')
    return outside


@pytest.mark.parametrize("text", [b'{"a": "x\\\\\\"y\\\\", "b": [1, 2.5e3], "c": "\\u00e9"}',
                                  b'["\\\\", "\\"", "", "abc"]', b"[1, 2, 3]"])
def test_the_json_shape_count_is_exact_however_the_body_is_cut(text):
    json.loads(text)
    for cut in range(len(text) + 1):
        shape = JsonShape(10_000)
        shape.feed(text[:cut])
        shape.feed(text[cut:])
        assert shape.outside == reference_outside(text), cut
    with pytest.raises(BodyTooLarge):
        JsonShape(reference_outside(text) - 1).feed(text)


# --- 11. pipelined requests are answered, counted one by one ---


def test_a_thousand_pipelined_requests_are_all_answered(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with server_errors() as errors, raw_socket(server) as sock:
        sock.sendall(request * 1000)  # 34 KB, over the 32 KiB head limit all together
        responses = read_responses(sock, 1000, 20.0)
    assert [status_of(response) for response in responses] == [200] * 1000
    assert not errors
    assert server_error_count(server.url) == 0


def test_pipelined_requests_are_answered_before_an_oversized_head_is_refused(server):
    healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    with server_errors() as errors, raw_socket(server) as sock:
        sock.sendall(healthz * 3 + big + healthz)
        responses = read_responses(sock, 5, 5.0)
        assert closed_within(sock, 3.0)
    assert [status_of(response) for response in responses] == [200, 200, 200, 431]
    assert not errors, [record.getMessage() for record in errors]
    assert server_error_count(server.url) == 0


# --- 12. protocol errors are problems too ---


@pytest.mark.parametrize("request_bytes", [
    (b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),  # request smuggling (CL.TE)
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",  # obs-fold
    b"GET /healthz HTTP/1.1\nHost: x\n\n",  # bare LF
    b"POST /search/text HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"NOT HTTP AT ALL\r\n\r\n"])
def test_protocol_errors_are_problems(server, request_bytes):
    with raw_socket(server) as sock:
        sock.sendall(request_bytes)
        response = read_response(sock, 3.0)
    assert status_of(response) == 400
    assert problem(response) == {**problem(response), "status": 400,
                                 "title": "Malformed request"}


def test_an_app_that_answers_nothing_gets_a_problem_500():
    async def silent(scope, receive, send):  # answers the lifespan, never a request
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    logging.getLogger("uvicorn.error").disabled = True  # it logs the app's failure: expected
    try:
        with ServerThread(silent) as running, raw_socket(running) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            response = read_response(sock, 3.0)
    finally:
        logging.getLogger("uvicorn.error").disabled = False
    assert status_of(response) == 500 and problem(response)["status"] == 500
