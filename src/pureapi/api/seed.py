"""The seed API: POST /chat, POST /reset, GET /status, GET /health; errors are {"error": "..."}."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from ..chat.sessions import DEFAULT_SESSION
from ..errors import BadRequest
from ..models import hardware
from ..types import Chunk, SamplingParams
from .common import (
    MaxTokens,
    SessionId,
    Temperature,
    drain,
    error_text,
    gateway,
    json_body,
    primed,
    sessions,
    sse,
    sse_response,
    validate,
)

log = logging.getLogger(__name__)
bp = Blueprint("seed", __name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
_SANE_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class ChatRequest(BaseModel):
    """Body of POST /chat. Unknown fields are ignored, as on /v1."""

    model_config = ConfigDict(extra="ignore")

    message: StrictStr = Field(
        description="The user's message (not empty or only whitespace).",
        json_schema_extra={"minLength": 1, "pattern": r"\S"},
    )
    max_tokens: MaxTokens = 512
    temperature: Temperature = 0.7
    session_id: SessionId | None = None
    stream: StrictBool = Field(False, description="Stream the reply as server-sent events.")

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class ChatResponse(BaseModel):
    """Body of a successful POST /chat."""

    message: str
    response: str
    status: str = "success"


class ResetRequest(BaseModel):
    """Body of POST /reset (optional)."""

    model_config = ConfigDict(extra="ignore")

    session_id: SessionId | None = None


class StatusQuery(BaseModel):
    """Query of GET /status."""

    session_id: SessionId | None = None


class DeviceMemory(BaseModel):
    """One memory pool of the machine: RAM, or one GPU."""

    name: str = Field(description="ram, or cuda:N with the GPU's name")
    total_bytes: int
    free_bytes: int


class StatusResponse(BaseModel):
    """Body of GET /status."""

    model_name: str
    device: str
    conversation_length: int
    memory_allocated: int
    devices: list[DeviceMemory] = Field(description="RAM and each GPU, with free memory now")


def idempotency(body: BaseModel) -> tuple[str, str] | None:
    """(Idempotency-Key, the request's fingerprint) if the client sent a key; a bad key is a 400."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _SANE_KEY.fullmatch(key):
        raise BadRequest(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters, no spaces", param=IDEMPOTENCY_HEADER
        )
    # The fingerprint covers every field that shapes the reply, streaming aside (a retry may switch).
    canonical = json.dumps(body.model_dump(exclude={"stream"}), sort_keys=True, separators=(",", ":"))
    return key, hashlib.sha256(canonical.encode()).hexdigest()


@bp.post("/chat")
def chat() -> Response:
    body = validate(ChatRequest, json_body())
    params = SamplingParams(max_tokens=body.max_tokens, temperature=float(body.temperature))
    session_id = body.session_id or DEFAULT_SESSION
    key = idempotency(body)
    # A retry of a turn that landed is answered from the store: no admission, no engine (even while
    # the model loads after a restart). chat() checks again under the session's lock, for a retry
    # that raced the original.
    stored = sessions().replay(session_id, *key) if key is not None else None
    if stored is not None:
        chunks: Iterator[Chunk] = iter([Chunk(stored, "stop")])
    else:
        chunks = sessions().chat(session_id, body.message, params, idempotency=key)
    stream = primed(chunks)
    if not body.stream:
        text, _ = drain(stream)
        response = jsonify(ChatResponse(message=body.message, response=text).model_dump())
    else:
        response = sse_response(_stream(body.message, stream))
    if stored is not None:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _stream(message: str, chunks: Iterator[Chunk]) -> Iterator[str]:
    parts: list[str] = []
    last: Chunk | None = None
    try:
        for chunk in chunks:
            last = chunk
            if chunk.text:
                parts.append(chunk.text)
                yield sse({"delta": chunk.text})
        final: dict[str, object] = ChatResponse(message=message, response="".join(parts)).model_dump()
        if last is not None:
            # What the turn cost, and how much of the prompt's KV was reused rather than computed.
            final["usage"] = {
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "cached_tokens": last.cached_tokens,
            }
        yield sse(final)
    except Exception as exc:
        log.warning("stream failed: %s", exc)
        yield sse({"error": error_text(exc)})


@bp.post("/reset")
def reset() -> Response:
    body = validate(ResetRequest, json_body(allow_empty=True))
    sessions().reset(body.session_id or DEFAULT_SESSION)
    return jsonify({"status": "success", "message": "conversation history cleared"})


@bp.get("/status")
def status() -> Response:
    query = validate(StatusQuery, request.args.to_dict())
    service = sessions()
    engine = gateway().engine()
    return jsonify(
        StatusResponse(
            model_name=engine.model_name,
            device=engine.device,
            conversation_length=len(service.history(query.session_id or DEFAULT_SESSION)),
            memory_allocated=engine.memory_allocated(),
            devices=_devices(),
        ).model_dump()
    )


def _devices() -> list[DeviceMemory]:
    hw = hardware.detect_cached()
    pools = [DeviceMemory(name="ram", total_bytes=hw.ram_total, free_bytes=hw.ram_free)]
    pools += [DeviceMemory(name=f"cuda:{g.index} {g.name}", total_bytes=g.total, free_bytes=g.free) for g in hw.gpus]
    return pools


@bp.get("/health")
def health() -> tuple[Response, int]:
    state = current_app.extensions["pureapi"]
    engine = state.engine
    if engine is not None and engine.ready():
        return jsonify({"status": "healthy", "model": engine.model_name}), 200
    return jsonify({"status": "loading", "error": "the model is not loaded yet"}), 503
