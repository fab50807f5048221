"""Tool use on Anthropic's Messages API (/v1/messages) on the scripted engine."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from pureapi.types import Message, ToolCall

from ..conftest import FakeApp, serve_in_thread
from .test_anthropic import named_events, send

WEATHER = {
    "name": "weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "time", "input_schema": {"type": "object", "properties": {}}}
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>'


def test_a_call_in_the_reply_is_a_tool_use_block(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL)
    r = send(fake, tools=[WEATHER, TIME])
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    [block] = body["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("weather", {"city": "Paris"})
    assert body["stop_reason"] == "tool_use"
    rendered = fake.engine.tools[-1] or []
    assert [t["function"]["name"] for t in rendered] == ["weather", "time"]
    assert rendered[0]["function"]["parameters"] == WEATHER["input_schema"]
    assert fake.engine.params[-1].json_schema is None  # auto


def test_text_and_calls_stream_as_blocks_in_order(fake: FakeApp) -> None:
    fake.engine.enqueue("Let me check. " + CALL + "\n" + TIME_CALL)
    r = send(fake, tools=[WEATHER, TIME], stream=True)
    events = named_events(r.get_data(as_text=True))
    shape = [
        (name, data.get("index"), (data.get("content_block") or data.get("delta") or {}).get("type"))
        for name, data in events
    ]
    assert shape == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"),
        ("ping", None, None),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    start = events[7][1]["content_block"]
    assert start["name"] == "weather" and start["input"] == {} and start["id"].startswith("toolu_")
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_the_official_client_assembles_the_streamed_call(fake: FakeApp) -> None:
    fake.engine.enqueue("Checking. " + CALL)
    with (
        serve_in_thread(fake.app) as url,
        anthropic.Anthropic(base_url=url, api_key="x", max_retries=0) as client,
        client.messages.stream(
            model="m",
            max_tokens=64,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],  # type: ignore[list-item]
        ) as stream,
    ):
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    use = final.content[1]
    assert use.type == "tool_use" and use.input == {"city": "Paris"} and final.stop_reason == "tool_use"


def test_tool_results_continue_the_conversation(fake: FakeApp) -> None:
    fake.engine.enqueue("It is sunny in Paris; Oslo failed.")
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "timeout"}],
                    "is_error": True,
                },
                {"type": "text", "text": "Be brief."},
            ],
        },
    ]
    r = send(fake, messages=messages, tools=[WEATHER])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["stop_reason"] == "end_turn"
    calls = (ToolCall("toolu_1", "weather", '{"city": "Paris"}'), ToolCall("toolu_2", "weather", '{"city": "Oslo"}'))
    assert fake.engine.prompts[-1] == [
        Message("user", "Weather in Paris and Oslo?"),
        Message("assistant", "Checking.", calls),
        Message("tool", "sunny", tool_call_id="toolu_1", name="weather"),
        Message("tool", "Error: timeout", tool_call_id="toolu_2", name="weather"),
        Message("user", "Be brief."),
    ]


@pytest.mark.parametrize(
    ("choice", "forced"),
    [({"type": "tool", "name": "time"}, ["time"]), ({"type": "any"}, ["weather", "time"])],
)
def test_tool_choice_forces_a_call_by_grammar(fake: FakeApp, choice: dict[str, Any], forced: list[str]) -> None:
    fake.engine.enqueue('{"name": "time", "arguments": {}}')
    body = send(fake, tools=[WEATHER, TIME], tool_choice=choice).get_json()
    assert [b["name"] for b in body["content"]] == ["time"] and body["stop_reason"] == "tool_use"
    assert fake.engine.prefixes[-1] == "<tool_call>\n"
    schema = fake.engine.params[-1].json_schema or {}
    assert [c["properties"]["name"]["const"] for c in schema.get("anyOf", [schema])] == forced


def test_tool_choice_none_and_disable_parallel_tool_use(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL, CALL + "\n" + TIME_CALL)
    body = send(fake, tools=[WEATHER], tool_choice={"type": "none"}).get_json()
    assert body["content"] == [{"type": "text", "text": CALL}] and fake.engine.tools[-1] is None
    one = send(fake, tools=[WEATHER, TIME], tool_choice={"type": "auto", "disable_parallel_tool_use": True}).get_json()
    assert [b["name"] for b in one["content"]] == ["weather"]


def test_count_tokens_renders_the_tools(fake: FakeApp) -> None:
    r = send(fake, "/v1/messages/count_tokens", tools=[WEATHER])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert [t["function"]["name"] for t in fake.engine.tools[-1] or []] == ["weather"]
