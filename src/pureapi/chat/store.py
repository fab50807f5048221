"""SQLite session store: histories survive restarts; a round lands in one transaction or not at all."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..types import Message, ToolCall


class StoreError(Exception):
    """The session store cannot be opened or used; the message names the file."""


@dataclass
class SessionInfo:
    """A session's own fields (not its messages)."""

    id: str
    created_at: float
    updated_at: float
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    messages: int = 0
    rounds: int = 0  # user messages: a round runs from one to the next, tool exchanges included


class SessionStore(ABC):
    """Where conversation histories live; SQLite here, something shared later for replicas."""

    @abstractmethod
    def history(self, session_id: str, *, owner: str) -> tuple[list[Message], int]:
        """The session's messages, oldest first, and its epoch (bumped by each reset)."""

    @abstractmethod
    def append_round(
        self,
        session_id: str,
        messages: Sequence[Message],
        epoch: int,
        max_rounds: int,
        idempotency: tuple[str, str] | None = None,
        *,
        owner: str,
    ) -> bool:
        """Append a turn's messages (the last is the reply), keep the newest max_rounds rounds (each opened by
        a user message, so a tool call and its result stay together); False if the session was reset since
        `epoch`.

        With idempotency (key, request fingerprint), the reply is also kept under the key, in the same transaction.
        """

    @abstractmethod
    def reset(self, session_id: str, *, owner: str) -> None:
        """Forget the session's history and bump its epoch."""

    @abstractmethod
    def count_sessions(self, owner: str | None = None) -> int:
        """How many sessions the store keeps (of one owner, or of all)."""

    @abstractmethod
    def list_sessions(self, limit: int, after: str | None = None, *, owner: str) -> tuple[list[SessionInfo], bool]:
        """The owner's sessions, newest (last updated) first, from just after session `after`; and whether more
        follow."""

    @abstractmethod
    def get_session(self, session_id: str, *, owner: str) -> SessionInfo | None:
        """One session's fields, or None."""

    @abstractmethod
    def system_prompt(self, session_id: str, *, owner: str) -> str | None:
        """The session's system prompt, if it has one (read on every turn, so a query of its own)."""

    @abstractmethod
    def create_session(self, info: SessionInfo, *, owner: str) -> bool:
        """Create a session with these fields; False if the id is taken."""

    @abstractmethod
    def update_session(self, session_id: str, fields: dict[str, Any], *, owner: str) -> bool:
        """Set title / metadata / system_prompt; False if there is no such session."""

    @abstractmethod
    def delete_session(self, session_id: str, *, owner: str) -> bool:
        """Delete a session with its messages and idempotency keys; False if there was none."""

    @abstractmethod
    def fork_session(self, source: str, new_id: str, rounds: int, *, owner: str) -> bool:
        """Copy the source's fields and its first `rounds` rounds into a new session; False if new_id is taken."""

    @abstractmethod
    def expire_sessions(self, updated_before: float) -> list[str]:
        """Delete the sessions (of every owner) last updated before the given time; their stored keys."""

    @abstractmethod
    def idempotent_reply(self, session_id: str, key: str, *, owner: str) -> tuple[str, Message] | None:
        """(request fingerprint, stored reply) of a turn made with this Idempotency-Key, or None."""

    def close(self) -> None:
        """Release resources."""


