"""The sessions API (/v1/sessions), per-session system prompts, expiry, and idempotent /chat turns."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pureapi.app import create_app
from pureapi.chat.expiry import SessionExpirer
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings

from ..conftest import FakeApp


def turn(fake: FakeApp, session: str, message: str, reply: str | None = None, **headers: str) -> object:
    if reply is not None:
        fake.engine.enqueue(reply)
    r = fake.client.post("/chat", json={"message": message, "session_id": session}, headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r


def test_create_get_update_delete(fake: FakeApp) -> None:
    r = fake.client.post("/v1/sessions", json={"id": "s1", "title": "Trip", "metadata": {"user": 7}})
    assert r.status_code == 201
    assert r.get_json()["title"] == "Trip" and r.get_json()["rounds"] == 0
    assert fake.client.post("/v1/sessions", json={"id": "s1"}).status_code == 409
    turn(fake, "s1", "hello", "hi!")
    got = fake.client.get("/v1/sessions/s1").get_json()
    assert got["metadata"] == {"user": 7} and got["rounds"] == 1
    assert got["messages"] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]
    r = fake.client.patch("/v1/sessions/s1", json={"title": "Trip to Rome"})
    assert r.get_json()["title"] == "Trip to Rome" and r.get_json()["metadata"] == {"user": 7}
    assert fake.client.delete("/v1/sessions/s1").get_json()["deleted"] is True
    for method in ("get", "delete"):
        r = getattr(fake.client, method)("/v1/sessions/s1")
        assert r.status_code == 404 and "no session" in r.get_json()["error"]["message"]
    assert fake.client.patch("/v1/sessions/s1", json={"title": "x"}).status_code == 404


def test_a_new_session_gets_a_random_id(fake: FakeApp) -> None:
    ids = {fake.client.post("/v1/sessions").get_json()["id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("post", "/v1/sessions", {"title": 5}, "title"),
        ("post", "/v1/sessions", {"id": "bad id"}, "id"),
        ("post", "/v1/sessions", {"metadata": [1]}, "metadata"),
        ("post", "/v1/sessions", {"metadata": {"x": "y" * 20_000}}, "metadata"),
        ("post", "/v1/sessions", {"colour": "red"}, "colour"),
        ("patch", "/v1/sessions/s", {"system_prompt": 1}, "system_prompt"),
        ("get", "/v1/sessions/bad%20id", None, "session_id"),
        ("get", "/v1/sessions?limit=0", None, "limit"),
        ("get", "/v1/sessions?after=nobody", None, "after"),
        ("post", "/v1/sessions/s/fork", {"at_turn": -1}, "at_turn"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(fake: FakeApp, method: str, path: str, body: object, param: str) -> None:
    fake.client.post("/v1/sessions", json={"id": "s"})
    r = getattr(fake.client, method)(path, json=body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["error"]["param"] == param


def test_list_is_paged_newest_first(fake: FakeApp) -> None:
    for i in range(5):
        fake.client.post("/v1/sessions", json={"id": f"s{i}"})
        time.sleep(0.01)
    turn(fake, "s1", "bump")  # a turn makes s1 the newest
    page = fake.client.get("/v1/sessions?limit=2").get_json()
    assert [s["id"] for s in page["data"]] == ["s1", "s4"] and page["has_more"] is True
    page = fake.client.get(f"/v1/sessions?limit=2&after={page['last_id']}").get_json()
    assert [s["id"] for s in page["data"]] == ["s3", "s2"] and page["has_more"] is True
    page = fake.client.get(f"/v1/sessions?limit=2&after={page['last_id']}").get_json()
    assert [s["id"] for s in page["data"]] == ["s0"] and page["has_more"] is False


def test_fork_at_a_turn(fake: FakeApp) -> None:
    fake.client.post("/v1/sessions", json={"id": "a", "title": "T", "system_prompt": "Be brief."})
    for i in range(3):
        turn(fake, "a", f"q{i}", f"r{i}")
    r = fake.client.post("/v1/sessions/a/fork", json={"id": "b", "at_turn": 1})
    assert r.status_code == 201 and r.get_json()["rounds"] == 1 and r.get_json()["system_prompt"] == "Be brief."
    assert [m["content"] for m in fake.client.get("/v1/sessions/b").get_json()["messages"]] == ["q0", "r0"]
    turn(fake, "b", "q1'", "other")  # the fork goes its own way; the source is untouched
    assert fake.client.get("/v1/sessions/a").get_json()["rounds"] == 3
    assert fake.client.post("/v1/sessions/a/fork", json={"id": "b"}).status_code == 409
    r = fake.client.post("/v1/sessions/a/fork", json={"at_turn": 4})
    assert r.status_code == 400 and "only 3 rounds" in r.get_json()["error"]["message"]
    assert fake.client.post("/v1/sessions/zz/fork", json={}).status_code == 404
    whole = fake.client.post("/v1/sessions/a/fork").get_json()
    assert whole["rounds"] == 3 and whole["id"] != "a"


def test_the_system_prompt_leads_every_turn(fake: FakeApp) -> None:
    fake.client.post("/v1/sessions", json={"id": "p", "system_prompt": "You are a pirate."})
    turn(fake, "p", "hello")
    turn(fake, "p", "again")
    prompt = fake.engine.prompts[-1]
    assert prompt[0].role == "system" and prompt[0].content == "You are a pirate."
    assert [m.role for m in prompt[1:]] == ["user", "assistant", "user"]
    fake.client.patch("/v1/sessions/p", json={"system_prompt": None})
    turn(fake, "p", "third")
    assert fake.engine.prompts[-1][0].role == "user"


def test_idle_sessions_expire_in_the_background(fake: FakeApp) -> None:
    turn(fake, "old", "hi")
    time.sleep(0.3)
    turn(fake, "fresh", "hi")
    service = fake.app.extensions["pureapi"].directory
    expirer = SessionExpirer(service, ttl_seconds=0.25).start()
    try:
        deadline = time.monotonic() + 10
        while fake.client.get("/v1/sessions/old").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.client.get("/v1/sessions/old").status_code == 404
    finally:
        expirer.stop()


def test_expire_keeps_what_is_younger_than_the_ttl(fake: FakeApp) -> None:
    turn(fake, "a", "hi")
    turn(fake, "b", "hi")
    service = fake.app.extensions["pureapi"].directory
    assert service.expire(3600) == []
    assert sorted(service.expire(0)) == ["a", "b"]
    assert service.store.count_sessions() == 0


# --- Idempotency-Key on /chat ------------------------------------------------------------------


def rounds(fake: FakeApp, session: str) -> int:
    return int(fake.client.get(f"/v1/sessions/{session}").get_json()["rounds"])


def test_a_retry_returns_the_stored_reply_and_appends_nothing(fake: FakeApp) -> None:
    first = turn(fake, "i", "what time is it?", "noon", **{"Idempotency-Key": "k1"})
    calls = len(fake.engine.params)
    again = turn(fake, "i", "what time is it?", **{"Idempotency-Key": "k1"})
    assert (
        again.get_json()
        == first.get_json()
        == {  # type: ignore[attr-defined]
            "message": "what time is it?",
            "response": "noon",
            "status": "success",
        }
    )
    assert again.headers["Idempotent-Replayed"] == "true"  # type: ignore[attr-defined]
    assert len(fake.engine.params) == calls  # no generation ran
    assert rounds(fake, "i") == 1
    streamed = fake.client.post(
        "/chat",
        json={"message": "what time is it?", "session_id": "i", "stream": True},
        headers={"Idempotency-Key": "k1"},
    )
    assert b'"delta":"noon"' in streamed.data and rounds(fake, "i") == 1


def test_the_same_key_with_another_body_is_a_409(fake: FakeApp) -> None:
    turn(fake, "i", "one", **{"Idempotency-Key": "k"})
    r = fake.client.post("/chat", json={"message": "two", "session_id": "i"}, headers={"Idempotency-Key": "k"})
    assert r.status_code == 409 and "Idempotency-Key" in r.get_json()["error"]
    r = fake.client.post(
        "/chat", json={"message": "one", "session_id": "i", "temperature": 0}, headers={"Idempotency-Key": "k"}
    )
    assert r.status_code == 409
    assert rounds(fake, "i") == 1
    turn(fake, "other", "one", **{"Idempotency-Key": "k"})  # keys are per session
    assert rounds(fake, "other") == 1


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "é"])
def test_a_bad_key_is_a_400(fake: FakeApp, key: str) -> None:
    r = fake.client.post("/chat", json={"message": "hi"}, headers={"Idempotency-Key": key})
    assert r.status_code == 400 and "Idempotency-Key" in r.get_json()["error"]


def test_a_failed_turn_stores_no_key(fake: FakeApp) -> None:
    fake.engine.enqueue(RuntimeError("boom"))
    r = fake.client.post("/chat", json={"message": "hi", "session_id": "f"}, headers={"Idempotency-Key": "k"})
    assert r.status_code == 500
    turn(fake, "f", "hi", "now it works", **{"Idempotency-Key": "k"})
    assert fake.client.get("/v1/sessions/f").get_json()["messages"][-1]["content"] == "now it works"


def test_concurrent_retries_run_one_generation(tmp_path: Path) -> None:
    engine = FakeEngine(token_delay=0.02)
    store = SQLiteStore(tmp_path / "s.db")
    app = create_app(Settings(engine="fake"), engine=engine, store=store)
    engine.enqueue("a b c d e f", "SECOND RUN")
    replies: list[str] = []

    def call() -> None:
        r = app.test_client().post("/chat", json={"message": "go", "session_id": "c"}, headers={"Idempotency-Key": "z"})
        replies.append(r.get_json()["response"])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert replies == ["a b c d e f"] * 4
        assert len(engine.params) == 1 and len(store.history("c", owner="")[0]) == 2
    finally:
        engine.close()
        store.close()


def test_a_retry_after_a_restart_is_still_answered_from_the_store(tmp_path: Path) -> None:
    def app_on(db: Path) -> tuple[FakeEngine, SQLiteStore, object]:
        engine, store = FakeEngine(), SQLiteStore(db)
        return engine, store, create_app(Settings(engine="fake", db=db), engine=engine, store=store).test_client()

    engine, store, client = app_on(tmp_path / "s.db")
    engine.enqueue("first answer")
    body, headers = {"message": "q", "session_id": "r"}, {"Idempotency-Key": "restart-1"}
    assert client.post("/chat", json=body, headers=headers).get_json()["response"] == "first answer"  # type: ignore[attr-defined]
    engine.close()
    store.close()
    engine, store, client = app_on(tmp_path / "s.db")
    try:
        engine.enqueue("a different answer")
        r = client.post("/chat", json=body, headers=headers)  # type: ignore[attr-defined]
        assert r.get_json()["response"] == "first answer" and len(engine.params) == 0
        assert len(store.history("r", owner="")[0]) == 2
    finally:
        engine.close()
        store.close()


def test_delete_cancels_a_turn_in_flight_so_its_round_never_lands(tmp_path: Path) -> None:
    engine = FakeEngine(token_delay=0.05)
    store = SQLiteStore(tmp_path / "s.db")
    app = create_app(Settings(engine="fake"), engine=engine, store=store)
    client = app.test_client()
    try:
        client.post("/chat", json={"message": "first", "session_id": "d"})
        engine.enqueue(" ".join(["word"] * 200))  # 10 s of reply unless cancelled
        stream = client.post("/chat", json={"message": "long", "session_id": "d", "stream": True}, buffered=False)
        body = iter(stream.response)
        assert b"delta" in next(body)
        deleted: list[int] = []
        deleter = threading.Thread(
            target=lambda: deleted.append(app.test_client().delete("/v1/sessions/d").status_code)
        )
        deleter.start()
        rest = b"".join(body)  # the stream ends early, with an error event, once the delete cancels it
        stream.close()
        deleter.join(timeout=30)
        assert deleted == [200]
        assert b"error" in rest and rest.count(b"word") < 150
        assert client.get("/v1/sessions/d").status_code == 404 and store.history("d", owner="")[0] == []
    finally:
        engine.close()
        store.close()


def test_a_retry_is_answered_while_the_model_loads(tmp_path: Path) -> None:
    engine, store = FakeEngine(), SQLiteStore(tmp_path / "s.db")
    app = create_app(Settings(engine="fake"), engine=engine, store=store)
    client = app.test_client()
    body, key = {"message": "q", "session_id": "l"}, {"Idempotency-Key": "k"}
    try:
        engine.enqueue("stored")
        assert client.post("/chat", json=body, headers=key).get_json()["response"] == "stored"
        app.extensions["pureapi"].engine = None  # as after a restart, before the model is back
        assert client.post("/chat", json=body, headers=key).get_json()["response"] == "stored"
        assert client.post("/chat", json={**body, "message": "new"}).status_code == 503
    finally:
        engine.close()
        store.close()
