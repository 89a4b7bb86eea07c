"""`clipdex index dedup`: report groups of near-identical items (retrieval.search.dedup) as a short
table, or as JSON for scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from retrieval.models.choices import MODALITIES
from retrieval.search.dedup import DEFAULT_THRESHOLD

TABLE_GROUPS = 20  # the table shows the largest groups; --json has them all


def add_parser(actions: argparse._SubParsersAction) -> None:
    dedup = actions.add_parser("dedup", help="report groups of near-duplicate images (or texts)")
    dedup.add_argument("index", type=Path)
    dedup.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help="cosine at or above which two items are duplicates "
                            "(default: %(default)s)")
    dedup.add_argument("--modality", choices=MODALITIES, default="image")
    dedup.add_argument("--json", action="store_true", help="print every group as JSON")
    dedup.set_defaults(func=cmd_dedup)


def cmd_dedup(args: argparse.Namespace) -> int:
    from retrieval.search.dedup import find_duplicates
    from retrieval.store import open_generation

    with open_generation(args.index) as generation:
        groups = find_duplicates(generation, args.modality, args.threshold)
        names = _names(generation, [item for group in groups for item in group.ids])
        live = generation.count(args.modality)
    report = {"generation": generation.name, "modality": args.modality,
              "threshold": args.threshold, "items": live, "groups": [
                  {"keep": {"id": g.keep, "item": names[g.keep]},
                   "duplicates": [{"id": item, "item": names[item], "cosine": cosine}
                                  for item, cosine in g.others]} for g in groups]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    extra = sum(len(g.others) for g in groups)
    print(f"{len(groups)} groups of near-duplicates (cosine >= {args.threshold}) among {live} "
          f"{args.modality}s: {extra} could go")
    for group in report["groups"][:TABLE_GROUPS]:
        print(f"  keep {group['keep']['id']:>7}  {group['keep']['item']}")
        for twin in group["duplicates"]:
            print(f"       {twin['id']:>7}  {twin['item']}  ({twin['cosine']:.3f})")
    if len(groups) > TABLE_GROUPS:
        print(f"  ... {len(groups) - TABLE_GROUPS} more groups (--json lists them all)")
    return 0


def _names(generation: Any, ids: list[int]) -> dict[int, str]:
    """An item's path (images) or text, as this machine's user knows it."""
    records = generation.items(ids)
    return {item: (record.path or record.text or "") if record else "" for item, record
            in zip(ids, records)}
