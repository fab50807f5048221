"""Anthropic's Messages API: POST /v1/messages (stateless, named SSE events) and /v1/messages/count_tokens."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from ..errors import BadRequest
from ..types import ChatPrompt, Chunk, Message, SamplingParams
from .common import MAX_STOP, MaxTokens, TopP, drain, json_body, primed, relay, sessions, sse, sse_response, validate

bp = Blueprint("anthropic", __name__, url_prefix="/v1/messages")

PATH = "/v1/messages"  # requests under it are answered in Anthropic's error envelope

# Anthropic's error type for each HTTP status this server answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    type_ = ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": type_, "message": message}}


class TextBlock(BaseModel):
    """A text content block; no other block type is supported by a text model without tools."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr
    cache_control: dict[str, Any] | None = Field(
        None, description="Accepted and not needed: prompt prefixes are reused automatically."
    )


def _text_blocks_only(value: Any) -> Any:
    if isinstance(value, list):
        for block in value:
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"content blocks of type {kind!r} are not supported; only 'text' blocks are")
    return value


def _joined(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


class MessageParam(BaseModel):
    """One message of the conversation sent by the client."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: StrictStr | list[TextBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_blocks_only(value)


class CountTokensRequest(BaseModel):
    """Body of POST /v1/messages/count_tokens. A field not listed here is a 400 naming it, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    messages: list[MessageParam] = Field(min_length=1)
    system: StrictStr | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported yet: a non-empty list is a 400.")
    tool_choice: dict[str, Any] | None = Field(
        None, description="Not supported yet: only {'type': 'none'} or {'type': 'auto'} are accepted."
    )
    thinking: dict[str, Any] | None = Field(None, description="Not supported: only {'type': 'disabled'} is accepted.")

    @field_validator("system", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_blocks_only(value)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tool use is not supported yet; send the request without tools")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("none", "auto"):
            raise ValueError("tool use is not supported yet; only {'type': 'none'} or {'type': 'auto'} are accepted")
        return value

    @field_validator("thinking")
    @classmethod
    def _no_thinking(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "disabled":
            raise ValueError("extended thinking is not supported; leave it out or send {'type': 'disabled'}")
        return value

    def chat(self) -> list[Message]:
        """The conversation as chat messages, the system prompt first."""
        head = [Message("system", _joined(self.system))] if self.system else []
        return head + [Message(m.role, _joined(m.content)) for m in self.messages]


class MessagesRequest(CountTokensRequest):
    """Body of POST /v1/messages. A field not listed here is a 400 naming it, never ignored."""

    max_tokens: MaxTokens
    temperature: Annotated[
        StrictFloat | StrictInt, Field(ge=0, le=1, allow_inf_nan=False, description="Anthropic's range, 0 to 1.")
    ] = 1.0
    top_p: TopP | None = None
    top_k: StrictInt | None = Field(None, ge=0, le=1_000_000, description="Keep the k likeliest tokens.")
    stop_sequences: list[StrictStr] | None = Field(None, max_length=MAX_STOP, description="Stop strings.")
    stream: StrictBool = False
    metadata: dict[str, Any] | None = Field(None, description="Accepted and not used (Anthropic's user_id).")
    service_tier: StrictStr | None = Field(None, description="Accepted and not used: one tier.")
    cache_control: dict[str, Any] | None = Field(
        None, description="Accepted and not needed: prompt prefixes are reused automatically."
    )

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p) if self.top_p is not None else 1.0,
            top_k=self.top_k or 0,
            stop=list(self.stop_sequences or ()),
        )


class TextContent(BaseModel):
    """A text block of the reply."""

    type: Literal["text"] = "text"
    text: str


class MessageUsage(BaseModel):
    """Token counts; as Anthropic counts, input_tokens leaves out the prompt tokens read from the cache."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = Field(0, description="Prompt tokens whose KV cache was reused.")

    @classmethod
    def of(cls, chunk: Chunk) -> MessageUsage:
        """The usage a chunk reports."""
        return cls(
            input_tokens=chunk.prompt_tokens - chunk.cached_tokens,
            output_tokens=chunk.completion_tokens,
            cache_read_input_tokens=chunk.cached_tokens,
        )


StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class MessageResponse(BaseModel):
    """Response of POST /v1/messages without streaming (and, empty, in message_start)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextContent]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    """Response of POST /v1/messages/count_tokens."""

    input_tokens: int
    # Present (true) only where the engine cannot count (a remote upstream without /tokenize): a guess, said so.
    estimated: bool | None = Field(None, description="true when input_tokens is an estimate, not a count")


