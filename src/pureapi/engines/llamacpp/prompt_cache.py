"""Sessions' saved KV sequence states: an LRU cache in RAM bounded by bytes, spilling to a bounded folder.

Invariants:
1. A saved state holds exactly the KV of its `tokens`; it is only ever used through its common
   prefix with a new prompt, so a stale one can cost a restore but never change an answer.
2. The RAM cache's total bytes never exceed its limit (nor the folder's files theirs).
3. Only the scheduler thread saves, takes and reads states; a request thread only drops a
   session's (a reset). The lock guards the RAM cache alone and is never held across disk I/O, so a
   reset never waits behind a spill. A state being spilled while its session is reset may reach
   the disk after the reset's drop: the scheduler drops reset sessions again before it next reads
   or writes a state (`LlamaCppEngine._apply_forgets`).
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, TypeAlias

from .state_files import StateFiles

if TYPE_CHECKING:
    # llama_state_seq_get_data's bytes: a ctypes array, so that restoring needs no extra copy.
    State: TypeAlias = ctypes.Array[ctypes.c_uint8]


class PromptCache:
    """Saved sequence states by session id, oldest first; the oldest (or one too large) go to disk."""

    def __init__(self, limit_bytes: int, disk: StateFiles | None = None):
        self.limit = limit_bytes
        self.disk = disk
        self._ram: OrderedDict[str, tuple[list[int], State]] = OrderedDict()
        self._bytes = 0
        # Guards _ram and _bytes: drop() runs on request threads, everything else on the scheduler.
        self._lock = threading.Lock()
        self.taken_from = "ram"  # where take() found the last state, for the engine's counters

    @property
    def enabled(self) -> bool:
        """False when neither RAM nor disk may keep a state."""
        return self.limit > 0 or self.disk is not None

    @property
    def bytes(self) -> int:
        """Bytes of states now in RAM (never above the limit)."""
        return self._bytes

    def sessions(self) -> list[str]:
        """Sessions with a state in RAM, oldest first."""
        with self._lock:
            return list(self._ram)

    def put(self, session: str, tokens: list[int], state: State) -> None:
        """Keep a session's state (replacing an older one); the oldest states spill to disk to fit."""
        spill: list[tuple[str, list[int], State]] = []
        with self._lock:
            self._pop(session)
            if len(state) <= self.limit:
                while self._ram and self._bytes + len(state) > self.limit:
                    oldest, (old_tokens, old_state) = self._ram.popitem(last=False)
                    self._bytes -= len(old_state)
                    spill.append((oldest, old_tokens, old_state))
                self._ram[session] = (tokens, state)
                self._bytes += len(state)
            else:  # larger than the whole RAM cache
                spill.append((session, tokens, state))
        if self.disk is not None:
            for entry in spill:
                self.disk.put(*entry)

    def tokens(self, session: str) -> list[int] | None:
        """The tokens of the session's state, in RAM or on disk."""
        with self._lock:
            entry = self._ram.get(session)
        if entry is not None:
            return entry[0]
        return self.disk.tokens(session) if self.disk is not None else None

    def take(self, session: str) -> tuple[list[int], State] | None:
        """Remove the session's state (RAM first, else disk) and return it; `taken_from` says which."""
        with self._lock:
            entry = self._pop(session)
        self.taken_from = "ram"
        if self.disk is not None:
            if entry is None:
                self.taken_from = "disk"
                return self.disk.take(session)
            self.disk.drop(session)  # older than the RAM copy
        return entry

    def drop(self, session: str) -> None:
        """Forget the session's state, in RAM and on disk."""
        with self._lock:
            self._pop(session)
        if self.disk is not None:
            self.disk.drop(session)

    def drain(self) -> list[tuple[str, list[int], State]]:
        """Empty the RAM cache and return its states, oldest first (for the shutdown's write)."""
        with self._lock:
            states = [(session, tokens, state) for session, (tokens, state) in self._ram.items()]
            self._ram.clear()
            self._bytes = 0
        return states

    def _pop(self, session: str) -> tuple[list[int], State] | None:
        entry = self._ram.pop(session, None)  # the caller holds the lock
        if entry is not None:
            self._bytes -= len(entry[1])
        return entry
