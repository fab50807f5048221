"""The OpenAI-compatible API: /v1/chat/completions (stateless, SSE streaming) and /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Literal

from flask import Blueprint, Response, jsonify
from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)

from ..errors import BadRequest
from ..tools import unanswered_result
from ..types import Chunk, Message, SamplingParams, ToolCall
from ..types import TokenLogprob as TokenLogprobData
from .common import (
    MAX_STOP,
    Encoder,
    MaxTokens,
    Penalty,
    Seed,
    Temperature,
    TopP,
    collecting,
    drain,
    gateway,
    json_body,
    primed,
    relay,
    sse,
    sse_response,
    validate,
)
from .docs import GENERATION_ERRORS, Operation, documented
from .openai_output import MAX_TOP_LOGPROBS, ChoiceLogprobs, ResponseFormat
from .openai_tools import (
    MessageToolCall,
    ReplyReader,
    ToolCallDelta,
    ToolChoice,
    ToolPlan,
    ToolSpec,
    parse_reply,
    plan_tools,
    with_schema,
)
from .strict import StrictBody, StrictPart

bp = Blueprint("openai", __name__, url_prefix="/v1")


class TextPart(StrictPart):
    """A text content part; other part types are not supported by a text model."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(StrictPart):
    """One message of the conversation sent by the client (an assistant message as the SDKs send a reply
    back may carry its refusal and annotations: accepted, not used)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant's calls, sent back.")
    tool_call_id: StrictStr | None = Field(None, description="The call a tool message answers.")
    name: StrictStr | None = Field(None, description="A tool message's function; accepted and not used on others.")
    refusal: StrictStr | None = Field(None, description="Accepted; not used.")
    annotations: list[Any] | None = Field(None, description="Accepted; not used.")

    def message(self) -> Message:
        """The domain message (developer is the system role)."""
        return Message(
            "system" if self.role == "developer" else self.role,
            self.text(),
            tuple(call.call() for call in self.tool_calls or ()) if self.role == "assistant" else (),
            self.tool_call_id if self.role == "tool" else None,
            self.name if self.role == "tool" else None,
        )

    def text(self) -> str:
        """The content as plain text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(StrictPart):
    """Stream options; include_usage adds a final usage chunk."""

    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = Field(None, description="Accepted; not used (no padding is sent).")


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