class MessageStart(BaseModel):
    """The first event of a stream."""

    type: Literal["message_start"] = "message_start"
    message: MessageResponse


class ContentBlockStart(BaseModel):
    """A content block opens (the one text block)."""

    type: Literal["content_block_start"] = "content_block_start"
    index: int = 0
    content_block: TextContent


class TextDelta(BaseModel):
    """Text added to the block."""

    type: Literal["text_delta"] = "text_delta"
    text: str


class ContentBlockDelta(BaseModel):
    """One piece of the reply."""

    type: Literal["content_block_delta"] = "content_block_delta"
    index: int = 0
    delta: TextDelta


class ContentBlockStop(BaseModel):
    """The block is complete."""

    type: Literal["content_block_stop"] = "content_block_stop"
    index: int = 0


class StopDelta(BaseModel):
    """Why the message ended."""

    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDelta(BaseModel):
    """The message's end: its stop reason and final usage."""

    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: MessageUsage


def _stop(chunk: Chunk) -> tuple[StopReason, str | None]:
    if chunk.finish_reason == "length":
        return "max_tokens", None
    if chunk.stop is not None:
        return "stop_sequence", chunk.stop
    return "end_turn", None


@bp.post("")
def messages() -> Response:
    body = validate(MessagesRequest, json_body())
    chat = body.chat()
    if chat[-1].role != "user":
        raise BadRequest(
            "messages: the last message must be from the user (prefilling the assistant's reply is not supported)",
            param="messages",
        )
    service = sessions()
    engine = service.engine()
    stream = primed(service.stateless(chat, body.sampling()))
    meta = {"id": f"msg_{uuid.uuid4().hex}", "model": engine.model_name}
    if body.stream:
        return sse_response(_stream(meta, stream))
    text, last = drain(stream)
    reason, sequence = _stop(last)
    reply = MessageResponse(
        **meta,
        content=[TextContent(text=text)],
        stop_reason=reason,
        stop_sequence=sequence,
        usage=MessageUsage.of(last),
    )
    return jsonify(reply.model_dump())


def _stream(meta: dict[str, str], chunks: Iterator[Chunk]) -> Iterator[str]:
    started = False

    def event(model: BaseModel) -> str:
        data = model.model_dump()
        return sse(data, event=data["type"])

    def events(chunk: Chunk) -> Iterator[str]:
        nonlocal started
        if not started:  # the first chunk carries the prompt's token counts for message_start
            started = True
            usage = MessageUsage.of(Chunk("", None, chunk.prompt_tokens, 0, chunk.cached_tokens))
            yield event(MessageStart(message=MessageResponse(**meta, content=[], stop_reason=None, usage=usage)))
            yield event(ContentBlockStart(content_block=TextContent(text="")))
            yield sse({"type": "ping"}, event="ping")
        if chunk.text:
            yield event(ContentBlockDelta(delta=TextDelta(text=chunk.text)))
        if chunk.finish_reason is not None:
            reason, sequence = _stop(chunk)
            yield event(ContentBlockStop())
            stop = StopDelta(stop_reason=reason, stop_sequence=sequence)
            yield event(MessageDelta(delta=stop, usage=MessageUsage.of(chunk)))
            yield sse({"type": "message_stop"}, event="message_stop")

    def failed(message: str) -> str:
        return sse(error_body(500, message), event="error")

    yield from relay(chunks, events, failed)


@bp.post("/count_tokens")
def count_tokens() -> Response:
    body = validate(CountTokensRequest, json_body())
    engine = sessions().engine()
    prompt = engine.encode_chat(body.chat())
    estimated = True if isinstance(prompt, ChatPrompt) and prompt.estimated else None
    return jsonify(TokenCount(input_tokens=len(prompt), estimated=estimated).model_dump(exclude_none=True))
