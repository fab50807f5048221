"""The remote engine in front of a real second pureapi process (scripted engine) on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.engines.remote import RemoteEngine
from pureapi.errors import BadGateway, GatewayTimeout
from pureapi.settings import Settings
from pureapi.types import GenerationRequest, Message, SamplingParams

from ..conftest import ROOT, Server, free_port, serve_in_thread, start_server


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Server]:
    """A pureapi process on the scripted engine that wants an API key."""
    server = start_server(["--engine", "fake", "--api-key", "up-key"], tmp_path / "up.db", tmp_path / "up.log", 120)
    yield server
    server.stop()


def front_args(upstream: Server, key: str = "up-key") -> list[str]:
    return ["--engine", "remote", "--upstream", upstream.url + "/v1", "--upstream-key", key]


def test_sessions_responses_and_streams_through_the_front(upstream: Server, tmp_path: Path) -> None:
    front = start_server(front_args(upstream), tmp_path / "front.db", tmp_path / "front.log", 120)
    try:
        assert requests.get(front.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "fake-model"
        status = requests.get(front.url + "/status", timeout=30).json()
        assert status["model_name"] == "fake-model" and status["device"] == f"remote ({upstream.url}/v1)"
        # The seed API's session lives in the front; the upstream sees the windowed conversation.
        for text in ("first", "second"):
            r = requests.post(front.url + "/chat", json={"message": text, "session_id": "s"}, timeout=30)
            assert r.json()["response"] == f"You said: {text}"
        assert requests.get(front.url + "/status?session_id=s", timeout=30).json()["conversation_length"] == 4
        api = openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0)
        first = api.responses.create(model="x", input="alpha")
        second = api.responses.create(model="x", input="beta", previous_response_id=first.id)
        assert second.output_text == "You said: beta"
        assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]
        chunks = api.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "stream me"}], stream=True, max_tokens=50
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: stream me"
        upstream.stop()
        r = requests.post(front.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502
        assert "unreachable" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
        assert requests.get(front.url + "/health", timeout=30).status_code == 200  # the front itself is fine
    finally:
        assert front.stop() == 0


def test_a_wrong_upstream_key_or_address_fails_at_start_in_one_line(upstream: Server, tmp_path: Path) -> None:
    for args, expected in [
        (front_args(upstream, key="wrong"), "answered 401"),
        (["--engine", "remote", "--upstream", f"http://127.0.0.1:{free_port()}"], "cannot reach it"),
        (["--engine", "remote"], "--engine remote needs --upstream"),
    ]:
        cmd = [sys.executable, str(ROOT / "pure_model_api.py"), "--port", str(free_port())]
        cmd += ["--db", str(tmp_path / "f.db"), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr, result.stderr


def test_a_silent_upstream_is_a_504(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections are accepted by the kernel and never answered
        engine = RemoteEngine(f"http://127.0.0.1:{silent.getsockname()[1]}", model="m", timeout=0.5)
        prompt = engine.encode_chat([Message("user", "hi")])
        with pytest.raises(GatewayTimeout, match=r"did not answer within 0\.5s"):
            engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=4)))
        engine.close()


def test_a_prompt_from_elsewhere_is_refused() -> None:
    engine = RemoteEngine("http://127.0.0.1:9", model="m")
    with pytest.raises(Exception, match="not built by this engine"):
        engine.generate(GenerationRequest([12345], SamplingParams()))
    engine.close()


def test_closing_the_stream_stops_the_upstream_generation(tmp_path: Path) -> None:
    # The upstream is in process so its scripted engine can be slowed: 2000 words at 10 ms take 20 s.
    slow = FakeEngine(token_delay=0.01)
    store = SQLiteStore(tmp_path / "up.db")
    app = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=slow, store=store)
    with serve_in_thread(app) as url:
        engine = RemoteEngine.connect(url, key=None, model=None, context_length=None, timeout=30)
        assert engine.context_length == slow.context_length  # from the upstream's max_model_len
        slow.enqueue(" ".join(f"w{i}" for i in range(2000)), "done")
        stream = engine.generate(GenerationRequest(engine.encode_chat([Message("user", "go")]), SamplingParams(4000)))
        assert next(stream).text == "w0 "
        stream.close()  # type: ignore[attr-defined]
        # The upstream runs one generation at a time: the next one ends only once the first has stopped.
        started = time.monotonic()
        after = engine.generate(GenerationRequest(engine.encode_chat([Message("user", "x")]), SamplingParams(8)))
        assert "".join(c.text for c in after) == "done"
        assert time.monotonic() - started < 10, "the upstream kept generating the abandoned reply"
        engine.close()
    slow.close()
    store.close()


def test_an_upstream_that_breaks_off_is_a_502(tmp_path: Path) -> None:
    slow = FakeEngine(token_delay=0.01)
    store = SQLiteStore(tmp_path / "up.db")
    app = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=slow, store=store)
    with serve_in_thread(app) as url:
        engine = RemoteEngine(url, model="fake-model")
        slow.enqueue(RuntimeError("upstream engine died"))
        stream = engine.generate(GenerationRequest(engine.encode_chat([Message("user", "go")]), SamplingParams(50)))
        with pytest.raises(BadGateway, match="failed mid-reply: scripted failure"):
            list(stream)
        engine.close()
    slow.close()
    store.close()


@pytest.mark.real
def test_a_real_model_answers_the_same_through_the_front(tmp_path: Path) -> None:
    """SmolLM2 upstream: a greedy session turn through the front equals the same conversation sent upstream."""
    up = start_server([], tmp_path / "up.db", tmp_path / "up.log")
    front = start_server(["--engine", "remote", "--upstream", up.url], tmp_path / "f.db", tmp_path / "f.log", 120)
    try:
        assert requests.get(front.url + "/status", timeout=30).json()["model_name"] == "SmolLM2-135M-Instruct.Q4_1"
        greedy = {"temperature": 0, "max_tokens": 24}
        turns = ["My name is Ada.", "What is my name?"]
        replies = [
            requests.post(front.url + "/chat", json={"message": t, "session_id": "s", **greedy}, timeout=120).json()
            for t in turns
        ]
        direct = requests.post(
            up.url + "/v1/chat/completions",
            json={
                "messages": [
                    {"role": "user", "content": turns[0]},
                    {"role": "assistant", "content": replies[0]["response"]},
                    {"role": "user", "content": turns[1]},
                ],
                **greedy,
            },
            timeout=120,
        ).json()
        assert replies[1]["response"] == direct["choices"][0]["message"]["content"]
    finally:
        assert front.stop() == 0
        assert up.stop() == 0


def test_response_format_and_logprobs_are_forwarded_upstream(tmp_path: Path) -> None:
    up = FakeEngine()
    store = SQLiteStore(tmp_path / "up.db")
    app = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=up, store=store)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with serve_in_thread(app) as url:
        engine = RemoteEngine(url, model="fake-model")
        for wanted in (schema, {"type": "object"}):
            up.enqueue("one two")
            params = SamplingParams(8, json_schema=wanted, logprobs=2)
            chunks = list(engine.generate(GenerationRequest(engine.encode_chat([Message("user", "go")]), params)))
            assert (up.params[-1].json_schema, up.params[-1].logprobs) == (wanted, 2)
            tokens = [t for c in chunks for t in c.logprobs or []]
            assert [t.token for t in tokens] == ["one ", "two"]
            assert [c.token for c in tokens[0].top] == ["one ", "alt1"] and tokens[0].bytes == b"one "
        engine.close()
    up.close()
    store.close()


def test_tools_are_refused_and_tool_results_are_forwarded(tmp_path: Path) -> None:
    up = FakeEngine()
    up_store, front_store = SQLiteStore(tmp_path / "up.db"), SQLiteStore(tmp_path / "front.db")
    upstream = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=up, store=up_store)
    with serve_in_thread(upstream) as url:
        engine = RemoteEngine(url, model="fake-model")
        front = create_app(Settings(engine="fake", db=tmp_path / "front.db"), engine=engine, store=front_store)
        client = front.test_client()
        tool = {"type": "function", "function": {"name": "f"}}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": [tool]})
        assert r.status_code == 400
        assert r.get_json()["error"]["param"] == "tools" and "remote engine" in r.get_json()["error"]["message"]
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]
        up.enqueue("It is 42.")
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.get_json()["choices"][0]["message"]["content"] == "It is 42."
        assert up.prompts[-1][1].tool_calls[0].id == "call_1" and up.prompts[-1][2].tool_call_id == "call_1"
        engine.close()
    up.close()
    up_store.close()
    front_store.close()


def test_a_prefill_is_continued_upstream(tmp_path: Path) -> None:
    up = FakeEngine()
    store = SQLiteStore(tmp_path / "up.db")
    app = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=up, store=store)
    with serve_in_thread(app) as url:
        engine = RemoteEngine(url, model="fake-model")
        up.enqueue(" a time.")
        prompt = engine.encode_chat([Message("user", "Tell a story."), Message("assistant", "Once upon")])
        request = GenerationRequest(prompt, SamplingParams(8))
        chunks = list(engine.generate(request))
        assert "".join(c.text for c in chunks) == " a time."
        assert up.prompts[-1][-1] == Message("assistant", "Once upon")
        # vLLM answers anew unless told: the body says so (pureapi takes the same pair of fields).
        body = engine._body([Message("user", "Tell a story."), Message("assistant", "Once upon")], request)
        assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
        assert "continue_final_message" not in engine._body([Message("user", "Tell a story.")], request)
        engine.close()
    up.close()
    store.close()
