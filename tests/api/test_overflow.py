"""Integers beyond a float's range through a real service: as a filter value on every route that
takes a filter, and in the metadata of admin writes, each is a 422 naming its field, never a
500, and the index is unchanged."""

from __future__ import annotations

import base64
import json

import pytest

from retrieval.models.identity import model_identity
from retrieval.models.inference import encode_images, encode_texts
from retrieval.store import write_generation
from tests.api.helpers import ADMIN, colour_records, keyed_service
from tests.conftest import make_image

HUGE = 10 ** 400  # a JSON number that float() cannot hold (OverflowError)
FILTERS = [{"field": "stars", "gte": HUGE}, {"field": "stars", "in": [1, -HUGE]},
           {"not": {"and": [{"field": "label", "eq": "red"}, {"field": "stars", "eq": HUGE}]}}]


@pytest.fixture(scope="module")
def server(tiny, images, tmp_path_factory):
    """A real index whose images carry a number field (`stars`) beside `label`."""
    root = tmp_path_factory.mktemp("overflow")
    resolved = {colour: path.resolve() for colour, path in images.items()}
    records = colour_records(resolved)
    for stars, record in enumerate(r for r in records if r.modality == "image"):
        record.metadata["stars"] = stars
    write_generation(root, model_identity(tiny), records, {
        "image": encode_images(tiny, list(resolved.values())),
        "text": encode_texts(tiny, [r.text for r in records if r.modality == "text"])})
    with keyed_service(tiny, root) as running:
        yield running


def problem(response, title: str, field: str) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["title"] == title, body
    assert f"'{field}'" in body["detail"] or f"metadata.{field}" in body["detail"], body
    return body["detail"]


@pytest.mark.parametrize("where", FILTERS)
def test_a_huge_filter_value_is_a_422_naming_its_field_on_every_route(client, images, where):
    vector = [0.1] * 32
    photo = images["blue"].read_bytes()
    picture = base64.b64encode(photo).decode()
    for path, body in [("/search/text", {"text": "a square"}),
                       ("/search/browse", {"order_by": "stars"}),
                       ("/search/vector", {"vector": vector}),
                       ("/search/multi", {"terms": [{"text": "red", "weight": 1}]}),
                       ("/knn-service", {"embedding_input": vector}),
                       ("/knn-service", {"image": picture})]:
        detail = problem(client.post(path, json={**body, "filter": where}), "Bad filter",
                         "stars")
        assert "number" in detail, path
    for path in ("/caption", "/search/image"):
        problem(client.post(path, files={"image": ("b.png", photo, "image/png")},
                            data={"filter": json.dumps(where)}), "Bad filter", "stars")


def test_huge_integers_in_admin_metadata_are_a_422_naming_the_key(client, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    before = client.get("/readyz").json()
    photo = make_image(tmp_path / "teal.png", (0, 128, 128)).read_bytes()
    added = client.post("/admin/items/image", headers=admin, files={
        "image": ("teal.png", photo, "image/png")}, data={
        "metadata": json.dumps({"album": "sea", "stars": HUGE})})
    assert "beyond the range" in problem(added, "Bad metadata", "stars")
    texts = client.post("/admin/items/texts", headers=admin, json={
        "texts": ["a note"], "metadata": {"sizes": [1.5, -HUGE]}})
    problem(texts, "Bad metadata", "sizes")
    assert client.get("/readyz").json() == before  # same generation, same counts
    fine = client.post("/admin/items/texts", headers=admin, json={
        "texts": ["a note"], "metadata": {"stars": 10 ** 300}})  # large, but a float holds it
    assert fine.status_code == 200, fine.text
