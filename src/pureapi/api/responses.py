"""OpenAI's Responses API: POST /v1/responses (stored, chained, streamed, with function tools), GET/DELETE
one, its input items."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel

from ..chat.responses import Outcome, ResponseService, Turn
from ..errors import BadRequest
from ..types import Chunk, SamplingParams
from .common import Encoder, drain, gateway, json_body, primed, relay, sse, sse_response, validate
from .openai_tools import plan_functions, with_schema
from .responses_models import (
    ConversationRef,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    ItemList,
    ListQuery,
    Metadata,
    OutputText,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
)
from .responses_reply import Called, Opened, ReplyItems, Text

__all__ = [
    "InputItem",
    "ItemList",
    "ListQuery",
    "Metadata",
    "ResponseDeleted",
    "ResponseObject",
    "ResponseRequest",
    "bp",
    "ok",
    "page",
    "service",
]

bp = Blueprint("responses", __name__, url_prefix="/v1")


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
    conversation = body.conversation.id if isinstance(body.conversation, ConversationRef) else body.conversation
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    engine = gateway().engine()
    requested = body.max_output_tokens
    text_format = body.text.format if body.text is not None else None
    choice = body.tool_choice
    plan = plan_functions(
        [tool.spec() for tool in body.tools],
        "named" if not isinstance(choice, str) else choice,
        None if isinstance(choice, str) else choice.name,
        body.parallel_tool_calls,
        engine,
        "tools[{i}].parameters",
    )
    # text.format shapes text; a forced call is no text, so it wins (OpenAI takes both).
    text_schema = text_format.schema_to_enforce() if text_format else None
    plan, schema = with_schema(plan, text_schema, "text.format", forced_wins=True)
    params = SamplingParams(max_tokens=requested or 0, temperature=temperature, top_p=top_p, json_schema=schema)
    turn = Turn(
        input=[],
        params=params,
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        conversation_id=conversation,
        store=body.store,
        input_items=[item.item() for item in body.items()],
        tools=plan.tools,
        prefix=plan.prefix,
        truncation=body.truncation,
    )
    created = int(time.time())
    echoed_format = text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}

    def render(status: str, reply: ReplyItems, last: Chunk | None = None) -> ResponseObject:
        return ResponseObject(
            id=turn.response_id,
            created_at=created,
            status=status,  # type: ignore[arg-type]
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=body.instructions,
            max_output_tokens=requested,
            model=engine.model_name,
            output=[] if status == "in_progress" else reply.output(status),
            parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            store=body.store,
            temperature=temperature,
            top_p=top_p,
            text={"format": echoed_format},
            tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
            tools=[tool.model_dump(exclude_none=True) for tool in body.tools],
            truncation=body.truncation,
            usage=_usage(last) if last is not None else None,
            metadata=body.metadata or {},
            conversation=ConversationRef(id=conversation) if conversation else None,
        )

    def reply() -> ReplyItems:
        return ReplyItems(plan, turn.response_id, turn.output_id)

    def final(outcome: Outcome, items: ReplyItems | None = None) -> ResponseObject:
        if items is None:
            items = reply()
            items.feed(outcome.text, final=True)
        status = "incomplete" if outcome.last.finish_reason == "length" else "completed"
        return render(status, items, outcome.last)

    stream = primed(service().respond(turn, lambda outcome: final(outcome).model_dump(mode="json")))
    if body.stream:
        return sse_response(relay(stream, ResponseEvents(render("in_progress", reply()), reply(), final)))
    text, last = drain(stream)
    return ok(final(Outcome(text, last)))


class ResponseEvents(Encoder):
    """The documented event sequence: created, in_progress, then each output item's added, delta and done
    events (a message's text, a call's arguments), then completed (or incomplete); a failure mid-stream
    is an `error` event and `response.failed`."""

    def __init__(
        self, start: ResponseObject, reply: ReplyItems, final: Callable[[Outcome, ReplyItems], ResponseObject]
    ):
        self.start, self.reply, self.final = start, reply, final
        self.sequence = 0
        self.parts: list[str] = []

    def event(self, type_: str, **fields: Any) -> str:
        """One named event with its sequence number."""
        self.sequence += 1
        return sse_event(type_, {"type": type_, "sequence_number": self.sequence - 1, **fields})

    def opening(self) -> Iterable[str]:
        snapshot = self.start.model_dump(mode="json")
        yield self.event("response.created", response=snapshot)
        yield self.event("response.in_progress", response=snapshot)
        yield from self.happenings("", False)

    def events(self, chunk: Chunk) -> Iterable[str]:
        self.parts.append(chunk.text)
        yield from self.happenings(chunk.text, chunk.finish_reason is not None)
        if chunk.finish_reason is None:
            return
        reply, done = self.reply, self.final(Outcome("".join(self.parts), chunk), self.reply)
        if reply.message_at is not None:
            at, text = reply.message_at, reply.text()
            yield self.event("response.output_text.done", **self.part(at), text=text, logprobs=[])
            yield self.event("response.content_part.done", **self.part(at), part=OutputText(text=text).model_dump())
            yield self.event("response.output_item.done", output_index=at, item=done.output[at].model_dump(mode="json"))
        kind = "response.completed" if done.status == "completed" else "response.incomplete"
        yield self.event(kind, response=done.model_dump(mode="json"))

    def failed(self, message: str) -> Iterable[str]:
        yield self.event("error", code="server_error", message=message, param=None)
        error = ResponseError(code="server_error", message=message)
        failed = self.start.model_copy(update={"status": "failed", "error": error})
        yield self.event("response.failed", response=failed.model_dump(mode="json"))

    def part(self, index: int) -> dict[str, Any]:
        """Where the message's one text part is."""
        return {"item_id": self.reply.message_id, "output_index": index, "content_index": 0}

    def happenings(self, text: str, last: bool) -> Iterator[str]:
        """The events of what this piece of the reply adds: a message opening, text, whole calls."""
        for happened in self.reply.feed(text, last):
            if isinstance(happened, Opened):
                item = self.reply.message("in_progress").model_dump(mode="json")
                yield self.event("response.output_item.added", output_index=happened.index, item=item)
                empty = OutputText(text="").model_dump()
                yield self.event("response.content_part.added", **self.part(happened.index), part=empty)
            elif isinstance(happened, Text):
                at = self.part(self.reply.message_at or 0)
                yield self.event("response.output_text.delta", **at, delta=happened.delta, logprobs=[])
            elif isinstance(happened, Called):
                yield from self.call_events(happened)

    def call_events(self, called: Called) -> Iterator[str]:
        """A whole call: added, its arguments in one delta, done."""
        item = called.item
        where = {"item_id": item.id, "output_index": called.index}
        added = item.model_copy(update={"status": "in_progress", "arguments": ""}).model_dump(mode="json")
        yield self.event("response.output_item.added", output_index=called.index, item=added)
        yield self.event("response.function_call_arguments.delta", **where, delta=item.arguments)
        yield self.event("response.function_call_arguments.done", **where, name=item.name, arguments=item.arguments)
        yield self.event("response.output_item.done", output_index=called.index, item=item.model_dump(mode="json"))


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
