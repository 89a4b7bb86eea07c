"""A real `clipdex serve` process for the tests that need one: started with its output in a
log, waited on until /readyz answers 200 (or it dies, which the error shows), stopped."""

from __future__ import annotations

import http.client
import subprocess
import time
from pathlib import Path


def get_status(port: int, path: str, timeout: float = 5.0) -> int:
    """Status of GET `path` on loopback, 0 when the service cannot be reached."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


def start(command: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """`command` in the background, its stdout and stderr into `log`."""
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the service on `port` says it is ready; its log's tail when it exits or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited ({process.returncode}):\n"
                               f"{log.read_text()[-3000:]}")
        if get_status(port, "/readyz") == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the service was not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `timeout`."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
