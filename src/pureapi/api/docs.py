"""What each route takes and answers, declared beside it; /openapi.json is built from these and the app's routes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])

Envelope = Literal["seed", "openai", "anthropic"]

# What a route that reads a JSON body may answer besides success: bad body, no key, too large, not JSON, busy.
BODY_ERRORS = (400, 401, 413, 415, 503)
# A generation may also meet its tenant's limits (concurrent generations, tokens per minute).
GENERATION_ERRORS = (*BODY_ERRORS, 429)


@dataclass(frozen=True)
class Operation:
    """One route's contract: its request and response models, how it streams and how it fails."""

    summary: str
    envelope: Envelope  # the error body its failures have
    errors: tuple[int, ...] = ()  # the error statuses it answers with
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None  # each field is one query parameter
    ok: type[BaseModel] | None = None  # the JSON body of a success
    status: int = 200
    answer: str = "OK"  # what a success means
    stream: str | None = None  # how its server-sent events read, when it can stream
    events: tuple[type[BaseModel], ...] = ()  # the models those events carry
    content: dict[str, Any] | None = None  # a success that is not JSON: media type -> {"schema": ...}
    parameters: tuple[dict[str, Any], ...] = ()  # header parameters, as OpenAPI writes them
    # Further statuses, or other words for an error status: status -> (description, body model; None: the error body).
    responses: Mapping[int, tuple[str, type[BaseModel] | None]] = field(default_factory=dict)


# Operations declared away from their view: by endpoint name ("metrics", "anthropic.messages").
DECLARED: dict[str, Operation] = {}


def documented(operation: Operation) -> Callable[[F], F]:
    """Attach a route's contract to its view; put it under the route's decorator."""

    def mark(view: F) -> F:
        view.operation = operation  # type: ignore[attr-defined]
        return view

    return mark


def declare(endpoint: str, operation: Operation) -> None:
    """The contract of an endpoint whose view cannot carry one (a bound method, another owner's file)."""
    DECLARED[endpoint] = operation


def operation_of(endpoint: str, view: Callable[..., Any]) -> Operation | None:
    """The contract an endpoint's view carries or was declared with; None if it has none."""
    return DECLARED.get(endpoint) or getattr(view, "operation", None)
