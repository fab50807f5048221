"""Tool calling on /v1/chat/completions through Flask's test client on the scripted engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pureapi.api.openai import ChatCompletion, ChatCompletionChunk
from pureapi.types import Message, ToolCall

from ..conftest import FakeApp
from ..sse import sse_data

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def completion(fake: FakeApp, **body: Any):  # type: ignore[no-untyped-def]
    body.setdefault("messages", [{"role": "user", "content": "Weather in Paris?"}])
    return fake.client.post("/v1/chat/completions", json=body)


def test_a_call_in_the_reply_becomes_tool_calls(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL)
    r = completion(fake, tools=[WEATHER, TIME])
    assert r.status_code == 200, r.get_data(as_text=True)
    choice = ChatCompletion.model_validate(r.get_json()).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "Paris"})
    assert fake.engine.tools[-1] == [WEATHER, TIME]  # the template rendered them
    assert fake.engine.params[-1].json_schema is None  # auto: nothing forced


def test_several_calls_and_parallel_tool_calls_false(fake: FakeApp) -> None:
    two = CALL + '\n<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>'
    fake.engine.enqueue(two, two)
    calls = completion(fake, tools=[WEATHER, TIME]).get_json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["weather", "time"]
    assert len({c["id"] for c in calls}) == 2
    one = completion(fake, tools=[WEATHER, TIME], parallel_tool_calls=False).get_json()["choices"][0]
    assert [c["function"]["name"] for c in one["message"]["tool_calls"]] == ["weather"]


def test_malformed_call_is_plain_text(fake: FakeApp) -> None:
    text = '<tool_call>\n{"name": "weather", "arguments": {"city": \n</tool_call>'
    fake.engine.enqueue(text)
    choice = completion(fake, tools=[WEATHER]).get_json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == "stop"


def test_a_plain_reply_with_tools_has_no_tool_calls(fake: FakeApp) -> None:
    fake.engine.enqueue("It is sunny.")
    choice = completion(fake, tools=[WEATHER]).get_json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


def test_tool_choice_none_neither_renders_nor_parses(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL)
    choice = completion(fake, tools=[WEATHER], tool_choice="none").get_json()["choices"][0]
    assert choice["message"]["content"] == CALL and "tool_calls" not in choice["message"]
    assert fake.engine.tools[-1] is None


def test_streamed_calls_are_tool_call_deltas(fake: FakeApp) -> None:
    fake.engine.enqueue("Checking. " + CALL + '\n<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>')
    r = completion(fake, tools=[WEATHER, TIME], stream=True)
    assert r.status_code == 200
    data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    deltas = [json.loads(d)["choices"][0]["delta"] for d in data[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    text = "".join(d.get("content", "") for d in deltas)
    assert text.strip() == "Checking." and "<tool" not in text  # held back, never sent as text
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert [[c["index"] for c in cs] for cs in calls] == [[0], [1]]
    first = calls[0][0]
    assert set(first) == {"index", "id", "type", "function"} and first["type"] == "function"
    assert first["function"] == {"name": "weather", "arguments": json.dumps({"city": "Paris"})}
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and deltas[-1] == {}


def test_a_named_tool_choice_forces_that_call_by_grammar(fake: FakeApp) -> None:
    fake.engine.enqueue('{"name": "weather", "arguments": {"city": "Oslo"}}')
    choice = {"type": "function", "function": {"name": "weather"}}
    body = completion(fake, tools=[WEATHER, TIME], tool_choice=choice).get_json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert fake.engine.prefixes[-1] == "<tool_call>\n"  # the reply starts inside the call
    schema = fake.engine.params[-1].json_schema
    assert schema is not None
    assert schema["properties"] == {"name": {"const": "weather"}, "arguments": WEATHER["function"]["parameters"]}


def test_required_allows_any_of_the_tools(fake: FakeApp) -> None:
    fake.engine.enqueue('{"name": "time", "arguments": {}}')
    r = completion(fake, tools=[WEATHER, TIME], tool_choice="required", stream=True)
    deltas = [json.loads(d)["choices"][0]["delta"] for d in sse_data(r)[:-1]]
    [[call]] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert call["function"]["name"] == "time"
    schema = fake.engine.params[-1].json_schema
    assert schema is not None and len(schema["anyOf"]) == 2


def test_tool_results_continue_the_conversation(fake: FakeApp) -> None:
    fake.engine.enqueue("It is 21 degrees in Paris.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]
    r = completion(fake, messages=messages, tools=[WEATHER])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["choices"][0]["message"]["content"] == "It is 21 degrees in Paris."
    assert fake.engine.prompts[-1] == [
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (ToolCall("call_1", "weather", '{"city": "Paris"}'),)),
        Message("tool", "21 C, sunny", tool_call_id="call_1"),
    ]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "no"}}}, "tool_choice", "'no'"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
        ({"tools": [{"type": "retrieval"}]}, "tools", ""),
        ({"tools": [WEATHER, WEATHER]}, "tools", "share a name"),
        (
            {"tools": [TIME, {"type": "function", "function": {"name": "f", "parameters": {"minimum": 1}}}]},
            "tools[1].function.parameters",
            "minimum",
        ),
        ({"tools": [WEATHER], "logprobs": True}, "logprobs", "tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool call",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(
    fake: FakeApp, body: dict[str, Any], param: str, words: str
) -> None:
    r = completion(fake, **body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["param"].startswith(param)
    assert words in error["message"]
    assert fake.engine.params == []  # nothing was generated


def test_a_model_without_tool_support_is_a_400_that_says_so(fake: FakeApp) -> None:
    fake.engine.tool_format = None
    r = completion(fake, tools=[WEATHER])
    assert r.status_code == 400
    error = r.get_json()["error"]
    assert error["param"] == "tools" and "without tool support" in error["message"]
    fake.engine.enqueue("fine")
    assert completion(fake, tools=[WEATHER], tool_choice="none").status_code == 200


def test_a_forced_call_cut_by_max_tokens_says_length_and_stays_text(fake: FakeApp) -> None:
    fake.engine.enqueue('{"name": "weather", "arguments": {"city": "Paris"}}')
    body = completion(fake, tools=[WEATHER], tool_choice="required", max_tokens=2).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('<tool_call>\n{"name":')


def test_a_streamed_call_with_usage_ends_with_the_usage_chunk(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL)
    r = completion(fake, tools=[WEATHER], stream=True, stream_options={"include_usage": True})
    data = [json.loads(d) for d in sse_data(r)[:-1]]
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == len(CALL.split())
    assert data[-2]["choices"][0]["finish_reason"] == "tool_calls"
