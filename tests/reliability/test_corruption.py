"""A damaged generation file is refused with an error naming it, and a service started on a
damaged index stays up, says why on /readyz (503 problem) and never answers 500."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from retrieval.errors import ClipdexError
from retrieval.store import StoreOptions, open_generation
from tests.api.helpers import ServerThread, build_index
from tests.conftest import COLOURS, make_image
from tests.reliability.helpers import MODEL, small_generation

FILES = ["images.faiss", "texts.faiss", "images.npy", "texts.npy", "images.ids.npy",
         "texts.ids.npy", "items.sqlite", "manifest.json"]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path: Path) -> None:
    """Invert a few bytes spread over the file (start, middle, end)."""
    data = bytearray(path.read_bytes())
    for where in (0, len(data) // 2, len(data) - 2):
        data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_middle(path: Path) -> None:
    """One inverted byte in the middle: the subtle kind of damage."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    small_generation(root)
    return root


def damaged_copy(pristine: Path, tmp_path: Path, filename: str, damage) -> Path:
    import shutil

    root = tmp_path / "index"
    shutil.copytree(pristine, root)
    name = (root / "CURRENT").read_text().strip()
    damage(root / "generations" / name / filename)
    return root


def test_the_pristine_generation_opens(pristine):
    with open_generation(pristine, MODEL.sha256, MODEL.embed_dim) as generation:
        assert generation.count("image") == 6


def test_every_generation_file_is_covered(pristine):
    name = (pristine / "CURRENT").read_text().strip()
    assert sorted(p.name for p in (pristine / "generations" / name).iterdir()) == sorted(FILES)


# Without checksums a flipped payload byte can be undetectable by design, so that mode is
# only asked to catch truncation (and any damage to the manifest, which is always parsed).
CASES = [(filename, damage, verify) for filename in FILES
         for damage in (truncate, flip_bytes, flip_middle) for verify in (True, False)
         if verify or filename == "manifest.json" or damage is truncate]


@pytest.mark.parametrize("filename, damage, verify", CASES,
                         ids=[f"{f}-{d.__name__}-{'checksums' if v else 'no-checksums'}"
                              for f, d, v in CASES])
def test_a_damaged_file_is_refused_naming_it(pristine, tmp_path, filename, damage, verify):
    root = damaged_copy(pristine, tmp_path, filename, damage)
    with pytest.raises(ClipdexError, match=filename.replace(".", r"\.")):
        open_generation(root, MODEL.sha256, MODEL.embed_dim, verify_checksums=verify)


@pytest.fixture(scope="module")
def pristine_on_disk(tmp_path_factory) -> Path:
    """An image index with its inverted lists on disk (IVF-PQ needs >= 1,024 vectors)."""
    root = tmp_path_factory.mktemp("pristine-disk")
    small_generation(root, images=1100, texts=60, options=StoreOptions(index_kind="ivfpq-disk"))
    return root


DISK_FILES = ["images.faiss", "images.ivfdata"]
DISK_CASES = [(filename, damage, verify) for filename in DISK_FILES
              for damage in (truncate, flip_bytes, flip_middle) for verify in (True, False)
              if verify or damage is truncate]


@pytest.mark.parametrize("filename, damage, verify", DISK_CASES,
                         ids=[f"{f}-{d.__name__}-{'checksums' if v else 'no-checksums'}"
                              for f, d, v in DISK_CASES])
def test_a_damaged_on_disk_index_is_refused_naming_the_file(pristine_on_disk, tmp_path,
                                                            filename, damage, verify):
    generation = (pristine_on_disk / "CURRENT").read_text().strip()
    assert (pristine_on_disk / "generations" / generation / "images.ivfdata").is_file()
    root = damaged_copy(pristine_on_disk, tmp_path, filename, damage)
    with pytest.raises(ClipdexError, match=filename.replace(".", r"\.")):
        open_generation(root, MODEL.sha256, MODEL.embed_dim, verify_checksums=verify)


@pytest.fixture(scope="module")
def corrupt_index(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    images = {name: make_image(folder / f"{name}.png", COLOURS[name]) for name in ("red", "blue")}
    root = build_index(tmp_path_factory.mktemp("index"), tiny, images)
    name = (root / "CURRENT").read_text().strip()
    flip_bytes(root / "generations" / name / "images.faiss")
    return root


def test_a_service_on_a_corrupt_index_stays_up_and_says_why(tiny, corrupt_index):
    app = create_app(Settings(index=corrupt_index, read_keys=()), clip=tiny)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["content-type"].startswith("application/problem+json")
        assert "images.faiss" in ready.json()["detail"]
        assert http.get("/healthz").status_code == 200
        search = http.post("/search/text", json={"text": "a red square", "k": 2})
        assert search.status_code == 503, search.text
        assert search.headers["content-type"].startswith("application/problem+json")
        item = http.get("/items/1")
        assert item.status_code == 503, item.text  # not ready: documented, never a 500
        assert item.headers["content-type"].startswith("application/problem+json")
        assert http.get("/healthz").status_code == 200
