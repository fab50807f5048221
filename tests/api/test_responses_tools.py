"""Function tools and text.format on /v1/responses through Flask's test client on the scripted engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pureapi.types import Message, ToolCall

from ..conftest import FakeApp, MakeFakeApp
from .test_responses import named_events

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"type": "function", "name": "time", "parameters": {"type": "object", "properties": {}}}
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>'


def respond(fake: FakeApp, **body: Any):  # type: ignore[no-untyped-def]
    body.setdefault("input", "Weather in Paris?")
    return fake.client.post("/v1/responses", json=body)


def test_a_call_in_the_reply_is_a_function_call_item(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL)
    r = respond(fake, tools=[WEATHER, TIME])
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    [call] = body["output"]
    assert call["type"] == "function_call" and call["status"] == "completed"
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert (call["name"], json.loads(call["arguments"])) == ("weather", {"city": "Paris"})
    assert body["tools"] == [WEATHER, TIME] and body["tool_choice"] == "auto" and body["parallel_tool_calls"]
    # The template renders them in the chat-completions shape, as for /v1/chat/completions.
    assert fake.engine.tools[-1] == [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in (WEATHER, TIME)
    ]
    assert fake.engine.params[-1].json_schema is None  # auto: nothing forced
    assert fake.client.get(f"/v1/responses/{body['id']}").get_json() == body


def test_text_before_calls_is_a_message_item_first(fake: FakeApp) -> None:
    fake.engine.enqueue("Let me check. " + CALL + "\n" + TIME_CALL, "Let me check. " + CALL + "\n" + TIME_CALL)
    output = respond(fake, tools=[WEATHER, TIME]).get_json()["output"]
    assert [i["type"] for i in output] == ["message", "function_call", "function_call"]
    assert output[0]["content"][0]["text"] == "Let me check."
    assert len({i["call_id"] for i in output[1:]}) == 2
    one = respond(fake, tools=[WEATHER, TIME], parallel_tool_calls=False).get_json()
    assert [i.get("name") for i in one["output"]] == [None, "weather"] and one["parallel_tool_calls"] is False


def test_the_call_streams_with_openais_events_and_is_stored_as_streamed(fake: FakeApp) -> None:
    fake.engine.enqueue("Checking. " + CALL)
    r = respond(fake, tools=[WEATHER], stream=True)
    events = named_events(r)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    data = [d for _, d in events]
    added = data[5]
    assert added["output_index"] == 1 and added["item"]["type"] == "function_call"
    assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
    delta, done, item_done = data[6], data[7], data[8]
    assert delta["item_id"] == done["item_id"] == added["item"]["id"] and delta["output_index"] == 1
    assert json.loads(delta["delta"]) == json.loads(done["arguments"]) == {"city": "Paris"}
    assert done["name"] == "weather" and item_done["item"]["status"] == "completed"
    completed = data[-1]["response"]
    assert completed["output"][1] == item_done["item"] and completed["output"][0] == data[11]["item"]
    assert data[9]["text"] == "Checking."
    stored = fake.client.get(f"/v1/responses/{completed['id']}").get_json()
    assert stored == completed  # the ids streamed are the ids stored


def test_function_call_output_continues_the_chain_across_a_restart(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app()
    fake.engine.enqueue(CALL)
    first = respond(fake, tools=[WEATHER]).get_json()
    [call] = first["output"]
    again = make_fake_app()  # a new server on the same database
    again.engine.enqueue("It is 21 degrees in Paris.")
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "21 C, sunny"}
    r = respond(again, input=[output], previous_response_id=first["id"], tools=[WEATHER])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["output"][0]["content"][0]["text"] == "It is 21 degrees in Paris."
    assert again.engine.prompts[-1] == [
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (ToolCall(call["call_id"], "weather", call["arguments"]),)),
        Message("tool", "21 C, sunny", tool_call_id=call["call_id"], name="weather"),
    ]
    items = again.client.get(f"/v1/responses/{r.get_json()['id']}/input_items").get_json()["data"]
    assert [(i["type"], i["call_id"], i["output"]) for i in items] == [
        ("function_call_output", call["call_id"], "21 C, sunny")
    ]


def test_a_whole_tool_exchange_can_be_sent_as_items(fake: FakeApp) -> None:
    fake.engine.enqueue("Sunny.")
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}', "id": "fc_x"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "sunny"}]},
    ]
    r = respond(fake, input=items, tools=[WEATHER])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert fake.engine.prompts[-1] == [
        Message("user", "Weather in Paris?"),
        Message("assistant", "Checking.", (ToolCall("c1", "weather", '{"city": "Paris"}'),)),
        Message("tool", "sunny", tool_call_id="c1", name="weather"),
    ]


def test_a_conversation_keeps_the_tool_exchange(fake: FakeApp) -> None:
    conv = fake.client.post("/v1/conversations", json={}).get_json()["id"]
    fake.engine.enqueue(CALL, "Sunny.", "You asked about Paris.")
    call = respond(fake, conversation=conv, tools=[WEATHER]).get_json()["output"][0]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    assert respond(fake, conversation=conv, input=[output], tools=[WEATHER]).status_code == 200
    items = fake.client.get(f"/v1/conversations/{conv}/items?order=asc").get_json()["data"]
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output", "message"]
    respond(fake, conversation=conv, input="What did I ask?", tools=[WEATHER])
    assert fake.engine.prompts[-1][1:3] == [
        Message("assistant", "", (ToolCall(call["call_id"], "weather", call["arguments"]),)),
        Message("tool", "sunny", tool_call_id=call["call_id"], name="weather"),
    ]


def test_a_tool_exchange_is_never_split_by_the_window(make_fake_app: MakeFakeApp) -> None:
    fake = make_fake_app(context_length=40)
    fake.engine.enqueue(" ".join(["word"] * 16), CALL)
    first = respond(fake, input="filler " * 12).get_json()
    call = respond(fake, previous_response_id=first["id"], tools=[WEATHER], max_output_tokens=10).get_json()
    assert call["output"][0]["type"] == "function_call"
    output = {"type": "function_call_output", "call_id": call["output"][0]["call_id"], "output": "sunny"}
    fake.engine.enqueue("Sunny.")
    r = respond(fake, input=[output], previous_response_id=call["id"], tools=[WEATHER], max_output_tokens=5)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert [m.role for m in fake.engine.prompts[-1]] == ["user", "assistant", "tool"]  # the old turn went
    disabled = respond(
        fake,
        input=[output],
        previous_response_id=call["id"],
        tools=[WEATHER],
        truncation="disabled",
        max_output_tokens=5,
    )
    assert disabled.status_code == 400, disabled.get_data(as_text=True)


@pytest.mark.parametrize(
    ("choice", "forced"),
    [({"type": "function", "name": "time"}, ["time"]), ("required", ["weather", "time"])],
)
def test_tool_choice_forces_a_call_by_grammar(fake: FakeApp, choice: Any, forced: list[str]) -> None:
    fake.engine.enqueue('{"name": "time", "arguments": {}}')
    body = respond(fake, tools=[WEATHER, TIME], tool_choice=choice).get_json()
    assert [i["name"] for i in body["output"]] == ["time"] and body["tool_choice"] == choice
    assert fake.engine.prefixes[-1] == "<tool_call>\n"
    schema = fake.engine.params[-1].json_schema or {}
    names = [c["properties"]["name"]["const"] for c in schema.get("anyOf", [schema])]
    assert names == forced


def test_tool_choice_none_neither_renders_nor_parses(fake: FakeApp) -> None:
    fake.engine.enqueue(CALL)
    output = respond(fake, tools=[WEATHER], tool_choice="none").get_json()["output"]
    assert [i["type"] for i in output] == ["message"] and output[0]["content"][0]["text"] == CALL
    assert fake.engine.tools[-1] is None


@pytest.mark.parametrize(
    ("fmt", "schema"),
    [
        ({"type": "json_object"}, {"type": "object"}),
        (
            {"type": "json_schema", "name": "city", "strict": True, "schema": {"type": "object", "properties": {}}},
            {"type": "object", "properties": {}},
        ),
        ({"type": "text"}, None),
    ],
)
def test_text_format_is_enforced_while_sampling(fake: FakeApp, fmt: dict[str, Any], schema: Any) -> None:
    fake.engine.enqueue("{}")
    r = respond(fake, text={"format": fmt, "verbosity": "medium"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert fake.engine.params[-1].json_schema == schema
    assert r.get_json()["text"]["format"] == fmt


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"reasoning": {"effort": "low"}}, "reasoning", "not a supported field"),
        ({"include": ["message.output_text.logprobs"]}, "include", "cannot be included"),
        ({"tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools", "'file_search'"),
        ({"truncation": "sometimes"}, "truncation", ""),
        ({"top_logprobs": 3}, "top_logprobs", ""),
        ({"prompt": {"id": "p"}}, "prompt", "not a supported field"),
        ({"max_tool_calls": 2}, "max_tool_calls", "not a supported field"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "required"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}},
            "text.format.schema",
            "'not'",
        ),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", ""),
        ({"tools": [{**WEATHER, "parameters": {"minimum": 1}}]}, "tools[0].parameters", "minimum"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "'nope'"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}]}, "input", "answers no"),
        ({"input": [{"type": "function_call", "call_id": "zz", "name": "f"}]}, "input.0", "arguments"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type", ""),
    ],
)
def test_fields_not_honoured_are_400s_naming_them(fake: FakeApp, body: dict[str, Any], param: str, words: str) -> None:
    r = respond(fake, **body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert fake.engine.params == []


def test_harmless_fields_are_accepted(fake: FakeApp) -> None:
    fake.engine.enqueue("fine")
    harmless = {
        "user": "u",
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "service_tier": "auto",
        "include": [],
        "stream_options": {"include_obfuscation": False},
        "truncation": "disabled",
        "reasoning": None,
        "top_logprobs": 0,
    }
    r = respond(fake, **harmless)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["truncation"] == "disabled"


def test_a_model_without_tool_support_is_a_400_that_says_so(fake: FakeApp) -> None:
    fake.engine.tool_format = None
    r = respond(fake, tools=[WEATHER])
    assert r.status_code == 400 and "without tool support" in r.get_json()["error"]["message"]


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": CITY}}


def test_with_tools_and_a_text_format_the_reply_is_a_call_or_the_format(fake: FakeApp) -> None:
    fake.engine.enqueue('{"name": "weather", "arguments": {"city": "Oslo"}}', '{"city": "Oslo"}')
    first = respond(fake, tools=[WEATHER], text=SCHEMA_FORMAT).get_json()
    assert [(i["type"], i.get("name")) for i in first["output"]] == [("function_call", "weather")]
    schema = fake.engine.params[-1].json_schema or {}
    call, answer = schema["anyOf"]
    assert call["properties"]["name"] == {"const": "weather"} and answer == CITY
    second = respond(fake, tools=[WEATHER], text=SCHEMA_FORMAT).get_json()
    assert second["output"][0]["content"][0]["text"] == '{"city": "Oslo"}'


def test_a_json_reply_that_names_no_tool_is_not_a_call(fake: FakeApp) -> None:
    fake.engine.enqueue('{"name": "Bob", "arguments": {}}')
    body = respond(fake, tools=[WEATHER], text={"format": {"type": "json_object"}}).get_json()
    assert [i["type"] for i in body["output"]] == ["message"]


def test_a_forced_call_wins_over_the_text_format(fake: FakeApp) -> None:
    fake.engine.enqueue('{"name": "weather", "arguments": {"city": "Oslo"}}')
    body = respond(fake, tools=[WEATHER], tool_choice="required", text=SCHEMA_FORMAT).get_json()
    assert body["output"][0]["type"] == "function_call"
    assert (fake.engine.params[-1].json_schema or {})["properties"]["name"] == {"const": "weather"}


def test_conversation_items_can_carry_a_tool_exchange(fake: FakeApp) -> None:
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    conv = fake.client.post("/v1/conversations", json={"items": items}).get_json()["id"]
    listed = fake.client.get(f"/v1/conversations/{conv}/items?order=asc").get_json()["data"]
    assert [i["type"] for i in listed] == ["message", "function_call", "function_call_output"]
    fake.engine.enqueue("Sunny.")
    r = respond(fake, conversation=conv, input="So?", tools=[WEATHER])
    assert r.status_code == 200, r.get_data(as_text=True)
    assert fake.engine.prompts[-1][1:3] == [
        Message("assistant", "", (ToolCall("c1", "weather", '{"city": "Paris"}'),)),
        Message("tool", "sunny", tool_call_id="c1", name="weather"),
    ]
