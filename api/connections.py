"""How many connections the server holds: in all and by client address, with a reserve past
either cap for health checks and keyed requests (the protocol in `api.server` applies it)."""

from __future__ import annotations

import resource
from collections import Counter
from dataclasses import dataclass, replace

from api.settings import Settings

FD_RESERVE = 128  # descriptors kept for the process's own files when max_connections is derived


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server holds, and how long it holds a refused one."""

    # None: the file-descriptor limit, less FD_RESERVE and the reserved connections
    max_connections: int | None = None
    max_connections_per_address: int | None = 256  # None: no cap by address
    reserved_connections: int = 32  # past either cap: health checks and keyed requests only
    refused_drain_s: float = 5.0  # a refused request's body is read and dropped this long

    def resolved(self) -> ConnectionLimits:
        """These limits with `max_connections` set: below the descriptor limit, so that the
        process can still open its files (and accept) when every connection is taken."""
        if self.max_connections is not None:
            return self
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        derived = 65536 if soft == resource.RLIM_INFINITY else max(soft - FD_RESERVE, 64)
        return replace(self, max_connections=derived - self.reserved_connections)


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(settings.max_connections,
                            settings.max_connections_per_address or None,
                            settings.reserved_connections, settings.refused_drain_s)


class ConnectionCounts:
    """Open connections of one server, in all and by client address."""

    def __init__(self) -> None:
        self.total = 0  # one event loop: plain counters are race-free
        self.by_address: Counter[str] = Counter()

    def leave(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]


def admit(counts: ConnectionCounts, caps: ConnectionLimits,
          address: str) -> tuple[int | None, int | None]:
    """(refusal, reserve status) of a new connection from `address`: a refusal (503 past the
    total and its reserve, 429 past the address's) turns it away; otherwise it is counted
    in, and a reserve status says it entered past a cap, for one health check or keyed
    request only."""
    total, per_address = caps.max_connections or 0, caps.max_connections_per_address
    from_address = counts.by_address[address] if address else 0
    if counts.total >= total + caps.reserved_connections:
        return 503, None
    if per_address and from_address >= per_address + caps.reserved_connections:
        return 429, None
    reserve = None
    if counts.total >= total:
        reserve = 503
    elif per_address and from_address >= per_address:
        reserve = 429
    counts.total += 1
    counts.by_address[address] += 1
    return None, reserve
