"""Tool calling through the official openai client on the real models: Qwen's template has tools, SmolLM2's has none."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.transformers import TransformersEngine
from pureapi.models.resolve import ResolvedModel
from pureapi.settings import Settings

from ..conftest import Server, serve_in_thread

pytestmark = pytest.mark.real

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("temperature", [0, 1.5])
def test_a_named_tool_choice_always_gives_parsable_arguments(qwen: Server, temperature: float) -> None:
    with client(qwen) as c:
        r = c.chat.completions.create(
            model="x",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=temperature,
            seed=7,
            max_tokens=80,
        )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")


def test_required_streams_a_call_and_its_result_continues_the_conversation(qwen: Server) -> None:
    with client(qwen) as c:
        stream = c.chat.completions.create(
            model="x",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice="required",
            temperature=0,
            max_tokens=80,
            stream=True,
        )
        events = list(stream)
        deltas = [d for e in events for d in (e.choices[0].delta.tool_calls or [])]
        assert [e.choices[0].finish_reason for e in events if e.choices[0].finish_reason] == ["tool_calls"]
        assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id
        name, arguments = deltas[0].function.name, deltas[0].function.arguments  # type: ignore[union-attr]
        assert name in ("get_weather", "get_time")
        json.loads(arguments or "")
        # The 0.5B model, shown the tools again, only calls again; an agent's last turn leaves them out.
        history = [
            {"role": "system", "content": "Answer the user's question in one sentence using the tool results."},
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": deltas[0].id, "type": "function", "function": {"name": name, "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": deltas[0].id, "content": "21 degrees Celsius, sunny"},
        ]
        r = c.chat.completions.create(
            model="x",
            messages=history,  # type: ignore[arg-type]
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice="none",
            temperature=0,
            max_tokens=60,
        )
    reply = r.choices[0]
    assert reply.finish_reason == "stop" and not reply.message.tool_calls, (reply.finish_reason, reply.message)
    assert "21" in (reply.message.content or ""), reply.message.content


def test_auto_lets_the_model_call_on_its_own(qwen: Server) -> None:
    with client(qwen) as c:
        r = c.chat.completions.create(
            model="x",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            temperature=0,
            max_tokens=80,
        )
    choice = r.choices[0]
    # Asked about the weather with a weather tool at hand, greedy Qwen calls it on its own (recorded:
    # get_weather {"city": "Paris", "unit": "celsius"}): the call is parsed out of the reply's text.
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_weather"], calls  # type: ignore[union-attr]
    arguments = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    assert arguments["city"] == "Paris" and arguments["unit"] in ("celsius", "fahrenheit"), arguments
    assert not choice.message.content, choice.message.content


def test_a_template_without_tools_is_a_400_naming_tools(smol: Server) -> None:
    with client(smol) as c, pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], max_tokens=8)  # type: ignore[arg-type,list-item]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "tools"
    assert "tool support" in error["message"]


def test_transformers_forces_a_call_on_qwen(qwen_gguf: Path, tmp_path: Path) -> None:
    """The transformers engine renders tools with apply_chat_template and holds a forced call with llguidance."""
    path = Path(qwen_gguf)
    engine = TransformersEngine.load(
        ResolvedModel(path.stem, path), device="cpu", cache_dir=Settings().weights_cache_dir()
    )
    store = SQLiteStore(tmp_path / "sessions.db")
    app = create_app(Settings(engine="transformers", db=tmp_path / "sessions.db"), engine=engine, store=store)
    try:
        with serve_in_thread(app) as url, OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
            r = c.chat.completions.create(
                model="x",
                messages=ASK,  # type: ignore[arg-type]
                tools=[WEATHER, TIME],  # type: ignore[list-item]
                tool_choice="required",
                temperature=1.5,
                seed=3,
                max_tokens=60,
            )
    finally:
        engine.close()
        store.close()
    [call] = r.choices[0].message.tool_calls or []
    assert r.choices[0].finish_reason == "tool_calls"
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    if call.function.name == "get_weather":  # type: ignore[union-attr]
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    else:
        assert set(args) == {"zone"}
