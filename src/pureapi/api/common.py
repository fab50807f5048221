"""What both API surfaces share: strict JSON bodies, field definitions, SSE framing, streaming."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, TypeVar

from flask import Response, current_app, request, stream_with_context
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from ..chat.directory import SessionDirectory
from ..chat.gateway import Gateway
from ..chat.sessions import SessionService
from ..chat.streams import close_stream
from ..errors import BadRequest, Cancelled, PureAPIError, UnsupportedMediaType
from ..types import Chunk, TokenLogprob

log = logging.getLogger(__name__)

# Field definitions written once for both surfaces.
Temperature = Annotated[
    StrictFloat | StrictInt,
    Field(ge=0, le=2, allow_inf_nan=False, description="Sampling temperature, 0 to 2; 0 is greedy."),
]
TopP = Annotated[StrictFloat | StrictInt, Field(gt=0, le=1, description="Nucleus sampling mass, (0, 1].")]
Penalty = Annotated[
    StrictFloat | StrictInt,
    Field(ge=-2, le=2, allow_inf_nan=False, description="OpenAI's presence/frequency penalty, -2 to 2."),
]
MaxTokens = Annotated[StrictInt, Field(ge=1, le=1_000_000, description="Most tokens to generate.")]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1, description="Seed for reproducible sampling.")]
SessionId = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:@-]+$",
        description="Conversation id (letters, digits, _ . : @ -); omitted means the default session.",
    ),
]
MAX_STOP = 16

M = TypeVar("M", bound=BaseModel)


def sessions() -> SessionService:
    """The app's conversation service (turns of sessions kept on the server)."""
    return current_app.extensions["pureapi"].sessions  # type: ignore[no-any-return]


def gateway() -> Gateway:
    """The app's generation gateway: the engine, and stateless generations."""
    return current_app.extensions["pureapi"].gateway  # type: ignore[no-any-return]


def directory() -> SessionDirectory:
    """The app's sessions as records (the sessions API)."""
    return current_app.extensions["pureapi"].directory  # type: ignore[no-any-return]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def json_body(*, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object: strict UTF-8, no NaN/Infinity, JSON content type."""
    raw = request.get_data(cache=True)
    if not raw.strip() and allow_empty:
        return {}
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {mimetype}")
    if not raw.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(body).__name__}")
    if "\\u" in text:
        _reject_surrogates(body)
    return body


def _reject_surrogates(body: Any) -> None:
    """A `\\ud800`-style escape can smuggle in a lone surrogate, which no tokenizer, database or
    response encoder accepts: reject it as a bad request rather than fail later with a 500."""
    pending = [body]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRequest(
                    f"request body contains an unpaired surrogate (\\u{ord(item[exc.start]):04x}); "
                    "JSON strings must be valid Unicode"
                ) from None


def _is_union_tag(part: int | str) -> bool:
    """Pydantic names a union member in an error location ('float', 'list[str]'); no field is so named."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def validate(model: type[M], data: dict[str, Any]) -> M:
    """Validate with pydantic; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A value that fits no member of a union (str | list[str]) yields one error per member; report
        # the one that got deepest into the value, on the field the first error is about.
        err = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
        field = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or None
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "field required"
        elif err["type"] == "extra_forbidden":
            msg = "not a supported field; leave it out (the README lists the fields each endpoint honours)"
        raise BadRequest(f"{field}: {msg}" if field else msg, param=field) from None


def primed(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """Pull the first chunk now, before answering, so early failures are still proper HTTP errors.

    Returns an iterator over the whole stream, the first chunk included; closing it closes the stream.
    """
    try:
        first = next(chunks)
    except StopIteration:
        return iter([Chunk("", "stop")])
    except BaseException:
        close_stream(chunks)
        raise
    return _chain(first, chunks)


def _chain(first: Chunk, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    try:
        yield first
        yield from rest
    finally:
        close_stream(rest)


def collecting(chunks: Iterator[Chunk], tokens: list[TokenLogprob]) -> Iterator[Chunk]:
    """The stream, adding each chunk's token logprobs to `tokens`; closing it closes the stream."""
    try:
        for chunk in chunks:
            tokens.extend(chunk.logprobs or ())
            yield chunk
    finally:
        close_stream(chunks)


def drain(chunks: Iterator[Chunk]) -> tuple[str, Chunk]:
    """Collect a whole reply; stops (and so cancels) if the client disconnects meanwhile."""
    gone: Callable[[], bool] = request.environ.get("waitress.client_disconnected", lambda: False)
    parts: list[str] = []
    last = Chunk("")
    try:
        for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
            if gone():
                raise Cancelled("client disconnected")
    finally:
        close_stream(chunks)
    return "".join(parts), last


# Characters JSON leaves unescaped that str.splitlines() (and so requests' iter_lines) treats as
# line breaks; escaped, an event stays on one line for every client.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event, named where the protocol names them (Anthropic's)."""
    if isinstance(data, str):
        payload = data
    else:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


class Encoder(ABC):
    """One surface's event shape, for the relay: what opens the stream, each chunk's events, what closes a
    stream that ended well, and what a failure sends instead."""

    def opening(self) -> Iterable[str]:
        """Events sent before the first chunk's."""
        return ()

    @abstractmethod
    def events(self, chunk: Chunk) -> Iterable[str]:
        """The events of one chunk."""

    def closing(self) -> Iterable[str]:
        """Events sent after the last chunk of a stream that ended well."""
        return ()

    @abstractmethod
    def failed(self, message: str) -> Iterable[str]:
        """Events sent instead of closing() when the stream failed; `message` is safe to show a client."""


class _Functions(Encoder):
    """An encoder made of two functions: a chunk's events, and the one event of a failure."""

    def __init__(self, events: Callable[[Chunk], Iterable[str]], failed: Callable[[str], str]):
        self._events, self._failed = events, failed

    def events(self, chunk: Chunk) -> Iterable[str]:
        return self._events(chunk)

    def failed(self, message: str) -> Iterable[str]:
        return [self._failed(message)]


def relay(
    chunks: Iterator[Chunk],
    encoder: Encoder | Callable[[Chunk], Iterable[str]],
    failed: Callable[[str], str] | None = None,
) -> Iterator[str]:
    """The one way a stream reaches a client: the SSE events of each chunk in the surface's shape.

    The engine stream is closed however this ends: at its end, on a failure (sent as the surface's
    error events), or when the client goes away (WSGI closes this generator: GeneratorExit). So a
    disconnect cancels the generation at once, whoever else still holds the stream. `encoder` may also
    be given as two functions, a chunk's events and `failed(message)`, the failure's one event.
    """
    if not isinstance(encoder, Encoder):
        if failed is None:
            raise TypeError("relay: an events function needs its failed function")
        encoder = _Functions(encoder, failed)
    try:
        yield from encoder.opening()
        for chunk in chunks:
            yield from encoder.events(chunk)
        ending = list(encoder.closing())
    except Exception as exc:
        log.warning("stream failed: %s", exc)
        ending = list(encoder.failed(error_text(exc)))
    finally:
        close_stream(chunks)
    yield from ending


def sse_response(events: Iterator[str]) -> Response:
    """A streaming text/event-stream response that proxies must not buffer."""
    return Response(
        stream_with_context(events),  # keeps the request (and its id, for log lines) while streaming
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def error_text(exc: BaseException) -> str:
    """A message safe to send to a client for a failure in the middle of a stream."""
    if isinstance(exc, PureAPIError):
        return exc.message
    return "internal error while generating"
