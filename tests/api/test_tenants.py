"""Tenants through Flask's test client: two API keys, every stateful route in both directions, no oracle.

Each key is a principal that owns what it creates; the other key gets exactly what an id that never
existed gets, and nothing it does changes the owner's state. An admin acts for a tenant with X-Tenant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from pureapi.tenants import KeyFileError, Keyring, TenantLimits, parse_key_file, unnamed

from ..conftest import FakeApp, MakeFakeApp

A = {"Authorization": "Bearer key-of-a"}
B = {"Authorization": "Bearer key-of-b"}
ADMIN = {"Authorization": "Bearer key-of-root"}
TWO_KEYS = {"api_key": ["key-of-a", "key-of-b"], "admin_key": ["key-of-root"]}


@pytest.fixture
def two(make_fake_app: MakeFakeApp) -> FakeApp:
    """An app with keys A and B (and an admin key), over the scripted engine."""
    return make_fake_app(settings=TWO_KEYS)


def chat(client: FlaskClient, who: dict[str, str], message: str, session: str | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {"message": message, "max_tokens": 8, **extra}
    if session is not None:
        body["session_id"] = session
    return client.post("/chat", json=body, headers=who)


def last_prompt(app: FakeApp) -> str:
    """The text of the last prompt the engine encoded."""
    return "\n".join(m.content for m in app.engine.prompts[-1])


def snapshot(client: FlaskClient, who: dict[str, str]) -> dict[str, Any]:
    """Everything a tenant can see of its own state."""
    sessions = client.get("/v1/sessions?limit=100", headers=who).get_json()["data"]
    full = {s["id"]: client.get(f"/v1/sessions/{s['id']}", headers=who).get_json() for s in sessions}
    status = client.get("/status", headers=who).get_json()["conversation_length"]
    return {"sessions": full, "default_length": status}


def test_each_key_has_its_own_default_session(two: FakeApp) -> None:
    """A bare /chat continues the caller's own conversation, and /reset erases only the caller's."""
    two.engine.enqueue("to a", "to b", "again a")
    assert chat(two.client, A, "I am A").status_code == 200
    assert chat(two.client, B, "I am B").status_code == 200
    assert chat(two.client, A, "still A").status_code == 200
    # A's second turn saw only A's history.
    assert "I am B" not in last_prompt(two) and "I am A" in last_prompt(two)
    assert two.client.get("/status", headers=A).get_json()["conversation_length"] == 4
    assert two.client.get("/status", headers=B).get_json()["conversation_length"] == 2
    assert two.client.post("/reset", json={}, headers=B).status_code == 200
    assert two.client.get("/status", headers=A).get_json()["conversation_length"] == 4
    assert two.client.get("/status", headers=B).get_json()["conversation_length"] == 0


def test_sessions_of_one_key_are_invisible_to_the_other(two: FakeApp) -> None:
    """B cannot list, read, continue, fork, retitle or delete A's session; A's state is unchanged after."""
    c = two.client
    assert c.post("/v1/sessions", json={"id": "work", "system_prompt": "secret A"}, headers=A).status_code == 201
    two.engine.enqueue("reply to A")
    assert chat(c, A, "hello", "work").status_code == 200
    before = snapshot(c, A)

    assert c.get("/v1/sessions", headers=B).get_json()["data"] == []
    never = c.get("/v1/sessions/never-was", headers=B)
    for method, path, body in [
        ("GET", "/v1/sessions/work", None),
        ("PATCH", "/v1/sessions/work", {"system_prompt": "injected"}),
        ("DELETE", "/v1/sessions/work", None),
        ("POST", "/v1/sessions/work/fork", {"id": "stolen"}),
    ]:
        r = c.open(path, method=method, json=body, headers=B)
        assert r.status_code == 404, (method, path, r.get_data(as_text=True))
        # The same body as an id that never existed, but for the id itself.
        assert r.get_json() == {
            **never.get_json(),
            "error": {
                **never.get_json()["error"],
                "message": never.get_json()["error"]["message"].replace("never-was", "work"),
            },
        }
    assert c.get("/status?session_id=work", headers=B).get_json()["conversation_length"] == 0
    # B's turn on 'work' is B's own session of that name: it does not see A's history or prompt.
    two.engine.enqueue("reply to B")
    assert chat(c, B, "mine", "work").status_code == 200
    assert "secret A" not in last_prompt(two) and "hello" not in last_prompt(two)
    assert c.post("/reset", json={"session_id": "work"}, headers=B).status_code == 200
    assert snapshot(c, A) == before


def test_no_existence_oracle_on_sessions(two: FakeApp) -> None:
    """Creating, paging after or forking with another tenant's id answers as with an unused id."""
    c = two.client
    assert c.post("/v1/sessions", json={"id": "taken"}, headers=A).status_code == 201
    two.engine.enqueue("r1", "r2")
    chat(c, A, "one", "taken")
    chat(c, A, "two", "taken")
    # B may create its own 'taken': 201, not 409.
    assert c.post("/v1/sessions", json={"id": "taken"}, headers=B).status_code == 201
    assert c.post("/v1/sessions", json={"id": "taken"}, headers=B).status_code == 409  # its own, now
    # Paging after A's id: the same 400 as after an unknown id.
    after_a = c.get("/v1/sessions?after=only-a", headers=B)
    assert c.post("/v1/sessions", json={"id": "only-a"}, headers=A).status_code == 201
    after_a_now = c.get("/v1/sessions?after=only-a", headers=B)
    assert after_a.status_code == after_a_now.status_code == 400
    assert after_a.get_json() == after_a_now.get_json()
    # Forking A's session past its end tells B nothing about A's round count.
    fork = c.post("/v1/sessions/only-a/fork", json={"at_turn": 5}, headers=B)
    unknown = c.post("/v1/sessions/nothing/fork", json={"at_turn": 5}, headers=B)
    assert fork.status_code == unknown.status_code == 404
    assert "rounds" not in fork.get_json()["error"]["message"]


