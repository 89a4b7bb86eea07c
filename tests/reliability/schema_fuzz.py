"""Schemathesis against the running service's OpenAPI schema: every phase, every check, a fixed
seed and a bounded number of examples per operation, summarised as JSON for the soak report.

    with fuzz_target(tmp) as service:
        summary = run_schemathesis(service.url, max_examples=8, seed=1, workdir=tmp / "fuzz",
                                   headers=service.headers)
    assert not summary["failing_cases"]

The CLI runs as a subprocess (a Schemathesis crash cannot take the caller down); its NDJSON
event stream gives every case with its response and checks, its JSON report the totals.
`python -m tests.reliability.schema_fuzz [--max-examples N] [--seed S]` prints one summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "schemathesis.toml"  # per-operation allowances, each with its reason
HOOKS = HERE / "schemathesis_hooks.py"  # image strategies, a check, two false-positive filters
PHASES = ("examples", "coverage", "fuzzing", "stateful")
ADMIN_KEY = "fuzz-admin-key"
# Checks on the service's answers against its own schema: a failure is a schema violation.
SCHEMA_CHECKS = ("status_code_conformance", "content_type_conformance",
                 "response_schema_conformance", "response_headers_conformance")


@dataclass(frozen=True)
class FuzzTarget:
    """A running service: its base URL, the headers every request carries, its index root."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    index: Path | None = None


@contextlib.contextmanager
def fuzz_target(tmp: Path, clip: Any = None, admin_key: str = ADMIN_KEY) -> Iterator[FuzzTarget]:
    """The real service over a small real index (three colour images and their captions)
    encoded by `clip` (default: the tiny random CLIP), writable with the admin key: fuzzed
    writes stay in `tmp`."""
    from api.app import create_app
    from api.settings import Settings
    from retrieval.models.loading import load_model
    from retrieval.search.batcher import BatcherConfig
    from tests.api.helpers import ServerThread, build_index
    from tests.conftest import COLOURS, make_image

    clip = clip or load_model("clipdex-tiny", device="cpu")
    images = {name: make_image(tmp / "images" / f"{name}.png", COLOURS[name])
              for name in ("red", "green", "blue")}
    root = build_index(tmp / "index", clip, images)
    settings = Settings(index=root, admin_key=admin_key, max_image_pixels=250_000,
                        max_body_bytes=2_000_000, batching=BatcherConfig(32, 10, 64))
    with ServerThread(create_app(settings, clip=clip)) as server:
        yield FuzzTarget(server.url, {"Authorization": f"Bearer {admin_key}"}, root)


def schemathesis_command(base_url: str, max_examples: int, seed: int, workdir: Path,
                         headers: dict[str, str] | None = None) -> list[str]:
    """The CLI call: all phases and checks, one worker so that the seed fixes the run."""
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
               f"{base_url}/openapi.json", "--checks", "all", "--phases", ",".join(PHASES),
               "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
               "--generation-database", "none", "--request-timeout", "30", "--no-color",
               "--report", "ndjson,json,junit", "--report-dir", str(workdir)]
    for name, value in (headers or {}).items():
        command += ["--header", f"{name}: {value}"]
    return command


