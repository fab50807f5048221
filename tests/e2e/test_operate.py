"""Operating a real server on both test models: /metrics after traffic, request ids, and an
idempotent turn retried before and after a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import start_server

pytestmark = pytest.mark.real


def samples(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed by name{labels} with the labels sorted."""
    text = requests.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_metrics_ids_and_idempotent_turns_across_a_restart(
    model: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    gguf = request.getfixturevalue(f"{model}_gguf")
    # One slot, so that two alternating sessions evict each other and restore from RAM; a restart
    # then restores from disk.
    args = ["--model", str(gguf), "--engine", "llamacpp", "--parallel", "1", "--log-format", "json"]
    server = start_server(args, tmp_path / "s.db", tmp_path / "server.log")
    body = {"message": "Name a colour.", "session_id": "a", "max_tokens": 12, "temperature": 0}
    key = {"Idempotency-Key": "turn-1", "X-Request-Id": "e2e-1"}
    try:
        first = requests.post(server.url + "/chat", json=body, headers=key, timeout=300)
        assert first.status_code == 200 and first.headers["X-Request-Id"] == "e2e-1"
        for session in ("b", "a", "b", "a"):
            r = requests.post(
                server.url + "/chat",
                json={"message": f"And another one for {session}?", "session_id": session, "max_tokens": 8},
                timeout=300,
            )
            assert r.status_code == 200
        again = requests.post(server.url + "/chat", json=body, headers=key, timeout=300)
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        m = samples(server.url)
        assert m["pureapi_requests_total{method=POST,route=/chat,status=200}"] == 6
        assert m["pureapi_time_to_first_token_seconds_count{}"] == 5  # the replay generated nothing
        assert m["pureapi_request_duration_seconds_count{route=/chat}"] == 6
        assert m["pureapi_tokens_total{kind=prompt}"] > m["pureapi_tokens_total{kind=computed_prompt}"] > 0
        assert m["pureapi_tokens_total{kind=completion}"] > 0
        assert m["pureapi_sessions{}"] == 2 and m["pureapi_model_load_seconds{}"] > 0
        assert m["pureapi_queue_depth{}"] == 0 and m["pureapi_generations_running{}"] == 0
        assert m["pureapi_engine_slots_free{}"] == 1 and m["pureapi_engine_slots_active{}"] == 0
        assert m["pureapi_engine_kv_cache_hits_total{}"] > 0
        assert m["pureapi_engine_restored_tokens_ram_total{}"] > 0
        assert m["pureapi_engine_restored_bytes_ram_total{}"] > 0
        assert m["pureapi_model_memory_bytes{}"] > 50_000_000
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "pureapi.access" and line["request_id"] == "e2e-1"]
    assert len(access) == 2 and all(line["status"] == 200 and line["path"] == "/chat" for line in access)

    server = start_server(args, tmp_path / "s.db", tmp_path / "server2.log")
    try:
        after = requests.post(server.url + "/chat", json=body, headers=key, timeout=300)
        assert after.json() == first.json()
        history = requests.get(server.url + "/v1/sessions/a", timeout=30).json()["messages"]
        assert [m["content"] for m in history].count("Name a colour.") == 1 and len(history) == 6
        clash = requests.post(server.url + "/chat", json={**body, "max_tokens": 13}, headers=key, timeout=30)
        assert clash.status_code == 409
        # The first turn after the restart restores session b's state from disk.
        r = requests.post(server.url + "/chat", json={"message": "More?", "session_id": "b", "max_tokens": 4})
        assert r.status_code == 200
        m = samples(server.url)
        assert m["pureapi_engine_restored_tokens_disk_total{}"] > 0
        assert m["pureapi_engine_restored_bytes_disk_total{}"] > 0
    finally:
        assert server.stop() == 0


def test_the_server_expires_idle_sessions_with_session_ttl(tmp_path: Path) -> None:
    server = start_server(["--engine", "fake", "--session-ttl", "1"], tmp_path / "s.db", tmp_path / "server.log", 120)
    try:
        assert requests.post(server.url + "/chat", json={"message": "hi", "session_id": "t"}, timeout=30).ok
        assert requests.get(server.url + "/v1/sessions/t", timeout=30).status_code == 200
        deadline = time.monotonic() + 30
        while requests.get(server.url + "/v1/sessions/t", timeout=30).status_code != 404:
            assert time.monotonic() < deadline, "the session was not expired"
            time.sleep(0.2)
    finally:
        assert server.stop() == 0
    assert "expired 1 idle sessions" in server.log.read_text()


@pytest.mark.parametrize("model", ["smollm2", "qwen"])
def test_stateless_clients_conversations_are_restored_after_eviction_and_restart(
    model: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two OpenAI-style conversations that resend their history alternate on one slot: each turn
    after the first computes only its new tokens, from RAM while the server runs and from disk
    after a restart (no session ids anywhere)."""
    from openai import OpenAI

    gguf = request.getfixturevalue(f"{model}_gguf")
    args = ["--model", str(gguf), "--engine", "llamacpp", "--parallel", "1"]
    histories: dict[str, list[dict[str, str]]] = {"a": [], "b": []}

    def turn(url: str, name: str, n: int) -> tuple[int, int]:
        client = OpenAI(base_url=url + "/v1", api_key="none")
        histories[name].append({"role": "user", "content": f"Tell me one thing about {name}-topic {n}."})
        r = client.chat.completions.create(model="m", messages=histories[name], max_tokens=12, temperature=0)  # type: ignore[arg-type]
        histories[name].append({"role": "assistant", "content": r.choices[0].message.content or ""})
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens or 0

    server = start_server(args, tmp_path / "s.db", tmp_path / "server.log")
    try:
        for n in range(2):
            for name in ("a", "b"):
                prompt, cached = turn(server.url, name, n)
                if n:  # the other conversation took the slot in between: restored, not prefilled
                    assert prompt - cached < 40, (name, n, prompt, cached)
        assert samples(server.url)["pureapi_engine_restored_tokens_ram_total{}"] > 0
    finally:
        assert server.stop() == 0
    server = start_server(args, tmp_path / "s.db", tmp_path / "server2.log")
    try:
        for name in ("a", "b"):
            prompt, cached = turn(server.url, name, 2)
            assert prompt - cached < 40, (name, prompt, cached)
        assert samples(server.url)["pureapi_engine_restored_tokens_disk_total{}"] > 0
    finally:
        assert server.stop() == 0
