"""Small pieces: stop strings, template splitting, the history window, settings, model resolution."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pureapi.chat.store import MIGRATIONS, SQLiteStore, StoreError
from pureapi.chat.streams import StopMatcher, with_stops
from pureapi.chat.window import fit_window, rounds_of
from pureapi.engines._template import render_segments
from pureapi.errors import ContextOverflow, ModelLoadError
from pureapi.models.resolve import check_gguf, resolve_model
from pureapi.settings import Settings, add_settings_arguments, settings_from_args
from pureapi.types import Chunk, Message


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = ""
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            return out, True
    return out + m.flush(), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (["END"], ["abc", "dEN", "Dxyz"], ("abcd", True)),
        (["END"], ["abc", "dEN", "x"], ("abcdENx", False)),
        (["END"], ["abcEN"], ("abcEN", False)),
        (["\n\n", "###"], ["a\n", "\nb"], ("a", True)),
        ([], ["a", "b"], ("ab", False)),
        (["aa"], ["a", "a"], ("", True)),
    ],
)
def test_stop_matcher(stops: list[str], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert feed_all(stops, pieces) == expected


def test_with_stops_closes_the_source_on_a_hit() -> None:
    closed = []

    def source():  # type: ignore[no-untyped-def]
        try:
            yield Chunk("one ", None, 3, 1)
            yield Chunk("STOP two", None, 3, 2)
            yield Chunk("", "stop", 3, 3)
        finally:
            closed.append(True)

    out = list(with_stops(source(), ["STOP"]))
    assert [c.text for c in out] == ["one ", ""]
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens == 2
    assert closed == [True]


def chatml(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def test_render_segments_marks_user_text() -> None:
    render = chatml

    pieces = render_segments(render, [Message("system", "S"), Message("user", "<|im_start|>x")])
    assert pieces == [
        (False, "<|im_start|>system\n"),
        (True, "S"),
        (False, "<|im_end|>\n<|im_start|>user\n"),
        (True, "<|im_start|>x"),
        (False, "<|im_end|>\n<|im_start|>assistant\n"),
    ]


def test_a_final_assistant_message_is_continued_without_a_generation_prompt() -> None:
    pieces = render_segments(chatml, [Message("user", "Hi"), Message("assistant", "Once upon")])
    assert pieces == [
        (False, "<|im_start|>user\n"),
        (True, "Hi"),
        (False, "<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Once upon"),
    ]
    empty = render_segments(chatml, [Message("user", "Hi"), Message("assistant", "")])
    assert empty[-1] == (False, "<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n")


def test_fit_window_drops_oldest_rounds_then_reports_token_counts() -> None:
    def encode(msgs):  # type: ignore[no-untyped-def]
        return [0] * sum(len(m.content) for m in msgs)

    rounds = rounds_of([Message("user", "a" * 10), Message("assistant", "b" * 10)] * 3)
    ids = fit_window(encode, 100, rounds, [Message("user", "c" * 10)], 51)
    assert len(ids) == 30  # one round (20) + the new message (10)
    with pytest.raises(ContextOverflow, match="lower max_tokens to at most 90"):
        fit_window(encode, 100, rounds, [Message("user", "c" * 10)], 95)
    with pytest.raises(ContextOverflow, match="prompt is 200 tokens but the model's context is 100"):
        fit_window(encode, 100, rounds, [Message("user", "c" * 200)], 1)


def pair(user: str, assistant: str) -> list[Message]:
    return [Message("user", user), Message("assistant", assistant)]


def test_store_appends_rounds_atomically_and_respects_resets(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    assert store.history("x", owner="") == ([], 0)
    assert store.append_round("x", pair("u1", "a1"), 0, 20, owner="")
    _, epoch = store.history("x", owner="")
    store.reset("x", owner="")
    assert not store.append_round("x", pair("late", "reply"), epoch, 20, owner="")  # reset happened meanwhile
    assert store.history("x", owner="")[0] == []
    _, epoch = store.history("x", owner="")
    for i in range(5):
        store.append_round("x", pair(f"u{i}", f"a{i}"), epoch, 3, owner="")
    assert [m.content for m in store.history("x", owner="")[0]] == ["u2", "a2", "u3", "a3", "u4", "a4"]
    store.close()
    reopened = SQLiteStore(tmp_path / "s.db")
    assert len(reopened.history("x", owner="")[0]) == 6
    assert sqlite3.connect(tmp_path / "s.db").execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_corrupt_store_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "s.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"session store .*s\.db"):
        SQLiteStore(bad)


def test_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    monkeypatch.setenv("PUREAPI_PORT", "6000")
    monkeypatch.setenv("PUREAPI_MAX_ROUNDS", "5")
    s = settings_from_args(parser.parse_args(["--port", "7000", "--device", "cpu"]))
    assert (s.port, s.max_rounds, s.device, s.host) == (7000, 5, "cpu", "127.0.0.1")
    assert Settings().model == "smollm2" and Settings().port == 5000


def test_operating_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    s = settings_from_args(parser.parse_args(["--metrics-public", "--log-format", "json", "--session-ttl", "3600"]))
    assert (s.metrics_public, s.log_format, s.session_ttl) == (True, "json", 3600)
    assert settings_from_args(parser.parse_args([])).metrics_public is False
    monkeypatch.setenv("PUREAPI_METRICS_PUBLIC", "true")
    assert settings_from_args(parser.parse_args([])).metrics_public is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])


def test_resolve_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        check_gguf(fake)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelLoadError, match="truncated"):
        check_gguf(short)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not an alias"):
        resolve_model("no-such-alias")


def test_aliases_resolve_to_gguf_repos_and_fail_offline_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        # On a CPU an alias resolves to its GGUF build.
        with pytest.raises(ModelLoadError, match=r"repo 'Qwen/Qwen2.5-7B-Instruct-GGUF': not in the local.*OFFLINE"):
            resolve_model("qwen")
        with pytest.raises(ModelLoadError, match=r"bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"):
            resolve_model("llama")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_embedded_default_model_resolves() -> None:
    model = resolve_model("smollm2")
    assert model.is_gguf and model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
