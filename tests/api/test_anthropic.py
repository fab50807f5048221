"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) on the scripted engine."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

from pureapi.api.anthropic import MessageResponse
from pureapi.types import Message

from ..conftest import FakeApp, MakeFakeApp, serve_in_thread


def send(fake: FakeApp, path: str = "/v1/messages", **body: Any):  # type: ignore[no-untyped-def]
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    if path == "/v1/messages":
        body.setdefault("max_tokens", 64)
    return fake.client.post(path, json=body)


def named_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each named SSE event."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_message_shape_and_usage(fake: FakeApp) -> None:
    fake.engine.enqueue("Hello to you")
    r = send(fake, model="claude-anything", system="be kind")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "fake-model"
    assert body["content"] == [{"type": "text", "text": "Hello to you"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    prompt = [Message("system", "be kind"), Message("user", "hi")]
    assert fake.engine.prompts[-1] == prompt
    assert body["usage"]["input_tokens"] == len(fake.engine.encode_chat(prompt))
    assert body["usage"]["output_tokens"] == 3
    assert MessageResponse.model_validate(body).model_dump() == body


def test_text_blocks_and_system_blocks_are_joined(fake: FakeApp) -> None:
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}]
    r = send(fake, system=[{"type": "text", "text": "sys"}], messages=[{"role": "user", "content": blocks}])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert fake.engine.prompts[-1] == [Message("system", "sys"), Message("user", "ab")]


def test_stop_reasons(fake: FakeApp) -> None:
    fake.engine.enqueue("a b c d e f")
    body = send(fake, max_tokens=2).get_json()
    assert (body["stop_reason"], body["stop_sequence"], body["content"][0]["text"]) == ("max_tokens", None, "a b ")
    fake.engine.enqueue("one two END three")
    body = send(fake, stop_sequences=["NEVER", "END"]).get_json()
    assert (body["stop_reason"], body["stop_sequence"], body["content"][0]["text"]) == (
        "stop_sequence",
        "END",
        "one two ",
    )


def test_sampling_fields_reach_the_engine(fake: FakeApp) -> None:
    send(fake, temperature=0.3, top_p=0.8, top_k=5, stop_sequences=["x"], metadata={"user_id": "u"})
    p = fake.engine.params[-1]
    assert (p.temperature, p.top_p, p.top_k, list(p.stop), p.max_tokens) == (0.3, 0.8, 5, ["x"], 64)


def test_the_allow_listed_fields_are_accepted(fake: FakeApp) -> None:
    fake.engine.enqueue("fine")
    harmless = {"metadata": {"user_id": "u"}, "service_tier": "auto", "cache_control": {"type": "ephemeral"}}
    defaults = {"tools": [], "tool_choice": {"type": "auto"}, "thinking": {"type": "disabled"}}
    r = send(fake, **harmless, **defaults)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["content"][0]["text"] == "fine"


def test_the_stream_follows_anthropics_event_sequence(fake: FakeApp) -> None:
    fake.engine.enqueue("x y z")
    r = send(fake, stream=True)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = named_events(r.get_data(as_text=True))
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert start["usage"]["input_tokens"] == len(fake.engine.encode_chat([Message("user", "hi")]))
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "x y z"
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 3


def test_a_mid_stream_failure_is_an_error_event(fake: FakeApp) -> None:
    fake.engine.enqueue(RuntimeError("boom"))
    events = named_events(send(fake, stream=True).get_data(as_text=True))
    assert events[-1][0] == "error"
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [name for name, _ in events]


