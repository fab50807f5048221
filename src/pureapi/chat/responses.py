"""The Responses and Conversations APIs' logic: history from a response chain or a conversation, one turn.

A turn's history is the chain of previous responses (each: its input items, then its output) or the
conversation's items, windowed like a session's: at most max_rounds turns, then the oldest dropped
until the prompt fits the context with the reply's room. The turn is stored only when the reply
completed, in one transaction; a failed or cancelled one writes nothing.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from ..engines.base import Engine
from ..errors import BadRequest, NotFound, NotReady
from ..types import Chunk, Message, Prompt, SamplingParams
from .response_store import Item, ResponseStore
from .sessions import SessionService, fit_window


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


def item_message(item: Item) -> Message | None:
    """The chat message a stored item stands for (message items only)."""
    if item.get("type") != "message":
        return None
    role = "system" if item["role"] == "developer" else item["role"]
    return Message(role, "".join(part.get("text", "") for part in item["content"]))


def _messages(items: Sequence[Item]) -> list[Message]:
    """The user and assistant messages among stored items (system text is not replayed)."""
    return [m for m in map(item_message, items) if m is not None and m.role != "system"]


def _turns(items: Sequence[Item]) -> list[list[Message]]:
    """Group a conversation's items into turns, each ending with an assistant message."""
    turns: list[list[Message]] = [[]]
    for message in _messages(items):
        turns[-1].append(message)
        if message.role == "assistant":
            turns.append([])
    return [t for t in turns if t]


@dataclass
class Turn:
    """What one POST /v1/responses asks for, validated."""

    input: list[Message]
    params: SamplingParams  # max_tokens 0: the rest of the context
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    response_id: str = field(default_factory=lambda: new_id("resp"))
    output_id: str = field(default_factory=lambda: new_id("msg"))
    input_items: list[Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.previous_response_id is not None and self.conversation_id is not None:
            raise BadRequest("previous_response_id and conversation cannot both be given", param="conversation")
        if not self.input_items:
            self.input_items = [message_item(m.role, m.content) for m in self.input]


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
            return [_messages([*t.input, *t.output]) for t in chain]
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
            history = self._history(turn, owner)
            ids = fit_window(
                lambda messages: engine.encode_chat([*head, *messages]),
                engine.context_length,
                history,
                tail,
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
            output = [message_item("assistant", text, turn.output_id, "completed")]
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
        with contextlib.suppress(NotReady):  # a model still loading keeps nothing for it yet
            self.sessions.engine().forget(conversation_id)
