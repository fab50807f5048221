"""SessionService: conversation turns kept on the server: per-conversation ordering, the history window,
and the commit of completed rounds. Every generation goes through the gateway."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from typing import Any

from ..engines.base import Engine
from ..errors import BadRequest, Conflict, Overloaded
from ..types import Chunk, GenerationRequest, Message, Prompt, SamplingParams, ToolCall
from .gateway import Gateway, Prepared
from .store import SessionStore, session_key
from .window import fit_window, open_round, rounds_of

DEFAULT_SESSION = "default"
TURN_WAIT_SECONDS = 600.0


class SessionLocks:
    """One lock per active conversation so that concurrent turns on it run one after another."""

    def __init__(self) -> None:
        # Guards the table itself; entries are dropped when no thread holds or waits for them.
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=timeout):
                name = key.split("/", 1)[-1]  # the client's id, not the owner's name
                raise Overloaded(f"session '{name}' is busy with an earlier turn, retry later")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def finished(chunks: Iterator[Chunk], on_finish: Callable[[str, Chunk], None]) -> Iterator[Chunk]:
    """The stream, calling on_finish(reply, last chunk) before the last chunk is yielded: a turn is
    committed only when its reply completed, while the conversation's lock is still held."""
    parts: list[str] = []
    with closing(chunks):  # type: ignore[type-var]
        for chunk in chunks:
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                on_finish("".join(parts), chunk)
            yield chunk


def plain_reply(text: str) -> Message:
    """A reply read as text only (no tools were offered)."""
    return Message("assistant", text)


@dataclass
class SessionTurn:
    """What one turn on a session sends beside its sampling: a message, results answering the calls of the
    session's last reply, or both (results first); the tools the template renders and the text the reply
    starts with (a forced call's opening); how the reply's text is read into the assistant message stored
    (its calls parsed). Once the reply completes, `reply` is that message (or the one an idempotent retry
    found)."""

    message: str | None
    results: Sequence[Message] = ()
    tools: list[dict[str, Any]] | None = None
    prefix: str = ""
    read: Callable[[str], Message] = plain_reply
    reply: Message | None = None


def _answered(session_id: str, history: Sequence[Message], turn: SessionTurn) -> list[Message]:
    """The turn's results, each naming its call's function; a 400 unless they answer exactly the calls of
    the session's last reply (and a new message waits until those are answered)."""
    pending: tuple[ToolCall, ...] = history[-1].tool_calls if history and history[-1].role == "assistant" else ()
    waiting = ", ".join(repr(call.id) for call in pending)
    if not turn.results:
        if pending:
            raise BadRequest(
                f"tool_results: the last reply in session '{session_id}' called tools ({waiting}); "
                "post their results before a new message",
                param="tool_results",
            )
        return []
    if not pending:
        raise BadRequest(
            f"tool_results: no tool call in session '{session_id}' is waiting for a result", param="tool_results"
        )
    calls = {call.id: call for call in pending}
    named: list[Message] = []
    for i, result in enumerate(turn.results):
        param = f"tool_results[{i}].tool_call_id"
        if result.tool_call_id not in calls:
            raise BadRequest(
                f"{param}: {result.tool_call_id!r} is not a call waiting for a result (waiting: {waiting})", param=param
            )
        if any(m.tool_call_id == result.tool_call_id for m in named):
            raise BadRequest(f"{param}: call {result.tool_call_id!r} is answered twice", param=param)
        named.append(
            Message("tool", result.content, tool_call_id=result.tool_call_id, name=calls[result.tool_call_id].name)
        )
    missing = [call.id for call in pending if all(m.tool_call_id != call.id for m in named)]
    if missing:
        raise BadRequest(f"tool_results: no result for call {missing[0]!r} (waiting: {waiting})", param="tool_results")
    return named


