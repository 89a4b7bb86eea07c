"""The search service end to end: a real uvicorn server on loopback, the tiny model and a real
index generation written through retrieval.store."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from retrieval.search.batcher import BatcherConfig
from tests.api.helpers import ADMIN, AUTH, READ, ServerThread, build_index, keyed_service
from tests.conftest import COLOURS


def serve(tiny, index_root: Path, **overrides) -> ServerThread:
    return keyed_service(tiny, index_root, **{"max_image_pixels": 250_000,
                                              "max_body_bytes": 2_000_000,
                                              "batching": BatcherConfig(32, 10, 64), **overrides})


@pytest.fixture(scope="module")
def server(tiny, index_root):
    with serve(tiny, index_root) as running:
        yield running



def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status
    assert "Traceback" not in body["detail"]
    return body


# --- searching ---
def test_text_search_returns_images_with_scores_ids_and_metadata(client):
    body = client.post("/search/text", json={"text": "a red square", "k": 3}).json()
    assert len(body["hits"]) == 3
    scores = [hit["score"] for hit in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    hit = body["hits"][0]
    assert hit["modality"] == "image" and hit["metadata"]["label"] in COLOURS
    assert hit["image_url"].endswith(f"/items/{hit['id']}/image")
    assert body["generation"]


def test_image_upload_finds_texts_and_itself(client, images):
    files = {"image": ("red.png", png_bytes(images["red"]), "image/png")}
    texts = client.post("/search/image", files=files, data={"k": "4"}).json()
    assert [hit["modality"] for hit in texts["hits"]] == ["text"] * 4
    similar = client.post("/search/image", files=files, data={"k": "1", "target": "image"})
    top = similar.json()["hits"][0]
    assert top["metadata"]["label"] == "red" and top["score"] > 0.99


def test_vector_and_weighted_multi_query(client, images):
    red = client.post("/search/image", files={"image": ("r.png", png_bytes(images["red"]))},
                      data={"k": "1", "target": "image"}).json()["hits"][0]["id"]
    rng = np.random.default_rng(0)
    vector = rng.normal(size=32).tolist()
    assert len(client.post("/search/vector", json={"vector": vector, "k": 5}).json()["hits"]) == 5
    image_b64 = base64.b64encode(png_bytes(images["red"])).decode()
    body = client.post("/search/multi", json={"k": 2, "terms": [
        {"weight": 1.0, "item_id": red}, {"weight": 0.3, "image_base64": image_b64},
        {"weight": -0.2, "text": "people"}]}).json()
    assert body["hits"][0]["id"] == red


def test_zero_shot_classification_gives_probabilities(client, images):
    response = client.post("/classify", files={"image": ("r.png", png_bytes(images["red"]))},
                           data={"labels": ["red", "blue", "dog"]})
    body = response.json()
    assert [entry["label"] for entry in body["labels"]] != []
    assert sum(entry["probability"] for entry in body["labels"]) == pytest.approx(1, abs=1e-4)
    assert body["template"] == "a photo of a {}."


def test_caption_by_retrieval_returns_indexed_texts(client, images):
    body = client.post("/caption", files={"image": ("b.png", png_bytes(images["blue"]))},
                       data={"k": "3"}).json()
    assert len(body["captions"]) == 3
    assert all(hit["text"] and hit["modality"] == "text" for hit in body["captions"])


def test_item_lookup_and_image_by_id(client, images):
    item = client.get("/items/0").json()
    assert item["modality"] == "image" and item["captions"]
    image = client.get("/items/0/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == images[item["metadata"]["label"]].read_bytes()
    text = client.get(f"/items/{len(COLOURS)}").json()
    assert text["modality"] == "text" and text["image_id"] is not None
    assert_problem(client.get("/items/99999"), 404)
    assert_problem(client.get("/items/-1"), 422)
    assert_problem(client.get("/items/..%2F..%2Fetc%2Fpasswd/image"), 404)  # no such route


def test_cursor_pages_through_every_text_once(client):
    seen, cursor = [], None
    while True:
        body = client.post("/search/text", json={"text": "a square", "target": "text", "k": 5,
                                                 "cursor": cursor}).json()
        seen += [hit["id"] for hit in body["hits"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 2 * len(COLOURS)
    whole = client.post("/search/text", json={"text": "a square", "target": "text", "k": 100})
    assert [hit["id"] for hit in whole.json()["hits"]] == seen


def test_threshold_and_k_larger_than_the_index(client):
    everything = client.post("/search/text", json={"text": "green", "k": 1000}).json()["hits"]
    assert len(everything) == len(COLOURS)
    cut = everything[2]["score"]
    kept = client.post("/search/text", json={"text": "green", "k": 1000, "threshold": cut})
    assert [hit["id"] for hit in kept.json()["hits"]] == [hit["id"] for hit in everything[:3]]


# --- bad input: every one a 4xx problem that says what to fix ---
def _big_png() -> bytes:
    return encoded(Image.new("RGB", (600, 600), (10, 20, 30)), "PNG")


@pytest.mark.parametrize(("kind", "status"), [
    ("empty text", 422), ("long text", 422), ("k zero", 422), ("k too big", 422),
    ("bad threshold", 422), ("unknown field", 422), ("not json", 422), ("wrong dim", 422),
    ("zero vector", 422), ("bad cursor", 422), ("no terms", 422), ("two kinds in a term", 422),
    ("undecodable image", 422), ("bmp image", 415), ("too many pixels", 413),
    ("no image", 422), ("bad base64", 422), ("unknown item term", 404),
])
def test_bad_input_gets_a_problem(client, kind, status):
    text = lambda **extra: client.post("/search/text", json={"text": "a dog", **extra})
    upload = lambda data: client.post("/search/image", files={"image": ("x", data)})
    requests = {
        "empty text": lambda: client.post("/search/text", json={"text": "   "}),
        "long text": lambda: client.post("/search/text", json={"text": "a" * 1001}),
        "k zero": lambda: text(k=0),
        "k too big": lambda: text(k=1001),
        "bad threshold": lambda: text(threshold=2),
        "unknown field": lambda: text(colour="red"),
        "not json": lambda: client.post("/search/text", content=b"{not json",
                                        headers={"content-type": "application/json"}),
        "wrong dim": lambda: client.post("/search/vector", json={"vector": [0.1] * 7}),
        "zero vector": lambda: client.post("/search/vector", json={"vector": [0.0] * 32}),
        "bad cursor": lambda: text(cursor="not-a-cursor"),
        "no terms": lambda: client.post("/search/multi", json={"terms": []}),
        "two kinds in a term": lambda: client.post("/search/multi", json={
            "terms": [{"weight": 1, "text": "a", "item_id": 1}]}),
        "undecodable image": lambda: upload(b"\x89PNG\r\n\x1a\nnot really"),
        "bmp image": lambda: upload(encoded(Image.new("RGB", (8, 8)), "BMP")),
        "too many pixels": lambda: upload(_big_png()),
        "no image": lambda: client.post("/search/image", data={"k": "3"}),
        "bad base64": lambda: client.post("/search/multi", json={
            "terms": [{"weight": 1, "image_base64": "!!!"}]}),
        "unknown item term": lambda: client.post("/search/multi", json={
            "terms": [{"weight": 1, "item_id": 424242}]}),
    }
    body = assert_problem(requests[kind](), status)
    assert len(body["detail"]) > 10


def test_body_cap_counts_streamed_chunks(client):
    def chunks():
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield b"x" * 100_000  # 4 MB in all, no Content-Length: chunked encoding

    response = client.post("/search/image", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert_problem(response, 413)
    assert "content-length" not in response.request.headers
    declared = client.post("/search/text", content=b"{" + b" " * 2_100_000 + b"}",
                           headers={"content-type": "application/json"})
    assert_problem(declared, 413)


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/nowhere"), 404)
    assert_problem(client.get("/search/text"), 405)


# --- keys ---
def test_keys_401_for_missing_or_wrong_403_for_read_key_on_writes(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert_problem(anonymous.post("/search/text", json={"text": "red"}), 401)
        wrong = anonymous.post("/search/text", json={"text": "red"},
                               headers={"Authorization": "Bearer nope"})
        assert_problem(wrong, 401)
        assert anonymous.post("/search/text", json={"text": "red"},
                              headers={"X-API-Key": READ}).status_code == 200
        assert_problem(anonymous.post("/admin/reload", headers=AUTH), 403)
        assert_problem(anonymous.post("/admin/reload"), 401)
        ok = anonymous.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        assert ok.status_code == 200 and ok.json()["changed"] is False
        assert anonymous.get("/healthz").status_code == 200  # probes need no key


# --- operations ---
def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["images"] == len(COLOURS)
    assert ready["texts"] == 2 * len(COLOURS) and ready["embed_dim"] == 32
    client.post("/search/text", json={"text": "red"})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("clipdex_requests_total", "clipdex_request_seconds_bucket",
                 "clipdex_batch_size_bucket", "clipdex_queue_depth"):
        assert name in metrics.text


def test_openapi_documents_bounds_and_role_named_schemas(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("SearchTextRequest", "SearchHit", "SearchResponse", "SearchMultiRequest",
                 "ClassifyResponse", "CaptionResponse"):
        assert name in schemas
    k = schemas["SearchTextRequest"]["properties"]["k"]
    assert (k["minimum"], k["maximum"]) == (1, 1000)
    assert schemas["SearchTextRequest"]["properties"]["text"]["maxLength"] == 1000


def test_docs_page_works_without_a_network(client):
    """Swagger UI's script and styles come from this server, not from a CDN."""
    page = client.get("/docs").text
    assert "cdn.jsdelivr.net" not in page
    script = next(part.split('"')[0] for part in page.split('src="')[1:]
                  if "swagger-ui-bundle" in part)
    assert client.get(script).status_code == 200


