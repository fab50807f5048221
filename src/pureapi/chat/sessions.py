"""SessionService: per-session ordering, the history window, and the commit of completed rounds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import replace

from ..engines.base import Engine
from ..errors import ContextOverflow, NotReady, Overloaded
from ..types import Chunk, GenerationRequest, Message, SamplingParams
from .store import SessionStore
from .streams import close_stream, with_stops

DEFAULT_SESSION = "default"
TURN_WAIT_SECONDS = 600.0


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
    encode: Callable[[Sequence[Message]], list[int]],
    context_length: int,
    rounds: Sequence[Sequence[Message]],
    tail: Sequence[Message],
    max_tokens: int,
    prompt_param: str = "message",
) -> list[int]:
    """Tokenize the newest rounds that fit the context with max_tokens left for the reply.

    prompt_param names the request field that holds the prompt, for the error of a prompt too long.
    """
    for start in range(len(rounds) + 1):
        messages = [m for pair in rounds[start:] for m in pair] + list(tail)
        ids = encode(messages)
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


class SessionService:
    """Conversations kept on the server: history window in, completed round out."""

    def __init__(
        self, store: SessionStore, engine: Callable[[], Engine | None], max_rounds: int = 20, max_queue: int = 16
    ):
        self.store = store
        self._engine = engine
        self.max_rounds = max_rounds
        self.max_queue = max_queue
        self._locks = _SessionLocks()
        self._admission: _Admission | None = None
        # The cancel events of the generations in flight, so that shutdown can stop them all.
        self._running_lock = threading.Lock()
        self._running: set[threading.Event] = set()
        self._closing = False

    def _admit(self, engine: Engine) -> _Admission:
        if self._admission is None:
            self._admission = _Admission(self.max_queue + engine.slots)
        return self._admission

    @contextmanager
    def _tracked(self, request: GenerationRequest) -> Iterator[None]:
        with self._running_lock:
            if self._closing:
                raise NotReady("the server is shutting down")
            self._running.add(request.cancel)
        try:
            yield
        finally:
            with self._running_lock:
                self._running.discard(request.cancel)

    def cancel_all(self) -> None:
        """Shutdown: cancel every generation in flight (each stops at its next token) and start no more."""
        with self._running_lock:
            self._closing = True
            running = list(self._running)
        for cancel in running:
            cancel.set()

    def engine(self) -> Engine:
        """The loaded engine, or NotReady while it loads."""
        engine = self._engine()
        if engine is None or not engine.ready():
            raise NotReady("the model is still loading, retry shortly")
        return engine

    def history(self, session_id: str = DEFAULT_SESSION) -> list[Message]:
        """The stored messages of a session, oldest first."""
        return self.store.history(session_id)[0]

    def reset(self, session_id: str = DEFAULT_SESSION) -> None:
        """Forget a session; a reply still being generated for it will not land afterwards."""
        self.store.reset(session_id)
        engine = self._engine()
        if engine is not None:
            engine.forget(session_id)  # its saved KV state holds the conversation's tokens too

    def chat(self, session_id: str, message: str, params: SamplingParams) -> Iterator[Chunk]:
        """Run one turn; the round is stored only if the reply completes. Early errors raise here."""
        engine = self.engine()
        # Admission and the session lock are held until the turn's stream is closed,
        # so the next turn on this session sees this one.
        hold = ExitStack()
        hold.enter_context(self._admit(engine).slot())
        try:
            hold.enter_context(self._locks.hold(session_id, TURN_WAIT_SECONDS))
            history, epoch = self.store.history(session_id)
            rounds = rounds_of(history)[-self.max_rounds :]
            prompt = fit_window(
                engine.encode_chat, engine.context_length, rounds, [Message("user", message)], params.max_tokens
            )
            stream = self._generate(engine, hold, GenerationRequest(prompt, params, session_id=session_id))
        except BaseException:
            hold.close()
            raise
        return self._turn(stream, hold, session_id, message, epoch)

    def stateless(self, messages: Sequence[Message], params: SamplingParams, fill: bool = False) -> Iterator[Chunk]:
        """Generate for a whole conversation sent by the client (the OpenAI API); nothing is stored.

        With fill, max_tokens is ignored and the reply may use the rest of the context.
        """
        engine = self.engine()
        hold = ExitStack()
        hold.enter_context(self._admit(engine).slot())
        try:
            budget = 1 if fill else params.max_tokens
            prompt = fit_window(engine.encode_chat, engine.context_length, [], messages, budget, "messages")
            if fill:
                params = replace(params, max_tokens=engine.context_length - len(prompt))
            stream = self._generate(engine, hold, GenerationRequest(prompt, params))
        except BaseException:
            hold.close()
            raise
        return self._released(stream, hold)

    def run(
        self,
        prompt: Callable[[Engine], tuple[list[int], SamplingParams]],
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
        hold = ExitStack()
        hold.enter_context(self._admit(engine).slot())
        try:
            if lock is not None:
                hold.enter_context(self._locks.hold(lock, TURN_WAIT_SECONDS))
            ids, params = prompt(engine)
            stream = self._generate(engine, hold, GenerationRequest(ids, params, session_id=session_id))
        except BaseException:
            hold.close()
            raise
        return self._finished(self._released(stream, hold), on_finish)

    @staticmethod
    def _finished(chunks: Generator[Chunk, None, None], on_finish: Callable[[str, Chunk], None]) -> Iterator[Chunk]:
        parts: list[str] = []
        with closing(chunks):
            for chunk in chunks:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    on_finish("".join(parts), chunk)
                yield chunk

    def _generate(self, engine: Engine, hold: ExitStack, request: GenerationRequest) -> Iterator[Chunk]:
        """Start a tracked generation (shutdown can cancel it) with the request's stop strings applied."""
        hold.enter_context(self._tracked(request))
        return with_stops(engine.generate(request), request.params.stop)

    @staticmethod
    def _released(stream: Iterator[Chunk], hold: ExitStack) -> Generator[Chunk, None, None]:
        try:
            yield from stream
        finally:
            close_stream(stream)
            hold.close()

    def _turn(
        self, stream: Iterator[Chunk], hold: ExitStack, session_id: str, message: str, epoch: int
    ) -> Iterator[Chunk]:
        parts: list[str] = []
        with closing(self._released(stream, hold)) as chunks:
            for chunk in chunks:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    self.store.append_round(session_id, message, "".join(parts), epoch, self.max_rounds)
                yield chunk
