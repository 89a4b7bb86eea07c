"""The generation store on real files: FAISS indexes, SQLite rows, manifest checks, updates."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import (
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    UnknownItemError,
)
from retrieval.inputs.captions import Skipped
from retrieval.models.identity import ModelIdentity
from retrieval.store import (
    FORMAT,
    ItemRecord,
    JobFolder,
    NewImage,
    NewText,
    ParquetJobFolder,
    StoreOptions,
    append_items,
    current_name,
    drop_stale_add_jobs,
    faults,
    image_with_captions,
    layout,
    linked_records,
    open_generation,
    read_generation_manifest,
    text_records,
    update_generation,
    upload_path,
    write_error_report,
    write_generation,
)
from retrieval.store import manifest as manifests

DIM = 8
MODEL = ModelIdentity(sha256="ab" * 32, arch="synthetic", embed_dim=DIM)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def small_index(root: Path, images: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Images 1..n, one caption text each (ids n+1..2n), plus one free text."""
    rng = np.random.default_rng(seed)
    image_vectors = unit(rng.normal(size=(images, DIM)))
    text_vectors = unit(np.concatenate([image_vectors + 0.1, rng.normal(size=(1, DIM))]))
    records = [ItemRecord(i + 1, "image", path=f"/img/{i}.png", captions=[f"caption {i}"],
                          metadata={"n": i}) for i in range(images)]
    records += [ItemRecord(images + i + 1, "text", text=f"caption {i}", image_id=i + 1)
                for i in range(images)]
    records.append(ItemRecord(2 * images + 1, "text", text="a free text"))
    write_generation(root, MODEL, records, {"image": image_vectors, "text": text_vectors})
    return {"image": image_vectors, "text": text_vectors}


def test_write_then_open_searches_and_reads_items(tmp_path):
    vectors = small_index(tmp_path)
    generation = open_generation(tmp_path, MODEL.sha256, DIM)
    assert generation.name == current_name(tmp_path) == "000001"
    assert (generation.count("image"), generation.count("text")) == (6, 7)
    scores, ids = generation.search("image", vectors["text"][:2], k=3)
    assert scores.shape == ids.shape == (2, 3) and ids.dtype == np.int64
    assert ids[0, 0] == 1 and ids[1, 0] == 2  # each caption finds its own image first
    item = generation.items([1, 999])
    assert item[1] is None and item[0].path == "/img/0.png" and item[0].metadata == {"n": 0}
    assert generation.items([7])[0].image_id == 1
    np.testing.assert_allclose(generation.vectors("image", [3, 1]), vectors["image"][[2, 0]])
    manifest = generation.manifest
    assert manifest["metric"] == "inner_product" and manifest["normalization"] == "l2"
    assert set(manifest["files"]) >= {"images.faiss", "texts.faiss", "items.sqlite"}
    generation.close()


def test_k_larger_than_count_and_empty_modality_never_pad_with_minus_one(tmp_path):
    write_generation(tmp_path, MODEL, [ItemRecord(5, "text", text="only")],
                     {"text": unit(np.ones((1, DIM)))})
    with open_generation(tmp_path) as generation:
        scores, ids = generation.search("text", unit(np.ones((3, DIM))), k=10)
        assert ids.shape == (3, 1) and (ids == 5).all()
        scores, ids = generation.search("image", unit(np.ones((3, DIM))), k=10)
        assert ids.shape == scores.shape == (3, 0)


def test_delete_adds_a_generation_and_hides_the_image_and_its_captions(tmp_path):
    vectors = small_index(tmp_path, images=12)
    update_generation(tmp_path, MODEL, delete_ids=[1], options=StoreOptions(compact_ratio=0.9))
    with open_generation(tmp_path) as generation:
        assert generation.name == "000002" and generation.manifest["parent"] == "000001"
        _, ids = generation.search("image", vectors["text"], k=20)
        assert 1 not in ids and ids.shape == (13, 11) and (ids > 0).all()
        _, ids = generation.search("text", vectors["image"], k=30)
        assert 13 not in ids.ravel()  # the caption of image 1 went with it
        assert generation.items([1, 13]) == [None, None]
        assert generation.manifest["modalities"]["image"]["deleted"] == 1
    with open_generation(tmp_path, name="000001") as previous:  # the last one is kept
        assert previous.count("image") == 12


