"""A corpus of awkward requests against a running service: each gets its documented status
(2xx, or 4xx with a problem+json body), never a 5xx, and the service stays alive. The same
image zoo through the indexer is skipped and reported in errors.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from indexer.build import BuildConfig, build
from retrieval.search.batcher import BatcherConfig
from retrieval.store import open_generation
from tests.api.helpers import ServerThread, build_index
from tests.conftest import COLOURS, make_image
from tests.reliability.image_zoo import bad_images, good_images

TRAVERSAL = "../../etc/passwd"
MAX_PIXELS = 250_000  # the service's --max-image-pixels in these tests
BAD_IMAGE_STATUS = {"truncated png": {422}, "zero-byte file": {422},
                    "html renamed .jpg": {415, 422}, "decompression bomb header": {413},
                    "jpeg scan bomb": {413}, "webp canvas bomb": {413}, "apng frames bomb": {413}}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    images = {name: make_image(folder / f"{name}.png", COLOURS[name])
              for name in ("red", "green", "blue")}
    root = build_index(tmp_path_factory.mktemp("index"), tiny, images)
    settings = Settings(index=root, max_image_pixels=MAX_PIXELS, max_body_bytes=2_000_000,
                        batching=BatcherConfig(32, 10, 64))
    with ServerThread(create_app(settings, clip=tiny)) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
        assert http.get("/healthz").status_code == 200  # still alive after every case


def check(response: httpx.Response, allowed: set[int]) -> None:
    assert response.status_code < 500, response.text
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")
        body = response.json()
        assert body["status"] == response.status_code and body["detail"]
        assert "Traceback" not in body["detail"]


@pytest.mark.parametrize("name", list(good_images()))
def test_odd_but_valid_images_are_searched(client, name):
    filename, data = good_images()[name]
    response = client.post("/search/image", files={"image": (filename, data)},
                           data={"target": "text", "k": "3"})
    check(response, {200})
    assert response.json()["hits"]


@pytest.mark.parametrize("name", list(bad_images()))
def test_broken_images_are_refused(client, name):
    filename, data = bad_images()[name]
    for path, form in (("/search/image", {"target": "image", "k": "3"}),
                       ("/classify", {"labels": ["cat", "dog"]}),
                       ("/caption", {"k": "2"})):
        check(client.post(path, files={"image": (filename, data)}, data=form),
              BAD_IMAGE_STATUS[name])


def test_a_long_thin_image_passes_the_pixel_rule(client):
    filename, data = good_images()["20000x1 png"]
    # 20000 pixels is far under the cap: accepted (the rule is width x height, not a side)
    check(client.post("/search/image", files={"image": (filename, data)}), {200})


TEXT_CASES = {
    "empty text": ({"text": ""}, {422}),
    "blank text": ({"text": "   \n\t"}, {422}),
    "1 MB text": ({"text": "a" * 1_000_000}, {413, 422}),
    "text with NUL bytes": ({"text": "a red\x00 square\x00"}, {200}),
    "k=0": ({"text": "a red square", "k": 0}, {422}),
    "k=-1": ({"text": "a red square", "k": -1}, {422}),
    "k=10**9": ({"text": "a red square", "k": 10**9}, {422}),
    "k as a string": ({"text": "a red square", "k": "ten"}, {422}),
    "traversal text": ({"text": TRAVERSAL}, {200}),
    "traversal cursor": ({"text": "a red square", "cursor": TRAVERSAL}, {422}),
    "traversal target": ({"text": "a red square", "target": TRAVERSAL}, {422}),
    "unknown field": ({"text": "a red square", "path": TRAVERSAL}, {422}),
    "lone surrogate-free unicode": ({"text": "🟥 карточка 赤い"}, {200}),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_awkward_text_queries(client, case):
    body, allowed = TEXT_CASES[case]
    check(client.post("/search/text", json=body), allowed)


def test_traversal_in_labels_is_just_a_label(client):
    filename, data = good_images()["1x1 png"]
    response = client.post("/classify", files={"image": (filename, data)},
                           data={"labels": [TRAVERSAL, "..\\..\\windows", "cat"]})
    check(response, {200})


def test_traversal_in_form_cursor(client):
    filename, data = good_images()["1x1 png"]
    check(client.post("/search/image", files={"image": (filename, data)},
                      data={"cursor": TRAVERSAL}), {422})


@pytest.mark.parametrize("path, allowed", [
    ("/items/999999", {404}), ("/items/999999/image", {404}), ("/items/-1", {422}),
    ("/items/99999999999999999999999", {422}), (f"/items/{TRAVERSAL}", {404, 422}),
    ("/items/..%2F..%2Fetc%2Fpasswd", {404, 422}), ("/static/../../etc/passwd", {404}),
])
def test_unknown_and_hostile_item_ids(client, path, allowed):
    check(client.get(path), allowed)


def test_non_json_body(client):
    check(client.post("/search/text", content=b"{not json",
                      headers={"content-type": "application/json"}), {400, 422})


def test_wrong_content_type(client):
    check(client.post("/search/text", content=b"text=a+red+square",
                      headers={"content-type": "application/x-www-form-urlencoded"}), {415, 422})
    check(client.post("/search/text", content=b"\x00\x01\x02",
                      headers={"content-type": "image/png"}), {415, 422})


def test_json_sent_where_an_upload_is_expected(client):
    check(client.post("/search/image", json={"image": "x"}), {415, 422})


def test_vector_of_the_wrong_dimension_and_non_finite(client):
    check(client.post("/search/vector", json={"vector": [1.0, 2.0]}), {422})
    check(client.post("/search/vector", content=b'{"vector": [NaN, 1.0]}',
                      headers={"content-type": "application/json"}), {422})


def test_the_image_zoo_through_the_indexer_is_skipped_and_reported(tiny, tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    for filename, data in {**good_images(), **bad_images()}.values():
        (folder / filename).write_bytes(data)
    out = tmp_path / "index"
    summary = build([folder], out, tiny, BuildConfig(workers=0, batch_size=8))
    reported = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    skipped = {Path(row["path"]).name for row in reported}
    assert skipped == {filename for filename, _ in bad_images().values()}, reported
    assert all(row["reason"] for row in reported)
    assert summary.images == len(good_images())
    with open_generation(out) as generation:
        assert generation.count("image") == len(good_images())
