"""Hostile clients against a real `clipdex serve` process, as an attacker on the network would
try it (on loopback): stalled and trickling bodies, uploads that decode to gigabytes, floods of
huge headers, uploads refused while busy, and a catalogue of malformed requests.

Each scenario returns its figures and named checks; `make soak` runs them at full size and
writes them to docs/RELIABILITY.md, `tests/reliability/test_hostile_soak.py` runs them small.
Every loop is bounded in connections and in time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.reliability.image_zoo import apng_frames_bomb, progressive_jpeg, webp_canvas_bomb
from tests.reliability.overload import (
    ServeOptions,
    build_index,
    cpu_seconds,
    free_port,
    memory_kib,
    sample_memory,
    start_service,
)
from tests.support.process import stop, wait_ready

READ, ADMIN = "hostile-read-key", "hostile-admin-key"
# What no response may contain: an absolute path under the places the service lives, or a
# memory address from a repr.
LEAKS = re.compile(rb"(/tmp/|/work/|/home/|/root/|/usr/| at 0x[0-9a-f]+)")


@dataclass(frozen=True)
class HostileConfig:
    stalled: int = 64  # 2x the default in-flight cap of 32 (4 x batches of 8)
    slow_clients: int = 32
    slow_seconds: float = 30.0  # each sends 240 bytes over this long
    bombs: int = 8  # concurrent 16-bit 6300x6300 PNG uploads (~80 KB each)
    bomb_side: int = 6300
    header_floods: int = 4
    header_mib: int = 64
    busy_uploads: int = 100
    # scan bombs (issue 32): clients resending a 2000x2000 progressive JPEG of `bomb_scans`
    # scans for `flood_seconds` while a keyed client searches by text
    bomb_clients: int = 40
    bomb_scans: int = 2000
    flood_seconds: float = 60.0
    # memory that stays: concurrent uploads of a 5 MP photograph and 10 MB JSON bodies,
    # then the service idles; its RSS must come back near where it started
    memory_uploads: int = 64
    memory_bodies: int = 32
    settle_seconds: float = 5.0  # idle time for the heap keeper (a look every 2 s) to trim
    # what the service's decode limits allow at once (concurrent decodes x bytes each), plus
    # room for the preprocessed tensors and the allocator's slack
    decode_allowance_mib: float = field(default_factory=lambda: _decode_budget_mib() + 192)


def _decode_budget_mib() -> float:
    from api.settings import Settings

    defaults = Settings()
    return defaults.max_concurrent_decodes * defaults.max_decode_bytes / 2**20


# ----------------------------------------------------------------------- a raw HTTP client


async def exchange(port: int, request: bytes, timeout: float = 30.0,
                   pace: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None
                   ) -> tuple[int, bytes, float]:
    """Send `request` (then let `pace` send more), read one response: (status, raw, seconds).
    Status 0: the connection was reset or closed without an answer."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        sending = asyncio.ensure_future(pace(writer)) if pace else None
        raw = await asyncio.wait_for(_read_one(reader), timeout)
        if sending is not None:
            sending.cancel()
        status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
        return status, raw, time.monotonic() - started
    except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return 0, b"", time.monotonic() - started
    finally:
        writer.close()


