"""A tool exchange in a server-side session on Qwen (whose template can call tools): a forced call on /chat,
the server restarted, the call still in the session, its result posted, the answer, and the talk going on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from ..conftest import start_server

pytestmark = pytest.mark.real

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FORCED = {"type": "function", "function": {"name": "get_weather"}}


def test_a_session_tool_exchange_survives_a_restart(tmp_path: Path, qwen_gguf: Path) -> None:
    db = tmp_path / "s.db"
    server = start_server(["--model", str(qwen_gguf)], db, tmp_path / "one.log")
    try:
        session = {"id": "trip", "system_prompt": "Answer in one sentence, using the tool results."}
        assert requests.post(server.url + "/v1/sessions", json=session, timeout=30).status_code == 201
        ask = {"message": "What is the weather like in Paris?", "tools": [WEATHER], "tool_choice": FORCED}
        r = requests.post(server.url + "/chat", json={**ask, "session_id": "trip", "temperature": 0}, timeout=600)
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["finish_reason"] == "tool_calls" and first["response"] == ""
        [call] = first["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    finally:
        assert server.stop() == 0

    server = start_server(["--model", str(qwen_gguf)], db, tmp_path / "two.log")
    try:
        stored = requests.get(server.url + "/v1/sessions/trip", timeout=30).json()["messages"]
        assert stored == [
            {"role": "user", "content": ask["message"]},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        result = {"tool_call_id": call["id"], "content": "22 degrees Celsius and sunny"}
        body = {
            "session_id": "trip",
            "tool_results": [result],
            "tools": [WEATHER],
            "tool_choice": "none",  # shown the tools again, the 0.5B model only calls again
            "temperature": 0,
            "max_tokens": 60,
        }
        r = requests.post(server.url + "/chat", json=body, timeout=600)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["finish_reason"] == "stop" and "tool_calls" not in answer
        assert "22" in answer["response"], answer

        follow = {"session_id": "trip", "message": "Which city was that about?", "temperature": 0, "max_tokens": 30}
        r = requests.post(server.url + "/chat", json=follow, timeout=600)
        assert r.status_code == 200, r.text
        assert r.json().keys() == {"message", "response", "status"}  # no tools: the seed's own shape
        assert "Paris" in r.json()["response"], r.json()

        stored = requests.get(server.url + "/v1/sessions/trip", timeout=30).json()
        assert [m["role"] for m in stored["messages"]] == [
            "user",
            "assistant",
            "tool",
            "assistant",
            "user",
            "assistant",
        ]
        assert stored["messages"][2] == {"role": "tool", **result, "name": "get_weather"}
        assert stored["messages"][3]["content"] == answer["response"] and stored["rounds"] == 2
    finally:
        assert server.stop() == 0