def test_add_keeps_ids_and_compaction_drops_tombstones(tmp_path):
    small_index(tmp_path, images=4)
    new = unit(np.random.default_rng(5).normal(size=(1, DIM)))
    with open_generation(tmp_path) as generation:
        next_id = generation.next_id
    update_generation(tmp_path, MODEL, add=[ItemRecord(next_id, "image", path="/img/new.png")],
                      add_vectors={"image": new})
    update_generation(tmp_path, MODEL, delete_ids=[2, 3])  # 4 of 14 rows: over 20 %
    with open_generation(tmp_path) as generation:
        assert generation.manifest["build"]["compacted"] is True
        section = generation.manifest["modalities"]["image"]
        assert (section["rows"], section["live"], section["deleted"]) == (3, 3, 0)
        _, ids = generation.search("image", new, k=1)
        assert ids[0, 0] == next_id and generation.items([1])[0].path == "/img/0.png"
    generations = sorted(p.name for p in (tmp_path / "generations").iterdir())
    assert generations == ["000002", "000003"]  # older ones pruned


def test_a_different_model_is_refused_naming_the_field(tmp_path):
    small_index(tmp_path)
    with pytest.raises(IndexMismatchError, match=r"model sha256 abababab.*you loaded cdcd"):
        open_generation(tmp_path, model_sha256="cd" * 32)
    with pytest.raises(IndexMismatchError, match="embed_dim 8, the model gives 512"):
        open_generation(tmp_path, embed_dim=512)


@pytest.mark.parametrize("filename", ["images.faiss", "items.sqlite", "texts.npy"])
def test_a_flipped_byte_is_refused_naming_the_file(tmp_path, filename):
    small_index(tmp_path)
    path = tmp_path / "generations" / "000001" / filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=filename):
        open_generation(tmp_path)


def test_a_changed_value_inside_the_manifest_is_refused(tmp_path):
    small_index(tmp_path)
    path = tmp_path / "generations" / "000001" / "manifest.json"
    path.write_text(path.read_text().replace('"live": 6', '"live": 5', 1))
    with pytest.raises(IndexCorruptError, match="does not match its checksum"):
        open_generation(tmp_path)


def test_counts_that_disagree_with_the_manifest_are_refused(tmp_path):
    small_index(tmp_path)
    path = tmp_path / "generations" / "000001" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["modalities"]["image"]["rows"] = 7  # a writer's mistake, sealed as written
    path.write_text(json.dumps(manifests.sealed(manifest)))
    with pytest.raises(IndexCorruptError, match="images.faiss holds 6 vectors"):
        open_generation(tmp_path)


def test_no_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no CURRENT file"):
        open_generation(tmp_path)


def test_cross_modal_recall_is_reported_in_the_manifest(tmp_path):
    from tests.support.oracles import modality_gap_data

    images, captions = modality_gap_data(600, 120, dim=DIM)
    records = [ItemRecord(i + 1, "image", path=f"/{i}.png") for i in range(600)]
    records += [ItemRecord(1000 + i, "text", text=f"t{i}") for i in range(120)]
    write_generation(tmp_path, MODEL, records, {"image": images, "text": captions},
                     StoreOptions(index_kind="hnsw"))
    with open_generation(tmp_path) as generation:
        tuning = generation.manifest["modalities"]["image"]["tuning"]
        assert tuning["query_source"] == "texts" and tuning["queries"] == 120
        assert 0.9 <= tuning["recall_at_10"] <= 1.0 and tuning["param"] == "efSearch"
        assert generation.manifest["modalities"]["image"]["index"]["params"]["efSearch"] == \
            tuning["value"]
        assert generation.manifest["modalities"]["text"]["tuning"]["query_source"] == "images"
        _, ids = generation.search("image", captions, k=10)
        assert (ids >= 1).all() and (ids <= 600).all()


