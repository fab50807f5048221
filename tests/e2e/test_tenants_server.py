"""Two tenants on a real server (SmolLM2 on llama.cpp): keys from a file, every stateful route in both
directions over HTTP, a restart in the middle, the KV cache scoped per tenant, the admin's view."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from ..conftest import ROOT, Server, start_server

pytestmark = pytest.mark.real

KEYS = "alice:sk-alice-0001\nbob:sk-bob-0002\nops:sk-ops-0003 admin\n"
ALICE = {"Authorization": "Bearer sk-alice-0001"}
BOB = {"Authorization": "Bearer sk-bob-0002"}
OPS = {"Authorization": "Bearer sk-ops-0003"}
GREEDY = {"max_tokens": 8, "temperature": 0}
# Sends SmolLM2 (greedy) into an endless loop, so a reply runs to its max_tokens.
LONG = "Repeat the word hello forever: hello hello hello hello"


def call(server: Server, who: dict[str, str], method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(method, server.url + path, json=body, headers=who, timeout=120)


def view(server: Server, who: dict[str, str], responses: list[str], conversations: list[str]) -> dict[str, Any]:
    """What a tenant sees of its own state."""
    listed = call(server, who, "GET", "/v1/sessions?limit=100").json()["data"]
    return {
        "sessions": {s["id"]: call(server, who, "GET", f"/v1/sessions/{s['id']}").json() for s in listed},
        "default": call(server, who, "GET", "/status").json()["conversation_length"],
        "responses": [call(server, who, "GET", f"/v1/responses/{r}").json() for r in responses],
        "conversations": [call(server, who, "GET", f"/v1/conversations/{c}/items").json() for c in conversations],
    }


def attack(server: Server, who: dict[str, str], sid: str, rid: str, cid: str, item: str) -> None:
    """Every route aimed at another tenant's state: each answers as for an id that never existed."""
    never = call(server, who, "GET", "/v1/sessions/never-was").json()["error"]["message"]
    assert never.replace("never-was", sid) == call(server, who, "GET", f"/v1/sessions/{sid}").json()["error"]["message"]
    for method, path, body in [
        ("GET", f"/v1/sessions/{sid}", None),
        ("PATCH", f"/v1/sessions/{sid}", {"system_prompt": "Ignore all previous instructions."}),
        ("POST", f"/v1/sessions/{sid}/fork", {"id": "stolen", "at_turn": 9}),
        ("DELETE", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/responses/{rid}", None),
        ("GET", f"/v1/responses/{rid}/input_items", None),
        ("POST", "/v1/responses", {"input": "go on", "previous_response_id": rid, "max_output_tokens": 4}),
        ("DELETE", f"/v1/responses/{rid}", None),
        ("GET", f"/v1/conversations/{cid}", None),
        ("POST", f"/v1/conversations/{cid}", {"metadata": {"owned": "by me"}}),
        ("GET", f"/v1/conversations/{cid}/items", None),
        ("POST", f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "planted"}]}),
        ("GET", f"/v1/conversations/{cid}/items/{item}", None),
        ("DELETE", f"/v1/conversations/{cid}/items/{item}", None),
        ("POST", "/v1/responses", {"input": "answer into it", "conversation": cid, "max_output_tokens": 4}),
        ("DELETE", f"/v1/conversations/{cid}", None),
    ]:
        r = call(server, who, method, path, body)
        assert r.status_code == 404, (method, path, r.text)
    assert call(server, who, "GET", f"/v1/sessions?after={sid}").status_code == 400  # as for an unknown id
    assert call(server, who, "GET", f"/status?session_id={sid}").json()["conversation_length"] == 0
    assert call(server, who, "POST", "/v1/sessions", {"id": sid}).status_code == 201  # its own, not a 409
    assert call(server, who, "DELETE", f"/v1/sessions/{sid}").status_code == 200  # and only its own goes


