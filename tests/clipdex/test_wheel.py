"""`pip install clipdex` works without the checkout: the wheel carries the default model, its
card, the demo captions and the page, and `clipdex demo` runs from the installed copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("retrieval/models/bundled/clipdex-default.safetensors",
           "retrieval/models/bundled/clipdex-default.card.json", "retrieval/inputs/demo-captions.csv",
           "retrieval/models/configs/clipdex-effnet-minilm.json", "api/static/index.html",
           "clipdex/main.py")


def _run(*argv: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                          **options)


def _copy_sources(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them, plus new files not yet committed (git
    ignores neither): setuptools writes build/ and *.egg-info into the tree it builds, and a
    stale build/ (files that moved away stay there) would ship in the wheel."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                  cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _build_outputs(root: Path) -> dict[str, int]:
    """What a setuptools build leaves in the tree it builds: the top-level names, and every
    file under build/ and *.egg-info with its modification time."""
    found = {path.name: 0 for path in root.iterdir()}
    for folder in [root / "build", *root.glob("*.egg-info")]:
        for path in folder.rglob("*"):
            found[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return found


def test_the_wheel_carries_the_default_model_and_runs_the_demo(tmp_path):
    checkout = _build_outputs(ROOT)
    sources = _copy_sources(tmp_path / "sources")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", str(tmp_path / "dist"), str(sources))
    assert built.returncode == 0, built.stderr[-3000:]
    assert _build_outputs(ROOT) == checkout  # the build wrote nothing into the checkout
    [wheel] = (tmp_path / "dist").glob("clipdex-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names
    assert not any(name.split("/")[0] in ("tests", "bench", "data", "scripts") for name in names)

    site = tmp_path / "site"  # installed apart from the checkout; the venv gives the deps
    installed = _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                     str(site), str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = _run(sys.executable, "-c", "import retrieval.models.loading as m; print(m.DEFAULT_CHECKPOINT)",
                 cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    demo = _run(sys.executable, "-m", "clipdex", "demo", "-k", "3", "a cat", cwd=tmp_path,
                env=env)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "query: 'a cat'" in demo.stdout and "  1. " in demo.stdout and "  3. " in demo.stdout
