"""Metadata fields and the filter language on a real generation: types inferred into the
manifest and SQLite, every operator's matches compared with a plain-Python reading of the
items' metadata, and every mistake refused with the field and its type named."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import FilterError, InvalidQueryError
from retrieval.fields.filters import parse_filter
from retrieval.fields.values import Inference, parse_datetime
from retrieval.models.identity import ModelIdentity
from retrieval.store import (
    ItemRecord,
    append_items,
    layout,
    open_generation,
    text_records,
    write_generation,
)

DIM = 8
MODEL = ModelIdentity(sha256="cd" * 32, arch="synthetic", embed_dim=DIM)
COUNT = 40
DAY0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def metadata(i: int) -> dict:
    """Every kind of field, some missing on some items, one list-valued, one mixed."""
    data = {"folder": f"{2023 + i % 3}/trip{i % 4}", "ok": i % 3 == 0,
            "tags": ["a"] if i % 2 else ["a", "b"], "mixed": i if i % 2 else "x",
            "nested": {"ignored": True}}
    if i % 5:
        data["n"] = i * 1.5
    if i < 30:
        data["taken"] = (DAY0 + timedelta(days=i)).isoformat(timespec="seconds")
    return data


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fields")
    rng = np.random.default_rng(0)
    records = [ItemRecord(i, "image", path=f"/img/{i}.png", metadata=metadata(i))
               for i in range(COUNT)]
    # a caption of image 3 (matched by its image's fields) and a free text with its own
    records += [ItemRecord(COUNT, "text", text="caption of 3", image_id=3),
                ItemRecord(COUNT + 1, "text", text="free", metadata={"folder": "texts"})]
    write_generation(root, MODEL, records, {"image": unit(rng.normal(size=(COUNT, DIM))),
                                            "text": unit(rng.normal(size=(2, DIM)))})
    return root


@pytest.fixture(scope="module")
def generation(root):
    with open_generation(root) as generation:
        yield generation


def test_types_are_inferred_into_the_manifest_and_sqlite(generation):
    assert generation.fields() == {"folder": "string", "ok": "boolean", "tags": "string",
                                   "mixed": "string", "n": "number", "taken": "datetime"}
    assert generation.manifest["fields"]["n"] == {"type": "number", "items": 32}
    import sqlite3
    db = sqlite3.connect(layout.read_only_uri(generation.items_path), uri=True)
    try:
        rows = dict(db.execute("SELECT name, type FROM fields").fetchall())
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        db.close()
    assert rows == generation.fields()
    assert {"item_fields_str", "item_fields_num"} <= indexes


def test_the_inference_rule():
    def infer(*values):
        inference = Inference()
        for value in values:
            inference.see(value)
        return inference.type

    assert infer(1, 2.5) == "number" and infer(True, False) == "boolean"
    assert infer(True, 1) == "string"  # bool is not a number
    assert infer("2024-06-01", "2024-06-01T12:30:00Z") == "datetime"
    assert infer("2024-06-01", "June") == "string" and infer("20240601") == "string"
    assert parse_datetime("2024-06-01T00:00:00+02:00") == parse_datetime("2024-05-31T22:00")
    assert parse_datetime("2024-13-01") is None


def oracle(where: dict, data: dict) -> bool:
    """The filter language's meaning, read straight off one item's metadata."""
    if "and" in where:
        return all(oracle(part, data) for part in where["and"])
    if "or" in where:
        return any(oracle(part, data) for part in where["or"])
    if "not" in where:
        return not oracle(where["not"], data)
    (op, wanted), = [(k, v) for k, v in where.items() if k != "field"]
    value = data.get(where["field"])
    values = value if isinstance(value, list) else [] if value is None else [value]
    values = [v if not isinstance(v, str) or parse_datetime(v) is None else parse_datetime(v)
              for v in values]
    if isinstance(wanted, str) and parse_datetime(wanted) is not None:
        wanted = parse_datetime(wanted)
    if op == "exists":
        return bool(values) == wanted
    if not values:
        return False
    tests = {"eq": lambda v: v == wanted, "in": lambda v: v in wanted,
             "gt": lambda v: v > wanted, "gte": lambda v: v >= wanted,
             "lt": lambda v: v < wanted, "lte": lambda v: v <= wanted,
             "prefix": lambda v: v.startswith(wanted)}
    if op == "ne":
        return all(v != wanted for v in values)
    if op == "nin":
        return all(v not in wanted for v in values)
    return any(tests[op](v) for v in values)


FILTERS = [
    {"field": "folder", "eq": "2024/trip1"}, {"field": "folder", "ne": "2024/trip1"},
    {"field": "folder", "in": ["2023/trip0", "2025/trip2"]},
    {"field": "folder", "nin": ["2023/trip0", "2025/trip2"]},
    {"field": "folder", "prefix": "2024/"}, {"field": "folder", "gte": "2024/trip2"},
    {"field": "n", "gt": 30}, {"field": "n", "gte": 30}, {"field": "n", "lt": 9},
    {"field": "n", "lte": 9}, {"field": "n", "eq": 4.5}, {"field": "n", "ne": 4.5},
    {"field": "n", "exists": True}, {"field": "n", "exists": False},
    {"field": "ok", "eq": True}, {"field": "ok", "ne": True}, {"field": "ok", "in": [False]},
    {"field": "taken", "gte": "2024-01-20"}, {"field": "taken", "lt": "2024-01-03T12:00"},
    {"field": "taken", "eq": "2024-01-05T00:00:00+00:00"},
    {"field": "tags", "eq": "b"}, {"field": "tags", "ne": "b"}, {"field": "tags", "nin": ["a"]},
    {"and": [{"field": "folder", "prefix": "2024"}, {"field": "taken", "gte": "2024-01-10"}]},
    {"or": [{"field": "ok", "eq": True}, {"not": {"field": "n", "exists": True}}]},
    {"not": {"field": "n", "gt": 20}},
]


@pytest.mark.parametrize("where", FILTERS, ids=lambda f: json.dumps(f))
def test_every_operator_matches_what_the_metadata_says(generation, where):
    found = generation.matching_ids("image", parse_filter(where, generation.fields()))
    expected = [i for i in range(COUNT) if oracle(where, metadata(i))]
    assert found.tolist() == expected
    assert found.dtype == np.int64


def test_texts_are_matched_by_their_image_or_their_own_fields(generation):
    fields = generation.fields()
    assert generation.matching_ids("text", parse_filter({"field": "folder", "eq": "2023/trip3"},
                                                        fields)).tolist() == [COUNT]
    assert generation.matching_ids("text", parse_filter({"field": "folder", "eq": "texts"},
                                                        fields)).tolist() == [COUNT + 1]


@pytest.mark.parametrize("where,field,kind,words", [
    ({"field": "colour", "eq": "red"}, "colour", None, "unknown field 'colour'"),
    ({"field": "n", "eq": "3"}, "n", "number", "field 'n' is number and needs a number"),
    ({"field": "n", "eq": True}, "n", "number", "needs a number"),
    ({"field": "ok", "eq": 1}, "ok", "boolean", "needs true or false"),
    ({"field": "taken", "gte": "last week"}, "taken", "datetime", "ISO-8601"),
    ({"field": "folder", "eq": 3}, "folder", "string", "needs a string"),
    ({"field": "n", "prefix": "1"}, "n", "number", "'prefix' applies to string fields"),
    ({"field": "ok", "gt": False}, "ok", "boolean", "field 'ok' is boolean"),
    ({"field": "n", "in": []}, "n", "number", "list of 1 to 500"),
    ({"field": "n", "in": [1, "x"]}, "n", "number", "filter.in[1]"),
    ({"field": "n", "exists": 1}, "n", "number", "exists takes true or false"),
    ({"field": "n", "eq": 1, "gt": 0}, "n", "number", "exactly one operator"),
    ({"field": "n", "like": 1}, "n", "number", "exactly one operator"),
    ({"and": [{"field": "n", "eq": 1}, {"field": "zz", "eq": 1}]}, "zz", None,
     "filter.and[1]: unknown field 'zz'"),
])
def test_mistakes_name_the_field_and_its_type(generation, where, field, kind, words):
    with pytest.raises(FilterError, match=r".*".join(map(_escape, [words]))) as caught:
        parse_filter(where, generation.fields())
    assert (caught.value.field, caught.value.field_type) == (field, kind)
    assert isinstance(caught.value, InvalidQueryError)


def _escape(text: str) -> str:
    import re
    return re.escape(text)


@pytest.mark.parametrize("where,words", [
    ([], "a filter is a JSON object"), ({"and": []}, "non-empty list"),
    ({"xor": []}, "expected one of and, or, not"), ({"and": [1]}, "filter.and[0]"),
    ({"field": 3, "eq": 1}, "a field name"),
    ({"not": {"not": {"not": {}}}}, "filter.not.not.not"),
    ({"or": [{"field": "n", "eq": 1}] * 65}, "at most 64 conditions"),
])
def test_malformed_filters_are_refused(generation, where, words):
    with pytest.raises(FilterError, match=_escape(words)):
        parse_filter(where, generation.fields())


def test_an_older_generation_without_fields_names_every_field_unknown(tmp_path, root):
    import shutil
    copy = tmp_path / "old"
    shutil.copytree(root, copy)
    folder = layout.generation_dir(copy, layout.current_name(copy))
    manifest = json.loads(layout.manifest_file(folder).read_text())
    del manifest["fields"], manifest["checksum"]  # as generations before either were written
    layout.manifest_file(folder).write_text(json.dumps(manifest))
    with open_generation(copy) as old:
        assert old.fields() == {}
        with pytest.raises(FilterError, match="unknown field 'folder'.*none"):
            parse_filter({"field": "folder", "eq": "x"}, old.fields())


def test_a_derived_generation_re_infers_types(tmp_path):
    rng = np.random.default_rng(1)
    records = [ItemRecord(i, "image", path=f"/i/{i}.png", metadata={"n": i}) for i in range(3)]
    write_generation(tmp_path, MODEL, records, {"image": unit(rng.normal(size=(3, DIM)))})
    added = [ItemRecord(-1, "image", path="/i/x.png", metadata={"n": "many", "new": True})]
    appended = append_items(tmp_path, MODEL, added, {"image": unit(rng.normal(size=(1, DIM)))})
    assert appended.manifest.fields() == {"n": "string", "new": "boolean"}
    texts = text_records(["t"], image_id=appended.ids[0])
    append_items(tmp_path, MODEL, texts, {"text": unit(rng.normal(size=(1, DIM)))})
    with open_generation(tmp_path) as generation:
        where = parse_filter({"field": "n", "eq": "many"}, generation.fields())
        assert generation.matching_ids("text", where).tolist() == [appended.ids[0] + 1]
        assert generation.matching_ids("image", where).tolist() == appended.ids


def _field_tables(path: Path) -> tuple[list, list]:
    import sqlite3
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT id, field, str_value, num_value FROM item_fields "
                          "ORDER BY id, field, str_value, num_value").fetchall()
        kinds = db.execute("SELECT name, type, items FROM fields ORDER BY name").fetchall()
    finally:
        db.close()
    return rows, kinds


def test_a_derived_generation_updates_its_tables_as_a_rebuild_would_write_them(tmp_path):
    import shutil
    import sqlite3

    from retrieval.store import fields, update_generation
    rng = np.random.default_rng(2)
    records = [ItemRecord(i, "image", path=f"/i/{i}.png", metadata={
        "n": i, "tag": ["x", "y"][: 1 + i % 2], "day": f"2024-01-{1 + i:02d}"})
        for i in range(12)]
    write_generation(tmp_path, MODEL, records, {"image": unit(rng.normal(size=(12, DIM)))})
    added = [ItemRecord(-2, "image", path="/i/a.png", metadata={"n": 2.5, "new": True}),
             ItemRecord(-1, "image", path="/i/b.png", metadata={"tag": "z", "n": 7})]
    append_items(tmp_path, MODEL, added, {"image": unit(rng.normal(size=(2, DIM)))})
    append_items(tmp_path, MODEL, [ItemRecord(-1, "image", path="/i/c.png",
                                              metadata={"day": "soon"})],  # retypes "day"
                 {"image": unit(rng.normal(size=(1, DIM)))})
    update_generation(tmp_path, MODEL, delete_ids=[3, 4, 12], compact=False)
    with open_generation(tmp_path) as generation:
        updated = _field_tables(generation.items_path)
        copy = tmp_path / "rebuilt.sqlite"
        shutil.copy(generation.items_path, copy)
        assert generation.fields() == {"day": "string", "n": "number", "tag": "string"}
    db = sqlite3.connect(copy)
    with db:
        fields.build(db)
    db.close()
    assert updated == _field_tables(copy)
    assert ("new", "boolean", 1) not in updated[1]  # its only item (12) was deleted


def test_a_lone_surrogate_in_metadata_is_stored_and_filtered_without_error(tmp_path):
    """JSON allows "\\ud83d" alone (scraped captions hold such halves); SQLite cannot store it."""
    rng = np.random.default_rng(4)
    records = [ItemRecord(1, "image", path="/i/1.png", metadata={"caption": "smile \ud83d"}),
               ItemRecord(2, "image", path="/i/2.png", metadata={"caption": "plain"})]
    write_generation(tmp_path, MODEL, records, {"image": unit(rng.normal(size=(2, DIM)))})
    with open_generation(tmp_path) as generation:
        where = parse_filter({"field": "caption", "eq": "smile \ud83d"}, generation.fields())
        assert generation.matching_ids("image", where).tolist() == [1]
        where = parse_filter({"field": "caption", "prefix": "\ud800"}, generation.fields())
        assert generation.matching_ids("image", where).tolist() == []
