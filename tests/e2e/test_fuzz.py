"""Schemathesis fuzzing of every operation of /openapi.json against a real server on the fake engine.

The server is the real thing (`python pure_model_api.py`, waitress, SQLite) with the scripted
engine, so thousands of requests take seconds. Schemathesis generates both schema-valid and
schema-violating requests; none may get a server error (a 503 for overload is allowed), and every
answer must match what the document says (status codes, content types, bodies, errors).

The schema object is built by the same `build_spec()` the server serves, from an app like the
server's, so that the tests can be parametrized at collection time (schemathesis' lazy
`from_fixture` loader does not work with this pytest); `test_the_served_document_is_the_one_fuzzed`
checks that the server serves exactly it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from pureapi.api.openapi import build_spec
from pureapi.app import create_app
from pureapi.settings import Settings

from ..conftest import Server, start_server

pytestmark = pytest.mark.real

EXAMPLES = 40
OPERATIONS = {
    ("POST", "/chat"),
    ("POST", "/reset"),
    ("GET", "/status"),
    ("GET", "/health"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
    ("GET", "/v1/sessions"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions/{session_id}"),
    ("PATCH", "/v1/sessions/{session_id}"),
    ("DELETE", "/v1/sessions/{session_id}"),
    ("POST", "/v1/sessions/{session_id}/fork"),
    ("GET", "/metrics"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("GET", "/v1/responses/{response_id}/input_items"),
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations/{conversation_id}"),
    ("POST", "/v1/conversations/{conversation_id}"),
    ("DELETE", "/v1/conversations/{conversation_id}"),
    ("GET", "/v1/conversations/{conversation_id}/items"),
    ("POST", "/v1/conversations/{conversation_id}/items"),
    ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"),
    ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    started = start_server(["--engine", "fake", "--max-queue", "8"], tmp / "sessions.db", tmp / "server.log", 120)
    yield started
    log = started.log.read_text()
    assert started.stop() == 0
    assert "Traceback" not in log, log[-3000:]


# The document of an app like the server's: it is built from the app's routes.
SPEC = build_spec(create_app(Settings(engine="fake", db=Path(tempfile.mkdtemp()) / "spec.db")))
schema = schemathesis.openapi.from_dict(SPEC)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES)
# A negative case can be huge (a string far over its maxLength); past --max-body-bytes the answer is
# 413 before the body is read, which is a rejection too.
rejection = schema.config.checks.negative_data_rejection
rejection.expected_statuses = [*rejection.expected_statuses, "413"]


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except 503 (overloaded or loading), which must say when to retry."""
    if response.status_code == 503:
        assert response.headers.get("retry-after"), "503 without Retry-After"
    elif response.status_code >= 500:
        raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")
    return None


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_server_errors_and_the_document_holds(case: Any, server: Server) -> None:
    case.call_and_validate(
        base_url=server.url,
        timeout=30,
        checks=[
            no_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )


def test_the_served_document_is_the_one_fuzzed(server: Server) -> None:
    served = requests.get(server.url + "/openapi.json", timeout=30).json()
    assert served == SPEC
    methods = {(m.upper(), p) for p, ops in served["paths"].items() for m in ops if m != "parameters"}
    assert methods == OPERATIONS
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in loaded.get_all_operations()]  # type: ignore[union-attr]
    assert {(op.method.upper(), op.path) for op in operations} == OPERATIONS


def test_the_server_still_answers_after_fuzzing(server: Server) -> None:
    r = requests.post(server.url + "/chat", json={"message": "still there?", "session_id": "after-fuzz"}, timeout=30)
    assert r.status_code == 200 and r.json()["response"] == "You said: still there?"