# Each entry migrates the schema from version i to i+1 (PRAGMA user_version).
MIGRATIONS = [
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_session ON messages(session_id, id);
    """,
    # The Responses and Conversations APIs (chat/responses.py): a response keeps its own turn (input
    # items and output text) and points at the previous one; a conversation is an ordered item list.
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        metadata TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE conversation_items (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        item TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX conversation_items_by_conversation ON conversation_items(conversation_id, seq);
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        previous_id TEXT,
        body TEXT NOT NULL,
        input TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE INDEX responses_by_expiry ON responses(expires_at) WHERE expires_at IS NOT NULL;
    """,
    # The sessions API: titles, metadata, a per-session system prompt, and idempotent turns.
    """
    ALTER TABLE sessions ADD COLUMN title TEXT;
    ALTER TABLE sessions ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE sessions ADD COLUMN system_prompt TEXT;
    CREATE INDEX sessions_by_update ON sessions(updated_at, id);
    CREATE TABLE idempotency_keys (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        reply TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (session_id, key)
    );
    """,
    # Tenants: every row belongs to the principal that made it. A named tenant's session is stored as
    # '<owner>/<id>' (client ids have no '/'), so two tenants' sessions called 'work' are two rows, and
    # messages and idempotency keys follow through the existing foreign key. Rows from before tenants
    # belong to '' (the anonymous principal): the server cannot know which key made them.
    """
    ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX sessions_by_owner ON sessions(owner, updated_at, id);
    ALTER TABLE responses ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    """,
    # Tool exchanges in sessions: an assistant message may carry its tool calls (JSON), and a tool result
    # (role 'tool') names the call it answers and its function. SQLite cannot alter a CHECK, so messages is
    # rebuilt (create, copy, drop, rename; nothing references it) inside this migration's transaction.
    # An idempotent turn's stored reply keeps its calls too.
    """
    CREATE TABLE messages_v5 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
        content TEXT NOT NULL,
        created_at REAL NOT NULL,
        tool_calls TEXT,
        tool_call_id TEXT,
        name TEXT
    );
    INSERT INTO messages_v5 (id, session_id, role, content, created_at)
        SELECT id, session_id, role, content, created_at FROM messages ORDER BY id;
    DROP TABLE messages;
    ALTER TABLE messages_v5 RENAME TO messages;
    CREATE INDEX messages_by_session ON messages(session_id, id);
    ALTER TABLE idempotency_keys ADD COLUMN tool_calls TEXT;
    """,
]

_MESSAGE_COLUMNS = "role, content, tool_calls, tool_call_id, name"


def _calls_json(calls: Sequence[ToolCall]) -> str | None:
    """An assistant message's calls as stored (None: it made none)."""
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]) if calls else None


def _calls_of(stored: str | None) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in json.loads(stored)) if stored else ()


def _message(row: tuple[Any, ...]) -> Message:
    role, content, calls, call_id, name = row
    return Message(role, content, _calls_of(calls), call_id, name)


def _row(session_id: str, m: Message, now: float) -> tuple[Any, ...]:
    return (session_id, m.role, m.content, _calls_json(m.tool_calls), m.tool_call_id, m.name, now)


def session_key(owner: str, session_id: str) -> str:
    """The stored id of an owner's session: the client's id, behind the owner's name for a named tenant."""
    return f"{owner}/{session_id}" if owner else session_id


_INFO_COLUMNS = (
    "s.id, s.created_at, s.updated_at, s.title, s.metadata, s.system_prompt, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id), s.owner, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id AND m.role = 'user')"
)


def _info(row: tuple[Any, ...]) -> SessionInfo:
    client_id = row[0].split("/", 1)[1] if row[7] else row[0]
    return SessionInfo(client_id, row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[8])


