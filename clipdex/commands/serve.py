"""`clipdex serve`: flags into the service's Settings, keys from files or the environment, and
uvicorn with the service's own protocol limits."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from api.settings import Settings
from clipdex.options import model_options
from retrieval.search.batcher import BatcherConfig

log = logging.getLogger("api")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve an index over HTTP (search API + page)")
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)


GPU_MAX_BATCH, CPU_MAX_BATCH = 32, 8
# Requests admitted beyond a few batches' worth only queue; refusing them at the door costs
# far less CPU than routing them first (overload soak, default model on 2 CPU cores: the
# admitted rate stayed at capacity with 4 x 8 in flight, and fell 30 % with 256).
IN_FLIGHT_PER_BATCH = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index root the indexer wrote")
    model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="inputs per model call; 1 turns batching off (default: "
                             f"{GPU_MAX_BATCH} on a GPU, {CPU_MAX_BATCH} on CPU)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="how long a lone input waits for company; 0 (default): none, "
                             "batches form from what queues while the model is busy")
    parser.add_argument("--queue-size", type=int, default=256,
                        help="inputs waiting for the model, at most (default: %(default)s)")
    parser.add_argument("--max-queue-wait-ms", type=float, default=500.0,
                        help="refuse (503) an input whose expected wait for the model is over "
                             "this; 0 turns it off (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="requests inside the service at once, then 503 before any work; "
                             "0 turns it off (default: 4 x --max-batch)")
    parser.add_argument("--admin-key-file", type=Path, default=None,
                        help="file holding the key that enables the write endpoints (or env "
                             "CLIPDEX_ADMIN_KEY)")
    parser.add_argument("--read-keys-file", type=Path, default=None,
                        help="file of keys, one a line, one of which searching needs (or env "
                             "CLIPDEX_READ_KEYS, comma-separated)")
    parser.add_argument("--admin-key", default=None,
                        help="the admin key itself; visible to anyone who can list processes "
                             "(ps): prefer --admin-key-file or CLIPDEX_ADMIN_KEY")
    parser.add_argument("--read-key", action="append", default=None,
                        help="a read key itself, repeatable; visible in ps like --admin-key")
    parser.add_argument("--public-url", default="",
                        help="base of the links in responses, e.g. https://search.example "
                             "(default: relative links; the request's Host is never used)")
    parser.add_argument("--max-body-mb", type=float, default=10.0)
    parser.add_argument("--max-connections", type=int, default=None,
                        help="connections held at once (default: the file-descriptor limit "
                             "less 160, or env CLIPDEX_MAX_CONNECTIONS)")
    parser.add_argument("--max-connections-per-address", type=int, default=None,
                        help="connections from one client address; 0 turns it off, as behind "
                             "a reverse proxy (default: 256, or env "
                             "CLIPDEX_MAX_CONNECTIONS_PER_ADDRESS)")
    parser.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                        help="poll the index root for a new current generation")


def default_max_batch(device: str) -> int:
    """A GPU encodes 32 short texts in about the time of one, so big batches are free there.
    On CPU the cost per text barely falls past ~8 while a batch's time grows with its size,
    and under load every request waits for the batch ahead of it: 32 at ~250 ms a batch
    put the admitted p99 over a second in the overload soak, 8 kept it near 370 ms."""
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH


def settings_from(args: argparse.Namespace) -> Settings:
    """The service's Settings from the flags; keys not given by a flag or a key file come
    from the environment (CLIPDEX_ADMIN_KEY, CLIPDEX_READ_KEYS), which Settings reads."""
    max_batch = args.max_batch or default_max_batch(args.device)
    return Settings(
        index=args.index, model=args.model, device=args.device, backend=args.backend,
        host=args.host, port=args.port,
        batching=BatcherConfig(max_batch, args.max_wait_ms, args.queue_size,
                               args.max_queue_wait_ms or None),
        max_in_flight=(IN_FLIGHT_PER_BATCH * max_batch if args.max_in_flight is None
                       else args.max_in_flight or None),
        public_url=args.public_url, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        watch_seconds=args.watch, **_connections(args), **_keys(args))


def _connections(args: argparse.Namespace) -> dict[str, object]:
    """The connection caps given as flags; the others are left to the environment."""
    caps = {"max_connections": args.max_connections,
            "max_connections_per_address": args.max_connections_per_address}
    return {name: value for name, value in caps.items() if value is not None}


def _keys(args: argparse.Namespace) -> dict[str, object]:
    """Keys given on the command line or in key files (where `ps` does not show them); the
    ones not given here are left to the environment."""
    keys: dict[str, object] = {}
    if args.admin_key_file is not None:
        keys["admin_key"] = _read_keys(args.admin_key_file)[0]
    elif args.admin_key:
        keys["admin_key"] = args.admin_key
    read = list(args.read_key or [])
    if args.read_keys_file is not None:
        read += _read_keys(args.read_keys_file)
    if read:
        keys["read_keys"] = tuple(read)
    return keys


def _read_keys(path: Path) -> list[str]:
    try:
        keys = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise SystemExit(f"clipdex serve: cannot read the key file {path}: {error.strerror}")
    if not keys:
        raise SystemExit(f"clipdex serve: the key file {path} holds no key")
    return keys


def exposure_warnings(settings: Settings) -> list[str]:
    """What a start-up on a reachable address should say out loud."""
    warnings = []
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback and not settings.read_keys:
        warnings.append(f"listening on {settings.host} without read keys: anyone who can reach "
                        "this address can search the index and fetch its images; set "
                        "CLIPDEX_READ_KEYS or --read-keys-file")
    return warnings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.connections import connection_limits
    from api.server import server_config

    settings = settings_from(args)
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)
    config = server_config(create_app(settings), settings.host, settings.port,
                           connections=connection_limits(settings), log_level="info",
                           access_log=False)
    uvicorn.Server(config).run()
    return 0
