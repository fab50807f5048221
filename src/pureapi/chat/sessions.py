"""SessionService: per-session ordering, the history window, and the commit of completed rounds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence, Sized
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from ..engines.base import Engine
from ..errors import BadRequest, Conflict, ContextOverflow, NotFound, NotReady, Overloaded
from ..tenants import NOBODY, Principal, TenantLimits
from ..types import Chunk, GenerationRequest, Message, Prompt, SamplingParams
from .store import SessionInfo, SessionStore, session_key
from .streams import close_stream, with_stops

if TYPE_CHECKING:
    from ..metrics import Metrics

_Sized = TypeVar("_Sized", bound=Sized)  # a prompt: token ids or a ChatPrompt, both sized in tokens
DEFAULT_SESSION = "default"
TURN_WAIT_SECONDS = 600.0
DELETE_WAIT_SECONDS = 30.0  # a cancelled turn stops at its next token; this bounds a stuck one


class _SessionLocks:
    """One lock per active session so that concurrent turns on it run one after another."""

    def __init__(self) -> None:
        # Guards the table itself; entries are dropped when no thread holds or waits for them.
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, session_id: str, timeout: float) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(session_id, (threading.Lock(), 0))
            self._locks[session_id] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=timeout):
                raise Overloaded(f"session '{session_id}' is busy with an earlier turn, retry later")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[session_id]
                if users == 1:
                    del self._locks[session_id]
                else:
                    self._locks[session_id] = (lock, users - 1)


def rounds_of(history: Sequence[Message]) -> list[tuple[Message, Message]]:
    """Pair a stored history into (user, assistant) rounds."""
    return [(history[i], history[i + 1]) for i in range(0, len(history) - 1, 2)]


def fit_window(
    encode: Callable[[Sequence[Message]], Prompt],
    context_length: int,
    rounds: Sequence[Sequence[Message]],
    tail: Sequence[Message],
    max_tokens: int,
    prompt_param: str = "message",
    head: Sequence[Message] = (),
) -> Prompt:
    """Tokenize the newest rounds that fit the context with max_tokens left for the reply.

    prompt_param names the request field that holds the prompt, for the error of a prompt too long;
    head (a session's system prompt) always stays in front.
    """
    for start in range(len(rounds) + 1):
        messages = list(head) + [m for pair in rounds[start:] for m in pair] + list(tail)
        ids = encode(messages)
        if len(ids) + max_tokens <= context_length:
            return ids
    return fit_prompt(ids, context_length, max_tokens, prompt_param)


def fit_prompt(ids: _Sized, context_length: int, max_tokens: int, prompt_param: str = "prompt") -> _Sized:
    """The prompt's ids if they fit the context with max_tokens left for the reply; else ContextOverflow."""
    if len(ids) + max_tokens <= context_length:
        return ids
    if len(ids) >= context_length:
        raise ContextOverflow(
            f"the prompt is {len(ids)} tokens but the model's context is {context_length} tokens", param=prompt_param
        )
    raise ContextOverflow(
        f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
        f"({context_length} tokens); lower max_tokens to at most {context_length - len(ids)}",
        param="max_tokens",
    )


class _Admission:
    """Caps the generation requests in flight (running or waiting), so overload is a quick 503.

    Without it, waiting requests would pile up on WSGI threads (behind a session lock or the
    engine's queue) until none is left for /health or for the 503 answers themselves.
    """

    def __init__(self, limit: int):
        self.limit = limit
        # Guards the counter; held only for the check-and-increment.
        self._lock = threading.Lock()
        self._in_flight = 0

    def in_flight(self) -> int:
        """Generations admitted and not yet closed."""
        return self._in_flight

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self._in_flight >= self.limit:
                raise Overloaded(f"server busy: {self._in_flight} generations in flight, retry later")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: its principal (limits, metrics), whose state it reaches, its KV-cache scope."""

    principal: Principal = NOBODY
    owner: str = ""  # the principal's own, or the tenant an admin acts for
    cache_scope: str = ""


class SessionService:
    """Conversations kept on the server: history window in, completed round out; every one has an owner."""

    def __init__(
        self,
        store: SessionStore,
        engine: Callable[[], Engine | None],
        max_rounds: int = 20,
        max_queue: int = 16,
        *,
        caller: Callable[[], Caller] = Caller,
        limits: TenantLimits | None = None,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self._engine = engine
        self.max_rounds = max_rounds
        self.max_queue = max_queue
        self.caller = caller  # who sends the request being served (read in the request's thread)
        self.limits = limits or TenantLimits()
        self.metrics = metrics
        self._locks = _SessionLocks()
        self._admission: _Admission | None = None
        # The cancel events of the generations in flight, so that shutdown can stop them all.
        self._running_lock = threading.Lock()
        self._running: dict[threading.Event, str | None] = {}  # cancel event -> its session's stored key
        self._producing = 0  # generations past their first chunk, for the metrics
        self._closing = False

    @contextmanager
    def _admit(self, engine: Engine, caller: Caller) -> Iterator[None]:
        """Hold a place among the server's generations in flight and among the caller's tenant's."""
        if self._admission is None:
            self._admission = _Admission(self.max_queue + engine.slots)
        with self.limits.admit(caller.principal), self._admission.slot():
            yield

    @contextmanager
    def _tracked(self, request: GenerationRequest) -> Iterator[None]:
        with self._running_lock:
            if self._closing:
                raise NotReady("the server is shutting down")
            self._running[request.cancel] = request.session_id
        try:
            yield
        finally:
            with self._running_lock:
                self._running.pop(request.cancel, None)

    def cancel_all(self) -> None:
        """Shutdown: cancel every generation in flight (each stops at its next token) and start no more."""
        with self._running_lock:
            self._closing = True
            running = list(self._running)
        for cancel in running:
            cancel.set()

    def running(self) -> int:
        """Generations producing tokens now."""
        return self._producing

    def waiting(self) -> int:
        """Generations admitted and waiting for their first token (behind a session's turn or the engine's queue)."""
        admitted = self._admission.in_flight() if self._admission is not None else 0
        return max(0, admitted - self._producing)

    def engine(self) -> Engine:
        """The loaded engine, or NotReady while it loads."""
        engine = self._engine()
        if engine is None or not engine.ready():
            raise NotReady("the model is still loading, retry shortly")
        return engine

    def owner(self) -> str:
        """Whose sessions the request being served reaches."""
        return self.caller().owner

    def history(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """The stored messages of the caller's session, oldest first."""
        return self.store.history(session_id, owner=self.owner())[0]

    def reset(self, session_id: str = DEFAULT_SESSION) -> None:
        """Forget the caller's session; a reply still being generated for it will not land afterwards."""
        owner = self.owner()
        self.store.reset(session_id, owner=owner)
        self._forget(session_key(owner, session_id))  # its saved KV state holds the conversation's tokens too

    def chat(
        self, session_id: str, message: str, params: SamplingParams, idempotency: tuple[str, str] | None = None
    ) -> Iterator[Chunk]:
        """Run one turn; the round is stored only if the reply completes. Early errors raise here.

        With idempotency (key, request fingerprint), a turn already made with the key is answered from the
        store and nothing is appended; the key with another request is a Conflict.
        """
        engine = self.engine()
        caller = self.caller()
        owner, key = caller.owner, session_key(caller.owner, session_id)
        admitted = time.monotonic()
        # Admission and the session lock are held until the turn's stream is closed,
        # so the next turn on this session sees this one.
        hold = ExitStack()
        hold.enter_context(self._admit(engine, caller))
        try:
            hold.enter_context(self._locks.hold(key, TURN_WAIT_SECONDS))
            if idempotency is not None:
                # Checked again under the session lock: a retry racing the original waits for it here.
                reply = self._replay(owner, session_id, *idempotency)
                if reply is not None:
                    hold.close()
                    return iter([Chunk(reply, "stop")])
            history, epoch = self.store.history(session_id, owner=owner)
            system = self.store.system_prompt(session_id, owner=owner)
            head = [Message("system", system)] if system else []
            rounds = rounds_of(history)[-self.max_rounds :]
            prompt = fit_window(
                engine.encode_chat,
                engine.context_length,
                rounds,
                [Message("user", message)],
                params.max_tokens,
                head=head,
            )
            request = GenerationRequest(prompt, params, session_id=key)
            stream = self._generate(engine, hold, request, caller)
        except BaseException:
            hold.close()
            raise
        released = self._released(stream, hold, admitted, caller)
        return self._turn(released, owner, session_id, message, epoch, idempotency)

    def replay(self, session_id: str, key: str, fingerprint: str) -> str | None:
        """The stored reply of the caller's turn made with this Idempotency-Key, None if there was none;
        Conflict if the key was used with a different request."""
        return self._replay(self.owner(), session_id, key, fingerprint)

    def _replay(self, owner: str, session_id: str, key: str, fingerprint: str) -> str | None:
        stored = self.store.idempotent_reply(session_id, key, owner=owner)
        if stored is None:
            return None
        if stored[0] != fingerprint:
            raise Conflict(
                f"Idempotency-Key '{key}' was already used with a different request on session '{session_id}'",
                param="Idempotency-Key",
            )
        return stored[1]

    def stateless(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        fill: bool = False,
        tools: list[dict[str, Any]] | None = None,
        prefix: str = "",
    ) -> Iterator[Chunk]:
        """Generate for a whole conversation sent by the client (the OpenAI API); nothing is stored.

        With fill, max_tokens is ignored and the reply may use the rest of the context. tools and prefix
        go to the chat template (Engine.encode_chat).
        """

        def prompt(engine: Engine, budget: int) -> Prompt:
            def encode(ms: Sequence[Message]) -> Prompt:
                return engine.encode_chat(ms, tools, prefix)

            return fit_window(encode, engine.context_length, [], messages, budget, "messages")

        return self.stateless_prompt(prompt, params, fill)

    def stateless_prompt(
        self, prompt: Callable[[Engine, int], Prompt], params: SamplingParams, fill: bool = False
    ) -> Iterator[Chunk]:
        """Generate for a prompt built by prompt(engine, tokens to leave for the reply), which raises
        ContextOverflow if they do not fit (the raw completions API, and stateless chat); nothing is stored."""
        engine = self.engine()
        caller = self.caller()
        admitted = time.monotonic()
        hold = ExitStack()
        hold.enter_context(self._admit(engine, caller))
        try:
            budget = 1 if fill else params.max_tokens
            prompt_ids = prompt(engine, budget)
            if fill:
                params = replace(params, max_tokens=engine.context_length - len(prompt_ids))
            stream = self._generate(engine, hold, GenerationRequest(prompt_ids, params), caller)
        except BaseException:
            hold.close()
            raise
        return self._released(stream, hold, admitted, caller)

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
        engine = self.engine()
        caller = self.caller()
        admitted = time.monotonic()
        hold = ExitStack()
        hold.enter_context(self._admit(engine, caller))
        try:
            if lock is not None:
                hold.enter_context(self._locks.hold(lock, TURN_WAIT_SECONDS))
            ids, params = prompt(engine)
            stream = self._generate(engine, hold, GenerationRequest(ids, params, session_id=session_id), caller)
        except BaseException:
            hold.close()
            raise
        return self._finished(self._released(stream, hold, admitted, caller), on_finish)

    @staticmethod
    def _finished(chunks: Generator[Chunk, None, None], on_finish: Callable[[str, Chunk], None]) -> Iterator[Chunk]:
        parts: list[str] = []
        with closing(chunks):
            for chunk in chunks:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    on_finish("".join(parts), chunk)
                yield chunk

    def _generate(self, engine: Engine, hold: ExitStack, request: GenerationRequest, caller: Caller) -> Iterator[Chunk]:
        """Start a tracked generation (shutdown can cancel it) with the request's stop strings applied."""
        request.cache_scope = caller.cache_scope
        hold.enter_context(self._tracked(request))
        return with_stops(engine.generate(request), request.params.stop)

    def _released(
        self, stream: Iterator[Chunk], hold: ExitStack, admitted: float, caller: Caller
    ) -> Generator[Chunk, None, None]:
        """The stream, releasing admission (and the session) when closed, with its metrics recorded."""
        last: Chunk | None = None
        try:
            for chunk in stream:
                if last is None:
                    with self._running_lock:
                        self._producing += 1
                    if self.metrics is not None:
                        self.metrics.first_token(time.monotonic() - admitted)
                last = chunk
                yield chunk
        finally:
            close_stream(stream)
            if last is not None:
                with self._running_lock:
                    self._producing -= 1
            if self.metrics is not None:
                self.metrics.generation_ended(last, last is not None and last.finish_reason is not None)
            if last is not None:  # what it computed counts against the tenant's budget, finished or not
                self.limits.spent(caller.principal, last.prompt_tokens, last.completion_tokens)
            hold.close()

    def _turn(
        self,
        chunks: Generator[Chunk, None, None],
        owner: str,
        session_id: str,
        message: str,
        epoch: int,
        idempotency: tuple[str, str] | None,
    ) -> Iterator[Chunk]:
        parts: list[str] = []
        with closing(chunks):
            for chunk in chunks:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    self.store.append_round(
                        session_id,
                        message,
                        "".join(parts),
                        epoch,
                        self.max_rounds,
                        idempotency=idempotency,
                        owner=owner,
                    )
                yield chunk

    # The sessions API.

    def list_sessions(self, limit: int, after: str | None) -> tuple[list[SessionInfo], bool]:
        """The caller's sessions newest first, paged."""
        owner = self.owner()
        if after is not None and self.store.get_session(after, owner=owner) is None:
            raise BadRequest(f"after: no session '{after}' (deleted since?); start from the first page", param="after")
        return self.store.list_sessions(limit, after, owner=owner)

    def get_session(self, session_id: str) -> tuple[SessionInfo, list[Message]]:
        """The caller's session's fields and its stored messages; NotFound if it has none such."""
        owner = self.owner()
        info = self.store.get_session(session_id, owner=owner)
        if info is None:
            raise NotFound(f"no session '{session_id}'", param="session_id")
        return info, self.store.history(session_id, owner=owner)[0]

    def create_session(
        self, session_id: str, title: str | None, metadata: dict[str, Any], system_prompt: str | None
    ) -> SessionInfo:
        """A new empty session of the caller's; Conflict if the caller has one with that id."""
        now = time.time()
        info = SessionInfo(session_id, now, now, title, metadata, system_prompt)
        if not self.store.create_session(info, owner=self.owner()):
            raise Conflict(f"session '{session_id}' already exists", param="id")
        return info

    def update_session(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        """Set the caller's session's title, metadata or system prompt."""
        owner = self.owner()
        if not self.store.update_session(session_id, fields, owner=owner):
            raise NotFound(f"no session '{session_id}'", param="session_id")
        if "system_prompt" in fields:
            self._forget(session_key(owner, session_id))  # its saved KV starts with the old system prompt
        return self.get_session(session_id)[0]

    def delete_session(self, session_id: str) -> None:
        """Delete the caller's session and whatever the engine keeps for it; a turn of it in flight is
        cancelled first.

        The delete runs under the session's lock, so a turn that was generating cannot land its round
        afterwards and bring the session back.
        """
        owner = self.owner()
        key = session_key(owner, session_id)
        deadline = time.monotonic() + DELETE_WAIT_SECONDS
        while True:
            with self._running_lock:
                doomed = [cancel for cancel, sid in self._running.items() if sid == key]
            for cancel in doomed:
                cancel.set()
            try:
                with self._locks.hold(key, 0.05):
                    deleted = self.store.delete_session(session_id, owner=owner)
                break
            except Overloaded:  # the session's turn is still closing: cancel again (a new one may have started)
                if time.monotonic() > deadline:
                    raise
        if not deleted:
            raise NotFound(f"no session '{session_id}'", param="session_id")
        self._forget(key)

    def fork_session(self, source: str, new_id: str, at_turn: int | None) -> SessionInfo:
        """A new session of the caller's holding the source's first `at_turn` rounds (all by default), title,
        metadata and prompt."""
        _, history = self.get_session(source)
        rounds = len(rounds_of(history))
        if at_turn is None:
            at_turn = rounds
        if at_turn > rounds:
            raise BadRequest(f"at_turn: session '{source}' has only {rounds} rounds", param="at_turn")
        if not self.store.fork_session(source, new_id, at_turn, owner=self.owner()):
            raise Conflict(f"session '{new_id}' already exists", param="id")
        return self.get_session(new_id)[0]

    def expire(self, ttl_seconds: float) -> list[str]:
        """Delete the sessions (of every tenant) idle for longer than ttl_seconds; their stored keys."""
        expired = self.store.expire_sessions(time.time() - ttl_seconds)
        for session_id in expired:
            self._forget(session_id)
        return expired

    def _forget(self, session_id: str) -> None:
        engine = self._engine()
        if engine is not None:
            engine.forget(session_id)