class SQLiteStore(SessionStore):
    """Sessions in one SQLite file, WAL mode, schema versioned with PRAGMA user_version."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        # One connection shared by the request threads; SQLite serializes writers anyway and the
        # statements are tiny, so a lock is simpler and faster than a connection per thread.
        self._lock = threading.Lock()
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
            ok = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(f"session store {self.path}: cannot open it ({exc})") from None
        if ok != "ok":
            raise StoreError(f"session store {self.path}: corrupt ({ok})")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"session store {self.path}: schema version {version} is newer than this pureapi")
        for i in range(version, len(MIGRATIONS)):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {i + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def history(self, session_id: str, *, owner: str) -> tuple[list[Message], int]:
        key = session_key(owner, session_id)
        with self._lock:
            row = self._db.execute("SELECT epoch FROM sessions WHERE id = ? AND owner = ?", (key, owner)).fetchone()
            rows = self._db.execute(
                "SELECT m.role, m.content, m.tool_calls, m.tool_call_id, m.name FROM messages m "
                "JOIN sessions s ON s.id = m.session_id WHERE m.session_id = ? AND s.owner = ? ORDER BY m.id",
                (key, owner),
            ).fetchall()
        return [_message(r) for r in rows], (row[0] if row else 0)

    def append_round(
        self,
        session_id: str,
        messages: Sequence[Message],
        epoch: int,
        max_rounds: int,
        idempotency: tuple[str, str] | None = None,
        *,
        owner: str,
    ) -> bool:
        now = time.time()
        session_id = session_key(owner, session_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT epoch FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
                ).fetchone()
                if (row[0] if row else 0) != epoch:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT INTO sessions (id, owner, epoch, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
                    (session_id, owner, epoch, now, now),
                )
                self._db.executemany(
                    f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [_row(session_id, m, now) for m in messages],
                )
                # Whole rounds go: everything before the max_rounds-th newest user message (none if fewer).
                self._db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND id < (SELECT id FROM messages "
                    "WHERE session_id = ? AND role = 'user' ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (session_id, session_id, max_rounds - 1),
                )
                if idempotency is not None:
                    reply = messages[-1]
                    self._db.execute(
                        "INSERT INTO idempotency_keys (session_id, key, fingerprint, reply, tool_calls, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (session_id, idempotency[0], idempotency[1], reply.content, _calls_json(reply.tool_calls), now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def reset(self, session_id: str, *, owner: str) -> None:
        now = time.time()
        session_id = session_key(owner, session_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                self._db.execute(
                    "INSERT INTO sessions (id, owner, epoch, created_at, updated_at) VALUES (?, ?, 1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET epoch = epoch + 1, updated_at = excluded.updated_at",
                    (session_id, owner, now, now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction: committed if the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for a few reads, with no other thread's statements in between."""
        with self._lock:
            yield self._db

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run statements in one transaction; their row counts."""
        with self.transaction() as db:
            return [db.execute(sql, args).rowcount for sql, args in statements]

    def count_sessions(self, owner: str | None = None) -> int:
        with self._lock:
            if owner is None:
                return int(self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()[0])

    def list_sessions(self, limit: int, after: str | None = None, *, owner: str) -> tuple[list[SessionInfo], bool]:
        with self._lock:
            where, args = "WHERE s.owner = ?", (owner,)  # type: tuple[str, tuple[Any, ...]]
            if after is not None:
                after = session_key(owner, after)
                row = self._db.execute(
                    "SELECT updated_at FROM sessions WHERE id = ? AND owner = ?", (after, owner)
                ).fetchone()
                if row is None:
                    return [], False
                where, args = where + " AND (s.updated_at, s.id) < (?, ?)", (owner, row[0], after)
            rows = self._db.execute(
                f"SELECT {_INFO_COLUMNS} FROM sessions s {where} ORDER BY s.updated_at DESC, s.id DESC LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
        return [_info(r) for r in rows[:limit]], len(rows) > limit

    def get_session(self, session_id: str, *, owner: str) -> SessionInfo | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_INFO_COLUMNS} FROM sessions s WHERE s.id = ? AND s.owner = ?",
                (session_key(owner, session_id), owner),
            ).fetchone()
        return _info(row) if row else None

    def system_prompt(self, session_id: str, *, owner: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT system_prompt FROM sessions WHERE id = ? AND owner = ?", (session_key(owner, session_id), owner)
            ).fetchone()
        return row[0] if row else None

    def create_session(self, info: SessionInfo, *, owner: str) -> bool:
        (count,) = self._write(
            [
                (
                    "INSERT INTO sessions (id, owner, epoch, created_at, updated_at, title, metadata, system_prompt) "
                    "VALUES (?, ?, 0, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                    (
                        session_key(owner, info.id),
                        owner,
                        info.created_at,
                        info.updated_at,
                        info.title,
                        json.dumps(info.metadata),
                        info.system_prompt,
                    ),
                )
            ]
        )
        return count == 1

    def update_session(self, session_id: str, fields: dict[str, Any], *, owner: str) -> bool:
        columns = {k: json.dumps(v) if k == "metadata" else v for k, v in fields.items()}
        assert set(columns) <= {"title", "metadata", "system_prompt"}  # names come from our own schema
        sets = ", ".join(f"{k} = ?" for k in columns)
        (count,) = self._write(
            [
                (
                    f"UPDATE sessions SET {sets}{', ' if sets else ''}updated_at = ? WHERE id = ? AND owner = ?",
                    (*columns.values(), time.time(), session_key(owner, session_id), owner),
                )
            ]
        )
        return count == 1

    def delete_session(self, session_id: str, *, owner: str) -> bool:
        key = session_key(owner, session_id)
        mine = "(SELECT owner FROM sessions WHERE id = ?) = ?"
        counts = self._write(
            [
                (f"DELETE FROM messages WHERE session_id = ? AND {mine}", (key, key, owner)),
                (f"DELETE FROM idempotency_keys WHERE session_id = ? AND {mine}", (key, key, owner)),
                ("DELETE FROM sessions WHERE id = ? AND owner = ?", (key, owner)),
            ]
        )
        return counts[-1] == 1

    def fork_session(self, source: str, new_id: str, rounds: int, *, owner: str) -> bool:
        now = time.time()
        source, new_id = session_key(owner, source), session_key(owner, new_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                created = self._db.execute(
                    "INSERT INTO sessions (id, owner, epoch, created_at, updated_at, title, metadata, system_prompt) "
                    "SELECT ?, owner, 0, ?, ?, title, metadata, system_prompt FROM sessions WHERE id = ? AND owner = ? "
                    "ON CONFLICT(id) DO NOTHING",
                    (new_id, now, now, source, owner),
                ).rowcount
                if created != 1:
                    self._db.execute("ROLLBACK")
                    return False
                # The first `rounds` rounds: everything before the next round's user message (all if none).
                self._db.execute(
                    f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}, created_at) "
                    f"SELECT ?, {_MESSAGE_COLUMNS}, created_at FROM messages WHERE session_id = ? AND id < "
                    "COALESCE((SELECT id FROM messages WHERE session_id = ? AND role = 'user' "
                    "ORDER BY id LIMIT 1 OFFSET ?), 9223372036854775807) ORDER BY id",
                    (new_id, source, source, rounds),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def expire_sessions(self, updated_before: float) -> list[str]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM sessions WHERE updated_at < ?", (updated_before,))]
        expired = []
        for session_id in ids:  # one at a time, so that a turn landing meanwhile keeps its session
            counts = self._write(
                [
                    (
                        "DELETE FROM messages WHERE session_id = ? AND "
                        "(SELECT updated_at FROM sessions WHERE id = ?) < ?",
                        (session_id, session_id, updated_before),
                    ),
                    (
                        "DELETE FROM idempotency_keys WHERE session_id = ? AND "
                        "(SELECT updated_at FROM sessions WHERE id = ?) < ?",
                        (session_id, session_id, updated_before),
                    ),
                    ("DELETE FROM sessions WHERE id = ? AND updated_at < ?", (session_id, updated_before)),
                ]
            )
            if counts[-1] == 1:
                expired.append(session_id)
        return expired

    def idempotent_reply(self, session_id: str, key: str, *, owner: str) -> tuple[str, Message] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT i.fingerprint, i.reply, i.tool_calls FROM idempotency_keys i "
                "JOIN sessions s ON s.id = i.session_id WHERE i.session_id = ? AND i.key = ? AND s.owner = ?",
                (session_key(owner, session_id), key, owner),
            ).fetchone()
        return (row[0], Message("assistant", row[1], _calls_of(row[2]))) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
