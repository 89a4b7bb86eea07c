"""Two writers at once, as real processes: `clipdex index add` encoding in its own process
while the service's admin API commits a generation. The store allocates ids under its writer
lock, so both succeed and every item keeps a unique id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from api.app import create_app
from api.settings import Settings
from indexer.build import BuildConfig, build
from retrieval.store import open_generation
from tests.conftest import COLOURS, make_image
from tests.support.server import ServerThread

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-key"


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_index_add_and_admin_writes_at_once_both_land(tiny, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    names = list(COLOURS)
    for name in names[:3]:
        make_image(first / f"{name}.png", COLOURS[name])
    for name in names[3:]:
        make_image(second / f"{name}.png", COLOURS[name])
    root = tmp_path / "index"
    build([first], root, tiny, BuildConfig(workers=0))
    upload = make_image(tmp_path / "upload.png", (90, 90, 90))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "CLIPDEX_FAULT": "pause:after_shard:0"}  # stops itself once its images are encoded
    command = [sys.executable, "-m", "clipdex", "index", "add", str(second),
               "--index", str(root), "--model", "clipdex-tiny", "--device", "cpu",
               "--workers", "0"]
    job = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        _wait(lambda: job.poll() is not None or _stopped(job.pid), 120, "the add to pause")
        assert job.poll() is None, job.stderr.read().decode()
        settings = Settings(index=root, admin_key=ADMIN)
        with ServerThread(create_app(settings, clip=tiny)) as server, \
                httpx.Client(base_url=server.url, timeout=60,
                             headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            texts = http.post("/admin/items/texts", json={"texts": ["written by the API"]})
            image = http.post("/admin/items/image", files={"image": upload.read_bytes()},
                              data={"captions": ["a grey square"]})
        assert texts.status_code == 200 and image.status_code == 200, (texts.text, image.text)
        os.kill(job.pid, signal.SIGCONT)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr.decode()[-2000:]

    api_ids = texts.json()["ids"] + image.json()["ids"]
    with open_generation(root) as current:
        items = [record for record in current.items(range(1, current.next_id))
                 if record is not None]
        assert current.count("image") == 3 + 1 + len(names[3:])
    ids = [record.id for record in items]
    assert len(ids) == len(set(ids))
    assert set(api_ids) <= set(ids)
    paths = {Path(record.path).name for record in items if record.modality == "image"}
    assert {f"{name}.png" for name in names} <= paths
    caption = next(r for r in items if r.text == "a grey square")
    assert caption.image_id == image.json()["ids"][0]  # the link moved with the ids
