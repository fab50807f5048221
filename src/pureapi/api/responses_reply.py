"""A Responses API reply read into output items, whole or as it streams: its message and its function calls.

Both readings go through the same steps, so a streamed response's items (ids included) are the ones
stored: a call's ids come from the response's id and the call's position, not from chance.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import ToolCall
from .openai_tools import ReplyReader, ToolPlan
from .responses_models import FunctionCallItem, OutputItem, OutputMessage, OutputText


@dataclass
class Opened:
    """The message item opens at this output index."""

    index: int


@dataclass
class Text:
    """Text added to the open message."""

    delta: str


@dataclass
class Called:
    """A call, whole, at this output index."""

    index: int
    item: FunctionCallItem


Happening = Opened | Text | Called


class ReplyItems:
    """The output items of one reply. Without tools the message opens at once; with tools it opens at its
    first words that are not blank (a reply that is only calls has no message), after the calls before them."""

    def __init__(self, plan: ToolPlan, response_id: str, message_id: str):
        self.reader = ReplyReader(plan)
        self.key = response_id.split("_", 1)[-1][:24]
        self.message_id = message_id
        self.message_at: int | None = None
        self.parts: list[str] = []
        self.calls: list[FunctionCallItem] = []

    def feed(self, text: str, final: bool = False) -> list[Happening]:
        """What this piece of the reply adds (final: the reply ends with it)."""
        out: list[Happening] = []
        if self.reader.parser is None and self.message_at is None:
            out.append(self._open())
        for piece in self.reader.feed(text, final):
            if isinstance(piece, ToolCall):
                out.append(self._call(piece))
                continue
            if self.message_at is None and piece.strip():
                out.append(self._open())
            if self.message_at is not None:
                self.parts.append(piece)
                out.append(Text(piece))
        if final and self.message_at is None and not self.calls:
            out.append(self._open())
        return out

    def _open(self) -> Opened:
        self.message_at = len(self.calls)
        return Opened(self.message_at)

    def _call(self, call: ToolCall) -> Called:
        n = len(self.calls)
        item = FunctionCallItem(
            id=f"fc_{self.key}{n}", call_id=f"call_{self.key}{n}", name=call.name, arguments=call.arguments
        )
        self.calls.append(item)
        return Called(n + (1 if self.message_at is not None else 0), item)

    def text(self) -> str:
        """The message's text (trimmed when the reply also made calls)."""
        text = "".join(self.parts)
        return text.strip() if self.calls else text

    def message(self, status: str) -> OutputMessage:
        """The message item as it stands."""
        content = [OutputText(text=self.text())] if status != "in_progress" else []
        return OutputMessage(id=self.message_id, status=status, content=content)  # type: ignore[arg-type]

    def output(self, status: str) -> list[OutputItem]:
        """Every output item in order, finished with this status."""
        items: list[OutputItem] = list(self.calls)
        if self.message_at is not None:
            items.insert(self.message_at, self.message(status))
        return items
