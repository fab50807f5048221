"""The OpenAI-compatible surface through Flask's test client on the scripted engine."""

from __future__ import annotations

import json

import pytest

from pureapi.api.openai import ChatCompletion, ChatCompletionChunk, ModelList
from pureapi.types import Message

from ..conftest import FakeApp
from ..sse import sse_data


def completion(fake: FakeApp, **body: object):  # type: ignore[no-untyped-def]
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return fake.client.post("/v1/chat/completions", json=body)


def test_completion_shape_and_usage(fake: FakeApp) -> None:
    fake.engine.enqueue("Hello to you")
    r = completion(fake, model="anything", max_tokens=50)
    assert r.status_code == 200
    body = r.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello to you"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["prompt_tokens"] == len(fake.engine.encode_chat([Message("user", "hi")]))
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # the scripted engine caches nothing


def test_it_is_stateless(fake: FakeApp) -> None:
    completion(fake, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"}])
    completion(fake, messages=[{"role": "user", "content": "two"}])
    assert fake.engine.prompts[-1] == [Message("user", "two")]
    assert fake.store.history("default", owner="")[0] == []


def test_length_finish_reason(fake: FakeApp) -> None:
    fake.engine.enqueue("a b c d e f")
    body = completion(fake, max_tokens=2).get_json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "a b "


def test_stop_strings_cut_the_reply(fake: FakeApp) -> None:
    fake.engine.enqueue("one two STOP three four")
    body = completion(fake, stop=["STOP"]).get_json()
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stop_string_split_across_chunks(fake: FakeApp) -> None:
    fake.engine.enqueue("alpha be ta gamma")
    body = completion(fake, stop="beta").get_json()
    assert body["choices"][0]["message"]["content"] == "alpha be ta gamma"
    fake.engine.enqueue("alpha be ta gamma")
    body = completion(fake, stop="be ta").get_json()
    assert body["choices"][0]["message"]["content"] == "alpha "


def test_content_parts_are_joined(fake: FakeApp) -> None:
    completion(
        fake, messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert fake.engine.prompts[-1] == [Message("user", "ab")]


def test_streaming_chunks_end_with_done(fake: FakeApp) -> None:
    fake.engine.enqueue("x y")
    r = completion(fake, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "x y"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_mid_stream_failure_is_an_error_event_then_done(fake: FakeApp) -> None:
    fake.engine.enqueue(RuntimeError("boom"))
    data = sse_data(completion(fake, stream=True))
    assert data[-1] == "[DONE]"
    assert "error" in json.loads(data[-2])


def test_models(fake: FakeApp) -> None:
    body = fake.client.get("/v1/models").get_json()
    assert body["object"] == "list" and body["data"][0]["id"] == "fake-model"


def test_harmless_fields_are_accepted_and_nulls_count_as_left_out(fake: FakeApp) -> None:
    harmless = {
        "user": "me",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "logit_bias": {},
        "modalities": ["text"],
        "functions": None,  # an SDK that sends every field it knows, unset
        "audio": None,
    }
    assert completion(fake, frequency_penalty=0.5, **harmless).status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frobnicate", 1),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("functions", [{"name": "f"}]),
        ("web_search_options", {}),
        ("reasoning_effort", "high"),
        ("logit_bias", {"50256": -100}),
        ("modalities", ["text", "audio"]),
    ],
)
def test_every_other_field_is_a_400_naming_it(fake: FakeApp, field: str, value: object) -> None:
    """Nothing is silently ignored: a client that asked for something not built hears so."""
    r = completion(fake, **{field: value})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["error"]["param"].startswith(field)
    assert field in r.get_json()["error"]["message"]


def test_vllms_repetition_penalty_is_repeat_penalty(fake: FakeApp) -> None:
    """A pureapi behind another pureapi's remote engine gets vLLM's name for it."""
    assert completion(fake, repetition_penalty=1.2).status_code == 200
    assert fake.engine.params[0].repeat_penalty == 1.2
    r = completion(fake, repetition_penalty=1.2, repeat_penalty=1.1)
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "repetition_penalty"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": 100_000}, "max_tokens"),
    ],
)
def test_bad_requests_use_the_openai_envelope(fake: FakeApp, body: dict[str, object], param: str) -> None:
    r = completion(fake, **body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param.split(".")[0])


def test_empty_tools_and_tool_choice_none_are_plain_chat(fake: FakeApp) -> None:
    fake.engine.enqueue("fine")
    body = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False}
    r = completion(fake, **body, top_logprobs=0)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["choices"][0]["message"]["content"] == "fine"


def test_unknown_v1_route_is_404_in_the_openai_envelope(fake: FakeApp) -> None:
    r = fake.client.post("/v1/embeddings", json={})
    assert r.status_code == 404
    assert r.get_json()["error"]["type"] == "not_found_error"


def test_sampling_extensions_reach_the_engine(fake: FakeApp) -> None:
    body = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5}
    assert completion(fake, **body).status_code == 200
    p = fake.engine.params[0]
    assert (p.top_k, p.min_p, p.repeat_penalty, p.presence_penalty, p.frequency_penalty) == (40, 0.05, 1.1, 0.5, -0.5)


@pytest.mark.parametrize(
    "body",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"top_k": -1},
        {"min_p": 1.5},
        {"repeat_penalty": 0},
        {"frequency_penalty": True},
    ],
)
def test_sampling_extensions_are_validated(fake: FakeApp, body: dict[str, object]) -> None:
    r = completion(fake, **body)
    assert r.status_code == 400
    assert r.get_json()["error"]["param"] == next(iter(body))


def test_responses_match_their_models(fake: FakeApp) -> None:
    """The bodies and stream chunks are what the response models (and so /openapi.json) describe."""
    fake.engine.enqueue("Hello there friend")
    body = completion(fake).get_json()
    assert ChatCompletion.model_validate(body).model_dump() == body
    fake.engine.enqueue("Hello there friend")
    data = sse_data(completion(fake, stream=True, stream_options={"include_usage": True}))
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    assert [c.choices[0].delta.content for c in chunks[:-1]] == ["", "Hello ", "there ", "friend", None]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    models = fake.client.get("/v1/models").get_json()
    assert ModelList.model_validate(models).data[0].id == "fake-model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi", "frobnicate": 1}]}, "messages.0.frobnicate"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "detail": "high"}]}]},
            "messages.0.content",
        ),
        ({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 4}}, "stream_options.chunk_size"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]},
            "tools.0.function.returns",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "mode": "x"}}},
            "response_format.json_schema.mode",
        ),
    ],
)
def test_an_unknown_field_inside_the_body_is_a_400_naming_it(fake: FakeApp, body: dict, param: str) -> None:  # type: ignore[type-arg]
    """Strictness reaches the messages, parts, tools and formats, not only the top level."""
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    r = fake.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["param"].startswith(param.rsplit(".", 1)[0]) and param.rsplit(".", 1)[1] in error["message"]


def test_a_reply_sent_back_as_the_sdks_dump_it_is_accepted(fake: FakeApp) -> None:
    """The openai SDK's model_dump of a reply message carries refusal, annotations and nulls: not unknown."""
    fake.engine.enqueue("fine")
    reply = {"role": "assistant", "content": "hello", "refusal": None, "annotations": [], "audio": None}
    messages = [{"role": "user", "content": "hi"}, reply, {"role": "user", "content": "and?"}]
    r = completion(fake, messages=messages, stream=True, stream_options={"include_obfuscation": False})
    assert r.status_code == 200, r.get_data(as_text=True)
