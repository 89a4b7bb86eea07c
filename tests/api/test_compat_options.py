"""clip-retrieval's request options on /knn-service: `deduplicate` collapses near-duplicate
results for real, and the options clipdex cannot apply are named in a response header."""

from __future__ import annotations

import pytest

from tests.api.helpers import keyed_service
from tests.conftest import make_image


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, images):
    from tests.api.helpers import build_index

    twins = dict(images)
    folder = tmp_path_factory.mktemp("twins")
    # the red photograph twice more, a pixel apart: near-duplicates of it
    twins["red again"] = make_image(folder / "red-again.png", (201, 30, 30))
    twins["red once more"] = make_image(folder / "red-more.png", (199, 30, 30))
    root = build_index(tmp_path_factory.mktemp("index"), tiny, twins)
    with keyed_service(tiny, root) as running:
        yield running


def test_deduplicate_folds_near_duplicate_results(client):
    request = {"text": "a red square", "modality": "image", "num_images": 5}
    plain = client.post("/knn-service", json={**request, "deduplicate": False})
    folded = client.post("/knn-service", json={**request, "deduplicate": True})
    assert plain.status_code == folded.status_code == 200
    plain_ids = [hit["id"] for hit in plain.json()]
    folded_ids = [hit["id"] for hit in folded.json()]
    assert len(folded_ids) < len(plain_ids) and set(folded_ids) < set(plain_ids)
    folded_away = [twin for hit in folded.json() for twin in hit.get("duplicates", [])]
    assert folded_away and set(folded_away) == set(plain_ids) - set(folded_ids)
    assert "X-Clipdex-Ignored" not in folded.headers


def test_options_without_effect_are_named(client):
    answer = client.post("/knn-service", json={"text": "a cat", "use_safety_model": True,
                                                "aesthetic_score": 9, "aesthetic_weight": 0.5,
                                                "deduplicate": False})
    assert answer.status_code == 200
    assert answer.headers["X-Clipdex-Ignored"] == ("use_safety_model, aesthetic_score, "
                                                   "aesthetic_weight")