def test_idempotent_replay_is_per_tenant(two: FakeApp) -> None:
    """B sending A's body and Idempotency-Key gets a new turn of its own, not A's stored reply."""
    c = two.client
    two.engine.enqueue("A's reply", "B's reply")
    body = {"message": "same", "max_tokens": 8, "session_id": "s"}
    first = c.post("/chat", json=body, headers={**A, "Idempotency-Key": "k1"})
    second = c.post("/chat", json=body, headers={**B, "Idempotency-Key": "k1"})
    assert first.get_json()["response"] == "A's reply"
    assert second.get_json()["response"] == "B's reply" and "Idempotent-Replayed" not in second.headers
    again = c.post("/chat", json=body, headers={**A, "Idempotency-Key": "k1"})
    assert again.get_json()["response"] == "A's reply" and again.headers["Idempotent-Replayed"] == "true"


def test_responses_and_conversations_belong_to_their_key(two: FakeApp) -> None:
    """B cannot read, continue, list the input of or delete A's response, nor touch A's conversation."""
    c = two.client
    two.engine.enqueue("stored answer")
    made = c.post("/v1/responses", json={"input": "A's question", "max_output_tokens": 8}, headers=A).get_json()
    rid = made["id"]
    conv = c.post("/v1/conversations", json={"items": [{"role": "user", "content": "A's item"}]}, headers=A)
    cid = conv.get_json()["id"]
    item = c.get(f"/v1/conversations/{cid}/items", headers=A).get_json()["data"][0]["id"]
    missing_response = c.get("/v1/responses/resp_none", headers=B)
    prompts = len(two.engine.prompts)

    for method, path, body in [
        ("GET", f"/v1/responses/{rid}", None),
        ("GET", f"/v1/responses/{rid}/input_items", None),
        ("DELETE", f"/v1/responses/{rid}", None),
        ("POST", "/v1/responses", {"input": "go on", "previous_response_id": rid}),
        ("GET", f"/v1/conversations/{cid}", None),
        ("POST", f"/v1/conversations/{cid}", {"metadata": {"x": "y"}}),
        ("GET", f"/v1/conversations/{cid}/items", None),
        ("POST", f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "planted"}]}),
        ("GET", f"/v1/conversations/{cid}/items/{item}", None),
        ("DELETE", f"/v1/conversations/{cid}/items/{item}", None),
        ("POST", "/v1/responses", {"input": "answer into it", "conversation": cid}),
        ("DELETE", f"/v1/conversations/{cid}", None),
    ]:
        r = c.open(path, method=method, json=body, headers=B)
        assert r.status_code == 404, (method, path, r.get_data(as_text=True))
        assert r.get_json()["error"]["type"] == missing_response.get_json()["error"]["type"]
    assert len(two.engine.prompts) == prompts  # no turn of B's reached the engine
    assert c.get(f"/v1/responses/{rid}", headers=A).get_json()["id"] == rid
    items = c.get(f"/v1/conversations/{cid}/items", headers=A).get_json()["data"]
    assert [i["id"] for i in items] == [item]
    assert c.get(f"/v1/conversations/{cid}", headers=A).get_json()["metadata"] == {}
    # A continues its own chain as before.
    two.engine.enqueue("continued")
    r = c.post("/v1/responses", json={"input": "more", "previous_response_id": rid}, headers=A)
    assert r.status_code == 200 and "A's question" in last_prompt(two)