class SessionService:
    """Conversations kept on the server: history window in, completed round out; every one has an owner."""

    def __init__(self, store: SessionStore, gateway: Gateway, max_rounds: int = 20, locks: SessionLocks | None = None):
        self.store = store
        self.gateway = gateway
        self.max_rounds = max_rounds
        self.locks = locks or SessionLocks()

    def owner(self) -> str:
        """Whose sessions the request being served reaches."""
        return self.gateway.owner()

    def history(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """The stored messages of the caller's session, oldest first."""
        return self.store.history(session_id, owner=self.owner())[0]

    def reset(self, session_id: str = DEFAULT_SESSION) -> None:
        """Forget the caller's session; a reply still being generated for it will not land afterwards."""
        owner = self.owner()
        self.store.reset(session_id, owner=owner)
        self.forget(session_key(owner, session_id))  # its saved KV state holds the conversation's tokens too

    def forget(self, key: str) -> None:
        """Drop what the engine keeps for a conversation (its saved KV)."""
        engine = self.gateway.loaded()
        if engine is not None:
            engine.forget(key)

    def chat(
        self,
        session_id: str,
        turn: SessionTurn | str,
        params: SamplingParams,
        idempotency: tuple[str, str] | None = None,
    ) -> Iterator[Chunk]:
        """Run one turn (a message, or a SessionTurn); it is stored only if the reply completes. Early errors
        (tool results that answer no waiting call included) raise here.

        With idempotency (key, request fingerprint), a turn already made with the key is answered from the
        store and nothing is appended; the key with another request is a Conflict.
        """
        turn = SessionTurn(turn) if isinstance(turn, str) else turn
        caller = self.gateway.caller()
        owner, key = caller.owner, session_key(caller.owner, session_id)
        epoch, replayed = 0, False
        new: list[Message] = []  # what the turn appends before its reply

        def prepare(engine: Engine, hold: ExitStack) -> Prepared:
            nonlocal epoch, replayed, new
            # Held until the turn's stream is closed, so the next turn on this session sees this one.
            hold.enter_context(self.locks.hold(key, TURN_WAIT_SECONDS))
            if idempotency is not None:
                # Checked again under the session lock: a retry racing the original waits for it here.
                stored = self._replay(owner, session_id, *idempotency)
                if stored is not None:
                    replayed, turn.reply = True, stored
                    return [Chunk(stored.content, "stop")]
            history, epoch = self.store.history(session_id, owner=owner)
            new = _answered(session_id, history, turn)
            new += [Message("user", turn.message)] if turn.message is not None else []
            system = self.store.system_prompt(session_id, owner=owner)
            head = [Message("system", system)] if system else []
            # Results join the round whose calls they answer: the window keeps or drops it whole.
            rounds, tail = open_round(rounds_of(history)[-self.max_rounds :], new)
            prompt = fit_window(
                lambda messages: engine.encode_chat(messages, turn.tools, turn.prefix),
                engine.context_length,
                rounds,
                tail,
                params.max_tokens,
                "tool_results" if turn.message is None else "message",
                head=head,
            )
            return GenerationRequest(prompt, params, session_id=key)

        def commit(text: str, last: Chunk) -> None:
            turn.reply = turn.read(text)
            self.store.append_round(
                session_id, [*new, turn.reply], epoch, self.max_rounds, idempotency=idempotency, owner=owner
            )

        stream = self.gateway.generate(prepare, caller)
        return stream if replayed else finished(stream, commit)

    def replay(self, session_id: str, key: str, fingerprint: str) -> Message | None:
        """The stored reply of the caller's turn made with this Idempotency-Key, None if there was none;
        Conflict if the key was used with a different request."""
        return self._replay(self.owner(), session_id, key, fingerprint)

    def _replay(self, owner: str, session_id: str, key: str, fingerprint: str) -> Message | None:
        stored = self.store.idempotent_reply(session_id, key, owner=owner)
        if stored is None:
            return None
        if stored[0] != fingerprint:
            raise Conflict(
                f"Idempotency-Key '{key}' was already used with a different request on session '{session_id}'",
                param="Idempotency-Key",
            )
        return stored[1]

    def run(
        self,
        prompt: Callable[[Engine], tuple[Prompt, SamplingParams]],
        on_finish: Callable[[str, Chunk], None],
        *,
        lock: str | None = None,
        session_id: str | None = None,
    ) -> Iterator[Chunk]:
        """Generate one turn of a conversation kept elsewhere (the Responses API). Early errors raise here.

        With lock, turns under that key run one after another. prompt(engine) builds the prompt ids and
        the sampling parameters (max_tokens may depend on the prompt's length) once the lock is held;
        on_finish(reply, last chunk) runs before the last chunk is yielded, still under the lock: a turn
        is committed only when its reply completed.
        """

        def prepare(engine: Engine, hold: ExitStack) -> Prepared:
            if lock is not None:
                hold.enter_context(self.locks.hold(lock, TURN_WAIT_SECONDS))
            ids, params = prompt(engine)
            return GenerationRequest(ids, params, session_id=session_id)

        return finished(self.gateway.generate(prepare), on_finish)
