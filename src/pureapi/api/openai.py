"""The OpenAI-compatible API: /v1/chat/completions (stateless, SSE streaming) and /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from flask import Blueprint, Response, jsonify
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
)

from ..errors import BadRequest
from ..types import Chunk, Message, SamplingParams
from .common import (
    MAX_STOP,
    MaxTokens,
    Penalty,
    Seed,
    Temperature,
    TopP,
    drain,
    json_body,
    primed,
    relay,
    sessions,
    sse,
    sse_response,
    validate,
)

bp = Blueprint("openai", __name__, url_prefix="/v1")


class TextPart(BaseModel):
    """A text content part; other part types are not supported by a text model."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message of the conversation sent by the client."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        """The content as plain text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    """Stream options; include_usage adds a final usage chunk."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The sampling fields chat and text completions share."""

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"Up to {MAX_STOP} stop strings.")
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    top_k: StrictInt = Field(
        0, ge=0, le=1_000_000, description="llama.cpp extension: keep the k likeliest tokens; 0 is off."
    )
    min_p: StrictFloat | StrictInt = Field(
        0.0, ge=0, le=1, description="llama.cpp extension: drop tokens below min_p × the top probability."
    )
    repeat_penalty: StrictFloat | StrictInt = Field(
        1.0, ge=0.5, le=2, allow_inf_nan=False, description="llama.cpp extension: 1 is off."
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return value

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters for these fields."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            min_p=float(self.min_p),
            repeat_penalty=float(self.repeat_penalty),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
        )


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions. Unknown fields are ignored (SDKs send extras)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Refused rather than ignored until they are built: a client that asks for JSON, tools or
    # logprobs must not get prose that merely looks like an answer.
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported yet: a non-empty list is a 400.")
    tool_choice: StrictStr | dict[str, Any] | None = Field(
        None, description='Not supported yet: only "none" or "auto" (with no tools) are accepted.'
    )
    response_format: dict[str, Any] | None = Field(
        None, description='Not supported yet: only {"type": "text"} is accepted.'
    )
    logprobs: StrictBool | None = Field(None, description="Not supported yet: true is a 400.")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="Not supported yet: above 0 is a 400.")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tool calling is not supported yet; send the request without tools")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value not in (None, "none", "auto"):
            raise ValueError("tool calling is not supported yet; only 'none' or 'auto' are accepted")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError(
                f"type {value.get('type')!r} is not supported yet (structured output); only 'text' is accepted"
            )
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported yet; send false or leave it out")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported yet; send 0 or leave it out")
        return value


class ResponseMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """The one choice of a completion (n is always 1)."""

    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str = Field(description="stop (end of turn or a stop string) or length (max_tokens or the context).")


class PromptTokensDetails(BaseModel):
    """Where the prompt's tokens came from."""

    cached_tokens: int = Field(description="Prompt tokens whose KV cache was reused rather than computed.")


class Usage(BaseModel):
    """Token counts of one completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, last: Chunk) -> Usage:
        """The usage a stream's last chunk reports."""
        return cls(
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            total_tokens=last.prompt_tokens + last.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=last.cached_tokens),
        )


class ChatCompletion(BaseModel):
    """Response of POST /v1/chat/completions without streaming."""

    id: str
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds to the reply: the role first, then text; the last chunk's delta is empty."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    """The one choice of a streamed chunk; the last one has finish_reason."""

    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed completion; with include_usage, a last one with usage and no choices."""

    id: str
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, description="Present (null until the last chunk) only with include_usage.")


class ModelCard(BaseModel):
    """The served model."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "pureapi"
    # vLLM's field: a remote engine in front of this server sizes its history window by it.
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON: fields left at their defaults are still sent, `usage` only where it was given."""
    return model.model_dump(exclude={"usage"} if "usage" not in model.model_fields_set else set())


def error_event(message: str) -> str:
    """A failure in the middle of an OpenAI stream."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = validate(ChatCompletionRequest, json_body())
    messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
    if messages[-1].role == "assistant":
        raise BadRequest("messages: the last message must not be from the assistant", param="messages")
    requested = body.max_completion_tokens or body.max_tokens
    params = body.sampling(requested or 1)
    service = sessions()
    engine = service.engine()
    stream = primed(service.stateless(messages, params, fill=requested is None))
    meta: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": engine.model_name,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(meta, stream, include_usage))
    text, last = drain(stream)
    completion = ChatCompletion(
        **meta,
        choices=[Choice(message=ResponseMessage(content=text), finish_reason=last.finish_reason or "stop")],
        usage=Usage.of(last),
    )
    return jsonify(dump(completion))


def _stream(meta: dict[str, Any], chunks: Iterator[Chunk], include_usage: bool) -> Iterator[str]:
    def event(delta: Delta, finish: str | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        return sse(dump(ChatCompletionChunk(**meta, choices=[choice], **extra)))

    def events(chunk: Chunk) -> Iterator[str]:
        if chunk.text:
            yield event(Delta(content=chunk.text))
        if chunk.finish_reason is not None:
            yield event(Delta(), chunk.finish_reason)
            if include_usage:
                yield sse(dump(ChatCompletionChunk(**meta, choices=[], usage=Usage.of(chunk))))

    yield event(Delta(role="assistant", content=""))
    yield from relay(chunks, events, error_event)
    yield sse("[DONE]")


@bp.get("/models")
def models() -> Response:
    engine = sessions().engine()
    card = ModelCard(id=engine.model_name, max_model_len=engine.context_length)
    return jsonify(ModelList(data=[card]).model_dump())
