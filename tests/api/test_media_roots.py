"""An item's image is served only from the folders the operator named: an embedding pack
whose metadata names the password file, the service's own key file, a `../` climb or a link
out of the media root gets a 404 for each, on a real service with a read key; the images
that are really under the root are served, with the media type their bytes say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from clipdex.main import main
from retrieval.search.batcher import BatcherConfig
from retrieval.store import read_generation_manifest
from tests.api.helpers import ServerThread, build_index
from tests.conftest import make_image
from tests.indexer.helpers import sample_partitions, write_clip_retrieval

READ = "read-key"
AUTH = {"Authorization": f"Bearer {READ}"}


@pytest.fixture(scope="module")
def pack(tiny, tmp_path_factory) -> dict:
    """A clip-retrieval pack whose image paths point everywhere, imported with one media
    root holding two real photographs."""
    root = tmp_path_factory.mktemp("media")
    photos = root / "photos"
    photos.mkdir()
    good = make_image(photos / "red.png", (200, 30, 30))
    secret = root / "admin.key"
    secret.write_text("s3cret-admin-key\n")
    (photos / "notes.png").write_text("not an image, whatever its name says\n")
    os.symlink(secret, photos / "linked.png")
    os.symlink(good, root / "outside-link.png")  # a link from outside into the root
    paths = [str(good), "/etc/passwd", str(secret), f"{photos}/../../../../../etc/hostname",
             str(photos / "notes.png"), str(photos / "linked.png"), str(root / "outside-link.png"),
             f"{photos}/sub/../red.png"]
    partitions = sample_partitions(tiny.embed_dim, sizes=(len(paths),), seed=5)
    for row, path in zip(partitions[0].rows, paths):
        row["image_path"] = path
    folder = write_clip_retrieval(root / "pack", partitions)
    out = root / "index"
    assert main(["index", "build", "--from-embeddings", str(folder), "--out", str(out),
                 "--model", "external:ViT-B-32", "--media-root", str(photos)]) == 0
    return {"index": out, "paths": paths, "photos": photos, "secret": secret}


@pytest.fixture(scope="module")
def client(tiny, pack):
    settings = Settings(index=pack["index"], batching=BatcherConfig(32, 10, 64),
                        read_keys=(READ,))
    with ServerThread(create_app(settings, clip=tiny)) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        yield http


def test_only_images_under_the_media_root_are_served(client, pack):
    answers = {path: client.get(f"/items/{number}/image")
               for number, path in enumerate(pack["paths"], start=1)}
    served = {path for path, answer in answers.items() if answer.status_code == 200}
    # the photograph itself, also reached by a `..` that stays inside the root and by a link
    # from outside that resolves into it: links and `..` are resolved before the check
    assert served == {pack["paths"][0], pack["paths"][-2], pack["paths"][-1]}
    for path in served:
        assert answers[path].headers["content-type"] == "image/png"
        assert answers[path].content == Path(pack["paths"][0]).read_bytes()
    for path, answer in answers.items():
        assert answer.status_code in (200, 404), (path, answer.text)
        assert b"s3cret" not in answer.content and b"root:" not in answer.content
        assert str(pack["photos"]) not in answer.text  # no server path in any answer


def test_paths_outside_the_roots_are_metadata_never_files(pack, capsys):
    manifest = read_generation_manifest(pack["index"])
    assert manifest.data["media_roots"] == [str(pack["photos"].resolve())]
    folder = pack["index"].parent / "pack"
    again = pack["index"].parent / "again"
    assert main(["index", "build", "--from-embeddings", str(folder), "--out", str(again),
                 "--model", "external:ViT-B-32", "--media-root", str(pack["photos"])]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out[captured.out.index("{"):])
    # the password file, the key, the climb out and the link in the root to the key
    assert report["outside_media_roots"] == 4
    assert "never opened or served" in captured.err


def test_an_import_without_a_media_root_serves_no_file(tiny, pack, tmp_path):
    out = tmp_path / "index"
    assert main(["index", "build", "--from-embeddings", str(pack["index"].parent / "pack"),
                 "--out", str(out), "--model", "external:ViT-B-32"]) == 0
    settings = Settings(index=out, batching=BatcherConfig(32, 10, 64))
    with ServerThread(create_app(settings, clip=tiny)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        codes = [http.get(f"/items/{n}/image").status_code for n in range(1, 9)]
        item = http.get("/items/1").json()
    assert codes == [404] * 8
    assert item["metadata"]["image_path"] == "red.png"  # kept as metadata, by its name only


def test_a_folder_index_serves_its_folder_and_not_a_file_swapped_for_a_link(tiny, tmp_path):
    """The roots of a folder build are the folders; an indexed photograph later replaced by
    a link to a secret outside them is refused, and a non-image in its place too."""
    folder = tmp_path / "photos"
    folder.mkdir()
    images = {name: make_image(folder / f"{name}.png", rgb)
              for name, rgb in {"red": (200, 30, 30), "blue": (30, 30, 200),
                                "green": (30, 200, 30)}.items()}
    index = build_index(tmp_path / "index", tiny, images)
    assert read_generation_manifest(index).data["media_roots"] == [str(folder.resolve())]
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    images["blue"].unlink()
    os.symlink(secret, images["blue"])
    images["green"].write_bytes(b"GIF89a but not really")
    settings = Settings(index=index, batching=BatcherConfig(32, 10, 64))
    with ServerThread(create_app(settings, clip=tiny)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        by_name = {}
        for item_id in range(3):
            label = http.get(f"/items/{item_id}").json()["metadata"]["label"]
            by_name[label] = http.get(f"/items/{item_id}/image")
    assert by_name["red"].status_code == 200
    assert by_name["blue"].status_code == 404 and b"s3cret" not in by_name["blue"].content
    assert by_name["green"].status_code == 404


def test_media_root_is_refused_for_a_build_from_folders(tmp_path, capsys):
    assert main(["index", "build", str(tmp_path), "--out", str(tmp_path / "i"),
                 "--media-root", str(tmp_path)]) == 2
    assert "--from-embeddings" in capsys.readouterr().err
