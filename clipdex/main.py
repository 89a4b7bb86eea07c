"""`clipdex COMMAND …`: the parser of every subcommand and the translation of core errors into
a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

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
