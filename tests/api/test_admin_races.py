"""Admin writes that race each other on a real service: eight concurrent uploads of the same
bytes make one item, and every answer names it (the duplicate check runs under the store's
writer lock, not before it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.api.helpers import ADMIN, build_index, keyed_service

UPLOADS = 8


def test_concurrent_uploads_of_the_same_bytes_make_one_item(tiny, images, tmp_path):
    root = build_index(tmp_path / "index", tiny, images)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    data = images["blue"].read_bytes()  # the same bytes, from eight clients at once
    with keyed_service(tiny, root) as running:
        def upload(number: int) -> dict:
            with httpx.Client(base_url=running.url, headers=admin, timeout=60) as http:
                answer = http.post("/admin/items/image",
                                   files={"image": (f"{number}.png", data)})
                assert answer.status_code == 200, answer.text
                return answer.json()

        with ThreadPoolExecutor(UPLOADS) as pool:
            answers = list(pool.map(upload, range(UPLOADS)))
        with httpx.Client(base_url=running.url, headers=admin, timeout=30) as http:
            listed = http.post("/search/browse", json={"k": 100}).json()["hits"]
    ids = {answer["ids"][0] for answer in answers}
    assert len(ids) == 1, answers
    assert sum(not answer["duplicate"] for answer in answers) == 1
    assert len(listed) == len(images) + 1  # the colours, and the one upload
