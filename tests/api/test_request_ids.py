"""Request ids: echoed or minted on every response, and stamped on the log lines of the request."""

from __future__ import annotations

import json
import logging

import pytest

from pureapi import logs

from ..conftest import FakeApp


@pytest.fixture
def captured() -> list[logging.LogRecord]:
    """Log records as the configured handler's filter stamps them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(logs.RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_a_sane_client_id_is_echoed(fake: FakeApp) -> None:
    r = fake.client.get("/health", headers={"X-Request-Id": "abc-123.retry:2"})
    assert r.headers["X-Request-Id"] == "abc-123.retry:2"


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, 'quote"d', "new\nline"])
def test_an_unsafe_client_id_is_replaced(fake: FakeApp, given: str) -> None:
    r = fake.client.get("/health", headers={"X-Request-Id": given} if "\n" not in given else {})
    rid = r.headers["X-Request-Id"]
    assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


def test_every_response_has_a_fresh_id(fake: FakeApp) -> None:
    ids = {fake.client.get("/health").headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


def test_errors_and_refusals_carry_an_id_too(fake: FakeApp) -> None:
    assert "X-Request-Id" in fake.client.get("/nope").headers
    assert "X-Request-Id" in fake.client.post("/chat", data="{").headers
    fake.engine.enqueue("hello there")
    r = fake.client.post("/chat", json={"message": "hi", "stream": True}, headers={"X-Request-Id": "s-1"})
    assert r.headers["X-Request-Id"] == "s-1"
    assert b"there" in r.data


def test_access_and_error_logs_name_the_request(fake: FakeApp, captured: list[logging.LogRecord]) -> None:
    fake.engine.enqueue(RuntimeError("boom"))
    r = fake.client.post("/chat", json={"message": "hi"}, headers={"X-Request-Id": "req-42"})
    assert r.status_code == 500
    access = [rec for rec in captured if rec.name == "pureapi.access"]
    assert access and access[-1].request_id == "req-42"  # type: ignore[attr-defined]
    assert access[-1].status == 500 and access[-1].path == "/chat"  # type: ignore[attr-defined]
    errors = [rec for rec in captured if rec.levelno >= logging.WARNING]
    assert errors and all(rec.request_id == "req-42" for rec in errors)  # type: ignore[attr-defined]


def test_json_lines_carry_the_fields() -> None:
    record = logging.LogRecord("pureapi.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.request_id = "r1"
    record.status = 200
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "GET /x" and line["request_id"] == "r1" and line["status"] == 200
    assert line["level"] == "info" and line["logger"] == "pureapi.access"


def test_a_line_logged_while_flask_is_half_imported_names_no_request(
    monkeypatch: pytest.MonkeyPatch, captured: list[logging.LogRecord]
) -> None:
    """The model loader logs from its thread while the main thread may be importing Flask: a module in
    sys.modules without its names yet is no request, not an AttributeError that fails the load."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "flask", types.ModuleType("flask"))
    logging.getLogger("pureapi.test").info("loading")
    assert logs.request_id() is None
    assert captured[-1].request_id == "-"
