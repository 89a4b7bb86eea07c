"""The README's five-minute tour, run as written: its `clipdex` commands through this venv's
`clipdex`, its curl calls against a real `clipdex serve`, its Python snippet, on a few demo
photographs in a temporary folder. Only the paths and the port are swapped (`swaps` in the
`tour` fixture), so the front door cannot drift from what clipdex does. `make run` itself is
not run (it makes a venv); the Makefile is checked for the targets and address the README names.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from retrieval.inputs.demo import ensure_demo_corpus
from tests.support.process import start, stop

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
CLIPDEX = Path(sys.executable).parent / "clipdex"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")  # a few demo photographs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tour_blocks(language: str) -> list[str]:
    """The fenced blocks tagged `language` in the README's tour section."""
    section = README.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def tour_commands() -> list[str]:
    """The tour's shell commands in order, continuation lines joined."""
    text = "\n".join(tour_blocks("sh")).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def swapped(command: str, swaps: dict[str, str]) -> list[str]:
    """`command` with the README's paths replaced by the test's, split as a shell would."""
    for written, actual in swaps.items():
        command = command.replace(written, actual)
    return shlex.split(command, comments=True)


def test_the_tour_holds_only_commands_this_test_runs():
    commands = tour_commands()
    unknown = [c for c in commands
               if not c.startswith(("make run", "curl ", ".venv/bin/clipdex "))]
    assert unknown == [], "teach tests/test_readme.py to run these"
    assert sum(c.startswith("curl ") for c in commands) >= 3
    assert any(" index build " in c for c in commands) and any(" search " in c for c in commands)
    assert len(tour_blocks("python")) == 1


def test_the_makefile_has_the_targets_and_address_the_readme_names():
    targets = set(re.findall(r"^([\w-]+):", MAKEFILE, flags=re.MULTILINE))
    named = set(re.findall(r"^make ([\w-]+)", README, flags=re.MULTILINE))
    assert {"run", "test"} <= named <= targets
    assert re.search(r"^DEMO_INDEX := data/demo-index$", MAKEFILE, flags=re.MULTILINE)
    run = MAKEFILE.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "serve --index $(DEMO_INDEX) --host 127.0.0.1 --port 8000" in run


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (code blocks hold no headings)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)}


def test_the_links_of_the_readme_and_its_pages_lead_somewhere():
    """Every relative link of the README, and of the docs pages it links to, names a file
    that exists and, after #, a heading of that file."""
    pages, broken, seen = [ROOT / "README.md"], [], set()
    while pages:
        page = pages.pop()
        seen.add(page)
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif linked.suffix == ".md" and linked not in seen and linked.parent == ROOT / "docs":
                pages.append(linked)
    assert broken == []


# --- the tour, run ---


def lay_out_photos(folder: Path, scratch: Path) -> Path:
    """The demo photographs in PHOTOS, each with its captions as a NAME.txt sidecar, in a
    folder as someone's own would be."""
    manifest = ensure_demo_corpus(scratch)
    captions: dict[str, list[str]] = {}
    with manifest.open(newline="") as rows:
        for row in csv.DictReader(rows):
            captions.setdefault(row["image"], []).append(row["caption"])
    folder.mkdir()
    for name in PHOTOS:
        shutil.copyfile(scratch / name, folder / name)
        (folder / name).with_suffix(".txt").write_text("\n".join(captions[name]) + "\n")
    return folder


