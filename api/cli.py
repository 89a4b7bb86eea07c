"""`clipdex serve`: registered with the core CLI as a "clipdex.commands" entry point."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from api.batcher import BatcherConfig
from api.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve an index over HTTP (search API + page)")
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index root the indexer wrote")
    parser.add_argument("--model", default="default", help="model spec (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda …")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32, help="1 turns batching off")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=256,
                        help="inputs waiting for the model, at most (default: %(default)s)")
    parser.add_argument("--max-queue-wait-ms", type=float, default=500.0,
                        help="refuse (503) an input whose expected wait for the model is over "
                             "this; 0 turns it off (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="requests inside the service at once, then 503; 0 turns it off "
                             "(default: %(default)s)")
    parser.add_argument("--admin-key", default=os.environ.get("CLIPDEX_ADMIN_KEY"),
                        help="enables the write endpoints (env CLIPDEX_ADMIN_KEY)")
    parser.add_argument("--read-key", action="append", default=None,
                        help="require one of these keys to search; repeatable "
                             "(env CLIPDEX_READ_KEYS, comma-separated)")
    parser.add_argument("--max-body-mb", type=float, default=10.0)
    parser.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                        help="poll the index root for a new current generation")


def settings_from(args: argparse.Namespace) -> Settings:
    read_keys = args.read_key or [k for k in os.environ.get("CLIPDEX_READ_KEYS", "").split(",")
                                  if k]
    return Settings(
        index=args.index, model=args.model, device=args.device, host=args.host, port=args.port,
        batching=BatcherConfig(args.max_batch, args.max_wait_ms, args.queue_size,
                               args.max_queue_wait_ms or None),
        max_in_flight=args.max_in_flight or None,
        admin_key=args.admin_key or None, read_keys=tuple(read_keys),
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), watch_seconds=args.watch)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    settings = settings_from(args)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", access_log=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipdex-serve", description=__doc__)
    add_arguments(parser)
    return cmd_serve(parser.parse_args(argv))
