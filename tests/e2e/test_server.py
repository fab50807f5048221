"""Real servers: `python pure_model_api.py` subprocesses serving real weights over HTTP."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from pureapi.engines.llamacpp.state_files import StateFiles, StateMeta

from ..conftest import ROOT, Server, start_server
from ..sse import sse_events

pytestmark = pytest.mark.real


def readme_curls(keyed: bool = False) -> list[str]:
    """Every curl command in the README, as written: those for a server without keys, or (keyed) those of
    the Keys and tenants section, which send the example key file's keys."""
    text = (ROOT / "README.md").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
    return [line for line in lines if ("Bearer sk-" in line) == keyed]


def run_curl(command: str, url: str) -> str:
    command = command.replace("http://localhost:5000", url).replace("http://127.0.0.1:5000", url)
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=300, check=True)
    return result.stdout


def test_the_readme_curl_commands_work_as_written(smol: Server) -> None:
    commands = readme_curls()
    assert len(commands) >= 8
    seen = set()
    for command in commands:
        out = run_curl(command, smol.url)
        path = re.search(r"localhost:5000(/[a-z0-9_/]*)", command).group(1)  # type: ignore[union-attr]
        seen.add(path)
        if '"stream": true' in command:
            events = sse_events(out)
            assert events[-1]["status"] == "success" and events[-1]["response"]
            assert "".join(e["delta"] for e in events[:-1]) == events[-1]["response"]
            continue
        if path == "/metrics":
            assert "pureapi_requests_total{" in out and "pureapi_time_to_first_token_seconds_count" in out
            continue
        body = json.loads(out)
        if path.startswith("/v1/sessions"):
            assert "error" not in body, body
            if "-X DELETE" in command:
                assert body["deleted"] is True
            elif "/fork" in path:
                assert body["id"] == "trip-b" and body["rounds"] == 0 and body["system_prompt"]
            elif path == "/v1/sessions/trip" and "PATCH" not in command:
                assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
            elif path == "/v1/sessions" and "-X POST" not in command:
                assert "trip" in [s["id"] for s in body["data"]]
            continue
        if path == "/chat":
            assert set(body) == {"message", "response", "status"} and body["status"] == "success"
            assert body["response"].strip()
        elif path == "/status":
            assert set(body) == {"model_name", "device", "conversation_length", "memory_allocated", "devices"}
            assert body["model_name"] == "SmolLM2-135M-Instruct.Q4_1" and body["device"] == "cpu"
            assert body["memory_allocated"] > 100_000_000
        elif path == "/reset":
            assert body["status"] == "success"
        elif path == "/health":
            assert body["status"] == "healthy"
        elif path == "/v1/chat/completions":
            assert body["choices"][0]["message"]["content"]
        elif path == "/v1/models":
            assert body["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
        elif path == "/v1/completions":
            assert body["object"] == "text_completion" and "Paris" in body["choices"][0]["text"]
        elif path == "/v1/messages":
            assert body["type"] == "message" and body["content"][0]["text"] and body["stop_reason"]
        elif path == "/v1/messages/count_tokens":
            assert body["input_tokens"] > 3
        elif path == "/v1/responses":
            assert body["status"] in ("completed", "incomplete") and body["output"][0]["content"][0]["text"]
        elif path == "/v1/conversations":
            assert body["object"] == "conversation" and body["metadata"] == {"topic": "colours"}
    assert {"/chat", "/status", "/reset", "/health", "/v1/chat/completions", "/v1/models", "/metrics"} <= seen
    assert {"/v1/responses", "/v1/conversations"} <= seen
    assert {"/v1/completions", "/v1/messages", "/v1/messages/count_tokens"} <= seen
    assert {"/v1/sessions", "/v1/sessions/trip", "/v1/sessions/trip/fork"} <= seen


def test_greedy_chat_answers_and_keeps_history(smol: Server) -> None:
    session = {"session_id": "geo"}
    r = requests.post(
        smol.url + "/chat",
        json={"message": "What is the capital of France? Answer in one sentence.", "temperature": 0, **session},
    )
    assert r.status_code == 200 and "Paris" in r.json()["response"]
    for marker in ("<|im_end|>", "<|im_start|>"):
        assert marker not in r.json()["response"]
    requests.post(smol.url + "/chat", json={"message": "Thanks!", "temperature": 0, "max_tokens": 8, **session})
    assert requests.get(smol.url + "/status", params=session).json()["conversation_length"] == 4


def test_history_is_capped_at_20_rounds(smol: Server) -> None:
    for i in range(22):
        body = {"message": f"Number {i}", "max_tokens": 1, "temperature": 0, "session_id": "cap"}
        assert requests.post(smol.url + "/chat", json=body).status_code == 200
    assert requests.get(smol.url + "/status?session_id=cap").json()["conversation_length"] == 40


def test_bad_requests_on_the_real_server(smol: Server) -> None:
    r = requests.post(smol.url + "/chat", data="{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = requests.post(smol.url + "/chat", json={"message": "x", "max_tokens": 100_000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]
    r = requests.get(smol.url + "/missing")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"


def test_the_openai_client(smol: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    reply = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=24)  # type: ignore[arg-type]
    text = reply.choices[0].message.content or ""
    assert "Paris" in text and reply.usage is not None and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=24, stream=True)  # type: ignore[arg-type]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
    # The conversation continued: its history is still in a slot, so usage reports it as cached.
    follow = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
    again = client.chat.completions.create(model="x", messages=follow, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens or 0
    assert reply.usage.prompt_tokens <= cached < again.usage.prompt_tokens


def test_the_interactive_client_through_stdin(smol: Server) -> None:
    requests.post(smol.url + "/reset", json={"session_id": "cli"})
    script = "What is the capital of France? Answer in one sentence.\nstatus\nreset\nstatus\nquit\n"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "api_client_example.py"),
            "--url",
            smol.url,
            "--session",
            "cli",
            "--temperature",
            "0",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Assistant: " in out and "Paris" in out
    assert "conversation: 2 messages" in out
    assert "(conversation cleared)" in out and "conversation: 0 messages" in out
    assert "model:        SmolLM2-135M-Instruct.Q4_1" in out
    assert out.rstrip().endswith("bye")


def test_the_client_ends_cleanly_on_eof_and_reports_an_unreachable_server() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "api_client_example.py"), "--url", "http://127.0.0.1:9"],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "cannot reach the pureapi server at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.rstrip().endswith("bye")


