"""Decode-time bombs against a real service on loopback: a flood of scan bombs is refused
with 413 (503 once uploads hold their half of the places) while text searches go on being
answered, a multi-query of sixteen bombs costs no decode, and a request whose images
outlast the decode deadline is answered at it."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.api.helpers import AUTH, keyed_service
from tests.reliability.image_zoo import progressive_jpeg

FLOOD_S = 3.0


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return progressive_jpeg(2000, repeats=2000)  # ~110 KB; ~10 s of CPU if decoded


@pytest.fixture(scope="module")
def server(tiny, index_root):
    # four places, eight attackers: uploads may hold two, so text searches are never refused
    with keyed_service(tiny, index_root, max_in_flight=4) as running:
        yield running


def test_a_flood_of_scan_bombs_is_refused_and_text_search_goes_on(server, bomb):
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def attacker() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
            while not stop.is_set():
                status = http.post("/search/image", files={
                    "image": ("b.jpg", bomb, "image/jpeg")}).status_code
                with lock:
                    answers.append(status)

    threads = [threading.Thread(target=attacker) for _ in range(8)]
    for thread in threads:
        thread.start()
    texts = []
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
            ends = time.monotonic() + FLOOD_S
            while time.monotonic() < ends:
                texts.append(http.post("/search/text", json={"text": "a red square"}))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert texts and all(t.status_code == 200 for t in texts), [t.text for t in texts[:3]]
    assert 413 in answers and set(answers) <= {413, 503}, set(answers)


def test_a_multi_query_of_sixteen_bombs_is_refused_at_once(server, bomb):
    term = {"image_base64": base64.b64encode(bomb).decode(), "weight": 1.0}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        answer = http.post("/search/multi", json={"terms": [term] * 16})
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "scans" in answer.json()["detail"]


def test_images_past_the_decode_deadline_get_413_at_the_deadline(tiny, index_root):
    buffer = io.BytesIO()  # an honest 16 MP progressive photograph: ~0.1 s to decode here
    Image.new("RGB", (4000, 4000), (90, 120, 150)).save(buffer, "JPEG", progressive=True)
    with keyed_service(tiny, index_root, decode_deadline_s=0.01) as running, \
            httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
        answer = http.post("/search/image", files={
            "image": ("p.jpg", buffer.getvalue(), "image/jpeg")})
        assert answer.status_code == 413, answer.text
        assert "took over 0.01 s" in answer.json()["detail"]
        assert http.post("/search/text", json={"text": "a red square"}).status_code == 200
