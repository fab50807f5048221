"""Tools on server-side sessions (/chat with tools and tool_results, the sessions API showing the exchange),
the store's tool columns and their migration, and the window that keeps a call with its result; all on the
scripted engine."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pureapi.chat.store import MIGRATIONS, SQLiteStore
from pureapi.chat.window import fit_window, open_round, rounds_of
from pureapi.types import Message, ToolCall

from ..conftest import FakeApp, MakeFakeApp
from ..sse import sse_data
from .test_openai_tools import WEATHER

FORCED = {"type": "function", "function": {"name": "weather"}}
ARGS = '{"name": "weather", "arguments": {"city": "Paris"}}'  # a forced reply: its opening tag is the prompt's


def chat(fake: FakeApp, reply: str | None = None, **body: Any) -> Any:
    if reply is not None:
        fake.engine.enqueue(reply)
    body.setdefault("session_id", "s")
    return fake.client.post("/chat", json=body)


def called(fake: FakeApp, session: str = "s") -> dict[str, Any]:
    """A turn on the session whose reply is a forced weather call; its body."""
    r = chat(fake, ARGS, message="Weather in Paris?", tools=[WEATHER], tool_choice=FORCED, session_id=session)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()  # type: ignore[no-any-return]


def messages(fake: FakeApp, session: str = "s") -> list[dict[str, Any]]:
    return fake.client.get(f"/v1/sessions/{session}").get_json()["messages"]  # type: ignore[no-any-return]


def test_a_tool_exchange_is_kept_by_the_session(fake: FakeApp) -> None:
    body = called(fake)
    [call] = body["tool_calls"]
    assert body["finish_reason"] == "tool_calls" and body["response"] == "" and body["status"] == "success"
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'} and call["id"].startswith("call_")
    assert fake.engine.tools[-1] == [WEATHER]  # the template rendered the tools
    assert fake.engine.params[-1].json_schema is not None  # the call was forced by grammar
    stored = messages(fake)
    assert stored == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]

    r = chat(fake, "It is 21 degrees.", tool_results=[{"role": "tool", "tool_call_id": call["id"], "content": "21C"}])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == {
        "message": "",
        "response": "It is 21 degrees.",
        "status": "success",
        "finish_reason": "stop",
    }
    prompt = fake.engine.prompts[-1]
    assert [m.role for m in prompt] == ["user", "assistant", "tool"]
    assert prompt[1].tool_calls == (ToolCall(call["id"], "weather", '{"city": "Paris"}'),)
    assert prompt[2] == Message("tool", "21C", tool_call_id=call["id"], name="weather")  # named from its call
    assert messages(fake)[2:] == [
        {"role": "tool", "content": "21C", "tool_call_id": call["id"], "name": "weather"},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    session = fake.client.get("/v1/sessions/s").get_json()
    assert session["rounds"] == 1 and session["title"] is None  # the session's own nulls still show

    chat(fake, "You are welcome.", message="Thanks!")
    assert [m.role for m in fake.engine.prompts[-1]] == ["user", "assistant", "tool", "assistant", "user"]


def test_without_tools_the_seed_contract_is_unchanged(fake: FakeApp) -> None:
    r = chat(fake, "hi there", message="hello")
    assert r.get_json() == {"message": "hello", "response": "hi there", "status": "success"}
    r = chat(fake, message="hello", stream=True)
    end = json.loads(sse_data(r)[-1])
    assert set(end) == {"message", "response", "status", "usage"}
    assert fake.client.post("/chat", json={}).get_json() == {"error": "message: field required"}


def test_results_and_a_message_in_one_turn(fake: FakeApp) -> None:
    [call] = called(fake)["tool_calls"]
    results = [{"tool_call_id": call["id"], "content": "21C"}]
    r = chat(fake, "Warm.", message="Is that warm?", tool_results=results)
    assert r.get_json()["message"] == "Is that warm?"
    assert [m["role"] for m in messages(fake)] == ["user", "assistant", "tool", "user", "assistant"]
    assert fake.client.get("/v1/sessions/s").get_json()["rounds"] == 2


def test_a_message_before_the_results_is_a_400_that_names_the_calls(fake: FakeApp) -> None:
    [call] = called(fake)["tool_calls"]
    r = chat(fake, message="Never mind.")
    assert r.status_code == 400
    assert r.get_json()["error"].startswith("tool_results: the last reply in session 's' called tools")
    assert call["id"] in r.get_json()["error"]
    assert len(messages(fake)) == 2  # nothing stored


@pytest.mark.parametrize(
    ("results", "error"),
    [
        ([{"tool_call_id": "call_nope", "content": "x"}], "tool_results[0].tool_call_id: 'call_nope' is not a call"),
        ([{"tool_call_id": "{id}", "content": "x"}] * 2, "tool_results[1].tool_call_id: call '{id}' is answered twice"),
        ([{"content": "x"}], "tool_results.0.tool_call_id: field required"),
        ([{"tool_call_id": "{id}", "content": 5}], "tool_results.0.content: Input should be a valid string"),
        ([{"tool_call_id": "{id}", "content": "x", "role": "user"}], "tool_results.0.role: Input should be 'tool'"),
        ([], "tool_results: List should have at least 1 item"),
    ],
)
def test_bad_tool_results_are_a_400_naming_the_problem(fake: FakeApp, results: list[Any], error: str) -> None:
    [call] = called(fake)["tool_calls"]
    body = json.loads(json.dumps(results).replace("{id}", call["id"]))
    r = chat(fake, tool_results=body)
    assert r.status_code == 400
    assert r.get_json()["error"].startswith(error.replace("{id}", call["id"])), r.get_json()
    assert len(messages(fake)) == 2


def test_a_result_for_every_call_is_needed(fake: FakeApp) -> None:
    two = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' * 2
    first, second = chat(fake, two, message="Paris and Rome?", tools=[WEATHER]).get_json()["tool_calls"]
    r = chat(fake, tool_results=[{"tool_call_id": second["id"], "content": "x"}])
    assert r.status_code == 400
    assert r.get_json()["error"].startswith(f"tool_results: no result for call '{first['id']}'")
    results = [{"tool_call_id": c["id"], "content": c["id"]} for c in (second, first)]  # any order
    assert chat(fake, "Both warm.", tool_results=results).status_code == 200


def test_results_with_no_call_waiting_are_a_400(fake: FakeApp) -> None:
    chat(fake, "hi", message="hello")
    r = chat(fake, tool_results=[{"tool_call_id": "call_1", "content": "x"}])
    assert r.status_code == 400
    assert r.get_json()["error"] == "tool_results: no tool call in session 's' is waiting for a result"


def test_tools_on_a_model_without_tool_support_are_a_400(fake: FakeApp) -> None:
    fake.engine.tool_format = None
    r = chat(fake, message="Weather?", tools=[WEATHER])
    assert r.status_code == 400 and r.get_json()["error"].startswith("tools:")
    r = chat(fake, message="Weather?", tool_choice="required")
    assert r.get_json()["error"] == "tool_choice: needs tools to choose from"


def test_a_failed_turn_after_the_results_leaves_the_call_waiting(fake: FakeApp) -> None:
    [call] = called(fake)["tool_calls"]
    fake.engine.enqueue(RuntimeError("boom"))
    r = chat(fake, tool_results=[{"tool_call_id": call["id"], "content": "21C"}])
    assert r.status_code == 500
    assert len(messages(fake)) == 2  # exactly as it was
    assert chat(fake, "21.", tool_results=[{"tool_call_id": call["id"], "content": "21C"}]).status_code == 200


def test_a_streamed_call_comes_whole_in_the_last_event(fake: FakeApp) -> None:
    reply = 'Let me look. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    r = chat(fake, reply, message="Weather?", tools=[WEATHER], stream=True)
    *deltas, end = [json.loads(d) for d in sse_data(r)]
    assert "".join(d["delta"] for d in deltas).strip() == "Let me look."  # the call's markup held back
    [call] = end["tool_calls"]
    assert end["finish_reason"] == "tool_calls" and end["response"] == "Let me look." and "usage" in end
    assert messages(fake)[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}


def test_an_idempotent_retry_of_a_call_returns_the_same_call(fake: FakeApp) -> None:
    body = {"message": "Weather?", "session_id": "s", "tools": [WEATHER], "tool_choice": FORCED}
    fake.engine.enqueue(ARGS)
    first = fake.client.post("/chat", json=body, headers={"Idempotency-Key": "k1"}).get_json()
    again = fake.client.post("/chat", json=body, headers={"Idempotency-Key": "k1"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first and first["tool_calls"]
    assert len(messages(fake)) == 2


def test_fork_and_rounds_count_tool_exchanges_whole(fake: FakeApp) -> None:
    [call] = called(fake)["tool_calls"]
    chat(fake, "21.", tool_results=[{"tool_call_id": call["id"], "content": "21C"}])
    chat(fake, "bye", message="Thanks")
    r = fake.client.post("/v1/sessions/s/fork", json={"id": "f", "at_turn": 1})
    assert r.get_json()["rounds"] == 1
    assert [m["role"] for m in messages(fake, "f")] == ["user", "assistant", "tool", "assistant"]
    assert messages(fake, "f")[1]["tool_calls"] == [call]


def test_the_round_limit_drops_whole_tool_rounds(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app({"max_rounds": 2})
    for i in range(3):
        [call] = called(fake)["tool_calls"]
        chat(fake, f"answer {i}", tool_results=[{"tool_call_id": call["id"], "content": f"result {i}"}])
    stored = messages(fake)
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"] * 2
    assert stored[2]["content"] == "result 1"


def test_the_window_never_splits_a_call_from_its_result() -> None:
    call = ToolCall("call_1", "weather", "{}")
    history = [
        Message("user", "a " * 10),
        Message("assistant", "b " * 10),
        Message("user", "c " * 10),
        Message("assistant", "", (call,)),
    ]
    rounds = rounds_of(history)
    assert [len(r) for r in rounds] == [2, 2]
    kept, tail = open_round(rounds, [Message("tool", "d " * 30, tool_call_id="call_1")])
    assert [len(r) for r in kept] == [1 * 2] and [m.role for m in tail] == ["user", "assistant", "tool"]

    def encode(ms: list[Message]) -> list[int]:  # a word a token, tool results included
        return [0] * sum(len(m.content.split()) + 1 for m in ms)

    # The open round (user 10 + call 0 + result 30, plus one per message) is 43; with the old round, 65.
    assert len(fit_window(encode, 100, kept, tail, 40)) == 43
    assert len(fit_window(encode, 200, kept, tail, 40)) == 65


def test_migration_from_schema_4_keeps_the_history(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:4]:
        db.executescript(migration)
    db.execute("PRAGMA user_version = 4")
    db.execute("INSERT INTO sessions (id, owner, epoch, created_at, updated_at) VALUES ('alice/w', 'alice', 2, 1, 1)")
    db.executemany(
        "INSERT INTO messages (session_id, role, content, created_at) VALUES ('alice/w', ?, ?, 1)",
        [("user", "hello"), ("assistant", "hi")],
    )
    db.execute(
        "INSERT INTO idempotency_keys (session_id, key, fingerprint, reply, created_at) "
        "VALUES ('alice/w', 'k', 'f', 'hi', 1)"
    )
    db.commit()
    db.close()

    store = SQLiteStore(path)
    assert store.history("w", owner="alice") == ([Message("user", "hello"), Message("assistant", "hi")], 2)
    assert store.idempotent_reply("w", "k", owner="alice") == ("f", Message("assistant", "hi"))
    call = ToolCall("call_1", "weather", '{"city": "Paris"}')
    exchange = [Message("user", "Weather?"), Message("assistant", "", (call,))]
    assert store.append_round("w", exchange, 2, 20, owner="alice")
    assert store.append_round(
        "w",
        [Message("tool", "21C", tool_call_id="call_1", name="weather"), Message("assistant", "21.")],
        2,
        20,
        owner="alice",
    )
    store.close()
    reopened = SQLiteStore(path)
    history, _ = reopened.history("w", owner="alice")
    assert history[2:] == [
        *exchange,
        Message("tool", "21C", tool_call_id="call_1", name="weather"),
        Message("assistant", "21."),
    ]
    assert reopened.get_session("w", owner="alice").rounds == 2  # type: ignore[union-attr]
    reopened.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 5


def test_an_unknown_field_in_a_tool_result_is_a_400_naming_it(fake: FakeApp) -> None:
    """tool_results is new: nothing in it is ignored, unlike the seed body's old fields."""
    r = fake.client.post("/chat", json={"tool_results": [{"tool_call_id": "c1", "content": "4", "is_error": True}]})
    assert r.status_code == 400 and "is_error" in r.get_json()["error"]
