"""The seed API: POST /chat, POST /reset, GET /status, GET /health; errors are {"error": "..."}."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Literal

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from ..chat.sessions import DEFAULT_SESSION, SessionTurn
from ..errors import BadRequest
from ..models import hardware
from ..types import Chunk, Message, SamplingParams
from .common import (
    Encoder,
    MaxTokens,
    SessionId,
    Temperature,
    drain,
    gateway,
    json_body,
    primed,
    relay,
    sessions,
    sse,
    sse_response,
    validate,
)
from .docs import BODY_ERRORS, GENERATION_ERRORS, Operation, documented
from .openai_tools import MessageToolCall, ToolChoice, ToolSpec
from .seed_tools import FinishReason, TextFilter, ToolResult, finish_reason, plan, session_turn, wire_calls

bp = Blueprint("seed", __name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
_SANE_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_TOOL_FIELDS = {"tools", "tool_choice", "tool_results"}


class ChatRequest(BaseModel):
    """Body of POST /chat. Unknown fields are ignored, as on /v1."""

    model_config = ConfigDict(extra="ignore")

    message: StrictStr | None = Field(
        None,
        description="The user's message (not empty or only whitespace); required unless tool_results are posted.",
        json_schema_extra={"minLength": 1, "pattern": r"\S"},
    )
    max_tokens: MaxTokens = 512
    temperature: Temperature = 0.7
    session_id: SessionId | None = None
    stream: StrictBool = Field(False, description="Stream the reply as server-sent events.")
    tools: list[ToolSpec] | None = Field(
        None, description="Functions the model may call on this turn (OpenAI's shape); the reply may be tool_calls."
    )
    tool_choice: ToolChoice | None = Field(
        None, description='As on /v1/chat/completions: "auto" (default), "none", "required" or a named function.'
    )
    tool_results: list[ToolResult] | None = Field(
        None,
        min_length=1,
        description="The results of every call the session's last reply made, each naming its tool_call_id; "
        "they go before the message, if one is given.",
    )

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    def uses_tools(self) -> bool:
        """Whether the turn offers tools or posts results (the reply then says how it finished)."""
        return bool(self.tools or self.tool_choice is not None or self.tool_results)


class ChatResponse(BaseModel):
    """Body of a successful POST /chat."""

    message: str = Field(description="The user's message as sent ('' on a turn that only posts tool_results).")
    response: str
    status: str = "success"
    tool_calls: list[MessageToolCall] | None = Field(
        None, description="The calls the reply made, if any; post their results as the next turn's tool_results."
    )
    finish_reason: FinishReason | None = Field(
        None, description="Only on a turn with tools, tool_choice or tool_results: tool_calls, stop or length."
    )


class StreamUsage(BaseModel):
    """What a streamed turn cost, and how much of the prompt's KV was reused rather than computed."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class ChatStreamEnd(ChatResponse):
    """The last event of a streamed POST /chat: the whole reply, with its token counts."""

    usage: StreamUsage


class ResetRequest(BaseModel):
    """Body of POST /reset (optional)."""

    model_config = ConfigDict(extra="ignore")

    session_id: SessionId | None = None


class ResetResponse(BaseModel):
    """Body of a successful POST /reset."""

    status: Literal["success"] = "success"
    message: str = "conversation history cleared"


class HealthResponse(BaseModel):
    """Body of GET /health: healthy with the model's name, or loading with why."""

    status: Literal["healthy", "loading"]
    model: str | None = Field(None, description="The served model, once healthy.")
    error: str | None = Field(None, description="Why it is not healthy yet.")


class StatusQuery(BaseModel):
    """Query of GET /status."""

    session_id: SessionId | None = None


class DeviceMemory(BaseModel):
    """One memory pool of the machine: RAM, or one GPU."""

    name: str = Field(description="ram, or cuda:N with the GPU's name")
    total_bytes: int
    free_bytes: int


class StatusResponse(BaseModel):
    """Body of GET /status."""

    model_name: str
    device: str
    conversation_length: int
    memory_allocated: int
    devices: list[DeviceMemory] = Field(description="RAM and each GPU, with free memory now")


