"""A Searcher's pages carry the calibrated relevance of each hit and cut at min_relevance, and
collapse near-duplicates when asked; checked on a real store generation."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import Query, Searcher, open_generation
from retrieval.errors import InvalidQueryError
from retrieval.models.identity import ModelIdentity
from retrieval.search.calibration import Calibration
from retrieval.store import ItemRecord, write_generation
from tests.support.encoders import TableEncoder

DIM = 16
MODEL = ModelIdentity(sha256="ee" * 32, arch="synthetic", embed_dim=DIM)
# A fit like the default model's: relevance grows with the score and with its gap to the best
FIT = Calibration((17.0, 20.0, 0.0), -9.0)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def generation(tmp_path):
    rng = np.random.default_rng(3)
    images = unit(rng.normal(size=(60, DIM)))
    images[1] = unit(images[0] + 0.01 * rng.normal(size=DIM))  # 0, 1 and 2: one scene
    images[2] = unit(images[0] + 0.01 * rng.normal(size=DIM))
    records = [ItemRecord(i, "image", path=f"/p/{i}.jpg") for i in range(len(images))]
    write_generation(tmp_path, MODEL, records, {"image": images})
    with open_generation(tmp_path) as opened:
        yield opened, images


def searcher(generation, calibrations=None) -> Searcher:
    opened, images = generation
    table = {"the scene": unit(images[0] + 0.3 * unit(np.ones(DIM))), "vague": unit(np.ones(DIM))}
    return Searcher(opened, TableEncoder(table, {"text_to_image": FIT}
                                         if calibrations is None else calibrations))


def test_hits_carry_relevance_that_falls_with_the_score(generation):
    hits = searcher(generation).search(Query.text("the scene", k=10)).hits
    relevance = [hit.relevance for hit in hits]
    assert all(value is not None for value in relevance)
    assert relevance == sorted(relevance, reverse=True) and relevance[0] > 0.5
    scores = np.array([hit.score for hit in hits])
    expected = FIT.relevance(scores, scores)  # the query's best 10 are these hits
    assert np.allclose(relevance, expected, atol=1e-4)


def test_min_relevance_cuts_the_list_and_ends_paging(generation):
    whole = searcher(generation).search(Query.text("the scene", k=10))
    kept = [hit for hit in whole.hits if hit.relevance >= 0.5]
    cut = searcher(generation).search(Query.text("the scene", k=10, min_relevance=0.5))
    assert [hit.id for hit in cut.hits] == [hit.id for hit in kept] and cut.next_cursor is None
    assert 0 < len(kept) < 10


def test_relevance_needs_a_calibrated_direction(generation):
    plain = searcher(generation, calibrations={})
    assert all(hit.relevance is None for hit in plain.search(Query.text("vague")).hits)
    with pytest.raises(InvalidQueryError, match="min_relevance needs a model"):
        plain.search(Query.text("vague", min_relevance=0.5))
    vector = Query.vector(np.ones(DIM).tolist())  # not a text query: the fit does not apply
    assert all(hit.relevance is None for hit in searcher(generation).search(vector).hits)


def test_dedup_folds_a_scene_into_its_best_hit(generation):
    plain = searcher(generation).search(Query.text("the scene", k=5)).hits
    assert {0, 1, 2} <= {hit.id for hit in plain}
    folded = searcher(generation).search(Query.text("the scene", k=5, dedup=True)).hits
    best = next(hit for hit in plain if hit.id in {0, 1, 2})
    assert folded[0].id == best.id and set(folded[0].duplicates) == {0, 1, 2} - {best.id}
    assert [hit.id for hit in folded[1:]] == [hit.id for hit in plain if hit.id not in {0, 1, 2}]
