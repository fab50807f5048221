"""The sessions API under /v1/sessions: list, create, read, retitle, fork and delete conversations."""

from __future__ import annotations

import json
import secrets
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..chat.store import SessionInfo
from ..errors import BadRequest
from ..types import Message
from .common import SessionId, directory, json_body, validate
from .openai_tools import MessageToolCall

bp = Blueprint("sessions", __name__, url_prefix="/v1/sessions")

Title = StrictStr | None
Metadata = dict[str, Any]
SystemPrompt = StrictStr | None
MAX_METADATA_BYTES = 16_384


class SessionFields(BaseModel):
    """Fields a client may set on a session (all optional)."""

    model_config = ConfigDict(extra="forbid")

    title: Title = Field(None, max_length=256, description="A name for the conversation.")
    metadata: Metadata | None = Field(None, description="Any JSON object (at most 16 KiB), kept as given.")
    system_prompt: SystemPrompt = Field(
        None, max_length=100_000, description="Sent before the history on every turn of this session."
    )


class CreateSession(SessionFields):
    """Body of POST /v1/sessions."""

    id: SessionId | None = Field(None, description="The new session's id; a random one by default.")


class ForkSession(BaseModel):
    """Body of POST /v1/sessions/{id}/fork."""

    model_config = ConfigDict(extra="forbid")

    id: SessionId | None = Field(None, description="The new session's id; a random one by default.")
    at_turn: StrictInt | None = Field(
        None,
        ge=0,
        description="Keep the first N rounds (a user message through the reply, tool exchanges included); "
        "all of them by default.",
    )


class ListQuery(BaseModel):
    """Query of GET /v1/sessions."""

    limit: int = Field(20, ge=1, le=100, description="Sessions per page.")
    after: SessionId | None = Field(None, description="The last id of the previous page.")


class SessionObject(BaseModel):
    """A session as the API shows it."""

    id: str
    object: str = "session"
    created_at: int
    updated_at: int
    title: str | None
    metadata: dict[str, Any]
    system_prompt: str | None
    rounds: int


class MessageObject(BaseModel):
    """One stored message: a user's, an assistant's (which may call tools) or a tool's result."""

    role: str
    content: str
    tool_calls: list[MessageToolCall] | None = Field(None, description="The calls an assistant message made.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    name: str | None = Field(None, description="The function whose result a tool message carries.")

    @classmethod
    def of(cls, m: Message) -> MessageObject:
        """The wire shape of a stored message."""
        calls = [MessageToolCall.of(call) for call in m.tool_calls] or None
        return cls(role=m.role, content=m.content, tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


class SessionWithMessages(SessionObject):
    """GET /v1/sessions/{id}: the session and its messages, oldest first."""

    messages: list[MessageObject]


class SessionList(BaseModel):
    """GET /v1/sessions: a page of sessions, newest first."""

    object: str = "list"
    data: list[SessionObject]
    has_more: bool
    last_id: str | None


def _object(info: SessionInfo) -> dict[str, Any]:
    return SessionObject(
        id=info.id,
        created_at=int(info.created_at),
        updated_at=int(info.updated_at),
        title=info.title,
        metadata=info.metadata,
        system_prompt=info.system_prompt,
        rounds=info.rounds,
    ).model_dump()


class _SessionPath(BaseModel):
    """The session id in a URL path."""

    session_id: SessionId


def _session_id(session_id: str) -> str:
    return validate(_SessionPath, {"session_id": session_id}).session_id


def _fields(body: SessionFields) -> dict[str, Any]:
    fields = body.model_dump(include=body.model_fields_set - {"id"})
    if fields.get("metadata") is None and "metadata" in fields:
        fields["metadata"] = {}
    if len(json.dumps(fields.get("metadata", {}))) > MAX_METADATA_BYTES:
        raise BadRequest(f"metadata: larger than {MAX_METADATA_BYTES} bytes as JSON", param="metadata")
    return fields


@bp.get("")
def list_directory() -> Response:
    query = validate(ListQuery, request.args.to_dict())
    page, more = directory().list_sessions(query.limit, query.after)
    return jsonify(
        SessionList(
            data=[SessionObject(**_object(s)) for s in page], has_more=more, last_id=page[-1].id if page else None
        ).model_dump()
    )


@bp.post("")
def create_session() -> tuple[Response, int]:
    body = validate(CreateSession, json_body(allow_empty=True))
    fields = _fields(body)
    info = directory().create_session(
        body.id or "s-" + secrets.token_hex(8),
        fields.get("title"),
        fields.get("metadata") or {},
        fields.get("system_prompt"),
    )
    return jsonify(_object(info)), 201


@bp.get("/<session_id>")
def get_session(session_id: str) -> Response:
    info, history = directory().get_session(_session_id(session_id))
    # A message shows the tool fields it has; the session's own fields show even when null.
    messages = [MessageObject.of(m).model_dump(exclude_none=True) for m in history]
    return jsonify({**SessionWithMessages(**_object(info), messages=[]).model_dump(), "messages": messages})


@bp.patch("/<session_id>")
def update_session(session_id: str) -> Response:
    body = validate(SessionFields, json_body())
    info = directory().update_session(_session_id(session_id), _fields(body))
    return jsonify(_object(info))


@bp.delete("/<session_id>")
def delete_session(session_id: str) -> Response:
    sid = _session_id(session_id)
    directory().delete_session(sid)
    return jsonify({"id": sid, "object": "session.deleted", "deleted": True})


@bp.post("/<session_id>/fork")
def fork_session(session_id: str) -> tuple[Response, int]:
    body = validate(ForkSession, json_body(allow_empty=True))
    info = directory().fork_session(_session_id(session_id), body.id or "s-" + secrets.token_hex(8), body.at_turn)
    return jsonify(_object(info)), 201
