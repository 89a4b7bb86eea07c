"""`clipdex search`: answer a query from the command line, no server needed (as rclip does):
the same Index the service serves (retrieval.index), with the model called directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from clipdex.options import model_options
from retrieval.models.choices import MODALITIES


def register(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser("search", help="search an index from the command line")
    search.add_argument("text", nargs="?", default=None, help="the text query")
    search.add_argument("--index", type=Path, required=True, help="index directory")
    search.add_argument("--image", type=Path, default=None,
                        help="an image query (with a text too, both count equally)")
    search.add_argument("--target", choices=MODALITIES, default=None,
                        help="search images or texts (default: images for a text query, "
                             "texts for an image query)")
    search.add_argument("-k", type=int, default=10, help="hits (default: %(default)s)")
    search.add_argument("--threshold", type=float, default=None, help="minimum score")
    search.add_argument("--filter", type=_filter_json, default=None, metavar="JSON",
                        help='a metadata filter, e.g. \'{"field": "folder", "prefix": '
                             '"2024/"}\' (operators eq ne in nin gt gte lt lte exists prefix, '
                             "combined by and, or, not); its fields are shown with each hit")
    search.add_argument("--mode", choices=("vector", "keyword", "hybrid"), default="vector",
                        help="vector (embeddings), keyword (BM25 over captions, texts, file "
                             "names, metadata) or hybrid (both, fused); default: %(default)s")
    search.add_argument("--order-by", default=None, metavar="FIELD",
                        help="a date field (taken, modified): the relevant hits newest first")
    search.add_argument("--oldest-first", action="store_true", help="with --order-by")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    model_options(search)
    search.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from retrieval import Query, Term, load_model, open_index
    from retrieval.errors import InvalidQueryError

    terms = ([Term(text=args.text)] if args.text else []) + (
        [Term(image=args.image.read_bytes())] if args.image else [])
    if not terms:
        raise InvalidQueryError("give a text query, --image FILE, or both")
    target = args.target or ("image" if args.text else "text")
    # the model loads only when the index needs one: an index of external embeddings has no
    # model --model could load, and its encoder says so when the query needs encoding
    with open_index(args.index, lambda: load_model(args.model, args.device,
                                                   backend=args.backend)) as index:
        result = index.search(Query(tuple(terms), target=target, k=args.k,
                                    threshold=args.threshold, filter=args.filter,
                                    mode=args.mode, order_by=args.order_by,
                                    descending=not args.oldest_first))
    rows = [_row(rank, hit) for rank, hit in enumerate(result.hits, start=1)]
    if args.json:
        print(json.dumps({"generation": result.generation, "hits": rows}, indent=2))
        return 0
    shown = _filter_fields(args.filter)
    for row in rows:
        fields = "  ".join(f"{name}={json.dumps(row['metadata'].get(name))}" for name in shown)
        print(f"{row['rank']:>3}  {row['score']:.3f}  {row['what']}" +
              (f"  {fields}" if fields else ""))
    return 0


def _filter_json(text: str) -> dict[str, Any]:
    """--filter's JSON object; anything else is a usage error (exit code 2)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('a JSON object, e.g. {"field": "folder", "eq": "x"}')
    return value


def _filter_fields(where: Any) -> list[str]:
    """The field names a filter mentions, in order, once each."""
    if isinstance(where, list):
        return list(dict.fromkeys(name for part in where for name in _filter_fields(part)))
    if not isinstance(where, dict):
        return []
    if "field" in where:
        return [str(where["field"])]
    return _filter_fields(list(where.values()))


def _row(rank: int, hit: Any) -> dict[str, Any]:
    record = hit.item
    what = (record.path if record.modality == "image" else record.text) if record else None
    return {"rank": rank, "id": hit.id, "score": round(hit.score, 4),
            "modality": record.modality if record else None, "what": what,
            "metadata": record.metadata if record else {},
            "vector_rank": hit.vector_rank, "keyword_rank": hit.keyword_rank}