def test_history_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    first = start_server([], db, tmp_path / "first.log")
    r = requests.post(first.url + "/chat", json={"message": "My name is Ada.", "temperature": 0, "max_tokens": 16})
    assert r.status_code == 200
    assert first.stop("term") == 0
    (states,) = (tmp_path / "sessions.kv").iterdir()  # beside the database, one folder per model fingerprint

    def saved() -> dict[str, StateMeta]:
        return StateFiles(states, 1 << 40).index()

    # The session's KV state was written at shutdown (beside the start-up check's short prompt, no session's).
    (conversation,) = [meta for meta in saved().values() if meta.sessions == {"default"}]
    second = start_server([], db, tmp_path / "second.log")
    try:
        assert requests.get(second.url + "/status").json()["conversation_length"] == 2
        r = requests.post(
            second.url + "/chat", json={"message": "What is my name?", "temperature": 0, "max_tokens": 16}
        )
        assert r.status_code == 200
        assert requests.get(second.url + "/status").json()["conversation_length"] == 4
        # Restored into a slot, so the file was consumed.
        assert all(meta.tokens != conversation.tokens for meta in saved().values())
        assert requests.post(second.url + "/reset").status_code == 200
    finally:
        assert second.stop() == 0
    # Reset: nothing of the conversation is written at shutdown.
    left = saved().values()
    assert all(not meta.sessions and meta.tokens[: len(conversation.tokens)] != conversation.tokens for meta in left)
    assert all(len(meta.tokens) < len(conversation.tokens) for meta in left)


