"""The crash loop: run `clipdex index build` / `index add` over and over, kill each one with
SIGKILL at a random moment (or at a named fault point inside the store), and after every kill
check the index directory from the outside, without trusting the store's own loader alone.

Invariants after every kill (`check_index`):
- CURRENT names a generation that `open_generation` loads (checksums, counts, model);
- in each modality, the FAISS id map, the `.ids.npy` rows and the SQLite rows hold the same
  ids, with no duplicate id and no image path stored twice among live items;
- the live count in the manifest equals the live SQLite rows;
- every id a search returns is a live item;
- nothing committed is lost: every image path seen in an earlier generation is still there
  (other than the ones the loop itself asked to delete).

A final uninterrupted `index add` of every folder must then give exactly the corpus' image
count: a duplicate or a lost item anywhere in the history would show there.
Used by `tests/reliability/test_crash_loop.py` (a few kills) and `make soak` (100+, and a few
with builds on Ray: `engine="ray"`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from retrieval.store import current_name, open_generation
from retrieval.store.layout import PLURAL

ROOT = Path(__file__).resolve().parents[2]
FAULT_POINTS = ("mid_generation", "before_current", "after_shard:0", "after_shard:3")


@dataclass(frozen=True)
class CrashLoopConfig:
    workdir: Path
    kills: int = 100  # run until this many jobs were killed at a random moment
    folders: int = 4
    images_per_folder: int = 24
    corrupt_per_folder: int = 1  # skipped and reported, never indexed
    shard_size: int = 8
    fault_share: float = 0.2  # runs killed at a named fault point instead of a random time
    # A random kill lands in this fraction of a full build's time (deletes and adds of little
    # are shorter, so some runs finish first).
    kill_window: tuple[float, float] = (0.1, 1.0)
    model: str = "clipdex-tiny"
    seed: int = 0
    # "ray": builds run with --engine ray (Ray started by each job; adds and deletes stay
    # single-process); a killed job's whole process group is reaped after it, Ray's own
    # processes included
    engine: str = "local"


@dataclass
class CrashLoopReport:
    runs: int = 0
    killed_at_random_time: int = 0
    killed_at_fault_point: int = 0
    finished_before_kill: int = 0
    failed: int = 0  # non-zero exit without a kill: must be 0
    checks: int = 0
    losses: int = 0  # image paths that vanished from a later generation: must be 0
    duplicates: int = 0  # duplicate ids or live paths: must be 0
    violations: list[str] = field(default_factory=list)
    operations: dict[str, int] = field(default_factory=dict)
    final_images: int = 0
    expected_images: int = 0
    leftover_work_dirs: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return (not self.violations and self.failed == 0 and self.losses == 0
                and self.duplicates == 0 and self.final_images == self.expected_images)


def make_corpus(config: CrashLoopConfig) -> list[Path]:
    """`folders` folders of small noisy PNGs plus a corrupt file each; returns the folders."""
    rng = np.random.default_rng(config.seed)
    folders = []
    for f in range(config.folders):
        folder = config.workdir / "corpus" / f"part{f}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(config.images_per_folder):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        for i in range(config.corrupt_per_folder):
            (folder / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        folders.append(folder)
    return folders


def check_index(index: Path, seen_paths: set[str], report: CrashLoopReport) -> set[str]:
    """Assert the invariants above; record violations in `report`; return the live paths."""
    report.checks += 1
    if not (index / "CURRENT").exists():
        if seen_paths:
            report.violations.append(f"check {report.checks}: CURRENT vanished")
            report.losses += len(seen_paths)
        return seen_paths
    name = current_name(index)
    folder = index / "generations" / name
    try:
        generation = open_generation(index)
    except Exception as error:  # noqa: BLE001 - any refusal is a violation, whatever its type
        report.violations.append(f"check {report.checks}: generation {name} does not load: "
                                 f"{type(error).__name__}: {error}")
        return seen_paths
    with generation:
        manifest = generation.manifest
        db = sqlite3.connect(f"{(folder / 'items.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            live_paths = _check_rows(folder, manifest, db, generation, report)
        finally:
            db.close()
    lost = seen_paths - live_paths
    if lost:
        report.losses += len(lost)
        report.violations.append(f"check {report.checks}: {len(lost)} committed images lost, "
                                 f"e.g. {sorted(lost)[:3]}")
    return seen_paths | live_paths


def _check_rows(folder: Path, manifest: dict[str, Any], db: sqlite3.Connection,
                generation: Any, report: CrashLoopReport) -> set[str]:
    problems: list[str] = []
    for modality, plural in PLURAL.items():
        index = faiss.read_index(str(folder / f"{plural}.faiss"))
        mapped = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else None
        stored = np.load(folder / f"{plural}.ids.npy")
        rows = [r[0] for r in db.execute("SELECT id FROM items WHERE modality = ?", [modality])]
        live = {r[0] for r in db.execute(
            "SELECT id FROM items WHERE modality = ? AND deleted = 0", [modality])}
        for label, ids in (("faiss id map", mapped), (".ids.npy", stored), ("sqlite", rows)):
            if ids is None:
                continue
            if len(set(np.asarray(ids).tolist())) != len(ids):
                report.duplicates += len(ids) - len(set(np.asarray(ids).tolist()))
                problems.append(f"{plural} {label} has duplicate ids")
            if set(np.asarray(ids).tolist()) != set(rows):
                problems.append(f"{plural} {label} ids differ from sqlite's")
        if manifest["modalities"][modality]["live"] != len(live):
            problems.append(f"{plural}: manifest live {manifest['modalities'][modality]['live']}"
                            f" != {len(live)} live sqlite rows")
        if live:
            queries = np.random.default_rng(report.checks).normal(
                size=(4, generation.embed_dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            _, found = generation.search(modality, queries, 10)
            stray = set(found.ravel().tolist()) - live
            if stray:
                problems.append(f"{plural} search returned ids that are not live: {sorted(stray)}")
    paths = [r[0] for r in db.execute(
        "SELECT path FROM items WHERE modality = 'image' AND deleted = 0")]
    repeated = {p: n for p, n in Counter(paths).items() if n > 1}
    if repeated:
        report.duplicates += sum(n - 1 for n in repeated.values())
        problems.append(f"image paths stored twice: {sorted(repeated)[:3]}")
    report.violations += [f"check {report.checks} ({folder.name}): {p}" for p in problems]
    return set(paths)


def _command(operation: str, targets: list[Path] | list[str], index: Path,
             config: CrashLoopConfig, workers: int) -> list[str]:
    job = ["--model", config.model, "--device", "cpu", "--workers", str(workers),
           "--shard-size", str(config.shard_size)]
    base = [sys.executable, "-m", "clipdex", "index"]
    if operation == "build":
        engine = ["--engine", "ray"] if config.engine == "ray" else []
        return [*base, "build", *map(str, targets), "--out", str(index), *job, *engine]
    if operation == "delete":
        return [*base, "delete", "--index", str(index), "--path", *map(str, targets)]
    return [*base, "add", *map(str, targets), "--index", str(index), *job]


def _next_operation(rng: random.Random, index: Path, folders: list[Path],
                    seen: set[str]) -> tuple[str, list[Path] | list[str]]:
    """A build of everything, an add of some folders, or a delete of a few committed images
    (so that later adds have work to do)."""
    if not (index / "CURRENT").exists():
        return "build", folders
    draw = rng.random()
    if draw < 0.3:
        return "build", folders
    if draw < 0.55 and len(seen) > 8:
        return "delete", rng.sample(sorted(seen), rng.randint(1, 8))
    return "add", rng.sample(folders, rng.randint(1, len(folders)))


def _run(command: list[str], fault: str | None,
         kill_after: float | None) -> tuple[int, bool, str]:
    """Run one job; SIGKILL it after `kill_after` s. Returns (exit code, killed by us, the
    end of its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("CLIPDEX_FAULT", None)
    if fault:
        env["CLIPDEX_FAULT"] = fault
    # its own session: the processes it starts (DataLoader workers, a local Ray) are its group
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=kill_after)
        return process.returncode, False, stderr.decode(errors="replace")[-500:]
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        # it may have exited on its own just before the signal
        return process.returncode, process.returncode == -signal.SIGKILL, ""
    finally:
        _reap(process.pid)


