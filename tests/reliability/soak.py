"""`make soak`: the long reliability runs, written up in docs/RELIABILITY.md.

    .venv/bin/python -m tests.reliability.soak                     # everything (~25 min, 2 cores)
    .venv/bin/python -m tests.reliability.soak --parts crash_loop --kills 20

Parts: the crash loop (100+ random SIGKILLs, then a few with builds on Ray), the fast suites
again with many more Hypothesis examples (corruption, disk full, bad input, stateful store),
Schemathesis against a running service, 30 s at four times the service's capacity, and hostile clients (stalled and slow
bodies, decode bombs, header floods, uploads refused while busy, malformed requests). Results accumulate in
docs/reliability_results.json (running some --parts updates only those), and the report is
rebuilt from the whole file, so every figure keeps the command that made it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = DOCS / "reliability_results.json"
PARTS = ("crash_loop", "crash_loop_ray", "suites", "schemathesis", "overload", "hostile")
SUITES = {
    "corruption": "tests/reliability/test_corruption.py",
    "disk full": "tests/reliability/test_disk_full.py",
    "bad input": "tests/reliability/test_bad_input.py",
    "stateful store": "tests/reliability/test_store_stateful.py",
    "browse at 200,000 items": "tests/retrieval/test_browse_order.py",
}
PYTHON = ".venv/bin/python"


def run_crash_loop(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.reliability.crash_loop import CrashLoopConfig, crash_loop

    report = crash_loop(CrashLoopConfig(workdir / "crash", kills=args.kills, seed=args.seed),
                        log=lambda line: print(line, flush=True))
    return {**report.as_dict(), "ok": report.ok,
            "command": f"{PYTHON} -m tests.reliability.soak --parts crash_loop --kills {args.kills}"}


def run_crash_loop_ray(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The crash loop with every build on Ray (`--engine ray`, Ray started by each job):
    fewer kills, since each build pays Ray's start-up."""
    from tests.reliability.crash_loop import CrashLoopConfig, crash_loop

    config = CrashLoopConfig(workdir / "crash", kills=args.ray_kills, folders=3,
                             images_per_folder=12, shard_size=4, seed=args.seed, engine="ray")
    report = crash_loop(config, log=lambda line: print(line, flush=True))
    return {**report.as_dict(), "ok": report.ok, "kills_asked": args.ray_kills,
            "command": f"{PYTHON} -m tests.reliability.soak --parts crash_loop_ray "
                       f"--ray-kills {args.ray_kills}"}


