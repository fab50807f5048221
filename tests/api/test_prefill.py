"""A final assistant message is continued (prefill) on /v1/chat/completions and /v1/messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pureapi.types import Message

from ..conftest import FakeApp
from ..sse import sse_data
from .test_anthropic import named_events

PREFILLED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]
# The fake counts one token per role tag and per word: <user> Hi <assistant> Once upon, and no second
# <assistant> after it, which a reply started anew would add.
CONTINUED_TOKENS = 5


def test_chat_completions_continue_the_final_assistant_message(fake: FakeApp) -> None:
    fake.engine.enqueue(" a time.")
    r = fake.client.post("/v1/chat/completions", json={"messages": PREFILLED})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["choices"][0]["message"]["content"] == " a time."  # the prefill is not repeated
    assert body["usage"]["prompt_tokens"] == CONTINUED_TOKENS
    assert fake.engine.prompts[-1] == [Message("user", "Hi"), Message("assistant", "Once upon")]


def test_a_streamed_continuation_and_continue_final_message_true(fake: FakeApp) -> None:
    fake.engine.enqueue(" a time.")
    body = {"messages": PREFILLED, "stream": True, "continue_final_message": True}
    r = fake.client.post("/v1/chat/completions", json=body)
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in sse_data(r)[:-1])
    assert text == " a time."


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": PREFILLED, "continue_final_message": False}, "continue_final_message"),
        ({"messages": PREFILLED[:1], "continue_final_message": True}, "continue_final_message"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                ]
            },
            "messages",
        ),
    ],
)
def test_continuations_that_cannot_be_are_400s(fake: FakeApp, body: dict[str, Any], param: str) -> None:
    r = fake.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["error"]["param"] == param
    assert fake.engine.params == []


def test_anthropic_prefill_is_continued_and_left_out_of_the_reply(fake: FakeApp) -> None:
    fake.engine.enqueue(" a time.", " a time.")
    body = {"max_tokens": 20, "messages": PREFILLED}
    r = fake.client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    reply = r.get_json()
    assert reply["content"] == [{"type": "text", "text": " a time."}]
    assert reply["usage"]["input_tokens"] == CONTINUED_TOKENS
    streamed = fake.client.post("/v1/messages", json={**body, "stream": True})
    deltas = [
        d["delta"]["text"] for name, d in named_events(streamed.get_data(as_text=True)) if name == "content_block_delta"
    ]
    assert "".join(deltas) == " a time."


def test_vllms_add_generation_prompt_must_agree(fake: FakeApp) -> None:
    fake.engine.enqueue(" a time.")
    ok = fake.client.post("/v1/chat/completions", json={"messages": PREFILLED, "add_generation_prompt": False})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    bad = fake.client.post("/v1/chat/completions", json={"messages": PREFILLED, "add_generation_prompt": True})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "add_generation_prompt"
