"""The core Searcher without a web server: exact in-memory generation, seeded vectors."""

from __future__ import annotations

import numpy as np
import pytest

from api.errors import core_problem
from clipdex.commands.serve import settings_from
from clipdex.main import build_parser
from retrieval import errors
from retrieval.search.searcher import Searcher, combine, normalise, zero_shot_probabilities
from tests.api.helpers import InMemoryGeneration, ItemRecord


def _generation(count: int = 30, dim: int = 8, ties: bool = False) -> InMemoryGeneration:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    if ties:
        vectors[count // 2:] = vectors[0]  # half the items share one vector: equal scores
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [ItemRecord(i, "image", metadata={"n": i}) for i in range(count)]
    return InMemoryGeneration("g", dim, records, {"image": vectors, "text": vectors[:0]})


@pytest.mark.parametrize("ties", [False, True])
def test_pages_cover_the_exact_ranking_once(ties):
    searcher = Searcher(_generation(ties=ties))
    query = normalise(np.arange(8, dtype=np.float32))
    exact = [hit.id for hit in searcher.nearest("image", query[None], 100)[0]]
    seen, after, served = [], None, 0
    while True:
        page = searcher.page("image", query, 7, after=after, served=served)
        seen += [hit.id for hit in page.hits]
        if page.after is None:
            break
        after, served = page.after, page.served
    assert seen == exact and len(exact) == 30


def test_empty_modality_answers_an_empty_list():
    searcher = Searcher(_generation())
    assert searcher.nearest("text", np.ones((2, 8), np.float32) / np.sqrt(8), 10) == [[], []]


def test_combine_normalises_and_refuses_cancelling_terms():
    a, b = np.eye(4, dtype=np.float32)[:2]
    combined = combine([(0.7, a), (0.3, 2 * b), (-0.5, b)])
    assert np.linalg.norm(combined) == pytest.approx(1)
    assert combined[0] > 0 and combined[1] < 0
    with pytest.raises(errors.InvalidQueryError):
        combine([(1.0, a), (-1.0, a)])


def test_zero_shot_probabilities_are_a_softmax():
    labels = np.eye(3, dtype=np.float32)
    probabilities = zero_shot_probabilities(labels[1], labels, 100.0)
    assert probabilities.sum() == pytest.approx(1) and probabilities.argmax() == 1


def test_core_errors_map_to_statuses_in_one_place():
    assert core_problem(errors.UnknownItemError("x")).status == 404
    assert core_problem(errors.IndexMismatchError("x")).status == 409
    assert core_problem(errors.IndexNotFoundError("x")).status == 503
    assert core_problem(errors.BadImageError("x")).status == 422
    assert core_problem(errors.InvalidQueryError("x")).status == 422


def test_serve_is_a_clipdex_subcommand_bound_to_loopback():
    args = build_parser().parse_args(["serve", "--index", "idx", "--max-batch", "1",
                                      "--read-key", "r1", "--read-key", "r2"])
    settings = settings_from(args)
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.batching.max_batch == 1 and settings.read_secrets() == ["r1", "r2"]
    assert "r1" not in repr(settings)


def test_the_default_batch_fits_the_device():
    def batch(*flags: str) -> int:
        args = build_parser().parse_args(["serve", "--index", "idx", *flags])
        return settings_from(args).batching.max_batch

    assert batch("--device", "cpu") == 8  # CPU: small batches keep latency under load
    assert batch("--device", "cuda") == 32
    assert batch("--device", "cpu", "--max-batch", "16") == 16
    args = build_parser().parse_args(["serve", "--index", "idx", "--device", "cpu"])
    assert settings_from(args).max_in_flight == 32  # refused at the door beyond 4 batches
    args = build_parser().parse_args(["serve", "--index", "idx", "--max-in-flight", "0"])
    assert settings_from(args).max_in_flight is None


def test_a_generation_without_fields_refuses_filters_naming_the_field_and_still_lists():
    from retrieval.search.query import Listing, Query

    searcher = Searcher(_generation())
    with pytest.raises(errors.FilterError, match="unknown field 'n'") as caught:
        searcher.search(Query.vector([1.0] * 8, filter={"field": "n", "eq": 1}))
    problem = core_problem(caught.value)
    assert (problem.status, problem.title) == (422, "Bad filter") and "'n'" in problem.detail
    assert [hit.id for hit in searcher.browse(Listing(k=3)).hits] == [29, 28, 27]
