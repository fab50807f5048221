"""llama-server's response_format {"type": "json_object", "schema": ...} and system_fingerprint."""

from __future__ import annotations

import json

from pureapi.engines.base import system_fingerprint

from ..conftest import FakeApp
from ..sse import sse_data

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def chat(fake: FakeApp, **body: object):  # type: ignore[no-untyped-def]
    body.setdefault("messages", [{"role": "user", "content": "Where?"}])
    return fake.client.post("/v1/chat/completions", json=body)


def test_json_object_with_a_schema_enforces_the_schema(fake: FakeApp) -> None:
    fake.engine.enqueue('{"city": "Oslo"}', "{}")
    assert chat(fake, response_format={"type": "json_object", "schema": CITY}).status_code == 200
    assert fake.engine.params[-1].json_schema == CITY
    assert chat(fake, response_format={"type": "json_object"}).status_code == 200
    assert fake.engine.params[-1].json_schema == {"type": "object"}


def test_a_json_object_schema_that_cannot_be_enforced_is_a_400(fake: FakeApp) -> None:
    r = chat(fake, response_format={"type": "json_object", "schema": {"type": "integer", "minimum": 3}})
    assert r.status_code == 400
    error = r.get_json()["error"]
    assert error["param"] == "response_format.schema" and "minimum" in error["message"]


def test_system_fingerprint_on_chat_and_text_completions(fake: FakeApp) -> None:
    fake.engine.enqueue("a", "b", "c")
    first = chat(fake).get_json()["system_fingerprint"]
    assert first == fake.engine.system_fingerprint and first.startswith("fp_")
    chunks = [json.loads(d) for d in sse_data(chat(fake, stream=True))[:-1]]
    assert {c["system_fingerprint"] for c in chunks} == {first}
    text = fake.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).get_json()
    assert text["system_fingerprint"] == first


def test_the_fingerprint_follows_the_model_file_and_build() -> None:
    one = system_fingerprint("qwen.gguf", 491_000_000, "llama.cpp", "0.3.36")
    assert one == system_fingerprint("qwen.gguf", 491_000_000, "llama.cpp", "0.3.36")
    assert one != system_fingerprint("qwen.gguf", 491_000_001, "llama.cpp", "0.3.36")
    assert one != system_fingerprint("qwen.gguf", 491_000_000, "llama.cpp", "0.3.37")


def test_with_tools_a_response_format_still_lets_the_model_call(fake: FakeApp) -> None:
    weather = {"type": "function", "function": {"name": "weather", "parameters": CITY}}
    fake.engine.enqueue('{"name": "weather", "arguments": {"city": "Oslo"}}')
    r = chat(fake, tools=[weather], response_format={"type": "json_object", "schema": CITY})
    choice = r.get_json()["choices"][0]
    assert (
        choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"]["name"] == "weather"
    )
    assert (fake.engine.params[-1].json_schema or {})["anyOf"][1] == CITY
