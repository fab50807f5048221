"""Anthropic's Messages API wire shapes: the request with its content blocks and tools, the reply's blocks
and the stream's events."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from ..tools import named_results
from ..types import Chunk, Message, SamplingParams, ToolCall
from .common import MAX_STOP, MaxTokens, TopP
from .openai_tools import NAME, FunctionSpec, ToolMode, other_type

CacheControl = Field(None, description="Accepted and not needed: prompt prefixes are reused automatically.")
BLOCK_TYPES = ("text", "tool_use", "tool_result")


class TextBlock(BaseModel):
    """A text content block."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr
    cache_control: dict[str, Any] | None = CacheControl


class BlockParam(BaseModel):
    """A content block of a request message: text; tool_use (a call the assistant made, sent back); or
    tool_result (a call's result, in a user message: text or text blocks; is_error marks a failed call)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "tool_use", "tool_result"]
    text: StrictStr | None = None
    id: StrictStr | None = Field(None, min_length=1)
    name: StrictStr | None = Field(None, min_length=1)
    input: dict[str, Any] | None = None
    tool_use_id: StrictStr | None = Field(None, min_length=1)
    content: StrictStr | list[TextBlock] | None = None
    is_error: StrictBool | None = None
    cache_control: dict[str, Any] | None = CacheControl

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> BlockParam:
        needed = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",)}[self.type]
        allowed = {*needed, "type", "cache_control", *(("content", "is_error") if self.type == "tool_result" else ())}
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} block needs {', '.join(missing)}")
        stray = sorted(self.model_fields_set - allowed)
        if stray:
            raise ValueError(f"a {self.type} block has no field {stray[0]!r}")
        return self

    def call(self) -> ToolCall:
        """A tool_use block as a call."""
        return ToolCall(self.id or "", self.name or "", json.dumps(self.input, ensure_ascii=False))

    def result(self) -> str:
        """A tool_result block's text as the model reads it (a failed call's text says so)."""
        text = _joined(self.content or "")
        return f"Error: {text}" if self.is_error else text


def _blocks_of(value: Any, allowed: tuple[str, ...]) -> Any:
    kind = other_type(value, (*allowed, None))
    if kind is not None:
        raise ValueError(f"content blocks of type {kind!r} are not supported here; {', '.join(map(repr, allowed))} are")
    return value


def _joined(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


class MessageParam(BaseModel):
    """One message of the conversation sent by the client."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: StrictStr | list[BlockParam]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        return _blocks_of(value, BLOCK_TYPES)

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        wrong = "tool_result" if self.role == "assistant" else "tool_use"
        if not isinstance(self.content, str) and any(block.type == wrong for block in self.content):
            raise ValueError(f"{self.role} messages cannot hold {wrong} blocks")
        return self

    def chat(self) -> list[Message]:
        """The message as chat messages: a user's tool results become tool messages (before its text), an
        assistant's tool_use blocks its calls."""
        if isinstance(self.content, str):
            return [Message(self.role, self.content)]
        text = "".join(block.text or "" for block in self.content if block.type == "text")
        if self.role == "assistant":
            calls = tuple(block.call() for block in self.content if block.type == "tool_use")
            return [Message("assistant", text, calls)]
        results = [
            Message("tool", b.result(), tool_call_id=b.tool_use_id) for b in self.content if b.type == "tool_result"
        ]
        return [*results, Message("user", text)] if text or not results else results


class AnthropicTool(BaseModel):
    """A client tool: a function with the JSON schema of its input."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["custom"] | None = None
    name: StrictStr = Field(min_length=1, max_length=64, pattern=NAME)
    description: StrictStr | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = CacheControl

    def spec(self) -> FunctionSpec:
        """The function as every surface's tool machinery takes it."""
        return FunctionSpec(name=self.name, description=self.description, parameters=self.input_schema)


class ToolChoiceParam(BaseModel):
    """auto, any (some call), tool (this one, by name) or none."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoiceParam:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name: give it with type 'tool', and only then")
        return self

    def mode(self) -> ToolMode:
        """The choice in the shared tool machinery's terms."""
        return {"auto": "auto", "any": "required", "tool": "named", "none": "none"}[self.type]  # type: ignore[return-value]


class CountTokensRequest(BaseModel):
    """Body of POST /v1/messages/count_tokens. A field not listed here is a 400 naming it, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    messages: list[MessageParam] = Field(min_length=1)
    system: StrictStr | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = Field(None, description="Client tools; server tools are a 400.")
    tool_choice: ToolChoiceParam | None = Field(None, description="auto (the default), any, tool or none.")
    thinking: dict[str, Any] | None = Field(None, description="Not supported: only {'type': 'disabled'} is accepted.")

    @field_validator("system", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _blocks_of(value, ("text",))

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools_only(cls, value: Any) -> Any:
        kind = other_type(value, (None, "custom"))
        if kind is not None:
            raise ValueError(f"the server tool {kind!r} is not supported; only client tools are")
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
        return named_results(head + [m for message in self.messages for m in message.chat()])


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
    cache_control: dict[str, Any] | None = CacheControl

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


class ToolUseContent(BaseModel):
    """A call the reply made (in a content_block_start its input is empty: it streams as JSON deltas)."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextContent | ToolUseContent


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


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageResponse(BaseModel):
    """Response of POST /v1/messages without streaming (and, empty, in message_start)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
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
    """A content block opens: text, or a call whose input follows as input_json_delta events."""

    type: Literal["content_block_start"] = "content_block_start"
    index: int = 0
    content_block: ContentBlock


class TextDelta(BaseModel):
    """Text added to the block."""

    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    """A piece of a call's input, as JSON text."""

    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(BaseModel):
    """One piece of a block."""

    type: Literal["content_block_delta"] = "content_block_delta"
    index: int = 0
    delta: TextDelta | InputJsonDelta


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
