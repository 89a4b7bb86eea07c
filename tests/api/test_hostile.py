"""The service against hostile clients, one test per defect an outside tester found: a real
uvicorn server on loopback (the service's own server config), the tiny model, a real index.
Every raw-socket scenario is bounded in connections and in time."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api.app import create_app
from api.server import HeadLimits
from api.settings import Settings
from retrieval.search.batcher import BatcherConfig
from tests.api.helpers import (
    ADMIN,
    AUTH,
    READ,
    ServerThread,
    build_index,
    keyed_service,
    raw_socket,
    read_response,
    status_of,
)
from tests.conftest import COLOURS, make_image


def serve(tiny, root: Path, **overrides) -> ServerThread:
    return keyed_service(tiny, root, **{"max_in_flight": 4, "batching": BatcherConfig(8, 0, 64),
                                        "body_idle_s": 1.0, "body_deadline_s": 3.0, **overrides})


@pytest.fixture(scope="module")
def server(tiny, index_root):
    with serve(tiny, index_root) as running:
        yield running



# --- 1. stalled and trickling bodies hold no place that complete requests need ---


def test_stalled_uploads_lock_nobody_out_and_time_out(server, client):
    with ExitStack() as stack:
        stalled = []
        for _ in range(12):  # three times the in-flight cap of 4
            sock = stack.enter_context(raw_socket(server))
            sock.sendall(b"POST /search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + READ.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            stalled.append(sock)
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(6):
            assert client.post("/search/text", json={"text": "a red square", "k": 1}
                               ).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert time.monotonic() - started < 10
        # After the idle timeout (1 s here) each stalled body gets 408 and its connection ends.
        answers = [status_of(read_response(sock, 5.0)) for sock in stalled]
    assert answers == [408] * 12


def test_an_unauthenticated_stall_is_refused_before_its_body(server):
    with raw_socket(server) as sock:
        sock.sendall(b"POST /admin/items/texts HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        response = read_response(sock, 5.0)
    assert status_of(response) == 401
    assert time.monotonic() - started < 0.9  # answered at once, not after the body timeout


def test_a_trickling_body_gets_408_at_the_deadline(server, client):
    with raw_socket(server) as sock:
        sock.sendall(b"POST /search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + READ.encode() + b"\r\nContent-Length: 240\r\n\r\n")
        started, status = time.monotonic(), None
        sock.settimeout(0.5)
        for _ in range(60):  # a byte every 0.1 s would take 24 s; the deadline is 3 s
            try:
                sock.sendall(b" ")
                data = sock.recv(65536)
                if data:
                    status = status_of(data)
                    break
            except TimeoutError:
                pass
            except OSError:
                break
            assert client.get("/healthz").status_code == 200
        assert status == 408
        assert time.monotonic() - started < 8


# --- 2. decoding cost is bounded by bytes, not only pixels ---


def sixteen_bit_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width), 4000, np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_small_upload_that_decodes_to_many_bytes_is_refused(tiny, index_root):
    data = sixteen_bit_png(1500, 1500)  # a few KB on the wire, 2.25 MP of 16-bit grey
    with serve(tiny, index_root, max_decode_bytes=8 * 2**20) as running, \
            httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
        refused = http.post("/search/image", files={"image": ("grey.png", data)})
        small = http.post("/search/image", files={"image": ("s.png", sixteen_bit_png(300, 300))})
    assert refused.status_code == 413 and "MiB" in refused.json()["detail"]
    assert small.status_code == 200


# --- 3. no server path or memory address in any response ---


def test_responses_name_no_server_path_or_address(tiny, tmp_path):
    from indexer.build import BuildConfig, build

    folder = tmp_path / "photos"
    for name in ("red", "blue"):
        make_image(folder / "2024" / f"{name}.png", COLOURS[name])
        (folder / "2024" / f"{name}.txt").write_text(f"a {name} square\n")
    (tmp_path / "notes.txt").write_text("a note about squares\n")
    root = tmp_path / "index"
    build([folder, tmp_path / "notes.txt"], root, tiny, BuildConfig(workers=0))
    with serve(tiny, root) as running, \
            httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
        image = (folder / "2024" / "red.png").read_bytes()
        answers = [
            http.post("/search/text", json={"text": "red", "target": "text", "k": 5}),
            http.post("/search/image", files={"image": ("r.png", image)}, data={"k": "5"}),
            http.post("/caption", files={"image": ("r.png", image)}),
            http.get("/items/1"), http.get("/items/3"), http.get("/readyz"),
            http.post("/knn-service", content=json.dumps({"text": "red", "modality": "text"})),
            http.post("/search/image", files={"image": ("bad.png", b"not an image at all")}),
            http.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}),
        ]
    assert answers[-2].status_code == 422
    texts = [answer.text for answer in answers]
    assert any("notes.txt" in text for text in texts)  # corpus texts name their file
    for text in texts:
        assert str(tmp_path) not in text and "/tmp" not in text, text
        assert "0x" not in text and "BytesIO" not in text, text


def test_a_missing_index_is_reported_without_its_path(tiny, tmp_path):
    with serve(tiny, tmp_path / "nowhere" / "index") as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        ready = http.get("/readyz")
    assert ready.status_code == 503 and str(tmp_path) not in ready.text


# --- 4. a tampered cursor is a 422, never a 500 ---


def tampered(cursor: str, **changes) -> str:
    payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    text = json.dumps({**payload, **{k: "@" for k in changes}})
    for key, raw in changes.items():
        text = text.replace(f'"{key}": "@"', f'"{key}": {raw}')
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("field,raw", [("n", "Infinity"), ("n", "1e400"), ("i", "Infinity"),
                                       ("i", "1e400"), ("s", "NaN"), ("s", "1e400"),
                                       ("i", "9" * 400), ("n", "true"), ("g", "[]")])
def test_tampered_cursors_are_422(client, field, raw):
    first = client.post("/search/text", json={"text": "a square", "k": 2}).json()
    bad = tampered(first["next_cursor"], **{field: raw})
    for route, body in (("/search/text", {"text": "a square", "k": 2}),
                        ("/search/vector", {"vector": [1.0] + [0.0] * 31, "k": 2})):
        answer = client.post(route, json={**body, "cursor": bad})
        assert answer.status_code == 422, (route, answer.text)


# --- 5. one JSON parsing path: /knn-service answers hostile JSON like every route ---


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"text": "x", "num_images": ' + b"9" * 5000
                                  + b"}", b"\xff\xfe", b"{"])
def test_hostile_json_gets_4xx_on_every_json_route(client, body):
    for route in ("/knn-service", "/search/text", "/search/multi"):
        answer = client.post(route, content=body, headers={"content-type": "application/json"})
        assert 400 <= answer.status_code < 500, (route, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"


# --- 6 is in tests/indexer/test_concurrent_writers.py (real processes) ---


# --- 7. request heads over their limits are refused early ---


def test_an_oversized_header_gets_431_and_the_service_stays_up(server, client):
    with raw_socket(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        status = None
        try:
            for _ in range(64):  # 4 MiB offered in 64 KiB pieces; refused after 32 KiB
                sock.sendall(b"a" * 65536)
        except OSError:
            pass
        status = status_of(read_response(sock, 5.0))
    assert status == 431
    assert client.get("/healthz").status_code == 200


def test_a_long_url_gets_414(server):
    with raw_socket(server) as sock:
        sock.sendall(b"GET /items/1?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_response(sock, 5.0)
    assert status_of(response) == 414
    assert b"application/problem+json" in response


# --- 8. a busy service answers uploads with 503, not a connection reset ---


def test_uploads_refused_when_busy_get_their_503(tiny, index_root):
    with serve(tiny, index_root, max_in_flight=1) as running:
        state = running.server.config.app.state.service
        release = threading.Event()
        state.executor.submit(release.wait)  # the model thread is busy
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
            holder = threading.Thread(target=lambda: http.post(
                "/search/text", json={"text": "held", "k": 1}))
            holder.start()
            time.sleep(0.3)  # now one request is in flight, waiting for the model
            upload = np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(upload).save(buffer, "PNG")  # ~270 KB, over any socket buffer
            statuses = []
            for _ in range(5):
                with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as fresh:
                    answer = fresh.post("/search/image", files={"image": ("n.png",
                                                                          buffer.getvalue())})
                    statuses.append((answer.status_code, answer.headers.get("retry-after")))
            release.set()
            holder.join(timeout=30)
    assert statuses == [(503, "1")] * 5


# --- 9. links never come from the Host header ---


def test_links_do_not_echo_the_host_header(client, tiny, index_root):
    hits = client.post("/search/text", json={"text": "red", "k": 2},
                       headers={"Host": "evil.example"}).json()["hits"]
    assert all(hit["image_url"].startswith("/items/") for hit in hits)
    with serve(tiny, index_root, public_url="https://search.example/") as running, \
            httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
        hit = http.post("/search/text", json={"text": "red", "k": 1},
                        headers={"Host": "evil.example"}).json()["hits"][0]
    assert hit["image_url"] == f"https://search.example/items/{hit['id']}/image"


# --- 10. a vector with a huge norm is normalised without overflow ---


def test_a_huge_vector_searches_like_its_direction(client):
    direction = np.random.default_rng(1).normal(size=32)
    unit = (direction / np.linalg.norm(direction)).tolist()
    huge = (direction / np.abs(direction).max() * 3e38).tolist()
    small = client.post("/search/vector", json={"vector": unit, "k": 3}).json()["hits"]
    big = client.post("/search/vector", json={"vector": huge, "k": 3}).json()["hits"]
    assert [h["id"] for h in big] == [h["id"] for h in small]
    assert np.allclose([h["score"] for h in big], [h["score"] for h in small], atol=1e-5)
    assert any(abs(h["score"]) > 0.01 for h in big)


# --- 11. each route's body cap fits what it accepts, checked before parsing ---


def test_a_big_vector_body_is_refused_before_parsing(client):
    body = json.dumps({"vector": [0.5] * 500_000}).encode()  # 2.5 MB of numbers
    started = time.monotonic()
    answer = client.post("/search/vector", content=body,
                         headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "262,144-byte" in answer.json()["detail"]
    assert time.monotonic() - started < 5


def test_a_declared_length_over_the_cap_is_refused_without_the_body(server):
    with raw_socket(server) as sock:
        sock.sendall(b"POST /search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + READ.encode() + b"\r\nContent-Length: 10000000\r\n\r\n")
        response = read_response(sock, 5.0)
    assert status_of(response) == 413


# --- also: the same image uploaded twice is one item ---


def test_uploading_the_same_image_twice_gives_the_same_item(tiny, images, tmp_path):
    """Also when clients upload the same bytes at once (as many as this service admits): the
    duplicate check runs under the store's writer lock, so they make one item and every
    answer names it."""
    root = build_index(tmp_path / "index", tiny, images)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    data = images["red"].read_bytes()
    with serve(tiny, root) as running, \
            httpx.Client(base_url=running.url, headers=admin, timeout=60) as http:
        first = http.post("/admin/items/image", files={"image": ("a.png", data)}).json()
        again = http.post("/admin/items/image", files={"image": ("b.png", data)}).json()
        with_captions = http.post("/admin/items/image", files={"image": ("b.png", data)},
                                  data={"captions": ["red again"]})
        item = http.get(f"/items/{first['ids'][0]}").json()
        blue = images["blue"].read_bytes()
        with ThreadPoolExecutor(2) as pool:  # the uploads' half of `serve`'s in-flight cap
            racing = list(pool.map(lambda n: http.post("/admin/items/image", files={
                "image": (f"{n}.png", blue)}), range(2)))
        listed = http.post("/search/browse", json={"k": 100}).json()["hits"]
    assert again["ids"] == first["ids"] and again["duplicate"] and not first["duplicate"]
    assert again["generation"] == first["generation"]
    assert with_captions.status_code == 409
    assert "/admin/items/texts" in with_captions.json()["detail"]
    assert item["modality"] == "image"
    assert all(answer.status_code == 200 for answer in racing), [a.text for a in racing]
    assert len({answer.json()["ids"][0] for answer in racing}) == 1
    assert sum(not answer.json()["duplicate"] for answer in racing) == 1
    assert len(listed) == len(images) + 2  # the colours, and the two uploads


def test_a_head_that_never_ends_gets_408(tiny, index_root):
    limits = HeadLimits(head_timeout_s=0.5)
    app = create_app(Settings(index=index_root, read_keys=(READ,)), clip=tiny)
    with ServerThread(app, limits) as running, raw_socket(running) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        started = time.monotonic()
        response = read_response(sock, 5.0)
        assert status_of(response) == 408
        assert 0.4 < time.monotonic() - started < 3
        with raw_socket(running) as silent:  # a connection that never says anything
            assert status_of(read_response(silent, 5.0)) == 408
