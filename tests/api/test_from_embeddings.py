"""The service over an index built from clip-retrieval's embeddings: /search/vector answers
exactly what brute force over the input vectors answers; when the embeddings' model is
external, /readyz says so and text and image queries are refused with a 409 naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.app import create_app
from api.settings import Settings
from clipdex.main import main
from retrieval.search.batcher import BatcherConfig
from retrieval.search.searcher import normalise
from tests.api.helpers import ServerThread
from tests.conftest import make_image
from tests.indexer.helpers import sample_partitions, stacked, write_clip_retrieval

EXTERNAL = "ViT-B-32:laion2b_s34b_b79k"
IMAGES = 8  # sample_partitions' default sizes: 5 + 3 rows, one caption each
ADMIN = "admin-key"


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory) -> dict:
    """clip-retrieval output of the tiny model's width, built twice: once naming clipdex-tiny
    as its model, once recording an external one."""
    root = tmp_path_factory.mktemp("from-embeddings")
    partitions = sample_partitions(tiny.embed_dim, seed=3)
    folder = write_clip_retrieval(root / "embeddings", partitions)
    for out, model in (("named", "clipdex-tiny"), ("external", f"external:{EXTERNAL}")):
        argv = ["index", "build", "--from-embeddings", str(folder), "--out", str(root / out),
                "--model", model, "--device", "cpu"]
        assert main(argv) == 0
    return {"root": root, "images": stacked(partitions, "images"),
            "texts": stacked(partitions, "texts")}


def _serve(tiny, index: Path) -> ServerThread:
    settings = Settings(index=index, batching=BatcherConfig(32, 10, 64), admin_key=ADMIN)
    return ServerThread(create_app(settings, clip=tiny))


@pytest.fixture(scope="module", params=["named", "external"])
def client(request, tiny, corpus):
    with _serve(tiny, corpus["root"] / request.param) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        yield request.param, http


def _brute_force(vectors: np.ndarray, query: np.ndarray, k: int,
                 first_id: int) -> tuple[list[int], np.ndarray]:
    scores = vectors @ normalise(query)  # (n,)
    order = np.argsort(-scores, kind="stable")[:k]
    return (order + first_id).tolist(), scores[order]


@pytest.mark.parametrize("target", ["image", "text"])
def test_vector_search_equals_brute_force_over_the_inputs(client, corpus, target):
    _, http = client
    rng = np.random.default_rng(7)
    vectors, first_id = ((corpus["images"], 1) if target == "image"
                         else (corpus["texts"], IMAGES + 1))
    for _ in range(5):
        query = rng.normal(size=vectors.shape[1])
        response = http.post("/search/vector", json={"vector": query.tolist(), "k": 5,
                                                     "target": target})
        assert response.status_code == 200, response.text
        hits = response.json()["hits"]
        ids, scores = _brute_force(vectors, query, 5, first_id)
        assert [hit["id"] for hit in hits] == ids
        np.testing.assert_allclose([hit["score"] for hit in hits], scores, atol=1e-5)


def test_hits_carry_clip_retrieval_metadata(client):
    _, http = client
    hit = http.post("/search/multi", json={"terms": [{"item_id": 1, "weight": 1.0}],
                                           "k": 1}).json()["hits"][0]
    assert hit["id"] == 1 and hit["captions"] == ["caption number 0"]
    assert hit["metadata"]["url"] == "https://example.com/000000000.jpg"
    missing = http.get(hit["image_url"])  # keys, not files: clip-retrieval read a webdataset
    assert missing.status_code == 404 and "has no file in this index" in missing.json()["detail"]


def test_readyz_says_which_queries_an_external_model_allows(client, tiny):
    kind, http = client
    body = http.get("/readyz").json()
    if kind == "named":
        assert (body["model"], body["external_model"]) == (tiny.arch, False)
        assert body["queries"] == ["text", "image", "vector", "item"] and body["note"] is None
        return
    assert (body["model"], body["external_model"], body["images"]) == (EXTERNAL, True, IMAGES)
    assert body["queries"] == ["vector", "item"]
    assert EXTERNAL in body["note"] and "/search/vector" in body["note"]


def test_text_and_image_queries_need_the_external_model(client, tmp_path):
    kind, http = client
    png = make_image(tmp_path / "query.png", (200, 30, 30)).read_bytes()
    answers = [http.post("/search/text", json={"text": "a red square"}),
               http.post("/search/image", files={"image": ("q.png", png, "image/png")}),
               http.post("/classify", files={"image": ("q.png", png, "image/png")},
                         data={"labels": ["red", "blue"]}),
               http.post("/knn-service", json={"text": "a red square"})]
    if kind == "named":
        assert [a.status_code for a in answers] == [200] * 4
        return
    # nor can the service add texts to it: its model would make vectors of another space
    answers.append(http.post("/admin/items/texts", json={"texts": ["a new caption"]},
                             headers={"Authorization": f"Bearer {ADMIN}"}))
    for answer in answers:
        assert answer.status_code == 409, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        body = answer.json()
        assert body["title"] == "Model not available"
        assert EXTERNAL in body["detail"] and "text and image queries" in body["detail"]
        assert "/search/vector" in body["detail"]


def test_an_index_of_external_embeddings_is_served_without_loading_a_model(corpus, tiny,
                                                                          tmp_path):
    """The model could not encode a query for these embeddings anyway: loading it would only
    cost memory (about 1 GB for the default). It is loaded when a generation clipdex made
    becomes current, and writes before then say which model they need."""
    root = tmp_path / "index"
    shutil.copytree(corpus["root"] / "external", root)
    settings = Settings(index=root, model="clipdex-tiny", device="cpu",
                        batching=BatcherConfig(32, 10, 64), admin_key=ADMIN)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        state = server.server.config.app.state.service
        assert http.get("/readyz").json()["external_model"] is True
        assert state.clip is None and state.text_batcher is None
        query = corpus["images"][2].tolist()
        assert http.post("/search/vector", json={"vector": query, "k": 1}).json()["hits"][0][
            "id"] == 3
        for refused in (http.post("/admin/items/texts", json={"texts": ["new"]}, headers=admin),
                        http.delete("/admin/items/1", headers=admin)):
            assert refused.status_code == 409 and EXTERNAL in refused.json()["detail"]
        # the same vectors again, now under a model clipdex can load
        assert main(["index", "build", "--from-embeddings", str(corpus["root"] / "embeddings"),
                     "--out", str(root), "--model", "clipdex-tiny", "--device", "cpu"]) == 0
        assert http.post("/admin/reload", headers=admin).json()["changed"] is True
        assert state.clip is not None
        ready = http.get("/readyz").json()
        assert (ready["model"], ready["external_model"]) == (tiny.arch, False)
        assert http.post("/search/text", json={"text": "a red square"}).status_code == 200
