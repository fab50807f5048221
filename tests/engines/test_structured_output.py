"""Structured output and logprobs with the official openai client, on real weights.

llama.cpp serves both test models (its grammar sampler); transformers serves SmolLM2 (llguidance).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.base import Engine
from pureapi.engines.llamacpp import LlamaCppEngine
from pureapi.engines.transformers import TransformersEngine
from pureapi.models.resolve import ResolvedModel
from pureapi.settings import Settings

from ..conftest import serve_in_thread

pytestmark = pytest.mark.real

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person with a name, an age and their pets, as JSON."}]


def valid(value: Any, schema: dict[str, Any]) -> bool:
    """Validated by jsonschema_rs where installed, else by hand for PERSON."""
    try:
        import jsonschema_rs
    except ImportError:
        return (
            isinstance(value, dict)
            and set(value) == {"name", "age", "pets"}
            and isinstance(value["name"], str)
            and len(value["name"]) <= 16
            and isinstance(value["age"], int)
            and all(p in ("cat", "dog", "fish") for p in value["pets"])
            and len(value["pets"]) <= 3
        )
    return bool(jsonschema_rs.is_valid(schema, value))


@pytest.fixture(scope="module", params=["llamacpp-smollm2", "llamacpp-qwen", "transformers-smollm2"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    kind, model = str(request.param).split("-")
    path: Path = request.getfixturevalue(f"{model}_gguf")
    resolved = ResolvedModel(path.stem, path)
    engine: Engine
    if kind == "llamacpp":
        engine = LlamaCppEngine.load(resolved, n_threads=2, ctx_size=1024, n_parallel=2)
    else:
        engine = TransformersEngine.load(resolved, device="cpu", cache_dir=Settings().weights_cache_dir())
    db = tmp_path_factory.mktemp("db") / "sessions.db"
    store = SQLiteStore(db)
    app = create_app(Settings(engine=kind, db=db), engine=engine, store=store)
    try:
        with serve_in_thread(app) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    finally:
        engine.close()
        store.close()


def schema_format(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_a_json_schema_reply_parses_and_validates(client: openai.OpenAI) -> None:
    # Greedy, then sampled hot: the grammar, not the model's habits, makes the reply valid.
    for temperature, seed in ((0.0, None), (1.5, 7)):
        reply = client.chat.completions.create(
            model="m",
            messages=ASK,  # type: ignore[arg-type]
            response_format=schema_format(PERSON),
            max_tokens=80,
            temperature=temperature,
            seed=seed,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert valid(json.loads(choice.message.content or ""), PERSON), choice.message.content


def test_json_object_ends_after_one_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m",
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_max_tokens_cutting_a_json_short_says_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m",
        messages=ASK,  # type: ignore[arg-type]
        response_format=schema_format(PERSON),
        max_tokens=3,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length"
    assert (reply.choices[0].message.content or "").startswith("{")


def test_logprobs_per_token_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    reply = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert len(tokens) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert b"".join(bytes(t.bytes or []) for t in tokens).decode() == choice.message.content
    for t in tokens:
        assert t.logprob <= 0
        tops = [c.logprob for c in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy: the sampled token is the likeliest
    streamed = client.chat.completions.create(
        model="m",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    texts, entries = [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            entries.extend(chunk.choices[0].logprobs.content or [])
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == choice.message.content
    assert [e.token for e in entries] == [t.token for t in tokens]
    # The second request reuses the first one's KV from the cache, which llama.cpp computed in another batch
    # shape: the same tokens, logprobs equal to float noise (up to 0.011 apart seen on Qwen on an AVX2 EPYC).
    assert [e.logprob for e in entries] == pytest.approx([t.logprob for t in tokens], abs=0.05)


def test_grammar_and_logprobs_together(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m",
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=6,
        temperature=0,
        logprobs=True,
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and content[0].token.startswith("{")
    assert all(t.logprob <= 0 and t.top_logprobs == [] for t in content)


def test_an_unsupported_schema_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m",
            messages=ASK,  # type: ignore[arg-type]
            response_format=schema_format({"type": "integer", "minimum": 1}),
            max_tokens=4,
        )
    assert "minimum" in str(info.value)