def idempotency(body: BaseModel) -> tuple[str, str] | None:
    """(Idempotency-Key, the request's fingerprint) if the client sent a key; a bad key is a 400."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _SANE_KEY.fullmatch(key):
        raise BadRequest(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters, no spaces", param=IDEMPOTENCY_HEADER
        )
    # The fingerprint covers every field that shapes the reply, streaming aside (a retry may switch);
    # tool fields left out count as absent, so keys stored before they existed still match.
    fields = body.model_dump(exclude={"stream"})
    fields = {k: v for k, v in fields.items() if v is not None or k not in _TOOL_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return key, hashlib.sha256(canonical.encode()).hexdigest()


@bp.post("/chat")
@documented(
    Operation(
        "Chat in a server-side session",
        "seed",
        (*GENERATION_ERRORS, 409),
        body=ChatRequest,
        ok=ChatResponse,
        answer="The reply",
        stream='Each event\'s data: {"delta": text} per piece of the reply, then a ChatStreamEnd; '
        'a failure is {"error": message}.',
        events=(ChatStreamEnd,),
        parameters=(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "description": "A retry with the same key on the same session returns the stored reply.",
                "schema": {"type": "string", "pattern": f"^{_SANE_KEY.pattern}$"},
            },
        ),
    )
)
def chat() -> Response:
    body = validate(ChatRequest, json_body())
    if body.message is None and not body.tool_results:
        raise BadRequest("message: field required", param="message")
    params = SamplingParams(max_tokens=body.max_tokens, temperature=float(body.temperature))
    session_id = body.session_id or DEFAULT_SESSION
    key = idempotency(body)
    # A retry of a turn that landed is answered from the store: no admission, no engine (even while
    # the model loads after a restart). chat() checks again under the session's lock, for a retry
    # that raced the original.
    stored = sessions().replay(session_id, *key) if key is not None else None
    text_of: TextFilter | None = None
    if stored is not None:
        turn = SessionTurn(body.message)
        chunks: Iterator[Chunk] = iter([Chunk(stored.content, "stop")])
    else:
        tool_plan = plan(body.tools, body.tool_choice)
        turn = session_turn(body.message, body.tool_results or (), tool_plan)
        params.json_schema = tool_plan.schema  # a forced call is held to its function's schema
        text_of = TextFilter(tool_plan) if tool_plan.fmt is not None else None
        chunks = sessions().chat(session_id, turn, params, idempotency=key)
    stream = primed(chunks)
    reply = _Reply(body, stored)
    if not body.stream:
        text, last = drain(stream)
        response = jsonify(reply.body(turn.reply, text, last).model_dump(exclude_none=True))
    else:
        response = sse_response(relay(stream, _Events(reply, lambda: turn.reply, text_of)))
    if stored is not None:
        response.headers["Idempotent-Replayed"] = "true"
    return response


class _Reply:
    """How a finished turn is answered: the seed's body, with the calls and the finish reason on a turn
    that used tools (or whose stored reply made calls)."""

    def __init__(self, body: ChatRequest, stored: Message | None):
        self.request, self.stored = body, stored

    def body_of(
        self, reply: Message | None, text: str, last: Chunk, end: type[ChatResponse], **more: object
    ) -> ChatResponse:
        """The answer, from the assistant message the session kept (the text, where nothing was kept)."""
        reply = self.stored or reply or Message("assistant", text)
        fields: dict[str, object] = {"message": self.request.message or "", "response": reply.content, **more}
        if self.request.uses_tools() or reply.tool_calls:
            fields.update(tool_calls=wire_calls(reply), finish_reason=finish_reason(reply, last.finish_reason))
        return end(**fields)

    def body(self, reply: Message | None, text: str, last: Chunk) -> ChatResponse:
        """The JSON answer."""
        return self.body_of(reply, text, last, ChatResponse)


class _Events(Encoder):
    """The seed stream: {"delta": text} per piece of the reply (a call's markup held back), then the whole
    ChatStreamEnd (with the calls, on a turn with tools); a failure is {"error": message}."""

    def __init__(self, reply: _Reply, kept: Callable[[], Message | None], text_of: TextFilter | None):
        self.reply, self.kept, self.text_of = reply, kept, text_of
        self.parts: list[str] = []
        self.last: Chunk | None = None

    def events(self, chunk: Chunk) -> Iterator[str]:
        self.last = chunk
        self.parts.append(chunk.text)
        text = self.text_of.feed(chunk.text, chunk.finish_reason is not None) if self.text_of else chunk.text
        if text:
            yield sse({"delta": text})

    def closing(self) -> Iterator[str]:
        last = self.last or Chunk("")
        usage = StreamUsage(
            prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens, cached_tokens=last.cached_tokens
        )
        end = self.reply.body_of(self.kept(), "".join(self.parts), last, ChatStreamEnd, usage=usage)
        yield sse(end.model_dump(exclude_none=True))

    def failed(self, message: str) -> Iterator[str]:
        yield sse({"error": message})


@bp.post("/reset")
@documented(
    Operation(
        "Clear a session's history",
        "seed",
        BODY_ERRORS,
        body=ResetRequest,
        body_required=False,
        ok=ResetResponse,
        answer="Cleared",
    )
)
def reset() -> Response:
    body = validate(ResetRequest, json_body(allow_empty=True))
    sessions().reset(body.session_id or DEFAULT_SESSION)
    return jsonify(ResetResponse().model_dump())


@bp.get("/status")
@documented(
    Operation(
        "Model and session status", "seed", (400, 401, 503), query=StatusQuery, ok=StatusResponse, answer="Status"
    )
)
def status() -> Response:
    query = validate(StatusQuery, request.args.to_dict())
    service = sessions()
    engine = gateway().engine()
    return jsonify(
        StatusResponse(
            model_name=engine.model_name,
            device=engine.device,
            conversation_length=len(service.history(query.session_id or DEFAULT_SESSION)),
            memory_allocated=engine.memory_allocated(),
            devices=_devices(),
        ).model_dump()
    )


def _devices() -> list[DeviceMemory]:
    hw = hardware.detect_cached()
    pools = [DeviceMemory(name="ram", total_bytes=hw.ram_total, free_bytes=hw.ram_free)]
    pools += [DeviceMemory(name=f"cuda:{g.index} {g.name}", total_bytes=g.total, free_bytes=g.free) for g in hw.gpus]
    return pools


@bp.get("/health")
@documented(
    Operation(
        "200 once the model answers, 503 before",
        "seed",
        ok=HealthResponse,
        answer="Healthy",
        responses={503: ("Loading", HealthResponse)},
    )
)
def health() -> tuple[Response, int]:
    state = current_app.extensions["pureapi"]
    engine = state.engine
    if engine is not None and engine.ready():
        return jsonify(HealthResponse(status="healthy", model=engine.model_name).model_dump(exclude_none=True)), 200
    loading = HealthResponse(status="loading", error="the model is not loaded yet")
    return jsonify(loading.model_dump(exclude_none=True)), 503
