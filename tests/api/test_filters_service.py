"""Metadata filters through the service: a real uvicorn server on loopback, the tiny model and a
real index whose images carry a `label` field; every search endpoint takes `filter`, a bad one
is a 422 naming its field, and admin writes' metadata becomes filterable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.api.helpers import ADMIN, keyed_service
from tests.conftest import COLOURS, make_image

RED = {"field": "label", "eq": "red"}


@pytest.fixture(scope="module")
def server(tiny, index_root):
    with keyed_service(tiny, index_root) as running:
        yield running


def problem(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


def test_a_filter_on_an_unknown_field_is_a_422_naming_it(client):
    body = problem(client.post("/search/text", json={
        "text": "a square", "filter": {"field": "colour", "eq": "red"}}))
    assert body["title"] == "Bad filter" and "'colour'" in body["detail"]
    assert "label (string)" in body["detail"]  # and says what the index has


def test_a_value_of_the_wrong_type_is_a_422_naming_field_and_type(client):
    body = problem(client.post("/search/text", json={
        "text": "a square", "filter": {"and": [{"field": "label", "gt": 3}]}}))
    assert "field 'label' is string" in body["detail"] and "filter.and[0].gt" in body["detail"]
    assert problem(client.post("/search/text", json={"text": "x", "filter": [1]}))


def test_a_filter_matching_one_item_returns_exactly_that_item(client):
    hits = client.post("/search/text", json={"text": "a blue square", "k": 10,
                                             "filter": RED}).json()["hits"]
    assert len(hits) == 1 and hits[0]["metadata"]["label"] == "red"
    vector = np.random.default_rng(0).normal(size=32).tolist()
    hits = client.post("/search/vector", json={"vector": vector, "filter": RED}).json()["hits"]
    assert [hit["metadata"]["label"] for hit in hits] == ["red"]
    multi = client.post("/search/multi", json={"terms": [{"weight": 1, "text": "blue"}],
                                               "filter": RED}).json()["hits"]
    assert [hit["metadata"]["label"] for hit in multi] == ["red"]


def test_uploads_take_the_filter_as_json_text(client, images):
    files = {"image": ("b.png", images["blue"].read_bytes(), "image/png")}
    either = json.dumps({"field": "label", "in": ["red", "green"]})
    texts = client.post("/search/image", files=files, data={"k": "10", "filter": either})
    assert {hit["image_id"] for hit in texts.json()["hits"]} == {0, 1}  # captions of red, green
    captions = client.post("/caption", files=files, data={"k": "5", "filter": json.dumps(RED)})
    assert {hit["image_id"] for hit in captions.json()["captions"]} == {0}
    assert len(captions.json()["captions"]) == 2
    assert "filter" in problem(client.post("/caption", files=files,
                                           data={"filter": "{oops"}))["detail"]
    assert "'shade'" in problem(client.post("/search/image", files=files, data={
        "filter": json.dumps({"field": "shade", "exists": True})}))["detail"]


def test_pages_of_a_filtered_search_cover_its_matches_once(client):
    wanted = {"not": {"field": "label", "in": ["red", "blue"]}}
    seen, cursor = [], None
    while True:
        body = client.post("/search/text", json={"text": "a square", "target": "text", "k": 3,
                                                 "filter": wanted, "cursor": cursor}).json()
        seen += [hit["id"] for hit in body["hits"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 2 * (len(COLOURS) - 2)
    other = client.post("/search/text", json={"text": "a square", "target": "text", "k": 3,
                                              "filter": wanted}).json()["next_cursor"]
    assert problem(client.post("/search/text", json={
        "text": "a square", "target": "text", "k": 3, "filter": RED, "cursor": other}))


def test_admin_metadata_becomes_filterable(client, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    photo = make_image(tmp_path / "teal.png", (0, 128, 128)).read_bytes()
    added = client.post("/admin/items/image", headers=admin, files={
        "image": ("teal.png", photo, "image/png")}, data={
        "metadata": json.dumps({"album": "sea", "stars": 5})})
    assert added.status_code == 200, added.text
    new_id = added.json()["ids"][0]
    found = client.post("/search/text", json={"text": "a red square", "filter": {
        "and": [{"field": "album", "eq": "sea"}, {"field": "stars", "gte": 4}]}}).json()
    assert [hit["id"] for hit in found["hits"]] == [new_id]
    texts = client.post("/admin/items/texts", headers=admin, json={
        "texts": ["a note"], "metadata": {"album": "notes"}})
    assert texts.status_code == 200, texts.text
    notes = client.post("/search/text", json={"text": "x", "target": "text", "filter": {
        "field": "album", "eq": "notes"}}).json()["hits"]
    assert [hit["text"] for hit in notes] == ["a note"]
    assert "metadata" in problem(client.post("/admin/items/texts", headers=admin, json={
        "texts": ["c"], "image_id": 0, "metadata": {"a": 1}}))["detail"]


def test_browse_lists_what_a_filter_matches_newest_first_or_by_a_field(client):
    body = client.post("/search/browse", json={"filter": {"field": "label", "in": [
        "red", "green", "blue"]}, "k": 2}).json()
    assert [hit["metadata"]["label"] for hit in body["hits"]] == ["blue", "green"]
    assert all(hit["score"] is None for hit in body["hits"])
    rest = client.post("/search/browse", json={"filter": {"field": "label", "in": [
        "red", "green", "blue"]}, "k": 2, "cursor": body["next_cursor"]}).json()
    assert [hit["metadata"]["label"] for hit in rest["hits"]] == ["red"]
    assert rest["next_cursor"] is None
    by_label = client.post("/search/browse", json={"order_by": "label", "descending": False,
                                                  "k": 3}).json()["hits"]
    assert [hit["metadata"]["label"] for hit in by_label] == sorted(COLOURS)[:3]
    captions = client.post("/search/browse", json={"target": "text", "k": 50, "filter": RED})
    assert {hit["image_id"] for hit in captions.json()["hits"]} == {0}
    assert "'shade'" in problem(client.post("/search/browse", json={"order_by": "shade"}))[
        "detail"]


def test_keyword_and_hybrid_modes_answer_with_their_ranks(client):
    keyword = client.post("/search/text", json={"text": "something coloured blue",
                                                "mode": "keyword", "k": 3}).json()["hits"]
    assert keyword[0]["metadata"]["label"] == "blue" and keyword[0]["keyword_rank"] == 1
    hybrid = client.post("/search/text", json={"text": "a square", "keywords": "purple",
                                               "mode": "hybrid", "filter": {
                                                   "field": "label", "ne": "red"}}).json()
    top = hybrid["hits"][0]
    assert top["metadata"]["label"] == "purple" and top["keyword_rank"] == 1
    assert top["vector_rank"] >= 1 and "red" not in [h["metadata"].get("label")
                                                     for h in hybrid["hits"]]
    assert "vector mode only" in problem(client.post("/search/text", json={
        "text": "x", "mode": "hybrid", "threshold": 0.2}))["detail"]


def test_knn_service_takes_a_clipdex_filter(client):
    found = client.post("/knn-service", json={"text": "a square", "num_images": 5,
                                              "filter": RED}).json()
    assert [row["label"] for row in found] == ["red"]
    assert "'shade'" in problem(client.post("/knn-service", json={
        "text": "a square", "filter": {"field": "shade", "eq": 1}}))["detail"]


@pytest.mark.parametrize("where,words", [
    ({"field": "label", "in": ["x"] * 501}, "list of 1 to 500"),
    ({"or": [{"field": "label", "eq": "red"}] * 65}, "at most 64 conditions"),
])
def test_oversized_filters_are_refused_not_run(client, where, words):
    assert words in problem(client.post("/search/text", json={"text": "x",
                                                             "filter": where}))["detail"]


def test_deeply_nested_filters_are_refused_not_crashed(client, images):
    deep: dict = {"field": "label", "eq": "red"}
    for _ in range(200):
        deep = {"not": deep}
    assert "nest at most" in problem(client.post("/search/text", json={
        "text": "x", "filter": deep}))["detail"]
    files = {"image": ("b.png", images["blue"].read_bytes(), "image/png")}
    text = '{"not":' * 2000 + "{}" + "}" * 2000  # valid JSON, deeper than json.loads goes
    assert problem(client.post("/caption", files=files, data={"filter": text}))
