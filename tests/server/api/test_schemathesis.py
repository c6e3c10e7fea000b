"""Schemathesis against the live server's OpenAPI schema: no 5xx, every response (errors
included) conforms to the documented status codes, content types and schemas. Bounded for CI:
a few examples per operation, the session, inference and v2 operations."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from tests.server.conftest import live_server  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed(backbone, tmp_path_factory):
    # small limits so generated bodies stay cheap; a wal store so persistence paths are fuzzed too
    with live_server(backbone, tmp_path_factory.mktemp("fuzz"), durability="wal", max_instances=4,
                     max_body_bytes=64_000, max_classes=8, max_top_k=5, max_episodic_steps=3) as srv:
        with srv.client() as c:  # a session the generated ids may hit
            c.post("/v1/sessions", json={"rule": "sgd", "classes": ["a", "b"], "id": "a"})
        yield srv


OPERATIONS = r"^/(v1/(sessions|predict|adapt)|v2/models/\{name\}/infer)"


def steer(case) -> None:
    """Point generated ids at things that exist on every other case, so the fuzzer reaches the
    code behind the 404s and 422s too (valid sessions, the served model, a known rule)."""
    flip = hash(repr(case.body)) % 2 == 0
    if case.path_parameters:
        if "name" in case.path_parameters:
            case.path_parameters["name"] = "fwserve-mnist-vit"
        if flip and "session_id" in case.path_parameters:
            case.path_parameters["session_id"] = "a"
    if flip and isinstance(case.body, dict):
        if "rule" in case.body:
            case.body["rule"] = "sgd"
        if "session_id" in case.body:
            case.body["session_id"] = "a"


def test_api_conforms(fuzzed):
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    ops = [r.ok() for r in schema.include(path_regex=OPERATIONS).get_all_operations()]
    assert len(ops) >= 8
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            steer(case)
            case.call_and_validate(base_url=fuzzed.url, checks=CHECKS)

        run()
