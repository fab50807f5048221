"""A hypothesis state machine over stored responses and conversations: prompts always match a simple model.

The model is what the README promises: a turn continued from a stored response sees that chain's
newest `max_rounds` turns, back to the newest deleted one (deleting a response cuts the chains of
its descendants there); one in a conversation sees its items; a failed or abandoned turn and a
restart (a new app on the same file) change nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings
from pureapi.types import Message

MAX_ROUNDS = 3
words = st.text(st.sampled_from("ab xy\né中"), min_size=1, max_size=12).filter(lambda s: s.strip() != "")


class ResponseChains(RuleBasedStateMachine):
    """Create, fork, fail, abandon and delete responses, talk in a conversation, and restart."""

    stored = Bundle("stored")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pureapi-rsm-"))
        self.open_app()
        # response id -> its chain's turns (id, input, reply), oldest first, itself last
        self.chains: dict[str, list[tuple[str, str, str]]] = {}
        self.deleted: set[str] = set()
        self.conversation = self.client.post("/v1/conversations", json={}).get_json()["id"]
        self.conversation_turns: list[tuple[str, str]] = []

    def open_app(self) -> None:
        self.engine = FakeEngine(context_length=4096)
        self.store = SQLiteStore(self.tmp / "s.db")
        app = create_app(
            Settings(engine="fake", max_rounds=MAX_ROUNDS, db=self.tmp / "s.db"), engine=self.engine, store=self.store
        )
        self.client = app.test_client()

    def teardown(self) -> None:
        self.engine.close()
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def left_of(self, chain: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """What a chain still holds: the turns after its newest deleted one (deleting cuts the chain there)."""
        kept: list[tuple[str, str]] = []
        for rid, text, reply in reversed(chain):
            if rid in self.deleted:
                break
            kept.append((text, reply))
        return kept[::-1]

    def expected_prompt(self, turns: list[tuple[str, str]], text: str) -> list[Message]:
        window = turns[-MAX_ROUNDS:]
        return [m for u, a in window for m in (Message("user", u), Message("assistant", a))] + [Message("user", text)]

    def script(self, parent: str, reply: str | BaseException) -> None:
        """Queue the engine's reply for a turn that will reach it (one continuing a deleted response will not)."""
        if parent not in self.deleted:
            self.engine.enqueue(reply)

    @rule(target=stored, text=words, reply=words)
    def start_chain(self, text: str, reply: str) -> str:
        self.engine.enqueue(reply)
        body = self.client.post("/v1/responses", json={"input": text}).get_json()
        assert self.engine.prompts[-1] == self.expected_prompt([], text)
        self.chains[body["id"]] = [(body["id"], text, reply)]
        return str(body["id"])

    @rule(target=stored, parent=stored, text=words, reply=words)
    def continue_chain(self, parent: str, text: str, reply: str) -> str:
        self.script(parent, reply)
        r = self.client.post("/v1/responses", json={"input": text, "previous_response_id": parent})
        if parent in self.deleted:
            assert r.status_code == 404
            return parent
        assert r.status_code == 200, r.get_json()
        assert self.engine.prompts[-1] == self.expected_prompt(self.left_of(self.chains[parent]), text)
        rid = r.get_json()["id"]
        self.chains[rid] = [*self.chains[parent], (rid, text, reply)]
        return str(r.get_json()["id"])

    @rule(parent=stored, text=words, stream=st.booleans())
    def fail_a_turn(self, parent: str, text: str, stream: bool) -> None:
        self.script(parent, RuntimeError("boom"))
        r = self.client.post("/v1/responses", json={"input": text, "previous_response_id": parent, "stream": stream})
        r.get_data()
        if parent not in self.deleted and not stream:
            assert r.status_code == 500

    @rule(parent=stored, text=words)
    def abandon_a_stream(self, parent: str, text: str) -> None:
        self.script(parent, "one two three four")
        r = self.client.post("/v1/responses", json={"input": text, "previous_response_id": parent, "stream": True})
        if r.status_code == 200:
            chunks = iter(r.response)
            next(chunks)
            r.close()  # the client goes away after the first event

    @rule(target=stored, victim=consumes(stored))
    def delete(self, victim: str) -> str:
        r = self.client.delete(f"/v1/responses/{victim}")
        assert r.status_code == (404 if victim in self.deleted else 200)
        self.deleted.add(victim)
        return victim

    @rule(text=words, reply=words)
    def talk_in_the_conversation(self, text: str, reply: str) -> None:
        self.engine.enqueue(reply)
        r = self.client.post("/v1/responses", json={"input": text, "conversation": self.conversation, "store": False})
        assert r.status_code == 200
        assert self.engine.prompts[-1] == self.expected_prompt(self.conversation_turns, text)
        self.conversation_turns.append((text, reply))

    @rule()
    def restart(self) -> None:
        self.engine.close()
        self.store.close()
        self.open_app()

    @invariant()
    def stored_rows_match(self) -> None:
        with self.store.reading() as db:
            rows = {r[0] for r in db.execute("SELECT id FROM responses").fetchall()}
            items = db.execute("SELECT COUNT(*) FROM conversation_items").fetchone()[0]
        assert rows == set(self.chains) - self.deleted
        assert items == 2 * len(self.conversation_turns)


ResponseChains.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestResponseChains = ResponseChains.TestCase
