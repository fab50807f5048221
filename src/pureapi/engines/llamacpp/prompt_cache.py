"""Saved KV sequence states found by content: an LRU cache in RAM bounded by bytes, spilling to a bounded folder.

When a slot is about to lose KV (another prompt takes it), its sequence state is saved here under
its tokens. A new prompt is served from the entry that shares the longest prefix with it, whoever
sent it: a session's next turn and a stateless client resending the whole history alike. This is
the lookup llama-server's prompt cache (`--cache-ram`) makes over its saved prompts; SGLang's radix
tree shares KV per token instead, which needs a paged KV cache that llama.cpp's per-sequence states
do not give. Here an entry is a whole sequence state, so the cache keeps few, long entries, and a
linear scan over them costs microseconds against the milliseconds of a restore.

Invariants:
1. An entry holds exactly the KV of its `tokens`; it is only ever used through its common prefix
   with a new prompt, so a stale one can cost a restore but never change an answer.
2. No entry's tokens are a prefix of another entry's of the same scope, in RAM or on disk: the
   longer one serves every prompt the shorter one would, so the shorter one is dropped (`put`).
3. A lookup only finds entries of the request's scope (the API key's, when keys are configured):
   a client cannot learn from timing what another key's prompts were.
4. The RAM cache's total bytes never exceed its limit (nor the folder's files theirs).
5. An entry names the sessions whose history reached it; a reset of a session drops the entries
   that only it reached. Entries of stateless requests name none and outlive every reset.
6. Only the scheduler thread saves, finds and reads states; a request thread only forgets a
   session (a reset). The lock guards the RAM cache alone and is never held across disk I/O, so a
   reset never waits behind a spill. A state being spilled while its session is reset may reach
   the disk after the reset: the scheduler forgets reset sessions again before it next admits a
   prompt (`KVReuse.apply_forgets`).
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from .slots import common_prefix
from .state_files import StateFiles

if TYPE_CHECKING:
    # llama_state_seq_get_data's bytes: a ctypes array, so that restoring needs no extra copy.
    State: TypeAlias = ctypes.Array[ctypes.c_uint8]


def content_key(scope: str, tokens: Sequence[int]) -> str:
    """The name of a state: a hash of its scope and tokens."""
    digest = hashlib.sha256(scope.encode() + b"\0")
    digest.update(array.array("i", tokens).tobytes())
    return digest.hexdigest()[:32]


@dataclass
class Found:
    """A lookup's best entry: its key, its tokens, and how many leading tokens it shares with the prompt."""

    key: str
    tokens: list[int]
    common: int
    on_disk: bool


@dataclass
class _Entry:
    tokens: list[int]
    scope: str
    sessions: set[str]
    state: State
    key: str = field(default="")