def test_start_api_sh_serves_and_passes_flags(tmp_path: Path) -> None:
    server = start_server(["--max-rounds", "1"], tmp_path / "s.db", tmp_path / "s.log", script="start_api.sh")
    try:
        for message in ("one", "two"):
            requests.post(server.url + "/chat", json={"message": message, "max_tokens": 1})
        assert requests.get(server.url + "/status").json()["conversation_length"] == 2
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("flag", "model"),
    # On a machine without a GPU the aliases resolve to their GGUF builds (models/catalogue.py).
    [("--qwen", "'Qwen/Qwen2.5-7B-Instruct-GGUF'"), ("--llama", "'bartowski/Meta-Llama-3.1-8B-Instruct-GGUF'")],
)
def test_start_api_sh_aliases_fail_offline_with_one_line(tmp_path: Path, flag: str, model: str) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "start_api.sh"), flag, "--db", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHON": sys.executable},
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert model in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_model_file_exits_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model at all")
    result = subprocess.run(
        [sys.executable, str(ROOT / "pure_model_api.py"), "--model", str(bad), "--db", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"pureapi: model file {bad}: not a GGUF file (it does not start with 'GGUF')"


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["--api-key-file", "{empty}"], "holds no keys; refusing to serve without any"),
        (
            ["--engine", "transformers", "--api-key", "k1", "--api-key", "k2", "--kv-cache-scope", "key"],
            "start with --kv-cache-scope global to accept that, or --parallel 1",
        ),
    ],
)
def test_a_refused_start_exits_with_one_line_before_the_model_loads(
    tmp_path: Path, args: list[str], refusal: str
) -> None:
    """The key file and the tenants check come before the model starts loading in the background, so a
    refused start neither leaves a half-made conversion in the cache nor prints a loader's error."""
    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys yet\n")
    cache = tmp_path / "cache"
    argv = [a.replace("{empty}", str(empty)) for a in args] + ["--cache-dir", str(cache)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "pure_model_api.py"), *argv, "--db", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and refusal in result.stderr, result.stderr
    assert not cache.exists() or not any(cache.iterdir())


def test_qwen_serves_the_seed_api_and_the_openai_client(qwen: Server) -> None:
    r = requests.post(
        qwen.url + "/chat",
        json={"message": "What is the capital of France? Answer in one sentence.", "temperature": 0, "max_tokens": 32},
    )
    assert r.status_code == 200 and "Paris" in r.json()["response"]
    status = requests.get(qwen.url + "/status").json()
    assert status["model_name"] == "Qwen2.5-Coder-0.5B-Instruct" and status["conversation_length"] == 2
    from openai import OpenAI

    client = OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    assert "def " in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_the_transformers_engine_serves_the_same_api(tmp_path: Path) -> None:
    """`--engine transformers` (the engine for CUDA and HF models) behind the real server, on the GGUF default."""
    server = start_server(["--engine", "transformers", "--device", "cpu"], tmp_path / "s.db", tmp_path / "s.log")
    try:
        r = requests.post(
            server.url + "/chat",
            json={"message": "What is the capital of France? Answer in one sentence.", "temperature": 0},
        )
        assert r.status_code == 200 and "Paris" in r.json()["response"]
        status = requests.get(server.url + "/status").json()
        assert status["conversation_length"] == 2 and status["device"] == "cpu"
        from openai import OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "List three colors."}]
        stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0, stream=True)  # type: ignore[arg-type]
        reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert reply.strip()
        # Batched by default: four clients at once, each resending a history whose pages are cached.
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And three animals?"}]
        with ThreadPoolExecutor(4) as pool:
            turns = list(
                pool.map(
                    lambda _: client.chat.completions.create(
                        model="x",
                        messages=messages,  # type: ignore[arg-type]
                        max_tokens=12,
                        temperature=0,
                    ),
                    range(4),
                )
            )
        for t in turns:
            assert t.choices[0].message.content
            assert t.usage is not None and t.usage.prompt_tokens_details is not None
            assert 0 < (t.usage.prompt_tokens_details.cached_tokens or 0) < t.usage.prompt_tokens
    finally:
        assert server.stop() == 0


def test_frequency_penalty_breaks_a_greedy_loop(smol: Server) -> None:
    """A real effect of the penalties on the llama.cpp engine: greedy SmolLM2 repeats 'hello' forever without them."""
    from openai import OpenAI

    client = OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Repeat the word hello forever: hello hello hello"}]

    def hellos(**extra: float) -> int:
        r = client.chat.completions.create(
            model="x", messages=messages, max_tokens=40, temperature=0, extra_body=extra or None
        )  # type: ignore[arg-type]
        return (r.choices[0].message.content or "").lower().count("hello")

    plain = hellos()
    assert plain >= 10
    assert hellos(frequency_penalty=2.0) < plain / 2
    assert hellos(presence_penalty=2.0) < plain
    assert hellos(repeat_penalty=1.5) < plain  # a llama.cpp extension, sent as an extra field
