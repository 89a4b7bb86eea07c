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
    """No file over 400 lines, no function over 50, in the packages (STYLE.md)."""
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
    assert too_big == []


def test_tests_import_no_other_test_module():
    """Shared code lives in conftest.py or a helpers module, never in another test file."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                last = node.module.split(".")[-1]
                if node.module.startswith("tests.") and last.startswith("test_"):
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert offenders == []
