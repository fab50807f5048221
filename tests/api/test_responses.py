"""The Responses and Conversations APIs through Flask's test client on the scripted engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.settings import Settings
from pureapi.types import Message

from ..conftest import FakeApp, MakeFakeApp


def respond(fake: FakeApp, **body: object):  # type: ignore[no-untyped-def]
    body.setdefault("input", "hi")
    return fake.client.post("/v1/responses", json=body)


def named_events(response) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def,type-arg]
    """(event name, data) of each server-sent event."""
    out = []
    for block in response.get_data(as_text=True).split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event", ""), json.loads(lines["data"])))
    return out


def test_response_shape_usage_and_storage(fake: FakeApp) -> None:
    fake.engine.enqueue("Hello to you")
    r = respond(fake, input="hi there", instructions="be kind", max_output_tokens=50, metadata={"k": "v"})
    assert r.status_code == 200
    body = r.get_json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "completed" and body["model"] == "fake-model"
    assert body["instructions"] == "be kind" and body["metadata"] == {"k": "v"} and body["store"] is True
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello to you", "annotations": []}]
    prompt = [Message("system", "be kind"), Message("user", "hi there")]
    assert fake.engine.prompts[-1] == prompt
    assert body["usage"] == {
        "input_tokens": len(fake.engine.encode_chat(prompt)),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len(fake.engine.encode_chat(prompt)) + 3,
    }
    assert fake.client.get(f"/v1/responses/{body['id']}").get_json() == body
    items = fake.client.get(f"/v1/responses/{body['id']}/input_items").get_json()
    assert [(i["role"], i["content"]) for i in items["data"]] == [
        ("user", [{"type": "input_text", "text": "hi there"}])
    ]
    assert items["first_id"] == items["last_id"] == items["data"][0]["id"] and items["has_more"] is False
    assert fake.store.history("default", owner="")[0] == []  # sessions are untouched


def test_a_chain_carries_the_history_but_not_the_instructions(fake: FakeApp) -> None:
    fake.engine.enqueue("one", "two", "three")
    first = respond(fake, input="a", instructions="first rules").get_json()
    second = respond(fake, input="b", previous_response_id=first["id"]).get_json()
    assert second["previous_response_id"] == first["id"]
    respond(fake, input="c", previous_response_id=second["id"], instructions="new rules")
    assert fake.engine.prompts[-1] == [
        Message("system", "new rules"),
        Message("user", "a"),
        Message("assistant", "one"),
        Message("user", "b"),
        Message("assistant", "two"),
        Message("user", "c"),
    ]


def test_a_chain_can_fork(fake: FakeApp) -> None:
    fake.engine.enqueue("one", "two", "other")
    first = respond(fake, input="a").get_json()
    respond(fake, input="b", previous_response_id=first["id"])
    respond(fake, input="x", previous_response_id=first["id"])
    assert fake.engine.prompts[-1] == [Message("user", "a"), Message("assistant", "one"), Message("user", "x")]


def test_unknown_or_deleted_previous_response_is_a_404(fake: FakeApp) -> None:
    r = respond(fake, previous_response_id="resp_nope")
    assert r.status_code == 404
    assert r.get_json() == {
        "error": {
            "message": "previous response 'resp_nope' not found (deleted, expired or never stored)",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }
    first = respond(fake, input="a").get_json()
    deleted = fake.client.delete(f"/v1/responses/{first['id']}")
    assert deleted.get_json() == {"id": first["id"], "object": "response", "deleted": True}
    assert respond(fake, previous_response_id=first["id"]).status_code == 404
    assert fake.client.get(f"/v1/responses/{first['id']}").status_code == 404
    assert fake.client.get(f"/v1/responses/{first['id']}/input_items").status_code == 404
    assert fake.client.delete(f"/v1/responses/{first['id']}").status_code == 404
    assert len(fake.engine.params) == 1  # the refused turns never reached the engine


def test_store_false_keeps_nothing(fake: FakeApp) -> None:
    body = respond(fake, store=False).get_json()
    assert body["store"] is False and body["status"] == "completed"
    assert fake.client.get(f"/v1/responses/{body['id']}").status_code == 404
    assert respond(fake, previous_response_id=body["id"]).status_code == 404


def test_a_failed_turn_stores_nothing(fake: FakeApp) -> None:
    conv = fake.client.post("/v1/conversations", json={}).get_json()
    fake.engine.enqueue(RuntimeError("boom"))
    r = respond(fake, input="a", conversation=conv["id"])
    assert r.status_code == 500
    items = fake.client.get(f"/v1/conversations/{conv['id']}/items").get_json()
    assert items["data"] == []
    fake.engine.enqueue(RuntimeError("boom"))
    events = named_events(respond(fake, input="a", conversation=conv["id"], stream=True))
    assert [name for name, _ in events][-2:] == ["error", "response.failed"]
    assert events[-1][1]["response"]["status"] == "failed"
    assert fake.client.get(f"/v1/conversations/{conv['id']}/items").get_json()["data"] == []
    with fake.store.reading() as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0


def test_max_output_tokens_makes_it_incomplete(fake: FakeApp) -> None:
    fake.engine.enqueue("a b c d e f")
    body = respond(fake, max_output_tokens=2).get_json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "a b "


def test_stream_event_sequence(fake: FakeApp) -> None:
    fake.engine.enqueue("Hello to you")
    r = respond(fake, stream=True)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = named_events(r)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "Hello to you"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    done = events[-1][1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello to you"
    assert fake.client.get(f"/v1/responses/{done['id']}").get_json() == done


def test_conversation_lifecycle_and_turns(fake: FakeApp) -> None:
    made = fake.client.post(
        "/v1/conversations", json={"metadata": {"topic": "t"}, "items": [{"role": "user", "content": "hello"}]}
    )
    assert made.status_code == 200
    conv = made.get_json()
    assert conv["id"].startswith("conv_") and conv["object"] == "conversation" and conv["metadata"] == {"topic": "t"}
    assert fake.client.get(f"/v1/conversations/{conv['id']}").get_json() == conv
    updated = fake.client.post(f"/v1/conversations/{conv['id']}", json={"metadata": {"topic": "u"}}).get_json()
    assert updated["metadata"] == {"topic": "u"}
    fake.engine.enqueue("hi back", "fine")
    # A seeded user item with no reply yet joins the next turn.
    body = respond(fake, input="how are you", conversation=conv["id"]).get_json()
    assert body["conversation"] == {"id": conv["id"]}
    respond(fake, input="and now", conversation={"id": conv["id"]})
    assert fake.engine.prompts[-1] == [
        Message("user", "hello"),
        Message("user", "how are you"),
        Message("assistant", "hi back"),
        Message("user", "and now"),
    ]
    items = fake.client.get(f"/v1/conversations/{conv['id']}/items?order=asc").get_json()
    assert [(i["role"], i["content"][0]["text"]) for i in items["data"]] == [
        ("user", "hello"),
        ("user", "how are you"),
        ("assistant", "hi back"),
        ("user", "and now"),
        ("assistant", "fine"),
    ]
    assert items["data"][-1]["id"] == respond_output_id(fake, conv["id"])
    page = fake.client.get(f"/v1/conversations/{conv['id']}/items?limit=2").get_json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["fine", "and now"] and page["has_more"] is True
    rest = fake.client.get(f"/v1/conversations/{conv['id']}/items?limit=10&after={page['last_id']}").get_json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["hi back", "how are you", "hello"]
    assert rest["has_more"] is False
    added = fake.client.post(
        f"/v1/conversations/{conv['id']}/items", json={"items": [{"role": "user", "content": "extra"}]}
    ).get_json()
    assert added["data"][0]["content"][0]["text"] == "extra"
    one = fake.client.get(f"/v1/conversations/{conv['id']}/items/{added['first_id']}").get_json()
    assert one == added["data"][0]
    assert fake.client.delete(f"/v1/conversations/{conv['id']}/items/{added['first_id']}").status_code == 200
    assert fake.client.get(f"/v1/conversations/{conv['id']}/items/{added['first_id']}").status_code == 404
    gone = fake.client.delete(f"/v1/conversations/{conv['id']}").get_json()
    assert gone == {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
    for method, path in [
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/items"),
    ]:
        assert fake.client.open(f"/v1/conversations/{conv['id']}{path}", method=method).status_code == 404
    r = respond(fake, conversation=conv["id"])
    assert r.status_code == 404 and r.get_json()["error"]["param"] == "conversation"


def respond_output_id(fake: FakeApp, conversation_id: str) -> str:
    """The id of the newest assistant item, as the last stored response reported it."""
    with fake.store.reading() as db:
        body = json.loads(db.execute("SELECT body FROM responses ORDER BY created_at DESC LIMIT 1").fetchone()[0])
    assert body["conversation"] == {"id": conversation_id}
    return str(body["output"][0]["id"])


def test_history_budget_drops_the_oldest_turns(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app(context_length=40)
    previous = None
    for i in range(8):
        fake.engine.enqueue(f"reply number {i}")
        body = respond(fake, input=f"turn {i}", max_output_tokens=5, previous_response_id=previous).get_json()
        previous = body["id"]
        assert body["status"] == "completed"
    prompt = fake.engine.prompts[-1]
    assert prompt[-1] == Message("user", "turn 7")
    assert Message("user", "turn 0") not in prompt  # dropped to fit 40 tokens with 5 for the reply
    assert Message("user", "turn 6") in prompt
    assert len(fake.engine.encode_chat(prompt)) + 5 <= 40


def test_bad_requests_name_the_field(fake: FakeApp) -> None:
    cases = [
        ({"input": []}, "input"),
        ({"input": [{"role": "assistant", "content": "x"}]}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"input": 5}, "input"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "store": "yes"}, "store"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "previous_response_id": "resp_a", "conversation": "conv_b"}, "conversation"),
        ({}, "input"),
    ]
    for body, param in cases:
        r = fake.client.post("/v1/responses", json=body)
        assert r.status_code == 400, (body, r.get_json())
        assert r.get_json()["error"]["param"] == param, (body, r.get_json())
    r = fake.client.post("/v1/conversations", json={"metadata": {str(i): "v" for i in range(17)}})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "metadata"
    r = fake.client.get("/v1/conversations/conv_x/items?limit=0")
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "limit"
    assert fake.engine.params == []


def test_expired_responses_cannot_be_read_or_continued(tmp_path: Path) -> None:
    from pureapi.engines.fake import FakeEngine

    engine = FakeEngine()
    store = SQLiteStore(tmp_path / "s.db")
    app = create_app(Settings(engine="fake", db=tmp_path / "s.db", response_ttl=1), engine=engine, store=store)
    client = app.test_client()
    try:
        body = client.post("/v1/responses", json={"input": "a"}).get_json()
        assert client.get(f"/v1/responses/{body['id']}").status_code == 200
        time.sleep(1.1)
        assert client.get(f"/v1/responses/{body['id']}").status_code == 404
        assert client.post("/v1/responses", json={"input": "b", "previous_response_id": body["id"]}).status_code == 404
        assert client.post("/v1/responses", json={"input": "c"}).status_code == 200
        with store.reading() as db:  # the next stored turn purged it
            assert db.execute("SELECT COUNT(*) FROM responses WHERE id = ?", (body["id"],)).fetchone()[0] == 0
    finally:
        engine.close()
        store.close()


@pytest.mark.parametrize("turns", [3])
def test_a_chain_survives_a_new_app_on_the_same_file(make_fake_app: MakeFakeApp, turns: int) -> None:
    previous = None
    for i in range(turns):
        fake = make_fake_app()
        fake.engine.enqueue(f"r{i}")
        body = respond(fake, input=f"u{i}", previous_response_id=previous).get_json()
        previous = body["id"]
        if i == turns - 1:
            assert (
                fake.engine.prompts[-1]
                == [m for j in range(turns) for m in (Message("user", f"u{j}"), Message("assistant", f"r{j}"))][:-1]
            )


def test_a_sessions_database_from_before_the_responses_api_migrates(tmp_path: Path) -> None:
    import sqlite3

    from pureapi.chat.store import MIGRATIONS

    old = sqlite3.connect(tmp_path / "s.db")
    old.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    old.execute("INSERT INTO sessions (id, epoch, created_at, updated_at) VALUES ('s', 0, 0, 0)")
    old.execute("INSERT INTO messages (session_id, role, content, created_at) VALUES ('s', 'user', 'kept', 0)")
    old.commit()
    old.close()
    store = SQLiteStore(tmp_path / "s.db")
    try:
        assert store.history("s", owner="")[0] == [Message("user", "kept")]
        with store.reading() as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0
    finally:
        store.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": [{"role": "user", "content": "hi", "frobnicate": 1}]}, "frobnicate"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi", "x": 1}]}]}, "x"),
        ({"conversation": {"id": "conv_1", "topic": "t"}}, "topic"),
    ],
)
def test_an_unknown_field_inside_the_body_is_a_400_naming_it(fake: FakeApp, body: dict, field: str) -> None:  # type: ignore[type-arg]
    r = respond(fake, **body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert field in r.get_json()["error"]["message"]


def test_output_items_sent_back_as_the_sdk_dumps_them_are_accepted(fake: FakeApp) -> None:
    """The Agents SDK resends a reply's items whole: ids, status, annotations and logprobs are not unknown."""
    fake.engine.enqueue("fine")
    said = {"type": "output_text", "text": "hello", "annotations": [], "logprobs": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed", "content": [said]}
    r = respond(fake, input=[{"role": "user", "content": "hi"}, item, {"role": "user", "content": "and?"}])
    assert r.status_code == 200, r.get_data(as_text=True)


def test_an_unknown_field_in_a_conversation_body_is_a_400(fake: FakeApp) -> None:
    r = fake.client.post("/v1/conversations", json={"metadata": {}, "title": "x"})
    assert r.status_code == 400 and "title" in r.get_data(as_text=True)