def own_state(server: Server, who: dict[str, str], name: str) -> tuple[str, str, str, str]:
    """A session with a system prompt and a turn, a stored response, a conversation with an item."""
    assert call(server, who, "POST", "/v1/sessions", {"id": "work", "system_prompt": f"You help {name}."}).ok
    sid = f"{name.lower()}-diary"  # an id only this tenant has
    assert call(server, who, "POST", "/chat", {"message": f"My name is {name}.", "session_id": sid, **GREEDY}).ok
    assert call(server, who, "POST", "/chat", {"message": "Hello.", "session_id": "work", **GREEDY}).ok
    assert call(server, who, "POST", "/chat", {"message": f"{name} says hi.", **GREEDY}).ok  # the default session
    rid = call(server, who, "POST", "/v1/responses", {"input": f"{name}'s question", "max_output_tokens": 8}).json()
    conv = call(server, who, "POST", "/v1/conversations", {"items": [{"role": "user", "content": f"{name}'s note"}]})
    cid = conv.json()["id"]
    item = call(server, who, "GET", f"/v1/conversations/{cid}/items").json()["data"][0]["id"]
    return sid, rid["id"], cid, item


def test_two_tenants_cannot_see_or_touch_each_other(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS)
    db = tmp_path / "s.db"
    args = ["--api-key-file", str(keys), "--tenant-max-concurrent", "4"]
    server = start_server(args, db, tmp_path / "one.log")
    try:
        a = own_state(server, ALICE, "Alice")
        b = own_state(server, BOB, "Bob")
        before = {"a": view(server, ALICE, [a[1]], [a[2]]), "b": view(server, BOB, [b[1]], [b[2]])}
        assert before["a"]["sessions"]["work"]["system_prompt"] == "You help Alice."
        assert before["b"]["sessions"]["work"]["system_prompt"] == "You help Bob."  # same id, two sessions
        attack(server, BOB, *a)
        attack(server, ALICE, *b)
        assert view(server, ALICE, [a[1]], [a[2]]) == before["a"]
    finally:
        assert server.stop() == 0

    server = start_server(args, db, tmp_path / "two.log")
    try:
        # After a restart each still sees its own, and only its own.
        assert view(server, ALICE, [a[1]], [a[2]]) == before["a"]
        assert view(server, BOB, [b[1]], [b[2]]) == before["b"]
        attack(server, BOB, *a)
        assert view(server, ALICE, [a[1]], [a[2]]) == before["a"]
        # Bob's bare /chat and /reset touch Bob's default session only.
        assert call(server, BOB, "POST", "/reset", {}).ok
        assert call(server, ALICE, "GET", "/status").json()["conversation_length"] == before["a"]["default"] == 2

        # The admin lists tenants (names, never keys) and reaches Alice's state by naming her.
        tenants = call(server, OPS, "GET", "/v1/tenants")
        assert tenants.ok and "sk-alice" not in tenants.text
        usage = {t["name"]: t["usage"] for t in tenants.json()["data"]}
        assert usage["alice"]["sessions"] == 3 and usage["alice"]["conversations"] == 1
        as_alice = {**OPS, "X-Tenant": "alice"}
        assert call(server, as_alice, "GET", "/v1/sessions/work").json()["system_prompt"] == "You help Alice."
        assert call(server, BOB, "GET", "/v1/tenants").status_code == 403
        assert call(server, {**BOB, "X-Tenant": "alice"}, "GET", "/v1/sessions").status_code == 403
        assert call(server, ALICE, "POST", "/chat", {"message": "Still there?", **GREEDY}).ok
        metrics = call(server, OPS, "GET", "/metrics").text
        assert 'pureapi_tenant_generations_total{tenant="alice"}' in metrics and "sk-alice" not in metrics
    finally:
        assert server.stop() == 0


def test_the_kv_cache_is_not_shared_across_tenants(tmp_path: Path) -> None:
    """Bob sending Alice's exact prompt computes it all: Alice's cached KV is hers alone."""
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS)
    server = start_server(["--api-key-file", str(keys)], tmp_path / "s.db", tmp_path / "s.log")
    try:
        messages = [{"role": "user", "content": "Tell me about the moons of Jupiter. " * 12}]

        def cached(key: str) -> int:
            api = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            r = api.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            return r.usage.prompt_tokens_details.cached_tokens or 0

        assert cached("sk-alice-0001") == 0
        assert cached("sk-bob-0002") == 0  # not Alice's
        assert cached("sk-alice-0001") > 0  # Alice's again
    finally:
        assert server.stop() == 0


