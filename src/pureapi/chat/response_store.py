"""Responses and conversations in the sessions' SQLite file: each completed turn lands in one transaction."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .store import SQLiteStore

Item = dict[str, Any]


@dataclass
class StoredTurn:
    """One stored response: its input items and its output items, oldest first in a chain."""

    input: list[Item]
    output: list[Item]


@dataclass
class Page:
    """A page of items and whether more follow it."""

    items: list[Item]
    has_more: bool


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ResponseStore:
    """Stored responses (with their previous-response links) and conversations (ordered items)."""

    def __init__(self, store: SQLiteStore):
        self.store = store

    # Responses.

    def response(self, response_id: str, *, owner: str) -> tuple[Item, list[Item]] | None:
        """The owner's stored response's body and input items, or None if unknown, deleted, expired or not theirs."""
        with self.store.reading() as db:
            row = db.execute(
                "SELECT body, input FROM responses WHERE id = ? AND owner = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (response_id, owner, time.time()),
            ).fetchone()
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def chain(self, response_id: str, max_turns: int, *, owner: str) -> list[StoredTurn] | None:
        """The newest max_turns turns ending at response_id, oldest first; None if that response is gone.

        A chain whose older part was deleted or expired continues from what is left.
        """
        turns: list[StoredTurn] = []
        now = time.time()
        next_id: str | None = response_id
        with self.store.reading() as db:
            while next_id is not None and len(turns) < max_turns:
                row = db.execute(
                    "SELECT previous_id, body, input FROM responses "
                    "WHERE id = ? AND owner = ? AND (expires_at IS NULL OR expires_at > ?)",
                    (next_id, owner, now),
                ).fetchone()
                if row is None:
                    break
                turns.append(StoredTurn(json.loads(row[2]), json.loads(row[1])["output"]))
                next_id = row[0]
        if not turns:
            return None
        return turns[::-1]

    def delete_response(self, response_id: str, *, owner: str) -> bool:
        """Forget the owner's response; True if it was there."""
        with self.store.transaction() as db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    def commit_turn(
        self,
        *,
        response: Item | None,
        input_items: Sequence[Item],
        previous_id: str | None,
        conversation_id: str | None,
        conversation_items: Sequence[Item],
        ttl: float,
        owner: str,
    ) -> None:
        """Store a completed turn in one transaction: the response (if kept) and the conversation's new items.

        Expired responses are purged here too (an indexed delete, so cheap).
        """
        now = time.time()
        with self.store.transaction() as db:
            db.execute("DELETE FROM responses WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
            if response is not None:
                db.execute(
                    "INSERT INTO responses (id, owner, previous_id, body, input, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        response["id"],
                        owner,
                        previous_id,
                        _dump(response),
                        _dump(list(input_items)),
                        now,
                        now + ttl if ttl else None,
                    ),
                )
            if conversation_id is not None:
                # A conversation deleted while the reply was generated takes no items.
                self._append(db, conversation_id, conversation_items, now, owner)

    def counts(self, owner: str) -> tuple[int, int]:
        """How many unexpired responses and how many conversations the owner keeps."""
        with self.store.reading() as db:
            responses = db.execute(
                "SELECT COUNT(*) FROM responses WHERE owner = ? AND (expires_at IS NULL OR expires_at > ?)",
                (owner, time.time()),
            ).fetchone()[0]
            conversations = db.execute("SELECT COUNT(*) FROM conversations WHERE owner = ?", (owner,)).fetchone()[0]
        return int(responses), int(conversations)

    # Conversations.

    @staticmethod
    def _conversation_row(row: tuple[str, str, float]) -> Item:
        return {"id": row[0], "object": "conversation", "created_at": int(row[2]), "metadata": json.loads(row[1])}

    @staticmethod
    def _mine(db: sqlite3.Connection, conversation_id: str, owner: str) -> bool:
        query = "SELECT 1 FROM conversations WHERE id = ? AND owner = ?"
        return db.execute(query, (conversation_id, owner)).fetchone() is not None

    @classmethod
    def _append(
        cls, db: sqlite3.Connection, conversation_id: str, items: Sequence[Item], now: float, owner: str
    ) -> bool:
        if not cls._mine(db, conversation_id, owner):
            return False
        db.executemany(
            "INSERT INTO conversation_items (id, conversation_id, item, created_at) VALUES (?, ?, ?, ?)",
            [(item["id"], conversation_id, _dump(item), now) for item in items],
        )
        return True

    def create_conversation(
        self, conversation_id: str, metadata: dict[str, str], items: Sequence[Item], *, owner: str
    ) -> Item:
        """Create a conversation of the owner's with its first items."""
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, metadata, created_at) VALUES (?, ?, ?, ?)",
                (conversation_id, owner, _dump(metadata), now),
            )
            self._append(db, conversation_id, items, now, owner)
        return self._conversation_row((conversation_id, _dump(metadata), now))

    def conversation(self, conversation_id: str, *, owner: str) -> Item | None:
        """The owner's conversation object, or None."""
        with self.store.reading() as db:
            row = db.execute(
                "SELECT id, metadata, created_at FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
        return self._conversation_row(row) if row else None

    def update_conversation(self, conversation_id: str, metadata: dict[str, str], *, owner: str) -> Item | None:
        """Replace the owner's conversation's metadata; None if it does not exist."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE conversations SET metadata = ? WHERE id = ? AND owner = ?",
                (_dump(metadata), conversation_id, owner),
            )
            row = db.execute(
                "SELECT id, metadata, created_at FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
        return self._conversation_row(row) if row else None

    def delete_conversation(self, conversation_id: str, *, owner: str) -> bool:
        """Delete the owner's conversation and its items; True if it was there."""
        with self.store.transaction() as db:
            query = "DELETE FROM conversations WHERE id = ? AND owner = ?"
            return db.execute(query, (conversation_id, owner)).rowcount > 0

    def add_items(self, conversation_id: str, items: Sequence[Item], *, owner: str) -> bool:
        """Append items; False if the owner has no such conversation."""
        with self.store.transaction() as db:
            return self._append(db, conversation_id, items, time.time(), owner)

    def all_items(self, conversation_id: str, *, owner: str) -> list[Item] | None:
        """Every item of the owner's conversation, oldest first; None if it has none such."""
        with self.store.reading() as db:
            if not self._mine(db, conversation_id, owner):
                return None
            rows = db.execute(
                "SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def item(self, conversation_id: str, item_id: str, *, owner: str) -> Item | None:
        """One item of the owner's conversation, or None."""
        with self.store.reading() as db:
            row = db.execute(
                "SELECT i.item FROM conversation_items i JOIN conversations c ON c.id = i.conversation_id "
                "WHERE i.conversation_id = ? AND i.id = ? AND c.owner = ?",
                (conversation_id, item_id, owner),
            ).fetchone()
        return json.loads(row[0]) if row else None

    def delete_item(self, conversation_id: str, item_id: str, *, owner: str) -> bool:
        """Delete one item of the owner's conversation; True if it was there."""
        with self.store.transaction() as db:
            if not self._mine(db, conversation_id, owner):
                return False
            query = "DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?"
            return db.execute(query, (conversation_id, item_id)).rowcount > 0

    def items_page(self, conversation_id: str, limit: int, order: str, after: str | None, *, owner: str) -> Page | None:
        """A page of the owner's conversation's items (order 'asc' or 'desc', after an item id); None if none such."""
        with self.store.reading() as db:
            if not self._mine(db, conversation_id, owner):
                return None
            op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
            start = None
            if after is not None:
                found = db.execute(
                    "SELECT seq FROM conversation_items WHERE conversation_id = ? AND id = ?", (conversation_id, after)
                ).fetchone()
                if found is None:
                    return Page([], False)
                start = found[0]
            where = f" AND seq {op} ?" if start is not None else ""
            args: tuple[Any, ...] = (
                (conversation_id, start, limit + 1) if start is not None else (conversation_id, limit + 1)
            )
            rows = db.execute(
                f"SELECT item FROM conversation_items WHERE conversation_id = ?{where} "
                f"ORDER BY seq {direction} LIMIT ?",
                args,
            ).fetchall()
        return Page([json.loads(r[0]) for r in rows[:limit]], len(rows) > limit)
