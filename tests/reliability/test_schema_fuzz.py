"""Schemathesis over the running service's OpenAPI schema (every phase, every check, a fixed
seed, a few examples per operation): no server errors, no answer outside the schema, no failed
check. `python -m tests.reliability.schema_fuzz --max-examples 100` is the long run."""

from __future__ import annotations

import pytest

from tests.reliability.schema_fuzz import describe, fuzz_target, run_schemathesis

MAX_EXAMPLES = 8  # per operation and phase: ~700 requests, well under a minute
SEED = 7


@pytest.fixture(scope="module")
def fuzz(tiny, tmp_path_factory):
    """One Schemathesis run against a live service, summarised."""
    tmp = tmp_path_factory.mktemp("schema-fuzz")
    with fuzz_target(tmp, clip=tiny) as service:
        return run_schemathesis(service.url, MAX_EXAMPLES, SEED, tmp / "reports",
                                headers=service.headers)


def test_every_operation_is_exercised_in_every_phase(fuzz):
    assert not fuzz["errors"], fuzz["errors"]
    assert fuzz["operations"]["tested"] == fuzz["operations"]["selected"] >= 17
    assert fuzz["phases"] == {"examples": "success", "coverage": "success",
                              "fuzzing": "success", "stateful": "success"}, describe(fuzz)
    assert fuzz["cases"] > 300 and fuzz["responses"].get("2xx", 0) > 50, fuzz["responses"]


def test_no_request_makes_a_server_error(fuzz):
    assert fuzz["server_errors"] == 0, describe(fuzz)


def test_every_answer_matches_the_schema(fuzz):
    # status codes, content types, bodies and headers all as the OpenAPI schema declares
    assert fuzz["schema_violations"] == 0, describe(fuzz)


def test_no_check_fails(fuzz):
    # the rest of Schemathesis's checks too: invalid input refused, valid input accepted,
    # undeclared methods 405, and the service's validator agreeing with its own schema
    assert fuzz["failing_cases"] == [], describe(fuzz)
    assert fuzz["exit_code"] == 0, describe(fuzz)
