"""OpenAI's Responses API: POST /v1/responses (stored, chained, streamed), GET/DELETE one, its input items."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from ..chat.responses import Outcome, ResponseService, Turn, message_item
from ..errors import BadRequest
from ..types import Chunk, Message, SamplingParams
from .common import (
    MaxTokens,
    Temperature,
    TopP,
    drain,
    error_text,
    gateway,
    json_body,
    primed,
    sse,
    sse_response,
    validate,
)

log = logging.getLogger(__name__)
bp = Blueprint("responses", __name__, url_prefix="/v1")

MAX_ITEMS = 1000
Metadata = dict[StrictStr, StrictStr]


class ContentPart(BaseModel):
    """A text part of a message item; other part types are not supported by a text model."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


class InputMessage(BaseModel):
    """A message item of `input` (or of a conversation)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[ContentPart]

    def message(self) -> Message:
        """The item as a chat message."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, text)


class ConversationRef(BaseModel):
    """A conversation named by id."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr


class ResponseRequest(BaseModel):
    """Body of POST /v1/responses. Unknown fields are ignored (SDKs send extras)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    input: StrictStr | list[InputMessage] = Field(description="The new user text, or message items.")
    instructions: StrictStr | None = Field(None, description="A system message for this turn only.")
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    store: StrictBool = Field(True, description="Keep the response, so it can be retrieved and continued.")
    previous_response_id: StrictStr | None = Field(None, description="Continue from this stored response.")
    conversation: StrictStr | ConversationRef | None = Field(
        None, description="Continue this conversation; the turn's input and output are appended to it."
    )
    stream: StrictBool = False
    metadata: Metadata | None = None
    tools: list[Any] = Field(default_factory=list, description="Not supported: must be empty.")
    background: StrictBool = Field(False, description="Not supported: must be false.")

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if isinstance(value, list):
            if not 1 <= len(value) <= MAX_ITEMS:
                raise ValueError(f"give 1 to {MAX_ITEMS} items")
            talk = [m for m in value if m.role not in ("system", "developer")]
            if not talk or talk[-1].role != "user":
                raise ValueError("the last non-system item must be a user message")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Any]) -> list[Any]:
        if value:
            raise ValueError("tools are not supported by this server")
        return value

    @field_validator("background")
    @classmethod
    def _background(cls, value: bool) -> bool:
        if value:
            raise ValueError("background responses are not supported by this server")
        return value


class OutputText(BaseModel):
    """The text of a reply."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    """The assistant's message item."""

    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    """How much of the input came from the KV cache (a continued chain, a shared prefix)."""

    cached_tokens: int


class OutputTokensDetails(BaseModel):
    """Reasoning tokens: none for these models."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of one response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response stopped early."""

    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    """Why a response failed."""

    code: str
    message: str


class ResponseObject(BaseModel):
    """A response, as returned, streamed in events and stored."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    truncation: Literal["auto"] = "auto"  # the oldest turns are dropped to fit the context
    usage: ResponseUsage | None
    metadata: Metadata
    conversation: ConversationRef | None


class ResponseDeleted(BaseModel):
    """The answer to DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class ListQuery(BaseModel):
    """Paging of an item list: newest first by default."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None


class ItemList(BaseModel):
    """A page of items."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, items: list[dict[str, Any]], has_more: bool) -> ItemList:
        """A page with its first and last ids."""
        return cls(
            data=items,
            first_id=items[0]["id"] if items else None,
            last_id=items[-1]["id"] if items else None,
            has_more=has_more,
        )


def service() -> ResponseService:
    """The app's response service."""
    return current_app.extensions["pureapi"].responses  # type: ignore[no-any-return]


def ok(model: BaseModel) -> Response:
    """A response model as JSON."""
    return jsonify(model.model_dump(mode="json"))


def _usage(last: Chunk) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=last.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=last.cached_tokens),
        output_tokens=last.completion_tokens,
        total_tokens=last.prompt_tokens + last.completion_tokens,
    )


