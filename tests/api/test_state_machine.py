"""A hypothesis state machine over the fake app: stored histories always match a simple model.

The model is what the README promises: a session's history is its completed rounds, the newest
`max_rounds` of them, oldest dropped first; a reset empties it; a bad request, an engine failure,
an abandoned stream, a reset during a generation and any /v1 call leave it as it was. Through the
sessions API, a session is deleted or forked at a turn; a turn retried with its Idempotency-Key is
answered from the store and appends nothing, the key with another message is a 409.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings
from pureapi.types import Message

from ..conftest import FakeApp
from ..sse import sse_data, sse_events

MAX_ROUNDS = 3
SESSIONS = ["default", "a", "b.c", "user@host:1"]
WORD = re.compile(r"\S+\s*|\s+")  # the fake engine's "tokens"

messages = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24).filter(lambda s: s.strip() != "")
replies = st.text(st.sampled_from("ab xy\n<|>é中"), min_size=0, max_size=40)

BAD_BODIES: list[Any] = [
    {},
    {"message": ""},
    {"message": " \n\t "},
    {"message": 7},
    {"message": None},
    {"message": ["hi"]},
    {"message": "hi", "max_tokens": 0},
    {"message": "hi", "max_tokens": -3},
    {"message": "hi", "max_tokens": 1.5},
    {"message": "hi", "max_tokens": True},
    {"message": "hi", "max_tokens": 5000},  # beyond the 4096-token context
    {"message": "hi", "temperature": 2.01},
    {"message": "hi", "temperature": -1},
    {"message": "hi", "temperature": False},
    {"message": "hi", "stream": "true"},
    {"message": "hi", "session_id": "no spaces"},
    {"message": "hi", "session_id": "x" * 129},
    "[1, 2, 3]",
    "{broken",
    '{"message": NaN}',
    '{"message": "\\ud800"}',
    "[" * 5000,
    b'{"message": "\xc3\x28"}',
]


class SessionHistory(RuleBasedStateMachine):
    """Chat, reset, fail and abandon requests on a few sessions; compare with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pureapi-sm-"))
        self.engine = FakeEngine(context_length=4096)
        self.store = SQLiteStore(self.tmp / "sessions.db")
        app = create_app(Settings(engine="fake", max_rounds=MAX_ROUNDS), engine=self.engine, store=self.store)
        self.client = app.test_client()
        self.model: dict[str, list[tuple[str, str]]] = {s: [] for s in SESSIONS}
        self.exists: set[str] = set()  # sessions the store holds (a turn or a reset creates one)
        self.keys: dict[tuple[str, str], tuple[str, str]] = {}  # (session, key) -> (message, reply)

    def teardown(self) -> None:
        self.engine.close()
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- helpers -------------------------------------------------------------------------

    def expected(self, session: str) -> list[Message]:
        return [m for user, reply in self.model[session] for m in (Message("user", user), Message("assistant", reply))]

    def body(self, session: str, message: str, **extra: Any) -> dict[str, Any]:
        """A /chat body; the default session is addressed by leaving session_id out."""
        body: dict[str, Any] = {"message": message, **extra}
        if session != "default":
            body["session_id"] = session
        return body

    def commit(self, session: str, message: str, reply: str) -> None:
        self.model[session] = [*self.model[session], (message, reply)][-MAX_ROUNDS:]
        self.exists.add(session)

    # --- rules ---------------------------------------------------------------------------

    @rule(session=st.sampled_from(SESSIONS), message=messages, reply=replies, stream=st.booleans())
    def chat(self, session: str, message: str, reply: str, stream: bool) -> None:
        self.engine.enqueue(reply)
        before = self.expected(session)
        r = self.client.post("/chat", json=self.body(session, message, stream=stream, temperature=0))
        assert r.status_code == 200, r.get_data(as_text=True)
        if stream:
            got = sse_events(r)
            assert "".join(e["delta"] for e in got[:-1]) == reply
            final = got[-1]
            assert set(final.pop("usage")) == {"prompt_tokens", "completion_tokens", "cached_tokens"}
        else:
            final = r.get_json()
        assert final == {"message": message, "response": reply, "status": "success"}
        # The model saw the stored rounds (all fit the context here) and then the new message.
        assert self.engine.prompts[-1] == [*before, Message("user", message)]
        self.commit(session, message, reply)

    @rule(session=st.sampled_from(SESSIONS), message=messages, words=st.integers(2, 12), limit=st.integers(1, 12))
    def chat_with_max_tokens(self, session: str, message: str, words: int, limit: int) -> None:
        reply = " ".join(f"w{i}" for i in range(words))
        self.engine.enqueue(reply)
        r = self.client.post("/chat", json=self.body(session, message, max_tokens=limit))
        assert r.status_code == 200, r.get_data(as_text=True)
        cut = "".join(WORD.findall(reply)[:limit])
        assert r.get_json()["response"] == cut
        self.commit(session, message, cut)  # a reply cut by max_tokens is still a completed round

    @rule(session=st.sampled_from(SESSIONS), explicit=st.booleans())
    def reset(self, session: str, explicit: bool) -> None:
        if session == "default" and not explicit:
            r = self.client.post("/reset")
        else:
            r = self.client.post("/reset", json={"session_id": session})
        assert r.status_code == 200 and r.get_json()["status"] == "success"
        self.model[session] = []
        self.exists.add(session)

    @rule(session=st.sampled_from(SESSIONS), bad=st.sampled_from(BAD_BODIES))
    def bad_request(self, session: str, bad: Any) -> None:
        if isinstance(bad, dict):
            r = self.client.post("/chat", json={**bad, "session_id": session} if "session_id" not in bad else bad)
        else:
            r = self.client.post("/chat", data=bad, content_type="application/json")
        assert r.status_code == 400, r.get_data(as_text=True)
        assert set(r.get_json()) == {"error"} and isinstance(r.get_json()["error"], str)

    @rule(session=st.sampled_from(SESSIONS), message=messages)
    def wrong_content_type(self, session: str, message: str) -> None:
        r = self.client.post("/chat", data=f"message={message}", content_type="application/x-www-form-urlencoded")
        assert r.status_code == 415

    @rule(session=st.sampled_from(SESSIONS), message=messages, stream=st.booleans())
    def engine_failure(self, session: str, message: str, stream: bool) -> None:
        self.engine.enqueue(RuntimeError("scripted"))
        r = self.client.post("/chat", json=self.body(session, message, stream=stream))
        if stream:
            # The status line went out with the first chunk; the failure is the last event.
            assert r.status_code == 200
            got = sse_events(r)
            assert set(got[-1]) == {"error"} and "scripted" in got[-1]["error"]
            assert all("delta" in e for e in got[:-1])
        else:
            assert r.status_code == 500
            assert set(r.get_json()) == {"error"}

    @rule(message=messages, stream=st.booleans())
    def openai_failure_mid_stream(self, message: str, stream: bool) -> None:
        self.engine.enqueue(RuntimeError("scripted"))
        body = {"messages": [{"role": "user", "content": message}], "stream": stream}
        r = self.client.post("/v1/chat/completions", json=body)
        if stream:
            data = sse_data(r)
            assert data[-1] == "[DONE]"
            error = json.loads(data[-2])["error"]
            assert set(error) == {"message", "type", "param", "code"} and "scripted" in error["message"]
        else:
            assert r.status_code == 500
            assert set(r.get_json()["error"]) == {"message", "type", "param", "code"}

    @rule(session=st.sampled_from(SESSIONS), message=messages, reply=replies)
    def abandoned_stream(self, session: str, message: str, reply: str) -> None:
        """The client reads one event and goes away: the round is not stored, nothing stays locked."""
        self.engine.enqueue(reply + " and more words after that")
        r = self.client.post("/chat", json=self.body(session, message, stream=True), buffered=False)
        assert r.status_code == 200
        next(iter(r.response))
        r.close()

    @rule(session=st.sampled_from(SESSIONS), message=messages, reply=replies)
    def reset_during_generation(self, session: str, message: str, reply: str) -> None:
        """A reply that completes after a reset does not land in the fresh history."""
        self.engine.enqueue("first " + reply)
        r = self.client.post("/chat", json=self.body(session, message, stream=True), buffered=False)
        chunks = iter(r.response)
        assert b"first" in next(chunks)
        reset = self.client.post("/reset", json={"session_id": session})
        assert reset.status_code == 200
        rest = b"".join(chunks).decode()
        r.close()
        assert '"status":"success"' in rest  # the client still got its whole reply
        self.model[session] = []
        self.exists.add(session)

    @rule(message=messages, reply=replies, stream=st.booleans())
    def openai_is_stateless(self, message: str, reply: str, stream: bool) -> None:
        self.engine.enqueue(reply)
        body = {"messages": [{"role": "user", "content": message}], "stream": stream, "max_tokens": 64}
        r = self.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        if not stream:
            assert r.get_json()["choices"][0]["message"]["content"] == reply
        assert self.engine.prompts[-1] == [Message("user", message)]

    @rule(session=st.sampled_from(SESSIONS), message=messages, reply=replies, key=st.sampled_from(["k1", "k2"]))
    def idempotent_chat(self, session: str, message: str, reply: str, key: str) -> None:
        stored = self.keys.get((session, key))
        if stored is not None and stored[0] == message:
            r = self.client.post(
                "/chat", json=self.body(session, message, temperature=0), headers={"Idempotency-Key": key}
            )
            assert r.status_code == 200 and r.get_json()["response"] == stored[1]
            assert r.headers["Idempotent-Replayed"] == "true"
            return
        if stored is not None:
            r = self.client.post(
                "/chat", json=self.body(session, message, temperature=0), headers={"Idempotency-Key": key}
            )
            assert r.status_code == 409, r.get_data(as_text=True)
            return
        self.engine.enqueue(reply)
        r = self.client.post("/chat", json=self.body(session, message, temperature=0), headers={"Idempotency-Key": key})
        assert r.status_code == 200 and r.get_json()["response"] == reply
        self.commit(session, message, reply)
        self.keys[(session, key)] = (message, reply)

    @rule(session=st.sampled_from(SESSIONS))
    def delete(self, session: str) -> None:
        r = self.client.delete(f"/v1/sessions/{session}")
        if session not in self.exists:
            assert r.status_code == 404
            return
        assert r.status_code == 200 and r.get_json()["deleted"] is True
        self.exists.discard(session)
        self.model[session] = []
        self.keys = {k: v for k, v in self.keys.items() if k[0] != session}

    @rule(source=st.sampled_from(SESSIONS), into=st.sampled_from(SESSIONS), at_turn=st.integers(0, MAX_ROUNDS + 1))
    def fork(self, source: str, into: str, at_turn: int) -> None:
        r = self.client.post(f"/v1/sessions/{source}/fork", json={"id": into, "at_turn": at_turn})
        if source not in self.exists:
            assert r.status_code == 404
        elif at_turn > len(self.model[source]):
            assert r.status_code == 400 and r.get_json()["error"]["param"] == "at_turn"
        elif into in self.exists:
            assert r.status_code == 409
        else:
            assert r.status_code == 201 and r.get_json()["rounds"] == at_turn
            self.model[into] = self.model[source][:at_turn]
            self.exists.add(into)

    @precondition(lambda self: any(self.model.values()))
    @rule(session=st.sampled_from(SESSIONS))
    def status(self, session: str) -> None:
        query = "" if session == "default" else f"?session_id={session}"
        r = self.client.get("/status" + query)
        assert r.status_code == 200
        assert r.get_json()["conversation_length"] == 2 * len(self.model[session])

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def histories_match_the_model(self) -> None:
        for session in SESSIONS:
            assert self.store.history(session, owner="")[0] == self.expected(session), session

    @invariant()
    def histories_alternate_and_are_capped(self) -> None:
        for session in SESSIONS:
            history = self.store.history(session, owner="")[0]
            assert len(history) <= 2 * MAX_ROUNDS
            assert [m.role for m in history] == ["user", "assistant"] * (len(history) // 2)

    @invariant()
    def the_list_shows_the_sessions_that_exist(self) -> None:
        listed = self.client.get("/v1/sessions?limit=100").get_json()["data"]
        assert {s["id"] for s in listed} == self.exists
        assert all(s["rounds"] == len(self.model[s["id"]]) for s in listed)

    @invariant()
    def no_scripted_reply_is_left_over(self) -> None:
        # Every rule consumes what it scripted; a leftover would mean a generation never ran.
        assert not self.engine._script


SessionHistory.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSessionHistory = SessionHistory.TestCase


def test_sse_events_survive_naive_line_splitting(fake: FakeApp) -> None:
    """Text with U+2028, U+0085 and friends still gives one event per line to str.splitlines()."""
    tricky = "a\u2028b \x85c \u2029d \x1ce \x0bf \r\ng"
    fake.engine.enqueue(tricky)
    got = sse_events(fake.client.post("/chat", json={"message": tricky, "stream": True}))
    assert "usage" in got[-1] and got[-1] | {"usage": None} == {
        "message": tricky,
        "response": tricky,
        "status": "success",
        "usage": None,
    }
    fake.engine.enqueue(tricky)
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    events = sse_events(fake.client.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == tricky