def test_linked_records_put_images_first_and_link_their_captions():
    images = [NewImage("/a.png", {"site": "x"}), NewImage("/b.png")]
    texts = [NewText("a of a", {"dropped": True}, image=0), NewText("free", {"source": "poem"}),
             NewText("b of b", image=1), NewText("another a", image=0)]
    records = linked_records(images, texts, start_id=1)
    assert [(r.id, r.modality) for r in records] == [
        (1, "image"), (2, "image"), (3, "text"), (4, "text"), (5, "text"), (6, "text")]
    assert records[0].captions == ["a of a", "another a"] and records[0].metadata == {"site": "x"}
    assert [r.image_id for r in records[2:]] == [1, None, 2, 1]
    assert records[2].metadata == {} and records[3].metadata == {"source": "poem"}
    single = image_with_captions("uploads/x.png", ["one", "two"], start_id=0)
    assert [(r.id, r.image_id) for r in single] == [(0, None), (1, 0), (2, 0)]
    assert single[0].captions == ["one", "two"]


def test_appended_captions_keep_their_link_to_a_stored_image(tmp_path):
    """Provisional ids never collide with stored ones: a caption for stored image 1 (an id
    inside 0..n-1 of a naive provisional block) still points at image 1 once appended."""
    small_index(tmp_path, images=3)
    rng = np.random.default_rng(3)
    texts = text_records(["x", "y"], image_id=1)
    appended = append_items(tmp_path, MODEL, texts, {"text": unit(rng.normal(size=(2, DIM)))})
    upload = image_with_captions("uploads/new.png", ["its caption"])
    added = append_items(tmp_path, MODEL, upload, {"image": unit(rng.normal(size=(1, DIM))),
                                                   "text": unit(rng.normal(size=(1, DIM)))})
    with open_generation(tmp_path) as generation:
        assert [r.image_id for r in generation.items(appended.ids)] == [1, 1]
        image, caption = generation.items(added.ids)
        assert caption.image_id == image.id == added.ids[0] >= 8
    assert added.manifest.name == added.generation == current_name(tmp_path)
    assert added.manifest.next_id == added.ids[-1] + 1


def test_the_manifest_reads_without_loading_any_index(tmp_path, monkeypatch):
    import faiss

    small_index(tmp_path)
    monkeypatch.setattr(faiss, "read_index", lambda *args: pytest.fail("loaded an index"))
    info = read_generation_manifest(tmp_path)
    assert (info.name, info.model, info.next_id, info.parent) == ("000001", MODEL, 14, None)
    assert set(info.tuning()) == {"image", "text"} and info.section("image")["live"] == 6


def test_delete_by_path_is_resolved_by_the_store(tmp_path):
    small_index(tmp_path, images=12)
    update_generation(tmp_path, MODEL, delete_paths=["/img/3.png"], delete_ids=[1],
                      options=StoreOptions(compact_ratio=0.9))
    with open_generation(tmp_path) as generation:
        assert generation.items([1, 4, 13, 16]) == [None] * 4  # images 1, 4 and their captions
        assert generation.tombstones("image").tolist() == [1, 4]
    with pytest.raises(UnknownItemError, match="no live image with path /img/nope.png"):
        update_generation(tmp_path, MODEL, delete_paths=["/img/nope.png"])


