"""The search page in a real headless Chromium against a real uvicorn server: ?q=red runs a
text search on load and the results appear in the DOM."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from api.app import create_app
from api.settings import Settings
from tests.api.helpers import ServerThread, build_index
from tests.conftest import COLOURS, make_image


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True,
                       timeout=600, check=False)
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); "
                "the browser test needs /usr/bin/chromium")


def _dump_dom(browser: str, url: str, profile) -> str:
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--dump-dom", "--virtual-time-budget=10000", url],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_page_runs_a_search_from_the_query_string(tiny, tmp_path):
    browser = _chromium()
    images = {name: make_image(tmp_path / "img" / f"{name}.png", rgb)
              for name, rgb in COLOURS.items()}
    root = build_index(tmp_path / "index", tiny, images)
    with ServerThread(create_app(Settings(index=root), clip=tiny)) as server:
        dom = _dump_dom(browser, f"{server.url}/?q=red", tmp_path / "profile")
        assert dom.count('class="hit"') == len(COLOURS), dom[-3000:]
        assert "/items/" in dom and "/image" in dom  # images come from the item image endpoint
        assert "results from" in dom
        # the filter box, filled from the query string: one match, its fields shown
        filtered = _dump_dom(browser, f"{server.url}/?q=blue&field=label&op=eq&value=red",
                             tmp_path / "profile")
        assert filtered.count('class="hit"') == 1, filtered[-3000:]
        assert 'label: "red"' in filtered
