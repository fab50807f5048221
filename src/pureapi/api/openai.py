"""The OpenAI-compatible API: /v1/chat/completions (stateless, SSE streaming) and /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
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

from ..chat.streams import close_stream
from ..errors import BadRequest
from ..structured import JSON_OBJECT, check_schema
from ..types import Chunk, Message, SamplingParams
from ..types import TokenLogprob as TokenLogprobData
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


MAX_TOP_LOGPROBS = 20


class JsonSchemaSpec(BaseModel):
    """The schema of response_format json_schema (OpenAI's shape)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(
        default_factory=lambda: dict(JSON_OBJECT),
        alias="schema",
        description="A JSON schema using the keywords both engines enforce (README: Structured output).",
    )
    strict: StrictBool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def schema_to_enforce(self) -> dict[str, Any] | None:
        """The JSON schema the reply must match (checked), or None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return dict(JSON_OBJECT)
        if self.json_schema is None:
            raise BadRequest("response_format.json_schema: field required", param="response_format.json_schema")
        check_schema(self.json_schema.schema_, "response_format.json_schema.schema")
        return self.json_schema.schema_


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
    # Refused rather than ignored until they are built: a client that asks for tools must not get
    # prose that merely looks like a call.
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported yet: a non-empty list is a 400.")
    tool_choice: StrictStr | dict[str, Any] | None = Field(
        None, description='Not supported yet: only "none" or "auto" (with no tools) are accepted.'
    )
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: the reply is constrained to it while sampling."
    )
    logprobs: StrictBool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="The likeliest alternatives per token (needs logprobs)."
    )

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


class ResponseMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    """A candidate token: its text, log-probability (the raw model's, before temperature) and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token with the likeliest candidates at its position, best first."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Per-token log-probabilities of the choice's content."""

    content: list[TokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, tokens: list[TokenLogprobData]) -> ChoiceLogprobs:
        """OpenAI's shape of an engine's per-token logprobs."""
        return cls(
            content=[
                TokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.bytes),
                    top_logprobs=[TopLogprob(token=c.token, logprob=c.logprob, bytes=list(c.bytes)) for c in t.top],
                )
                for t in tokens
            ]
        )


class Choice(BaseModel):
    """The one choice of a completion (n is always 1)."""

    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = Field(None, description="Present when the request set logprobs.")
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
    logprobs: ChoiceLogprobs | None = Field(None, description="The logprobs of this chunk's tokens, when asked for.")
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
    if body.top_logprobs and not body.logprobs:
        raise BadRequest("top_logprobs: needs logprobs set to true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    schema = body.response_format.schema_to_enforce() if body.response_format is not None else None
    params = replace(body.sampling(requested or 1), json_schema=schema, logprobs=logprobs)
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
        return sse_response(_stream(meta, stream, include_usage, logprobs is not None))
    tokens: list[TokenLogprobData] = []
    text, last = drain(_collecting(stream, tokens))
    choice = Choice(
        message=ResponseMessage(content=text),
        logprobs=ChoiceLogprobs.of(tokens) if logprobs is not None else None,
        finish_reason=last.finish_reason or "stop",
    )
    completion = ChatCompletion(**meta, choices=[choice], usage=Usage.of(last))
    return jsonify(dump(completion))


def _collecting(chunks: Iterator[Chunk], tokens: list[TokenLogprobData]) -> Iterator[Chunk]:
    """The stream, adding each chunk's token logprobs to `tokens`; closing it closes the stream."""
    try:
        for chunk in chunks:
            tokens.extend(chunk.logprobs or ())
            yield chunk
    finally:
        close_stream(chunks)


def _stream(meta: dict[str, Any], chunks: Iterator[Chunk], include_usage: bool, logprobs: bool) -> Iterator[str]:
    def event(delta: Delta, finish: str | None = None, tokens: list[TokenLogprobData] | None = None) -> str:
        lp = ChoiceLogprobs.of(tokens or []) if logprobs and tokens is not None else None
        choice = ChunkChoice(delta=delta, logprobs=lp, finish_reason=finish)
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        return sse(dump(ChatCompletionChunk(**meta, choices=[choice], **extra)))

    def events(chunk: Chunk) -> Iterator[str]:
        if chunk.text or chunk.logprobs:
            yield event(Delta(content=chunk.text), tokens=chunk.logprobs or [])
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