class ChatCompletionRequest(SamplingFields, StrictBody):
    """Body of POST /v1/chat/completions. A field not listed here is a 400 naming it, never ignored;
    an unknown field sent as null counts as left out (some SDKs send every field they know)."""

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolSpec] | None = Field(
        None, description="Functions the model may call; a model whose chat template cannot render tools is a 400."
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description='auto (the default with tools), none, required, or {"type": "function", "function": '
        '{"name": ...}}; required and a named function hold the reply to a call, by grammar.',
    )
    parallel_tool_calls: StrictBool = Field(True, description="false: only the reply's first call is returned.")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: the reply is constrained to it while sampling."
    )
    logprobs: StrictBool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="The likeliest alternatives per token (needs logprobs)."
    )
    repetition_penalty: StrictFloat | StrictInt | None = Field(
        None, ge=0.5, le=2, allow_inf_nan=False, description="vLLM's name for repeat_penalty (one or the other)."
    )
    modalities: list[Literal["text"]] | None = Field(None, description='Only ["text"]: audio output is a 400.')
    logit_bias: dict[str, Any] | None = Field(None, description="Not supported: a non-empty map is a 400.")
    user: StrictStr | None = Field(None, description="Accepted and not used (OpenAI's end-user id).")
    metadata: dict[str, Any] | None = Field(None, description="Accepted and not used (nothing is stored).")
    store: StrictBool | None = Field(None, description="Accepted and not used: chat completions are never stored.")
    service_tier: StrictStr | None = Field(None, description="Accepted and not used: there is one tier.")
    prompt_cache_key: StrictStr | None = Field(
        None, description="Accepted and not used: the KV cache is found by the prompt's tokens."
    )
    safety_identifier: StrictStr | None = Field(None, description="Accepted and not used.")
    add_generation_prompt: StrictBool | None = Field(
        None, description="vLLM's: false exactly when the final assistant message is continued (the default)."
    )
    continue_final_message: StrictBool | None = Field(
        None,
        description="vLLM's: continue a final assistant message (prefill) rather than reply anew; on whenever "
        "the assistant spoke last, so only true is accepted.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("logit_bias is not supported; send an empty map or leave it out")
        return value

    @model_validator(mode="after")
    def _one_repeat_penalty(self) -> ChatCompletionRequest:
        if self.repetition_penalty is not None:
            if "repeat_penalty" in self.model_fields_set:
                raise BadRequest(
                    "repetition_penalty: send repeat_penalty or repetition_penalty, not both",
                    param="repetition_penalty",
                )
            self.repeat_penalty = self.repetition_penalty
        return self


class ResponseMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[MessageToolCall] | None = Field(None, description="The calls the reply made; absent if none.")

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class Choice(BaseModel):
    """The one choice of a completion (n is always 1)."""

    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = Field(None, description="Present when the request set logprobs.")
    finish_reason: str = Field(
        description="stop (end of turn or a stop string), length (max_tokens or the context) or tool_calls."
    )


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
    system_fingerprint: str | None = Field(None, description="Changes when the model file or the backend build does.")
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds to the reply: the role first, then text; the last chunk's delta is empty."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

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
    system_fingerprint: str | None = Field(None, description="Changes when the model file or the backend build does.")
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


class OpenAIEvents(Encoder):
    """An OpenAI stream (chat or text completions): the surface's chunk events, [DONE] at the end, and a
    failure as an error event, then [DONE] too."""

    def __init__(self, events: Callable[[Chunk], Iterable[str]], opening: Iterable[str] = ()):
        self._events, self._opening = events, opening

    def opening(self) -> Iterable[str]:
        return self._opening

    def events(self, chunk: Chunk) -> Iterable[str]:
        return self._events(chunk)

    def closing(self) -> Iterable[str]:
        return [sse("[DONE]")]

    def failed(self, message: str) -> Iterable[str]:
        return [error_event(message), sse("[DONE]")]


def _check_tool_results(messages: list[Message]) -> None:
    """Each tool message must answer a call an earlier assistant message made (as OpenAI requires)."""
    i = unanswered_result(messages)
    if i is not None:
        raise BadRequest(
            f"messages.{i}.tool_call_id: a tool message must answer a call in an earlier assistant "
            f"message's tool_calls ({messages[i].tool_call_id!r} is none of them)",
            param=f"messages.{i}.tool_call_id",
        )


@bp.post("/chat/completions")
@documented(
    Operation(
        "OpenAI-compatible chat completion (stateless)",
        "openai",
        GENERATION_ERRORS,
        body=ChatCompletionRequest,
        ok=ChatCompletion,
        answer="A completion, or SSE chunks ending in [DONE]",
        stream="Each event's data: a ChatCompletionChunk or an error; then [DONE].",
        events=(ChatCompletionChunk,),
    )
)
def chat_completions() -> Response:
    body = validate(ChatCompletionRequest, json_body())
    messages = [m.message() for m in body.messages]
    prefill = _prefill(messages, body.continue_final_message)
    if body.add_generation_prompt is not None and body.add_generation_prompt == prefill:
        raise BadRequest(
            "add_generation_prompt: a reply continues a final assistant message (false) or starts anew (true)",
            param="add_generation_prompt",
        )
    _check_tool_results(messages)
    requested = body.max_completion_tokens or body.max_tokens
    if body.top_logprobs and not body.logprobs:
        raise BadRequest("top_logprobs: needs logprobs set to true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    schema = body.response_format.schema_to_enforce() if body.response_format is not None else None
    service = gateway()
    engine = service.engine()
    plan, schema = with_schema(
        plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, engine), schema, "response_format"
    )
    if prefill and plan.prefix:
        raise BadRequest("messages: a forced tool call cannot continue an assistant message", param="messages")
    if plan.fmt is not None and logprobs is not None:
        raise BadRequest("logprobs: not available together with tools", param="logprobs")
    params = replace(body.sampling(requested or 1), json_schema=schema, logprobs=logprobs)
    stream = primed(service.stateless(messages, params, fill=requested is None, tools=plan.tools, prefix=plan.prefix))
    meta: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": engine.model_name,
        "system_fingerprint": engine.system_fingerprint,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(meta, stream, include_usage, logprobs is not None, plan))
    tokens: list[TokenLogprobData] = []
    text, last = drain(collecting(stream, tokens))
    content, calls = parse_reply(plan, text)
    choice = Choice(
        message=ResponseMessage(content=content, tool_calls=[MessageToolCall.of(c) for c in calls] or None),
        logprobs=ChoiceLogprobs.of(tokens) if logprobs is not None else None,
        finish_reason=_finish(last.finish_reason, bool(calls)),
    )
    completion = ChatCompletion(**meta, choices=[choice], usage=Usage.of(last))
    return jsonify(dump(completion))


