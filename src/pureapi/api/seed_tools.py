"""Tools on /chat: a session turn may offer tools (OpenAI's function shape) and post the results of the
calls the session's last reply made. The chat-completions machinery plans them (template, forced calls
by grammar) and reads the reply; the session keeps the exchange."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field, StrictStr

from ..chat.sessions import SessionTurn
from ..types import Message
from .common import gateway
from .openai_tools import MessageToolCall, ReplyReader, ToolChoice, ToolPlan, ToolSpec, parse_reply, plan_tools
from .strict import StrictPart

FinishReason = Literal["stop", "length", "tool_calls"]


class ToolResult(StrictPart):
    """A tool's result (OpenAI's tool message): it answers one call of the session's last reply. Unlike the
    seed body around it (whose old scripts may send anything), an unknown field here is a 400 naming it."""

    role: Literal["tool"] = "tool"
    tool_call_id: StrictStr = Field(min_length=1, description="The id of the call it answers.")
    content: StrictStr = Field(description="What the tool returned, as text.")


def plan(tools: list[ToolSpec] | None, choice: ToolChoice | None) -> ToolPlan:
    """The plan for a turn's tools (none: no plan, and no engine asked)."""
    if not tools and choice is None:
        return ToolPlan()
    return plan_tools(tools, choice, True, gateway().engine())


def reader(tool_plan: ToolPlan) -> Callable[[str], Message]:
    """How a reply's text becomes the assistant message stored: its calls parsed as the plan says."""

    def read(text: str) -> Message:
        content, calls = parse_reply(tool_plan, text)
        return Message("assistant", content or "", tuple(calls))

    return read


def session_turn(message: str | None, results: Sequence[ToolResult], tool_plan: ToolPlan) -> SessionTurn:
    """The session turn a /chat body asks for."""
    return SessionTurn(
        message,
        [Message("tool", r.content, tool_call_id=r.tool_call_id) for r in results],
        tool_plan.tools,
        tool_plan.prefix,
        reader(tool_plan),
    )


def wire_calls(reply: Message) -> list[MessageToolCall] | None:
    """The reply's calls as /chat shows them; None when it made none."""
    return [MessageToolCall.of(call) for call in reply.tool_calls] or None


def finish_reason(reply: Message, last: str | None) -> FinishReason:
    """Why the reply ended: it called tools, met its end, or ran out of max_tokens."""
    if reply.tool_calls:
        return "tool_calls"
    return "length" if last == "length" else "stop"


class TextFilter:
    """A streamed reply's text with the calls' markup held back (the calls come whole in the last event)."""

    def __init__(self, tool_plan: ToolPlan):
        self.reader = ReplyReader(tool_plan)

    def feed(self, text: str, final: bool) -> str:
        """The text certain after this piece."""
        return "".join(item for item in self.reader.feed(text, final) if isinstance(item, str))
