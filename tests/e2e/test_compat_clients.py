"""/v1/completions and /v1/messages through the official openai and anthropic clients, on both test models."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest
from openai import OpenAI

from pureapi.engines.llamacpp.model import LlamaModel

from ..conftest import Server

pytestmark = pytest.mark.real

QUESTION = "What is the capital of France? Answer in one sentence."
GREEDY = {"temperature": 0}


@pytest.fixture(params=["smol", "qwen"])
def served(request: pytest.FixtureRequest) -> tuple[Server, Path, bool]:
    """Each test model's server, its GGUF file, and whether greedy text is the same however the prompt's
    tokens are grouped into batches (SmolLM2's kernels: yes; Qwen's tiled ones move near-ties, docs/design.md)."""
    server: Server = request.getfixturevalue(request.param)
    if request.param == "smol":
        return server, request.getfixturevalue("smollm2_gguf"), True
    return server, request.getfixturevalue("qwen_gguf"), False


def same(a: str, b: str, exact: bool) -> bool:
    """Equal, or, where near-ties may flip, both answering Paris."""
    return a == b if exact else "Paris" in a and "Paris" in b


def test_text_completions_with_the_openai_client(served: tuple[Server, Path, bool]) -> None:
    server, gguf, exact = served
    with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        prompt = "The capital of France is"
        whole = client.completions.create(model="x", prompt=prompt, max_tokens=8, **GREEDY)
        text = whole.choices[0].text
        assert "Paris" in text, text
        assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
        assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
        # No chat template: a handful of tokens, where the chat template alone would add more than ten.
        assert whole.usage.prompt_tokens <= 8

        stream = client.completions.create(
            model="x", prompt=prompt, max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
        events = list(stream)
        assert same("".join(e.choices[0].text for e in events if e.choices), text, exact)  # greedy: the same
        assert events[-1].usage is not None and 0 < events[-1].usage.completion_tokens <= 8

        # Token ids, as the model's tokenizer gives them, complete exactly as the text does.
        model = LlamaModel(gguf)
        try:
            ids = model.tokenize(prompt, parse_special=True, add_special=True)
        finally:
            model.free()
        assert len(ids) == whole.usage.prompt_tokens
        by_ids = client.completions.create(model="x", prompt=ids, max_tokens=8, **GREEDY)
        assert same(by_ids.choices[0].text, text, exact)

        # Logprobs per token, in the legacy shape; greedy, so each token is its position's likeliest.
        scored = client.completions.create(model="x", prompt=prompt, max_tokens=4, logprobs=3, **GREEDY)
        lp = scored.choices[0].logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.completion_tokens  # type: ignore[union-attr]
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert len(top) <= 3 and logprob <= 0 and max(top.values()) == pytest.approx(logprob, abs=1e-4), (
                token,
                top,
            )
        assert "".join(lp.tokens) == scored.choices[0].text


def test_messages_with_the_anthropic_client(served: tuple[Server, Path, bool]) -> None:
    server, _, exact = served
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as client:
        messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": QUESTION}]
        message = client.messages.create(
            model="x", max_tokens=32, system="You are a helpful assistant.", messages=messages, extra_body=GREEDY
        )
        assert message.content[0].type == "text"
        text = message.content[0].text
        assert "Paris" in text and message.stop_reason in ("end_turn", "max_tokens")

        count = client.messages.count_tokens(model="x", system="You are a helpful assistant.", messages=messages)
        usage = message.usage
        assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == count.input_tokens

        with client.messages.stream(
            model="x", max_tokens=32, system="You are a helpful assistant.", messages=messages, extra_body=GREEDY
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert same(streamed, text, exact) and final.usage.output_tokens > 0

        cut = client.messages.create(
            model="x", max_tokens=32, messages=messages, stop_sequences=["Paris"], extra_body=GREEDY
        )
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "Paris"
        assert cut.content[0].type == "text" and "Paris" not in cut.content[0].text

        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(
                model="x",
                max_tokens=8,
                messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}],
            )
        assert "'image'" in str(refused.value)
