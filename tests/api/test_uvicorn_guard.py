"""What `api.server`'s protocol relies on in uvicorn's private httptools module, pinned: a
uvicorn upgrade that renames, removes or re-signs any of it fails here by name, before the
protocol tests fail in ways that hide why. When it fails, re-read
uvicorn/protocols/http/httptools_impl.py against the lists below and `api.server`, run
tests/api/test_protocol.py and tests/api/test_hostile.py, then update the lists and
`api.server.UVICORN_CHECKED`."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from api.server import UVICORN_CHECKED, GuardedHttpToolsProtocol

RECHECK = ("re-read uvicorn/protocols/http/httptools_impl.py against api/server.py, run "
           "tests/api/test_protocol.py and tests/api/test_hostile.py, then update "
           "tests/api/test_uvicorn_guard.py and api.server.UVICORN_CHECKED")

# HttpToolsProtocol's methods the guard overrides: name -> parameters after self.
HOOKS = {
    "connection_made": ["transport"],
    "connection_lost": ["exc"],
    "data_received": ["data"],
    "on_message_begin": [],
    "on_url": ["url"],
    "on_headers_complete": [],
    "_start_asgi_task": ["cycle", "app"],
    "on_body": ["body"],
    "on_message_complete": [],
    "on_response_complete": [],
    "send_400_response": ["msg"],
}
# The protocol's own state the guard reads (set by __init__).
PROTOCOL_STATE = ("config", "loop", "parser", "pipeline", "cycle", "headers", "transport",
                  "flow", "client")
# What the guard reads or replaces on a request's cycle.
CYCLE_STATE = ("more_body", "response_started", "response_complete", "disconnected",
               "message_event", "keep_alive", "send_500_response", "send")


async def _app(scope, receive, send) -> None:  # never called: the protocol needs an app
    raise AssertionError("not served")


def test_uvicorn_is_a_version_the_guard_was_checked_against():
    assert uvicorn.__version__ in UVICORN_CHECKED, (
        f"uvicorn {uvicorn.__version__} is not one api.server's GuardedHttpToolsProtocol was "
        f"checked against ({', '.join(UVICORN_CHECKED)}): {RECHECK}")


def test_the_hooks_the_guard_overrides_exist_with_their_signatures():
    for name, parameters in HOOKS.items():
        hook = getattr(HttpToolsProtocol, name, None)
        assert callable(hook), f"HttpToolsProtocol.{name} is gone: {RECHECK}"
        found = list(inspect.signature(hook).parameters)[1:]
        assert found == parameters, (f"HttpToolsProtocol.{name} now takes {found}, not the "
                                     f"pinned {parameters}: {RECHECK}")


def test_every_override_is_pinned():
    overridden = {name for name in vars(GuardedHttpToolsProtocol)
                  if name in vars(HttpToolsProtocol) and not name.startswith("__")}
    assert overridden == set(HOOKS), (
        f"the guard overrides {sorted(overridden ^ set(HOOKS))} beyond (or short of) the "
        "pinned hooks: add them to HOOKS once checked against uvicorn")


def test_the_state_the_guard_reads_is_there():
    loop = asyncio.new_event_loop()
    try:
        protocol = HttpToolsProtocol(Config(_app), ServerState(), {}, _loop=loop)
        missing = [name for name in PROTOCOL_STATE if not hasattr(protocol, name)]
        assert not missing, f"HttpToolsProtocol lost {missing}: {RECHECK}"
        nothing: Any = None  # the cycle only stores these
        cycle = RequestResponseCycle(
            scope=nothing, transport=nothing, flow=nothing, logger=nothing,
            access_logger=nothing, access_log=False, default_headers=[],
            message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
            on_response=lambda: None)
        missing = [name for name in CYCLE_STATE if not hasattr(cycle, name)]
        assert not missing, f"RequestResponseCycle lost {missing}: {RECHECK}"
        assert inspect.iscoroutinefunction(cycle.send_500_response), RECHECK
    finally:
        loop.close()