def run_clipdex(commands: list[str], swaps: dict[str, str], cwd: Path
                ) -> dict[str, subprocess.CompletedProcess]:
    return {command: subprocess.run(swapped(command, swaps), cwd=cwd, env=ENV, check=False,
                                    capture_output=True, text=True, timeout=120)
            for command in commands}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Tour:
    folder: Path
    index: Path
    swaps: dict[str, str]
    service_log: Path
    service: subprocess.Popen | None = None
    built: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    rest: Future | None = None  # the commands after the build, running in order meanwhile

    def outputs(self) -> dict[str, subprocess.CompletedProcess]:
        """Each clipdex command of the tour and what it did, once all have run."""
        return {**self.built, **(self.rest.result() if self.rest else {})}


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Iterator[Tour]:
    """The tour's clipdex commands in order up to the one that builds the index; then the
    service starts and the other commands run in order in the background, so that each
    process loads its model beside the others rather than after them."""
    tmp = tmp_path_factory.mktemp("tour")
    folder = lay_out_photos(tmp / "Pictures", tmp / "demo")
    index, port = tmp / "pictures.idx", free_port()
    swaps = {"~/Pictures": str(folder), "~/pictures.idx": str(index),
             "data/demo-index": str(index), ".venv/bin/clipdex": str(CLIPDEX),
             "127.0.0.1:8000": f"127.0.0.1:{port}"}
    state = Tour(folder, index, swaps, tmp / "serve.log")
    commands = [c for c in tour_commands() if c.startswith(".venv/bin/clipdex ")]
    with ThreadPoolExecutor(1) as background:
        try:
            while commands and not (index / "CURRENT").exists():
                state.built |= run_clipdex([commands.pop(0)], swaps, tmp)
            if (index / "CURRENT").exists():
                state.service = start_service(index, port, state.service_log)
            state.rest = background.submit(run_clipdex, commands, swaps, tmp)
            yield state
        finally:
            stop(state.service)


def start_service(index: Path, port: int, log: Path) -> subprocess.Popen:
    """`clipdex serve` as `make run` starts it, on a free loopback port."""
    return start([str(CLIPDEX), "serve", "--index", str(index), "--host", "127.0.0.1",
                  "--port", str(port)], log, env=ENV, cwd=index.parent)


def wait_ready(tour: Tour, timeout: float = 90) -> None:
    assert tour.service is not None, f"no index was built: {tour.outputs()}"
    url = f"http://{tour.swaps['127.0.0.1:8000']}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert tour.service.poll() is None, tour.service_log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5):
                return  # 200; a 503 (still loading) raises
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"not ready in {timeout} s:\n{tour.service_log.read_text()[-3000:]}")


def test_the_library_snippet_prints_ranked_hits(tour, capsys):
    snippet = tour_blocks("python")[0]
    for written, actual in tour.swaps.items():
        snippet = snippet.replace(written, actual)
    code = compile(snippet, "README.md (the tour's python block)", "exec")
    exec(code, {})  # noqa: S102 - the README's own snippet, run as a reader would run it
    lines = [line.rsplit(" ", 1) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == len(PHOTOS)  # k=5 images asked, the folder holds 4
    assert {Path(path).parent for _, path in lines} == {tour.folder.resolve()}
    scores = [float(score) for score, _ in lines]
    assert scores == sorted(scores, reverse=True)


def test_the_curl_calls_answer_from_a_running_service(tour):
    wait_ready(tour)
    answers = {}
    for command in (c for c in tour_commands() if c.startswith("curl ")):
        argv = [*swapped(command, tour.swaps), "-w", "\n%{http_code}"]  # the status, last
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
        body, _, status = result.stdout.rpartition("\n")
        assert (result.returncode, status) == (0, "200"), f"{command}\n{result.stdout}"
        address = next(part for part in argv if part.startswith("127.0.0.1:"))
        answers["/" + address.split("/", 1)[1]] = json.loads(body)
    hits = answers["/search/text"]["hits"]
    assert len(hits) == 3 and hits[0]["metadata"]["file_name"] == "chelsea.png"  # "a cat"
    assert answers["/items/1"]["id"] == 1
    assert answers["/readyz"]["status"] == "ready"
    assert answers["/readyz"]["images"] == len(PHOTOS)


def test_every_clipdex_command_of_the_tour_succeeds(tour):
    assert tour.outputs(), "the tour runs no clipdex command"
    for command, result in tour.outputs().items():
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


def test_the_build_indexes_the_folder_and_search_lists_its_photographs(tour):
    build, search = (next(result for command, result in tour.outputs().items() if part in command)
                     for part in (" index build ", " search "))
    report = json.loads(build.stdout)
    captions = sum(len(path.read_text().splitlines()) for path in tour.folder.glob("*.txt"))
    assert (report["images"], report["texts"]) == (len(PHOTOS), captions)
    rows = [line.split() for line in search.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == [str(rank) for rank in range(1, len(PHOTOS) + 1)]
    assert {Path(row[-1]).name for row in rows} == set(PHOTOS)
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
