"""The store against a plain dict model {id: vector}: adds, deletes, searches and reopens in
any order keep counts equal, ids stable, and never return a deleted or unknown id."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from retrieval.store import ItemRecord, open_generation, update_generation, write_generation
from tests.reliability.helpers import DIM, FLAT, MODEL


def unit(seed: int) -> np.ndarray:
    row = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return row / np.linalg.norm(row)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="clipdex-stateful-"))
        self.model: dict[int, np.ndarray] = {}  # live image id -> (DIM,) vector
        self.deleted: set[int] = set()
        self.generation = None

    @initialize(seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=4))
    def start(self, seeds: list[int]) -> None:
        records = [ItemRecord(i + 1, "image", path=f"/p/{i + 1}.png") for i in range(len(seeds))]
        vectors = np.stack([unit(s) for s in seeds])
        write_generation(self.folder, MODEL, records, {"image": vectors}, FLAT)
        self.model = {r.id: v for r, v in zip(records, vectors)}
        self.reopen()

    def reopen(self) -> None:
        if self.generation is not None:
            self.generation.close()
        self.generation = open_generation(self.folder, MODEL.sha256, MODEL.embed_dim)

    @rule(seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=3))
    def add(self, seeds: list[int]) -> None:
        first = self.generation.next_id
        records = [ItemRecord(first + i, "image", path=f"/p/{first + i}.png")
                   for i in range(len(seeds))]
        vectors = np.stack([unit(s) for s in seeds])
        update_generation(self.folder, MODEL, add=records, add_vectors={"image": vectors},
                          options=FLAT)
        self.model.update({r.id: v for r, v in zip(records, vectors)})
        self.reopen()

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        doomed = data.draw(st.sampled_from(sorted(self.model)))
        update_generation(self.folder, MODEL, delete_ids=[doomed], options=FLAT)
        del self.model[doomed]
        self.deleted.add(doomed)
        self.reopen()

    @rule()
    def reopen_rule(self) -> None:
        self.reopen()

    @rule(seed=st.integers(0, 10_000), k=st.integers(1, 12))
    def search(self, seed: int, k: int) -> None:
        scores, ids = self.generation.search("image", unit(seed)[None, :], k)
        assert ids.shape == (1, min(k, len(self.model)))
        returned = set(ids.ravel().tolist())
        assert returned <= set(self.model), f"{returned - set(self.model)} not live"
        assert not returned & self.deleted
        if self.model:  # Flat is exact: the top hit is the model's best
            best = max(self.model, key=lambda i: float(self.model[i] @ unit(seed)))
            assert np.isclose(scores[0, 0], self.model[best] @ unit(seed), atol=1e-5)

    @invariant()
    def counts_match(self) -> None:
        if self.generation is not None:
            assert self.generation.count("image") == len(self.model)

    @invariant()
    def ids_are_stable(self) -> None:
        if self.generation is None or not self.model:
            return
        ids = sorted(self.model)
        stored = self.generation.vectors("image", ids)  # raises for a lost id
        np.testing.assert_allclose(stored, np.stack([self.model[i] for i in ids]), atol=1e-6)
        assert all(item is not None for item in self.generation.items(ids))
        assert self.generation.items(sorted(self.deleted)) == [None] * len(self.deleted)

    def teardown(self) -> None:
        if self.generation is not None:
            self.generation.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# `make soak` raises the example count through CLIPDEX_SOAK_EXAMPLES.
StoreMachine.TestCase.settings = settings(max_examples=int(os.environ.get(
                                              "CLIPDEX_SOAK_EXAMPLES", "15")),
                                          stateful_step_count=8,
                                          deadline=None, database=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStore = StoreMachine.TestCase
