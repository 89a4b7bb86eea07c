"""`clipdex serve` reads every service setting from the environment: a flag wins, then the
variable, then the default (Settings', or derived from the device). A real service started
with the environment listens where it says, links where it says and batches as told."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from clipdex.commands.serve import (
    CPU_MAX_BATCH,
    IN_FLIGHT_PER_BATCH,
    add_arguments,
    settings_from,
)
from clipdex.main import build_parser
from tests.conftest import COLOURS, make_image
from tests.support.colours import build_index
from tests.support.process import start, stop, wait_ready

CLIPDEX = Path(sys.executable).parent / "clipdex"
# The tiny model on torch (no ONNX export to wait for), named by the environment as well.
MODEL_ENV = {"CLIPDEX_MODEL": "clipdex-tiny", "CLIPDEX_DEVICE": "cpu",
             "CLIPDEX_BACKEND": "torch"}


@pytest.fixture(scope="module")
def index_root(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    images = {name: make_image(folder / f"{name}.png", rgb) for name, rgb in COLOURS.items()}
    return build_index(tmp_path_factory.mktemp("index"), tiny, images)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def serve(env: dict[str, str], *flags: str, log: Path) -> Iterator[subprocess.Popen]:
    """`clipdex serve` with only `env` of the CLIPDEX_ variables; stopped on leaving."""
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith("CLIPDEX_")}
    process = start([str(CLIPDEX), "serve", *flags], log, env={**clean, **MODEL_ENV, **env})
    try:
        yield process
    finally:
        stop(process)


def text_batch_sizes(metrics: str) -> tuple[float, float]:
    """(text batches of at most 2 inputs, all text batches) from the exposition text."""
    def value(pattern: str) -> float:
        return float(re.search(pattern + r" (\S+)", metrics).group(1))

    return (value(r'clipdex_batch_size_bucket\{kind="text",le="2\.0"\}'),
            value(r'clipdex_batch_size_count\{kind="text"\}'))


def test_the_environment_configures_the_running_service(index_root, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = {"CLIPDEX_PORT": str(port), "CLIPDEX_PUBLIC_URL": "https://x.example",
           "CLIPDEX_BATCHING__MAX_BATCH": "2", "CLIPDEX_BATCHING__QUEUE_SIZE": "50"}
    with serve(env, "--index", str(index_root), log=log) as process:
        wait_ready(port, process, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            hits = http.post("/search/text", json={"text": "a red square", "k": 3}).json()["hits"]
            assert len(hits) == 3
            assert all(hit["image_url"].startswith("https://x.example/items/") for hit in hits)
            # Six labels go to the text batcher at once; none may share a call with more
            # than one other (the CPU default, 8, would let them share one call).
            labels = ["red", "green", "blue", "dog", "cat", "house"]
            image = make_image(tmp_path / "query.png", COLOURS["red"]).read_bytes()
            answer = http.post("/classify", data={"labels": labels},
                               files={"image": ("query.png", image)})
            assert answer.status_code == 200, answer.text
            small, batches = text_batch_sizes(http.get("/metrics").text)
            assert batches >= 4 and small == batches  # 1 query + 6 labels, at most 2 a call
    said = log.read_text()
    assert f"127.0.0.1:{port}, batches of up to 2 inputs, 50 queued at most" in said
    assert "8 requests in flight" in said  # 4 x the batch size the environment set


def settings(*flags: str) -> Settings:
    return settings_from(build_parser().parse_args(["serve", "--index", "idx", *flags]))


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CLIPDEX_ variable but those a test sets."""
    for name in os.environ:
        if name.startswith("CLIPDEX_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_a_flag_beats_the_environment_which_beats_the_defaults(environment):
    environment.setenv("CLIPDEX_PORT", "9001")
    environment.setenv("CLIPDEX_HOST", "0.0.0.0")
    environment.setenv("CLIPDEX_WATCH_SECONDS", "3")
    made = settings("--port", "9002", "--device", "cpu")
    assert (made.port, made.host, made.watch_seconds) == (9002, "0.0.0.0", 3.0)
    assert settings("--watch", "1").watch_seconds == 1.0
    assert settings().max_depth == Settings().max_depth  # neither: Settings' own default


def test_each_batching_variable_is_read_and_flags_override_one_at_a_time(environment):
    environment.setenv("CLIPDEX_BATCHING__MAX_WAIT_MS", "4")
    environment.setenv("CLIPDEX_BATCHING__QUEUE_SIZE", "20")
    environment.setenv("CLIPDEX_BATCHING__MAX_QUEUE_WAIT_MS", "0")
    made = settings("--queue-size", "30")
    assert made.batching.max_wait_ms == 4.0 and made.batching.queue_size == 30
    assert made.batching.max_queue_wait_ms is None  # 0 turns it off, as the flag's 0 does


def test_device_defaults_apply_only_where_nothing_was_set(environment):
    cpu = settings("--device", "cpu")
    assert (cpu.batching.max_batch, cpu.max_in_flight) == (
        CPU_MAX_BATCH, IN_FLIGHT_PER_BATCH * CPU_MAX_BATCH)
    assert cpu.backend == "auto"  # the command line's, where the library says torch
    environment.setenv("CLIPDEX_BATCHING__MAX_BATCH", "3")
    environment.setenv("CLIPDEX_BACKEND", "torch")
    made = settings("--device", "cuda")
    assert (made.batching.max_batch, made.max_in_flight, made.backend) == (3, 12, "torch")
    environment.setenv("CLIPDEX_MAX_IN_FLIGHT", "5")
    assert settings("--max-batch", "6").max_in_flight == 5
    assert settings("--max-in-flight", "0").max_in_flight is None  # 0: no cap


def test_the_index_may_come_from_the_environment(environment):
    with pytest.raises(SystemExit, match="CLIPDEX_INDEX"):
        settings_from(build_parser().parse_args(["serve"]))
    environment.setenv("CLIPDEX_INDEX", "/srv/pictures.idx")
    assert settings_from(build_parser().parse_args(["serve"])).index == Path("/srv/pictures.idx")


def test_the_help_shows_the_settings_defaults_and_variables():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    defaults = Settings()
    for flag, variable, default in (
            ("--port", "CLIPDEX_PORT", defaults.port),
            ("--host", "CLIPDEX_HOST", defaults.host),
            ("--queue-size", "CLIPDEX_BATCHING__QUEUE_SIZE", defaults.batching.queue_size),
            ("--max-body-mb", "CLIPDEX_MAX_BODY_BYTES", defaults.max_body_bytes // 2**20)):
        assert re.search(rf"{flag} \S+ [^-]*\(default: {re.escape(str(default))}, or env "
                         rf"{variable}\)", text), flag