def test_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "search/text" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external network


# --- batching ---
def test_concurrent_requests_share_a_batch(server, client):
    state = server.server.config.app.state.service
    gate = threading.Event()
    state.executor.submit(gate.wait, 10)  # hold the model thread so requests pile up

    before = state.text_batcher.stats.submitted

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
            tasks = [asyncio.create_task(http.post("/search/text", json={"text": f"q {n}"}))
                     for n in range(8)]
            while state.text_batcher.stats.submitted < before + 8:
                await asyncio.sleep(0.01)
            gate.set()
            return await asyncio.gather(*tasks)

    assert all(response.status_code == 200 for response in asyncio.run(burst()))
    # 8 waiting inputs go in at most two model calls (one may have started before the rest)
    assert state.text_batcher.stats.largest_batch >= 4
    metrics = client.get("/metrics").text
    line = next(row for row in metrics.splitlines()
                if row.startswith('clipdex_batch_size_bucket{kind="text",le="1.0"}'))
    total = next(row for row in metrics.splitlines()
                 if row.startswith('clipdex_batch_size_count{kind="text"}'))
    assert float(line.split()[-1]) < float(total.split()[-1])  # some batch held several


def test_full_queue_answers_503_with_retry_after(tiny, index_root):
    with serve(tiny, index_root, batching=BatcherConfig(1, 0, 2)) as small:
        state = small.server.config.app.state.service
        gate = threading.Event()
        state.executor.submit(gate.wait, 10)

        batcher = state.text_batcher

        async def until(condition, what: str) -> None:
            deadline = time.monotonic() + 20
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting until {what}"
                await asyncio.sleep(0.01)

        async def burst():
            async with httpx.AsyncClient(base_url=small.url, headers=AUTH, timeout=30) as http:
                def post(n: int) -> asyncio.Task:
                    return asyncio.create_task(http.post("/search/text", json={"text": f"{n}"}))

                # One at a time, so the first is surely out of the queue (stuck on the gate)
                # before the next two fill it.
                tasks = [post(0)]
                await until(lambda: batcher.stats.submitted == 1 and batcher.depth == 0,
                            "the first request is taken off the queue")
                tasks += [post(1), post(2)]
                await until(lambda: batcher.depth == 2, "two requests wait in the queue")
                refused = await http.post("/search/text", json={"text": "one too many"})
                gate.set()
                return refused, await asyncio.gather(*tasks)

        refused, served = asyncio.run(burst())
    assert_problem(refused, 503)
    assert refused.headers["retry-after"] == "1"
    assert [response.status_code for response in served] == [200, 200, 200]


