"""Structured output and logprobs on /v1/chat/completions: validation and response shapes (scripted engine)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pureapi.api.openai import ChatCompletion, ChatCompletionChunk
from pureapi.structured import JSON_OBJECT

from ..conftest import FakeApp
from ..sse import sse_data

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def completion(fake: FakeApp, **body: object):  # type: ignore[no-untyped-def]
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return fake.client.post("/v1/chat/completions", json=body)


def json_schema(schema: Any, **extra: object) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


def test_response_formats_reach_the_engine_as_a_schema(fake: FakeApp) -> None:
    assert completion(fake, response_format={"type": "json_object"}).status_code == 200
    assert completion(fake, response_format=json_schema(SCHEMA, strict=True)).status_code == 200
    assert completion(fake, response_format={"type": "text"}).status_code == 200
    assert completion(fake).status_code == 200
    assert [p.json_schema for p in fake.engine.params] == [JSON_OBJECT, SCHEMA, None, None]


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "integer", "minimum": 0}, "'minimum'"),
        ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "'not'"),
        ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "'oneOf'"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'"),
        ({"type": "string", "format": "email"}, "'email'"),
        ({"type": "string", "pattern": "[a-z]+"}, "anchored"),
        ({"$ref": "https://example.com/schema.json"}, "local references"),
        ({"type": "tuple"}, "type must be"),
        ({"type": "object", "properties": {"a": 3}}, "object or a boolean"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_keyword(
    fake: FakeApp, schema: dict[str, Any], words: str
) -> None:
    r = completion(fake, response_format=json_schema(schema))
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert words in error["message"]
    assert fake.engine.params == []  # nothing reached the engine


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
        {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}},
    ],
)
def test_malformed_response_formats_are_400s(fake: FakeApp, response_format: dict[str, Any]) -> None:
    r = completion(fake, response_format=response_format)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["error"]["param"].startswith("response_format")


def test_logprobs_come_back_per_token_in_openais_shape(fake: FakeApp) -> None:
    fake.engine.enqueue("Hello there")
    body = completion(fake, logprobs=True, top_logprobs=2).get_json()
    assert fake.engine.params[0].logprobs == 2
    assert ChatCompletion.model_validate(body).model_dump() == body
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["Hello ", "there"]
    first = content[0]
    assert first["logprob"] == -0.25 and first["bytes"] == list(b"Hello ")
    assert [c["token"] for c in first["top_logprobs"]] == ["Hello ", "alt1"]
    assert set(first["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_logprobs_without_top_logprobs_and_not_at_all(fake: FakeApp) -> None:
    body = completion(fake, logprobs=True).get_json()
    assert fake.engine.params[0].logprobs == 0
    assert all(t["top_logprobs"] == [] for t in body["choices"][0]["logprobs"]["content"])
    body = completion(fake, logprobs=False).get_json()
    assert fake.engine.params[1].logprobs is None and body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")],
)
def test_bad_logprobs_requests(fake: FakeApp, body: dict[str, Any], param: str) -> None:
    r = completion(fake, **body)
    assert r.status_code == 400
    assert r.get_json()["error"]["param"] == param


def test_streamed_chunks_carry_their_tokens_logprobs(fake: FakeApp) -> None:
    fake.engine.enqueue("one two three")
    data = sse_data(completion(fake, stream=True, logprobs=True, top_logprobs=1))
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    for d, c in zip(data[:-1], chunks, strict=True):
        assert c.model_dump(exclude={"usage"}) == json.loads(d)
    texts = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert texts == ["one ", "two ", "three"]
    for chunk in chunks[1:-1]:
        lp = chunk.choices[0].logprobs
        assert lp is not None and lp.content is not None
        assert "".join(t.token for t in lp.content) == chunk.choices[0].delta.content
        assert [len(t.top_logprobs) for t in lp.content] == [1]
    assert chunks[0].choices[0].logprobs is None and chunks[-1].choices[0].logprobs is None


def test_stream_without_logprobs_has_none(fake: FakeApp) -> None:
    fake.engine.enqueue("one two")
    data = sse_data(completion(fake, stream=True))
    assert all(json.loads(d)["choices"][0]["logprobs"] is None for d in data[:-1])