async def _read_one(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def request(method: str, path: str, body: bytes = b"", key: str | None = READ,
            content_type: str | None = "application/json", extra: str = "",
            length: int | None = None) -> bytes:
    headers = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if key:
        headers += f"Authorization: Bearer {key}\r\n"
    if content_type:
        headers += f"Content-Type: {content_type}\r\n"
    headers += f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n"
    return headers.encode() + body


def multipart(fields: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "clipdexhostileboundary"
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename
                                                      else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                     + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def upload(path: str, image: bytes, key: str | None = READ) -> bytes:
    body, content_type = multipart([("image", image, "upload.png")])
    return request("POST", path, body, key, content_type)


async def legit_loop(port: int, seconds: float) -> dict[str, Any]:
    """A well-behaved client with a key, one request after another: statuses and latencies."""
    statuses: list[int] = []
    latencies: list[float] = []
    search = request("POST", "/search/text", json.dumps({"text": "a red square", "k": 3}).encode())
    admin = request("POST", "/admin/reload", key=ADMIN)
    deadline = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < deadline:
        status, _, took = await exchange(port, admin if turn % 5 == 4 else search, 10.0)
        statuses.append(status)
        latencies.append(took)
        turn += 1
    ready, _, _ = await exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    return {"requests": len(statuses), "non_200": sum(s != 200 for s in statuses),
            "p50_ms": _ms(np.percentile(latencies, 50)), "p99_ms": _ms(np.percentile(latencies,
                                                                                   99)),
            "readyz": ready}


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 1)


# --------------------------------------------------------------------------- the scenarios


async def stalled_bodies(port: int, config: HostileConfig) -> dict[str, Any]:
    """Half the stalls without a key (answered 401 before their body), half with one (they
    wait for their body and get 408 after the idle timeout); nobody else notices."""
    never = asyncio.Event()

    async def stall(_: asyncio.StreamWriter) -> None:
        await never.wait()

    def one(key: str | None) -> Awaitable[tuple[int, bytes, float]]:
        return exchange(port, request("POST", "/search/text", b"{", key, length=100), 30.0,
                        stall)

    stalls = [asyncio.ensure_future(one(None if n % 2 else READ))
              for n in range(config.stalled)]
    await asyncio.sleep(0.5)
    legit = await legit_loop(port, 8.0)
    answers = await asyncio.gather(*stalls)
    keyless = [a for n, a in enumerate(answers) if n % 2]
    keyed = [a for n, a in enumerate(answers) if not n % 2]
    figures = {"stalled": config.stalled, "legit": legit,
               "keyless": {"statuses": sorted({a[0] for a in keyless}),
                           "max_ms": _ms(max(a[2] for a in keyless))},
               "keyed": {"statuses": sorted({a[0] for a in keyed}),
                         "max_ms": _ms(max(a[2] for a in keyed))}}
    checks = {"every legit request answered 200": legit["non_200"] == 0,
              "legit p99 under 1 s": legit["p99_ms"] < 1000, "ready": legit["readyz"] == 200,
              "keyless stalls get 401 at once": figures["keyless"]["statuses"] == [401]
              and figures["keyless"]["max_ms"] < 1000,
              "keyed stalls get 408": figures["keyed"]["statuses"] == [408]}
    return {"figures": figures, "checks": checks}


async def slow_bodies(port: int, config: HostileConfig) -> dict[str, Any]:
    body = json.dumps({"text": "slow", "k": 1}).encode().ljust(240)
    step = config.slow_seconds / len(body)

    def trickle(data: bytes) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
        async def pace(writer: asyncio.StreamWriter) -> None:
            for byte in data:
                await asyncio.sleep(step)
                writer.write(bytes([byte]))
        return pace

    slow = [asyncio.ensure_future(exchange(
        port, request("POST", "/search/text", length=len(body)), config.slow_seconds + 30,
        trickle(body))) for _ in range(config.slow_clients)]
    legit = await legit_loop(port, min(config.slow_seconds, 10.0))
    answers = await asyncio.gather(*slow)
    figures = {"clients": config.slow_clients, "seconds": config.slow_seconds, "legit": legit,
               "slow_statuses": sorted({a[0] for a in answers})}
    checks = {"every legit request answered 200": legit["non_200"] == 0,
              "legit p99 under 1 s": legit["p99_ms"] < 1000,
              "slow bodies end with an answer": 0 not in figures["slow_statuses"]}
    return {"figures": figures, "checks": checks}


def sixteen_bit_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 40000, np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


async def decode_bombs(port: int, pid: int, config: HostileConfig) -> dict[str, Any]:
    data = sixteen_bit_png(config.bomb_side)
    before = memory_kib(pid)["VmRSS"]
    peak: dict[str, int] = {}
    sampler = asyncio.ensure_future(sample_memory(pid, peak, 0.02))
    answers = await asyncio.gather(*(exchange(port, upload("/search/image", data), 120.0)
                                     for _ in range(config.bombs)))
    sampler.cancel()
    await asyncio.sleep(3.0)
    after = memory_kib(pid)["VmRSS"]
    growth = (max(peak.get("rss", before), after) - before) / 1024
    figures = {"uploads": config.bombs, "upload_kb": round(len(data) / 1024, 1),
               "image": f"{config.bomb_side}x{config.bomb_side} 16-bit grey",
               "statuses": sorted({a[0] for a in answers}),
               "rss_before_mib": round(before / 1024), "rss_peak_growth_mib": round(growth),
               "rss_after_growth_mib": round((after - before) / 1024),
               "seconds": round(max(a[2] for a in answers), 1)}
    checks = {"no 5xx": all(a[0] < 500 for a in answers),
              "RSS growth under the decode allowance": growth <= config.decode_allowance_mib,
              "memory handed back (< 128 MiB kept)": (after - before) / 1024 < 128}
    return {"figures": figures, "checks": checks}


async def flood(port: int, pid: int, payload: bytes, clients: int,
                seconds: float) -> dict[str, Any]:
    """`clients` resending `payload` as fast as they are answered while a keyed client
    searches by text: the flood's statuses, the service's CPU per request, the text loop."""
    stop, statuses = asyncio.Event(), []

    async def attacker() -> None:
        while not stop.is_set():
            status, _, _ = await exchange(port, payload, 60.0)
            statuses.append(status)

    cpu = cpu_seconds(pid)
    attackers = [asyncio.ensure_future(attacker()) for _ in range(clients)]
    legit = await legit_loop(port, seconds)
    stop.set()
    await asyncio.gather(*attackers)
    return {"sent": len(statuses), "statuses": sorted(set(statuses)), "legit": legit,
            "cpu_ms_each": round(1000 * (cpu_seconds(pid) - cpu) / max(len(statuses), 1), 2)}


async def scan_bomb_flood(port: int, pid: int, config: HostileConfig) -> dict[str, Any]:
    """Clients resend a JPEG of thousands of scans (~10 s of decode each over 2000x2000):
    each must be refused from its markers, so that the flood costs text searches no more
    than a flood of as many uploads of the same size that are not images (refused 422 by the
    same path), and the service is idle once it stops (not decoding a backlog).

    The comparison, not a fixed bound, is the check: forty closed-loop clients on 2 cores
    saturate any HTTP stack whatever they send, and what a flood of cheap requests does to
    a query's latency is the reverse proxy's to bound (rate limits per client)."""
    data = progressive_jpeg(2000, repeats=config.bomb_scans)
    bomb, junk = upload("/search/image", data), upload("/search/image", bytes(len(data)))
    quiet = await legit_loop(port, min(3.0, config.flood_seconds))
    half = config.flood_seconds / 2
    reference = await flood(port, pid, junk, config.bomb_clients, half)
    bombs = await flood(port, pid, bomb, config.bomb_clients, half)
    await asyncio.sleep(1.0)
    after = cpu_seconds(pid)
    await asyncio.sleep(2.0)
    idle_cpu = cpu_seconds(pid) - after
    multi = json.dumps({"terms": [{"image_base64": base64.b64encode(data).decode(),
                                   "weight": 1.0}] * 16})
    cpu = cpu_seconds(pid)
    multi_status, _, multi_s = await exchange(port, request("POST", "/search/multi",
                                                            multi.encode()), 60.0)
    multi_cpu = cpu_seconds(pid) - cpu
    bound = max(2 * reference["legit"]["p99_ms"], 5 * quiet["p99_ms"])
    figures = {"clients": config.bomb_clients, "seconds_each": half,
               "upload_kb": round(len(bomb) / 1024, 1), "bombs_sent": bombs["sent"],
               "statuses": bombs["statuses"], "service_cpu_ms_per_bomb": bombs["cpu_ms_each"],
               "service_cpu_ms_per_junk_upload": reference["cpu_ms_each"],
               "text_p99_quiet_ms": quiet["p99_ms"],
               "text_p99_junk_flood_ms": reference["legit"]["p99_ms"],
               "text_p99_bomb_flood_ms": bombs["legit"]["p99_ms"],
               "text_non_200": bombs["legit"]["non_200"] + reference["legit"]["non_200"],
               "service_cpu_s_idle_after": round(idle_cpu, 2),
               "multi_16_bombs": {"status": multi_status, "ms": _ms(multi_s),
                                  "service_cpu_s": round(multi_cpu, 2)}}
    checks = {"every bomb refused (413, or 503 when uploads are full)":
              413 in bombs["statuses"] and set(bombs["statuses"]) <= {413, 503},
              "every text search answered 200 (uploads hold half the places at most)":
              figures["text_non_200"] == 0,
              f"text p99 in the bomb flood within 2x the junk flood's: {bound:.0f} ms":
              figures["text_p99_bomb_flood_ms"] <= bound,
              "idle once the flood stops (< 0.5 s CPU in 2 s)": idle_cpu < 0.5,
              "16 bombs in one multi-query: 413, < 1 s of CPU": multi_status == 413
              and multi_cpu < 1.0}
    return {"figures": figures, "checks": checks}


async def memory_returns(port: int, pid: int, config: HostileConfig) -> dict[str, Any]:
    """Bursts that allocate (photographs decoded two at a time, 10 MB JSON bodies), then
    idle: the service's RSS must come back within 20 % of where it was before."""
    noise = np.random.default_rng(1).integers(0, 255, (1920, 2560, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=80)
    photo = upload("/search/image", buffer.getvalue())
    body = request("POST", "/search/multi", json.dumps(
        {"terms": [{"vector": [0.1] * 1_000_000, "weight": 1.0}]}).encode())
    await legit_loop(port, 1.0)
    await asyncio.sleep(config.settle_seconds)  # the heap keeper's trims after what came before
    before = memory_kib(pid)["VmRSS"]
    peak: dict[str, int] = {}
    sampler = asyncio.ensure_future(sample_memory(pid, peak, 0.05))
    answers = await asyncio.gather(
        *(exchange(port, photo, 120.0) for _ in range(config.memory_uploads)),
        *(exchange(port, body, 120.0) for _ in range(config.memory_bodies)))
    sampler.cancel()
    await asyncio.sleep(config.settle_seconds + 1.0)  # idle: it trims what the burst freed
    after = memory_kib(pid)["VmRSS"]
    threads = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                       .splitlines() if line.startswith("Threads:")))
    figures = {"uploads": config.memory_uploads, "bodies": config.memory_bodies,
               "statuses": sorted({a[0] for a in answers}),
               "rss_before_mib": round(before / 1024),
               "rss_peak_mib": round(max(peak.get("rss", before), before) / 1024),
               "rss_after_mib": round(after / 1024), "threads_after": threads}
    checks = {"answered, no 500 (503: the service was full)":
              all(a[0] in (200, 413, 503) for a in answers),
              "RSS back within 20 % of before": after <= 1.2 * before}
    return {"figures": figures, "checks": checks}


