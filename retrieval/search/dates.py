"""Date order among the relevant hits: what people ask of a photo search first ("the beach,
newest first"). A flat score cutoff fails there (a vague query's true matches score low), so
the set is the relevant hits, chosen as a ranked search chooses them (the best `candidates`
by score, cut at `min_relevance` on a calibrated model), and only their order changes.
Each hit keeps its score and relevance; hits without the date come last, in score order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retrieval.errors import InvalidQueryError
from retrieval.fields.values import parse_datetime


def check_date_field(name: str, fields: dict[str, str]) -> None:
    """`name` must be one of the index's date fields."""
    if fields.get(name) != "datetime":
        dates = sorted(field for field, kind in fields.items() if kind == "datetime")
        raise InvalidQueryError(f"order_by: {name!r} is not a date field of this index; its "
                                f"date fields: {', '.join(dates) or 'none'}")


def in_date_order(hits: Sequence[Any], field: str, descending: bool = True) -> list[Any]:
    """`hits` (best first) sorted by their item's `field`; ties and undated hits keep their
    rank, so the order is the same on every page."""
    dated, undated = [], []
    for rank, hit in enumerate(hits):
        moment = parse_datetime((hit.item.metadata or {}).get(field))
        if moment is None:
            undated.append(hit)
        else:
            dated.append((-moment if descending else moment, rank, hit))
    return [hit for _, _, hit in sorted(dated, key=lambda row: row[:2])] + undated
