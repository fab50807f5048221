"""A hypothesis state machine over two tenants: nothing one key does changes what the other key sees.

Both keys chat (in the default session and in named sessions that share ids across tenants), reset,
create, retitle, fork and delete sessions, store and continue responses, open conversations and add to
them, and aim every one of those at the other tenant's ids too. After each step, the tenant that did
not act sees exactly what it saw before, and the one that acted never got another's data back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings

KEYS = {"a": "key-of-a", "b": "key-of-b"}
tenants = st.sampled_from(sorted(KEYS))
session_ids = st.sampled_from(["default", "work", "s1", "s2"])
words = st.text(st.sampled_from("ab xy"), min_size=1, max_size=8).filter(lambda s: s.strip() != "")


class TwoTenants(RuleBasedStateMachine):
    """Random operations of two keys on one server; a tenant's own view changes only by its own acts."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="pureapi-tenants-"))
        self.engine = FakeEngine(context_length=4096)
        self.store = SQLiteStore(self.tmp / "s.db")
        app = create_app(
            Settings(engine="fake", max_rounds=3, db=self.tmp / "s.db", api_key=list(KEYS.values())),
            engine=self.engine,
            store=self.store,
        )
        self.client = app.test_client()
        self.responses: dict[str, list[str]] = {"a": [], "b": []}  # stored response ids by creator
        self.conversations: dict[str, list[str]] = {"a": [], "b": []}
        self.secrets: dict[str, set[str]] = {"a": set(), "b": set()}  # every text a tenant ever sent
        self.views = {t: self.view(t) for t in KEYS}

    def teardown(self) -> None:
        self.engine.close()
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def call(self, tenant: str, method: str, path: str, body: Any = None) -> Any:
        return self.client.open(path, method=method, json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"})

    def view(self, tenant: str) -> dict[str, Any]:
        """Everything the tenant can read of its own state through the API."""
        listed = self.call(tenant, "GET", "/v1/sessions?limit=100").get_json()["data"]
        sessions = {s["id"]: self.call(tenant, "GET", f"/v1/sessions/{s['id']}").get_json() for s in listed}
        for s in sessions.values():
            s.pop("updated_at")
        responses = {
            rid: self.call(tenant, "GET", f"/v1/responses/{rid}").status_code for rid in self.responses[tenant]
        }
        conversations = {
            cid: (
                self.call(tenant, "GET", f"/v1/conversations/{cid}").get_json(),
                self.call(tenant, "GET", f"/v1/conversations/{cid}/items").get_json(),
            )
            for cid in self.conversations[tenant]
        }
        default = self.call(tenant, "GET", "/status").get_json()["conversation_length"]
        return {"sessions": sessions, "responses": responses, "conversations": conversations, "default": default}

    def acted(self, tenant: str, response: Any) -> None:
        """After an act of `tenant`: the other's view is unchanged, and no answer leaked the other's text."""
        other = "b" if tenant == "a" else "a"
        assert response.status_code < 500, response.get_data(as_text=True)
        body = response.get_data(as_text=True)
        for text in self.secrets[other] - self.secrets[tenant]:
            assert f"<{text}>" not in body, (text, body)
        assert self.view(other) == self.views[other]
        self.views[tenant] = self.view(tenant)

    def sent(self, tenant: str, text: str) -> str:
        """A message marked as the tenant's, so that a leak of it can be recognised in any answer."""
        self.secrets[tenant].add(text)
        return f"<{text}>"

    @rule(tenant=tenants, session=session_ids, text=words)
    def chat(self, tenant: str, session: str, text: str) -> None:
        self.engine.enqueue("ok")
        body: dict[str, Any] = {"message": self.sent(tenant, text), "max_tokens": 4}
        if session != "default":
            body["session_id"] = session
        r = self.call(tenant, "POST", "/chat", body)
        prompt = " ".join(m.content for m in self.engine.prompts[-1])
        other = "b" if tenant == "a" else "a"
        for leaked in self.secrets[other] - self.secrets[tenant]:
            assert f"<{leaked}>" not in prompt  # the turn never saw the other tenant's history
        self.acted(tenant, r)

    @rule(tenant=tenants, session=session_ids)
    def reset(self, tenant: str, session: str) -> None:
        self.acted(tenant, self.call(tenant, "POST", "/reset", {"session_id": session}))

    @rule(tenant=tenants, session=session_ids, text=words)
    def create(self, tenant: str, session: str, text: str) -> None:
        r = self.call(tenant, "POST", "/v1/sessions", {"id": session, "system_prompt": self.sent(tenant, text)})
        self.acted(tenant, r)

    @rule(tenant=tenants, session=session_ids, text=words)
    def retitle(self, tenant: str, session: str, text: str) -> None:
        r = self.call(tenant, "PATCH", f"/v1/sessions/{session}", {"system_prompt": self.sent(tenant, text)})
        self.acted(tenant, r)

    @rule(tenant=tenants, source=session_ids, into=session_ids)
    def fork(self, tenant: str, source: str, into: str) -> None:
        self.acted(tenant, self.call(tenant, "POST", f"/v1/sessions/{source}/fork", {"id": into + "-f"}))

    @rule(tenant=tenants, session=session_ids)
    def delete(self, tenant: str, session: str) -> None:
        self.acted(tenant, self.call(tenant, "DELETE", f"/v1/sessions/{session}"))

    @rule(tenant=tenants, text=words, data=st.data())
    def respond(self, tenant: str, text: str, data: st.DataObject) -> None:
        """A new response, continuing any stored one (the other tenant's too: that must be a 404)."""
        pool = self.responses["a"] + self.responses["b"]
        previous = data.draw(st.sampled_from([None, *pool]))
        body: dict[str, Any] = {"input": self.sent(tenant, text), "max_output_tokens": 4}
        if previous is not None:
            body["previous_response_id"] = previous
        self.engine.enqueue("ok")
        r = self.call(tenant, "POST", "/v1/responses", body)
        if previous is not None and previous not in self.responses[tenant]:
            assert r.status_code == 404
        if r.status_code == 200:
            self.responses[tenant].append(r.get_json()["id"])
        self.acted(tenant, r)

    @precondition(lambda self: self.responses["a"] or self.responses["b"])
    @rule(tenant=tenants, data=st.data())
    def delete_response(self, tenant: str, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.responses["a"] + self.responses["b"]))
        self.acted(tenant, self.call(tenant, "DELETE", f"/v1/responses/{rid}"))

    @rule(tenant=tenants, text=words)
    def open_conversation(self, tenant: str, text: str) -> None:
        r = self.call(
            tenant, "POST", "/v1/conversations", {"items": [{"role": "user", "content": self.sent(tenant, text)}]}
        )
        self.conversations[tenant].append(r.get_json()["id"])
        self.acted(tenant, r)

    @precondition(lambda self: self.conversations["a"] or self.conversations["b"])
    @rule(tenant=tenants, text=words, data=st.data())
    def add_to_conversation(self, tenant: str, text: str, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.conversations["a"] + self.conversations["b"]))
        items = {"items": [{"role": "user", "content": self.sent(tenant, text)}]}
        self.acted(tenant, self.call(tenant, "POST", f"/v1/conversations/{cid}/items", items))

    @precondition(lambda self: self.conversations["a"] or self.conversations["b"])
    @rule(tenant=tenants, data=st.data())
    def delete_conversation(self, tenant: str, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.conversations["a"] + self.conversations["b"]))
        self.acted(tenant, self.call(tenant, "DELETE", f"/v1/conversations/{cid}"))


TwoTenants.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_two_tenants = TwoTenants.TestCase