def test_admin_acts_for_a_tenant_and_lists_them(two: FakeApp) -> None:
    """An admin reaches a tenant's sessions with X-Tenant; a plain key may not name one."""
    c = two.client
    assert c.post("/v1/sessions", json={"id": "a1"}, headers=A).status_code == 201
    assert c.get("/v1/sessions", headers=ADMIN).get_json()["data"] == []  # its own, without X-Tenant
    name_a = unnamed("key-of-a")
    listed = c.get("/v1/sessions", headers={**ADMIN, "X-Tenant": name_a}).get_json()["data"]
    assert [s["id"] for s in listed] == ["a1"]
    r = c.get("/v1/sessions", headers={**B, "X-Tenant": name_a})
    assert r.status_code == 403 and "admin" in r.get_json()["error"]["message"]
    assert c.get("/v1/sessions", headers={**ADMIN, "X-Tenant": "no/such"}).status_code == 400
    tenants = c.get("/v1/tenants", headers=ADMIN).get_json()["data"]
    by_name = {t["name"]: t for t in tenants}
    assert by_name[name_a]["usage"]["sessions"] == 1 and not by_name[name_a]["admin"]
    assert by_name[unnamed("key-of-root")]["admin"] and "anonymous" in by_name
    assert "key-of-a" not in c.get("/v1/tenants", headers=ADMIN).get_data(as_text=True)
    assert c.get("/v1/tenants", headers=A).status_code == 403
    assert c.delete("/v1/sessions/a1", headers={**ADMIN, "X-Tenant": name_a}).status_code == 200
    assert c.get("/v1/sessions", headers=A).get_json()["data"] == []


def test_without_keys_one_tenant_sees_everything_as_before(fake: FakeApp) -> None:
    """No key configured: the seed API's single shared conversation, unchanged; X-Tenant is refused."""
    fake.engine.enqueue("one", "two")
    chat(fake.client, {}, "first")
    chat(fake.client, {}, "second")
    assert fake.client.get("/status").get_json()["conversation_length"] == 4
    assert fake.store.history("default", owner="")[0][0].content == "first"
    assert fake.client.get("/v1/sessions", headers={"X-Tenant": "x"}).status_code == 403


def test_rows_from_before_tenants_go_to_the_anonymous_principal(make_fake_app: MakeFakeApp) -> None:
    """A database written without keys: once keys are set, no key sees its sessions; an admin reaches them."""
    before = make_fake_app()
    before.engine.enqueue("old reply")
    chat(before.client, {}, "old", "legacy")
    after = make_fake_app(settings=TWO_KEYS)
    assert after.client.get("/v1/sessions", headers=A).get_json()["data"] == []
    as_anonymous = {**ADMIN, "X-Tenant": "anonymous"}
    assert [s["id"] for s in after.client.get("/v1/sessions", headers=as_anonymous).get_json()["data"]] == ["legacy"]


