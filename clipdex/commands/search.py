"""`clipdex search`: answer a query from the command line, no server needed (as rclip does):
the same Searcher the service uses, with the model called directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from clipdex.options import model_options


def register(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser("search", help="search an index from the command line")
    search.add_argument("text", nargs="?", default=None, help="the text query")
    search.add_argument("--index", type=Path, required=True, help="index directory")
    search.add_argument("--image", type=Path, default=None,
                        help="an image query (with a text too, both count equally)")
    search.add_argument("--target", choices=("image", "text"), default=None,
                        help="search images or texts (default: images for a text query, "
                             "texts for an image query)")
    search.add_argument("-k", type=int, default=10, help="hits (default: %(default)s)")
    search.add_argument("--threshold", type=float, default=None, help="minimum score")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    model_options(search)
    search.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from retrieval import ModelEncoder, Query, Searcher, Term, load_model, open_generation
    from retrieval.errors import ExternalModelError, InvalidQueryError
    from retrieval.store import external_note, read_generation_manifest

    terms = ([Term(text=args.text)] if args.text else []) + (
        [Term(image=args.image.read_bytes())] if args.image else [])
    if not terms:
        raise InvalidQueryError("give a text query, --image FILE, or both")
    target = args.target or ("image" if args.text else "text")
    built = read_generation_manifest(args.index).model
    if built.external:  # its vectors came from a model no --model can load: nothing to encode
        raise ExternalModelError(external_note(built))
    clip = load_model(args.model, args.device, backend=args.backend)
    with open_generation(args.index) as generation:
        searcher = Searcher(generation, ModelEncoder(clip))
        result = searcher.search(Query(tuple(terms), target=target, k=args.k,
                                       threshold=args.threshold))
    rows = [_row(rank, hit) for rank, hit in enumerate(result.hits, start=1)]
    if args.json:
        print(json.dumps({"generation": result.generation, "hits": rows}, indent=2))
    else:
        for row in rows:
            print(f"{row['rank']:>3}  {row['score']:.3f}  {row['what']}")
    return 0


def _row(rank: int, hit: Any) -> dict[str, Any]:
    record = hit.item
    what = (record.path if record.modality == "image" else record.text) if record else None
    return {"rank": rank, "id": hit.id, "score": round(hit.score, 4),
            "modality": record.modality if record else None, "what": what,
            "metadata": record.metadata if record else {}}
