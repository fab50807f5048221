"""The Responses API's wire shapes: the request with its input items, tools and text format, and the
response object with its output items."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from ..chat.response_store import Item
from ..chat.responses import message_item, new_id
from .common import MaxTokens, Temperature, TopP
from .openai_output import format_schema
from .openai_tools import NAME, FunctionSpec, other_type
from .strict import StrictBody, StrictPart

MAX_ITEMS = 1000
Metadata = dict[StrictStr, StrictStr]


class ContentPart(StrictPart):
    """A text part of a message item; other part types are not supported by a text model."""

    type: Literal["input_text", "output_text", "text"]
    text: StrictStr
    annotations: list[Any] | None = Field(None, description="Of an output_text sent back: accepted; not used.")
    logprobs: list[Any] | None = Field(None, description="Of an output_text sent back: accepted; not used.")


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


class InputItem(StrictPart):
    """An item of `input`: a message (the default type), a function_call sent back, or a
    function_call_output (the result of a call, as text). An item sent back as a reply gave it keeps its
    type's fields; its id and status are accepted and not used (stored items get ids of this server's)."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: StrictStr | list[ContentPart] | None = None
    call_id: StrictStr | None = Field(None, min_length=1)
    name: StrictStr | None = Field(None, min_length=1)
    arguments: StrictStr | None = None
    output: StrictStr | list[ContentPart] | None = None
    id: StrictStr | None = Field(None, description="Accepted; not used.")
    status: StrictStr | None = Field(None, description="Accepted; not used.")

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> InputItem:
        needed = {
            "message": ("role", "content"),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
        }[self.type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self

    def talks(self) -> bool:
        """Whether the item is part of the conversation (not system text)."""
        return self.role not in ("system", "developer")

    def item(self) -> Item:
        """The item as stored (with an id of this server's: a resent item keeps none of its own)."""
        if self.type == "function_call":
            call = FunctionCallItem(
                id=new_id("fc"), call_id=self.call_id or "", name=self.name or "", arguments=self.arguments or ""
            )
            return call.model_dump()
        if self.type == "function_call_output":
            output = _text(self.output or "")
            return {
                "id": new_id("fco"),
                "type": "function_call_output",
                "call_id": self.call_id,
                "output": output,
                "status": "completed",
            }
        return message_item(self.role or "user", _text(self.content or ""), status="completed")


class ConversationRef(StrictPart):
    """A conversation named by id."""

    id: StrictStr


class FunctionTool(FunctionSpec):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]

    def spec(self) -> FunctionSpec:
        """The function as every surface's tool machinery takes it."""
        return FunctionSpec.model_validate(self.model_dump(exclude={"type"}))


class NamedFunction(BaseModel):
    """tool_choice {"type": "function", "name": ...}: the reply is a call to that function."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: StrictStr


class TextFormat(BaseModel):
    """text.format: free text, any JSON object, or JSON matching a schema (enforced while sampling)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = Field(None, min_length=1, max_length=64, pattern=NAME)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The schema of json_schema.")
    strict: StrictBool | None = Field(None, description="Accepted; the schema is always enforced.")

    def schema_to_enforce(self) -> dict[str, Any] | None:
        """The JSON schema the reply must match (checked), or None for free text."""
        return format_schema(self.type, self.schema_, "text.format.schema")


class TextConfig(BaseModel):
    """The request's `text`: its format, and a verbosity hint these models do not take."""

    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted and not used.")


class ResponseRequest(StrictBody):
    """Body of POST /v1/responses. A field not listed here is a 400 naming it, never ignored."""

    model: StrictStr | None = Field(None, description="Ignored beyond echoing: one process serves one model.")
    input: StrictStr | list[InputItem] = Field(description="The new user text, or items.")
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
    tools: list[FunctionTool] = Field(default_factory=list, description="Function tools; built-in tools are a 400.")
    tool_choice: Literal["auto", "none", "required"] | NamedFunction = "auto"
    parallel_tool_calls: StrictBool = Field(True, description="false: only the reply's first call is returned.")
    text: TextConfig | None = Field(None, description="text.format: text, json_object or json_schema.")
    truncation: Literal["auto", "disabled"] = Field(
        "auto", description="auto: the oldest turns are dropped to fit the context; disabled: that is a 400."
    )
    background: StrictBool = Field(False, description="Not supported: must be false.")
    include: list[StrictStr] = Field(default_factory=list, description="Nothing extra can be included: must be empty.")
    top_logprobs: StrictInt = Field(0, ge=0, le=0, description="Not supported: only 0.")
    user: StrictStr | None = Field(None, description="Accepted and not used.")
    safety_identifier: StrictStr | None = Field(None, description="Accepted and not used.")
    prompt_cache_key: StrictStr | None = Field(None, description="Accepted and not used: KV is found by content.")
    prompt_cache_retention: StrictStr | None = Field(None, description="Accepted and not used.")
    service_tier: StrictStr | None = Field(None, description="Accepted and not used: there is one tier.")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted and not used.")

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(value, list):
            if not 1 <= len(value) <= MAX_ITEMS:
                raise ValueError(f"give 1 to {MAX_ITEMS} items")
            talk = [item for item in value if item.talks()]
            if not talk or not (talk[-1].role == "user" or talk[-1].type == "function_call_output"):
                raise ValueError("the last non-system item must be a user message or a function_call_output")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        kind = other_type(value, ("function", None))
        if kind is not None:
            raise ValueError(f"the built-in tool {kind!r} is not supported; only function tools are")
        return value

    @field_validator("background")
    @classmethod
    def _background(cls, value: bool) -> bool:
        if value:
            raise ValueError("background responses are not supported by this server")
        return value

    @field_validator("include")
    @classmethod
    def _include(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError(f"{value[0]!r} cannot be included: this server includes nothing extra")
        return value

    def items(self) -> list[InputItem]:
        """The input as items (a string is one user message)."""
        return [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)


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


class FunctionCallItem(BaseModel):
    """A call the reply made: call_id is what its function_call_output answers."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = Field(description="The arguments object as JSON text.")
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | FunctionCallItem


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
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "auto"
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
