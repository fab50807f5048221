"""--engine vllm: vLLM's AsyncLLM inside pureapi (run with vLLM's venv), with sessions and every API on it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from ..conftest import Server, start_server
from ..sse import sse_events
from ..vllm_server import START_TIMEOUT, VLLM_ENV, smollm2_hf, vllm_python

pytestmark = pytest.mark.vllm  # selected with -m vllm; skipped without PUREAPI_VLLM_PYTHON (conftest)

KEY = "vk"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """pureapi on vLLM's interpreter with the vllm engine, an API key, and SmolLM2's HF folder."""
    python = vllm_python()
    assert python is not None
    tmp = tmp_path_factory.mktemp("in-process")
    args = ["--engine", "vllm", "--model", str(smollm2_hf()), "--ctx-size", "2048", "--parallel", "4"]
    args += ["--api-key", KEY]
    srv = start_server(args, tmp / "s.db", tmp / "s.log", START_TIMEOUT, python=python, env=VLLM_ENV)
    yield srv
    assert srv.stop() == 0


def post(server: Server, path: str, body: dict[str, Any], **kw: Any) -> requests.Response:
    return requests.post(server.url + path, json=body, headers=AUTH, timeout=120, **kw)


def metric(server: Server, name: str) -> float:
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_sessions_and_every_api_run_on_vllm_in_process(server: Server) -> None:
    status = requests.get(server.url + "/status", headers=AUTH, timeout=30).json()
    assert "vLLM" in status["device"]
    assert requests.post(server.url + "/chat", json={"message": "hi"}, timeout=30).status_code == 401  # auth holds
    turns = ["My name is Ada.", "What is my name?"]
    replies = [post(server, "/chat", {"message": t, "session_id": "s", **GREEDY}).json()["response"] for t in turns]
    history = [
        {"role": "user", "content": turns[0]},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": turns[1]},
    ]
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    stateless = api.chat.completions.create(model="x", messages=history, **GREEDY)  # type: ignore[arg-type]
    assert stateless.choices[0].message.content == replies[1]  # the session's window is that conversation
    chunks = list(
        api.chat.completions.create(
            model="x", messages=history, stream=True, stream_options={"include_usage": True}, **GREEDY
        )  # type: ignore[call-overload]
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies[1]
    count = post(server, "/v1/messages/count_tokens", {"model": "x", "messages": history}).json()
    assert chunks[-1].usage.prompt_tokens == count["input_tokens"] and "estimated" not in count
    facts = [{"role": "user", "content": " ".join(f"Fact {i}: day {i} was clear." for i in range(40))}]
    once, again = (api.chat.completions.create(model="x", messages=facts, **GREEDY) for _ in range(2))  # type: ignore[arg-type]
    assert once.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert again.usage.prompt_tokens_details.cached_tokens >= 128  # type: ignore[union-attr]  # vLLM's blocks
    message = post(server, "/v1/messages", {"model": "x", "messages": history, **GREEDY}).json()
    assert message["content"][0]["text"] == replies[1]
    first = api.responses.create(model="x", input=turns[0], temperature=0, max_output_tokens=24)
    second = api.responses.create(
        model="x", input=turns[1], previous_response_id=first.id, temperature=0, max_output_tokens=24
    )
    assert first.output_text == replies[0] and second.output_text == replies[1]


def test_a_client_that_goes_away_aborts_its_request_in_vllm(server: Server) -> None:
    aborts = metric(server, "pureapi_engine_aborts_total")
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}], "stream": True}
    with post(
        server, "/v1/chat/completions", {**body, "temperature": 1.0, "seed": 3, "max_tokens": 1500}, stream=True
    ) as r:
        assert r.status_code == 200
        deltas = 0
        for line in r.iter_lines():
            deltas += b'"content"' in line
            if deltas == 5:
                break
    deadline = time.monotonic() + 10
    while metric(server, "pureapi_engine_running") > 0 or metric(server, "pureapi_engine_aborts_total") == aborts:
        assert time.monotonic() < deadline, "vLLM still holds the request the client left"
        time.sleep(0.1)
    assert metric(server, "pureapi_engine_aborts_total") == aborts + 1


def test_a_seed_stream_on_vllm_commits_its_round(server: Server, tmp_path: Path) -> None:
    body = {"message": "Count to three.", "session_id": "t", "stream": True, **GREEDY}
    events = sse_events(post(server, "/chat", body))
    assert "error" not in events[-1] and events[-1]["response"] == "".join(e.get("delta", "") for e in events[:-1])
    status = requests.get(server.url + "/status?session_id=t", headers=AUTH, timeout=30).json()
    assert status["conversation_length"] == 2