async def header_floods(port: int, pid: int, config: HostileConfig) -> dict[str, Any]:
    chunk = b"a" * (1024 * 1024)

    async def flood(writer: asyncio.StreamWriter) -> None:
        for _ in range(config.header_mib):
            writer.write(chunk)
            await writer.drain()

    before = memory_kib(pid)["VmRSS"]
    peak: dict[str, int] = {}
    sampler = asyncio.ensure_future(sample_memory(pid, peak, 0.02))
    floods = [asyncio.ensure_future(exchange(port, b"GET /healthz HTTP/1.1\r\nX-Big: ", 60.0,
                                             flood)) for _ in range(config.header_floods)]
    probes = []
    while not all(f.done() for f in floods) and len(probes) < 200:
        status, _, took = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 10)
        probes.append((status, took))
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*floods)
    sampler.cancel()
    growth = (peak.get("rss", before) - before) / 1024
    figures = {"floods": config.header_floods, "offered_mib_each": config.header_mib,
               "statuses": sorted({a[0] for a in answers}),
               "healthz_max_ms": _ms(max(t for _, t in probes)) if probes else None,
               "rss_growth_mib": round(growth)}
    checks = {"refused with 431": figures["statuses"] == [431],
              "healthz stays fast (< 500 ms)": all(s == 200 and t < 0.5 for s, t in probes),
              "memory not buffered (< 64 MiB)": growth < 64}
    return {"figures": figures, "checks": checks}