@bp.post("/responses")
def create_response() -> Response:
    body = validate(ResponseRequest, json_body())
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    conversation = body.conversation.id if isinstance(body.conversation, ConversationRef) else body.conversation
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    engine = gateway().engine()
    requested = body.max_output_tokens
    params = SamplingParams(max_tokens=requested or 0, temperature=temperature, top_p=top_p)
    turn = Turn(
        input=[m.message() for m in items],
        params=params,
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        conversation_id=conversation,
        store=body.store,
        input_items=[message_item(m.role, m.message().content, status="completed") for m in items],
    )
    created = int(time.time())

    def render(status: str, text: str = "", last: Chunk | None = None) -> ResponseObject:
        output = (
            []
            if status == "in_progress"
            else [OutputMessage(id=turn.output_id, status=status, content=[OutputText(text=text)])]
        )  # type: ignore[arg-type]
        return ResponseObject(
            id=turn.response_id,
            created_at=created,
            status=status,  # type: ignore[arg-type]
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=body.instructions,
            max_output_tokens=requested,
            model=engine.model_name,
            output=output,
            previous_response_id=body.previous_response_id,
            store=body.store,
            temperature=temperature,
            top_p=top_p,
            usage=_usage(last) if last is not None else None,
            metadata=body.metadata or {},
            conversation=ConversationRef(id=conversation) if conversation else None,
        )

    def final(outcome: Outcome) -> ResponseObject:
        status = "incomplete" if outcome.last.finish_reason == "length" else "completed"
        return render(status, outcome.text, outcome.last)

    stream = primed(service().respond(turn, lambda outcome: final(outcome).model_dump(mode="json")))
    if body.stream:
        return sse_response(_events(render("in_progress"), turn.output_id, final, stream))
    text, last = drain(stream)
    return ok(final(Outcome(text, last)))


def _events(
    start: ResponseObject, item_id: str, final: Callable[[Outcome], ResponseObject], chunks: Iterator[Chunk]
) -> Iterator[str]:
    """The documented event sequence: created, in_progress, item and part added, text deltas, done events,
    then completed (or incomplete); a failure mid-stream is an `error` event and `response.failed`."""
    sequence = 0

    def event(type_: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        return sse_event(type_, {"type": type_, "sequence_number": sequence - 1, **fields})

    snapshot = start.model_dump(mode="json")
    yield event("response.created", response=snapshot)
    yield event("response.in_progress", response=snapshot)
    item = OutputMessage(id=item_id, status="in_progress", content=[])
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.output_item.added", output_index=0, item=item.model_dump(mode="json"))
    yield event("response.content_part.added", **where, part=OutputText(text="").model_dump(mode="json"))
    parts: list[str] = []
    try:
        for chunk in chunks:
            if chunk.text:
                parts.append(chunk.text)
                yield event("response.output_text.delta", **where, delta=chunk.text, logprobs=[])
            if chunk.finish_reason is not None:
                done = final(Outcome("".join(parts), chunk))
                message = done.output[0]
                yield event("response.output_text.done", **where, text=message.content[0].text, logprobs=[])
                yield event("response.content_part.done", **where, part=message.content[0].model_dump(mode="json"))
                yield event("response.output_item.done", output_index=0, item=message.model_dump(mode="json"))
                kind = "response.completed" if done.status == "completed" else "response.incomplete"
                yield event(kind, response=done.model_dump(mode="json"))
    except Exception as exc:
        log.warning("response stream failed: %s", exc)
        yield event("error", code="server_error", message=error_text(exc), param=None)
        failed = start.model_copy(
            update={"status": "failed", "error": ResponseError(code="server_error", message=error_text(exc))}
        )
        yield event("response.failed", response=failed.model_dump(mode="json"))


def sse_event(type_: str, data: dict[str, Any]) -> str:
    """One named server-sent event (the Responses API names each event after its type)."""
    return f"event: {type_}\n{sse(data)}"


@bp.get("/responses/<response_id>")
def get_response(response_id: str) -> Response:
    return jsonify(service().response(response_id)[0])


@bp.delete("/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    service().delete(response_id)
    return ok(ResponseDeleted(id=response_id))


@bp.get("/responses/<response_id>/input_items")
def input_items(response_id: str) -> Response:
    query = validate(ListQuery, request.args.to_dict())
    items = service().input_items(response_id)
    return ok(page(items, query))


def page(items: list[dict[str, Any]], query: ListQuery) -> ItemList:
    """Page through an in-memory item list (oldest first) by order, after and limit."""
    ordered = items if query.order == "asc" else items[::-1]
    if query.after is not None:
        ids = [i["id"] for i in ordered]
        if query.after not in ids:
            raise BadRequest(f"after: no item '{query.after}' in this list", param="after")
        ordered = ordered[ids.index(query.after) + 1 :]
    return ItemList.of(ordered[: query.limit], len(ordered) > query.limit)
