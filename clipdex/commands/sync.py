"""`clipdex index sync`: keep an index in step with its folders (indexer/sync.py), with a
report a person reads on stderr and a script reads with --json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipdex.options import log, model_options, tqdm_progress


def add_parser(actions: argparse._SubParsersAction) -> None:
    sync = actions.add_parser(
        "sync", help="make the index match its folders: add new files, re-encode changed "
                     "ones, keep moved ones, remove deleted ones")
    sync.add_argument("sources", nargs="+", type=Path, help="image folders")
    sync.add_argument("--index", type=Path, required=True, help="index directory")
    sync.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                      help="leave out paths matching GLOB (gitignore syntax, relative to the "
                           "folder; repeatable); a .clipdexignore file in the folder adds more")
    sync.add_argument("--include-hidden", action="store_true",
                      help="index hidden files and folders too (names starting with '.')")
    sync.add_argument("--dry-run", action="store_true", help="report, write nothing")
    sync.add_argument("--json", action="store_true", help="print the report as JSON")
    sync.add_argument("--max-memory", default="4GB",
                      help="memory budget of the index it writes (default: %(default)s)")
    model_options(sync)
    sync.set_defaults(func=cmd_sync)


def cmd_sync(args: argparse.Namespace) -> int:
    from indexer.config import BuildConfig
    from indexer.selection import Selection
    from indexer.sync import sync
    from retrieval.models.loading import load_model

    report = sync(args.sources, args.index,
                  lambda: load_model(args.model, args.device, backend=args.backend),
                  BuildConfig(max_memory=args.max_memory),
                  Selection(tuple(args.exclude), args.include_hidden),
                  dry_run=args.dry_run, progress=tqdm_progress)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    counts = ", ".join(f"{name} {getattr(report, name)}" for name in
                       ("added", "changed", "moved", "removed", "unchanged", "excluded"))
    skipped = ", ".join(f"{kind} {n}" for kind, n in sorted(report.skipped.items()))
    outcome = ("dry run: nothing written" if report.dry_run else
               f"generation {report.generation}" if report.generation else
               "nothing to do: no generation written")
    log(f"{outcome}; {counts}" + (f"; skipped: {skipped}" if skipped else ""))
    return 0