def test_key_file(tmp_path: Path, make_fake_app: MakeFakeApp) -> None:
    """Named keys from a file, with roles and limits; mistakes name the line; a reload takes new keys."""
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalice:sk-alice max_concurrent=2\nops:sk-ops admin  # the operator\n")
    app = make_fake_app(settings={"api_key_file": keys})
    r = app.client.post("/v1/sessions", json={"id": "x"}, headers={"Authorization": "Bearer sk-alice"})
    assert r.status_code == 201
    listed = app.client.get("/v1/tenants", headers={"Authorization": "Bearer sk-ops"}).get_json()["data"]
    assert {t["name"]: t["max_concurrent"] for t in listed} == {"alice": 2, "ops": 0, "anonymous": 0}
    admin = {"Authorization": "Bearer sk-ops", "X-Tenant": "alice"}
    assert [s["id"] for s in app.client.get("/v1/sessions", headers=admin).get_json()["data"]] == ["x"]
    assert app.client.get("/v1/sessions", headers={"Authorization": "Bearer sk-bob"}).status_code == 401
    keys.write_text("alice:sk-alice\nbob:sk-bob\n")
    app.app.extensions["pureapi"].keys.reload()
    assert app.client.get("/v1/sessions", headers={"Authorization": "Bearer sk-bob"}).status_code == 200
    assert app.client.get("/v1/sessions", headers={"Authorization": "Bearer sk-ops"}).status_code == 401
    for text, problem in [
        ("alice\n", "line 1: expected 'name:key'"),
        ("ok:k1\nbad name:k2\n", "line 2"),
        ("a:k1\na:k2\n", "given twice"),
        ("a:k1\nb:k1\n", "already given"),
        ("a:k1 superuser\n", "unknown option 'superuser'"),
        ("anonymous:k1\n", "not 'anonymous'"),
    ]:
        keys.write_text(text)
        with pytest.raises(KeyFileError, match=problem):
            parse_key_file(keys)
    with pytest.raises(KeyFileError, match="cannot read"):
        Keyring([], key_file=tmp_path / "missing")
    # Emptying the file never opens the server: the reload is refused and the keys in force stay.
    keys.write_text("alice:sk-alice\n")
    ring = Keyring([], key_file=keys)
    keys.write_text("# everyone left\n")
    with pytest.raises(KeyFileError, match="holds no keys"):
        ring.reload()
    assert ring and [p.name for p in ring.principals()] == ["alice"]
    with pytest.raises(KeyFileError, match="holds no keys"):
        Keyring([], key_file=keys)


def test_a_tenant_over_its_concurrency_gets_429(make_fake_app: MakeFakeApp) -> None:
    """With --tenant-max-concurrent 1, a second generation of the same key is a 429; another key still runs."""
    app = make_fake_app(settings={**TWO_KEYS, "tenant_max_concurrent": 1}, token_delay=0.05)
    app.engine.enqueue("a " * 20, "b")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
    first = app.client.post("/v1/chat/completions", json=body, headers=A, buffered=False)
    assert first.status_code == 200
    stream = first.response
    next(iter(stream))  # the first generation is running
    second = app.client.post("/v1/chat/completions", json=body, headers=A)
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
    assert second.get_json()["error"]["code"] == "concurrency_limit_exceeded"
    assert app.client.post("/v1/chat/completions", json={**body, "stream": False}, headers=B).status_code == 200
    first.close()
    metrics = app.client.get("/metrics", headers=ADMIN).get_data(as_text=True)
    assert f'pureapi_tenant_rejected_total{{tenant="{unnamed("key-of-a")}"}} 1.0' in metrics
    assert "key-of-a" not in metrics.replace(unnamed("key-of-a"), "")
    assert "pureapi_tenant_" not in app.client.get("/metrics", headers=B).get_data(as_text=True)


def test_a_tenant_over_its_token_budget_gets_429_until_the_minute_passes() -> None:
    """The budget counts prompt and reply tokens over a sliding minute; Retry-After says when it frees up."""
    now = [1000.0]
    limits = TenantLimits(clock=lambda: now[0])
    from pureapi.tenants import Principal

    who = Principal("t", tokens_per_minute=100)
    with limits.admit(who):
        limits.spent(who, 50, 10)
    now[0] += 20
    with limits.admit(who):
        limits.spent(who, 30, 20)  # 110 in the window now
    now[0] += 5
    with pytest.raises(Exception) as refused, limits.admit(who):
        pass
    assert getattr(refused.value, "status", None) == 429
    assert refused.value.retry_after == 35  # type: ignore[attr-defined]  # the first 60 tokens leave at t=1060
    now[0] += 35
    with limits.admit(who):
        pass
    assert limits.usage()["t"]["tokens_last_minute"] == 50 and limits.usage()["t"]["rejected"] == 1


