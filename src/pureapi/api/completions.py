"""OpenAI's legacy text completions, POST /v1/completions: a raw prompt, no chat template, stateless."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from ..chat.window import fit_prompt
from ..engines.base import Engine
from ..errors import BadRequest
from ..types import Chunk, TokenLogprob
from .common import MaxTokens, collecting, drain, gateway, json_body, primed, relay, sse, sse_response, validate
from .docs import GENERATION_ERRORS, Operation, documented
from .openai import OpenAIEvents, SamplingFields, StreamOptions, Usage, dump
from .openai_output import MAX_TOP_LOGPROBS

bp = Blueprint("completions", __name__, url_prefix="/v1")

Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions. A field not listed here is a 400 naming it, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    prompt: Prompt = Field(
        description="One prompt: text (tokenized as the model's tokenizer does, no chat template, special "
        "tokens parsed) or token ids; a list of one is accepted."
    )
    max_tokens: MaxTokens | None = Field(16, description="Most tokens to generate (16 if left out; null: the context).")
    n: StrictInt = Field(1, ge=1, le=1, description="Only 1 is supported.")
    best_of: StrictInt | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, description="Accepted and not used (OpenAI's end-user id).")
    # Refused rather than ignored until they are built.
    echo: StrictBool = Field(False, description="Not supported: true is a 400.")
    suffix: StrictStr | None = Field(None, description="Not supported (no fill-in-the-middle): text is a 400.")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Return each token's log-probability and this many alternatives."
    )
    logit_bias: dict[str, Any] | None = Field(None, description="Not supported: a non-empty map is a 400.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported; send one request per prompt")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported; send false or leave it out")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (fill in the middle) is not supported; leave it out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it out")
        return value

    def prompt_ids(self, engine: Engine) -> list[int]:
        """The prompt as the engine's token ids."""
        prompt: Any = self.prompt
        if isinstance(prompt, str):
            ids = engine.encode_text(prompt)
            if not ids:
                raise BadRequest("prompt: the prompt has no tokens", param="prompt")
            return ids
        limit = engine.vocab_size
        bad = next((t for t in prompt if t < 0 or (limit is not None and t >= limit)), None)
        if bad is not None:
            raise BadRequest(f"prompt: token id {bad} is not in the vocabulary (0 to {limit})", param="prompt")
        return list(prompt)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy per-token logprobs: the raw model's log-softmax, before penalties and temperature."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] = Field(description="Per token, the likeliest alternatives: token -> logprob.")
    text_offset: list[int] = Field(description="Each token's character offset in the completion's text.")

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob], start: int = 0) -> CompletionLogprobs:
        """The logprobs of these tokens, the first starting at character `start` of the completion."""
        offsets = list(itertools.accumulate((len(t.token) for t in tokens[:-1]), initial=start)) if tokens else []
        return cls(
            tokens=[t.token for t in tokens],
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=[{c.token: c.logprob for c in t.top} for t in tokens],
            text_offset=offsets,
        )


class CompletionChoice(BaseModel):
    """The one choice of a text completion (n is always 1); streamed, finish_reason comes last."""

    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = Field(None, description="Present when the request set logprobs.")
    finish_reason: str | None = Field(
        description="stop (end of text or a stop string) or length (max_tokens or the context); null until the end."
    )


class Completion(BaseModel):
    """Response of POST /v1/completions; streamed, each SSE event is one of these, then [DONE]."""

    id: str
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = Field(None, description="Changes when the model file or the backend build does.")
    choices: list[CompletionChoice]
    usage: Usage | None = Field(
        None, description="Without streaming, always; streamed, only on a last event with no choices (include_usage)."
    )


@bp.post("/completions")
@documented(
    Operation(
        "OpenAI-compatible text completion of a raw prompt (no chat template; stateless)",
        "openai",
        GENERATION_ERRORS,
        body=CompletionRequest,
        ok=Completion,
        answer="A completion, or SSE events (each a Completion) ending in [DONE]",
        stream="Each event's data: a Completion or an error; then [DONE].",
        events=(Completion,),
    )
)
def completions() -> Response:
    body = validate(CompletionRequest, json_body())
    service = gateway()
    engine = service.engine()
    if not engine.raw_prompts:
        raise BadRequest(
            f"prompt: the {engine.name} engine forwards chat messages only; use /v1/chat/completions", param="prompt"
        )
    fill = body.max_tokens is None

    def prompt(engine: Engine, budget: int) -> list[int]:
        return fit_prompt(body.prompt_ids(engine), engine.context_length, budget, "prompt")

    params = replace(body.sampling(body.max_tokens or 1), logprobs=body.logprobs)
    stream = primed(service.stateless_prompt(prompt, params, fill=fill))
    meta: dict[str, Any] = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": engine.model_name,
        "system_fingerprint": engine.system_fingerprint,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(meta, stream, include_usage, body.logprobs is not None))
    tokens: list[TokenLogprob] = []
    text, last = drain(collecting(stream, tokens))
    logprobs = CompletionLogprobs.of(tokens) if body.logprobs is not None else None
    choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=last.finish_reason or "stop")
    return jsonify(dump(Completion(**meta, choices=[choice], usage=Usage.of(last))))


def _stream(meta: dict[str, Any], chunks: Iterator[Chunk], include_usage: bool, logprobs: bool) -> Iterator[str]:
    offset = 0  # characters of the completion sent so far, where the next chunk's tokens start

    def events(chunk: Chunk) -> Iterator[str]:
        nonlocal offset
        if chunk.text or chunk.logprobs or chunk.finish_reason is not None:
            lp = CompletionLogprobs.of(chunk.logprobs or [], offset) if logprobs else None
            offset += sum(len(t.token) for t in chunk.logprobs or ())
            choice = CompletionChoice(text=chunk.text, logprobs=lp, finish_reason=chunk.finish_reason)
            yield sse(dump(Completion(**meta, choices=[choice])))
        if chunk.finish_reason is not None and include_usage:
            yield sse(dump(Completion(**meta, choices=[], usage=Usage.of(chunk))))

    return relay(chunks, OpenAIEvents(events))
