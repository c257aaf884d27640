"""The contract: openapi/openapi.json matches the code, and the live server
honours it under schemathesis' generated (valid and invalid) requests."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from gateway.cli import openapi_spec

from .conftest import MODEL_NAME, ROOT, Gateway

SPEC = ROOT / "openapi" / "openapi.json"


def test_checked_in_spec_matches_the_code():
    assert SPEC.read_text() == openapi_spec(), (
        "openapi/openapi.json is stale: run `mlx-gateway openapi -o openapi/openapi.json`"
    )


def test_spec_documents_400_not_422():
    spec = json.loads(SPEC.read_text())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "503"} <= set(chat)


@pytest.fixture(scope="module")
def live_schema(tiny_model, tmp_path_factory):
    gw = Gateway(
        tiny_model,
        "--max-tokens-cap",
        "24",
        "--request-timeout",
        "60",
        log=tmp_path_factory.mktemp("schemathesis") / "gateway.log",
    )
    gw.wait_ready()
    yield schemathesis.openapi.from_url(gw.url + "/openapi.json")
    gw.stop()


CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.negative_data_rejection,
]


def test_api_honours_its_spec(live_schema):
    operations = [result.ok() for result in live_schema.get_all_operations()]
    assert len(operations) >= 6
    paths = {operation.path for operation in operations}
    # The agent-facing surfaces are fuzzed like the rest.
    assert {
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/messages",
        "/v1/messages/count_tokens",
    } <= paths, paths
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case):
            # Aim half of the bodies at the served model, so generation runs too.
            body = case.body
            if (
                isinstance(body, dict)
                and isinstance(body.get("model"), str)
                and len(body["model"]) % 2 == 0
            ):
                body["model"] = MODEL_NAME
            case.call_and_validate(checks=CHECKS, timeout=60)

        run()