def run_schemathesis(base_url: str, max_examples: int, seed: int, workdir: Path,
                     headers: dict[str, str] | None = None, timeout_s: float = 1800) -> dict:
    """Run Schemathesis against `{base_url}/openapi.json`; -> the JSON-able summary (see
    `summarise`). The reports and the console log stay in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1"}
    done = subprocess.run(schemathesis_command(base_url, max_examples, seed, workdir, headers),
                          capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=workdir, check=False)  # exit 1 = failures, in the summary
    (workdir / "schemathesis.log").write_text(done.stdout + done.stderr)
    summary = summarise(workdir)
    summary.update(seed=seed, max_examples=max_examples, exit_code=done.returncode,
                   seconds=round(time.monotonic() - started, 1))
    if not summary["cases"]:  # nothing ran: say why instead of reporting a clean run
        summary["errors"].append(done.stderr[-2000:] or done.stdout[-2000:])
    return summary


def summarise(workdir: Path) -> dict[str, Any]:
    """The newest reports in `workdir` -> {operations, cases, responses, failures_by_check,
    server_errors, schema_violations, failing_cases, filtered, phases, errors}."""
    report = _load_json(_newest(workdir, "json-*.json"))
    cases, failing, filtered = _cases(_newest(workdir, "ndjson-*.ndjson"))
    by_check = Counter(row["check"] for row in failing)
    statuses = Counter(f"{case['status'] // 100}xx" if case["status"] else "no response"
                       for case in cases.values())
    operations = report.get("operations", {})
    return {
        "schemathesis": report.get("schemathesis_version"),
        "phases": {name: info.get("status") for name, info in report.get("phases", {}).items()},
        "operations": {key: operations.get(key) for key in ("selected", "tested", "errored")},
        "cases": len(cases),
        "responses": dict(sorted(statuses.items())),
        "server_errors": sum(1 for case in cases.values() if (case["status"] or 0) >= 500),
        "schema_violations": sum(by_check[name] for name in SCHEMA_CHECKS),
        "failures_by_check": dict(sorted(by_check.items())),
        "failing_cases": failing,
        # Failures the hooks dropped as known Schemathesis false positives, each listed.
        "filtered": filtered,
        "warnings": {name: found for name, found in report.get("warnings", {}).items() if found},
        "errors": [error.get("message", str(error)) if isinstance(error, dict) else str(error)
                   for error in report.get("errors", [])],
    }


def _cases(ndjson: Path | None) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """Every case that got a response ({id: method, path, status}), every failed check, and
    every case whose failure a hook filtered out."""
    cases: dict[str, dict] = {}
    failing: list[dict] = []
    filtered: list[dict] = []
    for line in (ndjson.read_text().splitlines() if ndjson else []):
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder, phase = finished["recorder"], finished.get("phase")
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            status = (interaction.get("response") or {}).get("status_code")
            cases[case_id] = {"method": case["method"], "path": case["path"], "status": status}
        for case_id, checks in recorder.get("checks", {}).items():
            for check in checks:
                if check["status"] != "failure":
                    continue
                info = check.get("failure_info", {}).get("failure", {})
                case = recorder["cases"][case_id]["value"]
                failing.append({
                    **cases.get(case_id, {"method": case["method"], "path": case["path"],
                                          "status": None}),
                    "check": check["name"], "code": info.get("code"), "title": info.get("title"),
                    "message": (info.get("message") or "")[:500], "phase": phase,
                    "mode": case.get("meta", {}).get("generation", {}).get("mode"),
                    "case_id": case_id})
        for case_id in recorder.get("filtered_failures", {}):
            case = recorder["cases"][case_id]["value"]
            meta = case.get("meta", {})
            filtered.append({**cases.get(case_id, {}), "phase": phase,
                             "mode": meta.get("generation", {}).get("mode"),
                             "case": meta.get("phase", {}).get("data", {}).get("description"),
                             "case_id": case_id})
    return cases, failing, filtered


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def _load_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None else {}


def describe(summary: dict[str, Any], limit: int = 20) -> str:
    """The failing cases one per line, for an assertion message or a log."""
    lines = [f"{row['method']} {row['path']} -> {row['status']}: {row['check']} ({row['code']}, "
             f"{row['phase']}/{row['mode']}) {row['message'].splitlines()[0] if row['message'] else ''}"
             for row in summary["failing_cases"][:limit]]
    more = len(summary["failing_cases"]) - limit
    return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []) + summary["errors"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the reports go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, fuzz_target(Path(tmp)) as service:
        summary = run_schemathesis(service.url, args.max_examples, args.seed,
                                   args.workdir or Path(tmp) / "fuzz", service.headers)
    print(json.dumps(summary, indent=2))
    return 0 if not summary["failing_cases"] and not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