# --- writes and generation switches ---
def test_writes_and_reload_under_load_lose_no_request(tiny, images, tmp_path):
    root = build_index(tmp_path / "index", tiny, images)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with serve(tiny, root) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        first = http.get("/readyz", headers=AUTH).json()["generation"]
        statuses: list[int] = []
        stop = threading.Event()

        def load():
            with httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as worker:
                while not stop.is_set():
                    statuses.append(worker.post("/search/text", json={"text": "red"}).status_code)

        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        added = http.post("/admin/items/texts", headers=admin,
                          json={"texts": ["a crimson tile"], "image_id": 0}).json()
        upload = http.post("/admin/items/image", headers=admin,
                           files={"image": ("p.png", images["purple"].read_bytes())},
                           data={"captions": ["a violet block"]}).json()
        deleted = http.delete(f"/admin/items/{added['ids'][0]}", headers=admin).json()
        reloaded = http.post("/admin/reload", headers=admin).json()
        stop.set()
        for worker in workers:
            worker.join()
        ready = http.get("/readyz", headers=AUTH).json()
        new_image = http.get(f"/items/{upload['ids'][0]}/image", headers=AUTH)
    assert statuses and set(statuses) == {200}
    assert len({first, added["generation"], upload["generation"], deleted["generation"]}) == 4
    assert reloaded["changed"] is False and ready["generation"] == deleted["generation"]
    assert ready["images"] == len(COLOURS) + 1 and ready["texts"] == 2 * len(COLOURS) + 1
    assert new_image.content == images["purple"].read_bytes()