class PromptCache:
    """Saved sequence states by content, least recently used first; the oldest (or one too large) go to disk."""

    def __init__(self, limit_bytes: int, disk: StateFiles | None = None):
        self.limit = limit_bytes
        self.disk = disk
        self._ram: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        # Guards _ram and _bytes: forget() runs on request threads, everything else on the scheduler.
        self._lock = threading.Lock()
        self.taken_from = "ram"  # where the last read state came from, for the engine's counters

    @property
    def enabled(self) -> bool:
        """False when neither RAM nor disk may keep a state."""
        return self.limit > 0 or self.disk is not None

    @property
    def bytes(self) -> int:
        """Bytes of states now in RAM (never above the limit)."""
        return self._bytes

    def entries(self) -> list[tuple[list[int], str, set[str]]]:
        """The entries in RAM, least recently used first: (tokens, scope, sessions)."""
        with self._lock:
            return [(e.tokens, e.scope, set(e.sessions)) for e in self._ram.values()]

    def find(self, prompt: Sequence[int], scope: str) -> Found | None:
        """The entry of this scope, in RAM or on disk, that shares the longest prefix with the prompt."""
        with self._lock:
            candidates = [(key, e.tokens, False) for key, e in self._ram.items() if e.scope == scope]
        if self.disk is not None:
            candidates += [(key, m.tokens, True) for key, m in self.disk.index().items() if m.scope == scope]
        best: Found | None = None
        best_rank: tuple[int, bool, int] | None = None
        for key, tokens, on_disk in candidates:
            common = common_prefix(tokens, prompt)
            rank = (common, not on_disk, -len(tokens))  # ties: RAM first, then the cheaper (shorter) state
            if common > 0 and (best_rank is None or rank > best_rank):
                best, best_rank = Found(key, tokens, common, on_disk), rank
        return best

    def covers(self, tokens: list[int], scope: str) -> bool:
        """Whether an entry of the scope, in RAM or on disk, already holds these tokens (or more after them):
        then saving them is a copy of the slot's KV for nothing."""
        with self._lock:
            if any(e.scope == scope and _starts_with(e.tokens, tokens) for e in self._ram.values()):
                return True
        # On disk only a longer one: the same tokens on disk are saved again into RAM, which restores faster.
        on_disk = self.disk.index() if self.disk is not None else {}
        longer = [m.tokens for m in on_disk.values() if m.scope == scope and len(m.tokens) > len(tokens)]
        return any(_starts_with(other, tokens) for other in longer)

    def put(self, tokens: list[int], state: State, scope: str, session: str | None) -> bool:
        """Keep a state, unless a longer entry of the scope already holds its tokens (then False).

        Entries whose tokens are a prefix of these go (invariant 2); the least recently used spill to
        disk to fit. A covering entry is not credited to the session: it is reached through the
        history of whoever sent it, so a reset of this session leaves it (invariant 5).
        """
        key = content_key(scope, tokens)
        sessions = {session} if session is not None else set()
        if self.covers(tokens, scope):
            return False
        on_disk = self.disk.index() if self.disk is not None else {}
        spill: list[_Entry] = []
        with self._lock:
            for old_key in [k for k, e in self._ram.items() if e.scope == scope and _starts_with(tokens, e.tokens)]:
                self._pop(old_key)
            entry = _Entry(tokens, scope, sessions, state, key)
            if len(state) <= self.limit:
                while self._ram and self._bytes + len(state) > self.limit:
                    spill.append(self._pop(next(iter(self._ram))))
                self._ram[key] = entry
                self._bytes += len(state)
            else:  # larger than the whole RAM cache
                spill.append(entry)
        if self.disk is not None:
            for old_key, meta in on_disk.items():
                if meta.scope == scope and _starts_with(tokens, meta.tokens):
                    self.disk.drop(old_key)  # superseded (or the same content, now in RAM)
            for old in spill:
                self._spill(old)
        return True

    def _spill(self, entry: _Entry) -> None:
        assert self.disk is not None
        for key, meta in self.disk.index().items():
            if meta.scope == entry.scope and key != entry.key and _starts_with(entry.tokens, meta.tokens):
                self.disk.drop(key)
        self.disk.put(entry.key, entry.tokens, entry.scope, entry.sessions, entry.state)

    def read(self, found: Found, take: bool) -> State | None:
        """The state of a found entry; with take it leaves the cache (the slot it goes into now holds it).

        Without take (the slot keeps only part of it) the entry stays, as the most recently used.
        `taken_from` says where it came from.
        """
        with self._lock:
            entry = self._ram.get(found.key)
            if entry is not None:
                if take:
                    self._pop(found.key)
                else:
                    self._ram.move_to_end(found.key)
        if entry is not None:
            self.taken_from = "ram"
            return entry.state
        if self.disk is None:
            return None
        self.taken_from = "disk"
        return self.disk.take(found.key, keep=not take)

    def forget(self, session: str) -> None:
        """A reset: drop the entries only this session's history reached (invariant 5), in RAM and on disk."""
        with self._lock:
            for key, entry in list(self._ram.items()):
                if session in entry.sessions:
                    entry.sessions.discard(session)
                    if not entry.sessions:
                        self._pop(key)
        if self.disk is not None:
            self.disk.forget(session)

    def drain(self) -> list[_Entry]:
        """Empty the RAM cache and return its entries, oldest first (for the shutdown's write)."""
        with self._lock:
            entries = list(self._ram.values())
            self._ram.clear()
            self._bytes = 0
        return entries

    def persist(self, entries: list[_Entry]) -> None:
        """Write entries to disk (the shutdown's: the RAM cache's and the slots')."""
        if self.disk is not None:
            for entry in entries:
                self._spill(entry)

    @staticmethod
    def entry(tokens: list[int], state: State, scope: str, session: str | None) -> _Entry:
        """An entry for `persist`, outside the RAM cache."""
        return _Entry(tokens, scope, {session} if session is not None else set(), state, content_key(scope, tokens))

    def _pop(self, key: str) -> _Entry:
        entry = self._ram.pop(key)  # the caller holds the lock
        self._bytes -= len(entry.state)
        return entry


def _starts_with(tokens: list[int], prefix: list[int]) -> bool:
    return len(tokens) >= len(prefix) and tokens[: len(prefix)] == prefix
