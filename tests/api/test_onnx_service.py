"""The service on the ONNX Runtime backend: its micro-batched text and image queries, over an
index built with torch, rank and score as the exact search with torch's query embeddings does."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from retrieval.models import onnx as onnx_backend
from retrieval.models.inference import encode_images, encode_texts
from retrieval.store import open_generation
from tests.api.helpers import AUTH, keyed_service

TOLERANCE = 1e-4  # scores of unit vectors whose cosines to torch's are >= 0.9999


@pytest.fixture(scope="module")
def onnx_tiny(tiny, tmp_path_factory):
    twin = copy.copy(tiny)
    onnx_backend.attach(twin, "onnx", tmp_path_factory.mktemp("onnx"))
    assert twin.backend == "onnx"
    return twin


def exact(index_root, tiny, modality: str, query: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Brute-force ranking of every item of `modality` against a (d,) query."""
    from retrieval.models.identity import model_identity

    identity = model_identity(tiny)
    with open_generation(index_root, identity.sha256, identity.embed_dim) as generation:
        ids, vectors = generation.all_vectors(modality)
    scores = vectors @ query  # (n,)
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in ids[order]], scores[order]


def test_text_and_image_queries_on_onnx_runtime_match_torch_exact_search(
        tiny, onnx_tiny, index_root, images):
    import httpx

    with keyed_service(onnx_tiny, index_root) as server, httpx.Client(
            base_url=server.url, headers=AUTH, timeout=30) as client:
        text_hits = client.post("/search/text", json={"text": "a red square", "k": 8}).json()
        image_hits = client.post("/search/image", files={"image": images["blue"].read_bytes()},
                                 data={"k": "8", "target": "image"}).json()
    for hits, query in ((text_hits, encode_texts(tiny, ["a red square"])[0]),
                        (image_hits, encode_images(tiny, [images["blue"]])[0])):
        ids, scores = exact(index_root, tiny, "image", query)
        got = [hit["score"] for hit in hits["hits"]]
        np.testing.assert_allclose(got, scores[:len(got)], atol=TOLERANCE)
        assert [hit["id"] for hit in hits["hits"]][:3] == ids[:3]
