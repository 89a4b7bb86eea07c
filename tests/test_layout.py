"""Imports flow one way: indexer -> retrieval <- api; the core imports neither (the full
contracts are import-linter's, in pyproject.toml). Modules and functions stay small."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_packages(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_retrieval_imports_neither_api_nor_indexer():
    assert not _imported_packages("retrieval") & {"api", "indexer"}


def test_api_and_indexer_do_not_import_each_other():
    assert "indexer" not in _imported_packages("api")
    assert "api" not in _imported_packages("indexer")


def test_api_does_not_import_training_code():
    for path in (ROOT / "api").rglob("*.py"):
        assert "retrieval.train" not in path.read_text(), path


def test_modules_and_functions_stay_small():
    """No file over 400 lines, no function over 50, in the packages (STYLE.md). The limits are
    guides that flag a module or function doing too much; concepts decide where to cut it, so
    a file past the limit is split along its concepts, never at a line count."""
    too_big = []
    for package in ("retrieval", "indexer", "api", "clipdex"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > 400:
                too_big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > 50:
                        too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                       f"{length} lines")
    assert too_big == [], ("past the size guide: split along concepts (one concept per "
                           "module, one job per function), not at a line count")


def test_tests_import_no_other_test_module():
    """Shared code lives in conftest.py, tests/support or a helpers module, never in another
    test file."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                last = node.module.split(".")[-1]
                if node.module.startswith("tests.") and last.startswith("test_"):
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert offenders == []


def _imported_names(path: Path) -> set[str]:
    """Every name a file imports by its absolute dotted path (`from a.b import c`: "a.b.c"),
    in functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_core_tests_do_not_use_the_service_tests_helpers():
    """The core's and the indexer's tests share code through tests/support, not tests/api:
    they must run, and read, without the service's test helpers."""
    offenders = []
    for package in ("tests/retrieval", "tests/indexer"):
        for path in (ROOT / package).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in _imported_names(path)
                          if name == "tests.api" or name.startswith("tests.api.")]
    assert offenders == []
