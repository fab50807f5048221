"""Tools on the Responses and Messages APIs, and assistant prefill, through the official clients on Qwen
(whose template can call tools): a forced call, its result answered, the final text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from ..conftest import Server, start_server

pytestmark = pytest.mark.real

WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
ASK = "What is the weather like in Paris?"
ANSWER = "Answer the user's question in one sentence using the tool results."


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_tool_exchange_survives_a_restart(tmp_path: Path, qwen_gguf: Path, stream: bool) -> None:
    db = tmp_path / "s.db"
    forced = {"type": "function", "name": "get_weather"}
    server = start_server(["--model", str(qwen_gguf)], db, tmp_path / "one.log")
    try:
        api = openai_client(server)
        if stream:
            events = list(
                api.responses.create(
                    model="x",
                    input=ASK,
                    tools=[WEATHER],
                    tool_choice=forced,
                    temperature=0,
                    stream=True,  # type: ignore[list-item,arg-type]
                )
            )
            kinds = [e.type for e in events]
            assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
            assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
            first = events[-1].response  # type: ignore[union-attr]
        else:
            first = api.responses.create(model="x", input=ASK, tools=[WEATHER], tool_choice=forced, temperature=0)  # type: ignore[list-item,arg-type]
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert isinstance(json.loads(call.arguments)["city"], str)
    finally:
        assert server.stop() == 0

    server = start_server(["--model", str(qwen_gguf)], db, tmp_path / "two.log")
    try:
        api = openai_client(server)
        answer = [{"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees Celsius and sunny"}]
        body: dict[str, Any] = {
            "model": "x",
            "input": answer,
            "previous_response_id": first.id,
            "tools": [WEATHER],
            "tool_choice": "none",  # shown the tools again, the 0.5B model only calls again
            "instructions": ANSWER,
            "temperature": 0,
            "max_output_tokens": 60,
        }
        if stream:
            events = list(api.responses.create(**body, stream=True))
            final = events[-1].response  # type: ignore[union-attr]
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
            assert deltas.strip() == final.output_text
        else:
            final = api.responses.create(**body)
        assert final.output[0].type == "message" and "22" in final.output_text
        assert api.responses.retrieve(final.id).output_text == final.output_text
    finally:
        assert server.stop() == 0


def test_an_anthropic_tool_exchange_streams_its_blocks(qwen: Server) -> None:
    tool = {"name": "get_weather", "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}
    with anthropic.Anthropic(base_url=qwen.url, api_key="none", max_retries=0) as client:
        with client.messages.stream(
            model="x",
            max_tokens=80,
            extra_body={"temperature": 0},  # newer clients no longer name the sampling fields
            messages=[{"role": "user", "content": ASK}],
            tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "get_weather"},
        ) as stream:
            events = list(stream)
            message = stream.get_final_message()
        starts = [e for e in events if e.type == "content_block_start"]
        assert [(e.index, e.content_block.type) for e in starts] == [(0, "tool_use")]
        assert {e.index for e in events if e.type == "content_block_delta"} == {0}
        assert message.stop_reason == "tool_use"
        [use] = message.content
        assert use.type == "tool_use" and isinstance(use.input["city"], str)  # type: ignore[index]
        reply = client.messages.create(
            model="x",
            max_tokens=60,
            extra_body={"temperature": 0},
            system=ANSWER,
            tools=[tool],  # type: ignore[list-item]
            tool_choice={"type": "none"},
            messages=[
                {"role": "user", "content": ASK},
                {"role": "assistant", "content": message.content},  # type: ignore[typeddict-item]
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22 degrees Celsius"}],
                },
            ],
        )
    assert reply.stop_reason == "end_turn" and "22" in reply.content[0].text  # type: ignore[union-attr]


def test_a_prefilled_reply_goes_on_from_the_prefill(qwen: Server) -> None:
    with openai_client(qwen) as api:
        r = api.chat.completions.create(
            model="x",
            temperature=0,
            max_tokens=12,
            messages=[
                {"role": "user", "content": "Count from one to ten in English words, separated by commas."},
                {"role": "assistant", "content": "one, two, three, four,"},
            ],
        )
    text = r.choices[0].message.content or ""
    assert text.lstrip().lower().startswith("five"), text  # continued, not begun again


def test_an_agents_sdk_agent_calls_its_tool_and_returns_its_output_type(qwen: Server) -> None:
    """The issue's "done when": the OpenAI Agents SDK's default model (Responses), one function tool, a
    pydantic output_type, against a real server."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunHooks, Runner, function_tool, set_tracing_disabled
    from pydantic import BaseModel

    set_tracing_disabled(True)  # no trace export to OpenAI
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"It is 22 degrees Celsius and sunny in {city}."

    class Weather(BaseModel):
        city: str
        degrees_celsius: int

    class AnswerAfterTheTool(RunHooks):  # type: ignore[type-arg]
        """The 0.5B model, shown the tools again, only calls again: once the tool ran, the agent answers."""

        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: str) -> None:
            agent.model_settings.tool_choice = "none"

    model = OpenAIResponsesModel("qwen", openai.AsyncOpenAI(base_url=qwen.url + "/v1", api_key="none", max_retries=0))
    agent = Agent(
        name="weather",
        instructions="Use the tool, then answer with the city and its temperature in degrees Celsius.",
        model=model,
        tools=[get_weather],
        output_type=Weather,
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=80),
        reset_tool_choice=False,  # the hook sets it
    )
    result = Runner.run_sync(agent, ASK, max_turns=4, hooks=AnswerAfterTheTool())
    assert asked and "paris" in asked[0].lower()
    assert isinstance(result.final_output, Weather) and result.final_output.degrees_celsius == 22
