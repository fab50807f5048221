"""The seed API through Flask's test client on the scripted engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from pureapi.types import Message

from ..conftest import FakeApp, MakeFakeApp
from ..sse import sse_events


def chat(fake: FakeApp, **body: object):  # type: ignore[no-untyped-def]
    return fake.client.post("/chat", json=body)


def test_chat_returns_the_documented_shape(fake: FakeApp) -> None:
    fake.engine.enqueue("Paris is the capital.")
    r = chat(fake, message="Capital of France?")
    assert r.status_code == 200
    assert r.get_json() == {"message": "Capital of France?", "response": "Paris is the capital.", "status": "success"}
    assert list(r.get_json()) == ["message", "response", "status"]


def test_defaults_are_max_tokens_512_and_temperature_07(fake: FakeApp) -> None:
    chat(fake, message="hi")
    assert fake.engine.params[0].max_tokens == 512
    assert fake.engine.params[0].temperature == pytest.approx(0.7)


def test_history_is_sent_to_the_model_and_status_counts_it(fake: FakeApp) -> None:
    fake.engine.enqueue("one", "two")
    chat(fake, message="first")
    chat(fake, message="second")
    assert fake.engine.prompts[-1] == [
        Message("user", "first"),
        Message("assistant", "one"),
        Message("user", "second"),
    ]
    status = fake.client.get("/status").get_json()
    devices = status.pop("devices")
    assert status == {"model_name": "fake-model", "device": "cpu", "conversation_length": 4, "memory_allocated": 0}
    assert devices[0]["name"] == "ram" and 0 < devices[0]["free_bytes"] <= devices[0]["total_bytes"]


def test_history_keeps_at_most_20_rounds_oldest_dropped(fake: FakeApp) -> None:
    for i in range(23):
        fake.engine.enqueue(f"reply {i}")
        assert chat(fake, message=f"message {i}").status_code == 200
    assert fake.client.get("/status").get_json()["conversation_length"] == 40
    history = fake.store.history("default", owner="")[0]
    assert history[0] == Message("user", "message 3")
    assert history[-1] == Message("assistant", "reply 22")
    # The model saw the 20 stored rounds plus the new message.
    assert len(fake.engine.prompts[-1]) == 41
    assert fake.engine.prompts[-1][0] == Message("user", "message 2")


def test_rounds_that_do_not_fit_the_context_are_dropped_oldest_first(make_fake_app: MakeFakeApp) -> None:
    app = make_fake_app(context_length=60)
    for _ in range(5):
        app.engine.enqueue("word " * 8)
        assert app.client.post("/chat", json={"message": "ten words " * 5, "max_tokens": 10}).status_code == 200
    prompt = app.engine.prompts[-1]
    assert len(prompt) < 9 and prompt[-1].role == "user"
    assert len(app.engine.encode_chat(prompt)) + 10 <= 60


def test_reset_clears_the_conversation(fake: FakeApp) -> None:
    chat(fake, message="hello")
    r = fake.client.post("/reset")
    assert r.status_code == 200 and r.get_json()["status"] == "success"
    assert fake.client.get("/status").get_json()["conversation_length"] == 0


def test_sessions_are_separate(fake: FakeApp) -> None:
    chat(fake, message="in a", session_id="a")
    chat(fake, message="in b", session_id="b")
    chat(fake, message="again a", session_id="a")
    assert fake.client.get("/status?session_id=a").get_json()["conversation_length"] == 4
    assert fake.client.get("/status?session_id=b").get_json()["conversation_length"] == 2
    assert fake.client.get("/status").get_json()["conversation_length"] == 0
    fake.client.post("/reset", json={"session_id": "a"})
    assert fake.client.get("/status?session_id=a").get_json()["conversation_length"] == 0
    assert fake.client.get("/status?session_id=b").get_json()["conversation_length"] == 2


def test_streaming_sends_deltas_then_the_full_body(fake: FakeApp) -> None:
    fake.engine.enqueue("Hello there friend")
    r = chat(fake, message="hi", stream=True)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r)
    assert [e["delta"] for e in events[:-1]] == ["Hello ", "there ", "friend"]
    usage = events[-1].pop("usage")
    assert events[-1] == {"message": "hi", "response": "Hello there friend", "status": "success"}
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens"] > 0 and usage["cached_tokens"] == 0
    assert fake.client.get("/status").get_json()["conversation_length"] == 2


def test_a_failed_generation_leaves_history_unchanged(fake: FakeApp) -> None:
    fake.engine.enqueue("fine")
    chat(fake, message="first")
    fake.engine.enqueue(RuntimeError("boom"))
    r = chat(fake, message="second")
    assert r.status_code == 500 and "error" in r.get_json()
    assert fake.store.history("default", owner="")[0] == [Message("user", "first"), Message("assistant", "fine")]


def test_a_failure_mid_stream_is_an_error_event_and_history_is_unchanged(fake: FakeApp) -> None:
    fake.engine.enqueue(RuntimeError("boom"))
    r = chat(fake, message="x", stream=True)
    events = sse_events(r)
    assert "error" in events[-1]
    assert fake.store.history("default", owner="")[0] == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "   "}, "message"),
        ({"message": 42}, "message"),
        ({"message": None}, "message"),
        ({"message": "hi", "max_tokens": 0}, "max_tokens"),
        ({"message": "hi", "max_tokens": -5}, "max_tokens"),
        ({"message": "hi", "max_tokens": 2.5}, "max_tokens"),
        ({"message": "hi", "max_tokens": "10"}, "max_tokens"),
        ({"message": "hi", "max_tokens": True}, "max_tokens"),
        ({"message": "hi", "temperature": -0.1}, "temperature"),
        ({"message": "hi", "temperature": 2.5}, "temperature"),
        ({"message": "hi", "temperature": "hot"}, "temperature"),
        ({"message": "hi", "temperature": False}, "temperature"),
        ({"message": "hi", "session_id": "bad id!"}, "session_id"),
        ({"message": "hi", "session_id": ""}, "session_id"),
        ({"message": "hi", "stream": "yes"}, "stream"),
        ({"message": "hi", "max_tokens": 10_000}, "max_tokens"),
    ],
)
def test_bad_bodies_get_400_naming_the_field(fake: FakeApp, body: dict[str, object], needle: str) -> None:
    r = fake.client.post("/chat", json=body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert needle in r.get_json()["error"]
    assert fake.client.get("/status").get_json()["conversation_length"] == 0


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ("[1, 2]", "application/json", 400),
        ('"text"', "application/json", 400),
        ('{"message": NaN}', "application/json", 400),
        ('{"message": "hi", "temperature": Infinity}', "application/json", 400),
        (b'{"message": "\xff\xfe"}', "application/json", 400),
        ("", "application/json", 400),
        ("message=hi", "application/x-www-form-urlencoded", 415),
    ],
)
def test_malformed_bodies(fake: FakeApp, data: str | bytes, content_type: str, status: int) -> None:
    r = fake.client.post("/chat", data=data, content_type=content_type)
    assert r.status_code == status
    assert isinstance(r.get_json()["error"], str)


def test_body_over_the_limit_is_413(fake: FakeApp) -> None:
    r = fake.client.post("/chat", json={"message": "x" * 2_000_000})
    assert r.status_code == 413 and "too large" in r.get_json()["error"]


def test_unknown_route_and_method_are_json(fake: FakeApp) -> None:
    r = fake.client.get("/nope")
    assert r.status_code == 404 and r.get_json() == {"error": "no route GET /nope"}
    r = fake.client.get("/chat")
    assert r.status_code == 405 and "not allowed" in r.get_json()["error"]


def test_health(fake: FakeApp) -> None:
    assert fake.client.get("/health").status_code == 200


def test_health_is_503_and_chat_is_503_while_loading(tmp_path: Path) -> None:
    from pureapi.app import create_app
    from pureapi.chat.store import SQLiteStore
    from pureapi.settings import Settings

    store = SQLiteStore(tmp_path / "s.db")
    app = create_app(Settings(engine="fake"), store=store)
    client = app.test_client()
    assert client.get("/health").status_code == 503
    r = client.post("/chat", json={"message": "hi"})
    assert r.status_code == 503 and "loading" in r.get_json()["error"]
    assert r.headers["Retry-After"]
    store.close()


def test_history_survives_a_new_app_on_the_same_store(make_fake_app: MakeFakeApp) -> None:
    first = make_fake_app()
    first.engine.enqueue("remembered")
    first.client.post("/chat", json={"message": "keep me"})
    first.engine.close()
    first.store.close()
    second = make_fake_app()
    assert second.client.get("/status").get_json()["conversation_length"] == 2
    second.client.post("/chat", json={"message": "next"})
    assert second.engine.prompts[-1][:2] == [Message("user", "keep me"), Message("assistant", "remembered")]
