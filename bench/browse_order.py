"""Browsing by a field (`Searcher.browse` with `order_by`) on a generation of COUNT images
written by the store's writer: milliseconds per page of 10 at the top, at offset 9,990 (the
deepest a cursor reaches), on a list-valued string field, on caption texts (filtered by their
image's fields) and under a filter; and the latency of a filtered 5-nearest vector search
while one thread browses in a loop (each thread reads through its own connection).

    python -m bench.browse_order [--count 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script or from run_all

from retrieval.models.identity import ModelIdentity
from retrieval.search.query import Listing, Query
from retrieval.search.searcher import Searcher
from retrieval.store import ItemRecord, StoreOptions, open_generation, write_generation

DIM = 8
MODEL = ModelIdentity(sha256="a1" * 32, arch="synthetic", embed_dim=DIM)
PAGES: dict[str, dict[str, Any]] = {  # what each figure lists
    "number_top": {"order_by": "stars"},
    "number_deep": {"order_by": "stars", "offset": 9_990},
    "list_string_top": {"order_by": "tags", "descending": False},
    "texts_top": {"order_by": "stars", "target": "text"},
    "filtered_top": {"order_by": "stars", "filter": {"field": "tags", "eq": "w3"}},
}


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def build(root: Path, count: int) -> float:
    """Seconds the writer takes for `count` images (a number and a list-valued string field,
    few distinct values, so ties abound) and a caption for every tenth."""
    rng = np.random.default_rng(0)
    records = [ItemRecord(i, "image", metadata={
        "stars": int(rng.integers(0, 1000)),
        "tags": [f"w{int(n)}" for n in rng.integers(0, 50, 1 + i % 3)]}) for i in range(count)]
    records += [ItemRecord(count + n, "text", text=f"caption {n}", image_id=10 * n)
                for n in range(count // 10)]
    started = time.perf_counter()
    write_generation(root, MODEL, records, {
        "image": _unit(rng.normal(size=(count, DIM))),
        "text": _unit(rng.normal(size=(count // 10, DIM)))}, StoreOptions(index_kind="flat"))
    return time.perf_counter() - started


def page_ms(searcher: Searcher, repeat: int, order_by: str, offset: int = 0,
            **listing: Any) -> float:
    """The median milliseconds of one page of 10 (`offset` as a generation's listing takes
    it: a cursor only carries it)."""
    generation = searcher.generation
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        where = searcher.parsed_filter(listing.get("filter"))
        order = (order_by, generation.fields()[order_by])
        generation.listing(listing.get("target", "image"), where, order,
                           listing.get("descending", True), offset, 10)
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.median(times)), 2)


def search_while_browsing(searcher: Searcher, repeat: int) -> dict[str, float]:
    """Median milliseconds of a filtered 5-nearest search, alone and while another thread
    browses by a field without pause."""
    vector = _unit(np.ones((1, DIM)))[0].tolist()
    query = Query.vector(vector, k=5, filter={"field": "tags", "eq": "w7"})

    def timed() -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            searcher.search(query)
            times.append((time.perf_counter() - started) * 1000)
        return round(float(np.median(times)), 2)

    alone = timed()
    stop = threading.Event()

    def browse() -> None:
        while not stop.is_set():
            searcher.browse(Listing(order_by="tags", k=10))

    browser = threading.Thread(target=browse)
    browser.start()
    try:
        busy = timed()
    finally:
        stop.set()
        browser.join()
    return {"search_alone_ms": alone, "search_while_browsing_ms": busy}


def measure(count: int, repeat: int, folder: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"count": count, "write_s": round(build(folder, count), 1)}
    with open_generation(folder) as generation:
        searcher = Searcher(generation)
        for name, page in PAGES.items():
            result[f"{name}_ms"] = page_ms(searcher, repeat, **page)
        result.update(search_while_browsing(searcher, repeat))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(args.count, args.repeat, Path(folder))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
