"""serve's API fuzzed from its own OpenAPI document (Schemathesis, in process): no 5xx ever, every error in
OpenAI's shape, every response as documented. SCRATCHGPT_FUZZ_EXAMPLES=N runs N examples per operation
instead of the quick default (README: Reliability)."""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from conftest import count_fuzz, load_lm  # noqa: E402
from scratchgpt.serve import create_app  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("SCRATCHGPT_FUZZ_EXAMPLES") or 0) or 40


@pytest.fixture(scope="module")
def app(tiny_run):
    model, tok, config = load_lm(tiny_run)
    # a small token limit keeps each generated example quick; the schema states it, so the fuzzer knows it
    return create_app(model, tok, config, name="tiny", max_tokens_limit=8, api_key=KEY, max_queue=4,
                      request_timeout=30)


@pytest.fixture(scope="module")
def api_schema(app):
    # Schemathesis's expected refusals of schema-violating requests, plus 413: a body too large for the server
    # is refused before it is read (a 5xx still fails: the test asserts < 500 itself)
    refusals = schemathesis.Config.from_dict({}).projects.default.checks.negative_data_rejection.expected_statuses
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": [*refusals, "413"]}}})
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH, config=config)


def _openai_error(response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and {"param", "code"} <= set(body["error"])


def check_case(case) -> None:
    response = case.call(headers=AUTH)
    key = f"{case.method} {case.path}"
    count_fuzz("serve", key)
    count_fuzz("serve", str(response.status_code))
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        _openai_error(response)
    # every other Schemathesis check; "schema-valid data is accepted" can't hold where the rules are about content
    # a schema can't state (a char tokenizer's alphabet, the last message being the user's, stream with n=1)
    case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_api_from_its_schema(api_schema, mode):
    """Every operation of the OpenAPI document, with data that follows the schema and data that breaks it.
    (Schemathesis's plain API with Hypothesis, not its pytest plugin, so pytest upgrades can't break it.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    fuzzed = []
    for operation in operations:
        fuzz = given(case=operation.as_strategy(mode))(check_case)
        try:
            settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("SCRATCHGPT_FUZZ_EXAMPLES"),
                     suppress_health_check=list(HealthCheck), database=None)(fuzz)()
            fuzzed.append(operation.path)
        except Unsatisfiable:  # negative mode: an operation with no input (GET /health) has nothing to break
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.path
    assert {"/v1/completions", "/v1/chat/completions"} <= set(fuzzed)


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/completions", "/v1/chat/completions"])
def test_unexpected_methods_are_405_in_openai_shape(app, path):
    from fastapi.testclient import TestClient

    client = TestClient(app)
    for method in ("PUT", "PATCH", "DELETE", "TRACE"):
        response = client.request(method, path, headers=AUTH)
        assert response.status_code == 405 and response.headers.get("allow"), (method, path)
        _openai_error(response)