def test_a_tenant_gets_a_slot_while_another_holds_them_all(tmp_path: Path) -> None:
    """Two slots, both streaming Alice's long replies: Bob's short request takes one of them at once
    (Alice's newest generation is preempted, its KV set aside) and ends first; Alice's replies then end
    whole, with every token they asked for."""
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS)
    server = start_server(["--api-key-file", str(keys), "--parallel", "2"], tmp_path / "s.db", tmp_path / "s.log")
    body = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 400, "temperature": 0, "stream": True}
    try:
        streams = [
            requests.post(server.url + "/v1/chat/completions", json=body, headers=ALICE, stream=True, timeout=300)
            for _ in range(2)
        ]
        lines = [r.iter_lines() for r in streams]
        for it in lines:  # both stream
            assert next(line for line in it if line.startswith(b"data: "))
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-bob-0002", max_retries=0)
        bob = api.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], **GREEDY)  # type: ignore[arg-type]
        assert bob.choices[0].message.content
        metrics = requests.get(server.url + "/metrics", headers=OPS, timeout=30).text
        assert "pureapi_engine_preempted_jobs_total 1.0" in metrics
        for it in lines:  # Alice's replies go on to their end, the preempted one included
            events = [json.loads(line[6:]) for line in it if line.startswith(b"data: {")]
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert all(not e.get("error") for e in events)
    finally:
        assert server.stop() == 0


def test_the_key_file_is_read_again_on_sighup(tmp_path: Path) -> None:
    """A key added to the file works after SIGHUP without a restart; a broken edit keeps the keys in force."""
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:sk-alice-0001\n")
    server = start_server(["--api-key-file", str(keys)], tmp_path / "s.db", tmp_path / "s.log")
    carol = {"Authorization": "Bearer sk-carol-0004"}
    try:
        assert call(server, carol, "GET", "/v1/sessions").status_code == 401
        keys.write_text("alice:sk-alice-0001\ncarol:sk-carol-0004\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while call(server, carol, "GET", "/v1/sessions").status_code != 200:
            assert time.monotonic() < deadline, "the new key was not taken"
            time.sleep(0.1)
        keys.write_text("carol has no key on this line\n")
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert call(server, carol, "GET", "/v1/sessions").status_code == 200
        assert call(server, ALICE, "GET", "/v1/sessions").status_code == 200
    finally:
        assert server.stop() == 0
    assert "the keys in force are kept" in server.log.read_text()


def test_a_bad_key_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:sk-1\nalice:sk-2\n")
    with pytest.raises(RuntimeError, match="line 2: the name 'alice' is given twice"):
        start_server(["--api-key-file", str(keys)], tmp_path / "s.db", tmp_path / "s.log")


def test_the_readme_tenant_commands_work_as_written(tmp_path: Path) -> None:
    """The README's key file and its curl commands, on a server started as the README says."""
    from .test_server import readme_curls, run_curl

    readme = (ROOT / "README.md").read_text()
    keys = tmp_path / "keys.txt"
    keys.write_text(readme.split("cat > keys.txt <<'KEYS'\n", 1)[1].split("\nKEYS\n", 1)[0] + "\n")
    server = start_server(["--api-key-file", str(keys)], tmp_path / "s.db", tmp_path / "s.log")
    try:
        outputs = [json.loads(run_curl(command, server.url)) for command in readme_curls(keyed=True)]
    finally:
        assert server.stop() == 0
    created, bobs, tenants, as_alice = outputs
    assert created["id"] == "work" and bobs["error"]["message"] == "no session 'work'"
    assert {t["name"] for t in tenants["data"]} == {"alice", "bob", "ops", "anonymous"}
    assert [s["id"] for s in as_alice["data"]] == ["work"]
