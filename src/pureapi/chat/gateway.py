"""The generation gateway: the one path from every API surface into the engine.

Admission (the server's cap and the tenant's limits), tracking (shutdown and deletes cancel what is in
flight), metrics and stop strings are applied here once; the conversation services build prompts and
commit turns around it, and stateless requests go straight through it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..engines.base import Engine
from ..errors import NotReady, Overloaded
from ..tenants import NOBODY, Principal, TenantLimits
from ..types import Chunk, GenerationRequest, Message, Prompt, SamplingParams
from .streams import close_stream, with_stops
from .window import fit_window

if TYPE_CHECKING:
    from ..metrics import Metrics

# What a request's preparation hands the gateway: a request to generate, or the chunks of a reply
# already stored (an idempotent retry), which are answered without the engine.
Prepared = GenerationRequest | list[Chunk]


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: its principal (limits, metrics), whose state it reaches, its KV-cache scope."""

    principal: Principal = NOBODY
    owner: str = ""  # the principal's own, or the tenant an admin acts for
    cache_scope: str = ""


class _Admission:
    """Caps the generation requests in flight (running or waiting), so overload is a quick 503, without
    letting one tenant lock the others out.

    Without a cap, waiting requests would pile up on WSGI threads (behind a session lock or the
    engine's queue) until none is left for /health or for the 503 answers themselves. The first
    `limit` are admitted whoever sends them; past that, a tenant holding fewer than its share of the
    limit (limit // tenants in flight, itself counted) still gets one of `spare` more places, so
    another tenant that filled the server cannot keep it out with 503s. With one tenant (or no keys)
    the cap is `limit`; never more than `ceiling` are in flight.
    """

    def __init__(self, limit: int, spare: int):
        self.limit = limit
        self.ceiling = limit + spare
        # Guards the counters; held only for the check-and-increment.
        self._lock = threading.Lock()
        self._in_flight = 0
        self._held: Counter[str] = Counter()  # per tenant in flight (none at 0)

    def in_flight(self) -> int:
        """Generations admitted and not yet closed."""
        return self._in_flight

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        with self._lock:
            share = self.limit // len(self._held.keys() | {tenant})
            fair = self._in_flight < self.ceiling and self._held[tenant] < share
            if self._in_flight >= self.limit and not fair:
                raise Overloaded(f"server busy: {self._in_flight} generations in flight, retry later")
            self._in_flight += 1
            self._held[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._held[tenant] -= 1
                if not self._held[tenant]:
                    del self._held[tenant]


class Gateway:
    """Admits, tracks, measures and stop-checks every generation, whichever surface asked for it."""

    def __init__(
        self,
        engine: Callable[[], Engine | None],
        max_queue: int = 16,
        *,
        caller: Callable[[], Caller] = Caller,
        limits: TenantLimits | None = None,
        metrics: Metrics | None = None,
    ):
        self._engine = engine
        self.max_queue = max_queue
        self.caller = caller  # who sends the request being served (read in the request's thread)
        self.limits = limits or TenantLimits()
        self.metrics = metrics
        self._admission: _Admission | None = None
        # The cancel events of the generations in flight, so that shutdown and deletes can stop them.
        self._running_lock = threading.Lock()
        self._running: dict[threading.Event, str | None] = {}  # cancel event -> its conversation's key
        self._producing = 0  # generations past their first chunk, for the metrics
        self._closing = False

    def engine(self) -> Engine:
        """The loaded engine, or NotReady while it loads."""
        engine = self._engine()
        if engine is None or not engine.ready():
            raise NotReady("the model is still loading, retry shortly")
        return engine

    def loaded(self) -> Engine | None:
        """The engine if one is attached (ready or not), for forgetting what it keeps."""
        return self._engine()

    def owner(self) -> str:
        """Whose conversations the request being served reaches."""
        return self.caller().owner

    def generate(
        self, prepare: Callable[[Engine, ExitStack], Prepared], caller: Caller | None = None
    ) -> Iterator[Chunk]:
        """Admit a generation, let prepare(engine, hold) build it, and start it. Early errors raise here.

        prepare runs once admitted; it may enter what the generation must hold until its stream is
        closed (a conversation's lock) into `hold`. Everything held is released when the stream is closed.
        """
        engine = self.engine()
        caller = caller or self.caller()
        admitted = time.monotonic()
        hold = ExitStack()
        hold.enter_context(self._admit(engine, caller))
        try:
            prepared = prepare(engine, hold)
            if isinstance(prepared, list):
                hold.close()
                return iter(prepared)
            prepared.cache_scope = caller.cache_scope
            prepared.tenant = caller.principal.name
            hold.enter_context(self._tracked(prepared))
            stream = with_stops(engine.generate(prepared), prepared.params.stop)
        except BaseException:
            hold.close()
            raise
        return self._released(stream, hold, admitted, caller)

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

        def prepare(engine: Engine, hold: ExitStack) -> Prepared:
            ids = prompt(engine, 1 if fill else params.max_tokens)
            filled = replace(params, max_tokens=engine.context_length - len(ids)) if fill else params
            return GenerationRequest(ids, filled)

        return self.generate(prepare)

    def cancel(self, key: str) -> int:
        """Cancel the generations of one conversation (each stops at its next token); how many."""
        with self._running_lock:
            doomed = [cancel for cancel, sid in self._running.items() if sid == key]
        for cancel in doomed:
            cancel.set()
        return len(doomed)

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
        """Generations admitted and waiting for their first token (behind a conversation's turn or the queue)."""
        admitted = self._admission.in_flight() if self._admission is not None else 0
        return max(0, admitted - self._producing)

    @contextmanager
    def _admit(self, engine: Engine, caller: Caller) -> Iterator[None]:
        """Hold a place among the server's generations in flight and among the caller's tenant's."""
        if self._admission is None:
            self._admission = _Admission(self.max_queue + engine.slots, spare=engine.slots)
        with self.limits.admit(caller.principal), self._admission.slot(caller.principal.name):
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

    def _released(
        self, stream: Iterator[Chunk], hold: ExitStack, admitted: float, caller: Caller
    ) -> Generator[Chunk, None, None]:
        """The stream, releasing admission (and the conversation) when closed, with its metrics recorded."""
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