def _prefill(messages: list[Message], continue_final: bool | None) -> bool:
    """Whether the reply continues a final assistant message (vLLM's continue_final_message, on by default
    when the assistant spoke last); its text is not repeated in the reply."""
    last = messages[-1]
    if last.role != "assistant":
        if continue_final:
            raise BadRequest(
                "continue_final_message: the last message is not the assistant's", param="continue_final_message"
            )
        return False
    if continue_final is False:
        raise BadRequest(
            "continue_final_message: a final assistant message is always continued; send true or leave it out",
            param="continue_final_message",
        )
    if last.tool_calls or not last.content:
        raise BadRequest(
            "messages: a final assistant message is continued, so it needs text and no tool_calls", param="messages"
        )
    return True


def _finish(reason: str | None, called: bool) -> str:
    """OpenAI's finish_reason: tool_calls when a reply that ended on its own made calls."""
    if called and reason in (None, "stop"):
        return "tool_calls"
    return reason or "stop"


def _stream(
    meta: dict[str, Any], chunks: Iterator[Chunk], include_usage: bool, logprobs: bool, plan: ToolPlan
) -> Iterator[str]:
    reader = ReplyReader(plan)

    def event(delta: Delta, finish: str | None = None, tokens: list[TokenLogprobData] | None = None) -> str:
        lp = ChoiceLogprobs.of(tokens or []) if logprobs and tokens is not None else None
        choice = ChunkChoice(delta=delta, logprobs=lp, finish_reason=finish)
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        return sse(dump(ChatCompletionChunk(**meta, choices=[choice], **extra)))

    def parsed(items: list[str | ToolCall], first: int) -> Iterator[str]:
        """Text as content deltas, each call whole in one tool-call delta at its index."""
        for item in items:
            if isinstance(item, str):
                yield event(Delta(content=item))
            else:
                delta = ToolCallDelta(index=first, **MessageToolCall.of(item).model_dump())
                first += 1
                yield event(Delta(tool_calls=[delta]))

    def events(chunk: Chunk) -> Iterator[str]:
        if reader.parser is None:
            if chunk.text or chunk.logprobs:
                yield event(Delta(content=chunk.text), tokens=chunk.logprobs or [])
        else:
            items = reader.feed(chunk.text, final=chunk.finish_reason is not None)
            yield from parsed(items, len(reader.calls) - sum(isinstance(i, ToolCall) for i in items))
        if chunk.finish_reason is not None:
            yield event(Delta(), _finish(chunk.finish_reason, bool(reader.calls)))
            if include_usage:
                yield sse(dump(ChatCompletionChunk(**meta, choices=[], usage=Usage.of(chunk))))

    return relay(chunks, OpenAIEvents(events, opening=[event(Delta(role="assistant", content=""))]))


@bp.get("/models")
@documented(Operation("The served model", "openai", (401, 503), ok=ModelList, answer="Model list"))
def models() -> Response:
    engine = gateway().engine()
    card = ModelCard(id=engine.model_name, max_model_len=engine.context_length)
    return jsonify(ModelList(data=[card]).model_dump())
