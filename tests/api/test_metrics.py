"""/metrics: the families after traffic, per-app registries, and the same auth as the other routes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings

from ..conftest import FakeApp, MakeFakeApp


def scrape(client: object, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    r = client.get("/metrics", headers=headers)  # type: ignore[attr-defined]
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_traffic(fake: FakeApp) -> None:
    fake.engine.enqueue("one two three", "four five")
    assert fake.client.post("/chat", json={"message": "hi there", "session_id": "a"}).status_code == 200
    r = fake.client.post("/chat", json={"message": "again", "session_id": "a", "stream": True}, buffered=True)
    assert b"five" in r.data
    assert fake.client.post("/chat", json={"message": ""}).status_code == 400
    m = scrape(fake.client)
    assert m[("pureapi_requests_total", (("method", "POST"), ("route", "/chat"), ("status", "200")))] == 2
    assert m[("pureapi_requests_total", (("method", "POST"), ("route", "/chat"), ("status", "400")))] == 1
    assert m[("pureapi_request_duration_seconds_count", (("route", "/chat"),))] == 3
    assert m[("pureapi_time_to_first_token_seconds_count", ())] == 2
    assert m[("pureapi_tokens_total", (("kind", "completion"),))] == 5
    prompt = m[("pureapi_tokens_total", (("kind", "prompt"),))]
    assert prompt > 0 and m[("pureapi_tokens_total", (("kind", "computed_prompt"),))] == prompt  # no KV reuse
    assert m[("pureapi_generations_total", (("outcome", "completed"),))] == 2
    assert m[("pureapi_sessions", ())] == 1
    assert m[("pureapi_queue_depth", ())] == 0 and m[("pureapi_generations_running", ())] == 0
    assert m[("pureapi_model_info", (("device", "cpu"), ("engine", "fake"), ("model", "fake-model")))] == 1


def test_unmatched_routes_share_one_label(fake: FakeApp) -> None:
    for i in range(3):
        fake.client.get(f"/no/such/{i}")
    m = scrape(fake.client)
    assert m[("pureapi_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 3


def test_running_and_waiting_generations_are_gauged(make_fake_app: MakeFakeApp) -> None:
    built = make_fake_app(token_delay=0.05)
    built.engine.enqueue("a b c d e f g h")
    stream = built.client.post("/chat", json={"message": "hi", "stream": True}, buffered=False)
    chunks = stream.response  # the body is produced as it is read
    next(iter(chunks))
    m = scrape(built.client)
    assert m[("pureapi_generations_running", ())] == 1
    assert m[("pureapi_queue_depth", ())] == 0
    # A second generation waits for the one-at-a-time fake engine: it is queued, not running.
    waiting = threading.Thread(target=lambda: built.client.post("/chat", json={"message": "b", "session_id": "b"}))
    waiting.start()
    deadline = time.monotonic() + 10
    while scrape(built.client)[("pureapi_queue_depth", ())] != 1:
        assert time.monotonic() < deadline, "the second generation never showed as queued"
        time.sleep(0.01)
    assert scrape(built.client)[("pureapi_generations_running", ())] == 1
    stream.close()
    waiting.join(timeout=30)
    m = scrape(built.client)
    assert m[("pureapi_generations_running", ())] == 0
    assert m[("pureapi_generations_total", (("outcome", "stopped"),))] == 1


def test_each_app_has_its_own_registry(make_fake_app: MakeFakeApp) -> None:
    a, b = make_fake_app(db="a.db"), make_fake_app(db="b.db")
    a.client.post("/chat", json={"message": "hi"})
    assert ("pureapi_requests_total", (("method", "POST"), ("route", "/chat"), ("status", "200"))) not in scrape(
        b.client
    )


def test_metrics_need_the_key_unless_public(tmp_path: Path) -> None:
    for public in (False, True):
        engine, store = FakeEngine(), SQLiteStore(tmp_path / f"{public}.db")
        client = create_app(
            Settings(engine="fake", api_key=["k"], metrics_public=public), engine=engine, store=store
        ).test_client()
        try:
            assert client.get("/metrics").status_code == (200 if public else 401)
            scrape(client, Authorization="Bearer k")
            assert client.get("/v1/sessions").status_code == 401  # public metrics open nothing else
        finally:
            engine.close()
            store.close()
