"""A CURRENT that names no generation (a path, a path outside the index, 5,000 characters)
through a real service with `--watch`: each is refused with a clear error, the last good
generation keeps answering, the watcher goes on following CURRENT, and an admin reload says
why it cannot switch (a problem, never a 500)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import numpy as np

from retrieval.models.identity import model_identity
from retrieval.store import update_generation
from tests.api.helpers import ADMIN, AUTH, build_index, keyed_service, wait_for_generation

GARBLED = ["../generations/000001", "../../../../etc", "0" * 5000]


def point(root: Path, text: str) -> None:
    (root / "CURRENT.tmp").write_text(text + "\n")
    os.replace(root / "CURRENT.tmp", root / "CURRENT")


def test_a_garbled_current_is_refused_and_serving_goes_on(tiny, images, tmp_path, caplog):
    root = build_index(tmp_path / "index", tiny, images)
    second = update_generation(root, model_identity(tiny), delete_ids=[0])
    with keyed_service(tiny, root, watch_seconds=0.1) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        wait_for_generation(http, second)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for text in GARBLED:
            point(root, text)
            time.sleep(0.5)  # five polls
            ready = http.get("/readyz").json()
            assert ready["generation"] == second, text[:40]
            reload = http.post("/admin/reload", headers=admin)
            assert reload.status_code == 503, reload.text
            detail = reload.json()["detail"]
            assert "not a generation name" in detail and len(detail) < 300
            assert str(tmp_path) not in detail  # no server paths
            vector = np.ones(tiny.embed_dim).tolist()
            assert http.post("/search/vector", json={"vector": vector}).status_code == 200
        assert caplog.text.count("could not switch to generation") == len(GARBLED)
        point(root, "000001")  # the kept previous generation: the watcher still follows
        assert wait_for_generation(http, "000001")["images"] == len(images)
