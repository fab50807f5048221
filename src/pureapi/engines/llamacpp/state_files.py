"""Saved llama.cpp sequence states on disk, beside the sessions database, named by their content.

A state file holds the tokens whose KV it stores, the scope that may use it and the sessions whose
history reached it, then the bytes of `llama_state_seq_get_data`. The prompt cache spills here what
RAM cannot keep, and writes every state here at shutdown, so that a conversation whose slot and RAM
copy are gone (evicted, or the server restarted) has its next turn restored instead of prefilled. A
state is only ever used through the common token prefix with a new prompt, so a stale one can cost
a restore but never change an answer. States of one model file, llama.cpp build and attention
kernel live in a folder of their own (the model fingerprint), since KV bytes mean nothing elsewhere.

File layout: MAGIC, the metadata's length (uint32, little-endian) and the metadata (JSON: scope,
sessions), the token count (uint32) and the tokens (int32 each), then the state bytes to the end
of the file. A file's name is its content key (a hash of scope and tokens), never a session id.
Writes go to a temporary file that replaces the old one, so a crash leaves the old state or the
new one, never a torn file; a file that does not parse (damaged, or an older layout) is deleted
with a warning and ignored.

The index of the folder (each file's tokens, scope, sessions and size, not its state) is read on
first use, so a restart costs one pass over the files' headers and no state is read before a
prompt needs it. Its lock guards the index alone, never file I/O.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

MAGIC = b"PUREKV2\n"
_COUNT = struct.Struct("<I")
SUFFIX = ".kv"


@dataclass
class StateMeta:
    """What the index knows of one state file: everything but the state."""

    tokens: list[int]
    scope: str
    sessions: set[str]
    size: int  # bytes of the file
    written: int  # st_mtime_ns: the oldest files go first


class StateFiles:
    """A bounded folder of sequence states by content key; the oldest files (by write time) go first."""

    def __init__(self, folder: Path, limit_bytes: int):
        self.folder = folder
        self.limit = limit_bytes
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob("*.tmp"):  # left by a crash in the middle of a write
            tmp.unlink(missing_ok=True)
        self._index: dict[str, StateMeta] | None = None  # read on first use
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.folder / (key + SUFFIX)

    def index(self) -> dict[str, StateMeta]:
        """A snapshot of the folder's index: content key -> metadata."""
        with self._lock:
            return dict(self._load_index())

    def _load_index(self) -> dict[str, StateMeta]:
        # The caller holds the lock. Reading the headers is the one I/O done under it, once per process.
        if self._index is None:
            self._index = {}
            for path in self.folder.glob("*" + SUFFIX):
                meta = self._read_meta(path)
                if meta is not None:
                    self._index[path.name[: -len(SUFFIX)]] = meta
        return self._index

    def total_bytes(self) -> int:
        with self._lock:
            return sum(meta.size for meta in self._load_index().values())

    def take(self, key: str, keep: bool = False) -> ctypes.Array[ctypes.c_uint8] | None:
        """Read a state; unless keep, its file is deleted (the slot it is restored into now owns it)."""
        path = self._path(key)
        if not keep:
            with self._lock:
                self._load_index().pop(key, None)
        try:
            with path.open("rb") as f:
                self._parse_head(f)
                size = os.fstat(f.fileno()).st_size - f.tell()
                if size <= 0:
                    raise ValueError("truncated state")
                buf = (ctypes.c_uint8 * size)()
                if f.readinto(buf) != size:  # type: ignore[attr-defined]
                    raise ValueError("truncated state")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error) as exc:
            log.warning("dropping unreadable KV state file %s: %s", path.name, exc)
            self.drop(key)
            return None
        if not keep:
            path.unlink(missing_ok=True)
        return buf

    def put(
        self, key: str, tokens: list[int], scope: str, sessions: set[str], state: ctypes.Array[ctypes.c_uint8]
    ) -> bool:
        """Write a state (replacing the file of the same content), then delete the oldest files over the limit."""
        meta = json.dumps({"scope": scope, "sessions": sorted(sessions)}).encode()
        head = MAGIC + _COUNT.pack(len(meta)) + meta
        head += _COUNT.pack(len(tokens)) + struct.pack(f"<{len(tokens)}i", *tokens)
        size = len(head) + len(state)
        if size > self.limit:
            return False
        path = self._path(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(head)
                    f.write(memoryview(state))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written = path.stat().st_mtime_ns
        except OSError as exc:
            log.warning("could not write a KV state file: %s", exc)
            return False
        with self._lock:
            index = self._load_index()
            index[key] = StateMeta(list(tokens), scope, set(sessions), size, written)
            total = sum(m.size for m in index.values())
            doomed = []
            for old_key, old in sorted(index.items(), key=lambda item: item[1].written):
                if total <= self.limit:
                    break
                if old_key != key:
                    doomed.append(old_key)
                    total -= old.size
            for old_key in doomed:
                del index[old_key]
        for old_key in doomed:
            self._path(old_key).unlink(missing_ok=True)
        return True

    def drop(self, key: str) -> None:
        """Delete a state, if there is one."""
        with self._lock:
            if self._index is not None:
                self._index.pop(key, None)
        self._path(key).unlink(missing_ok=True)

    def forget(self, session: str) -> None:
        """A reset: delete the states only this session's history reached; others stop naming it.

        (A file shared with other sessions keeps the name in its header until it is next written:
        after a restart such a file is dropped only once all of its sessions are reset.)
        """
        doomed = []
        with self._lock:
            index = self._load_index()
            for key, meta in list(index.items()):
                if session in meta.sessions:
                    meta.sessions.discard(session)
                    if not meta.sessions:
                        del index[key]
                        doomed.append(key)
        for key in doomed:
            self._path(key).unlink(missing_ok=True)

    @staticmethod
    def _parse_head(f: BinaryIO) -> tuple[str, set[str], list[int]]:
        """Read a file's head: its scope, sessions and tokens (the state bytes follow)."""
        read = f.read
        head = read(len(MAGIC) + _COUNT.size)
        if len(head) != len(MAGIC) + _COUNT.size or not head.startswith(MAGIC):
            raise ValueError("not a state file of this version")
        (meta_len,) = _COUNT.unpack_from(head, len(MAGIC))
        raw = read(meta_len + _COUNT.size)
        if len(raw) != meta_len + _COUNT.size:
            raise ValueError("truncated metadata")
        meta = json.loads(raw[:meta_len])
        scope = meta.get("scope") if isinstance(meta, dict) else None
        sessions = meta.get("sessions") if isinstance(meta, dict) else None
        if not isinstance(scope, str) or not isinstance(sessions, list):
            raise ValueError("bad metadata")
        (count,) = _COUNT.unpack_from(raw, meta_len)
        data = read(4 * count)
        if len(data) != 4 * count:
            raise ValueError("truncated tokens")
        return scope, {str(s) for s in sessions}, list(struct.unpack(f"<{count}i", data))

    def _read_meta(self, path: Path) -> StateMeta | None:
        try:
            with path.open("rb") as f:
                scope, sessions, tokens = self._parse_head(f)
                st = os.fstat(f.fileno())
                if st.st_size <= f.tell():
                    raise ValueError("truncated state")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            log.warning("dropping unreadable KV state file %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        return StateMeta(tokens, scope, sessions, st.st_size, st.st_mtime_ns)
