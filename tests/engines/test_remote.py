"""The remote engine in front of a real second pureapi process (scripted engine) on 127.0.0.1."""

from __future__ import annotations

import json
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
from pureapi.engines.remote_tools import UpstreamCalls, upstream_choice
from pureapi.errors import BadGateway, EngineError, GatewayTimeout
from pureapi.settings import Settings
from pureapi.tools import HERMES, ToolCallParser, forced_schema
from pureapi.types import ChatPrompt, GenerationRequest, Message, SamplingParams, ToolCall

from ..conftest import ROOT, Server, free_port, serve_in_thread, start_server
from ..sse import sse_events


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
        with pytest.raises(GatewayTimeout, match=r"did not answer within 0\.5s"):
            engine.encode_chat([Message("user", "hi")])  # asks the upstream to count
        prompt = ChatPrompt((Message("user", "hi"),), 9)
        with pytest.raises(GatewayTimeout, match=r"did not answer within 0\.5s"):
            engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=4)))
        engine.close()


def test_a_prompt_from_elsewhere_is_refused() -> None:
    engine = RemoteEngine("http://127.0.0.1:9", model="m")
    with pytest.raises(EngineError, match="takes chat messages"):
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


def test_tools_choices_and_results_are_forwarded_and_calls_come_back(tmp_path: Path) -> None:
    """A front before a pureapi upstream: the upstream parses its model's call, the front hands it on."""
    up = FakeEngine()
    up_store, front_store = SQLiteStore(tmp_path / "up.db"), SQLiteStore(tmp_path / "front.db")
    upstream = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=up, store=up_store)
    with serve_in_thread(upstream) as url:
        engine = RemoteEngine(url, model="fake-model")
        front = create_app(Settings(engine="fake", db=tmp_path / "front.db"), engine=engine, store=front_store)
        client = front.test_client()
        params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        tools = [
            {"type": "function", "function": {"name": "weather", "parameters": params}},
            {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}},
        ]
        ask = [{"role": "user", "content": "Weather in Oslo?"}]

        up.enqueue('Let me look. <tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
        r = client.post("/v1/chat/completions", json={"messages": ask, "tools": tools, "max_tokens": 50})
        assert r.status_code == 200, r.get_data(as_text=True)
        choice = r.get_json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
        call = choice["message"]["tool_calls"][0]
        assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("weather", {"city": "Oslo"})
        assert up.tools[-1] == tools and up.prefixes[-1] == ""  # the upstream rendered the tools itself

        # A named choice is forced upstream too (its prefix and schema are the upstream's to add), streamed.
        up.enqueue('{"name": "time", "arguments": {}}')
        body = {
            "messages": ask,
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "time"}},
            "max_tokens": 50,
        }
        r = client.post("/v1/chat/completions", json={**body, "stream": True})
        deltas = [e["choices"][0]["delta"] for e in sse_events(r)[:-1] if e["choices"]]
        assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls") or []] == ["time"]
        assert up.prefixes[-1] == "<tool_call>\n" and up.params[-1].json_schema is not None

        # The call and its result go back upstream as OpenAI messages.
        messages = [
            *ask,
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": call["function"]}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
        ]
        up.enqueue("It is 12 C.")
        r = client.post("/v1/chat/completions", json={"messages": messages, "tools": tools, "max_tokens": 8})
        assert r.get_json()["choices"][0]["message"]["content"] == "It is 12 C."
        assert up.prompts[-1][1].tool_calls[0].name == "weather" and up.prompts[-1][2].tool_call_id == "call_1"
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
        body = engine._body(
            engine.encode_chat([Message("user", "Tell a story."), Message("assistant", "Once upon")]), request
        )
        assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
        assert "continue_final_message" not in engine._body(
            engine.encode_chat([Message("user", "Tell a story.")]), request
        )
        engine.close()
    up.close()
    store.close()


def test_without_an_upstream_tokenizer_sizes_are_estimates_and_say_so(tmp_path: Path) -> None:
    """A pureapi upstream has no /tokenize: the window uses a high estimate, count_tokens says it is one,
    and usage is the upstream's own count."""
    up = FakeEngine()
    up_store, front_store = SQLiteStore(tmp_path / "up.db"), SQLiteStore(tmp_path / "front.db")
    upstream = create_app(Settings(engine="fake", db=tmp_path / "up.db"), engine=up, store=up_store)
    with serve_in_thread(upstream) as url:
        engine = RemoteEngine(url, model="fake-model")
        assert not engine.counts_tokens()
        ask = [Message("user", "one two three four")]
        plain, with_tools = engine.encode_chat(ask), engine.encode_chat(ask, [{"type": "function", "function": {}}])
        assert plain.estimated and len(with_tools) > len(plain) > len(up.encode_chat(ask))
        front = create_app(Settings(engine="fake", db=tmp_path / "front.db"), engine=engine, store=front_store)
        client = front.test_client()
        r = client.post(
            "/v1/messages/count_tokens", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.get_json() == {"input_tokens": len(engine.encode_chat([Message("user", "hi")])), "estimated": True}
        up.enqueue("fine")
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.get_json()["usage"]["prompt_tokens"] == len(up.encode_chat([Message("user", "hi")]))
        engine.close()
    up.close()
    up_store.close()
    front_store.close()


def test_upstream_calls_become_hermes_text_and_forced_choices_name_their_function() -> None:
    calls = UpstreamCalls()
    calls.feed([{"index": 0, "id": "c", "function": {"name": "wea", "arguments": '{"city": '}}])
    calls.feed(
        [{"index": 0, "function": {"name": "ther", "arguments": '"Oslo"}'}}, {"index": 1, "function": {"name": "time"}}]
    )
    text = calls.text(forced=False)
    parser = ToolCallParser(HERMES)
    items = [*parser.feed(text), *parser.finish()]
    assert [(c.name, c.arguments) for c in parser.calls] == [("weather", '{"city": "Oslo"}'), ("time", "{}")]
    assert all(isinstance(i, ToolCall) for i in items)
    cut = UpstreamCalls()
    cut.feed([{"index": 0, "function": {"name": "weather", "arguments": '{\n  "ci'}}])
    parser = ToolCallParser(HERMES)
    parser.feed(HERMES.forced_prefix)
    kept = [*parser.feed(cut.text(forced=True) + "\n" + HERMES.closing), *parser.finish()]
    assert not parser.calls and '"ci' in "".join(i for i in kept if isinstance(i, str))  # cut off: text, no 502
    # tool_choice from what a forced plan carries (tools.forced_schema), so the two cannot drift apart.
    one = forced_schema([("weather", {"type": "object"})], HERMES)
    two = forced_schema([("weather", {"type": "object"}), ("time", {"type": "object"})], HERMES)
    assert upstream_choice("", None) == "auto"
    assert upstream_choice(HERMES.forced_prefix, one) == {"type": "function", "function": {"name": "weather"}}
    assert upstream_choice(HERMES.forced_prefix, two) == "required"