def test_the_budget_is_enforced_over_http(make_fake_app: MakeFakeApp) -> None:
    """A tenant that spent its tokens is refused with OpenAI's envelope and Retry-After; the other key is not."""
    app = make_fake_app(settings={**TWO_KEYS, "tenant_tokens_per_minute": 5})
    app.engine.enqueue("a b c d e f", "more", "for b")
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    assert app.client.post("/v1/chat/completions", json=body, headers=A).status_code == 200
    refused = app.client.post("/v1/chat/completions", json=body, headers=A)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert chat(app.client, A, "seed too").status_code == 429
    assert app.client.post("/v1/chat/completions", json=body, headers=B).status_code == 200


def test_the_transformers_batch_refuses_several_tenants_with_per_key_kv() -> None:
    """Its pages are shared by content across requests: several keys with --kv-cache-scope key is refused."""
    from pureapi.server import shared_kv_refusal
    from pureapi.settings import Settings

    refused = shared_kv_refusal(Settings(), 2, "transformers")
    assert refused is not None and "--kv-cache-scope global" in refused and "--parallel 1" in refused
    assert shared_kv_refusal(Settings(kv_cache_scope="global"), 2, "transformers") is None
    assert shared_kv_refusal(Settings(max_batch_size=1), 2, "transformers") is None
    assert shared_kv_refusal(Settings(), 1, "transformers") is None
    assert shared_kv_refusal(Settings(), 2, "llamacpp") is None


def test_one_tenants_backlog_does_not_hold_another_tenants_request_behind_it(make_fake_app: MakeFakeApp) -> None:
    """One slot: A has a reply running and two waiting when B asks; B's reply is the next to start."""
    app = make_fake_app(settings=TWO_KEYS, token_delay=0.05)
    app.engine.enqueue(" ".join(["long"] * 30), "second", "third", "fourth")
    answers: dict[str, str] = {}

    def ask(name: str, who: dict[str, str]) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": name}], "max_tokens": 64}
        answers[name] = app.client.post("/v1/chat/completions", json=body, headers=who).get_json()["choices"][0][
            "message"
        ]["content"]

    gateway = app.app.extensions["pureapi"].gateway
    threads = []
    for queued, (name, who) in enumerate([("a1", A), ("a2", A), ("a3", A), ("b", B)]):
        threads.append(threading.Thread(target=ask, args=(name, who)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        # a1 runs (its first token is out), the others wait, each queued before the next is sent.
        while (gateway.running() < 1 or app.engine.queued() < queued) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert app.engine.queued() == 3 and "a1" not in answers  # all queued while a1 still runs
    for t in threads:
        t.join(30)
    assert answers["b"] == "second"  # first come, first served would make it "fourth"
    assert [answers["a2"], answers["a3"]] == ["third", "fourth"]


def test_a_tenant_that_fills_the_server_cannot_lock_another_out(make_fake_app: MakeFakeApp) -> None:
    """One slot and --max-queue 1: the cap is 2 in flight. A holds both (one running, one waiting) and its
    third request gets a 503; B, holding nothing, still gets in (its share of the cap is 1, and the
    server has one spare place per slot), and B's second request is the one refused."""
    app = make_fake_app(settings={**TWO_KEYS, "max_queue": 1}, token_delay=0.05)
    app.engine.enqueue(" ".join(["long"] * 30), "second", "third")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    answers: dict[str, Any] = {}

    def ask(name: str, who: dict[str, str]) -> None:
        answers[name] = app.client.post("/v1/chat/completions", json=body, headers=who)

    def started(name: str, who: dict[str, str], until: Callable[[], bool]) -> threading.Thread:
        thread = threading.Thread(target=ask, args=(name, who))
        thread.start()
        deadline = time.monotonic() + 10
        while not until() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert until()
        return thread

    gateway = app.app.extensions["pureapi"].gateway
    threads = [started("a1", A, lambda: gateway.running() == 1)]  # a1 produces tokens
    threads.append(started("a2", A, lambda: app.engine.queued() == 1))
    refused = app.client.post("/v1/chat/completions", json=body, headers=A)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    threads.append(started("b1", B, lambda: app.engine.queued() == 2))  # past the cap: B is below its share
    assert app.client.post("/v1/chat/completions", json=body, headers=B).status_code == 503  # not twice
    for t in threads:
        t.join(30)
    assert {name: r.status_code for name, r in answers.items()} == {"a1": 200, "a2": 200, "b1": 200}
    assert answers["b1"].get_json()["choices"][0]["message"]["content"] == "second"  # B's turn came next
