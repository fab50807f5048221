"""Tool calling on /v1/chat/completions: the request's tools and tool_choice, the plan for one request
(what the template renders, what the reply is held to, how it is parsed) and the calls' wire shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ..engines.base import Engine
from ..errors import BadRequest
from ..structured import check_schema
from ..tools import ToolCallParser, ToolFormat, forced_schema
from ..types import ToolCall

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
NAME = r"^[A-Za-z0-9_-]+$"


class FunctionSpec(BaseModel):
    """A function the model may call."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr = Field(min_length=1, max_length=64, pattern=NAME)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments object (the keywords of README: Structured output)."
    )
    strict: StrictBool | None = Field(None, description="Accepted; a forced call's arguments always match.")

    def arguments_schema(self) -> dict[str, Any]:
        """The arguments' schema (an empty object where none was given)."""
        return self.parameters if self.parameters is not None else dict(EMPTY_PARAMETERS)


class ToolSpec(BaseModel):
    """One entry of `tools`: only functions exist."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    """The function a named tool choice forces."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: the reply is a call to that function."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    arguments: StrictStr


class MessageToolCall(BaseModel):
    """A tool call in an assistant message, as a client sends it back, and as a reply carries it."""

    model_config = ConfigDict(extra="ignore")

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

    def parser(self) -> ToolCallParser | None:
        """A parser for the reply, already fed the prefix the prompt ended with; None: no parsing."""
        if self.fmt is None:
            return None
        parser = ToolCallParser(self.fmt, self.parallel)
        parser.feed(self.prefix)
        return parser

    def closing(self) -> str:
        """What ends a forced call (the grammar stops at the end of its JSON)."""
        return "\n" + self.fmt.closing if self.schema is not None and self.fmt is not None and self.fmt.closing else ""


def plan_tools(tools: list[ToolSpec] | None, choice: ToolChoice | None, parallel: bool, engine: Engine) -> ToolPlan:
    """The plan for a request's tools; bad combinations are a 400 naming the field."""
    if choice is None:
        choice = "auto"
    if not tools:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            raise BadRequest("tool_choice: needs tools to choose from", param="tool_choice")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()  # the model is not shown the tools, so it does not try to call them
    for i, tool in enumerate(tools):
        check_schema(tool.function.arguments_schema(), f"tools[{i}].function.parameters")
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequest("tools: two functions share a name", param="tools")
    if engine.tool_format is None:
        raise BadRequest(f"tools: {engine.tools_refusal()}", param="tools")
    fmt = engine.tool_format
    rendered = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice == "auto":
        return ToolPlan(tools=rendered, fmt=fmt, parallel=parallel)
    if isinstance(choice, NamedToolChoice):
        chosen = [tool for tool in tools if tool.function.name == choice.function.name]
        if not chosen:
            raise BadRequest(f"tool_choice: no function named {choice.function.name!r} in tools", param="tool_choice")
    else:
        chosen = tools
    schema = forced_schema([(tool.function.name, tool.function.arguments_schema()) for tool in chosen], fmt)
    return ToolPlan(tools=rendered, prefix=fmt.forced_prefix, schema=schema, fmt=fmt, parallel=parallel)


def parse_reply(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's text (None when it is only calls) and its calls."""
    parser = plan.parser()
    if parser is None:
        return text, []
    items = [*parser.feed(text + plan.closing()), *parser.finish()]
    content = "".join(item for item in items if isinstance(item, str))
    if parser.calls:
        return content.strip() or None, parser.calls
    return content, []
