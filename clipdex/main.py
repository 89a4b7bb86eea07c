"""`clipdex COMMAND …`: the parser of every subcommand and the translation of core errors into
a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

# OpenMP threads that finish a parallel region spin for a while before they sleep: right for a
# batch job, wrong for a service, where faiss's spinning threads take the cores the event loop
# and the next request need. Read once, when faiss and torch load their OpenMP runtime, so it
# is set before they are imported. 1M vectors on disk, one query per call over HTTP on 2
# cores: 94 -> 115 queries/s; text queries unchanged (p50 9.2 ms, 185 queries/s at 8 in
# flight). A value the user set is kept.
if sys.argv[1:2] == ["serve"]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from clipdex.commands import index, models, search, serve
from clipdex.options import log
from retrieval.errors import ClipdexError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdex", description="Contrastive image-text retrieval: train and evaluate dual "
                                    "encoders, build indexes, search and serve them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (models, index, search, serve):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "clipdex " + shlex.join(argv)  # recorded in model cards
    try:
        return args.func(args)
    except ClipdexError as error:
        log(f"clipdex {args.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
