"""SQLite session store: histories survive restarts; a round lands in one transaction or not at all."""

from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..types import Message


class StoreError(Exception):
    """The session store cannot be opened or used; the message names the file."""


class SessionStore(ABC):
    """Where conversation histories live; SQLite here, something shared later for replicas."""

    @abstractmethod
    def history(self, session_id: str) -> tuple[list[Message], int]:
        """The session's messages, oldest first, and its epoch (bumped by each reset)."""

    @abstractmethod
    def append_round(self, session_id: str, user: str, assistant: str, epoch: int, max_rounds: int) -> bool:
        """Append a user/assistant pair, keep the newest max_rounds; False if the session was reset since `epoch`."""

    @abstractmethod
    def reset(self, session_id: str) -> None:
        """Forget the session's history and bump its epoch."""

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
]


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

    def history(self, session_id: str) -> tuple[list[Message], int]:
        with self._lock:
            row = self._db.execute("SELECT epoch FROM sessions WHERE id = ?", (session_id,)).fetchone()
            rows = self._db.execute(
                "SELECT role, content FROM messages WHERE session_id = ? ORDER BY id", (session_id,)
            ).fetchall()
        return [Message(role, content) for role, content in rows], (row[0] if row else 0)

    def append_round(self, session_id: str, user: str, assistant: str, epoch: int, max_rounds: int) -> bool:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT epoch FROM sessions WHERE id = ?", (session_id,)).fetchone()
                if (row[0] if row else 0) != epoch:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT INTO sessions (id, epoch, created_at, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
                    (session_id, epoch, now, now),
                )
                self._db.executemany(
                    "INSERT INTO messages (session_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                    [(session_id, "user", user, now), (session_id, "assistant", assistant, now)],
                )
                self._db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND id NOT IN "
                    "(SELECT id FROM messages WHERE session_id = ? ORDER BY id DESC LIMIT ?)",
                    (session_id, session_id, 2 * max_rounds),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def reset(self, session_id: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
                self._db.execute(
                    "INSERT INTO sessions (id, epoch, created_at, updated_at) VALUES (?, 1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET epoch = epoch + 1, updated_at = excluded.updated_at",
                    (session_id, now, now),
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

    def close(self) -> None:
        with self._lock:
            self._db.close()
