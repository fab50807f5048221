"""SessionService: conversation turns kept on the server: per-conversation ordering, the history window,
and the commit of completed rounds. Every generation goes through the gateway."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager

from ..engines.base import Engine
from ..errors import Conflict, Overloaded
from ..types import Chunk, GenerationRequest, Message, Prompt, SamplingParams
from .gateway import Gateway, Prepared
from .store import SessionStore, session_key
from .window import fit_window, rounds_of

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
        self, session_id: str, message: str, params: SamplingParams, idempotency: tuple[str, str] | None = None
    ) -> Iterator[Chunk]:
        """Run one turn; the round is stored only if the reply completes. Early errors raise here.

        With idempotency (key, request fingerprint), a turn already made with the key is answered from the
        store and nothing is appended; the key with another request is a Conflict.
        """
        caller = self.gateway.caller()
        owner, key = caller.owner, session_key(caller.owner, session_id)
        epoch, replayed = 0, False

        def prepare(engine: Engine, hold: ExitStack) -> Prepared:
            nonlocal epoch, replayed
            # Held until the turn's stream is closed, so the next turn on this session sees this one.
            hold.enter_context(self.locks.hold(key, TURN_WAIT_SECONDS))
            if idempotency is not None:
                # Checked again under the session lock: a retry racing the original waits for it here.
                reply = self._replay(owner, session_id, *idempotency)
                if reply is not None:
                    replayed = True
                    return [Chunk(reply, "stop")]
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
            return GenerationRequest(prompt, params, session_id=key)

        def commit(reply: str, last: Chunk) -> None:
            self.store.append_round(
                session_id, message, reply, epoch, self.max_rounds, idempotency=idempotency, owner=owner
            )

        stream = self.gateway.generate(prepare, caller)
        return stream if replayed else finished(stream, commit)

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
