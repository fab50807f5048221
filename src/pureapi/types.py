"""The domain types every layer shares: chat messages, sampling parameters, requests and chunks."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made; arguments is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One chat message; an assistant's may carry tool calls, a tool result (role "tool") names its call."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # the function whose result a tool message carries, where the client gave it


@dataclass
class SamplingParams:
    """How to sample one reply; temperature 0 means greedy."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repeat_penalty: float = 1.0  # 1: off; divides the logits of tokens already in the reply
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence
    seed: int | None = None
    stop: Sequence[str] = ()
    # A JSON schema the reply must match, enforced while sampling ({"type": "object"}: any JSON object);
    # checked by structured.check_schema before it gets here.
    json_schema: dict[str, Any] | None = None
    # None: no logprobs; n >= 0: each token's logprob and the n likeliest alternatives (the raw model's).
    logprobs: int | None = None


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation for an engine that renders its own chat template (the remote one, vLLM's): the messages
    and tools it is sent, and its size in tokens as that engine counted them, or an estimate (`estimated`).

    Its len() is that size, which is all the history window and the context check need from a prompt.
    """

    messages: tuple[Message, ...]
    tokens: int
    estimated: bool = False
    tools: tuple[dict[str, Any], ...] = ()  # the functions the model may call (OpenAI's tools entries)
    prefix: str = ""  # encode_chat's prefix: the start of a forced tool call

    def __len__(self) -> int:
        return self.tokens


# What Engine.encode_chat builds: token ids rendered beside the model, or messages the engine renders itself.
Prompt = list[int] | ChatPrompt


@dataclass
class GenerationRequest:
    """A prompt (token ids, or a ChatPrompt for an engine that takes messages) and its sampling parameters."""

    prompt: Prompt
    params: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event)
    session_id: str | None = None
    # Who may share KV cached from this prompt: requests of the same scope (an API key's, or "" for all).
    cache_scope: str = ""
    tenant: str = ""  # whose turn in the engine's queue this is (the principal's name)

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids; an engine that takes token ids is never handed a ChatPrompt."""
        if isinstance(self.prompt, ChatPrompt):
            raise TypeError("this prompt is chat messages, not token ids")
        return self.prompt

    @property
    def chat(self) -> ChatPrompt | None:
        """The prompt as messages, for an engine that renders its own template; None for token ids."""
        return self.prompt if isinstance(self.prompt, ChatPrompt) else None


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token with its log-probability under the model's raw distribution."""

    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the likeliest candidates at its position, best first."""

    token: str
    logprob: float
    bytes: bytes
    top: list[TopLogprob]


@dataclass
class Chunk:
    """A piece of generated text with the token counts so far; the last one has finish_reason."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed (OpenAI's cached_tokens)
    stop: str | None = None  # the stop string that ended the reply (Anthropic's stop_sequence), if one did
    logprobs: list[TokenLogprob] | None = None  # the tokens this chunk's text came from, when asked for
