"""Tool calling on /v1/chat/completions: the request's tools and tool_choice, the plan for one request
(what the template renders, what the reply is held to, how it is parsed) and the calls' wire shapes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictStr

from ..engines.base import Engine
from ..errors import BadRequest
from ..structured import check_schema
from ..tools import ToolCallParser, ToolFormat, forced_schema
from ..types import ToolCall
from .strict import StrictPart

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
NAME = r"^[A-Za-z0-9_-]+$"


class FunctionSpec(StrictPart):
    """A function the model may call."""

    name: StrictStr = Field(min_length=1, max_length=64, pattern=NAME)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments object (the keywords of README: Structured output)."
    )
    strict: StrictBool | None = Field(None, description="Accepted; a forced call's arguments always match.")

    def arguments_schema(self) -> dict[str, Any]:
        """The arguments' schema (an empty object where none was given)."""
        return self.parameters if self.parameters is not None else dict(EMPTY_PARAMETERS)


class ToolSpec(StrictPart):
    """One entry of `tools`: only functions exist."""

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(StrictPart):
    """The function a named tool choice forces."""

    name: StrictStr


class NamedToolChoice(StrictPart):
    """tool_choice {"type": "function", "function": {"name": ...}}: the reply is a call to that function."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(StrictPart):
    """A call's function: its name and its arguments as JSON text."""

    name: StrictStr
    arguments: StrictStr


class MessageToolCall(StrictPart):
    """A tool call in an assistant message, as a client sends it back, and as a reply carries it."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, call: ToolCall) -> MessageToolCall:
        """The wire shape of a parsed call."""
        return cls(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))

    def call(self) -> ToolCall:
        """The domain shape."""
        return ToolCall(self.id, self.function.name, self.function.arguments)


class ToolCallDelta(MessageToolCall):
    """A call in a streamed chunk: each call comes whole, in one delta, at its index."""

    index: int


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass
class ToolPlan:
    """How one request uses tools: what the template renders, the text that starts the reply, the schema
    a forced call is held to, and the format the reply is parsed in (None: plain text, not parsed)."""

    tools: list[dict[str, Any]] | None = None
    prefix: str = ""
    schema: dict[str, Any] | None = None
    fmt: ToolFormat | None = None
    parallel: bool = True
    # The schema of a bare call to any of the functions: what a reply held to a schema may be instead.
    any_call: dict[str, Any] | None = None
    names: frozenset[str] | None = None  # given: calls to other functions stay text

    def parser(self) -> ToolCallParser | None:
        """A parser for the reply, already fed the prefix the prompt ended with; None: no parsing."""
        if self.fmt is None:
            return None
        parser = ToolCallParser(self.fmt, self.parallel, self.names)
        parser.feed(self.prefix)
        return parser

    def closing(self) -> str:
        """What ends a forced call (the grammar stops at the end of its JSON)."""
        return "\n" + self.fmt.closing if self.schema is not None and self.fmt is not None and self.fmt.closing else ""


ToolMode = Literal["auto", "none", "required", "named"]


def other_type(value: Any, allowed: tuple[str | None, ...]) -> str | None:
    """The first `type` among a list's objects (tools, content blocks) that is not allowed, for a 400 that
    names it before the shapes are validated; None when there is none (or value is no list)."""
    for entry in value if isinstance(value, list) else ():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in allowed and (kind is None or isinstance(kind, str)):
            return str(kind)
    return None


def plan_functions(
    functions: Sequence[FunctionSpec],
    mode: ToolMode,
    forced: str | None,
    parallel: bool,
    engine: Engine,
    schema_param: str = "tools[{i}].function.parameters",
) -> ToolPlan:
    """The plan for a request's functions, in whichever surface's shape they came: mode "named" forces
    the function `forced`. Bad combinations are a 400 naming the field (schema_param: where tool i's
    parameters schema sits in that surface's request)."""
    if not functions:
        if mode in ("required", "named"):
            raise BadRequest("tool_choice: needs tools to choose from", param="tool_choice")
        return ToolPlan()
    if mode == "none":
        return ToolPlan()  # the model is not shown the tools, so it does not try to call them
    for i, function in enumerate(functions):
        check_schema(function.arguments_schema(), schema_param.format(i=i))
    names = [function.name for function in functions]
    if len(set(names)) != len(names):
        raise BadRequest("tools: two functions share a name", param="tools")
    if engine.tool_format is None:
        raise BadRequest(f"tools: {engine.tools_refusal()}", param="tools")
    fmt = engine.tool_format
    rendered = [{"type": "function", "function": function.model_dump(exclude_none=True)} for function in functions]
    if mode == "auto":
        any_call = forced_schema([(function.name, function.arguments_schema()) for function in functions], fmt)
        return ToolPlan(tools=rendered, fmt=fmt, parallel=parallel, any_call=any_call)
    chosen = [function for function in functions if mode == "required" or function.name == forced]
    if not chosen:
        raise BadRequest(f"tool_choice: no function named {forced!r} in tools", param="tool_choice")
    schema = forced_schema([(function.name, function.arguments_schema()) for function in chosen], fmt)
    return ToolPlan(tools=rendered, prefix=fmt.forced_prefix, schema=schema, fmt=fmt, parallel=parallel)


def plan_tools(tools: list[ToolSpec] | None, choice: ToolChoice | None, parallel: bool, engine: Engine) -> ToolPlan:
    """The plan for chat completions' tools and tool_choice."""
    functions = [tool.function for tool in tools or ()]
    if isinstance(choice, NamedToolChoice):
        return plan_functions(functions, "named", choice.function.name, parallel, engine)
    return plan_functions(functions, choice or "auto", None, parallel, engine)


def with_schema(
    plan: ToolPlan, schema: dict[str, Any] | None, param: str, forced_wins: bool = False
) -> tuple[ToolPlan, dict[str, Any] | None]:
    """A plan and the schema the reply is held to, given the request's structured-output schema (param
    names the field that asked for it). A forced call and a schema exclude each other (forced_wins: the
    call is the reply, so the schema, which shapes text, has nothing to hold). With tools to choose
    from, the reply is held to the schema or to a bare call of one of them (a call, not a tagged one:
    a grammar holds the whole reply), which is read as a call only when it calls one of them."""
    if plan.schema is not None:
        if schema is not None and not forced_wins:
            raise BadRequest(f"{param}: cannot hold the reply to a schema and force a tool call", param=param)
        return plan, plan.schema
    if schema is None:
        return plan, None
    if plan.any_call is None or plan.fmt is None:
        return replace(plan, fmt=None), schema
    names = frozenset(tool["function"]["name"] for tool in plan.tools or ())
    return replace(plan, names=names), {"anyOf": [plan.any_call, schema]}


class ReplyReader:
    """Reads a reply, whole or piece by piece, into text and calls as its plan says (no format: all text)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.parser = plan.parser()

    @property
    def calls(self) -> list[ToolCall]:
        """The calls read so far."""
        return self.parser.calls if self.parser is not None else []

    def feed(self, text: str, final: bool = False) -> list[str | ToolCall]:
        """The text and calls certain after this piece; final: the reply ends with it."""
        if self.parser is None:
            return [text] if text else []
        items = self.parser.feed(text + (self.plan.closing() if final else ""))
        return items + self.parser.finish() if final else items


def parse_reply(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's text (None when it is only calls) and its calls."""
    reader = ReplyReader(plan)
    items = reader.feed(text, final=True)
    content = "".join(item for item in items if isinstance(item, str))
    if reader.calls:
        return content.strip() or None, reader.calls
    return content, []
