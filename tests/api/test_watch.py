"""`clipdex serve --watch`: a generation the indexer commits is served without a restart, and
a broken one on disk is refused while the last good one keeps answering."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np

from api.app import create_app
from api.settings import Settings
from retrieval.models.identity import model_identity
from retrieval.models.inference import encode_images
from retrieval.store import ItemRecord, update_generation
from tests.api.helpers import ServerThread, build_index, wait_for_generation
from tests.conftest import COLOURS, make_image


def _damaged_generation(root: Path, staging: Path, tiny) -> str:
    shutil.copytree(root, staging)
    name = update_generation(staging, model_identity(tiny), delete_ids=[10])
    (staging / "generations" / name / "images.npy").write_bytes(b"\x93NUMPY damaged")
    shutil.copytree(staging / "generations" / name, root / "generations" / name)
    (root / "CURRENT.tmp").write_text(name + "\n")
    os.replace(root / "CURRENT.tmp", root / "CURRENT")
    return name


def test_watch_serves_new_generations_and_skips_a_broken_one(tiny, tmp_path, caplog):
    images = {name: make_image(tmp_path / f"{name}.png", COLOURS[name]) for name in ("red", "blue")}
    root = build_index(tmp_path / "index", tiny, images)
    settings = Settings(index=root, watch_seconds=0.1)
    with ServerThread(create_app(settings, clip=tiny)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        assert wait_for_generation(http, "000001")["images"] == 2
        green = make_image(tmp_path / "green.png", COLOURS["green"])
        name = update_generation(root, model_identity(tiny), add=[ItemRecord(
            10, "image", path=str(green.resolve()))], add_vectors={
            "image": encode_images(tiny, [green]), "text": np.zeros((0, tiny.embed_dim))})
        assert wait_for_generation(http, name)["images"] == 3
        found = http.post("/search/image", files={"image": green.read_bytes()},
                          data={"k": "1", "target": "image"}).json()
        assert found["generation"] == name and found["hits"][0]["id"] == 10

        # A generation whose file is damaged when it becomes current: refused, the last one
        # serves. It is written in a copy of the index and damaged there, then switched in, so
        # the watcher (polling every 0.1 s) cannot load it in the moment before the damage.
        broken = _damaged_generation(root, tmp_path / "staging", tiny)
        time.sleep(1.0)  # ten polls
        assert http.get("/readyz").json()["generation"] == name
        assert "could not switch to generation" in caplog.text
        assert caplog.text.count(f"generation {broken}") == 1  # refused once, not every poll
        assert http.post("/search/text", json={"text": "a red square", "k": 3}).status_code == 200
