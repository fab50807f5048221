"""The Responses and Conversations APIs' logic: history from a response chain or a conversation, one turn.

A turn's history is the chain of previous responses (each: its input items, then its output) or the
conversation's items, windowed like a session's: at most max_rounds turns, then the oldest dropped
until the prompt fits the context with the reply's room. The turn is stored only when the reply
completed, in one transaction; a failed or cancelled one writes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..engines.base import Engine
from ..errors import BadRequest, NotFound
from ..tools import named_results, unanswered_result
from ..types import Chunk, Message, Prompt, SamplingParams, ToolCall
from .response_store import Item, ResponseStore
from .sessions import SessionService
from .window import fit_window, open_round, rounds_of


def new_id(prefix: str) -> str:
    """An OpenAI-style id: resp_…, msg_…, conv_…."""
    return f"{prefix}_{secrets.token_hex(24)}"


def message_item(role: str, text: str, item_id: str | None = None, status: str | None = None) -> Item:
    """A message item as the Responses API shows it: input_text parts for input, output_text for replies."""
    part: Item = {"type": "input_text", "text": text}
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": []}
    item: Item = {"id": item_id or new_id("msg"), "type": "message", "role": role, "content": [part]}
    if status is not None:
        item["status"] = status
    return item


def item_messages(items: Sequence[Item]) -> list[Message]:
    """The chat messages stored items stand for: messages as they are, a function_call as a call of an
    assistant message (the one just before it, or a new one), a function_call_output as a tool message."""
    out: list[Message] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            content = item["content"]
            text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
            out.append(Message(role, text))
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            if out and out[-1].role == "assistant":
                out[-1] = replace(out[-1], tool_calls=(*out[-1].tool_calls, call))
            else:
                out.append(Message("assistant", "", (call,)))
        elif kind == "function_call_output":
            out.append(Message("tool", item["output"], tool_call_id=item["call_id"]))
    return out


def _messages(items: Sequence[Item]) -> list[Message]:
    """The conversation's messages among stored items (system text is not replayed)."""
    return [m for m in item_messages(items) if m.role != "system"]


def _turns(items: Sequence[Item]) -> list[list[Message]]:
    """Group items into turns, each opened by a user message (a tool exchange stays in its turn)."""
    return rounds_of(_messages(items))


