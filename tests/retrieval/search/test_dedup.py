"""Near-duplicates: groups found exactly and through the index agree with brute force over
planted copies, and `clipdex index dedup` reports them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import InvalidQueryError
from retrieval.models.identity import ModelIdentity
from retrieval.search import dedup
from retrieval.store import ItemRecord, StoreOptions, open_generation, write_generation

DIM = 16
MODEL = ModelIdentity(sha256="dd" * 32, arch="synthetic", embed_dim=DIM)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def planted(count: int, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """`count` random unit vectors, then copies: items 0-2 get 2 near-copies each, item 3 a
    chain (3 -> a -> b). Returns the vectors and the planted groups as row sets."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(count, DIM)))
    rows, groups = [base], []
    for original in range(3):
        copies = unit(base[original] + rng.normal(scale=0.02, size=(2, DIM)))
        start = count + sum(len(r) for r in rows[1:])
        rows.append(copies)
        groups.append({original, start, start + 1})
    start = count + 6
    first = unit(base[3:4] + 0.04 * unit(rng.normal(size=(1, DIM))))
    second = unit(first + 0.04 * unit(rng.normal(size=(1, DIM))))
    rows += [first, second]
    groups.append({3, start, start + 1})
    return np.concatenate(rows), groups


def brute_force_groups(vectors: np.ndarray, threshold: float) -> list[set[int]]:
    scores = vectors @ vectors.T
    pairs = [(i, j) for i, j in zip(*np.nonzero(scores >= threshold)) if i < j]
    found: list[set[int]] = []
    for i, j in pairs:
        joined = [g for g in found if i in g or j in g]
        merged = {int(i), int(j)}.union(*joined)
        found = [g for g in found if g not in joined] + [merged]
    return found


def as_rows(groups: list[dedup.DuplicateGroup], ids: np.ndarray) -> list[set[int]]:
    position = {int(item): row for row, item in enumerate(ids)}
    return [{position[item] for item in group.ids} for group in groups]


def test_exact_groups_are_brute_forces_and_chains_join():
    vectors, planted_groups = planted(500)
    ids = np.arange(100, 100 + len(vectors))
    groups = dedup.groups_from_pairs(ids, vectors, dedup.exact_pairs(vectors, 0.95, block=64))
    found = as_rows(groups, ids)
    assert sorted(map(sorted, found)) == sorted(map(sorted, brute_force_groups(vectors, 0.95)))
    assert all(group in found for group in planted_groups)
    first = next(g for g in groups if g.keep == 100)  # lowest id kept, closest first
    assert len(first.others) == 2 and first.others[0][1] >= first.others[1][1] >= 0.95


def test_groups_through_the_index_match_the_exact_ones(tmp_path, monkeypatch):
    vectors, _ = planted(3000)
    records = [ItemRecord(i + 1, "image", path=f"/p/{i}.jpg") for i in range(len(vectors))]
    write_generation(tmp_path, MODEL, records, {"image": vectors},
                     StoreOptions(index_kind="hnsw"))
    with open_generation(tmp_path) as generation:
        exact = dedup.find_duplicates(generation, threshold=0.95)
        monkeypatch.setattr(dedup, "EXACT_MAX_ITEMS", 10)  # now the index proposes pairs
        through_index = dedup.find_duplicates(generation, threshold=0.95)
    assert through_index == exact and len(exact) >= 4


def test_collapse_keeps_the_best_of_each_group_in_rank_order():
    vectors, _ = planted(20)
    ranked = [20, 0, 5, 21, 1, 22]  # 20, 21 copy 0; 22 copies 1
    kept = dedup.collapse(ranked, vectors[ranked], 0.95)
    assert kept == [(20, [0, 21]), (5, []), (1, [22])]


def test_a_threshold_outside_zero_to_one_is_refused():
    with pytest.raises(InvalidQueryError, match="cosine in"):
        dedup.check_threshold(1.5)


def test_the_command_reports_groups_as_json_and_as_a_table(tmp_path, capsys):
    from clipdex.main import main

    vectors, _ = planted(200)
    records = [ItemRecord(i + 1, "image", path=f"/p/{i}.jpg") for i in range(len(vectors))]
    write_generation(tmp_path, MODEL, records, {"image": vectors})
    assert main(["index", "dedup", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == len(vectors) and len(report["groups"]) == 4
    assert report["groups"][0]["keep"]["item"].startswith("/p/")
    assert main(["index", "dedup", str(tmp_path), "--threshold", "0.9"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("4 groups of near-duplicates") and "keep" in table
