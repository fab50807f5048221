"""pureapi's remote engine in front of a real vLLM (SmolLM2 on CPUs): what users of that deployment rely on."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from ..conftest import Server
from ..sse import sse_events
from ..vllm_server import MAX_MODEL_LEN, MODEL_NAME, VLLMServer
from .conftest import start_front

pytestmark = pytest.mark.vllm  # selected with -m vllm; skipped without PUREAPI_VLLM_PYTHON (conftest)

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 32}
LONG_REPLY: dict[str, Any] = {"temperature": 1.0, "seed": 7, "max_tokens": 1500}  # rambles far past a few deltas
STORY = "Write a very long story about a dragon who learns to sing, with many chapters."


def direct(vllm: VLLMServer, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
    """The same conversation sent to vLLM itself."""
    body = {"model": MODEL_NAME, "messages": messages, **GREEDY, **params}
    r = requests.post(vllm.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def client(front: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0)


def session_length(front: Server, session: str) -> int:
    status = requests.get(front.url + "/status", params={"session_id": session}, timeout=30).json()
    return int(status["conversation_length"])


def test_a_session_through_the_front_is_the_conversation_vllm_sees(vllm: VLLMServer, front: Server) -> None:
    turns = ["My name is Ada and I like tea.", "What is my name?"]
    replies = []
    for text in turns:
        r = requests.post(front.url + "/chat", json={"message": text, "session_id": "s", **GREEDY}, timeout=120)
        assert r.status_code == 200, r.text
        replies.append(r.json()["response"])
    history = [
        {"role": "user", "content": turns[0]},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": turns[1]},
    ]
    want = direct(vllm, history)
    assert replies[1] == want["choices"][0]["message"]["content"]
    assert session_length(front, "s") == 4

    # OpenAI streaming through the front: the same text, and usage is vLLM's count, not an estimate.
    stream = client(front).chat.completions.create(
        model="x", messages=history, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies[1]
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == want["usage"]["prompt_tokens"] == vllm.count(history)
    r = requests.post(front.url + "/v1/messages/count_tokens", json={"model": "x", "messages": history}, timeout=30)
    assert r.json() == {"input_tokens": vllm.count(history)}  # a count, so no "estimated"


def test_the_history_window_is_cut_by_vllms_count(vllm: VLLMServer, front: Server) -> None:
    """Rounds of ~450 tokens overflow the 2048-token context by the fifth: the oldest are dropped, none fails."""
    filler = " ".join(f"Note {i}: the river ran north past mill {i}." for i in range(36))
    prompts = []
    for turn in range(6):
        body = {"message": f"{turn}. {filler}", "session_id": "w", "stream": True, "max_tokens": 16, "temperature": 0}
        events = sse_events(requests.post(front.url + "/chat", json=body, timeout=120))
        assert "error" not in events[-1], events[-1]
        prompts.append(events[-1]["usage"]["prompt_tokens"])
    assert max(prompts) + 16 <= MAX_MODEL_LEN
    assert prompts[-1] > MAX_MODEL_LEN // 2  # kept as many rounds as fit, by count (the estimate keeps fewer)
    assert prompts[-1] < prompts[3] + 200  # and it stopped growing: old rounds left the window
    assert session_length(front, "w") == 12  # the store keeps every round; only the prompt is windowed


def test_a_responses_chain_continues_across_a_restart_of_the_front(vllm: VLLMServer, tmp_path: Path) -> None:
    db = tmp_path / "front.db"
    front = start_front(vllm, db, tmp_path / "front1.log")
    first = client(front).responses.create(model="x", input="My name is Ada.", temperature=0, max_output_tokens=32)
    assert front.stop() == 0
    front = start_front(vllm, db, tmp_path / "front2.log")
    try:
        second = client(front).responses.create(
            model="x", input="What is my name?", previous_response_id=first.id, temperature=0, max_output_tokens=32
        )
    finally:
        assert front.stop() == 0
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    want = direct(vllm, history)
    assert second.output_text == want["choices"][0]["message"]["content"]
    assert second.usage is not None and second.usage.input_tokens == want["usage"]["prompt_tokens"]


def test_vllms_prefix_cache_shows_as_cached_tokens(vllm: VLLMServer, front: Server) -> None:
    # A prompt no earlier test sent, longer than two of vLLM's 128-token KV blocks.
    facts = " ".join(f"Fact {i}: on day {i} the sky was clear." for i in range(40))
    messages = [{"role": "user", "content": f"[{uuid.uuid4().hex}] {facts} Which day came first?"}]
    api = client(front)
    first = api.chat.completions.create(model="x", messages=messages, **GREEDY)  # type: ignore[arg-type]
    again = api.chat.completions.create(model="x", messages=messages, **GREEDY)  # type: ignore[arg-type]
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details is not None and again.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= 256  # whole blocks of the repeated prompt


def test_a_client_that_goes_away_aborts_the_generation_in_vllm(vllm: VLLMServer, front: Server) -> None:
    aborted = vllm.aborted()
    body = {"messages": [{"role": "user", "content": STORY}], "stream": True, **LONG_REPLY}
    with requests.post(front.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        deltas = 0
        for line in r.iter_lines():
            deltas += b'"content"' in line
            if deltas == 5:
                break  # leaving the block closes the connection mid-reply
    deadline = time.monotonic() + 30
    while vllm.aborted() == aborted:
        assert time.monotonic() < deadline, "vLLM never aborted the request the client left"
        time.sleep(0.2)
    assert vllm.aborted() == aborted + 1
    assert vllm.metric("vllm:num_requests_running") == 0
    generated = vllm.metric("vllm:generation_tokens_total")
    time.sleep(1)
    assert vllm.metric("vllm:generation_tokens_total") == generated  # nothing generates any more


def test_an_upstream_killed_mid_reply_is_a_502_and_nothing_is_stored(vllm: VLLMServer, front: Server) -> None:
    r = requests.post(front.url + "/chat", json={"message": "Hello", "session_id": "k", **GREEDY}, timeout=120)
    assert r.status_code == 200 and session_length(front, "k") == 2
    body = {"message": STORY, "session_id": "k", "stream": True, **LONG_REPLY}
    events = []
    with requests.post(front.url + "/chat", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    vllm.stop(signal.SIGKILL)  # the whole vLLM, engine core included, mid-reply
    assert all("delta" in e for e in events[:3])
    assert "upstream" in events[-1]["error"] and "broke off" in events[-1]["error"], events[-1]
    assert session_length(front, "k") == 2  # the broken turn left nothing
    r = requests.post(front.url + "/chat", json={"message": "Still there?", "session_id": "k"}, timeout=60)
    assert r.status_code == 502 and "unreachable" in r.json()["error"]
    vllm.start()
    r = requests.post(front.url + "/chat", json={"message": "Hello again", "session_id": "k", **GREEDY}, timeout=120)
    assert r.status_code == 200, r.text
    assert session_length(front, "k") == 4


def test_a_forced_tool_call_and_its_result_go_through_vllm(vllm: VLLMServer, front: Server) -> None:
    """vLLM holds a named call to the function's schema (SmolLM2's template shows no tools, so auto calls
    nothing here); the front hands the call on, then sends the result back with the conversation.
    vLLM 0.32 with a tool parser holds the arguments to the parameters only for a `strict` function (else
    to any JSON value: SmolLM2 then writes a bare string), so the function is strict."""
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {"name": "weather", "description": "Current weather", "parameters": parameters, "strict": True}
    tools: list[Any] = [{"type": "function", "function": weather}]
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    api = client(front)
    named: Any = {"type": "function", "function": {"name": "weather"}}
    # SmolLM2 pads the JSON with whitespace under vLLM's grammar: room for it.
    forced = api.chat.completions.create(
        model="x", messages=ask, tools=tools, tool_choice=named, temperature=0, max_tokens=160
    )
    assert forced.choices[0].finish_reason == "tool_calls"
    calls = forced.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)  # type: ignore[union-attr]
    follow = [
        *ask,
        {"role": "assistant", "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "12 C and sunny"},
    ]
    answer = api.chat.completions.create(model="x", messages=follow, tools=tools, **GREEDY)  # auto
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    want = direct(vllm, follow, tools=tools)  # the same conversation, tools and all, straight to vLLM
    assert answer.choices[0].message.content == want["choices"][0]["message"]["content"]