@dataclass
class Turn:
    """What one POST /v1/responses asks for, validated."""

    input: list[Message]  # empty: the messages input_items stand for
    params: SamplingParams  # max_tokens 0: the rest of the context
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template (Engine.encode_chat)
    prefix: str = ""  # the start of the reply, put after the generation prompt (a forced call's opening)
    truncation: str = "auto"  # "disabled": a history that does not fit is an error, not dropped
    response_id: str = field(default_factory=lambda: new_id("resp"))
    output_id: str = field(default_factory=lambda: new_id("msg"))
    input_items: list[Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.previous_response_id is not None and self.conversation_id is not None:
            raise BadRequest("previous_response_id and conversation cannot both be given", param="conversation")
        if not self.input_items:
            self.input_items = [message_item(m.role, m.content) for m in self.input]
        if not self.input:
            self.input = item_messages(self.input_items)


@dataclass
class Outcome:
    """A finished reply: its text and the last chunk (finish reason and token counts)."""

    text: str
    last: Chunk


class ResponseService:
    """Runs Responses API turns over the session service's admission, ordering and engine."""

    def __init__(self, store: ResponseStore, sessions: SessionService, ttl: float):
        self.store = store
        self.sessions = sessions
        self.ttl = ttl

    def _history(self, turn: Turn, owner: str) -> list[list[Message]]:
        max_turns = self.sessions.max_rounds
        if turn.previous_response_id is not None:
            chain = self.store.chain(turn.previous_response_id, max_turns, owner=owner)
            if chain is None:
                raise NotFound(
                    f"previous response '{turn.previous_response_id}' not found (deleted, expired or never stored)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            return _turns([item for t in chain for item in (*t.input, *t.output)])
        if turn.conversation_id is not None:
            items = self.store.all_items(turn.conversation_id, owner=owner)
            if items is None:
                raise NotFound(f"conversation '{turn.conversation_id}' not found", param="conversation")
            return _turns(items)[-max_turns:]
        return []

    def check(self, turn: Turn) -> None:
        """Fail now (404) for an unknown previous response or conversation, before any engine work."""
        self._history(turn, self.sessions.owner())

    def respond(self, turn: Turn, render: Callable[[Outcome], Item]) -> Iterator[Chunk]:
        """Start the turn; render(outcome) builds the response object stored when the reply completes."""
        # Instructions and the input's own system/developer items open the prompt (chat templates want
        # system text first); those of earlier turns are not replayed, as OpenAI's instructions are not.
        head = [Message("system", turn.instructions)] if turn.instructions else []
        head += [m for m in turn.input if m.role == "system"]
        tail = [m for m in turn.input if m.role != "system"]

        owner = self.sessions.owner()  # read now: commit runs while the reply streams, after the request

        def prompt(engine: Engine) -> tuple[Prompt, SamplingParams]:
            # A turn that answers calls stays with the turn that made them (the window never splits them).
            history, rest = open_round(self._history(turn, owner), tail)
            if turn.truncation == "disabled":
                history, rest = [], [m for t in history for m in t] + rest
            orphan = unanswered_result(rest)
            if orphan is not None:
                raise BadRequest(
                    f"input: a function_call_output answers no function_call ({rest[orphan].tool_call_id!r})",
                    param="input",
                )
            ids = fit_window(
                lambda messages: engine.encode_chat(named_results([*head, *messages]), turn.tools, turn.prefix),
                engine.context_length,
                history,
                rest,
                turn.params.max_tokens or 1,
                "input",
            )
            # Without max_output_tokens the reply may use the rest of the context, as in chat completions.
            params = (
                turn.params
                if turn.params.max_tokens
                else replace(turn.params, max_tokens=engine.context_length - len(ids))
            )
            return ids, params

        def commit(text: str, last: Chunk) -> None:
            response = render(Outcome(text, last))
            output = response["output"]  # the reply's items: its message, its calls
            self.store.commit_turn(
                response=response if turn.store else None,
                input_items=turn.input_items,
                previous_id=turn.previous_response_id,
                conversation_id=turn.conversation_id,
                conversation_items=[*turn.input_items, *output],
                ttl=self.ttl,
                owner=owner,
            )

        self.check(turn)
        lock = f"conversation:{turn.conversation_id}" if turn.conversation_id else None
        return self.sessions.run(prompt, commit, lock=lock, session_id=turn.conversation_id)

    def input_items(self, response_id: str) -> list[Item]:
        """A stored response's input items, oldest first."""
        return self.response(response_id)[1]

    def response(self, response_id: str) -> tuple[Item, list[Item]]:
        """A stored response and its input items, or NotFound."""
        found = self.store.response(response_id, owner=self.sessions.owner())
        if found is None:
            raise NotFound(f"response '{response_id}' not found")
        return found

    def delete(self, response_id: str) -> None:
        """Forget a stored response, or NotFound."""
        if not self.store.delete_response(response_id, owner=self.sessions.owner()):
            raise NotFound(f"response '{response_id}' not found")

    def conversation(self, conversation_id: str) -> Item:
        """A conversation object, or NotFound."""
        found = self.store.conversation(conversation_id, owner=self.sessions.owner())
        if found is None:
            raise NotFound(f"conversation '{conversation_id}' not found")
        return found

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete a conversation with its items, and whatever the engine keeps for it."""
        if not self.store.delete_conversation(conversation_id, owner=self.sessions.owner()):
            raise NotFound(f"conversation '{conversation_id}' not found")
        self.sessions.forget(conversation_id)
