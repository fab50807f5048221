"""SessionDirectory: the sessions API's list, read, create, update, fork, delete and expiry, per owner."""

from __future__ import annotations

import time
from typing import Any

from ..errors import BadRequest, Conflict, NotFound, Overloaded
from ..types import Message
from .sessions import SessionService
from .store import SessionInfo, session_key
from .window import rounds_of

DELETE_WAIT_SECONDS = 30.0  # a cancelled turn stops at its next token; this bounds a stuck one


class SessionDirectory:
    """The caller's sessions as records; turns on them are the SessionService's."""

    def __init__(self, sessions: SessionService):
        self.sessions = sessions
        self.store = sessions.store
        self.gateway = sessions.gateway

    def list_sessions(self, limit: int, after: str | None) -> tuple[list[SessionInfo], bool]:
        """The caller's sessions newest first, paged."""
        owner = self.gateway.owner()
        if after is not None and self.store.get_session(after, owner=owner) is None:
            raise BadRequest(f"after: no session '{after}' (deleted since?); start from the first page", param="after")
        return self.store.list_sessions(limit, after, owner=owner)

    def get_session(self, session_id: str) -> tuple[SessionInfo, list[Message]]:
        """The caller's session's fields and its stored messages; NotFound if it has none such."""
        owner = self.gateway.owner()
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
        if not self.store.create_session(info, owner=self.gateway.owner()):
            raise Conflict(f"session '{session_id}' already exists", param="id")
        return info

    def update_session(self, session_id: str, fields: dict[str, Any]) -> SessionInfo:
        """Set the caller's session's title, metadata or system prompt."""
        owner = self.gateway.owner()
        if not self.store.update_session(session_id, fields, owner=owner):
            raise NotFound(f"no session '{session_id}'", param="session_id")
        if "system_prompt" in fields:
            self.sessions.forget(session_key(owner, session_id))  # its saved KV starts with the old prompt
        return self.get_session(session_id)[0]

    def delete_session(self, session_id: str) -> None:
        """Delete the caller's session and whatever the engine keeps for it; a turn of it in flight is
        cancelled first.

        The delete runs under the session's lock, so a turn that was generating cannot land its round
        afterwards and bring the session back.
        """
        owner = self.gateway.owner()
        key = session_key(owner, session_id)
        deadline = time.monotonic() + DELETE_WAIT_SECONDS
        while True:
            self.gateway.cancel(key)
            try:
                with self.sessions.locks.hold(key, 0.05):
                    deleted = self.store.delete_session(session_id, owner=owner)
                break
            except Overloaded:  # the session's turn is still closing: cancel again (a new one may have started)
                if time.monotonic() > deadline:
                    raise
        if not deleted:
            raise NotFound(f"no session '{session_id}'", param="session_id")
        self.sessions.forget(key)

    def fork_session(self, source: str, new_id: str, at_turn: int | None) -> SessionInfo:
        """A new session of the caller's holding the source's first `at_turn` rounds (all by default), title,
        metadata and prompt."""
        _, history = self.get_session(source)
        rounds = len(rounds_of(history))
        if at_turn is None:
            at_turn = rounds
        if at_turn > rounds:
            raise BadRequest(f"at_turn: session '{source}' has only {rounds} rounds", param="at_turn")
        if not self.store.fork_session(source, new_id, at_turn, owner=self.gateway.owner()):
            raise Conflict(f"session '{new_id}' already exists", param="id")
        return self.get_session(new_id)[0]

    def expire(self, ttl_seconds: float) -> list[str]:
        """Delete the sessions (of every tenant) idle for longer than ttl_seconds; their stored keys."""
        expired = self.store.expire_sessions(time.time() - ttl_seconds)
        for key in expired:
            self.sessions.forget(key)
        return expired
