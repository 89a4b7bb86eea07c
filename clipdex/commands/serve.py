"""`clipdex serve`: flags into the service's Settings, keys from files or the environment, and
uvicorn with the service's own protocol limits.

A setting comes from its flag, else from the environment (`CLIPDEX_PORT`, ...: Settings reads
it), else from its default: Settings' own, shown in the help from there, or one derived here
from the device. A flag not given is left out of the parsed arguments so that the environment
can be heard.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Any

from pydantic_settings import EnvSettingsSource

from api.settings import Settings
from clipdex.options import log as say
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
# The command line encodes with ONNX Runtime on CPU when it can; the library's default
# (Settings.backend) stays torch, as load_model's does.
SERVE_BACKEND = "auto"
ENV_PREFIX = Settings.model_config["env_prefix"]
BATCHING = "batching."  # the parsed-argument names of the batcher's flags start so
KEY_FIELDS = frozenset({"admin_key", "read_keys"})  # set from key files and flags by _keys
MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, default=argparse.SUPPRESS,
                        help="index root the indexer wrote (required: this flag or env "
                             f"{_env_name('index')})")
    model_options(parser, model_default=_default("model"), device_default=_default("device"),
                  backend_default=SERVE_BACKEND, env_prefix=ENV_PREFIX)
    _setting(parser, "--host", "host", "bind address")
    _setting(parser, "--port", "port", "", type=int)
    _setting(parser, "--max-batch", "batching.max_batch", "inputs per model call; 1 turns "
             "batching off", f"{GPU_MAX_BATCH} on a GPU, {CPU_MAX_BATCH} on CPU", type=int)
    _setting(parser, "--max-wait-ms", "batching.max_wait_ms", "how long a lone input waits "
             "for company; 0: none, batches form from what queues while the model is busy",
             type=float)
    _setting(parser, "--queue-size", "batching.queue_size", "inputs waiting for the model, at "
             "most", type=int)
    _setting(parser, "--max-queue-wait-ms", "batching.max_queue_wait_ms", "refuse (503) an "
             "input whose expected wait for the model is over this; 0 turns it off", type=float)
    _setting(parser, "--max-in-flight", "max_in_flight", "requests inside the service at "
             "once, then 503 before any work; 0 turns it off",
             f"{IN_FLIGHT_PER_BATCH} x --max-batch", type=int)
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
    _setting(parser, "--public-url", "public_url", "base of the links in responses, e.g. "
             "https://search.example; the request's Host is never used", "relative links")
    _setting(parser, "--max-body-mb", "max_body_bytes", "largest upload, in MiB (in bytes in "
             "the environment)", f"{_default('max_body_bytes') / MIB:g}", type=_mib)
    _setting(parser, "--max-connections", "max_connections", "connections held at once",
             "the file-descriptor limit less 160", type=int)
    _setting(parser, "--max-connections-per-address", "max_connections_per_address",
             "connections from one client address; 0 turns it off, as behind a reverse proxy",
             type=int)
    _setting(parser, "--watch", "watch_seconds", "poll the index root this often for a new "
             "current generation; 0: never", type=float, metavar="SECONDS")


def _mib(text: str) -> int:
    return int(float(text) * MIB)


def _setting(parser: argparse.ArgumentParser, flag: str, name: str, text: str,
             shown: str | None = None, **options: Any) -> None:
    """A flag for setting `name` ("batching.x" for the batcher's), absent from the parsed
    arguments unless given; its help names the default (Settings', unless `shown`) and the
    environment variable."""
    shown = f"{_default(name)}" if shown is None else shown
    where = f"default: {shown}, or env {_env_name(name)}"
    help_text = f"{text} ({where})" if text else f"({where})"
    options.setdefault("metavar", flag.removeprefix("--").replace("-", "_").upper())
    parser.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                        help=help_text.replace("%", "%%"), **options)


def _default(name: str) -> Any:
    """Settings' default for `name`: the one place the defaults are written."""
    if name.startswith(BATCHING):
        return getattr(BatcherConfig(), name.removeprefix(BATCHING))
    return Settings.model_fields[name].get_default(call_default_factory=True)


def _env_name(name: str) -> str:
    """The environment variable Settings reads `name` from (CLIPDEX_BATCHING__MAX_BATCH)."""
    nested = Settings.model_config["env_nested_delimiter"]
    return (ENV_PREFIX + name.replace(".", nested)).upper()


def default_max_batch(device: str) -> int:
    """A GPU encodes 32 short texts in about the time of one, so big batches are free there.
    On CPU the cost per text barely falls past ~8 while a batch's time grows with its size,
    and under load every request waits for the batch ahead of it: 32 at ~250 ms a batch
    put the admitted p99 over a second in the overload soak, 8 kept it near 370 ms."""
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH


def settings_from(args: argparse.Namespace) -> Settings:
    """The service's Settings: the flags given, then the environment (which Settings reads;
    keys too, where no flag or key file gives them), then the defaults."""
    given, keys = _given(args), _keys(args)
    settings = Settings(**given, **keys)
    if settings.index is None:
        raise SystemExit(f"clipdex serve: which index? give --index DIR or set "
                         f"{_env_name('index')}")
    derived = _derived(settings, given)
    if not derived:
        return settings
    merged = {**given, **derived}
    if "batching" in given and "batching" in derived:
        merged["batching"] = {**given["batching"], **derived["batching"]}
    return Settings(**merged, **keys)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (those not given are absent from `args`); the batcher's
    as a `batching` dict, which Settings merges with the environment's."""
    given: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name.startswith(BATCHING):
            given.setdefault("batching", {})[name.removeprefix(BATCHING)] = value
        elif name in Settings.model_fields and name not in KEY_FIELDS:
            given[name] = value
    return given


def _derived(settings: Settings, given: dict[str, Any]) -> dict[str, Any]:
    """The command line's own defaults, for what neither a flag nor the environment set: the
    backend, the batch size for the device, the requests in flight for the batch size."""
    chosen = settings.model_fields_set  # given or read from the environment
    environment = EnvSettingsSource(Settings)().get("batching")
    batching_chosen = {*given.get("batching", {}),
                       *(environment if isinstance(environment, dict) else {})}
    derived: dict[str, Any] = {}
    if "backend" not in chosen:
        derived["backend"] = SERVE_BACKEND
    max_batch = settings.batching.max_batch
    if "max_batch" not in batching_chosen:
        max_batch = default_max_batch(settings.device)
        derived["batching"] = {"max_batch": max_batch}
    if "max_in_flight" not in chosen:
        derived["max_in_flight"] = IN_FLIGHT_PER_BATCH * max_batch
    return derived


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
    batching = settings.batching
    say(f"clipdex serve: {settings.host}:{settings.port}, batches of up to "
        f"{batching.max_batch} inputs, {batching.queue_size} queued at most, "
        f"{settings.max_in_flight or 'no cap on'} requests in flight")
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)
    config = server_config(create_app(settings), settings.host, settings.port,
                           connections=connection_limits(settings), log_level="info",
                           access_log=False)
    uvicorn.Server(config).run()
    return 0