def test_not_ready_without_an_index_says_why(tiny, tmp_path):
    with serve(tiny, tmp_path / "missing") as running, \
            httpx.Client(base_url=running.url, headers=AUTH) as http:
        body = assert_problem(http.get("/readyz"), 503)
        assert "clipdex index build" in body["detail"]
        assert_problem(http.post("/search/text", json={"text": "red"}), 503)
        assert http.get("/healthz").status_code == 200


# --- clip-retrieval's own client ---
def _clip_client():
    import importlib.util

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed: pip install --no-deps clip-retrieval==2.45.0")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_retrieval_client_queries_clipdex(server, images):
    client_module = _clip_client()
    host = server.url.removeprefix("http://")
    url = f"http://:{READ}@{host}/knn-service"  # requests turns userinfo into Basic auth
    images_client = client_module.ClipClient(url=url, indice_name="clipdex", num_images=3)
    results = images_client.query(text="a red square")
    assert len(results) == 3
    assert set(results[0]) >= {"id", "similarity", "url", "caption"}
    by_image = images_client.query(image=str(images["green"]))
    assert by_image[0]["caption"] in ("a green square", "something coloured green")
    texts_client = client_module.ClipClient(url=url, indice_name="clipdex", num_images=2,
                                            modality=client_module.Modality.TEXT)
    assert len(texts_client.query(embedding_input=[0.1] * 32)) == 2
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        assert http.get("/indices-list").json() == ["clipdex"]
