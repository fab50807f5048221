"""Anthropic's Messages API: POST /v1/messages (stateless, named SSE events) and /v1/messages/count_tokens."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel

from ..engines.base import Engine
from ..errors import BadRequest
from ..tools import unanswered_result
from ..types import ChatPrompt, Chunk, Message, ToolCall
from .anthropic_models import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    InputJsonDelta,
    MessageDelta,
    MessageResponse,
    MessagesRequest,
    MessageStart,
    MessageUsage,
    StopDelta,
    StopReason,
    TextContent,
    TextDelta,
    TokenCount,
    ToolChoiceParam,
    ToolUseContent,
)
from .common import drain, gateway, json_body, primed, relay, sse, sse_response, validate
from .openai_tools import ReplyReader, ToolPlan, plan_functions, with_schema

__all__ = [
    "PATH",
    "ContentBlockDelta",
    "ContentBlockStart",
    "ContentBlockStop",
    "CountTokensRequest",
    "MessageDelta",
    "MessageResponse",
    "MessageStart",
    "MessagesRequest",
    "TokenCount",
    "bp",
    "error_body",
]

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


class ReplyBlocks:
    """A reply read into content blocks, whole or as it streams: text runs and calls, one after another
    (with tools, blank text between calls is no block; without them the one text block opens at once)."""

    def __init__(self, plan: ToolPlan):
        self.reader = ReplyReader(plan)
        self.blocks: list[TextContent | ToolUseContent] = []
        self.open = False  # the last block is text still being written

    def feed(self, text: str, final: bool = False) -> list[BaseModel]:
        """The stream events this piece of the reply adds (final: the reply ends with it)."""
        events: list[BaseModel] = []
        if self.reader.parser is None and not self.blocks:
            events.append(self._start(TextContent(text="")))
        for piece in self.reader.feed(text, final):
            if isinstance(piece, ToolCall):
                events.extend(self._stop())
                arguments = json.loads(piece.arguments)
                use = ToolUseContent(id=f"toolu_{uuid.uuid4().hex[:24]}", name=piece.name, input=arguments)
                events.append(self._start(use.model_copy(update={"input": {}})))
                self.blocks[-1] = use
                delta = InputJsonDelta(partial_json=piece.arguments)
                events.append(ContentBlockDelta(index=len(self.blocks) - 1, delta=delta))
                events.append(ContentBlockStop(index=len(self.blocks) - 1))
                continue
            if not self.open and piece.strip():
                events.append(self._start(TextContent(text="")))
            if self.open:
                block = self.blocks[-1]
                assert isinstance(block, TextContent)  # open means the last block is text
                block.text += piece
                events.append(ContentBlockDelta(index=len(self.blocks) - 1, delta=TextDelta(text=piece)))
        if final:
            if not self.blocks:
                events.append(self._start(TextContent(text="")))
            events.extend(self._stop())
        return events

    def _start(self, block: TextContent | ToolUseContent) -> ContentBlockStart:
        self.blocks.append(block)
        self.open = isinstance(block, TextContent)
        return ContentBlockStart(index=len(self.blocks) - 1, content_block=block.model_copy())

    def _stop(self) -> list[BaseModel]:
        if not self.open:
            return []
        self.open = False
        return [ContentBlockStop(index=len(self.blocks) - 1)]

    @property
    def called(self) -> bool:
        """Whether the reply made calls."""
        return any(isinstance(block, ToolUseContent) for block in self.blocks)


def _plan(body: MessagesRequest | CountTokensRequest, engine: Engine) -> ToolPlan:
    choice = body.tool_choice or ToolChoiceParam(type="auto")
    return plan_functions(
        [tool.spec() for tool in body.tools or ()],
        choice.mode(),
        choice.name,
        not choice.disable_parallel_tool_use,
        engine,
        "tools[{i}].input_schema",
    )


def _check_results(chat: list[Message]) -> None:
    orphan = unanswered_result(chat)
    if orphan is not None:
        raise BadRequest(
            f"messages: a tool_result answers no tool_use of an earlier assistant message "
            f"({chat[orphan].tool_call_id!r})",
            param="messages",
        )


def _stop(chunk: Chunk, called: bool) -> tuple[StopReason, str | None]:
    if chunk.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if chunk.stop is not None:
        return "stop_sequence", chunk.stop
    return "end_turn", None


@bp.post("")
def messages() -> Response:
    body = validate(MessagesRequest, json_body())
    chat = body.chat()
    _check_results(chat)
    service = gateway()
    engine = service.engine()
    plan, schema = with_schema(_plan(body, engine), None, "tool_choice")
    if chat[-1].role == "assistant" and (chat[-1].tool_calls or plan.prefix):
        # A final assistant message is a prefill: the reply continues its text (and leaves it out).
        raise BadRequest(
            "messages: a final assistant message is continued, so it cannot hold tool_use blocks "
            "or be followed by a forced tool call",
            param="messages",
        )
    params = replace(body.sampling(), json_schema=schema)
    stream = primed(service.stateless(chat, params, tools=plan.tools, prefix=plan.prefix))
    meta = {"id": f"msg_{uuid.uuid4().hex}", "model": engine.model_name}
    reply = ReplyBlocks(plan)
    if body.stream:
        return sse_response(_stream(meta, stream, reply))
    text, last = drain(stream)
    reply.feed(text, final=True)
    reason, sequence = _stop(last, reply.called)
    message = MessageResponse(
        **meta, content=reply.blocks, stop_reason=reason, stop_sequence=sequence, usage=MessageUsage.of(last)
    )
    return jsonify(message.model_dump())


def _stream(meta: dict[str, str], chunks: Iterator[Chunk], reply: ReplyBlocks) -> Iterator[str]:
    started = False

    def event(model: BaseModel) -> str:
        data = model.model_dump()
        return sse(data, event=data["type"])

    def events(chunk: Chunk) -> Iterator[str]:
        nonlocal started
        happened = reply.feed(chunk.text, chunk.finish_reason is not None)
        if not started:  # the first chunk carries the prompt's token counts for message_start
            started = True
            usage = MessageUsage.of(Chunk("", None, chunk.prompt_tokens, 0, chunk.cached_tokens))
            yield event(MessageStart(message=MessageResponse(**meta, content=[], stop_reason=None, usage=usage)))
            if happened and isinstance(happened[0], ContentBlockStart):
                yield event(happened.pop(0))
            yield sse({"type": "ping"}, event="ping")
        for item in happened:
            yield event(item)
        if chunk.finish_reason is not None:
            reason, sequence = _stop(chunk, reply.called)
            stop = StopDelta(stop_reason=reason, stop_sequence=sequence)
            yield event(MessageDelta(delta=stop, usage=MessageUsage.of(chunk)))
            yield sse({"type": "message_stop"}, event="message_stop")

    def failed(message: str) -> str:
        return sse(error_body(500, message), event="error")

    yield from relay(chunks, events, failed)


@bp.post("/count_tokens")
def count_tokens() -> Response:
    body = validate(CountTokensRequest, json_body())
    engine = gateway().engine()
    plan = _plan(body, engine)
    prompt = engine.encode_chat(body.chat(), plan.tools, plan.prefix)
    estimated = True if isinstance(prompt, ChatPrompt) and prompt.estimated else None
    return jsonify(TokenCount(input_tokens=len(prompt), estimated=estimated).model_dump(exclude_none=True))
