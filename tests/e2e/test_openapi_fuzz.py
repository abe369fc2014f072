"""schemathesis against the live `/openapi.json` of a frontend with one mocker worker: a bounded number
of generated requests per operation, and not one 5xx other than 503 (no worker can take it); every
response's status code, content type and body as the document says."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.e2e.conftest import MODEL, Stack, wait_instances
from turbine.frontend.openapi import spec

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("openapi_fuzz")]

EXAMPLES = 30
# Generated values are unbounded; keep each generation short so the run stays within seconds.
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = Stack(tmp_path_factory.mktemp("openapi-fuzz"))
    try:
        _, url = stack.frontend("--max-request-body-bytes", "65536")
        stack.worker("--engine", "mocker", "--speedup-ratio", "1000")
        wait_instances(url, 1)
        yield url
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def api_schema(served: str) -> OpenApiSchema:
    return schemathesis.openapi.from_url(served + "/openapi.json")


def _steer(body: dict[str, Any]) -> None:
    """Most generated bodies name the served model (random names only ever get a 404), and none asks
    for more than MAX_TOKENS tokens."""
    model = body.get("model")
    if isinstance(model, str) and len(model) % 4:
        body["model"] = MODEL
    bounded = False
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and value > MAX_TOKENS:
            body[key] = 1 + value % MAX_TOKENS
        bounded = bounded or type(body.get(key)) is int
    if not bounded:
        body["max_tokens"] = MAX_TOKENS


def _check(case: Case[Any], base_url: str) -> None:
    if isinstance(case.body, dict):
        _steer(case.body)
    started = time.monotonic()
    response = case.call(base_url=base_url, timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code < 500 or response.status_code == 503, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    )
    assert elapsed < 10, f"{case.method} {case.path} took {elapsed:.1f}s"
    case.validate_response(
        response,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )


OPERATIONS = [
    (method.upper(), path, mode)
    for path, item in spec()["paths"].items()
    for method in item
    if method != "parameters"
    for mode in (
        [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == "post" else [GenerationMode.POSITIVE]
    )
]


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_openapi_fuzz(
    api_schema: OpenApiSchema, served: str, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case[Any]) -> None:
        _check(case, served)

    run()