def test_count_tokens_uses_the_chat_template(fake: FakeApp) -> None:
    r = send(fake, "/v1/messages/count_tokens", system="s", messages=[{"role": "user", "content": "a b c"}])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == {
        "input_tokens": len(fake.engine.encode_chat([Message("system", "s"), Message("user", "a b c")]))
    }
    assert fake.engine.params == []  # nothing was generated


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"max_tokens": None}, "max_tokens", ""),
        ({"messages": []}, "messages", ""),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role", ""),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content",
            "'image'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
            "messages",
            "answers no tool_use",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
            "messages.0",
            "cannot hold tool_use",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "input": {}}]}]},
            "messages.0.content.0",
            "'input'",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages.0.content", "'document'"),
        ({"system": [{"type": "image"}]}, "system", "'image'"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                ]
            },
            "messages",
            "continued",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools", "server tool"),
        ({"tools": [{"name": "f", "input_schema": {"minimum": 1}}]}, "tools[0].input_schema", "minimum"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema", ""),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "needs tools"),
        ({"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool"}}, "tool_choice", "name"),
        (
            {"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "g"}},
            "tool_choice",
            "'g'",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking", "thinking"),
        ({"temperature": 1.5}, "temperature", ""),
        ({"top_p": 0}, "top_p", ""),
        ({"stop_sequences": ["s"] * 17}, "stop_sequences", ""),
        ({"container": "x"}, "container", "not a supported field"),
        ({"mcp_servers": []}, "mcp_servers", "not a supported field"),
        ({"output_config": {"format": {}}}, "output_config", "not a supported field"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name", "not a supported field"),
    ],
)
def test_bad_or_unsupported_fields_are_a_400_in_anthropics_envelope(
    fake: FakeApp, body: dict[str, Any], param: str, words: str
) -> None:
    r = send(fake, **body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(param) and words in error["error"]["message"]
    assert fake.engine.params == []


def test_errors_of_every_kind_use_anthropics_envelope(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app(settings={"api_key": ["sekrit"]})
    r = fake.client.post("/v1/messages", json={})
    assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
    r = fake.client.get("/v1/messages", headers={"x-api-key": "sekrit"})
    assert r.status_code == 405 and r.get_json()["type"] == "error"
    r = fake.client.post("/v1/messages/nope", headers={"x-api-key": "sekrit"}, json={})
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found_error"
    r = fake.client.post("/v1/messages", headers={"x-api-key": "sekrit"}, data="{", content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error"
    # The OpenAI surface keeps its own envelope.
    assert "param" in fake.client.post("/v1/chat/completions", json={}).get_json()["error"]


def test_x_api_key_or_bearer_authenticate(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app(settings={"api_key": ["sekrit"]})
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert fake.client.post("/v1/messages", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    assert fake.client.post("/v1/messages", json=body, headers={"x-api-key": "sekrit"}).status_code == 200
    assert fake.client.post("/v1/messages", json=body, headers={"Authorization": "Bearer sekrit"}).status_code == 200
    # The key works on the other surfaces too (one key, any header).
    assert fake.client.get("/v1/models", headers={"x-api-key": "sekrit"}).status_code == 200


def test_the_official_client_against_a_served_fake(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app(settings={"api_key": ["sekrit"]})
    # The clients are closed first (with), so that no kept-alive connection holds the server's shutdown.
    with (
        serve_in_thread(fake.app) as url,
        anthropic.Anthropic(base_url=url, api_key="sekrit", max_retries=0) as client,
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0) as bad,
    ):
        check_the_official_client(fake, client, bad)


def check_the_official_client(fake: FakeApp, client: anthropic.Anthropic, bad: anthropic.Anthropic) -> None:
    """What the official client sees: a message, a stream with its stop sequence, a count, errors."""
    fake.engine.enqueue("Hello there", "Streamed reply END more")
    message = client.messages.create(
        model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}], metadata={"user_id": "u"}
    )
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 2
    with client.messages.stream(
        model="m", max_tokens=20, messages=[{"role": "user", "content": "hi"}], stop_sequences=["END"]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Streamed reply "
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "END"
    count = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens == len(fake.engine.encode_chat([Message("user", "hi")]))
    with pytest.raises(anthropic.BadRequestError) as refused:
        # Newer clients no longer name the sampling fields; they travel in extra_body.
        client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": -1}
        )
    assert "top_k" in str(refused.value)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