def run_suites(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The `make test` suites once more, with `--examples` Hypothesis examples (and the
    ordered browse at 200,000 items)."""
    results = {}
    for name, path in SUITES.items():
        junit = workdir / f"{Path(path).stem}.xml"
        env = {**os.environ, "CLIPDEX_SOAK_EXAMPLES": str(args.examples),
               "CLIPDEX_SOAK_BROWSE_ITEMS": "200000"}
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                        f"--junitxml={junit}"], cwd=ROOT, env=env, check=False)
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors",
                                                          "skipped")}
        failed = [case.get("name") for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        results[name] = {**counts, "failed": failed, "path": path,
                         "seconds": round(time.perf_counter() - began, 1)}
    return {"suites": results, "examples": args.examples,
            "command": f"{PYTHON} -m tests.reliability.soak --parts suites "
                       f"--examples {args.examples}"}


def run_schemathesis_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.reliability.schema_fuzz import fuzz_target, run_schemathesis

    with fuzz_target(workdir) as target:
        summary = run_schemathesis(target.url, args.schema_examples, args.seed,
                                   workdir / "schemathesis", headers=target.headers)
    return {**summary, "max_examples": args.schema_examples, "seed": args.seed,
            "command": f"{PYTHON} -m tests.reliability.soak --parts schemathesis "
                       f"--schema-examples {args.schema_examples}"}


def run_overload_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Twice: the tiny model slowed by a sleep (an accelerator's time, no CPU: the shedding
    logic alone), then the bundled model on these CPU cores with nothing simulated."""
    from tests.reliability.overload import ServeOptions, run_overload

    # the load generator is one address standing for many clients: no per-address cap
    many = ("--max-connections-per-address", "0")
    runs = {"tiny model + 20 ms per call": ServeOptions(extra=many),
            # the service's CPU defaults: batches of 8, no wait, 32 in flight
            "default model, CPU": ServeOptions(model="default", model_delay_ms=0, max_batch=8,
                                               max_wait_ms=0, max_queue_wait_ms=500,
                                               extra=many)}
    results = {}
    for label, options in runs.items():
        print(f"-- overload: {label}", flush=True)
        results[label] = run_overload(args.overload_seconds, factor=4.0, options=options)
    return {"runs": results, "command": f"{PYTHON} -m tests.reliability.soak --parts overload "
                                        f"--overload-seconds {args.overload_seconds}"}


def run_hostile_part(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The outside attacker's tests at full size against real `clipdex serve` processes."""
    from tests.reliability.hostile import HostileConfig, run_hostile

    return {**run_hostile(HostileConfig()),
            "command": f"{PYTHON} -m tests.reliability.soak --parts hostile"}


RUNNERS = {"crash_loop": run_crash_loop, "crash_loop_ray": run_crash_loop_ray,
           "suites": run_suites,
           "schemathesis": run_schemathesis_part, "overload": run_overload_part,
           "hostile": run_hostile_part}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    parser.add_argument("--kills", type=int, default=100, help="crash-loop random SIGKILLs")
    parser.add_argument("--ray-kills", type=int, default=5,
                        help="random SIGKILLs of the crash loop with builds on Ray")
    parser.add_argument("--examples", type=int, default=200, help="Hypothesis examples")
    parser.add_argument("--schema-examples", type=int, default=30,
                        help="Schemathesis examples per operation")
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in parts:
        print(f"== {part}", flush=True)
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"clipdex-soak-{part}-") as tmp:
            result = RUNNERS[part](args, Path(tmp))
        result["wall_seconds"] = round(time.perf_counter() - began, 1)
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        results[part] = result
        DOCS.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # keep what finished
    from tests.reliability.soak_report import write_report

    write_report(results, DOCS)
    print(f"wrote {DOCS / 'RELIABILITY.md'}")
    return 0 if all(_passed(part, results[part]) for part in parts) else 1


def verdicts(part: str, result: dict[str, Any]) -> dict[str, bool]:
    """Each pass criterion of a part, by name (the report prints them)."""
    if part in ("crash_loop", "crash_loop_ray"):
        kills = result.get("kills_asked", 100)
        return {"no losses": result["losses"] == 0, "no duplicates": result["duplicates"] == 0,
                "no failed runs": result["failed"] == 0, "no violations": not result["violations"],
                "resumes to exactly N": result["final_images"] == result["expected_images"],
                f"at least {kills} random kills": result["killed_at_random_time"] >= kills}
    if part == "suites":
        return {name: s["failures"] == 0 and s["errors"] == 0
                for name, s in result["suites"].items()}
    if part == "hostile":
        return {f"{name}: {check}": ok for name, scenario in result["scenarios"].items()
                for check, ok in scenario["checks"].items()}
    if part == "schemathesis":
        return {"cases ran": result["cases"] > 0, "no server errors": result["server_errors"] == 0,
                "no schema violations": result["schema_violations"] == 0}
    return {f"{label}: {name}": ok for label, run in result["runs"].items()
            for name, ok in _overload_verdicts(run).items()}


def _overload_verdicts(result: dict[str, Any]) -> dict[str, bool]:
    admitted, baseline = result["admitted"], result["baseline"]
    return {
        "stayed up": bool(result["alive_after"]) and result["healthz_after"] == 200,
        "no 5xx but 503": not any(s.startswith("5") and s != "503"
                                  for s in result["other_statuses"]),
        "refusals fast (p99 < 100 ms)": (result["rejected"]["count"] == 0
                                        or (result["rejected"]["p99_ms"] or 0) < 100),
        # the encode queue admits what it expects to start within max_queue_wait_ms: an
        # admitted request waits that long at most, on top of what it costs at capacity
        "admitted p99 within baseline p99 + the queue-wait budget": (admitted["p99_ms"] or 0)
        <= (baseline["p99_ms"] or 0) + result["service"]["max_queue_wait_ms"],
        "memory under bound": result["rss_peak_mib"] <= result["rss_bound_mib"],
    }


def _passed(part: str, result: dict[str, Any]) -> bool:
    return all(verdicts(part, result).values())


if __name__ == "__main__":
    sys.exit(main())