def test_the_layout_names_every_path_of_format_1(tmp_path):
    small_index(tmp_path)
    assert layout.FORMAT == FORMAT == "clipdex-index/1"
    folder = layout.generation_dir(tmp_path, "000001")
    assert folder == tmp_path / "generations" / "000001"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["images.faiss", "images.npy", "images.ids.npy", "texts.faiss", "texts.npy",
         "texts.ids.npy", "items.sqlite", "manifest.json"])
    assert layout.modality_files(folder, "text").ids == folder / "texts.ids.npy"
    assert {p.name for p in tmp_path.iterdir()} == {"CURRENT", ".lock", "generations"}
    assert (layout.current_file(tmp_path), layout.lock_file(tmp_path)) == (
        tmp_path / "CURRENT", tmp_path / ".lock")
    assert layout.errors_file(tmp_path) == tmp_path / "errors.jsonl"
    assert layout.job_dir(tmp_path, "ab12") == tmp_path / "work" / "ab12"
    assert upload_path(b"x", ".png").startswith("uploads/")
    assert layout.read_current(tmp_path) == "000001" and layout.read_current(folder) is None


def test_job_shards_round_trip_and_stale_add_jobs_are_dropped(tmp_path):
    build_job, add_job = JobFolder(tmp_path, "build"), JobFolder(tmp_path, "add")
    build_job.start(parent=None)
    add_job.start(parent="000001")
    vectors = unit(np.ones((2, DIM)))
    build_job.save("images", 0, [(0, vectors[0]), (2, vectors[1])], [(1, Skipped("/x", "bad"))])
    shard = build_job.load("images", 0)
    assert shard.positions == [0, 2] and shard.problems == [Skipped("/x", "bad")]
    np.testing.assert_array_equal(build_job.vectors("images", 0, len(shard.positions)), vectors)
    with pytest.raises(IndexStoreError, match="does not match"):
        build_job.vectors("images", 0, 3)
    assert build_job.load("images", 1) is None
    drop_stale_add_jobs(tmp_path)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["build"]
    report = write_error_report(tmp_path, [{"path": "/x", "reason": "bad"}])
    assert json.loads(report.read_text()) == {"path": "/x", "reason": "bad"}


def test_parquet_shards_round_trip_in_position_order(tmp_path):
    job = ParquetJobFolder(tmp_path, "ray")
    job.start(parent=None)
    vectors = unit(np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM) + 1)
    job.save("texts", 3, [(7, vectors[1]), (5, vectors[0])], [(6, Skipped("/y", "bad"))],
             metadata=lambda position: {"row": position})
    shard = job.load("texts", 3)
    assert shard.positions == [5, 7] and shard.problems == [Skipped("/y", "bad")]
    np.testing.assert_array_equal(job.vectors("texts", 3, len(shard.positions)), vectors)
    assert sorted(p.name for p in job.path.iterdir()) == ["job.json", "texts-00003.parquet"]
    job.save("texts", 4, [], [(9, Skipped("/z", "gone"))])
    assert job.load("texts", 4).positions == [] and job.vectors("texts", 4, 0).shape == (0, 0)
    assert job.load("texts", 5) is None


def test_fault_points_cost_nothing_unless_clipdex_fault_is_set():
    assert "CLIPDEX_FAULT" not in os.environ
    assert faults.fault_point is faults.hook("")  # the no-op, chosen once at import
    stall = faults.hook("stall:before_current")
    assert stall is not faults.fault_point
    assert stall("mid_generation") is None and stall("after_shard", 0) is None  # elsewhere


INDEX_PATH_NAMES = {"CURRENT", "CURRENT.tmp", ".lock", "generations", "work", "errors.jsonl",
                    "uploads", "manifest.json", "items.sqlite", "job.json"}


def _string_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_only_the_store_names_paths_inside_an_index_directory():
    root = Path(__file__).resolve().parents[3]
    offenders = [(str(path.relative_to(root)), text)
                 for package in ("api", "indexer") for path in (root / package).rglob("*.py")
                 for text in _string_literals(path)
                 if text.split("/")[0] in INDEX_PATH_NAMES or
                 any(f"/{name}" in text for name in INDEX_PATH_NAMES - {"work"})]
    assert offenders == []
