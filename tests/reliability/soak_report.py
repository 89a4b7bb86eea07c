"""docs/RELIABILITY.md (and its two plots) from docs/reliability_results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUTCOME_STYLE = {"killed": ("tab:red", "x"), "fault point": ("tab:purple", "v"),
                 "finished": ("tab:green", "o"), "failed": ("black", "s")}


def write_report(results: dict[str, Any], docs: Path) -> None:
    from tests.reliability.soak import verdicts

    lines = ["# Reliability", "",
             "Written by `make soak` (`.venv/bin/python -m tests.reliability.soak`) from "
             "`docs/reliability_results.json`. The fast part of every suite runs in `make test`; "
             "this is the long part. Each section names the command that reproduces it.", "",
             "| suite | verdict | checks |", "|---|---|---|"]
    for part, title in (("crash_loop", "Crash loop"),
                        ("crash_loop_ray", "Crash loop, Ray builds"),
                        ("suites", "Corruption, disk full, bad input, stateful store, "
                                   "browse at 200k"),
                        ("schemathesis", "Schemathesis"),
                        ("overload", "Overload"), ("hostile", "Hostile clients")):
        if part in results:
            checks = verdicts(part, results[part])
            failed = [name for name, ok in checks.items() if not ok]
            verdict = "pass" if not failed else "FAIL: " + ", ".join(failed)
            lines.append(f"| {title} | {verdict} | {', '.join(checks)} |")
    lines.append("")
    lines += promises() + [""]
    sections = {"crash_loop": _crash_loop, "crash_loop_ray": _crash_loop_ray, "suites": _suites,
                "schemathesis": _schemathesis, "overload": _overload, "hostile": _hostile}
    for part, render in sections.items():
        if part in results:
            lines += render(results[part], docs) + [""]
    (docs / "RELIABILITY.md").write_text("\n".join(lines))


def _header(title: str, result: dict[str, Any]) -> list[str]:
    return [f"## {title}", "", f"`{result['command']}` ({result['wall_seconds']} s, "
            f"{result['date']})", ""]


def _crash_loop_ray(result: dict[str, Any], docs: Path) -> list[str]:
    """The same loop with every build run by `--engine ray` (Ray started in each job)."""
    lines = _crash_loop(result, docs, "Crash loop, Ray builds", "soak_crash_loop_ray.png")
    note = ("Here every `index build` runs with `--engine ray`, starting Ray on this machine; a "
            "kill hits the driver, and what is left of Ray's processes is killed after it. Adds "
            "and deletes run in one process.")
    return lines[:4] + [note, ""] + lines[4:]


def _crash_loop(result: dict[str, Any], docs: Path, title: str = "Crash loop",
                figure_name: str = "soak_crash_loop.png") -> list[str]:
    lines = _header(title, result) + [
        "Real `clipdex index build`, `index add` and `index delete` processes over a corpus "
        "of small PNGs (plus one broken file per folder), each killed with SIGKILL at a random "
        "moment of its life or at a named fault point of the store. After every kill a checker "
        "opens the index from outside: the generation loads, the FAISS id map, the `.ids.npy` "
        "rows and the SQLite rows hold the same ids, no id or live path appears twice, the "
        "manifest's live count matches SQLite, searches return only live ids, and no image "
        "committed earlier has gone (except those the loop deleted). A final `index add` of "
        "every folder must give exactly the corpus.", "",
        "| runs | random kills | fault-point kills | finished | failed | checks | losses | "
        "duplicates | final / expected | leftover work folders |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {result['runs']} | {result['killed_at_random_time']} | "
        f"{result['killed_at_fault_point']} | {result['finished_before_kill']} | "
        f"{result['failed']} | {result['checks']} | {result['losses']} | "
        f"{result['duplicates']} | {result['final_images']} / {result['expected_images']} | "
        f"{result['leftover_work_dirs']} |", "",
        "Operations: " + ", ".join(f"{k} {v}" for k, v in result["operations"].items()) + ".",
        ""]
    if result["violations"]:
        lines += ["Violations:", ""] + [f"- {v}" for v in result["violations"][:20]] + [""]
    if result.get("history"):
        figure, axis = plt.subplots(figsize=(8, 3))
        for outcome, (colour, marker) in OUTCOME_STYLE.items():
            runs = [h for h in result["history"] if h["outcome"] == outcome]
            if runs:
                axis.scatter([h["run"] for h in runs], [h["committed"] for h in runs],
                             c=colour, marker=marker, s=18, label=outcome)
        axis.set_xlabel("run")
        axis.set_ylabel("images committed")
        axis.set_title("Committed images after each killed or finished job")
        axis.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(docs / figure_name, dpi=110)
        plt.close(figure)
        lines.append(f"![committed images per run]({figure_name})")
    return lines


def _suites(result: dict[str, Any], docs: Path) -> list[str]:
    lines = _header("Corruption, disk full, bad input, stateful store, browse at 200k",
                    result) + [
        f"The `make test` suites again, with {result['examples']} Hypothesis examples for the "
        "stateful store test, and the ordered browse on a 200,000-image generation (20,000 in "
        "`make test`). Disk full includes a real 3 MiB tmpfs filled to several levels "
        "(skipped where mounting is not allowed).", "",
        "| suite | tests | failures | errors | skipped | seconds |", "|---|---|---|---|---|---|"]
    for name, suite in result["suites"].items():
        lines.append(f"| {name} (`{suite['path']}`) | {suite['tests']} | {suite['failures']} | "
                     f"{suite['errors']} | {suite['skipped']} | {suite['seconds']} |")
    failed = [f"- {name}: {case}" for name, s in result["suites"].items() for case in s["failed"]]
    return lines + ([""] + failed if failed else [])


def _schemathesis(result: dict[str, Any], docs: Path) -> list[str]:
    operations = result.get("operations", {})
    lines = _header("Schemathesis", result) + [
        f"Schemathesis {result.get('schemathesis')} against the running service's OpenAPI "
        f"schema, all checks, phases {', '.join(result.get('phases', {}))}, seed "
        f"{result['seed']}, at most {result['max_examples']} examples per operation, with the "
        "admin key so that the write endpoints are exercised too.", "",
        "| operations tested | cases | responses | server errors | schema violations | "
        "filtered as known false positives |", "|---|---|---|---|---|---|",
        f"| {operations.get('tested')} / {operations.get('selected')} | {result['cases']} | "
        f"{', '.join(f'{k}: {v}' for k, v in result['responses'].items())} | "
        f"{result['server_errors']} | {result['schema_violations']} | "
        f"{len(result.get('filtered') or [])} |", ""]
    if result.get("failing_cases"):
        lines += ["Failing cases:", ""] + [f"- `{json.dumps(case)}`"
                                          for case in result["failing_cases"][:20]]
    return lines


def _overload(result: dict[str, Any], docs: Path) -> list[str]:
    lines = _header("Overload", result)
    for number, (label, run) in enumerate(result["runs"].items()):
        lines += _overload_run(label, run, docs / f"soak_overload_{number}.png") + [""]
    return lines


def _overload_run(label: str, result: dict[str, Any], plot: Path) -> list[str]:
    baseline, admitted, rejected = result["baseline"], result["admitted"], result["rejected"]
    service = result.get("service", {})
    lines = [f"### {label}", "", f"Service flags: `{' '.join(_flags(service))}`.", "",
        f"A fresh `clipdex serve` process is measured at its capacity (closed "
        f"loop), then offered {service.get('factor', 4)}× that rate for "
        f"{service.get('seconds')} s, open loop.", "",
        "| capacity (req/s) | offered (req/s) | sent | admitted (req/s) | refused "
        "(by status) | other statuses | connection errors |", "|---|---|---|---|---|---|---|",
        f"| {result['capacity_rps']} | {result['offered_rps']} | {result['sent']} | "
        f"{admitted['count']} ({admitted['rps']}/s) | {rejected['count']} "
        f"{rejected.get('by_status', {})} | {result['other_statuses'] or 'none'} | "
        f"{result['connection_errors']} |", "",
        "| latency (ms) | p50 | p95 | p99 |", "|---|---|---|---|"]
    for name, row in (("at capacity (baseline)", baseline), ("admitted under overload",
                      admitted), ("refused under overload", rejected)):
        lines.append(f"| {name} | " + " | ".join(_ms(row.get(k)) for k in
                                                 ("p50_ms", "p95_ms", "p99_ms")) + " |")
    lines += ["", f"Memory (RSS): {result['rss_ready_mib']} MiB when ready, peak "
              f"{result['rss_peak_mib']} MiB, bound {result['rss_bound_mib']} MiB. "
              f"Alive after: {result['alive_after']}, `/healthz` {result['healthz_after']}."]
    figure, axis = plt.subplots(figsize=(6, 3))
    labels = ["baseline", "admitted", "refused"]
    for offset, key in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        values = [row.get(key) or 0 for row in (baseline, admitted, rejected)]
        axis.bar([i + 0.27 * (offset - 1) for i in range(3)], values, width=0.27, label=key[:3])
    axis.set_xticks(range(3), labels)
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"{label}: {service.get('factor', 4)}× capacity, {service.get('seconds')} s")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return lines + ["", f"![overload latencies, {label}]({plot.name})"]


def _flags(service: dict[str, Any]) -> list[str]:
    from tests.reliability.overload import ServeOptions

    known = {k: v for k, v in service.items() if k in ServeOptions.__dataclass_fields__}
    options = ServeOptions(**{**known, "extra": tuple(known.get("extra", ()))})
    delay = f" (+{options.model_delay_ms} ms sleep per model call)" if options.model_delay_ms else ""
    return ["--model", options.model, *options.flags(), delay]


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def promises() -> list[str]:
    """What `clipdex serve` promises, from the defaults in the code (so it cannot go stale);
    the hostile part of `make soak` checks each against a running service."""
    from api.connections import FD_RESERVE
    from api.limits import MAX_FORM_DELIMITERS
    from api.server import HeadLimits
    from api.settings import (
        EMPTY_BODY_BYTES,
        TEXT_QUERY_BODY_BYTES,
        VECTOR_QUERY_BODY_BYTES,
        Settings,
    )
    from retrieval.inputs.images import DecodeLimits

    s, h, d = Settings(), HeadLimits(), DecodeLimits()
    mib = 2**20
    return [
        "## What the service promises", "",
        "Defaults of `clipdex serve` (each is a field of `api.settings.Settings` or "
        "`api.server.HeadLimits`):", "",
        "| limit | default | past it |", "|---|---|---|",
        f"| request line + headers | {h.max_head_bytes // 1024} KiB | 431, counted as the bytes "
        "arrive (never buffered) |",
        f"| request target (path + query) | {h.max_url_bytes // 1024} KiB | 414 |",
        f"| time to send the request head | {h.head_timeout_s:g} s | 408, connection closed |",
        f"| chunk lines and trailers of a chunked body | {h.max_trailer_bytes // 1024} KiB, "
        f"within {h.head_timeout_s:g} s | 431 (408), connection closed |",
        f"| pipelined requests parsed ahead on one connection | {h.max_pipelined} | reading "
        "pauses until they are answered, in order |",
        f"| connections in all | the descriptor limit less {FD_RESERVE} and the reserve "
        "(`--max-connections`) | 503, closed at once |",
        f"| connections from one address | {s.max_connections_per_address} "
        "(`--max-connections-per-address`; 0 behind a proxy) | 429, closed at once |",
        f"| reserve past either cap | {s.reserved_connections} connections, one health check or "
        "keyed request each, head within 2 s | 503 / 429 |",
        f"| a refused request's body (after 401, 413, 503) | read and dropped for "
        f"{s.refused_drain_s:g} s | connection closed |",
        f"| body of `/search/text` | {TEXT_QUERY_BODY_BYTES // 1024} KiB | 413 before parsing |",
        f"| body of `/search/vector` | {VECTOR_QUERY_BODY_BYTES // 1024} KiB | 413 before parsing |",
        f"| body of `/admin/reload` and of routes without a body | {EMPTY_BODY_BYTES // 1024} "
        "KiB | 413 |",
        f"| body of upload routes, `/search/multi`, `/knn-service`, admin writes | "
        f"{s.max_body_bytes // mib} MiB (`--max-body-mb`) | 413 |",
        f"| JSON outside strings (numbers, arrays) on `/search/multi`, `/knn-service` | "
        f"{VECTOR_QUERY_BODY_BYTES // 1024} KiB, counted while it streams | 413 |",
        f"| multipart delimiters in one form | {MAX_FORM_DELIMITERS} | 400 before parsing |",
        f"| silence while a body arrives | {s.body_idle_s:g} s | 408 |",
        f"| whole body | {s.body_deadline_s:g} s | 408 |",
        f"| bodies being received, all together | {s.max_buffered_bytes // mib} MiB | 503 + "
        "Retry-After |",
        "| complete requests inside the service | 4 x `--max-batch` (32 on CPU), at most half "
        "of them carrying uploads (multipart, or JSON over 64 KiB) | 503 + Retry-After, "
        "before routing |",
        f"| pixels of one image | {s.max_image_pixels:,} | 413 |",
        f"| bytes one decode may allocate (raster, conversions, a multi-scan JPEG's full-size "
        f"coefficients, WebP's two canvases) | {s.max_decode_bytes // mib} MiB | 413, from the "
        "header, before decoding |",
        f"| scans of one JPEG | {d.max_scans} | 413, counted from the markers before decoding |",
        f"| scans x pixels of one JPEG (decode work) | {d.max_scan_pixels:,} | 413 before "
        "decoding |",
        f"| frames an animation may name (the first is decoded) | {d.max_frames:,} | 413 |",
        f"| images decoded at once | {s.max_concurrent_decodes} | the rest wait their turn |",
        f"| time to decode one request's images | {s.decode_deadline_s:g} s | 413 at the "
        "deadline; the decode is abandoned |",
        "| encode queue | 256 inputs or 500 ms of expected wait | 503 + Retry-After |",
        f"| one statement on the index's metadata (filters, browse, keywords, item lookups) | "
        f"{s.query_seconds:g} s | 503; the statement is stopped, and other requests read "
        "through their own connections |", "",
        "What a client without a key can and cannot do to a service started with read keys:",
        "- it is answered 401 from its headers alone, before one byte of its body is read; it "
        "never holds a place among the requests in flight, and its stalled body is dropped;",
        "- it can open connections, but each must finish its request head within "
        f"{h.head_timeout_s:g} s and {h.max_head_bytes // 1024} KiB, and its refused body is "
        "read and dropped, not kept: what it spends is its own bandwidth;",
        "- it can read `/healthz`, `/readyz`, `/metrics`, the page, `/docs` and the OpenAPI "
        "schema (no item, no path, no key);",
        "- it cannot search, fetch an item or an image, or write.", "",
        "For every client: no response names a server path or a memory address (items are named "
        "by id and by file name; errors say what is wrong, not where), links are built from "
        "`--public-url` (or are relative), never from the request's Host header, and a refusal "
        "is an RFC 9457 problem read by the client, not a connection reset. A stalled or "
        "trickling body holds only its own connection and bytes: requests that have arrived are "
        "served around it.", "",
        "`/items/{id}/image` serves only image files under the index's media roots (the "
        "folders it was built from, an import's `--media-root`, its uploads), links and `..` "
        "resolved first; an imported path outside them is metadata, never opened.", "",
        "Memory: the service caps malloc at "
        f"{s.malloc_arenas} arenas and hands freed heap back every {s.heap_trim_s:g} s when "
        "its resident memory grew, so it returns near its idle size after a burst.", "",
        "Left to the deployment: a client with many addresses can fill the connection caps "
        "(each address has its own, and any key header enters the reserve), TLS, and rate "
        "limits over time: put a reverse proxy in front of a public service, and run "
        "`clipdex serve` behind it with `--max-connections-per-address 0`.",
    ]


def _hostile(result: dict[str, Any], docs: Path) -> list[str]:
    lines = _header("Hostile clients", result) + [
        "An outside attacker's tests against real `clipdex serve` processes started with key "
        "files (`tests/reliability/hostile.py`): each scenario's figures and checks.", "",
        "| scenario | figures | checks |", "|---|---|---|"]
    for name, scenario in result["scenarios"].items():
        figures = json.dumps(scenario["figures"], separators=(", ", ": "))
        checks = ", ".join(f"{check}: {'pass' if ok else 'FAIL'}"
                           for check, ok in scenario["checks"].items())
        lines.append(f"| {name} | `{figures}` | {checks} |")
    return lines