def _reap(group: int) -> None:
    """SIGKILL what is left of a job's process group (a killed Ray driver leaves Ray's agents
    running for a minute)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def crash_loop(config: CrashLoopConfig, log: Any = None) -> CrashLoopReport:
    """Run the loop; `log(message)` hears about every run (e.g. print for the soak runner)."""
    started = time.perf_counter()
    rng = random.Random(config.seed)
    folders = make_corpus(config)
    index = config.workdir / "index"
    report = CrashLoopReport(expected_images=config.folders * config.images_per_folder)
    # How long an uninterrupted build takes here, so kills spread over a job's whole life.
    scratch = config.workdir / "calibration"
    began = time.perf_counter()
    code, _, stderr = _run(_command("build", folders, scratch, config, 0), None, None)
    if code != 0:
        raise RuntimeError(f"the calibration build into {scratch} failed with exit code {code}: "
                           f"{stderr}")
    full = time.perf_counter() - began
    seen: set[str] = set()
    run = 0
    while report.killed_at_random_time < config.kills and run < 3 * config.kills:
        operation, targets = _next_operation(rng, index, folders, seen)
        if operation == "delete":  # these may vanish now, whether or not the delete lands
            seen -= set(targets)
        fault = rng.choice(FAULT_POINTS) if rng.random() < config.fault_share else None
        if operation == "delete" and fault and fault.startswith("after_shard"):
            fault = "before_current"  # a delete encodes nothing, so has no shards
        kill_after = None if fault else rng.uniform(*config.kill_window) * full
        command = _command(operation, targets, index, config, rng.choice((0, 0, 2)))
        code, killed, stderr = _run(command, fault, kill_after)
        report.runs += 1
        report.operations[operation] = report.operations.get(operation, 0) + 1
        if killed:
            report.killed_at_random_time += 1
        elif code == -signal.SIGKILL and fault:
            report.killed_at_fault_point += 1
        elif code == 0:
            report.finished_before_kill += 1
        else:
            report.failed += 1
            report.violations.append(f"run {run}: {operation} exited with {code}: {stderr}")
        seen = check_index(index, seen, report)
        outcome = ("killed" if killed else "fault point" if code == -signal.SIGKILL
                   else "finished" if code == 0 else "failed")
        report.history.append({"run": run + 1, "operation": operation, "fault": fault,
                               "outcome": outcome, "committed": len(seen)})
        if log:
            log(f"run {run + 1} (kill {report.killed_at_random_time}/{config.kills}): "
                f"{operation} {'at ' + fault + ' ' if fault else ''}exit {code}"
                f"{' (killed)' if killed else ''}; {len(seen)} images committed")
        run += 1
    # Resume: adding every folder must top the index up to exactly the corpus, no more.
    final = "add" if (index / "CURRENT").exists() else "build"
    code, _, stderr = _run(_command(final, folders, index, config, 0), None, None)
    if code != 0:
        report.failed += 1
        report.violations.append(f"final {final} exited with {code}: {stderr}")
    seen = check_index(index, seen, report)
    with open_generation(index) as generation:
        report.final_images = generation.count("image")
    report.leftover_work_dirs = sum(1 for p in (index / "work").iterdir()) \
        if (index / "work").is_dir() else 0
    report.seconds = round(time.perf_counter() - started, 1)
    return report


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipdex-crash-") as tmp:
        result = crash_loop(CrashLoopConfig(Path(tmp), kills=args.kills), log=print)
    print(json.dumps(result.as_dict(), indent=2))
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    sys.exit(0 if result.ok else 1)