async def busy_uploads(port: int, config: HostileConfig) -> dict[str, Any]:
    """Many uploads of ~100 KB at once at a service that admits 2: the refused ones must read
    a 503 with Retry-After, not a reset."""
    noise = np.random.default_rng(0).integers(0, 255, (190, 190, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    payload = upload("/search/image", buffer.getvalue())
    answers = await asyncio.gather(*(exchange(port, payload, 60.0)
                                     for _ in range(config.busy_uploads)))
    statuses = [a[0] for a in answers]
    retry = all(b"retry-after:" in a[1].lower() for a in answers if a[0] == 503)
    figures = {"uploads": config.busy_uploads, "upload_kb": round(len(payload) / 1024, 1),
               "200": statuses.count(200), "503": statuses.count(503),
               "resets": statuses.count(0),
               "other": sorted({s for s in statuses if s not in (0, 200, 503)})}
    checks = {"no resets": figures["resets"] == 0, "some were refused": figures["503"] > 0,
              "503s carry Retry-After": retry, "nothing else": not figures["other"]}
    return {"figures": figures, "checks": checks}


def catalogue(cursor: str, dim: int) -> dict[str, bytes]:
    """Malformed and hostile requests, each on its own connection."""
    def tamper(raw: str) -> str:
        payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        text = json.dumps({**payload, "n": "@"}).replace('"@"', raw)
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    text = {"text": "a square", "k": 2}
    body, form = multipart([(f"f{n}", b"x", None) for n in range(5000)])
    items = {
        **{f"cursor n={raw}": request("POST", "/search/text", json.dumps(
            {**text, "cursor": tamper(raw)}).encode()) for raw in ("Infinity", "1e400", "-1")},
        "knn 100k brackets": request("POST", "/knn-service", b"[" * 100_000, content_type=None),
        "knn 5000-digit int": request("POST", "/knn-service", b'{"num_images": '
                                      + b"9" * 5000 + b"}", content_type=None),
        "text 100k brackets": request("POST", "/search/text", b"[" * 60_000),
        "vector 10 MB array": request("POST", "/search/vector", json.dumps(
            {"vector": [0.1] * 1_500_000}).encode()),
        "multi 10 MB array": request("POST", "/search/multi", json.dumps(
            {"terms": [{"vector": [0.1] * 1_000_000, "weight": 1.0}]}).encode()),
        "huge-norm vector": request("POST", "/search/vector", json.dumps(
            {"vector": [3e38] * dim, "k": 2}).encode()),
        "forged Host": request("POST", "/search/text", json.dumps(text).encode())
        .replace(b"Host: 127.0.0.1", b"Host: evil.example"),
        "unreadable upload": upload("/search/image", b"GIF89a not really"),
        "caption": upload("/caption", _tiny_png()),
        "item image": b"GET /items/1 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + READ.encode()
        + b"\r\n\r\n",
        "caption item": b"GET /items/9 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + READ.encode()
        + b"\r\n\r\n",
        "knn text": request("POST", "/knn-service", json.dumps(
            {"text": "red", "modality": "text"}).encode(), content_type=None),
        "traversal items": b"GET /items/..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
        "traversal static": b"GET /static/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        "5000 form fields": request("POST", "/classify", body, content_type=form),
        "bad utf-8 JSON": request("POST", "/search/text", b'{"text": "\xff\xfe"}'),
        "chunked 20 MB": (b"POST /search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + READ.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + (b"100000\r\n" + b" " * 0x100000 + b"\r\n") * 20 + b"0\r\n\r\n"),
        "admin without key": request("POST", "/admin/reload", key=None),
        "admin with read key": request("POST", "/admin/reload"),
        "broken Basic auth": b"GET /items/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                             b"!!!\r\n\r\n",
        "long URL": b"GET /items/1?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "readyz": b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
        "webp canvas bomb": upload("/search/image", webp_canvas_bomb()),
        "apng frames bomb": upload("/caption", apng_frames_bomb()),
        "400-digit filter": request("POST", "/search/text", json.dumps(
            {**text, "filter": {"field": "label", "eq": 10**400}}).encode()),
        "400-digit browse filter": request("POST", "/search/browse", json.dumps(
            {"filter": {"field": "label", "gt": -10**400}}).encode()),
        "64 KB trailer": (b"POST /search/text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + READ.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + b"2\r\n{}\r\n0\r\nX-T: " + b"t" * 65536 + b"\r\n\r\n"),
        "1000 pipelined healthz": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1000,
        "obs-fold header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        "item image file": b"GET /items/1/image HTTP/1.1\r\nHost: x\r\nX-API-Key: "
        + READ.encode() + b"\r\n\r\n",
    }
    return items


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def run_catalogue(port: int, dim: int) -> dict[str, Any]:
    first = request("POST", "/search/text", json.dumps({"text": "a square", "k": 2}).encode())
    _, raw, _ = await exchange(port, first)
    cursor = json.loads(raw.partition(b"\r\n\r\n")[2])["next_cursor"]
    answers = {}
    for name, payload in catalogue(cursor, dim).items():
        answers[name] = await exchange(port, payload, 60.0)
    statuses = {name: a[0] for name, a in answers.items()}
    leaks = sorted(name for name, a in answers.items() if LEAKS.search(a[1]))
    huge = json.loads(answers["huge-norm vector"][1].partition(b"\r\n\r\n")[2] or b"{}")
    figures = {"requests": len(answers), "statuses": statuses, "leaks": leaks}
    checks = {"no 5xx": all(s < 500 for s in statuses.values()),
              "every request answered": 0 not in statuses.values(),
              "no path or address in any response": not leaks,
              "Host not echoed": b"evil.example" not in answers["forged Host"][1],
              "huge vector is a real query": any(abs(h["score"]) > 0 for h in
                                                 huge.get("hits", []))}
    return {"figures": figures, "checks": checks}


# ------------------------------------------------------------------------------ the driver


def run_hostile(config: HostileConfig = HostileConfig(), clip=None) -> dict[str, Any]:
    """Every scenario against fresh `clipdex serve` processes; JSON-able results."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="clipdex-hostile-") as tmp:
        folder = Path(tmp)
        index = build_index(folder, clip)
        keys = {"read": folder / "read.keys", "admin": folder / "admin.key"}
        keys["read"].write_text(READ + "\n")
        keys["admin"].write_text(ADMIN + "\n")
        flags = ("--read-keys-file", str(keys["read"]), "--admin-key-file", str(keys["admin"]))
        default = ServeOptions(max_batch=8, max_wait_ms=0, max_queue_wait_ms=500,
                               model_delay_ms=0, extra=flags)
        with _service(index, default, folder / "service.log") as (port, pid):
            results["stalled bodies"] = asyncio.run(stalled_bodies(port, config))
            results["slow bodies"] = asyncio.run(slow_bodies(port, config))
            results["decode bombs"] = asyncio.run(decode_bombs(port, pid, config))
            results["scan bomb flood"] = asyncio.run(scan_bomb_flood(port, pid, config))
            results["memory returns"] = asyncio.run(memory_returns(port, pid, config))
            results["header floods"] = asyncio.run(header_floods(port, pid, config))
            results["catalogue"] = asyncio.run(run_catalogue(port, _dim(index)))
        busy = ServeOptions(max_batch=2, model_delay_ms=200.0,
                            extra=(*flags, "--max-in-flight", "2"))
        with _service(index, busy, folder / "busy.log") as (port, _):
            results["busy uploads"] = asyncio.run(busy_uploads(port, config))
    return {"scenarios": results, "config": asdict(config)}


def _dim(index: Path) -> int:
    from retrieval.store import open_generation

    with open_generation(index) as generation:
        return generation.embed_dim


class _service:
    def __init__(self, index: Path, options: ServeOptions, log: Path):
        self.index, self.options, self.log = index, options, log

    def __enter__(self) -> tuple[int, int]:
        self.port = free_port()
        self.process = start_service(self.index, self.port, self.options, self.log)
        wait_ready(self.port, self.process, self.log)
        return self.port, self.process.pid

    def __exit__(self, *exc: object) -> None:
        stop(self.process)


def failed_checks(result: dict[str, Any]) -> list[str]:
    return [f"{name}: {check}" for name, scenario in result["scenarios"].items()
            for check, ok in scenario["checks"].items() if not ok]
