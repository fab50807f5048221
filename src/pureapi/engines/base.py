"""The engine interface: `generate(request) -> Iterator[Chunk]` plus tokenization and info.

An engine owns its model and the worker thread(s) that touch it; request threads only enqueue
work and read chunks back. Cancelling is closing the iterator: the worker sees the request's
`cancel` event at its next token and stops.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import Cancelled, EngineError, NotReady, Overloaded, PureAPIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass
class SamplingParams:
    """How to sample one reply; temperature 0 means greedy."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repeat_penalty: float = 1.0  # 1: off; divides the logits of tokens already in the reply
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass
class GenerationRequest:
    """A tokenized prompt and its sampling parameters."""

    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event)
    session_id: str | None = None


@dataclass
class Chunk:
    """A piece of generated text with the token counts so far; the last one has finish_reason."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed (OpenAI's cached_tokens)


class Engine(ABC):
    """What the API layer needs from a model backend."""

    name: str = "engine"
    model_name: str = ""
    device: str = "cpu"
    context_length: int = 2048
    slots: int = 1  # generations that run at the same time

    @abstractmethod
    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Render the chat template and tokenize; message content is never parsed for special tokens."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Start generating; raises Overloaded at once when the queue is full."""

    @abstractmethod
    def memory_allocated(self) -> int:
        """Bytes the model occupies (CUDA: torch.cuda.memory_allocated)."""

    def ready(self) -> bool:
        """True once the model answers."""
        return True

    def info(self) -> dict[str, Any]:
        """Static facts about the loaded model."""
        return {
            "engine": self.name,
            "model": self.model_name,
            "device": self.device,
            "context_length": self.context_length,
        }

    def metrics(self) -> dict[str, float]:
        """Counters and gauges for /metrics (pureapi_engine_<key>; a key ending in _total is a counter)."""
        return {}

    def forget(self, session_id: str) -> None:
        """Drop whatever the engine keeps for a session (a reset); engines that keep nothing do nothing."""

    def close(self) -> None:
        """Stop workers and free the model."""


class _Job:
    """One generation handed to a worker; the worker writes chunks to `out`."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.out: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        self.cached_tokens = 0  # set by an engine that reuses KV, when the job starts

    def emit(self, text: str, completion_tokens: int) -> None:
        if text:
            self.out.put(Chunk(text, None, len(self.request.prompt_ids), completion_tokens, self.cached_tokens))

    def finish(self, reason: str, completion_tokens: int) -> None:
        self.out.put(Chunk("", reason, len(self.request.prompt_ids), completion_tokens, self.cached_tokens))

    def fail(self, exc: BaseException) -> None:
        self.out.put(exc)


class QueuedEngine(Engine):
    """An engine whose model is driven by one worker thread fed from a bounded queue.

    One generation runs at a time: on one device a second concurrent `generate` would only
    split the same compute, and the model objects are not safe to share between threads.
    """

    def __init__(self, max_queue: int = 64):
        # Bounded so that overload is answered with 503 at once instead of an ever-growing wait.
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Start the worker thread (call once the model is loaded)."""
        self._worker = threading.Thread(target=self._loop, name=f"{self.name}-worker", daemon=True)
        self._worker.start()

    def ready(self) -> bool:
        return self._worker is not None and self._worker.is_alive() and not self._closed

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if not self.ready():
            raise NotReady("the model is not loaded")
        job = _Job(request)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded("server busy: the generation queue is full, retry later") from None
        return self._read(job)

    @staticmethod
    def _read(job: _Job) -> Iterator[Chunk]:
        try:
            while True:
                item = job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Closing the iterator early (client gone, stop string hit) stops the worker.
            job.request.cancel.set()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.request.cancel.is_set():
                job.fail(Cancelled("cancelled before it started"))
                continue
            try:
                self._run(job)
                if job.request.cancel.is_set():
                    # Cancelled by someone other than its reader (shutdown, reset): end its stream.
                    job.fail(Cancelled("generation cancelled"))
            except PureAPIError as exc:
                job.fail(exc)
            except Exception as exc:  # the worker must survive any one bad generation
                log.exception("generation failed")
                job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    @abstractmethod
    def _run(self, job: _Job) -> None:
        """Generate for one job on the worker thread, calling job.emit/finish."""

    def close(self) -> None:
        self._closed = True
        # Cancel everything still waiting, then wake the worker so it exits.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.request.cancel.set()
                job.fail(Cancelled("server shutting down"))
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        if self._worker is not None:
            self._worker.join(timeout=10)


_PLACEHOLDER = "\u27e6pureapi-{nonce}-{i}\u27e7"


def render_segments(
    render: Callable[[list[dict[str, str]]], str], messages: Sequence[Message]
) -> list[tuple[bool, str]]:
    """Render a chat template with placeholders for the content, then split the result.

    Returns (is_user_text, text) pieces in order, so that an engine can tokenize the template's
    own text with special tokens parsed and the messages' text with special tokens as plain text:
    a user who types `<|im_start|>` gets those characters, not a control token.
    """
    nonce = secrets.token_hex(6)
    holders = [_PLACEHOLDER.format(nonce=nonce, i=i) for i in range(len(messages))]
    rendered = render([{"role": m.role, "content": h} for m, h in zip(messages, holders, strict=True)])
    pattern = re.compile("\u27e6pureapi-" + nonce + r"-(\d+)\u27e7")
    pieces: list[tuple[bool, str]] = []
    pos = 0
    for match in pattern.finditer(rendered):
        if match.start() > pos:
            pieces.append((False, rendered[pos : match.start()]))
        content = messages[int(match.group(1))].content
        if content:
            pieces.append((True, content))
        pos = match.end()
    if pos < len(rendered):
        pieces.append((False, rendered[pos:]))
    return pieces


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for n in range(min(self._longest - 1, len(buf)), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stops):
                keep = n
                break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Text held back when the stream ends without a stop."""
        held, self._held = self._held, ""
        return held


def close_stream(stream: object) -> None:
    """Close a generator-like stream (ending its generation) if it can be closed."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def with_stops(chunks: Iterator[Chunk], stops: Sequence[str]) -> Iterator[Chunk]:
    """Apply stop strings to an engine stream; closing early cancels the generation."""
    matcher = StopMatcher(stops)
    try:
        for chunk in chunks:
            text, hit = matcher.feed(chunk.text)
            if hit:
                yield replace(chunk, text=text, finish_reason="stop")
                return
            if chunk.finish_reason is not None:
                yield replace(chunk, text=text + matcher.flush())
                return
            if text:
                yield replace(chunk, text=text)
    finally:
        close_stream(chunks)
